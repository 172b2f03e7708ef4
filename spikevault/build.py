"""The corpus build engine: one recording is one unit of work.

Flow of :func:`run_build` (read top to bottom):

1. Record the build configuration (``_work/build.json``) and the full source list
   (``_work/sources.json``); a rerun with other settings on the same directory is refused.
2. Pick this rank's recordings (sorted ids, round robin over ``world_size``; rank and world size
   also come from SLURM array / SLURM task / torchrun variables, see :func:`resolve_rank`).
3. Skip recordings that already have a completion record; run the rest with the chosen executor
   (in process, a local process pool of ``workers``, or Dask distributed). Each unit
   (:func:`process_recording`) extracts events once, writes every format's shards under temporary
   names, renames them, then writes its completion record atomically. A unit killed at any point
   leaves no record and is redone from scratch on the next run; its shard bytes are deterministic.
4. When every source has a record: merge the records into ``manifest.json`` and write the card.

Bad recordings: ``on_error="raise"`` stops with a message naming the file and the problem (the
finished recordings stay recorded); ``"skip"`` records the error and moves on; skipped recordings
are listed in the manifest and retried by the next run.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .manifest import (
    WORK_DIR,
    assign_split,
    merge_records,
    read_json,
    records_dir,
    software_versions,
    write_json_atomic,
)
from .schema import DEFAULT_SCHEMA, EventSchema
from .shards import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_EVENTS_PER_SHARD,
    DEFAULT_ROW_GROUP_SIZE,
    FORMATS,
    WRITERS,
    remove_stem_files,
    shard_stem,
)

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "dask")


class RecordingError(RuntimeError):
    """A recording could not be turned into events (raised with ``on_error="raise"``)."""


@dataclass
class BuildConfig:
    """Settings of a corpus build (stored in the manifest; every rank must use the same).

    Attributes
    ----------
    formats : tuple of str
        ``"webdataset"`` and/or ``"parquet"`` (``--format``).
    val_fraction, test_fraction : float
        Expected fraction of recordings in the val/test splits (``--val-fraction``,
        ``--test-fraction``); splits are by recording, deterministic in (recording id, seed).
    seed : int
        Seed of the split assignment (``--seed``).
    on_error : str
        ``"raise"`` or ``"skip"`` a recording that cannot be read or extracted (``--on-error``).
    block_size : int
        Events per WebDataset tar sample (``--block-size``).
    row_group_size : int
        Events per Parquet row group (``--row-group-size``).
    events_per_shard : int
        Events per shard file before rolling to the next (``--events-per-shard``).
    extract_params : dict
        ``spikevault.extract.ExtractParams.to_dict()``.
    schema : dict
        ``EventSchema.to_dict()``.
    n_jobs : int
        SpikeInterface jobs inside one recording's extraction (``--n-jobs``).
    """

    formats: tuple[str, ...] = ("webdataset",)
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    seed: int = 0
    on_error: str = "raise"
    block_size: int = DEFAULT_BLOCK_SIZE
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    events_per_shard: int = DEFAULT_EVENTS_PER_SHARD
    extract_params: dict = field(default_factory=dict)
    schema: dict = field(default_factory=DEFAULT_SCHEMA.to_dict)
    n_jobs: int = 1

    def __post_init__(self):
        if isinstance(self.formats, str):
            self.formats = ("webdataset", "parquet") if self.formats == "both" else (self.formats,)
        self.formats = tuple(self.formats)
        problems = []
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            problems.append(f"--format must be webdataset, parquet or both (got {list(self.formats)})")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            problems.append(f"--val-fraction ({self.val_fraction}) and --test-fraction ({self.test_fraction}) "
                            "must be in [0, 1) with a sum below 1")
        if self.on_error not in ("raise", "skip"):
            problems.append(f"--on-error must be 'raise' or 'skip' (got {self.on_error!r})")
        for name in ("block_size", "row_group_size", "events_per_shard", "n_jobs"):
            if int(getattr(self, name)) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.events_per_shard < self.block_size:
            problems.append(f"--events-per-shard ({self.events_per_shard}) must be >= --block-size ({self.block_size})")
        if problems:
            raise ValueError("invalid build settings: " + "; ".join(problems))
        if not self.extract_params:
            from .extract import ExtractParams

            self.extract_params = ExtractParams().to_dict()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["formats"] = list(self.formats)
        d.pop("schema")
        return d

    @property
    def event_schema(self) -> EventSchema:
        return EventSchema.from_dict(self.schema)


# ------------------------------------------------------------------------------ sources
def source_entry(path_or_entry: Any) -> dict[str, Any]:
    """Normalise a source: a recording path, or a dict with ``path`` and metadata.

    A dict may carry ``recording_id`` (default: the path's file name), ``probe``, ``lab``,
    ``licence``, ``subject``, ``region``, ``sorting`` (path of a sorting SpikeInterface can load)
    and ``label_source`` (``ground_truth``/``curated``).
    """
    if isinstance(path_or_entry, (str, os.PathLike)):
        entry = {"path": str(path_or_entry)}
    elif isinstance(path_or_entry, dict):
        entry = {k: v for k, v in path_or_entry.items() if v is not None}
    elif hasattr(path_or_entry, "to_dict"):
        entry = {k: v for k, v in path_or_entry.to_dict().items() if v is not None}
    else:
        raise TypeError(f"a source must be a path or a dict, got {type(path_or_entry).__name__}")
    if "path" not in entry:
        raise ValueError(f"source {entry} has no 'path'")
    entry["path"] = str(entry["path"])
    entry.setdefault("recording_id", Path(entry["path"]).name or str(entry["path"]))
    for k, v in list(entry.items()):
        if isinstance(v, Path):
            entry[k] = str(v)
    return entry


def plan_rank(sources: Sequence[dict[str, Any]], rank: int, world_size: int) -> list[dict[str, Any]]:
    """This rank's recordings: sorted by id, every ``world_size``-th starting at ``rank``."""
    ordered = sorted(sources, key=lambda s: s["recording_id"])
    return ordered[rank::world_size]


def resolve_rank(rank: int | None = None, world_size: int | None = None, env: dict | None = None) -> tuple[int, int]:
    """Rank and world size: explicit values, else SLURM array, SLURM tasks, torchrun, else 0 of 1."""
    env = os.environ if env is None else env
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("pass both --rank and --world-size, or neither")
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        rank = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        world_size = int(env["SLURM_ARRAY_TASK_COUNT"])
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    elif "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    else:
        rank, world_size = 0, 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"--rank must be in [0, --world-size): rank={rank}, world_size={world_size}")
    return rank, world_size


# ------------------------------------------------------------------------------ one unit
def record_path(corpus_dir: str | Path, recording_id: str) -> Path:
    return records_dir(corpus_dir) / f"{shard_stem(recording_id)}.json"


def is_done(corpus_dir: str | Path, recording_id: str) -> bool:
    p = record_path(corpus_dir, recording_id)
    if not p.exists():
        return False
    try:
        return read_json(p).get("status") == "done"
    except ValueError:
        return False


def process_recording(corpus_dir: str, config: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """Extract one recording's events, write its shards and its completion record.

    Returns the completion record (``status`` ``"done"`` or ``"skipped"``). With
    ``on_error="raise"`` a bad recording raises :class:`RecordingError` naming the file.
    """
    from .malloc import keep_freed_memory

    keep_freed_memory()  # chunk after chunk, the extraction reuses its freed temporaries
    cfg = BuildConfig(**{**config, "formats": tuple(config["formats"])})
    rid = source["recording_id"]
    if is_done(corpus_dir, rid):
        return read_json(record_path(corpus_dir, rid))
    stem = shard_stem(rid)
    split = assign_split(rid, cfg.seed, cfg.val_fraction, cfg.test_fraction)
    try:
        record = _extract_and_write(Path(corpus_dir), cfg, source, stem, split)
    except Exception as err:  # noqa: BLE001 - the policy for a bad recording is on_error
        remove_stem_files(corpus_dir, stem, cfg.formats)
        message = f"{source['path']}: {type(err).__name__}: {err}"
        if cfg.on_error == "raise":
            raise RecordingError(
                f"recording {rid!r} failed - {message}. Fix or remove it, or pass --on-error skip"
            ) from err
        logger.warning("skipping recording %r: %s", rid, message)
        logger.debug("%s", traceback.format_exc())
        record = {"recording_id": rid, "status": "skipped", "error": message, "split": split, "shards": []}
    write_json_atomic(record_path(corpus_dir, rid), record)
    return record


def _extract_and_write(corpus_dir: Path, cfg: BuildConfig, source: dict, stem: str, split: str) -> dict:
    from .extract import ExtractParams, iter_event_blocks
    from .sources import RecordingSource

    schema = cfg.event_schema
    src = RecordingSource.from_dict(
        {k: v for k, v in source.items() if k in RecordingSource.__dataclass_fields__},
        where=f"source {source['recording_id']!r}")
    recording = src.load_recording()
    sorting = src.load_sorting()
    label_source = src.label_source if sorting is not None else "none"
    blocks = iter_event_blocks(
        recording, schema=schema, params=ExtractParams.from_dict(cfg.extract_params),
        recording_id=source["recording_id"], probe_name=source.get("probe"), sorting=sorting,
        label_source=label_source, job_kwargs={"n_jobs": cfg.n_jobs, "progress_bar": False},
    )
    shards, num_events, num_units = write_blocks(corpus_dir, cfg, source["recording_id"], blocks)
    info = {
        "sampling_rate_hz": float(recording.get_sampling_frequency()),
        "num_channels": int(recording.get_num_channels()),
        "duration_s": float(sum(recording.get_num_samples(s) for s in range(recording.get_num_segments()))
                            / recording.get_sampling_frequency()),
    }
    return {
        "recording_id": source["recording_id"], "status": "done", "split": split,
        "num_events": num_events, "num_units": num_units, "recording_info": info, "shards": shards,
    }


def write_blocks(corpus_dir: str | Path, cfg: BuildConfig, recording_id: str,
                 blocks: Iterable[dict]) -> tuple[list[dict], int, int]:
    """Write one recording's event blocks in every format of ``cfg``; return (shards, events, units).

    The shards are committed (renamed to their final names) only after the last block.
    """
    import numpy as np

    schema = cfg.event_schema
    stem = shard_stem(recording_id)
    writers = []
    for fmt in cfg.formats:
        size = cfg.block_size if fmt == "webdataset" else cfg.row_group_size
        writers.append(WRITERS[fmt](corpus_dir, stem, recording_id, schema=schema,
                                    events_per_shard=max(cfg.events_per_shard, size), block_size=size))
    num_events, units = 0, set()
    for block in blocks:
        for w in writers:
            w.write(block)
        num_events += len(block["waveform"])
        units.update(np.unique(block["unit_label"][block["unit_label"] >= 0]).tolist())
    shards = [s.to_dict() for w in writers for s in w.commit()]
    return shards, num_events, len(units)


def build_from_blocks(out_dir: str | Path, recordings: dict[str, Iterable[dict]],
                      config: BuildConfig | None = None, metadata: dict[str, dict] | None = None) -> dict[str, Any]:
    """A corpus from events already in memory (``{recording_id: blocks}``), through the same writers,
    records, splits and manifest as :func:`run_build`. For tests, benchmarks and derived corpora."""
    config = config or BuildConfig()
    out_dir = Path(out_dir)
    metadata = metadata or {}
    sources = [dict(metadata.get(rid, {}), recording_id=rid, path=f"<in-memory:{rid}>") for rid in recordings]
    prepare_out_dir(out_dir, config, sources)
    for rid, blocks in recordings.items():
        if is_done(out_dir, rid):
            continue
        split = assign_split(rid, config.seed, config.val_fraction, config.test_fraction)
        shards, n, u = write_blocks(out_dir, config, rid, blocks)
        write_json_atomic(record_path(out_dir, rid), {
            "recording_id": rid, "status": "done", "split": split, "num_events": n, "num_units": u,
            "recording_info": {}, "shards": shards})
    return finalize(out_dir)


# ------------------------------------------------------------------------------ the build
def prepare_out_dir(out_dir: Path, config: BuildConfig, sources: list[dict[str, Any]]) -> None:
    """Write (or check against) ``_work/build.json`` and ``_work/sources.json``."""
    work = out_dir / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    wanted = {"build": config.to_dict(), "schema": config.schema, "software": software_versions()}
    path = work / "build.json"
    if path.exists():
        have = read_json(path, "build configuration")
        if {k: have.get(k) for k in ("build", "schema")} != {k: wanted[k] for k in ("build", "schema")}:
            raise ValueError(
                f"{out_dir} holds a build with other settings ({path}); use a new --out directory "
                "or the same settings to resume"
            )
    else:
        write_json_atomic(path, wanted)
    spath = work / "sources.json"
    if spath.exists():
        have_sources = read_json(spath, "source list")
        if sorted(s["recording_id"] for s in have_sources) != sorted(s["recording_id"] for s in sources):
            raise ValueError(f"{out_dir} was built from other sources ({spath}); use a new --out directory")
    else:
        write_json_atomic(spath, sorted(sources, key=lambda s: s["recording_id"]))
    ids = [s["recording_id"] for s in sources]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"recording ids must be unique; duplicated: {dupes} (set recording_id in the sources file)")


def run_build(
    sources: Iterable[Any],
    out_dir: str | Path,
    config: BuildConfig | None = None,
    *,
    workers: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
    executor: str = "local",
    dask_address: str | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Build (or resume) a corpus; return the manifest once every recording is done, else None.

    Parameters
    ----------
    sources : iterable
        Recording paths or source dicts (see :func:`source_entry`).
    out_dir : path
        Corpus directory.
    config : BuildConfig
    workers : int
        Recordings processed concurrently on this machine (``--workers``).
    rank, world_size : int, optional
        This machine's share of the recordings (``--rank``, ``--world-size``; default from
        SLURM/torchrun variables). The manifest is merged when all ranks are done (here if this
        rank finishes last, else with ``spikevault merge``).
    executor : {"local", "dask"}
        ``dask``: run units on a Dask distributed cluster (``dask_address``, or a LocalCluster
        with ``workers`` worker processes).
    """
    config = config or BuildConfig()
    if executor not in EXECUTORS:
        raise ValueError(f"--executor must be one of {EXECUTORS} (got {executor!r})")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {workers})")
    out_dir = Path(out_dir)
    all_sources = [source_entry(s) for s in sources]
    if not all_sources:
        raise ValueError("no sources given: pass recordings or a sources file")
    rank, world_size = resolve_rank(rank, world_size)
    prepare_out_dir(out_dir, config, all_sources)
    handler = _add_log_file(out_dir / ("build.log" if world_size == 1 else f"build-rank{rank}.log"))
    try:
        mine = plan_rank(all_sources, rank, world_size)
        todo = [s for s in mine if not is_done(out_dir, s["recording_id"])]
        logger.info("rank %d/%d: %d recordings, %d already done, %d to do",
                    rank, world_size, len(mine), len(mine) - len(todo), len(todo))
        cfg = config.to_dict() | {"schema": config.schema}
        if todo:
            if executor == "dask":
                _run_dask(out_dir, cfg, todo, workers, dask_address, progress)
            elif workers == 1:
                _run_serial(out_dir, cfg, todo, progress)
            else:
                _run_pool(out_dir, cfg, todo, workers, progress)
        write_json_atomic(out_dir / WORK_DIR / f"rank-{rank}-of-{world_size}.json",
                          {"rank": rank, "world_size": world_size,
                           "recordings": [s["recording_id"] for s in mine]})
        done_ids = {p.stem for p in records_dir(out_dir).glob("*.json")}
        if all(shard_stem(s["recording_id"]) in done_ids for s in all_sources):
            return finalize(out_dir)
        logger.info("rank %d done; other ranks still running: merge with `spikevault merge %s`", rank, out_dir)
        return None
    finally:
        logging.getLogger("spikevault").removeHandler(handler)
        handler.close()


def finalize(out_dir: str | Path) -> dict[str, Any]:
    """Merge the completion records into ``manifest.json`` and write the dataset card."""
    manifest = merge_records(out_dir)
    try:
        from .cards import write_dataset_card

        write_dataset_card(manifest, Path(out_dir) / "README.md")
    except ImportError as err:  # huggingface_hub missing: the corpus is still complete
        logger.warning("dataset card not written (%s)", err)
    return manifest


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="rec", desc="build", disable=not enabled, file=sys.stderr)


def _run_serial(out_dir, cfg, todo, progress):
    with _progress(len(todo), progress) as bar:
        for src in todo:
            process_recording(str(out_dir), cfg, src)
            bar.update()


def _run_pool(out_dir, cfg, todo, workers, progress):
    import multiprocessing as mp
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool, \
            _progress(len(todo), progress) as bar:
        futures = {pool.submit(process_recording, str(out_dir), cfg, s) for s in todo}
        while futures:
            done, futures = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    for other in futures:
                        other.cancel()
                    raise f.exception()
                bar.update()


def _run_dask(out_dir, cfg, todo, workers, address, progress):
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as err:
        raise RuntimeError('--executor dask needs dask.distributed: pip install "dask[distributed]"') from err
    cluster = None
    if address:
        client = Client(address)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=workers > 1,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        futures = client.map(process_recording, [str(out_dir)] * len(todo), [cfg] * len(todo), todo, pure=False)
        with _progress(len(todo), progress) as bar:
            for fut in as_completed(futures):
                fut.result()  # re-raises a RecordingError here
                bar.update()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _add_log_file(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lg = logging.getLogger("spikevault")
    lg.addHandler(handler)  # records at the logger's level (-v for info)
    return handler
