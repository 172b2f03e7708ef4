"""``spikevault demo``: zero-shot sorting of a generated example recording, scored against its truth.

The README's first command. It generates a ground-truth recording the embedded default model never
saw (a seed outside its corpus), sorts it with the model, and prints SpikeInterface's
ground-truth comparison (default matching window), with the same pipeline on PCA features beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    parser.add_argument("--model", default="default", help="model id: 'default', a folder, or hf-hub:ORG/NAME@REV")
    parser.add_argument("--probe", default="linear32", help="probe of the generated recording (default: linear32)")
    parser.add_argument("--duration-s", type=float, default=60.0, help="recording length in seconds (default: 60)")
    parser.add_argument("--num-units", type=int, default=12, help="ground-truth units (default: 12)")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the example recording (default: 2026)")
    parser.add_argument("--no-pca-baseline", dest="pca_baseline", action="store_false",
                        help="skip the same pipeline on PCA features")


def run_demo(out: Path, model: str = "default", probe: str = "linear32", duration_s: float = 60.0,
             num_units: int = 12, seed: int = 2026, pca_baseline: bool = True) -> dict:
    """Generate, sort, score; returns the scores (and writes them to ``out/scores.json``)."""
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    from inference.sort import sort
    from spikevault.synth import generate_recording

    out = Path(out)
    recording, gt = generate_recording(probe=probe, duration_s=duration_s, num_units=num_units, seed=seed)
    runs = [("encoder", "model")] + ([("pca", "pca")] if pca_baseline else [])
    scores = {}
    for name, features in runs:
        t0 = time.perf_counter()
        sorting = sort(recording, model=model, features=features, out=out / name, overwrite=True)
        wall_s = time.perf_counter() - t0
        cmp = compare_sorter_to_ground_truth(gt, sorting, exhaustive_gt=True)
        perf = cmp.get_performance()
        scores[name] = {
            "mean_accuracy": float(perf["accuracy"].mean()),
            "well_detected": int(len(cmp.get_well_detected_units(well_detected_score=0.8))),
            "false_positive_units": int(cmp.count_false_positive_units()),
            "num_units_found": int(len(sorting.unit_ids)),
            "wall_s": round(wall_s, 1),
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(scores, indent=2))
    return scores


def main(args: argparse.Namespace) -> int:
    scores = run_demo(args.out, model=args.model, probe=args.probe, duration_s=args.duration_s,
                      num_units=args.num_units, seed=args.seed, pca_baseline=args.pca_baseline)
    print(f"Zero-shot sorting of a generated {args.probe} recording ({args.duration_s:.0f} s, "
          f"{args.num_units} ground-truth units), model '{args.model}':")
    print(f"{'features':<10} {'mean acc':>9} {'well det.':>10} {'false pos.':>11} {'units':>6} {'wall s':>7}")
    for name, s in scores.items():
        print(f"{name:<10} {s['mean_accuracy']:>9.3f} {s['well_detected']:>7}/{args.num_units:<2} "
              f"{s['false_positive_units']:>11} {s['num_units_found']:>6} {s['wall_s']:>7}")
    print(f"Sorting, report and log in {args.out}/")
    return 0
