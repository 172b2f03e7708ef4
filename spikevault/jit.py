"""Numba's on-disk cache for the SpikeInterface kernels the pipelines call.

SpikeInterface compiles its numba kernels (peak detection, spike-vector tools, quality metrics)
without ``cache=True``, so every process compiles them again: on a 2-core machine the peak
detector alone costs about 5 s, paid by every worker of every extraction pass. Turning numba's
own cache on for those kernels makes that a one-off per machine and SpikeInterface version.
Numba keys the cache on the source file's path and timestamp, so an upgraded SpikeInterface
recompiles. The cache lives beside the source (``__pycache__``) or, when that is read-only, in
numba's user-wide cache folder (``NUMBA_CACHE_DIR`` moves it).
"""

from __future__ import annotations

import inspect
import logging
import sys

logger = logging.getLogger(__name__)


def cache_spikeinterface_kernels() -> int:
    """Turn numba's on-disk cache on for every kernel of the SpikeInterface modules loaded so far.

    Call it after the modules a stage uses are imported and before the stage starts its worker
    processes (forked workers inherit the setting). Idempotent and cheap; returns how many kernels
    it switched on. Without numba it does nothing.
    """
    try:
        from numba.core.caching import NullCache
        from numba.core.dispatcher import Dispatcher
    except ImportError:
        return 0
    switched = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "spikeinterface" or name.startswith("spikeinterface.")):
            continue
        for obj in list(vars(module).values()):
            if _is_lazy_kernel_getter(obj):
                # SpikeInterface builds some kernels on first use (the spike-vector tools) and
                # keeps them on the getter: build them now so their compilation is cached too
                try:
                    obj = obj()
                except Exception as err:  # noqa: BLE001 - a getter that needs more than it had
                    logger.debug("numba kernel getter %s failed: %s", obj.__qualname__, err)
                    continue
            # enable_caching() is what numba's own ``@jit(cache=True)`` calls on a new dispatcher
            if isinstance(obj, Dispatcher) and isinstance(obj._cache, NullCache):
                try:
                    obj.enable_caching()
                except RuntimeError as err:  # no writable cache location for this kernel
                    logger.debug("numba cache not enabled for %s: %s", obj.py_func.__qualname__, err)
                    continue
                switched += 1
    return switched


def _is_lazy_kernel_getter(obj) -> bool:
    """SpikeInterface's ``get_numba_*()`` functions, which jit a kernel on their first call and
    return it (cached on the function, ``_cached_numba_function``) from then on."""
    return (inspect.isfunction(obj) and obj.__name__.startswith("get_numba_")
            and not inspect.signature(obj).parameters)
