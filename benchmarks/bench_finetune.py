"""Benchmark: does fine-tuning help on probes and rates the default model never saw?

On generated ground-truth recordings whose probe and sampling rate differ from the default model's
corpus (a 4-channel tetrode at 15 kHz and a 32-channel linear probe at 25 kHz), fine-tune with each
mode on the first part of the recording and measure, on the held-out rest (never seen in tuning):
the clustering accuracy of the zero-shot model, of each tuned model and of PCA features of the same
events (:mod:`pretrain.probe`: GMM with the number of components chosen by BIC, never told the unit
count; Hungarian-matched accuracy, ARI, 5-fold kNN accuracy), plus the wall time of tuning on this
CPU. Prints a markdown table and says plainly which modes do not help.

Usage::

    PYTHONPATH=. python benchmarks/bench_finetune.py            # uses inference/models/default/
    PYTHONPATH=. python benchmarks/bench_finetune.py --model CHECKPOINT_DIR --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "inference" / "models" / "default"
MODES = ("self-supervised", "contrastive", "deepcluster")
#: A change of held-out clustering accuracy smaller than this is reported as "no gain".
NOISE_ACC = 0.02

RECORDINGS = {
    # name: (probe, sampling rate, units)
    "tetrode-15kHz": ("tetrode", 15_000.0, 6),
    "linear32-25kHz": ("linear32", 25_000.0, 12),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="parent checkpoint (default: inference/models/default/ when present)")
    p.add_argument("--quick", action="store_true", help="short recordings and few steps (a smoke run, minutes)")
    p.add_argument("--duration-s", type=float, default=None, help="recording duration (default 120, quick 40)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per mode (default 300, quick 60)")
    p.add_argument("--holdout-fraction", type=float, default=0.4, help="last fraction of each recording held out")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--recordings", nargs="+", default=list(RECORDINGS), choices=list(RECORDINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.add_argument("--workdir", default=None, help="where the tuned checkpoints go (default: a temporary folder)")
    return p.parse_args(argv)


def resolve_model(arg: str | None) -> str:
    if arg:
        return arg
    if (DEFAULT_MODEL / "config.json").exists():
        return str(DEFAULT_MODEL)
    raise SystemExit(f"no default model at {DEFAULT_MODEL} yet: pass --model CHECKPOINT_DIR (e.g. a pretrain "
                     "run's final/ folder)")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import finetune
    from spikevault.synth import generate_recording

    model = resolve_model(args.model)
    duration = args.duration_s or (40.0 if args.quick else 120.0)
    steps = args.steps or (60 if args.quick else 300)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_finetune_"))
    rows = []
    for ri, name in enumerate(args.recordings):
        probe, fs, units = RECORDINGS[name]
        rec, gt = generate_recording(probe, duration_s=duration, num_units=units, sampling_rate_hz=fs,
                                     seed=100 + ri)
        for mode in args.modes:
            t0 = time.perf_counter()
            res = finetune.finetune(
                model=model, data=rec, labels=gt, mode=mode, out=work / name / mode, steps=steps,
                holdout_fraction=args.holdout_fraction, seed=args.seed, overwrite=True,
                checkpoint_every=max(steps, 1),
            )
            total = time.perf_counter() - t0
            m = res.metrics
            if not m.get("measured"):
                raise SystemExit(f"{name} {mode}: held-out evaluation not measured: {m.get('reason')}")
            rows.append({
                "recording": name, "mode": mode, "steps": steps, "duration_s": duration,
                "n_train_events": m["n_train_events"], "n_heldout_events": m["n_heldout_events"],
                "before": m["before"], "after": m["after"], "pca": m["pca"],
                "tuning_wall_s": res.wall_time_s, "total_wall_s": total,
            })
            print(f"[{name} / {mode}] zero-shot acc {m['before']['cluster_acc']:.3f} -> tuned "
                  f"{m['after']['cluster_acc']:.3f} (PCA {m['pca']['cluster_acc']:.3f}), tuning {res.wall_time_s:.0f} s",
                  file=sys.stderr, flush=True)
    print(report(rows, model, args, duration, steps))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "rows": rows}, indent=2))
    return 0


def verdict(delta: float) -> str:
    if delta > NOISE_ACC:
        return "helps"
    if delta < -NOISE_ACC:
        return "hurts"
    return "no gain"


def report(rows, model, args, duration, steps) -> str:
    lines = [
        f"Fine-tuning benchmark: parent `{model}`, generated recordings of {duration:g} s, tuned for {steps} steps on "
        f"the first {1 - args.holdout_fraction:.0%} of each recording, evaluated on the last "
        f"{args.holdout_fraction:.0%} (never seen in tuning). Accuracy: GMM (BIC) clustering of the held-out "
        f"events, Hungarian-matched to ground truth; kNN: 5-fold kNN accuracy.",
        "",
        "| recording | mode | tune / held-out events | zero-shot acc | tuned acc | change | PCA acc | "
        "ARI before -> after | kNN before -> after | tuning wall time (s) | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        b, a, p = r["before"], r["after"], r["pca"]
        d = a["cluster_acc"] - b["cluster_acc"]
        lines.append(
            f"| {r['recording']} | {r['mode']} | {r['n_train_events']} / {r['n_heldout_events']} | "
            f"{b['cluster_acc']:.3f} | {a['cluster_acc']:.3f} | {d:+.3f} | {p['cluster_acc']:.3f} | "
            f"{b['ari']:.3f} -> {a['ari']:.3f} | {b['knn_acc']:.3f} -> {a['knn_acc']:.3f} | "
            f"{r['tuning_wall_s']:.0f} | {verdict(d)} |"
        )
    lines.append("")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        ds = [r["after"]["cluster_acc"] - r["before"]["cluster_acc"] for r in rows if r["mode"] == mode]
        vs = [verdict(d) for d in ds]
        if all(v == "helps" for v in vs):
            lines.append(f"- `{mode}` helps on every recording (mean change {sum(ds) / len(ds):+.3f}).")
        elif any(v == "helps" for v in vs):
            lines.append(f"- `{mode}` helps on some recordings only ({', '.join(vs)}; mean change "
                         f"{sum(ds) / len(ds):+.3f}).")
        else:
            lines.append(f"- `{mode}` does NOT help here ({', '.join(vs)}; mean change {sum(ds) / len(ds):+.3f}).")
    beats_pca = [r for r in rows if r["after"]["cluster_acc"] > r["pca"]["cluster_acc"]]
    lines.append(f"- Tuned model beats PCA features on {len(beats_pca)} of {len(rows)} (recording, mode) pairs.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
