"""Keep freed memory in the process for reuse, instead of returning it to the system.

Every pass over a recording allocates the same large temporaries chunk after chunk: a 1 s,
64-channel float32 chunk is 7.7 MB, and filtering, referencing, scaling, matching each make a
few. glibc's malloc serves blocks that large with ``mmap`` (its threshold adapts only up to
the largest block freed so far) and gives freed memory at the top of its heap back to the system
beyond 128 kB. Every chunk then starts on fresh pages, and each of their first touches is a page
fault. On a virtual machine that is expensive: on this project's 2-core benchmark machine a copy
of a 7.7 MB array cost 4.4 ms in the pipeline against 0.23 ms into reused memory, and page
faults were a third of the preprocessing pass.

:func:`keep_freed_memory` sets malloc's ``mmap`` threshold to its maximum (32 MiB) and its trim
threshold to 1 GiB, so blocks up to 32 MiB come from the heap and freed ones are reused by the
next chunk. Measured on the 64-channel, 300 s drift benchmark: the preprocessing pass took
8.6-12.3 s before and 6.7-7.2 s after with 2 worker processes (16.8 -> 12.0 s in one process),
the whole sort 64-68 s before and 53-57 s after, with the same sorting. The cost is
that a process keeps up to 1 GiB it freed at the top of its heap until it exits (the benchmark
records the peak memory). Worker processes forked afterwards inherit the setting. Elsewhere than
Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

#: mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Freed memory at the top of the heap that malloc keeps instead of returning it.
TRIM_THRESHOLD = 1024 * 1024 * 1024

_done = False


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve blocks up to 32 MiB from its heap and keep up to 1 GiB freed.

    Idempotent; returns True when the setting is in effect (Linux with glibc), False elsewhere.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        logger.debug("mallopt refused the thresholds: malloc left as it was")
        return False
    _done = True
    return True
