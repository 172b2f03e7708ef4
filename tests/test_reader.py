"""EventStream: split by rank and worker, balanced, deterministic, exact resume; load_events."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spikevault.build import BuildConfig, build_from_blocks
from spikevault.reader import EventStream, load_events
from spikevault.schema import EventSchema, SchemaMismatchError
from spikevault.shards import random_block

FIELDS = ("waveform", "channel_offsets_um", "channel_mask", "unit_label", "sample_index")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """7 recordings of 1,000-3,400 events (unique sample_index per event), both formats."""
    out = tmp_path_factory.mktemp("corpus")
    recs, start = {}, 0
    for i, n in enumerate([1000, 3400, 2000, 1500, 2600, 1200, 3000]):
        b = random_block(n, seed=i, recording_id=f"rec{i}")
        b["sample_index"] = np.arange(start, start + n, dtype=np.int64)
        start += n
        recs[f"rec{i}"] = [b]
    cfg = BuildConfig(formats=("webdataset", "parquet"), val_fraction=0.25, block_size=256, row_group_size=512,
                      events_per_shard=1024, extract_params={"freq_min_hz": 300.0})
    build_from_blocks(out, recs, cfg)
    return out


def ids(batches):
    return np.concatenate([b["sample_index"].numpy() for b in batches])


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_ranks_get_equal_batches_of_disjoint_events(corpus, fmt):
    streams = [EventStream(corpus, "train", batch_size=64, shuffle_buffer=512, fields=FIELDS, rank=r,
                           world_size=3, format=fmt) for r in range(3)]
    per_rank = [list(s) for s in streams]
    assert {len(p) for p in per_rank} == {streams[0].batches_per_epoch} and streams[0].batches_per_epoch > 0
    all_ids = np.concatenate([ids(p) for p in per_rank])
    assert len(np.unique(all_ids)) == len(all_ids)  # no event twice in an epoch
    assert len(all_ids) >= streams[0].num_events - 3 * 64 - 3
    b = per_rank[0][0]
    assert b["waveform"].dtype == torch.float32 and b["waveform"].shape == (64, 60, 12)
    assert b["channel_offsets_um"].shape == (64, 12, 2) and b["channel_mask"].dtype == torch.bool


def test_deterministic_per_seed_and_epoch(corpus):
    def run(seed, epoch):
        s = EventStream(corpus, batch_size=64, shuffle_buffer=512, fields=FIELDS, seed=seed)
        s.set_epoch(epoch)
        return ids(list(s))

    a = run(0, 0)
    assert np.array_equal(a, run(0, 0))
    assert not np.array_equal(a, run(0, 1)) and not np.array_equal(a, run(1, 0))
    assert len(np.unique(a)) == len(a)
    # shuffling mixes recordings within a batch
    s = EventStream(corpus, batch_size=64, shuffle_buffer=1024, fields=("recording_id",))
    assert len(set(next(iter(s))["recording_id"].tolist())) > 1


def test_formats_give_the_same_stream(corpus):
    a = EventStream(corpus, batch_size=64, shuffle_buffer=0, fields=FIELDS, format="webdataset")
    b = EventStream(corpus, batch_size=64, shuffle_buffer=0, fields=FIELDS, format="parquet")
    for x, y in zip(a, b):
        for k in FIELDS:
            assert torch.equal(x[k], y[k])


def test_resume_in_process_continues_exactly(corpus):
    ref = EventStream(corpus, batch_size=32, shuffle_buffer=256, fields=FIELDS, seed=3)
    ref.set_epoch(2)
    full = list(ref)
    s = EventStream(corpus, batch_size=32, shuffle_buffer=256, fields=FIELDS, seed=3)
    s.set_epoch(2)
    it = iter(s)
    for _ in range(13):
        next(it)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["batches_yielded"] == 13
    resumed = EventStream(corpus, batch_size=32, shuffle_buffer=256, fields=FIELDS, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 13
    assert np.array_equal(ids(rest), ids(full[13:]))
    with pytest.raises(ValueError, match="batch_size"):
        EventStream(corpus, batch_size=16, fields=FIELDS, seed=3).load_state_dict(state)


@pytest.mark.parametrize("k", [0, 5, 6])
def test_resume_with_dataloader_workers_continues_exactly(corpus, k):
    def loader(stream):
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)

    s = EventStream(corpus, batch_size=32, shuffle_buffer=256, fields=FIELDS, seed=1, num_workers_hint=2)
    full = list(loader(s))
    assert len(full) == s.batches_per_epoch
    assert len(np.unique(ids(full))) == len(ids(full))
    state = s.state_dict(batches_yielded=k)
    r = EventStream(corpus, batch_size=32, shuffle_buffer=256, fields=FIELDS, seed=1, num_workers_hint=2)
    r.load_state_dict(state)
    assert np.array_equal(ids(list(loader(r))), ids(full[k:]))


def test_schema_mismatch_and_corrupt_shard_fail_clearly(corpus, tmp_path):
    import shutil

    with pytest.raises(SchemaMismatchError, match="num_channels"):
        EventStream(corpus, expected_schema=EventSchema(num_channels=16))
    copy = tmp_path / "c"
    shutil.copytree(corpus, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["schema"]["version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SchemaMismatchError, match="version 99"):
        EventStream(copy)
    shutil.rmtree(copy)
    shutil.copytree(corpus, copy)
    m = json.loads((copy / "manifest.json").read_text())
    victim = copy / next(s["path"] for s in m["shards"] if s["format"] == "webdataset" and s["split"] == "train")
    victim.write_bytes(victim.read_bytes()[:3000])
    with pytest.raises(ValueError, match=victim.name):
        list(EventStream(copy, shuffle_buffer=0, fields=FIELDS))


def test_load_events(corpus):
    a = load_events(corpus, split="train", format="webdataset")
    b = load_events(corpus, split="train", format="parquet")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["waveform"].dtype == np.float16 and a["recording_id"].dtype.kind == "U"
    small = load_events(corpus, split=None, fields=["unit_label"], max_events=300)
    assert list(small) == ["unit_label"] and len(small["unit_label"]) == 300
    val = load_events(corpus, split="val", fields=["recording_id"])
    assert not set(val["recording_id"]) & set(a["recording_id"])  # splits by recording
