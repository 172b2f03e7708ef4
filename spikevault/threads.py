"""The one way the toolkit runs blocks of work in threads."""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def thread_map(fn: Callable[[T], R], items: Iterable[T], n_threads: int) -> list[R]:
    """``[fn(x) for x in items]``, in ``n_threads`` threads when that is more than one and there is
    more than one item; the results in the items' order.

    For blocks of numpy, SciPy FFT, LAPACK-through-ctypes or torch work, which release the
    interpreter lock while they compute: each block's values are those of the serial loop."""
    items = list(items)
    if int(n_threads) > 1 and len(items) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(int(n_threads)) as pool:
            return list(pool.map(fn, items))
    return [fn(x) for x in items]
