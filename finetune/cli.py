"""``spikevault finetune``: adapt a pretrained encoder to a new probe or lab.

Examples
--------
::

    spikevault finetune --model default --data rec.nwb --labels phy_folder/ --mode contrastive --out tuned/
    spikevault finetune --model tuned/ --data rec1/ rec2/ --mode deepcluster --train-window-s 0 600 --out dc/
    spikevault finetune --model default --data corpus/ --mode self-supervised --steps 2000 --out ss/ --resume auto

The flags are generated from :class:`finetune.config.FinetuneConfig`, so ``--help`` shows each
setting's description and default.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from .config import MODES, FinetuneConfig

_POSITIONAL_STYLE = {"data": "SOURCE", "labels": "SORTING", "model": "MODEL", "out": "DIR"}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``finetune`` flags (one per :class:`FinetuneConfig` field) to ``parser``."""
    for f in fields(FinetuneConfig):
        flag = FinetuneConfig.flag(f.name)
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata.get("help", "")
        kw: dict = {"dest": f.name, "help": help_text}
        if f.name == "data":
            kw.update(nargs="+", required=True, metavar="SOURCE")
        elif f.name == "labels":
            kw.update(nargs="+", default=None, metavar="SORTING")
        elif f.name == "out":
            kw.update(required=True, metavar="DIR")
        elif f.name == "mode":
            kw.update(choices=MODES, required=True)
        elif f.name == "train_window_s":
            kw.update(nargs=2, type=float, default=None, metavar=("START", "END"))
        elif f.name == "overwrite":
            kw.update(action="store_true", default=False)
        elif f.name in ("freeze", "resume"):
            kw.update(default=None, metavar="auto" if f.name == "resume" else "encoder-lower")
        else:
            kw.update(type=type(default), default=default)
        if default is not None and "default" not in help_text and f.name not in ("overwrite",):
            kw["help"] = f"{help_text} (default: {default})"
        parser.add_argument(flag, **kw)


def main(args: argparse.Namespace) -> int:
    """Run a fine-tune from parsed arguments; print where the checkpoint went and the before/after table."""
    from .train import run

    settings = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if hasattr(args, f.name)}
    config = FinetuneConfig.from_dict(settings).validate()
    result = run(config)
    print(f"fine-tuned checkpoint: {result.folder}")
    print(result.metrics_table())
    return 0
