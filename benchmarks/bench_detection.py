"""Detection benchmark: which ground-truth spikes each peak detector finds, and how many peaks it
adds that are near no spike.

On a bench_sort case (its saved recording and ground truth, made by ``bench_sort.py``), the
first ``--duration-s`` seconds are preprocessed as the sort does (:func:`spikevault.extract.preprocess`)
and held in memory; then:

* ``locally_exclusive`` (the sort's and the corpus builder's detector) at each ``--thresholds``
  value (MAD units), with the model's exclusion window and radius;
* ``matched_filtering`` (SpikeInterface's, as Lupin uses it: a prototype waveform from 5000
  peaks, 1.5 ms exclusion, 50 um radius) at 5.

A ground-truth spike is found when a peak lies within 0.4 ms of it (any channel); a peak is
"near no spike" when no ground-truth spike lies within 0.4 ms of it.

    PYTHONPATH=. python benchmarks/bench_detection.py --case bench_out/recordings/full/drift64
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _score(peaks, gt_samples: np.ndarray, gt_units: np.ndarray, num_units: int, window: int) -> dict:
    ps = np.sort(peaks["sample_index"])

    def nearest(a, b):  # distance from each of a to the nearest of sorted b
        j = np.clip(np.searchsorted(b, a), 1, len(b) - 1)
        return np.minimum(np.abs(b[j] - a), np.abs(b[j - 1] - a))

    found = nearest(gt_samples, ps) <= window
    return {"peaks": int(len(ps)), "near_no_spike": int(np.sum(nearest(ps, gt_samples) > window)),
            "recall": [float(found[gt_units == u].mean()) if np.any(gt_units == u) else float("nan")
                       for u in range(num_units)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", required=True, help="a bench_sort case folder (with rec/ and gt/)")
    p.add_argument("--duration-s", type=float, default=100.0)
    p.add_argument("--thresholds", type=float, nargs="+", default=[5.0, 4.5])
    p.add_argument("--n-jobs", type=int, default=2)
    args = p.parse_args()

    from spikeinterface.core import get_noise_levels, load
    from spikeinterface.sortingcomponents.peak_detection import detect_peaks
    from spikeinterface.sortingcomponents.tools import get_prototype_and_waveforms_from_recording

    from spikevault.extract import ExtractParams, preprocess

    rec, gt = load(f"{args.case}/rec"), load(f"{args.case}/gt")
    fs = rec.get_sampling_frequency()
    n = int(min(args.duration_s * fs, rec.get_num_samples(0)))
    rec, gt = rec.frame_slice(0, n), gt.frame_slice(0, n)
    ep = ExtractParams()
    jk = dict(n_jobs=args.n_jobs, progress_bar=False, chunk_duration="1s")
    prep = preprocess(rec, ep).save(format="memory", **jk)
    noise = get_noise_levels(prep, return_in_uV=False, random_slices_kwargs=dict(seed=0))
    spikes = gt.to_spike_vector()
    window = int(0.4e-3 * fs)
    rows = []

    def run(name, method, kwargs):
        t = time.perf_counter()
        peaks = detect_peaks(prep, method=method, method_kwargs=kwargs, job_kwargs=jk)
        row = {"detector": name, "seconds": time.perf_counter() - t,
               **_score(peaks, spikes["sample_index"], spikes["unit_index"], len(gt.unit_ids), window)}
        rows.append(row)
        print(f"{name}: {row['peaks']} peaks, {row['near_no_spike']} near no spike", flush=True)

    for thr in args.thresholds:
        run(f"locally exclusive, {thr:g} MAD", "locally_exclusive",
            dict(peak_sign=ep.peak_sign, detect_threshold=thr, exclude_sweep_ms=ep.exclude_sweep_ms,
                 radius_um=ep.detect_radius_um, noise_levels=noise))
    prototype, _, _ = get_prototype_and_waveforms_from_recording(
        prep, n_peaks=5000, ms_before=1.0, ms_after=2.5, seed=0, noise_levels=noise, job_kwargs=jk)
    run("matched filtering, 5", "matched_filtering",
        dict(peak_sign=ep.peak_sign, detect_threshold=5.0, exclude_sweep_ms=1.5, radius_um=50.0,
             prototype=prototype, ms_before=1.0))

    print(f"\nFirst {n / fs:.0f} s of {args.case}; recall per ground-truth unit (0.4 ms window):\n")
    print("| detector | peaks | near no spike | " + " | ".join(f"GT{u}" for u in range(len(gt.unit_ids))) + " |")
    print("|---|---|---|" + "---|" * len(gt.unit_ids))
    for r in rows:
        print(f"| {r['detector']} | {r['peaks']} | {r['near_no_spike']} | "
              + " | ".join(f"{x:.2f}" for x in r["recall"]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
