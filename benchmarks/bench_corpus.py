"""Corpus benchmark: shard writing, streaming reads, extraction, and a 255M-event extrapolation.

Run (prints a markdown table)::

    PYTHONPATH=. python benchmarks/bench_corpus.py [--events 200000] [--machines 1,8,32,128]

* writer: events/s of ``WebDatasetShardWriter`` / ``ParquetShardWriter`` (including the rename
  and sha256 of commit) on random events with the default schema (T=60, K=12);
* reader: events/s of ``EventStream`` with shuffling (buffer 8,192, batch 256) from one worker
  (in-process, torch single-threaded as in a DataLoader worker), second epoch (shards open);
* extraction: ``spikevault.extract.iter_event_blocks`` on a generated 32-channel 30 kHz recording
  (n_jobs=1), as x real time and events/s;
* extrapolation: wall time and disk for ``--target-events`` (255M) on N machines, each building
  ``--workers-per-machine`` recordings at once, every event extracted once and written once per format.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_writer(fmt: str, blocks, tmp: Path) -> tuple[float, float]:
    from spikevault.shards import WRITERS

    d = tmp / f"w-{fmt}"
    w = WRITERS[fmt](d, "bench", "bench")
    n = sum(len(b["waveform"]) for b in blocks)
    t = time.perf_counter()
    for b in blocks:
        w.write(b)
    shards = w.commit()
    dt = time.perf_counter() - t
    nbytes = sum(s.bytes for s in shards)
    shutil.rmtree(d)
    return n / dt, nbytes / n


def bench_reader(fmt: str, blocks, tmp: Path, batch_size: int = 256, shuffle_buffer: int = 8192) -> float:
    import torch

    from spikevault.build import BuildConfig, build_from_blocks
    from spikevault.reader import EventStream

    d = tmp / f"r-{fmt}"
    per = max(1, len(blocks) // 8)
    recs = {f"rec{i}": blocks[i * per:(i + 1) * per] for i in range(8) if blocks[i * per:(i + 1) * per]}
    build_from_blocks(d, recs, BuildConfig(formats=(fmt,), val_fraction=0.0, extract_params={"freq_min_hz": 300.0}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a DataLoader worker
    try:
        s = EventStream(d, "train", batch_size=batch_size, shuffle_buffer=shuffle_buffer, format=fmt)
        for _ in s:  # epoch 0 opens the shards
            pass
        s.set_epoch(1)
        t = time.perf_counter()
        n = sum(len(b["waveform"]) for b in s)
        dt = time.perf_counter() - t
        s.close()
    finally:
        torch.set_num_threads(threads)
    shutil.rmtree(d)
    return n / dt


def bench_extract(duration_s: float, num_channels_probe: str = "linear32") -> tuple[float, float, int]:
    """(x real time, events/s, events) of the extraction on a generated recording (after a warm-up)."""
    from spikevault.extract import iter_event_blocks
    from spikevault.synth import generate_recording

    warm, _ = generate_recording(probe=num_channels_probe, duration_s=1.0, num_units=4, seed=1)
    for _ in iter_event_blocks(warm, recording_id="warm", job_kwargs={"n_jobs": 1, "progress_bar": False}):
        pass  # numba compilation
    rec, _ = generate_recording(probe=num_channels_probe, duration_s=duration_s, num_units=10, seed=0)
    # Read from disk like a real recording: the generator synthesises its traces on the fly (slow).
    rec = rec.save(folder=Path(tempfile.mkdtemp(prefix="bench_corpus_rec_")) / "rec", progress_bar=False)
    t = time.perf_counter()
    n = sum(len(b["waveform"]) for b in iter_event_blocks(rec, recording_id="bench",
                                                          job_kwargs={"n_jobs": 1, "progress_bar": False}))
    dt = time.perf_counter() - t
    return duration_s / dt, n / dt, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000, help="events written and read per format")
    p.add_argument("--extract-duration-s", type=float, default=30.0, help="length of the extraction recording")
    p.add_argument("--skip-extract", action="store_true", help="do not measure extraction")
    p.add_argument("--target-events", type=float, default=255e6, help="corpus size to extrapolate to")
    p.add_argument("--machines", default="1,8,32,128", help="machine counts for the extrapolation")
    p.add_argument("--workers-per-machine", type=int, default=2, help="recordings built at once per machine")
    args = p.parse_args()

    import pyarrow.parquet  # noqa: F401 - imported before timing: the writers import them lazily
    import webdataset  # noqa: F401

    from spikevault.shards import random_block

    blocks = [random_block(min(4096, args.events - i), seed=k) for k, i in enumerate(range(0, args.events, 4096))]
    for k, b in enumerate(blocks):  # random data does not compress; make waveforms spike-like and smooth
        t = np.arange(b["waveform"].shape[1], dtype=np.float32)
        shape = -np.exp(-0.5 * ((t - 24) / 3) ** 2)[None, :, None] * b["amplitude_uv"][:, None, None]
        b["waveform"] = (shape * np.exp(-np.arange(12) / 4)[None, None, :] + b["waveform"] * 0.2).astype(np.float16)
    tmp = Path(tempfile.mkdtemp(prefix="bench_corpus_"))
    rows, results = [], {}
    try:
        for fmt in ("webdataset", "parquet"):
            w_rate, bpe = bench_writer(fmt, blocks, tmp)
            r_rate = bench_reader(fmt, blocks, tmp)
            results[fmt] = (w_rate, bpe, r_rate)
            rows.append(f"| write {fmt} | {w_rate:,.0f} events/s | target >= 200,000 | {bpe:,.0f} bytes/event |")
            rows.append(f"| read {fmt}, shuffled, 1 worker | {r_rate:,.0f} events/s | target >= 300,000 | |")
        ext = None
        if not args.skip_extract:
            xrt, ext, n = bench_extract(args.extract_duration_s)
            rows.append(f"| extract 32 ch, 30 kHz, n_jobs=1 | {ext:,.0f} events/s | {xrt:.1f}x real time "
                        f"(target >= 20x) | {n:,} events in {args.extract_duration_s:g} s |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n| measurement | rate | target / speed | notes |\n|---|---|---|---|")
    print("\n".join(rows))
    total = args.target_events
    print(f"\nExtrapolation to {total / 1e6:,.0f}M events ({args.workers_per_machine} recordings at once per machine"
          "; formats written in the same pass):\n")
    print("| machines | formats | wall time | disk |\n|---|---|---|---|")
    for fmts in (("webdataset",), ("webdataset", "parquet")):
        per_event_s = sum(1 / results[f][0] for f in fmts) + (1 / ext if ext else 0.0)
        disk = sum(results[f][1] for f in fmts) * total
        for m in (int(x) for x in args.machines.split(",")):
            wall = total * per_event_s / (m * args.workers_per_machine)
            print(f"| {m} | {'+'.join(fmts)} | {wall / 3600:,.1f} h | {disk / 1e12:,.2f} TB |")
    if not ext:
        print("\n(extraction not measured: wall times are for writing only)")


if __name__ == "__main__":
    main()
