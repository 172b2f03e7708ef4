"""The registry of known checkpoints: the embedded ones, plus hub models tagged ``spikevault``.

``inference/models/registry.json`` lists the checkpoints this toolkit knows by a short name::

    {"format_version": 1,
     "models": [
        {"name": "default", "path": "default", "description": "..."},      # embedded folder
        {"name": "tetrode-v1", "id": "hf-hub:ORG/NAME@<commit sha>", ...}  # on the hub
     ]}

``path`` is a folder under ``inference/models/`` shipped inside the package; ``id`` is any model
id :func:`inference.checkpoint.load_model` accepts (pin hub ids to a full commit SHA). For
embedded models the probes, rates, latent size and metrics are read from the folder's
``config.json`` (entries of the registry file are the fallback); for hub ids they come from the
registry entry, or from the hub when listing online.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent / "models"
REGISTRY_PATH = MODELS_DIR / "registry.json"
REGISTRY_FORMAT_VERSION = 1
HUB_TAG = "spikevault"
#: Probe types used in ``intended_probes`` and by ``spikevault models --probe``.
PROBE_TYPES = ("single", "stereotrode", "tetrode", "linear", "dense", "multi-shank", "utah")


@dataclass
class ModelEntry:
    """One known checkpoint, as listed by ``spikevault models``."""

    name: str
    """Short name (``--model NAME``) or, for hub-only models, the ``hf-hub:`` id."""
    id: str
    """What load_model resolves: an embedded folder or an ``hf-hub:ORG/NAME@REV`` id."""
    source: str
    """'embedded', 'registry' (a registered hub id) or 'hub' (found online by tag)."""
    probes: list[str] = field(default_factory=list)
    sampling_rates_hz: list[float] = field(default_factory=list)
    latent_dim: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    available: bool = True
    """False when an embedded folder is registered but not built yet."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_registry(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the model registry is not valid JSON ({err})") from err
    if data.get("format_version") != REGISTRY_FORMAT_VERSION:
        raise ValueError(f"{path}: registry format_version {data.get('format_version')!r}, expected {REGISTRY_FORMAT_VERSION}")
    entries = data.get("models", [])
    problems = []
    names = set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not e.get("name"):
            problems.append(f"entry {i} has no 'name'")
            continue
        if "/" in e["name"] or "\\" in e["name"] or e["name"].startswith(("hf-hub:", ".")):
            problems.append(f"name {e['name']!r} must be a plain short name (no '/', no 'hf-hub:')")
        if e["name"] in names:
            problems.append(f"name {e['name']!r} is listed twice")
        names.add(e["name"])
        if bool(e.get("path")) == bool(e.get("id")):
            problems.append(f"{e['name']!r} needs exactly one of 'path' (embedded folder) or 'id' (hf-hub:...)")
        elif e.get("id") and not str(e["id"]).startswith("hf-hub:"):
            problems.append(f"{e['name']!r}: 'id' must be an hf-hub:ORG/NAME@REV id, got {e['id']!r}")
    if problems:
        raise ValueError(f"{path}: invalid model registry: " + "; ".join(problems))
    # Relative 'path's are relative to the registry file's folder.
    return [{**e, "_base": str(path.resolve().parent)} for e in entries]


def registry_entries(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The raw entries of the registry file (default: the one shipped in the package)."""
    return _read_registry(Path(path or REGISTRY_PATH))


def registry_names(path: str | Path | None = None) -> list[str]:
    return [e["name"] for e in registry_entries(path)]


def get_registry_entry(name: str, path: str | Path | None = None) -> dict[str, Any] | None:
    for e in registry_entries(path):
        if e["name"] == name:
            return e
    return None


def registry_folder(entry: dict[str, Any]) -> Path:
    """The folder of an embedded registry entry (relative paths: next to the registry file)."""
    p = Path(entry["path"])
    return p if p.is_absolute() else Path(entry.get("_base", MODELS_DIR)) / p


def _entry_from_config(name: str, model_id: str, source: str, config: dict[str, Any], fallback: dict[str, Any]) -> ModelEntry:
    model = config.get("model", {}) if config else {}
    return ModelEntry(
        name=name,
        id=model_id,
        source=source,
        probes=[str(p) for p in (config.get("intended_probes") or fallback.get("probes") or [])],
        sampling_rates_hz=[float(r) for r in (config.get("sampling_rates_hz") or fallback.get("sampling_rates_hz") or [])],
        latent_dim=model.get("latent_dim", fallback.get("latent_dim")),
        metrics=dict(config.get("metrics") or fallback.get("metrics") or {}),
        description=fallback.get("description") or config.get("description", ""),
    )


def _embedded_entry(e: dict[str, Any]) -> ModelEntry:
    if e.get("path"):
        cfg_path = registry_folder(e) / "config.json"
        config: dict[str, Any] = {}
        available = cfg_path.is_file()
        if available:
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                logger.warning("%s: unreadable config.json", cfg_path)
                available = False
        entry = _entry_from_config(e["name"], e["name"], "embedded", config, e)
        entry.available = available
        return entry
    return _entry_from_config(e["name"], e["id"], "registry", {}, e)


def _hub_entries(seen_ids: set[str]) -> list[ModelEntry]:
    """Hub models tagged ``spikevault`` (needs the network; the caller guards failures)."""
    from huggingface_hub import HfApi, constants, get_session

    # One quick probe first: list_models retries a dead network for ~25 s with backoff.
    get_session().head(constants.ENDPOINT, timeout=5.0)
    out = []
    for info in HfApi().list_models(filter=HUB_TAG, full=True, cardData=True, limit=200):
        model_id = f"hf-hub:{info.id}"
        if model_id in seen_ids:  # already registered under a short name
            continue
        tags = list(info.tags or [])
        probes = [t[len("probe-"):] for t in tags if t.startswith("probe-")]
        card = info.card_data.to_dict() if getattr(info, "card_data", None) is not None else {}
        out.append(
            ModelEntry(
                name=model_id,
                id=model_id,
                source="hub",
                probes=probes,
                description=str(card.get("model_name") or ""),
            )
        )
    return out


def list_models(
    probe: str | None = None, online: bool = False, registry_path: str | Path | None = None
) -> tuple[list[ModelEntry], list[str]]:
    """Known checkpoints, optionally only those intended for a probe type.

    Parameters
    ----------
    probe : str, optional
        Keep models whose intended probes include this type (see :data:`PROBE_TYPES`).
    online : bool
        Also list hub models tagged ``spikevault``. Offline (``HF_HUB_OFFLINE=1``) or on a network
        error, only the registry is listed and a note says why.
    registry_path : path, optional
        Another registry file (default: the one in the package).

    Returns
    -------
    entries : list of ModelEntry
    notes : list of str
        Messages for the user (e.g. why hub models are missing).
    """
    notes: list[str] = []
    entries = [_embedded_entry(e) for e in registry_entries(registry_path)]
    if online:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            notes.append("HF_HUB_OFFLINE is set: hub models are not listed")
        else:
            try:
                seen = {e.id.partition("@")[0] for e in entries}
                entries += _hub_entries(seen)
            except Exception as err:  # network, DNS, HTTP errors: listing must still work
                notes.append(f"could not list hub models ({type(err).__name__}: {err}); showing the registry only")
    if probe is not None:
        p = probe.lower()
        entries = [e for e in entries if p in (x.lower() for x in e.probes)]
    return entries, notes
