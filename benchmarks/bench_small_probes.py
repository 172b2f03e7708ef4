"""Whole zero-shot pipeline on small probes (tetrodes, single wires): encoder versus PCA features.

On a tetrode or a wire every unit sits at one place, so the probe position that separates units
on long probes is no help and the features carry the clustering. Generated recordings the model
never saw (seeds 7001-7051; its corpora were `spikevault synth --seed 100` and `--seed 101`),
sorted with each model id given and with PCA features, scored by SpikeInterface's
``compare_sorter_to_ground_truth`` (default matching window).

Run::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_small_probes.py [--models default other/ ...]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

#: (probe, units, noise uV, seed): four 6-unit tetrodes and two wires, 60 s at 30 kHz.
CASES = [("tetrode", 6, 10.0, 7001), ("tetrode", 6, 10.0, 7011), ("tetrode", 6, 10.0, 7021),
         ("tetrode", 6, 10.0, 7031), ("single", 3, 10.0, 7041), ("single", 2, 8.0, 7051)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default"], help="model ids; PCA features are always added")
    parser.add_argument("--duration-s", type=float, default=60.0)
    args = parser.parse_args()

    from spikeinterface.comparison import compare_sorter_to_ground_truth

    from inference import sort
    from spikevault.synth import generate_recording

    variants = [(m, {"model": m}) for m in args.models] + [("pca", {"features": "pca"})]
    scores = {name: {} for name, _ in variants}
    print("| recording | " + " | ".join(name for name, _ in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for probe, units, noise, seed in CASES:
        rec, gt = generate_recording(probe=probe, duration_s=args.duration_s, num_units=units,
                                     sampling_rate_hz=30_000.0, noise_level_uv=noise, seed=seed)
        cells = []
        for name, kw in variants:
            with tempfile.TemporaryDirectory() as tmp:
                sorting = sort(rec, out=f"{tmp}/out", report=False, **kw)
            cmp = compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True)
            acc = float(cmp.get_performance()["accuracy"].mean())
            scores[name].setdefault(probe, []).append(acc)
            cells.append(f"{acc:.3f} ({len(cmp.get_well_detected_units(0.8))}/{units}, "
                         f"{cmp.count_false_positive_units()} FP)")
        print(f"| {probe} {units} units, seed {seed} | " + " | ".join(cells) + " |", flush=True)
    for probe in ("tetrode", "single"):
        print(f"| **mean, {probe}** | " + " | ".join(f"**{np.mean(scores[n][probe]):.3f}**" for n, _ in variants) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
