"""``spikevault publish`` and ``spikevault models``: put checkpoints on the hub, list known ones.

Publishing needs a hub token with write access: set ``HF_TOKEN`` or run ``hf auth login``
(``huggingface-cli login`` in older huggingface_hub). ``HF_ENDPOINT`` selects another hub server.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- publish
def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Upload a checkpoint folder (model.safetensors, config.json, README.md; never training state) "
        "to the Hugging Face hub. Authenticate with the HF_TOKEN environment variable or `hf auth login`."
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder written by save_pretrained / pretrain")
    parser.add_argument("--repo-id", required=True, help="hub repository ORG/NAME (created if missing)")
    parser.add_argument("--revision", default=None, help="branch to upload to (created if missing; default: main)")
    parser.add_argument("--private", action=argparse.BooleanOptionalAction, default=False,
                        help="create the repository as private (default: public; no effect on an existing repo)")
    parser.add_argument("--commit-message", default=None, help="commit message of the upload")


def main(args: argparse.Namespace) -> int:
    from .checkpoint import publish

    info = publish(
        args.checkpoint,
        args.repo_id,
        revision=args.revision,
        private=args.private,
        commit_message=args.commit_message,
    )
    oid = getattr(info, "oid", None)
    print(f"published {args.checkpoint} to {getattr(info, 'commit_url', None) or args.repo_id}")
    if oid:
        print(f"load exactly this upload with: --model hf-hub:{args.repo_id}@{oid}")
    return 0


# -------------------------------------------------------------------------------- models
def configure_models_parser(parser: argparse.ArgumentParser) -> None:
    from .registry import PROBE_TYPES

    parser.add_argument("--probe", default=None,
                        help=f"only models intended for this probe type (e.g. {', '.join(PROBE_TYPES)})")
    parser.add_argument("--online", action=argparse.BooleanOptionalAction, default=False,
                        help="also list hub models tagged 'spikevault' (default: embedded/registered only)")
    parser.add_argument("--json", action="store_true", help="print the entries as JSON instead of a table")


def _metric_summary(metrics: dict, limit: int = 3) -> str:
    from .cards import _flatten, _fmt

    rows = [(k, v) for k, v in _flatten(metrics) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={_fmt(v)}" for k, v in rows[:limit]) or "-"


def format_table(entries) -> str:
    """Plain-text table of registry entries."""
    header = ("NAME", "SOURCE", "PROBES", "RATES (kHz)", "LATENT", "METRICS", "DESCRIPTION")
    rows = []
    for e in entries:
        source = e.source if e.available else f"{e.source} (not built)"
        rates = ",".join(f"{r / 1000:g}" for r in e.sampling_rates_hz) or "-"
        desc = e.description if len(e.description) <= 60 else e.description[:57] + "..."
        rows.append((e.name, source, ",".join(e.probes) or "-", rates,
                     str(e.latent_dim) if e.latent_dim is not None else "-", _metric_summary(e.metrics), desc))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def models_main(args: argparse.Namespace) -> int:
    from .registry import list_models

    entries, notes = list_models(probe=args.probe, online=args.online)
    if args.json:
        print(json.dumps({"models": [e.to_dict() for e in entries], "notes": notes}, indent=2))
        return 0
    if entries:
        print(format_table(entries))
    else:
        print("no known models" + (f" for probe type {args.probe!r}" if args.probe else ""))
    for note in notes:
        print(f"note: {note}")
    return 0
