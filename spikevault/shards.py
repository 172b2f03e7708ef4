"""Shard writers and readers: blocks of spike events as WebDataset tars and Parquet files.

Both formats hold the same events and round-trip bit-exactly to the same event block.

* **WebDataset** (:class:`WebDatasetShardWriter`): written with ``webdataset.ShardWriter``. One
  tar *sample* is a block of up to ``block_size`` events: one ``.npy`` member per field
  (``<key>.waveform.npy``, ``<key>.unit_label.npy``, ...) plus ``<key>.schema.json``, so every
  shard is self-describing and any ``webdataset.WebDataset(...).decode()`` pipeline can read it.
  Tar headers carry a fixed mtime/owner/mode: the same events give the same bytes (and sha256).
* **Parquet** (:class:`ParquetShardWriter`): pyarrow, one row per event, fixed-size list columns
  for ``waveform`` (T*K, row-major), ``channel_offsets_um`` (K*2) and ``channel_mask`` (K), no
  dictionary encoding on numeric columns, row groups of ``row_group_size`` events, the schema
  in the file's key-value metadata.

A *block* on disk is a tar sample or a Parquet row group: the unit the streaming reader reads
with one random access (:func:`read_block`). Writers roll to a new shard after
``events_per_shard`` events and write under a temporary name (``*.tmp``) until
:meth:`commit` renames the finished shards; the build engine records them only after that.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .schema import DEFAULT_SCHEMA, EventSchema, SchemaMismatchError

logger = logging.getLogger(__name__)

FORMATS = ("webdataset", "parquet")
#: Sub-directory of a corpus holding each format's shards.
FORMAT_DIRS = {"webdataset": "webdataset", "parquet": "parquet"}
FORMAT_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
TMP_SUFFIX = ".tmp"
#: Key of the event schema in Parquet key-value metadata and name of the tar schema member.
SCHEMA_KEY = "spikevault.schema"
SCHEMA_MEMBER = "schema.json"

DEFAULT_BLOCK_SIZE = 1024
DEFAULT_ROW_GROUP_SIZE = 32_768
DEFAULT_EVENTS_PER_SHARD = 65_536

# Fixed tar header fields so shard bytes depend only on the events.
_TAR_KW = dict(mtime=0, user="spikevault", group="spikevault", mode=0o444)


class CorruptShardError(ValueError):
    """A shard file is truncated, corrupt or does not match the manifest."""


# ------------------------------------------------------------------------------------ helpers
def shard_stem(recording_id: str) -> str:
    """A file-name and tar-key safe stem for a recording: readable prefix + 8 hex hash digits.

    No dots (WebDataset splits keys at the first dot), no path separators; distinct ids give
    distinct stems.
    """
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", str(recording_id)).strip("_")[:60] or "rec"
    digest = hashlib.sha256(str(recording_id).encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}"


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def schema_json(schema: EventSchema) -> bytes:
    return json.dumps(schema.to_dict(), sort_keys=True).encode("utf-8")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class _Rebuffer:
    """Cut a stream of event blocks of any size into blocks of exactly ``size`` events."""

    def __init__(self, size: int):
        self.size = size
        self.pending: list[dict[str, np.ndarray]] = []
        self.count = 0

    def push(self, block: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        n = len(block["waveform"])
        if n == 0:
            return
        self.pending.append(block)
        self.count += n
        if self.count < self.size:
            return
        merged = _concat(self.pending)
        start = 0
        while self.count - start >= self.size:
            yield {k: v[start : start + self.size] for k, v in merged.items()}
            start += self.size
        rest = {k: v[start:] for k, v in merged.items()}
        self.count -= start
        self.pending = [rest] if self.count else []

    def flush(self) -> Iterator[dict[str, np.ndarray]]:
        if self.count:
            yield _concat(self.pending)
        self.pending, self.count = [], 0


def _concat(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(blocks) == 1:
        return blocks[0]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


@dataclass
class ShardInfo:
    """What the manifest records about one finished shard (``path`` relative to the corpus)."""

    path: str
    format: str
    num_events: int
    blocks: list[int]
    recordings: list[str]
    bytes: int = 0
    sha256: str = ""
    split: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ------------------------------------------------------------------------------------ writers
class _BaseShardWriter:
    """Shared bookkeeping: temporary names, rolling, commit."""

    format: str = ""

    def __init__(
        self,
        corpus_dir: str | Path,
        stem: str,
        recording_id: str,
        *,
        schema: EventSchema = DEFAULT_SCHEMA,
        events_per_shard: int = DEFAULT_EVENTS_PER_SHARD,
        block_size: int,
    ):
        if block_size <= 0 or events_per_shard <= 0:
            raise ValueError(f"block_size ({block_size}) and events_per_shard ({events_per_shard}) must be > 0")
        self.corpus_dir = Path(corpus_dir)
        self.directory = self.corpus_dir / FORMAT_DIRS[self.format]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stem = stem
        self.recording_id = recording_id
        self.schema = schema
        self.block_size = block_size
        # A shard holds whole blocks.
        self.blocks_per_shard = max(1, events_per_shard // block_size)
        self.shards: list[ShardInfo] = []
        self._rebuffer = _Rebuffer(block_size)
        self._closed = False
        remove_stem_files(self.corpus_dir, stem, formats=(self.format,))

    def shard_name(self, index: int) -> str:
        return f"{self.stem}-{index:06d}{FORMAT_SUFFIX[self.format]}"

    def write(self, block: dict[str, np.ndarray]) -> None:
        """Append a block of events (any number of events; validated against the schema)."""
        self.schema.validate_block(block, where=f"events of {self.recording_id!r}")
        for full in self._rebuffer.push(block):
            self._write_block(full)

    def close(self) -> list[ShardInfo]:
        """Flush and close; shards stay under their temporary names until :meth:`commit`."""
        if not self._closed:
            for rest in self._rebuffer.flush():
                self._write_block(rest)
            self._finish_shard()
            self._closed = True
        return self.shards

    def commit(self) -> list[ShardInfo]:
        """Rename the temporary shards to their final names and fill in bytes and sha256."""
        self.close()
        for info in self.shards:
            final = self.corpus_dir / info.path
            tmp = final.with_name(final.name + TMP_SUFFIX)
            info.bytes = tmp.stat().st_size
            info.sha256 = sha256_file(tmp)
            os.replace(tmp, final)
        return self.shards

    def _new_shard_info(self) -> ShardInfo:
        rel = f"{FORMAT_DIRS[self.format]}/{self.shard_name(len(self.shards))}"
        info = ShardInfo(path=rel, format=self.format, num_events=0, blocks=[], recordings=[self.recording_id])
        self.shards.append(info)
        return info

    def _tmp_path(self, info: ShardInfo) -> Path:
        return self.corpus_dir / (info.path + TMP_SUFFIX)

    # implemented by subclasses
    def _write_block(self, block: dict[str, np.ndarray]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _finish_shard(self) -> None:  # pragma: no cover
        raise NotImplementedError


class WebDatasetShardWriter(_BaseShardWriter):
    """Write event blocks of one recording to WebDataset tars (``webdataset.ShardWriter``).

    Parameters
    ----------
    corpus_dir : path
        Corpus root; shards go to ``corpus_dir/webdataset/<stem>-NNNNNN.tar``.
    stem : str
        File-name stem, unique per recording (see :func:`shard_stem`), so writers never share a file.
    recording_id : str
        Recorded in the shard info.
    schema : EventSchema
    events_per_shard : int
        Roll to a new tar after this many events (rounded down to whole blocks).
    block_size : int
        Events per tar sample.
    """

    format = "webdataset"

    def __init__(self, corpus_dir, stem, recording_id, *, schema=DEFAULT_SCHEMA,
                 events_per_shard=DEFAULT_EVENTS_PER_SHARD, block_size=DEFAULT_BLOCK_SIZE):
        super().__init__(corpus_dir, stem, recording_id, schema=schema,
                         events_per_shard=events_per_shard, block_size=block_size)
        self._writer = None
        self._schema_bytes = schema_json(schema)
        self._block_index = 0

    def _open(self) -> None:
        import webdataset as wds

        pattern = str(self.directory / f"{self.stem}-%06d{FORMAT_SUFFIX[self.format]}{TMP_SUFFIX}")
        self._writer = wds.ShardWriter(
            pattern, maxcount=self.blocks_per_shard, maxsize=float("inf"),
            verbose=0, encoder=False, **_TAR_KW,
        )
        self._new_shard_info()

    def _write_block(self, block):
        if self._writer is None:
            self._open()
        elif self._writer.count >= self.blocks_per_shard:
            self._new_shard_info()  # ShardWriter rolls to the next file on this write
        key = f"{self.stem}_{self._block_index:08d}"
        sample = {"__key__": key, SCHEMA_MEMBER: self._schema_bytes}
        for name, arr in block.items():
            sample[f"{name}.npy"] = _npy_bytes(arr)
        self._writer.write(sample)
        n = len(block["waveform"])
        info = self.shards[-1]
        info.num_events += n
        info.blocks.append(n)
        self._block_index += 1

    def _finish_shard(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ParquetShardWriter(_BaseShardWriter):
    """Write event blocks of one recording to Parquet files (pyarrow).

    Parameters are those of :class:`WebDatasetShardWriter`, with ``block_size`` the row-group size
    (tens of thousands of events) and ``compression`` passed to ``pyarrow.parquet.ParquetWriter``.
    """

    format = "parquet"

    def __init__(self, corpus_dir, stem, recording_id, *, schema=DEFAULT_SCHEMA,
                 events_per_shard=DEFAULT_EVENTS_PER_SHARD * 4, block_size=DEFAULT_ROW_GROUP_SIZE,
                 compression: str = "snappy"):
        super().__init__(corpus_dir, stem, recording_id, schema=schema,
                         events_per_shard=events_per_shard, block_size=block_size)
        self.compression = compression
        self._writer = None
        self._arrow_schema = arrow_schema(schema)

    def _write_block(self, block):
        import pyarrow.parquet as pq

        if self._writer is not None and len(self.shards[-1].blocks) >= self.blocks_per_shard:
            self._finish_shard()
        if self._writer is None:
            info = self._new_shard_info()
            self._writer = pq.ParquetWriter(
                self._tmp_path(info), self._arrow_schema,
                compression=self.compression,
                use_dictionary=list(self.schema.string_fields()),  # never on numeric columns
                write_statistics=["segment", "sample_index", "unit_label", "recording_id"],
            )
        table = block_to_table(block, self.schema, self._arrow_schema)
        self._writer.write_table(table, row_group_size=len(table))
        n = len(block["waveform"])
        info = self.shards[-1]
        info.num_events += n
        info.blocks.append(n)

    def _finish_shard(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


WRITERS = {"webdataset": WebDatasetShardWriter, "parquet": ParquetShardWriter}


def remove_stem_files(corpus_dir: str | Path, stem: str, formats: Sequence[str] = FORMATS) -> int:
    """Delete every shard (finished or temporary) of a recording stem; return how many."""
    n = 0
    for fmt in formats:
        d = Path(corpus_dir) / FORMAT_DIRS[fmt]
        if not d.is_dir():
            continue
        for p in d.glob(f"{stem}-*"):
            if re.fullmatch(re.escape(stem) + r"-\d{6}" + re.escape(FORMAT_SUFFIX[fmt]) + r"(\.tmp)?", p.name):
                p.unlink()
                n += 1
    return n


# ------------------------------------------------------------------------------------ arrow
def arrow_schema(schema: EventSchema = DEFAULT_SCHEMA):
    """The pyarrow schema of a Parquet shard (fixed-size lists for per-event arrays)."""
    import pyarrow as pa

    cols = []
    for name, (dt, shape) in schema.array_fields().items():
        t = pa.from_numpy_dtype(dt)
        if shape:
            t = pa.list_(t, int(np.prod(shape)))
        cols.append(pa.field(name, t, nullable=False))
    for name in schema.string_fields():
        cols.append(pa.field(name, pa.string(), nullable=False))
    return pa.schema(cols, metadata={SCHEMA_KEY: schema_json(schema)})


def block_to_table(block: dict[str, np.ndarray], schema: EventSchema = DEFAULT_SCHEMA, arrow_sch=None):
    """An event block as a pyarrow Table (no per-event Python work)."""
    import pyarrow as pa

    arrow_sch = arrow_sch if arrow_sch is not None else arrow_schema(schema)
    n = len(block["waveform"])
    arrays = []
    for name, (dt, shape) in schema.array_fields().items():
        arr = np.ascontiguousarray(block[name]).reshape(-1)
        if dt.kind == "b":
            flat = pa.array(arr)
        else:  # zero-copy (pa.array on float16 goes through a slow per-value path)
            flat = pa.Array.from_buffers(pa.from_numpy_dtype(dt), len(arr), [None, pa.py_buffer(arr)])
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape))) if shape else flat)
    for name in schema.string_fields():
        arrays.append(pa.array(block[name], type=pa.string()))
    assert all(len(a) == n for a in arrays)
    return pa.Table.from_arrays(arrays, schema=arrow_sch)


def table_to_block(table, schema: EventSchema = DEFAULT_SCHEMA, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A pyarrow Table (or a projection of it) back to an event block with the schema's dtypes."""
    afields = schema.array_fields()
    names = list(fields) if fields is not None else list(schema.field_names())
    n = table.num_rows
    out = {}
    for name in names:
        col = table.column(name).combine_chunks()
        if name in afields:
            dt, shape = afields[name]
            if shape:
                values = col.flatten().to_numpy(zero_copy_only=False)
                out[name] = np.asarray(values, dtype=dt).reshape(n, *shape)
            else:
                out[name] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=dt)
        else:
            strs = col.to_numpy(zero_copy_only=False)
            out[name] = strs.astype(str) if n else np.zeros(0, dtype="U1")
    return out


# ------------------------------------------------------------------------------------ readers
class ShardReader:
    """Random access to the blocks of one shard, for either format.

    Parameters
    ----------
    path : path
        The shard file.
    format : {"webdataset", "parquet"}
    schema : EventSchema
        The schema the shard must carry (else :class:`SchemaMismatchError`).

    Any I/O or decoding problem raises :class:`CorruptShardError` naming the file.
    """

    def __init__(self, path: str | Path, format: str, schema: EventSchema = DEFAULT_SCHEMA):
        if format not in FORMATS:
            raise ValueError(f"unknown shard format {format!r}; expected one of {FORMATS}")
        self.path = Path(path)
        self.format = format
        self.schema = schema
        self._file = None
        self._index: list[dict[str, tuple[int, int]]] | None = None
        self._pq = None
        try:
            if format == "webdataset":
                self._open_tar()
            else:
                self._open_parquet()
        except (SchemaMismatchError, FileNotFoundError):
            self.close()
            raise
        except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt shard
            self.close()
            raise CorruptShardError(f"shard {self.path} is corrupt or truncated: {type(err).__name__}: {err}") from err

    @property
    def num_blocks(self) -> int:
        return len(self._index) if self.format == "webdataset" else self._pq.metadata.num_row_groups

    def block_sizes(self) -> list[int]:
        if self.format == "parquet":
            md = self._pq.metadata
            return [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        return [self._member_shape(i) for i in range(self.num_blocks)]

    def read_block(self, index: int, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Read block ``index`` (only ``fields``, default all) as numpy arrays."""
        fields = list(fields) if fields is not None else list(self.schema.field_names())
        try:
            if self.format == "webdataset":
                block = self._read_tar_block(index, fields)
            else:
                block = table_to_block(self._pq.read_row_group(index, columns=fields), self.schema, fields)
        except (SchemaMismatchError, IndexError):
            raise
        except Exception as err:  # noqa: BLE001
            raise CorruptShardError(
                f"shard {self.path}: block {index} cannot be read ({type(err).__name__}: {err}); "
                "the file is corrupt or truncated - run `spikevault verify` and rebuild it"
            ) from err
        self._check_block(block, index)
        return block

    def iter_blocks(self, fields: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.num_blocks):
            yield self.read_block(i, fields)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._pq = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- tar
    def _open_tar(self) -> None:
        import tarfile

        self._file = open(self.path, "rb")
        index: list[dict[str, tuple[int, int]]] = []
        keys: dict[str, int] = {}
        size = os.fstat(self._file.fileno()).st_size
        with tarfile.open(fileobj=self._file, mode="r:") as tf:
            for m in tf:
                key, _, rest = m.name.partition(".")
                if key not in keys:
                    keys[key] = len(index)
                    index.append({})
                if m.offset_data + m.size > size:
                    raise CorruptShardError(f"member {m.name} extends past the end of the file (truncated)")
                name = rest[:-4] if rest.endswith(".npy") else rest
                index[keys[key]][name] = (m.offset_data, m.size)
        if not index:
            raise CorruptShardError("no samples in tar")
        self._index = index
        first = index[0]
        if SCHEMA_MEMBER not in first:
            raise CorruptShardError(f"sample 0 has no {SCHEMA_MEMBER} member; not a spikevault shard")
        self._check_schema(json.loads(self._read_member(first[SCHEMA_MEMBER])))

    def _read_member(self, loc: tuple[int, int]) -> bytes:
        offset, size = loc
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise CorruptShardError(f"short read at offset {offset} (truncated)")
        return data

    def _read_tar_block(self, index: int, fields: Sequence[str]) -> dict[str, np.ndarray]:
        members = self._index[index]
        missing = [f for f in fields if f not in members]
        if missing:
            raise CorruptShardError(f"sample {index} lacks fields {missing}")
        return {f: _npy_load(self._read_member(members[f])) for f in fields}

    def _member_shape(self, index: int) -> int:
        # Parse only the npy header of the smallest always-present field.
        from numpy.lib import format as npf

        offset, size = self._index[index]["segment"]
        self._file.seek(offset)
        version = npf.read_magic(self._file)
        shape, _, _ = npf._read_array_header(self._file, version)
        return int(shape[0])

    # -------------------------------------------------------------- parquet
    def _open_parquet(self) -> None:
        import pyarrow.parquet as pq

        self._pq = pq.ParquetFile(self.path)
        meta = self._pq.schema_arrow.metadata or {}
        raw = meta.get(SCHEMA_KEY.encode())
        if raw is None:
            raise CorruptShardError(f"no {SCHEMA_KEY} metadata; not a spikevault shard")
        self._check_schema(json.loads(raw))

    # -------------------------------------------------------------- checks
    def _check_schema(self, d: dict[str, Any]) -> None:
        shard_schema = EventSchema.from_dict(d)
        self.schema.check_compatible(shard_schema, what=f"shard {self.path}", expected_by="this corpus")

    def _check_block(self, block: dict[str, np.ndarray], index: int) -> None:
        afields = self.schema.array_fields()
        n = None
        for name, arr in block.items():
            if name in afields:
                dt, shape = afields[name]
                if arr.dtype != dt or arr.shape[1:] != shape:
                    raise SchemaMismatchError(
                        f"shard {self.path} block {index}: field {name} is {arr.dtype}{list(arr.shape[1:])}, "
                        f"schema v{self.schema.version} expects {dt}{list(shape)}"
                    )
            if n is None:
                n = len(arr)
            elif len(arr) != n:
                raise CorruptShardError(f"shard {self.path} block {index}: fields have different lengths")


def random_block(n: int, schema: EventSchema = DEFAULT_SCHEMA, *, seed: int = 0,
                 recording_id: str = "rec", num_units: int = 5, start_sample: int = 0) -> dict[str, np.ndarray]:
    """A valid event block of ``n`` random events (for tests and benchmarks, not for science)."""
    rng = np.random.default_rng(seed)
    T, K = schema.num_samples, schema.num_channels
    block = {
        "waveform": (rng.standard_normal((n, T, K), dtype=np.float32) * 20).astype(np.float16),
        "channel_offsets_um": rng.uniform(-60, 60, (n, K, 2)).astype(np.float32),
        "channel_mask": rng.random((n, K)) < 0.9,
        "segment": np.zeros(n, np.int32),
        "sample_index": start_sample + np.sort(rng.integers(0, 30_000 * 10, n)).astype(np.int64),
        "amplitude_uv": rng.uniform(30, 300, n).astype(np.float32),
        "noise_level_uv": np.full(n, 8.0, np.float32),
        "unit_label": rng.integers(-1, num_units, n).astype(np.int64),
        "sampling_rate_hz": np.full(n, schema.sampling_rate_hz, np.float32),
        "recording_id": np.full(n, recording_id),
        "peak_channel_id": rng.integers(0, 32, n).astype(str),
        "label_source": np.full(n, "ground_truth"),
        "probe": np.full(n, "linear32"),
    }
    schema.validate_block(block)
    return block


def read_shard(path: str | Path, format: str, schema: EventSchema = DEFAULT_SCHEMA,
               fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Read a whole shard into one event block."""
    with ShardReader(path, format, schema) as r:
        blocks = list(r.iter_blocks(fields))
    if not blocks:
        empty = schema.empty_block()
        return {k: empty[k] for k in (fields or schema.field_names())}
    return _concat(blocks) if len(blocks) > 1 else blocks[0]
