"""Zero-shot spike sorting with pretrained spike encoders (``inference``).

``inference.sort(recording, model="default", ...)`` is the pipeline (:mod:`inference.sort`; only
numpy is imported until it runs). ``inference.load_model`` / ``load_config`` load checkpoints
(loaded on first use). The SpikeInterface sorter ``"spikevault"`` is registered by
``import inference.sorter``.
"""

from __future__ import annotations

# The function shadows its module as a package attribute on purpose: ``inference.sort(...)``.
# ``from inference.sort import SortParams`` still reaches the module through sys.modules.
from .sort import sort

__all__ = ["sort", "load_model", "load_config"]


def __getattr__(name):
    if name in ("load_model", "load_config"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'inference' has no attribute {name!r}")
