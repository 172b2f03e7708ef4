"""The corpus manifest (``manifest.json``): what is in a corpus and how it was made.

Layout of a corpus directory::

    manifest.json                 schema, build parameters, versions, sources, shards, skipped
    README.md                     Hugging Face dataset card generated from the manifest
    webdataset/<stem>-000000.tar  shards (one stem per recording, see shards.shard_stem)
    parquet/<stem>-000000.parquet
    _work/build.json              the build configuration every rank must agree on
    _work/sources.json            every source of the build (so merge knows what to expect)
    _work/done/<stem>.json        one completion record per recording (written atomically)
    build.log                     log of the build

The completion records are the *parts* a multi-rank build merges (:func:`merge_records`): the
manifest is a pure function of them, so a resumed build and an uninterrupted one produce the same
manifest byte for byte. No timestamps are stored for that reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .schema import EventSchema
from .shards import ShardInfo, sha256_file  # noqa: F401  (re-exported)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
WORK_DIR = "_work"
SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------ atomic json
def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}); it is corrupt - rebuild it") from err


# ------------------------------------------------------------------------------ splits
def assign_split(recording_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Split of a recording: deterministic in (recording_id, seed), independent of other recordings.

    A recording's uniform number in [0, 1) is taken from ``sha256(f"{seed}:{recording_id}")``;
    below ``test_fraction`` it is ``test``, below ``test_fraction + val_fraction`` ``val``, else
    ``train``. Events of one recording therefore never straddle splits, and every rank of a
    multi-machine build agrees without communicating.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must be >= 0 "
            "and sum to less than 1"
        )
    digest = hashlib.sha256(f"{seed}:{recording_id}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# ------------------------------------------------------------------------------ versions
def software_versions() -> dict[str, str]:
    """Versions of the packages that shape the events and shards."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("spikevault", "numpy", "spikeinterface", "probeinterface", "webdataset", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist == "spikevault":
                from . import __version__

                out[dist] = __version__
    return out


# ------------------------------------------------------------------------------ manifest
def records_dir(corpus_dir: str | Path) -> Path:
    return Path(corpus_dir) / WORK_DIR / "done"


def iter_records(corpus_dir: str | Path) -> Iterable[dict[str, Any]]:
    d = records_dir(corpus_dir)
    if not d.is_dir():
        return []
    return [read_json(p, "completion record") for p in sorted(d.glob("*.json"))]


def merge_records(corpus_dir: str | Path, *, require_complete: bool = True) -> dict[str, Any]:
    """Assemble ``manifest.json`` from the build configuration and the completion records.

    Parameters
    ----------
    corpus_dir : path
    require_complete : bool
        Raise if a source listed in ``_work/sources.json`` has no completion record (a rank has
        not finished), naming the missing recordings.

    Returns
    -------
    manifest : dict
        Also written atomically to ``corpus_dir/manifest.json``.
    """
    corpus_dir = Path(corpus_dir)
    config = read_json(corpus_dir / WORK_DIR / "build.json", "build configuration")
    sources = read_json(corpus_dir / WORK_DIR / "sources.json", "source list")
    records = {r["recording_id"]: r for r in iter_records(corpus_dir)}
    missing = [s["recording_id"] for s in sources if s["recording_id"] not in records]
    if missing and require_complete:
        raise RuntimeError(
            f"{corpus_dir}: {len(missing)} of {len(sources)} recordings have no completion record yet "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run (or rerun) the ranks "
            "that own them, then merge again"
        )
    done, skipped, shards = [], [], []
    for src in sorted(sources, key=lambda s: s["recording_id"]):
        rec = records.get(src["recording_id"])
        if rec is None:
            continue
        if rec["status"] == "skipped":
            skipped.append({"recording_id": rec["recording_id"], "path": src.get("path"), "error": rec["error"]})
            continue
        entry = dict(src)
        entry.update({k: rec[k] for k in ("split", "num_events", "num_units", "recording_info") if k in rec})
        done.append(entry)
        for sh in rec["shards"]:
            shards.append(dict(sh, split=rec["split"]))
    shards.sort(key=lambda s: (s["format"], s["path"]))
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "schema": config["schema"],
        "build": config["build"],
        "software": config["software"],
        "formats": config["build"]["formats"],
        "sources": done,
        "skipped": skipped,
        "shards": shards,
        "summary": summarize(done, shards, config["build"]["formats"]),
    }
    write_json_atomic(corpus_dir / MANIFEST_NAME, manifest)
    return manifest


def summarize(sources: list[dict], shards: list[dict], formats: list[str]) -> dict[str, Any]:
    """Per split: recordings, events, units, probes, bytes per format."""
    out: dict[str, Any] = {}
    for split in SPLITS:
        srcs = [s for s in sources if s.get("split") == split]
        out[split] = {
            "recordings": len(srcs),
            "events": int(sum(s.get("num_events", 0) for s in srcs)),
            "units": int(sum(s.get("num_units", 0) for s in srcs)),
            "probes": sorted({str(s.get("probe") or "unknown") for s in srcs}),
            "bytes": {f: int(sum(sh["bytes"] for sh in shards if sh["split"] == split and sh["format"] == f))
                      for f in formats},
            "shards": {f: sum(1 for sh in shards if sh["split"] == split and sh["format"] == f) for f in formats},
        }
    return out


def load_manifest(corpus_dir: str | Path) -> dict[str, Any]:
    """Read ``corpus_dir/manifest.json`` with a clear error when it is missing or corrupt."""
    path = Path(corpus_dir) / MANIFEST_NAME
    if not path.exists():
        hint = ""
        if (Path(corpus_dir) / WORK_DIR / "done").is_dir():
            hint = " (the build has parts but no manifest: run `spikevault merge DIR` once every rank finished)"
        raise FileNotFoundError(f"{path} not found: {corpus_dir} is not a spikevault corpus{hint}")
    manifest = read_json(path, "manifest")
    for key in ("schema", "shards", "sources"):
        if key not in manifest:
            raise ValueError(f"manifest {path} has no {key!r}: not a spikevault manifest or corrupt")
    return manifest


def manifest_schema(manifest: dict[str, Any]) -> EventSchema:
    return EventSchema.from_dict(manifest["schema"])


def select_shards(manifest: dict[str, Any], split: str | None, format: str) -> list[ShardInfo]:
    """The shards of one split (``None``: all) in one format, in manifest order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return [ShardInfo.from_dict(s) for s in manifest["shards"]
            if s["format"] == format and (split is None or s["split"] == split)]


def resolve_format(manifest: dict[str, Any], format: str = "auto") -> str:
    formats = manifest.get("formats") or sorted({s["format"] for s in manifest["shards"]})
    if format == "auto":
        return "webdataset" if "webdataset" in formats else formats[0]
    if format not in formats:
        raise ValueError(f"this corpus has no {format!r} shards (it has {formats}); pass format='auto' or one of them")
    return format
