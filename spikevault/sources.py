"""Recording sources: the list of recordings (with provenance) that a corpus is built from.

A *sources file* is YAML::

    version: 1
    sources:
      - recording_id: emouse-hybrid-000     # unique; letters, digits, '_' and '-' only
        path: recordings/emouse-hybrid-000  # relative paths are relative to this file
        probe: linear32                     # optional: name/model stored in every event
        lab: kilosort-emouse (hybrid)
        licence: GPL-2.0
        subject: null                       # optional free text
        region: null                        # optional free text
        sorting: sortings/emouse-hybrid-000 # optional ground-truth or curated sorting
        label_source: ground_truth          # required with 'sorting': ground_truth | curated
        format: auto                        # optional reader hint, see FORMATS

Plain recording paths given on a command line become sources too (:func:`source_from_path`), with a
``recording_id`` derived from the path's name; :func:`resolve_sources` mixes both and guarantees
unique ids.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

SOURCES_VERSION = 1
#: Reader hints understood by :meth:`RecordingSource.load_recording` ("auto": by extension/contents).
FORMATS = ("auto", "spikeinterface", "nwb", "mearec", "spikeglx", "openephys")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_SOURCE_SUFFIXES = (".yaml", ".yml")


@dataclass
class RecordingSource:
    """One recording of a corpus and its provenance.

    Attributes
    ----------
    recording_id : str
        Unique id, stored in every event (letters, digits, ``_``, ``-``; no dots).
    path : str
        Recording location (absolute once loaded from a sources file).
    probe : str or None
        Probe name/model stored in every event (default: from the recording's probe).
    lab, licence, subject, region : str or None
        Free-form provenance, kept per recording in the manifest and the dataset card.
    sorting : str or None
        Path of a ground-truth or curated sorting of this recording.
    label_source : str
        ``"ground_truth"``, ``"curated"`` or ``"none"`` (``"none"`` exactly when there is no sorting).
    format : str
        Reader hint, one of ``FORMATS``.
    """

    recording_id: str
    path: str
    probe: str | None = None
    lab: str | None = None
    licence: str | None = None
    subject: str | None = None
    region: str | None = None
    sorting: str | None = None
    label_source: str = "none"
    format: str = "auto"

    def problems(self) -> list[str]:
        """Every validation problem of this entry (empty when valid)."""
        out = []
        if not isinstance(self.recording_id, str) or not _ID_RE.match(self.recording_id):
            out.append(f"recording_id {self.recording_id!r} must be letters, digits, '_' or '-' (no dots, no slashes)")
        if not isinstance(self.path, str) or not self.path:
            out.append("path is required")
        for key in ("probe", "lab", "licence", "subject", "region", "sorting"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                out.append(f"{key} must be a string or null, got {type(v).__name__}")
        if self.label_source not in ("ground_truth", "curated", "none"):
            out.append(f"label_source must be ground_truth, curated or none (got {self.label_source!r})")
        elif self.sorting and self.label_source == "none":
            out.append("'sorting' is given, so 'label_source' must say ground_truth or curated")
        elif not self.sorting and self.label_source != "none":
            out.append(f"label_source={self.label_source!r} needs a 'sorting'")
        if self.format not in FORMATS:
            out.append(f"format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "source") -> "RecordingSource":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping of keys, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        problems = [f"unknown key {k!r} (known: {', '.join(sorted(known))})" for k in d if k not in known]
        for req in ("recording_id", "path"):
            if d.get(req) in (None, ""):
                problems.append(f"missing required key {req!r}")
        if not problems:
            src = cls(**{k: (str(v) if k in ("path", "sorting") and v is not None else v) for k, v in d.items()})
            problems = src.problems()
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems))
        return src

    # ------------------------------------------------------------------ reading
    def load_recording(self):
        """Open the recording (see :func:`spikevault.extract.load_recording`)."""
        from .extract import load_recording

        if self.format in ("auto", "spikeinterface", "nwb", "mearec"):
            return load_recording(self.path)
        try:
            if self.format == "spikeglx":
                from spikeinterface.extractors import read_spikeglx

                return read_spikeglx(self.path)
            from spikeinterface.extractors import read_openephys

            return read_openephys(self.path)
        except Exception as err:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"cannot read recording {self.path} as {self.format}: {type(err).__name__}: {err}") from err

    def load_sorting(self):
        """Open the sorting, or ``None`` when the source has none.

        Reads a SpikeInterface sorting folder/file (``sorting.save(folder=...)``, ``.npz``), a
        phy/Kilosort output folder (``params.py`` + ``spike_times.npy``) or an NWB file's units.
        """
        if not self.sorting:
            return None
        path = Path(self.sorting)
        if not path.exists():
            raise FileNotFoundError(f"sorting {path} of recording {self.recording_id!r} does not exist")
        try:
            if path.is_dir() and (path / "params.py").exists() and (path / "spike_times.npy").exists():
                from spikeinterface.extractors import read_phy

                return read_phy(path)
            if path.suffix.lower() == ".nwb":
                from spikeinterface.extractors import read_nwb_sorting

                return read_nwb_sorting(path)
            import spikeinterface as si

            sorting = si.load(path)
        except Exception as err:  # noqa: BLE001 - re-raised with the path
            raise ValueError(
                f"cannot read sorting {path} of recording {self.recording_id!r}: {type(err).__name__}: {err}"
            ) from err
        from spikeinterface.core import BaseSorting

        if not isinstance(sorting, BaseSorting):
            raise ValueError(f"{path} holds a {type(sorting).__name__}, not a sorting")
        return sorting


# -------------------------------------------------------------------------------------- files
def load_sources(path: str | Path) -> list[RecordingSource]:
    """Read and validate a sources file; relative paths become absolute (relative to the file).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Invalid YAML or entries: every problem is reported at once, each naming the entry
        (index and recording_id) and the key.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sources file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"sources file {path} is not valid YAML: {err}") from err
    if isinstance(doc, list):
        doc = {"sources": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list):
        raise ValueError(f"sources file {path}: expected a mapping with a 'sources' list")
    version = doc.get("version", SOURCES_VERSION)
    if version != SOURCES_VERSION:
        raise ValueError(f"sources file {path}: version {version} is not supported (expected {SOURCES_VERSION})")
    extra = sorted(set(doc) - {"version", "sources"})
    if extra:
        raise ValueError(f"sources file {path}: unknown top-level keys {extra} (expected 'version', 'sources')")
    base = path.resolve().parent
    sources, problems, seen = [], [], {}
    for i, entry in enumerate(doc["sources"]):
        rid = entry.get("recording_id") if isinstance(entry, dict) else None
        where = f"{path}: entry {i}" + (f" ({rid})" if rid else "")
        try:
            src = RecordingSource.from_dict(entry, where=where)
        except ValueError as err:
            problems.append(str(err))
            continue
        src.path = str((base / src.path).resolve()) if not Path(src.path).is_absolute() else src.path
        if src.sorting:
            src.sorting = str((base / src.sorting).resolve()) if not Path(src.sorting).is_absolute() else src.sorting
        if src.recording_id in seen:
            problems.append(f"{where}: recording_id {src.recording_id!r} already used by entry {seen[src.recording_id]}")
        seen.setdefault(src.recording_id, i)
        sources.append(src)
    if problems:
        raise ValueError("invalid sources file:\n  " + "\n  ".join(problems))
    if not sources:
        raise ValueError(f"sources file {path} lists no recordings")
    return sources


def write_sources(path: str | Path, sources: list[RecordingSource], relative: bool = True) -> Path:
    """Write a sources file (paths relative to its folder when ``relative`` and possible), atomically."""
    import os

    import yaml

    path = Path(path)
    base = path.resolve().parent
    entries = []
    for src in sources:
        problems = src.problems()
        if problems:
            raise ValueError(f"source {src.recording_id!r}: " + "; ".join(problems))
        d = src.to_dict()
        if relative:
            for key in ("path", "sorting"):
                if d[key]:
                    try:
                        d[key] = Path(os.path.relpath(Path(d[key]).resolve(), base)).as_posix()
                    except ValueError:  # another drive (Windows)
                        pass
        entries.append(d)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump({"version": SOURCES_VERSION, "sources": entries}, sort_keys=False))
    tmp.replace(path)
    return path


# -------------------------------------------------------------------------- command-line paths
def recording_id_from_path(path: str | Path) -> str:
    """A recording id from a path's name: non-id characters become ``-`` (``a.b/rec 1.nwb`` -> ``rec-1``)."""
    p = Path(path)
    name = p.name if p.is_dir() else p.stem
    if not name or name in (".", ".."):
        name = p.resolve().name
    rid = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_") or "recording"
    return rid if _ID_RE.match(rid) else f"r-{rid}"


def source_from_path(path: str | Path, recording_id: str | None = None) -> RecordingSource:
    """A source for a plain recording path (no sorting, provenance unknown)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"recording {p} does not exist")
    return RecordingSource(recording_id=recording_id or recording_id_from_path(p), path=str(p.resolve()))


def resolve_sources(items: list[str | Path]) -> list[RecordingSource]:
    """Turn command-line SOURCES (sources files and/or recording paths) into sources.

    ``.yaml``/``.yml`` files are read with :func:`load_sources`; anything else is a recording path.
    Ids derived from paths that collide (with each other or with a sources file's ids) get a
    suffix from a hash of the absolute path, so the result is unique and the same for the same
    inputs. Two explicit ids that collide are an error.
    """
    explicit: list[RecordingSource] = []
    derived: list[RecordingSource] = []
    order: list[tuple[str, int]] = []
    for item in items:
        p = Path(item)
        if p.suffix.lower() in _SOURCE_SUFFIXES and p.is_file():
            for src in load_sources(p):
                order.append(("e", len(explicit)))
                explicit.append(src)
        else:
            order.append(("d", len(derived)))
            derived.append(source_from_path(p))
    counts: dict[str, int] = {}
    owner: dict[str, str] = {}
    for src in explicit:
        if src.recording_id in owner:
            raise ValueError(
                f"recording_id {src.recording_id!r} is listed twice ({owner[src.recording_id]} and {src.path}); "
                "ids must be unique across sources files"
            )
        owner[src.recording_id] = src.path
    for src in derived:
        counts[src.recording_id] = counts.get(src.recording_id, 0) + 1
    for src in derived:
        if counts[src.recording_id] > 1 or src.recording_id in owner:
            digest = hashlib.sha1(str(Path(src.path).resolve()).encode()).hexdigest()[:8]
            src.recording_id = f"{src.recording_id}-{digest}"
    seen = set(owner)
    for src in derived:
        if src.recording_id in seen:
            raise ValueError(f"recording {src.path} is given twice")
        seen.add(src.recording_id)
    return [explicit[i] if kind == "e" else derived[i] for kind, i in order]
