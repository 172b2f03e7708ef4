"""``spikevault synth``: generate a varied ground-truth source set (recordings + sortings + sources.yaml)."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .synth import PROBE_NAMES

    parser.add_argument("--out", required=True, help="output folder (recordings/, sortings/, sources.yaml)")
    parser.add_argument("--num-recordings", type=int, default=8, help="number of recordings (default: 8)")
    parser.add_argument("--duration-s", type=float, default=10.0, help="duration of each recording in s (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole set (default: 0)")
    parser.add_argument(
        "--probes", nargs="+", default=["single", "tetrode", "linear32", "dense64"], choices=PROBE_NAMES,
        metavar="PROBE",
        help=f"probes to cycle through, from {', '.join(PROBE_NAMES)} (default: single tetrode linear32 dense64)",
    )
    parser.add_argument(
        "--hybrid", action=argparse.BooleanOptionalAction, default=True,
        help="also make hybrid recordings from the real templates in ../shared/data or $SPIKEVAULT_SHARED_DATA "
        "(skipped with a warning when absent; default: on)",
    )
    parser.add_argument("--hybrid-fraction", type=float, default=0.5,
                        help="share of recordings that are hybrid when --hybrid (default: 0.5)")
    parser.add_argument("--drift-fraction", type=float, default=0.0,
                        help="share of the synthetic recordings on linear32, dense64 and neuropixels probes that "
                        "drift (zigzag along depth, 10-30 um; default: 0)")
    parser.add_argument("--shared-data", default=None, help="folder of real templates (default: auto-detected)")


def main(args: argparse.Namespace) -> int:
    from .synth import generate_source_set

    problems = []
    if args.num_recordings < 1:
        problems.append(f"--num-recordings must be >= 1 (got {args.num_recordings})")
    if not args.duration_s > 0:
        problems.append(f"--duration-s must be > 0 (got {args.duration_s})")
    if not 0.0 <= args.hybrid_fraction <= 1.0:
        problems.append(f"--hybrid-fraction must be within [0, 1] (got {args.hybrid_fraction})")
    if not 0.0 <= args.drift_fraction <= 1.0:
        problems.append(f"--drift-fraction must be within [0, 1] (got {args.drift_fraction})")
    if problems:
        raise ValueError("; ".join(problems))
    sources = generate_source_set(
        args.out, num_recordings=args.num_recordings, duration_s=args.duration_s, seed=args.seed,
        probes=tuple(args.probes), hybrid=args.hybrid, hybrid_fraction=args.hybrid_fraction,
        shared_data=args.shared_data, progress=True, drift_fraction=args.drift_fraction,
    )
    print(f"{'recording_id':<28} {'probe':<12} {'lab':<28} licence")
    for s in sources:
        print(f"{s.recording_id:<28} {s.probe:<12} {s.lab:<28} {s.licence}")
    print(f"wrote {len(sources)} recordings and {args.out}/sources.yaml")
    return 0
