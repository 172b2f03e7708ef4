"""Shard writers/readers: bit-exact round trip in both formats, determinism, corruption, interop."""

from __future__ import annotations

import numpy as np
import pytest

from spikevault.schema import DEFAULT_SCHEMA, EventSchema, SchemaMismatchError
from spikevault.shards import (
    CorruptShardError,
    ParquetShardWriter,
    ShardReader,
    WebDatasetShardWriter,
    random_block,
    read_shard,
    shard_stem,
)


def _write(tmp_path, writer_cls, blocks, rid="rec.A/1", **kw):
    w = writer_cls(tmp_path, shard_stem(rid), rid, **kw)
    for b in blocks:
        w.write(b)
    return w.commit()


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype or a[k].dtype.kind == b[k].dtype.kind == "U", k
        assert a[k].shape == b[k].shape, k
        x, y = (a[k].view(np.uint8), b[k].view(np.uint8)) if a[k].dtype.kind == "f" else (a[k], b[k])
        assert np.array_equal(x, y), k  # bit-exact, NaN payloads included


@pytest.fixture
def blocks():
    bs = [random_block(n, seed=i, recording_id="rec.A/1") for i, n in enumerate([700, 1500, 3, 900])]
    bs[0]["waveform"][0, 0, 0] = np.float16(np.nan)
    bs[1]["waveform"][5, 3, 2] = np.float16(-0.0)
    return bs


def test_both_formats_round_trip_bit_exactly_to_the_same_block(tmp_path, blocks):
    ref = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    wds_shards = _write(tmp_path, WebDatasetShardWriter, blocks, block_size=256, events_per_shard=1024)
    pq_shards = _write(tmp_path, ParquetShardWriter, blocks, block_size=512, events_per_shard=2048)
    assert [s.num_events for s in wds_shards] == [1024, 1024, 1024, 31]
    assert wds_shards[0].blocks == [256] * 4 and wds_shards[-1].blocks == [31]
    assert [s.blocks for s in pq_shards] == [[512] * 4, [512, 512, 31]]
    for shards in (wds_shards, pq_shards):
        parts = [read_shard(tmp_path / s.path, s.format) for s in shards]
        got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        _same(ref, got)
        assert all(len(s.sha256) == 64 and s.bytes == (tmp_path / s.path).stat().st_size for s in shards)
        assert not list(tmp_path.rglob("*.tmp"))


def test_shards_are_deterministic(tmp_path, blocks):
    a = _write(tmp_path / "a", WebDatasetShardWriter, blocks, block_size=256)
    b = _write(tmp_path / "b", WebDatasetShardWriter, blocks, block_size=256)
    c = _write(tmp_path / "a", ParquetShardWriter, blocks)
    d = _write(tmp_path / "b", ParquetShardWriter, blocks)
    assert [s.sha256 for s in a] == [s.sha256 for s in b]
    assert [s.sha256 for s in c] == [s.sha256 for s in d]


def test_webdataset_pipeline_reads_our_tars(tmp_path, blocks):
    import webdataset as wds

    shards = _write(tmp_path, WebDatasetShardWriter, blocks, block_size=1024)
    sample = next(iter(wds.WebDataset(str(tmp_path / shards[0].path), shardshuffle=False).decode()))
    assert "." not in sample["__key__"]
    assert sample["waveform.npy"].shape == (1024, DEFAULT_SCHEMA.num_samples, DEFAULT_SCHEMA.num_channels)
    assert sample["schema.json"]["version"] == DEFAULT_SCHEMA.version


def test_parquet_uses_fixed_size_lists_without_float_dictionaries(tmp_path, blocks):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = _write(tmp_path, ParquetShardWriter, blocks, block_size=512)
    f = pq.ParquetFile(tmp_path / shards[0].path)
    assert pa.types.is_fixed_size_list(f.schema_arrow.field("waveform").type)
    assert f.schema_arrow.field("waveform").type.list_size == DEFAULT_SCHEMA.num_samples * DEFAULT_SCHEMA.num_channels
    rg = f.metadata.row_group(0)
    for i in range(rg.num_columns):
        col = rg.column(i)
        if "waveform" in col.path_in_schema or "amplitude" in col.path_in_schema:
            assert not col.has_dictionary_page, col.path_in_schema


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_shard_raises_naming_the_file(tmp_path, blocks, fmt, damage):
    cls = WebDatasetShardWriter if fmt == "webdataset" else ParquetShardWriter
    shard = _write(tmp_path, cls, blocks, block_size=512, events_per_shard=8192)[0]
    path = tmp_path / shard.path
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"\x00garbage" * 64 + data[512:])
    with pytest.raises(CorruptShardError, match=path.name):
        with ShardReader(path, fmt) as r:
            for _ in r.iter_blocks():
                pass


def test_shard_of_another_schema_is_refused(tmp_path):
    other = EventSchema(num_channels=8)
    shard = _write(tmp_path, WebDatasetShardWriter, [random_block(100, other)], schema=other)[0]
    with pytest.raises(SchemaMismatchError, match="num_channels=8"):
        ShardReader(tmp_path / shard.path, "webdataset", DEFAULT_SCHEMA)


def test_writer_rejects_invalid_blocks(tmp_path):
    bad = random_block(10)
    bad["waveform"] = bad["waveform"].astype(np.float32)
    w = WebDatasetShardWriter(tmp_path, "x", "x")
    with pytest.raises(SchemaMismatchError, match="waveform"):
        w.write(bad)
