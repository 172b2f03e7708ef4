"""``spikevault build`` and ``spikevault merge``: command-line front of :mod:`spikevault.build`."""

from __future__ import annotations

import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from .shards import DEFAULT_BLOCK_SIZE, DEFAULT_EVENTS_PER_SHARD, DEFAULT_ROW_GROUP_SIZE

    parser.add_argument("sources", nargs="+", metavar="SOURCES",
                        help="recordings SpikeInterface can read and/or sources files (.yaml)")
    parser.add_argument("--out", required=True, help="corpus directory (created; rerun to resume)")
    parser.add_argument("--format", default="webdataset", choices=("webdataset", "parquet", "both"),
                        help="shard format(s) (default: webdataset)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of recordings for validation")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="fraction of recordings for test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split assignment")
    parser.add_argument("--workers", type=int, default=1, help="recordings processed in parallel on this machine")
    parser.add_argument("--rank", type=int, default=None,
                        help="this machine's rank (default: SLURM_ARRAY_TASK_ID, SLURM_PROCID, RANK or 0)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="number of machines (default: SLURM_ARRAY_TASK_COUNT, SLURM_NTASKS, WORLD_SIZE or 1)")
    parser.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                        help="stop at a bad recording (raise) or record it as skipped and go on (skip)")
    parser.add_argument("--executor", default="local", choices=("local", "dask"),
                        help="local process pool, or a Dask distributed cluster")
    parser.add_argument("--dask-address", default=None,
                        help="scheduler address of an existing Dask cluster (default: start a LocalCluster)")
    parser.add_argument("--n-jobs", type=int, default=1, help="SpikeInterface jobs inside one recording")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="events per tar sample")
    parser.add_argument("--row-group-size", type=int, default=DEFAULT_ROW_GROUP_SIZE, help="events per Parquet row group")
    parser.add_argument("--events-per-shard", type=int, default=DEFAULT_EVENTS_PER_SHARD,
                        help="events per shard file")
    parser.add_argument("--detect-threshold", type=float, default=None, help="detection threshold (x MAD noise)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from .build import BuildConfig, run_build
    from .extract import ExtractParams
    from .sources import resolve_sources
    from .verify_cli import print_summary

    params = ExtractParams() if args.detect_threshold is None else ExtractParams(detect_threshold=args.detect_threshold)
    config = BuildConfig(
        formats=args.format, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
        on_error=args.on_error, block_size=args.block_size, row_group_size=args.row_group_size,
        events_per_shard=args.events_per_shard, extract_params=params.to_dict(), n_jobs=args.n_jobs,
    )
    sources = [s.to_dict() for s in resolve_sources(args.sources)]
    manifest = run_build(sources, args.out, config, workers=args.workers, rank=args.rank,
                         world_size=args.world_size, executor=args.executor, dask_address=args.dask_address,
                         progress=not args.no_progress)
    if manifest is None:
        print(f"this rank is done; when all ranks are, run: spikevault merge {args.out}")
        return 0
    print_summary(manifest, args.out)
    return 0


def configure_merge_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="corpus directory written by the ranks of `spikevault build`")


def merge_main(args: argparse.Namespace) -> int:
    from .build import finalize
    from .verify_cli import print_summary

    manifest = finalize(args.dir)
    print_summary(manifest, args.dir)
    return 0
