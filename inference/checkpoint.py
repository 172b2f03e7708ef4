"""Checkpoint folders: save a model with its contract, load one from anywhere, verify what loads.

A checkpoint is a folder of three files (the weights-only export that is published):

- ``model.safetensors``: the weights (safetensors; weights are never pickled or unpickled),
- ``config.json``: architecture (``model``), the event ``schema`` the model reads, the
  ``preprocessing`` that made its events (filter band, reference, detection threshold), the
  format and spikevault versions, and whatever the trainer adds (training config, metrics,
  lineage, corpus summary),
- ``README.md``: the model card (:mod:`inference.cards`).

Training checkpoints keep their optimizer / scheduler / data-position state in other files of
the same folder; :func:`save_pretrained` only ever replaces the three files above.

A *model id* is one of

- ``"default"`` or another short name from the registry (``inference/models/registry.json``),
- a local checkpoint folder,
- ``hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME@REVISION`` (branch, tag or, to pin it, a full commit
  SHA). Downloads go through :func:`huggingface_hub.snapshot_download` and its cache, so
  ``HF_HUB_OFFLINE=1``, ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_ENDPOINT`` behave as everywhere else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spikevault.schema import EventSchema, SchemaMismatchError

logger = logging.getLogger(__name__)

#: Version of the checkpoint folder layout / config.json keys written by :func:`save_pretrained`.
CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
#: The files of a published checkpoint, in upload / download order.
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
HUB_PREFIX = "hf-hub:"
#: Weight files of other tools that hold pickles: refused with an explanation, never opened.
PICKLE_WEIGHT_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "checkpoint.pt")

#: Architecture name (``config.json["architecture"]``) -> (module, model class, config class).
_ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "SpikeVAE": ("inference.model", "SpikeVAE", "ModelConfig"),
}
#: config.json keys written by save_pretrained itself; ``extra_config`` may not override them.
_RESERVED_KEYS = ("format", "format_version", "spikevault_version", "architecture", "model", "schema", "preprocessing")


class CheckpointError(ValueError):
    """A checkpoint could not be found, read or verified. The message names the file and the fix."""


class CheckpointSchemaError(CheckpointError, SchemaMismatchError):
    """The checkpoint's event schema is unsupported or inconsistent (also a ``SchemaMismatchError``)."""


@dataclass
class ModelInfo:
    """What a checkpoint says about itself, read from its ``config.json`` without building the model.

    Attributes
    ----------
    model_id : str
        The id it was resolved from (``"default"``, a folder, ``hf-hub:...``).
    folder : Path
        Local folder holding the files (inside the hub cache for hub models).
    config : dict
        The full ``config.json``.
    schema : EventSchema
        The event schema the model reads; extract events with exactly this schema.
    preprocessing : dict
        ``ExtractParams.to_dict()`` of the events it was trained on (filter band, reference,
        detection threshold); use :meth:`extract_params` to get the dataclass.
    revision : str or None
        For hub models: the commit SHA of the downloaded snapshot.
    """

    model_id: str
    folder: Path
    config: dict[str, Any]
    schema: EventSchema
    preprocessing: dict[str, Any]
    revision: str | None = None
    source: str = "local"  # "local", "registry" or "hub"
    registry_entry: dict[str, Any] | None = field(default=None, repr=False)

    def extract_params(self):
        """The preprocessing as a ``spikevault.extract.ExtractParams``."""
        from spikevault.extract import ExtractParams

        return ExtractParams.from_dict(self.preprocessing)


# ----------------------------------------------------------------------------------------- save
def _json_default(obj: Any) -> Any:
    """Make numpy scalars/arrays, paths and dataclasses JSON-serialisable for config.json."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _schema_dict_from_model_config(model_config: dict[str, Any]) -> dict[str, Any]:
    for key in ("schema", "event_schema"):
        value = model_config.get(key)
        if isinstance(value, EventSchema):
            return value.to_dict()
        if isinstance(value, dict):
            return EventSchema.from_dict(value).to_dict()
    raise CheckpointError(
        "the model's config has no event schema (expected a 'schema' entry in model.config.to_dict()); "
        "build the model from a ModelConfig that carries the schema of its training events"
    )


def _preprocessing_dict(preprocessing: Any) -> dict[str, Any]:
    if preprocessing is None:
        from spikevault.extract import ExtractParams

        return ExtractParams().to_dict()
    if isinstance(preprocessing, dict):
        return dict(preprocessing)
    if hasattr(preprocessing, "to_dict"):
        return preprocessing.to_dict()
    raise TypeError(f"preprocessing must be an ExtractParams or a dict, got {type(preprocessing).__name__}")


def unwrap_model(model):
    """The bare model inside Fabric / DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    for _ in range(8):
        if type(model).__name__ in _ARCHITECTURES:
            break
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            break
        model = inner
    return model


def build_config(model, *, preprocessing: Any = None, extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` content :func:`save_pretrained` writes for ``model``."""
    import spikevault

    model = unwrap_model(model)
    architecture = type(model).__name__
    if architecture not in _ARCHITECTURES:
        raise CheckpointError(
            f"cannot save a {architecture}: load_model only knows the architectures {sorted(_ARCHITECTURES)}"
        )
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise CheckpointError(f"{architecture} has no .config.to_dict(); build it from its ModelConfig")
    model_config = model.config.to_dict()
    config: dict[str, Any] = {
        "format": "spikevault-checkpoint",
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "spikevault_version": spikevault.__version__,
        "architecture": architecture,
        "model": model_config,
        "schema": _schema_dict_from_model_config(model_config),
        "preprocessing": _preprocessing_dict(preprocessing),
    }
    extra = dict(extra_config or {})
    if "preprocessing" in extra and preprocessing is None:
        config["preprocessing"] = _preprocessing_dict(extra.pop("preprocessing"))
    clash = sorted(set(extra) & set(_RESERVED_KEYS))
    if clash:
        raise CheckpointError(f"extra_config may not set {clash}: save_pretrained writes those itself")
    config.update(extra)
    return config


def save_pretrained(
    model,
    folder: str | os.PathLike,
    *,
    card_info: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    preprocessing: Any = None,
) -> Path:
    """Write ``model`` as a checkpoint folder: ``model.safetensors``, ``config.json``, ``README.md``.

    Parameters
    ----------
    model : SpikeVAE
        The model; its ``config.to_dict()`` (architecture + event schema) goes into config.json.
    folder : path
        Destination folder, created if missing. Other files in it (training state) are left alone;
        the three checkpoint files are each written to a temporary name and renamed into place,
        so a crash never leaves a half-written file under the real name.
    card_info : dict, optional
        Model card content (see :func:`inference.cards.make_model_card`): ``model_name``,
        ``description``, ``license``, ``datasets``, ``corpus_card``, ``intended_probes``,
        ``limitations``, ``repo_id``...
    extra_config : dict, optional
        More config.json entries: ``training`` (config), ``metrics`` (incl. the model-vs-PCA
        comparison), ``lineage`` (``{"parent": model_id, ...}`` when fine-tuned), ``corpus``,
        ``intended_probes``, ``sampling_rates_hz``.
    preprocessing : ExtractParams or dict, optional
        The extraction parameters of the training events (default ``ExtractParams()``).

    Returns
    -------
    Path
        The checkpoint folder.
    """
    import safetensors.torch

    from .cards import make_model_card

    folder = Path(folder)
    model = unwrap_model(model)
    config = build_config(model, preprocessing=preprocessing, extra_config=extra_config)
    card = make_model_card(config, card_info or {})
    folder.mkdir(parents=True, exist_ok=True)

    staged: list[tuple[Path, Path]] = []
    try:
        def stage(name: str) -> Path:
            tmp = folder / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            staged.append((tmp, folder / name))
            return tmp

        safetensors.torch.save_model(
            model, str(stage(WEIGHTS_NAME)), metadata={"format": "pt", "spikevault_architecture": config["architecture"]}
        )
        stage(CONFIG_NAME).write_text(json.dumps(config, indent=2, default=_json_default) + "\n", encoding="utf-8")
        card.save(stage(CARD_NAME))
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    logger.info("saved checkpoint to %s", folder)
    return folder


# ------------------------------------------------------------------------------------- resolve
def _accepted_forms() -> str:
    from .registry import registry_names

    names = ", ".join(repr(n) for n in registry_names()) or "(none)"
    return (
        "a model id is one of: a registry name (" + names + "; see `spikevault models`), "
        "a local checkpoint folder (with config.json and model.safetensors), "
        "or 'hf-hub:ORG/NAME' / 'hf-hub:ORG/NAME@REVISION'"
    )


def parse_hub_id(model_id: str) -> tuple[str, str | None]:
    """Split ``hf-hub:ORG/NAME@REVISION`` into ``("ORG/NAME", "REVISION" or None)``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    rest = model_id[len(HUB_PREFIX):] if model_id.startswith(HUB_PREFIX) else model_id
    repo_id, _, revision = rest.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"bad hub model id {model_id!r}: {err}. Use 'hf-hub:ORG/NAME[@REVISION]'.") from None
    if "/" not in repo_id:
        raise ValueError(f"bad hub model id {model_id!r}: expected 'hf-hub:ORG/NAME[@REVISION]' (with the ORG/)")
    return repo_id, (revision or None)


def _download(
    repo_id: str,
    revision: str | None,
    *,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
    model_id: str,
) -> tuple[Path, str | None]:
    """snapshot_download the checkpoint files; return (folder, commit SHA)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    import spikevault

    kwargs: dict[str, Any] = {}
    if local_files_only is not None:
        kwargs["local_files_only"] = bool(local_files_only)
    where = f"{model_id} ({repo_id}@{revision or 'main'})"
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            # Always the same patterns: an offline re-load must find the same snapshot.
            allow_patterns=list(CHECKPOINT_FILES),
            library_name="spikevault",
            library_version=spikevault.__version__,
            **kwargs,
        )
    except RevisionNotFoundError as err:
        raise CheckpointError(
            f"{where}: revision {revision!r} does not exist on {constants.ENDPOINT}; use a branch, tag or "
            f"full commit SHA of the repository ({err.__class__.__name__})"
        ) from err
    except GatedRepoError as err:
        raise CheckpointError(f"{where}: the repository is gated; accept its terms and log in (HF_TOKEN)") from err
    except RepositoryNotFoundError as err:
        no_rev = f", or it has no revision {revision!r}" if revision else ""
        raise CheckpointError(
            f"{where}: repository not found on {constants.ENDPOINT}{no_rev} (misspelled, or private: set "
            "HF_TOKEN or run `hf auth login`)"
        ) from err
    except LocalEntryNotFoundError as err:
        offline = constants.HF_HUB_OFFLINE or local_files_only
        hint = (
            "it is not in the local hub cache and offline mode is on (HF_HUB_OFFLINE=1 or local_files_only): "
            "download it once online, or copy the checkpoint folder and pass its path"
            if offline
            else f"the hub ({constants.ENDPOINT}) could not be reached and it is not in the local cache"
        )
        raise CheckpointError(f"{where}: {hint}. ({err})") from err
    folder = Path(folder)
    commit = folder.name if len(folder.name) == 40 else None
    return folder, commit


def resolve_model_id(
    model_id: str | os.PathLike = "default",
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Turn a model id into a local folder (downloading hub models). Returns (folder, provenance)."""
    from .registry import get_registry_entry, registry_folder

    if isinstance(model_id, os.PathLike):
        model_id = os.fspath(model_id)
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"bad model id {model_id!r}; " + _accepted_forms())
    if model_id.startswith(HUB_PREFIX):
        repo_id, id_revision = parse_hub_id(model_id)
        if revision is not None and id_revision is not None and revision != id_revision:
            raise ValueError(
                f"model id {model_id!r} pins revision {id_revision!r} but revision={revision!r} was also given; "
                "give it once"
            )
        rev = revision or id_revision
        folder, commit = _download(repo_id, rev, cache_dir=cache_dir, local_files_only=local_files_only, model_id=model_id)
        return folder, {"source": "hub", "repo_id": repo_id, "revision": commit, "requested_revision": rev}
    # Registry names win over a same-named folder in the working directory ("./default" for that).
    entry = get_registry_entry(model_id) if "/" not in model_id and os.sep not in model_id else None
    if entry is not None:
        if entry.get("path"):
            if revision is not None:
                raise ValueError(f"revision={revision!r} makes no sense for the embedded model {model_id!r}")
            folder = registry_folder(entry)
            if not (folder / CONFIG_NAME).is_file():
                raise CheckpointError(
                    f"registry model {model_id!r} should be embedded at {folder} but {CONFIG_NAME} is missing there. "
                    + entry.get("build_command_hint", "Rebuild it with the command documented in BENCHMARKS.md.")
                )
            return folder, {"source": "registry", "registry_entry": entry}
        folder, prov = resolve_model_id(entry["id"], revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        prov.update(source="registry", registry_entry=entry)
        return folder, prov
    path = Path(model_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} makes no sense for the local folder {path}")
        return path, {"source": "local"}
    if path.exists():
        raise ValueError(f"model id {model_id!r} is a file, not a checkpoint folder; " + _accepted_forms())
    raise ValueError(f"unknown model id {model_id!r}: no such folder or registry name; " + _accepted_forms())


# ---------------------------------------------------------------------------------------- verify
def read_config(folder: str | os.PathLike) -> tuple[dict[str, Any], EventSchema]:
    """Read and check ``config.json`` of a checkpoint folder; return it and its event schema."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(
            f"{path}: missing. A spikevault checkpoint folder holds {list(CHECKPOINT_FILES)} (found {present}); "
            "write one with inference.save_pretrained(model, folder) or `spikevault pretrain`"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); re-export the checkpoint with save_pretrained") from err
    if not isinstance(config, dict) or config.get("format") != "spikevault-checkpoint":
        raise CheckpointError(
            f"{path}: not a spikevault checkpoint config (no \"format\": \"spikevault-checkpoint\"); "
            "was this folder written by another library?"
        )
    version = config.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}, this spikevault reads version "
            f"{CHECKPOINT_FORMAT_VERSION}; upgrade spikevault (or re-export the checkpoint)"
        )
    missing = [k for k in ("architecture", "model", "schema", "preprocessing") if k not in config]
    if missing:
        raise CheckpointError(f"{path}: missing entries {missing}; re-export the checkpoint with save_pretrained")
    if config["architecture"] not in _ARCHITECTURES:
        raise CheckpointError(
            f"{path}: architecture {config['architecture']!r} unknown (this spikevault builds "
            f"{sorted(_ARCHITECTURES)}); upgrade spikevault"
        )
    return config, _check_schema(config, path)


def _check_schema(config: dict[str, Any], path: Path) -> EventSchema:
    try:
        schema = EventSchema.from_dict(config["schema"])
    except SchemaMismatchError as err:
        raise CheckpointSchemaError(f"{path}: {err}") from err
    except TypeError as err:
        raise CheckpointSchemaError(f"{path}: malformed event schema {config['schema']!r} ({err})") from err
    problems = []
    if not schema.sampling_rate_hz > 0:
        problems.append(f"sampling_rate_hz={schema.sampling_rate_hz}")
    if schema.num_samples < 2 or schema.nbefore < 0:
        problems.append(f"window of {schema.num_samples} samples (ms_before={schema.ms_before}, ms_after={schema.ms_after})")
    if schema.num_channels < 1:
        problems.append(f"num_channels={schema.num_channels}")
    if problems:
        raise CheckpointSchemaError(f"{path}: unusable event schema: {', '.join(problems)}")
    # The architecture is built from config["model"]; its schema must be the one the checkpoint declares.
    model_cfg = config["model"] if isinstance(config["model"], dict) else {}
    model_schema = model_cfg.get("schema", model_cfg.get("event_schema"))
    if model_schema is not None:
        try:
            inner = EventSchema.from_dict(model_schema)
            inner.check_compatible(schema, what=f"{path} 'schema'", expected_by=f"its 'model' entry (T={inner.num_samples}, K={inner.num_channels})")
        except SchemaMismatchError as err:
            raise CheckpointSchemaError(f"{path}: inconsistent config: {err}") from err
    return schema


def _check_weights(folder: Path, model) -> Path:
    """Compare the tensors in model.safetensors with the model's state dict; raise listing every problem."""
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickles = [n for n in PICKLE_WEIGHT_NAMES if (folder / n).exists()]
        more = (
            f" It has {pickles}: pickled weights are never loaded (unpickling runs arbitrary code); "
            "convert them with save_pretrained in a trusted environment." if pickles else ""
        )
        raise CheckpointError(f"{path}: missing; a checkpoint keeps its weights in {WEIGHTS_NAME}.{more}")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        with open(path, "rb") as fh:
            head = fh.read(8)
        is_pickle = head[:2] == b"PK" or head[:1] == b"\x80"  # torch.save zip archive / raw pickle
        kind = "a zip/pickle file (torch.save)" if is_pickle else "not a safetensors file"
        raise CheckpointError(
            f"{path}: {kind}, cannot be read as safetensors ({err}). Weights are never unpickled: re-export them "
            "with inference.save_pretrained (safetensors) from a trusted copy."
        ) from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [
        f"{k}: file {shapes[k]} vs model {expected[k]}"
        for k in sorted(set(shapes) & set(expected))
        if shapes[k] != expected[k]
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        if mismatched:
            parts.append("shape mismatches [" + "; ".join(mismatched) + "]")
        raise CheckpointError(
            f"{path}: weights do not fit the architecture in {folder / CONFIG_NAME}: " + ", ".join(parts)
            + ". The config and weights come from different models; re-export the checkpoint with save_pretrained."
        )
    return path


def _model_classes(architecture: str):
    import importlib

    module_name, model_cls, config_cls = _ARCHITECTURES[architecture]
    module = importlib.import_module(module_name)
    return getattr(module, model_cls), getattr(module, config_cls)


def build_model(config: dict[str, Any], where: str = "config.json"):
    """Build the (randomly initialised) model described by a checkpoint config."""
    model_cls, config_cls = _model_classes(config["architecture"])
    try:
        model_config = config_cls.from_dict(config["model"])
        return model_cls(model_config)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{where}: its 'model' entry does not build a {config['architecture']}: {err}") from err


# ------------------------------------------------------------------------------------------ load
def load_config(
    model_id: str | os.PathLike = "default",
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> ModelInfo:
    """Read a checkpoint's config (schema, preprocessing, metrics...) without building the model.

    Accepts the same ids as :func:`load_model`; hub models are downloaded (all three files, so a
    later offline :func:`load_model` finds the same snapshot in the cache).
    """
    folder, prov = resolve_model_id(model_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    config, schema = read_config(folder)
    return ModelInfo(
        model_id=os.fspath(model_id),
        folder=folder,
        config=config,
        schema=schema,
        preprocessing=dict(config["preprocessing"]),
        revision=prov.get("revision"),
        source=prov["source"],
        registry_entry=prov.get("registry_entry"),
    )


def load_model(
    model_id: str | os.PathLike = "default",
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    map_location: str = "cpu",
    expected_schema: EventSchema | None = None,
):
    """Load a checkpoint as a ``SpikeVAE`` in eval mode, verifying config, schema and every tensor.

    Parameters
    ----------
    model_id : str or path
        ``"default"`` (the embedded model) or another registry name, a local checkpoint folder,
        or ``hf-hub:ORG/NAME[@REVISION]``.
    revision : str, optional
        Hub revision (branch, tag, full commit SHA) when not given in the id with ``@``.
    cache_dir : path, optional
        Hub cache folder (default: huggingface_hub's, ``HF_HUB_CACHE``).
    local_files_only : bool, optional
        Only use the hub cache (default: follow ``HF_HUB_OFFLINE``).
    map_location : str
        Device for the weights.
    expected_schema : EventSchema, optional
        Raise ``CheckpointSchemaError`` unless the model reads events of this schema.

    Returns
    -------
    SpikeVAE
        In eval mode, with ``model.model_info`` (:class:`ModelInfo`: schema, preprocessing, source).

    Raises
    ------
    ValueError
        For a malformed id (the message lists the accepted forms and registry names).
    CheckpointError
        When the checkpoint cannot be downloaded, read or verified (names the file and the fix).
    """
    info = load_config(model_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if expected_schema is not None:
        try:
            expected_schema.check_compatible(info.schema, what=f"model {info.model_id}", expected_by="the caller")
        except SchemaMismatchError as err:
            raise CheckpointSchemaError(str(err)) from err
    return load_model_from_config(info, map_location=map_location)


def load_model_from_config(info: ModelInfo, map_location: str = "cpu"):
    """Build the model :func:`load_config` described and load its weights (what
    :func:`load_model` does once the checkpoint is resolved): a ``SpikeVAE`` in eval mode, with
    ``model.model_info = info``."""
    import safetensors.torch

    model = build_model(info.config, where=str(info.folder / CONFIG_NAME))
    weights = _check_weights(info.folder, model)
    safetensors.torch.load_model(model, str(weights), strict=True, device=map_location)
    model.to(map_location)
    model.eval()
    model.model_info = info
    logger.info("loaded %s from %s%s", info.model_id, info.folder, f" @ {info.revision}" if info.revision else "")
    return model


# --------------------------------------------------------------------------------------- publish
def publish(
    checkpoint_folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
):
    """Upload a checkpoint folder's weights-only export to the Hugging Face hub.

    Only ``model.safetensors``, ``config.json`` and ``README.md`` are sent (never optimizer or
    other training state that may sit in the same folder). The folder is verified first: it must
    load with :func:`load_model` and have a model card.

    Parameters
    ----------
    checkpoint_folder : path
        A folder written by :func:`save_pretrained` (or a training checkpoint folder).
    repo_id : str
        ``ORG/NAME`` on the hub; created (model repo) if it does not exist.
    revision : str, optional
        Branch to upload to; created from ``main`` if missing. Default: ``main``.
    private : bool
        Create the repository as private (no effect on an existing repository).
    token : str, optional
        Hub token with write access. Default: the ``HF_TOKEN`` environment variable or the token
        stored by ``hf auth login`` (``huggingface-cli login``).
    commit_message : str, optional
        Default: "Upload SpikeVault checkpoint (spikevault VERSION)".

    Returns
    -------
    huggingface_hub.CommitInfo
        ``.oid`` is the commit SHA: load exactly this upload with ``hf-hub:REPO_ID@OID``.
    """
    from huggingface_hub import HfApi

    import spikevault

    folder = Path(checkpoint_folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if "@" in repo_id or repo_id.startswith(HUB_PREFIX):
        raise ValueError(f"--repo-id takes ORG/NAME, got {repo_id!r}; give the branch with --revision")
    parse_hub_id(repo_id)  # validates ORG/NAME
    load_model(folder)  # full verification: config, schema, every tensor
    if not (folder / CARD_NAME).is_file():
        raise CheckpointError(
            f"{folder / CARD_NAME}: missing model card; re-save the checkpoint with save_pretrained(..., card_info=...)"
        )
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    # Send a staging folder holding only the export, so nothing else in a training checkpoint
    # folder (optimizer state, logs) can ever be uploaded, whatever the patterns.
    with tempfile.TemporaryDirectory(prefix="spikevault-publish-") as staging:
        for name in CHECKPOINT_FILES:
            shutil.copy2(folder / name, Path(staging) / name)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            repo_type="model",
            revision=revision,
            allow_patterns=list(CHECKPOINT_FILES),
            commit_message=commit_message or f"Upload SpikeVault checkpoint (spikevault {spikevault.__version__})",
        )
    logger.info("published %s to %s (commit %s)", folder, repo_url, getattr(info, "oid", None))
    return info
