"""Fine-tuning a pretrained spike encoder on a new probe or lab (``spikevault finetune``).

``finetune.finetune(model=..., data=..., mode=..., out=...)`` adapts a checkpoint with one of three
objectives (``self-supervised``: the pretraining objective; ``contrastive``: labels from a sorting;
``deepcluster``: pseudo-labels from clustering) and writes a normal checkpoint whose card records
its parent, data, mode, settings and held-out before/after metrics. See :mod:`finetune.train`.

Nothing heavy is imported until a function is used.
"""

from __future__ import annotations

__all__ = ["finetune", "run", "FinetuneConfig", "FinetuneResult"]


def __getattr__(name: str):
    if name in ("finetune", "run", "FinetuneResult"):
        from . import train

        return getattr(train, name)
    if name == "FinetuneConfig":
        from .config import FinetuneConfig

        return FinetuneConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
