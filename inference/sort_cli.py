"""``spikevault sort RECORDING --model default --out DIR``: zero-shot sorting from the command line.

Everything is :func:`inference.sort.sort`; this module only maps flags to its arguments and
prints a one-screen summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cluster import CLUSTERERS
from .sort import MATCHING_METHODS


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recording", help="recording to sort: any path SpikeInterface reads (folder, .nwb, binary...)")
    parser.add_argument("--model", default="default",
                        help="model id: 'default', a registry name, a checkpoint folder or hf-hub:ORG/NAME@REV "
                             "(default: default)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (sorting, report, log, params)")
    parser.add_argument("--clusterer", choices=CLUSTERERS, default="hdbscan", help="clusterer (default: hdbscan)")
    parser.add_argument("--features", choices=("model", "pca"), default="model",
                        help="cluster on the encoder embedding or on PCA of the same events (default: model)")
    parser.add_argument("--no-matching", dest="matching", action="store_false",
                        help="skip the final template-matching pass")
    parser.add_argument("--matching-method", default=MATCHING_METHODS[0], choices=MATCHING_METHODS,
                        help="SpikeInterface matching engine (default: wobble, on whitened traces)")
    parser.add_argument("--keep-noise-fits", dest="reject_noise_fits", action="store_false",
                        help="keep every wobble or circus-omp fit of low-amplitude templates (by default those their "
                             "amplitude distribution says are noise are removed)")
    parser.add_argument("--no-final-merge", dest="final_merge", action="store_false",
                        help="skip the merge of units split in two after matching (SpikeInterface auto-merge)")
    parser.add_argument("--no-drift-split-merge", dest="final_merge_drift_splits", action="store_false",
                        help="on a motion-corrected recording, do not merge the pairs of units that fire each at "
                             "its own displacements with templates a little less alike (one neuron cut in two "
                             "by the drift)")
    parser.add_argument("--motion-correction", choices=("auto", "on", "off"), default="auto",
                        help="drift correction: 'auto' when drift is detected (default), 'on' or 'off'")
    parser.add_argument("--interpolate-drift", dest="drifting_templates", action="store_false",
                        help="with drift correction, match the interpolated (motion-corrected) traces instead of "
                             "moving the templates with the motion over the recorded traces (the default for rigid "
                             "motion with wobble)")
    parser.add_argument("--detect-threshold", type=float, default=None,
                        help="detection threshold in MAD noise units (default: the model's own, 5). Lower finds "
                             "smaller units and more noise clusters")
    parser.add_argument("--max-contamination", type=float, default=0.5,
                        help="units whose ISI-violation ratio (1.5 ms) exceeds this are multi-unit activity: "
                             "moved out of the sorting to OUT/multi_unit (default: 0.5; 0 keeps every unit)")
    parser.add_argument("--min-unit-spikes", type=int, default=20,
                        help="units with fewer spikes after matching leave the sorting (default: 20; 0 keeps all)")
    parser.add_argument("--position-scale-um", type=float, default=12.0,
                        help="weight of spike position in clustering: um per embedding SD (default: 12)")
    parser.add_argument("--export-phy", action="store_true", help="also write a phy folder in OUT/phy")
    parser.add_argument("--no-report", dest="report", action="store_false", help="skip the PNG/HTML report")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds a previous sort")
    parser.add_argument("--n-jobs", type=int, default=1, help="parallel jobs (default: 1; -1 = all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--progress-bar", action="store_true", help="show progress bars")


def main(args: argparse.Namespace) -> int:
    from .sort import sort

    motion = {"auto": "auto", "on": True, "off": False}[args.motion_correction]
    model = None if (args.features == "pca" and args.model in ("none", "None")) else args.model
    sorting = sort(
        args.recording, model=model, out=args.out, clusterer=args.clusterer, features=args.features,
        matching=args.matching, matching_method=args.matching_method, reject_noise_fits=args.reject_noise_fits,
        final_merge=args.final_merge, final_merge_drift_splits=args.final_merge_drift_splits,
        motion_correction=motion, drifting_templates=args.drifting_templates,
        position_scale_um=args.position_scale_um, detect_threshold=args.detect_threshold,
        max_contamination=args.max_contamination or None, min_unit_spikes=args.min_unit_spikes,
        export_phy=args.export_phy, report=args.report, overwrite=args.overwrite, seed=args.seed,
        job_kwargs={"n_jobs": args.n_jobs, "progress_bar": args.progress_bar},
    )
    info = json.loads((args.out / "params.json").read_text())
    print(f"{len(sorting.unit_ids)} units from {info.get('num_events', 0)} detected events "
          f"({info.get('num_rejected_events', 0)} rejected as noise) in {info['timings_s']['total_s']:.1f} s")
    if info.get("motion", {}).get("applied"):
        how = ("templates moved with the motion" if info["motion"].get("drifting_templates")
               else "traces interpolated")
        print(f"motion corrected (max displacement {info['motion']['max_displacement_um']} um; {how})")
    print(f"sorting: {args.out / 'sorting'}")
    removed = info.get("multi_unit", {}).get("removed_units", [])
    if removed:
        print(f"multi-unit activity ({len(removed)} units, ISI-violation ratio above "
              f"{info['multi_unit']['max_contamination']}): {args.out / 'multi_unit'}")
    if args.report:
        print(f"report:  {args.out / 'report.html'}")
    if args.export_phy:
        print(f"phy:     {args.out / 'phy'}")
    return 0
