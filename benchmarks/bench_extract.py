"""Benchmark of spike-event extraction (``spikevault.extract``).

Measures, on generated recordings saved as int16 SpikeInterface binary folders (so generation
cost is not timed):

* speed for a 32-channel 30 kHz recording, in x real time, with warm numba, for ``n_jobs`` 1 and
  2, next to a baseline ``detect_peaks`` alone (same preprocessing and detection parameters) in the
  same run, plus where a single process spends its time (filter, reference, detection);
* peak memory (``ru_maxrss`` of the main process and of its worker processes) for a 1-minute and a
  10-minute recording, each in a fresh subprocess;
* the same speed and memory for a 384-channel (Neuropixels-like) recording.

Usage::

    PYTHONPATH=. python benchmarks/bench_extract.py --workdir /tmp/spikevault-bench --n-jobs 2

``--quick`` shrinks the durations (for a smoke test). Prints a markdown table and writes
``<workdir>/bench_extract.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_recording(workdir: Path, probe: str, duration_s: float, num_units: int, seed: int = 0) -> Path:
    """Generate once and cache an int16 binary folder; returns its path."""
    folder = workdir / f"{probe}-{int(duration_s)}s"
    if (folder / "binary.json").exists() or (folder / "si_folder.json").exists():
        return folder
    from spikeinterface.preprocessing import scale

    from spikevault.synth import STORAGE_GAIN_UV, generate_recording

    rec, _ = generate_recording(probe, duration_s=duration_s, num_units=num_units, seed=seed)
    stored = scale(rec, gain=1.0 / STORAGE_GAIN_UV, offset=0.0, dtype="int16")
    stored.set_channel_gains(STORAGE_GAIN_UV)
    stored.set_channel_offsets(0.0)
    tmp = folder.with_name(folder.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    stored.save(folder=tmp, format="binary", n_jobs=2, progress_bar=False, verbose=False)
    tmp.rename(folder)
    return folder


def _consume(folder: Path, n_jobs: int) -> tuple[int, float]:
    """Run the streaming extraction, discarding blocks; return (events, seconds)."""
    import spikeinterface as si

    from spikevault.extract import iter_event_blocks

    rec = si.load(folder)
    t0 = time.perf_counter()
    n = 0
    for block in iter_event_blocks(rec, recording_id=folder.name, job_kwargs=dict(n_jobs=n_jobs)):
        n += len(block["waveform"])
    return n, time.perf_counter() - t0


def _cpu_seconds(fn) -> float:
    """CPU time (user + system, this process and its finished children) spent in ``fn()``."""
    before = os.times()
    fn()
    after = os.times()
    return sum(getattr(after, k) - getattr(before, k) for k in ("user", "system", "children_user", "children_system"))


def speed(folder: Path, n_jobs_list=(1, 2)) -> dict:
    import numpy as np
    import spikeinterface as si
    from spikeinterface.core import get_noise_levels
    from spikeinterface.sortingcomponents.peak_detection import detect_peaks

    from spikevault.extract import ExtractParams, extract_events, preprocess
    rec = si.load(folder)
    duration = rec.get_total_duration()
    out = {"recording": folder.name, "channels": rec.get_num_channels(), "duration_s": duration}

    # cold start: numba compiles the detector for this array layout on the first call; time a
    # 2-second slice cold, then everything below is warm
    t0 = time.perf_counter()
    extract_events(rec.frame_slice(0, int(2 * rec.get_sampling_frequency())), recording_id="warmup")
    out["first_call_2s_slice_s"] = time.perf_counter() - t0
    out["load_average_1min"] = os.getloadavg()[0]

    params = ExtractParams()
    pp = preprocess(rec, params)
    fs = rec.get_sampling_frequency()
    chunk = int(fs)
    # single-process breakdown: read+scale+filter, +reference, detection
    import spikeinterface.preprocessing as spre

    filtered = spre.bandpass_filter(spre.scale_to_uV(rec), freq_min=params.freq_min_hz, freq_max=params.freq_max_hz,
                                    dtype="float32")
    n_chunks = int(min(20, rec.get_num_samples(0) // chunk))
    t0 = time.perf_counter()
    for i in range(n_chunks):
        filtered.get_traces(start_frame=i * chunk, end_frame=(i + 1) * chunk)
    out["filter_s_per_s"] = (time.perf_counter() - t0) / n_chunks
    t0 = time.perf_counter()
    for i in range(n_chunks):
        pp.get_traces(start_frame=i * chunk, end_frame=(i + 1) * chunk)
    out["filter_reference_s_per_s"] = (time.perf_counter() - t0) / n_chunks

    # CPU cost of one pass, single process: wall-clock figures on a shared machine depend on its load,
    # CPU seconds much less (x real time per core = duration / CPU seconds)
    out["extract_cpu_s_jobs1"] = _cpu_seconds(lambda: _consume(folder, 1))
    out["extract_x_rt_per_core"] = duration / out["extract_cpu_s_jobs1"]

    noise = get_noise_levels(pp, return_in_uV=False, random_slices_kwargs=dict(seed=0), n_jobs=1, progress_bar=False)
    for n_jobs in n_jobs_list:
        jk = dict(n_jobs=n_jobs, chunk_duration=params.chunk_duration, progress_bar=False)
        t0 = time.perf_counter()
        peaks = detect_peaks(
            pp, method="locally_exclusive",
            method_kwargs=dict(peak_sign=params.peak_sign, detect_threshold=params.detect_threshold,
                               exclude_sweep_ms=params.exclude_sweep_ms, radius_um=params.detect_radius_um,
                               noise_levels=noise),
            job_kwargs=jk,
        )
        t_detect = time.perf_counter() - t0
        n_events, t_extract = _consume(folder, n_jobs)
        out[f"detect_peaks_s_jobs{n_jobs}"] = t_detect
        out[f"detect_peaks_x_rt_jobs{n_jobs}"] = duration / t_detect
        out[f"extract_s_jobs{n_jobs}"] = t_extract
        out[f"extract_x_rt_jobs{n_jobs}"] = duration / t_extract
        out[f"events_jobs{n_jobs}"] = n_events
        out["peaks_detected"] = int(np.asarray(peaks).size)
    return out


def memory_child(folder: str, n_jobs: int) -> None:
    n, seconds = _consume(Path(folder), n_jobs)
    print(json.dumps({
        "events": n, "seconds": seconds,
        "maxrss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "maxrss_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def memory(folder: Path, n_jobs: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(folder), "--n-jobs", str(n_jobs)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**_env(), "PYTHONPATH": str(REPO)})
    if res.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _env():
    import os

    return dict(os.environ)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/spikevault-bench", help="cache of generated recordings + results")
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="short recordings (smoke test)")
    parser.add_argument("--skip-384", action="store_true", help="skip the 384-channel recording")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.n_jobs)
        return 0

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    short, long, np_dur = (10.0, 60.0, 5.0) if args.quick else (60.0, 600.0, 60.0)
    rec32 = make_recording(workdir, "linear32", short, num_units=12)
    rec32_long = make_recording(workdir, "linear32", long, num_units=12)
    results = {"command": "PYTHONPATH=. python benchmarks/bench_extract.py " + " ".join(argv or sys.argv[1:])}
    results["speed_32"] = speed(rec32, n_jobs_list=sorted({1, args.n_jobs}))
    if not args.skip_memory:
        results["memory_32_short"] = memory(rec32, args.n_jobs)
        results["memory_32_long"] = memory(rec32_long, args.n_jobs)
    if not args.skip_384:
        rec384 = make_recording(workdir, "neuropixels", np_dur, num_units=60)
        results["speed_384"] = speed(rec384, n_jobs_list=[args.n_jobs])
        if not args.skip_memory:
            results["memory_384"] = memory(rec384, args.n_jobs)
    (workdir / "bench_extract.json").write_text(json.dumps(results, indent=2))

    j = args.n_jobs
    s32 = results["speed_32"]
    print(f"\n## Extraction benchmark ({results['command']})\n")
    print("| recording | n_jobs | extract (x real time) | detect_peaks alone (x real time) | events |")
    print("|---|---|---|---|---|")
    for n in sorted({1, j}):
        print(f"| 32 ch, 30 kHz, {s32['duration_s']:.0f} s | {n} | {s32[f'extract_x_rt_jobs{n}']:.1f}x "
              f"({s32[f'extract_s_jobs{n}']:.1f} s) | {s32[f'detect_peaks_x_rt_jobs{n}']:.1f}x "
              f"({s32[f'detect_peaks_s_jobs{n}']:.1f} s) | {s32[f'events_jobs{n}']} |")
    if "speed_384" in results:
        s = results["speed_384"]
        print(f"| 384 ch, 30 kHz, {s['duration_s']:.0f} s | {j} | {s[f'extract_x_rt_jobs{j}']:.1f}x "
              f"({s[f'extract_s_jobs{j}']:.1f} s) | {s[f'detect_peaks_x_rt_jobs{j}']:.1f}x "
              f"({s[f'detect_peaks_s_jobs{j}']:.1f} s) | {s[f'events_jobs{j}']} |")
    for key, label in (("speed_32", "32 ch"), ("speed_384", "384 ch")):
        if key in results:
            r = results[key]
            print(f"\n{label}: one single-process pass costs {r['extract_cpu_s_jobs1']:.1f} CPU s for "
                  f"{r['duration_s']:.0f} s of recording = {r['extract_x_rt_per_core']:.1f}x real time per core.")
    print(f"\nSingle process, 32 ch, per second of recording: bandpass {s32['filter_s_per_s'] * 1000:.0f} ms, "
          f"bandpass + median reference {s32['filter_reference_s_per_s'] * 1000:.0f} ms; "
          f"first call on a 2 s slice (numba compile included) {s32['first_call_2s_slice_s']:.1f} s; "
          f"1-min load average during the run {s32['load_average_1min']:.1f} on {os.cpu_count()} cores.\n")
    print("| peak memory (n_jobs=%d) | events | main process MB | largest worker MB | wall s |" % j)
    print("|---|---|---|---|---|")
    for key, label in (("memory_32_short", f"32 ch, {short / 60:g} min"), ("memory_32_long", f"32 ch, {long / 60:g} min"),
                       ("memory_384", f"384 ch, {np_dur / 60:g} min")):
        if key in results:
            m = results[key]
            print(f"| {label} | {m['events']} | {m['maxrss_main_mb']:.0f} | {m['maxrss_workers_mb']:.0f} | "
                  f"{m['seconds']:.1f} |")
    if "memory_32_long" in results:
        ratio = results["memory_32_long"]["maxrss_main_mb"] / results["memory_32_short"]["maxrss_main_mb"]
        print(f"\nlong/short main-process peak memory ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
