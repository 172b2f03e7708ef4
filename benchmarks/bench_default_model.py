"""Held-out quality of the embedded default model: encoder features versus PCA features.

Two views, both on generated ground-truth recordings the model never saw (seeds 7000+; its corpus
was `spikevault synth --seed 100`), every probe type of its corpus plus rates it was not trained at:

* **probe**: the clustering probe of pretraining (``pretrain.probe.run_probe``): labelled events of
  each recording clustered by a BIC-chosen Gaussian mixture (never told the unit count) on the
  encoder embedding and on PCA features of the same events with the same dimensionality;
  Hungarian-matched accuracy, ARI, cross-validated kNN accuracy;
* **pipeline**: the whole zero-shot sorter (``inference.sort``) with ``features="model"`` and
  ``features="pca"``, scored by SpikeInterface's ``compare_sorter_to_ground_truth`` (default
  matching window): mean accuracy, well-detected units (>= 0.8), false-positive units.

Run::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_default_model.py [--model default] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

#: (name, probe, sampling rate, units, noise uV)
RECORDINGS = [
    ("single-30k", "single", 30_000.0, 3, 10.0),
    ("tetrode-30k", "tetrode", 30_000.0, 6, 10.0),
    ("tetrode-22k", "tetrode", 22_000.0, 6, 10.0),
    ("linear32-30k", "linear32", 30_000.0, 15, 10.0),
    ("linear32-25k-noisy", "linear32", 25_000.0, 15, 18.0),
    ("dense64-30k", "dense64", 30_000.0, 25, 10.0),
]
PIPELINE_RECORDINGS = ("tetrode-30k", "linear32-30k", "linear32-25k-noisy", "dense64-30k")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--quick", action="store_true", help="20 s recordings, probe only on 3 of them")
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false", help="probe only")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from spikeinterface.comparison import compare_sorter_to_ground_truth

    from inference import load_model, sort
    from pretrain.probe import ProbeConfig, run_probe
    from spikevault.extract import extract_events
    from spikevault.synth import generate_recording

    duration = 20.0 if args.quick else args.duration_s
    recs = RECORDINGS[1:4] if args.quick else RECORDINGS
    model = load_model(args.model)
    schema = model.model_info.schema if hasattr(model, "model_info") else None
    rows, pipe_rows = [], []
    for i, (name, probe, fs, units, noise) in enumerate(recs):
        rec, gt = generate_recording(probe=probe, duration_s=duration, num_units=units, sampling_rate_hz=fs,
                                     noise_level_uv=noise, seed=7000 + i)
        kw = {"schema": schema} if schema is not None else {}
        block = extract_events(rec, sorting=gt, label_source="ground_truth", recording_id=name, **kw)
        res = run_probe(model, block, ProbeConfig(max_events_per_recording=3000))
        rows.append({"recording": name, "events": int(len(block["waveform"])), "units": units,
                     "model": res["model"], "pca": res["pca"]})
        print(f"[probe] {name}: model acc {res['model']['cluster_acc']:.3f} vs pca {res['pca']['cluster_acc']:.3f}",
              flush=True)
        if args.pipeline and name in PIPELINE_RECORDINGS and not args.quick:
            for features in ("model", "pca"):
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    sorting = sort(rec, model=args.model, features=features, out=Path(tmp) / "out")
                    wall = time.perf_counter() - t0
                cmp = compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True)
                acc = cmp.get_performance()["accuracy"]
                pipe_rows.append({"recording": name, "features": features, "mean_accuracy": float(acc.mean()),
                                  "well_detected": len(cmp.get_well_detected_units(0.8)), "units": units,
                                  "false_positive": int(cmp.count_false_positive_units()), "wall_s": wall})
                print(f"[pipeline] {name} {features}: {acc.mean():.3f}", flush=True)

    print("\n### Clustering probe (GMM, BIC-chosen components), held-out recordings\n")
    print("| recording | events | units | encoder acc | PCA acc | encoder ARI | PCA ARI | encoder kNN | PCA kNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, q = r["model"], r["pca"]
        print(f"| {r['recording']} | {r['events']} | {r['units']} | {m['cluster_acc']:.3f} | {q['cluster_acc']:.3f} | "
              f"{m['ari']:.3f} | {q['ari']:.3f} | {m['knn_acc']:.3f} | {q['knn_acc']:.3f} |")
    mean = {k: float(np.mean([r[k]["cluster_acc"] for r in rows])) for k in ("model", "pca")}
    print(f"| **mean** | | | **{mean['model']:.3f}** | **{mean['pca']:.3f}** | | | | |")
    if pipe_rows:
        print("\n### Whole zero-shot pipeline, encoder vs PCA features (compare_sorter_to_ground_truth)\n")
        print("| recording | features | mean accuracy | well detected | false-positive units | wall s |")
        print("|---|---|---|---|---|---|")
        for r in pipe_rows:
            print(f"| {r['recording']} | {r['features']} | {r['mean_accuracy']:.3f} | {r['well_detected']}/{r['units']} | "
                  f"{r['false_positive']} | {r['wall_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"probe": rows, "pipeline": pipe_rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
