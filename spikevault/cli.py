"""The ``spikevault`` command: one map from subcommand to the module that implements it.

Each module named here exposes ``configure_parser(parser)`` (adds its flags) and
``main(args) -> int``. Modules are imported only when their subcommand runs, so
``spikevault sort`` never imports the training stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("spikevault.synth_cli", "generate ground-truth recordings and a sources file"),
    "build": ("spikevault.build_cli", "build a sharded spike-event corpus from recordings"),
    "merge": ("spikevault.build_cli:merge", "assemble one manifest from the parts of a multi-rank build"),
    "verify": ("spikevault.verify_cli", "check a corpus: checksums, counts, schema"),
    "info": ("spikevault.verify_cli:info", "summary table of a corpus"),
    "pretrain": ("pretrain.cli", "self-supervised pretraining under Lightning Fabric"),
    "finetune": ("finetune.cli", "adapt a pretrained encoder to a new probe or lab"),
    "publish": ("inference.hub_cli", "upload a checkpoint folder to the Hugging Face hub"),
    "models": ("inference.hub_cli:models", "list known checkpoints"),
    "sort": ("inference.sort_cli", "zero-shot spike sorting of a recording"),
    "demo": ("inference.demo", "sort a generated example recording with the default model and score it"),
    "warmup": ("inference.warmup", "compile the sort's numba kernels now (numba's disk cache), not in the first sort"),
}


def _load(target: str):
    """Return (configure_parser, main) for 'module' or 'module:prefix'."""
    module_name, _, prefix = target.partition(":")
    module = importlib.import_module(module_name)
    if prefix:
        return getattr(module, f"configure_{prefix}_parser"), getattr(module, f"{prefix}_main")
    return module.configure_parser, module.main


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikevault",
        description="SpikeVault: spike corpora, pretrained spike encoders and zero-shot sorting.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen subcommand's module is imported (its flags are needed to parse).
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (target, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            configure, main = _load(target)
            configure(p)
            p.set_defaults(_main=main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Commands raise their own loggers' level to fill their log files; the console stays quiet.
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
    try:
        return int(args._main(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        # Errors raised for people: print the message, not a traceback (-vv shows it).
        if args.verbose >= 2:
            raise
        print(f"spikevault {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
