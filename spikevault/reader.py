"""Streaming reader used by training: :class:`EventStream`, and :func:`load_events` for small use.

How an epoch is cut (all of it a pure function of ``(seed, epoch, rank, world_size)``):

1. The *blocks* of the split (tar samples of ~1,024 events, or Parquet row groups) are listed
   from the manifest and, when shuffling, permuted with ``rng(seed, epoch)``.
2. The permuted event sequence is cut into ``world_size`` contiguous slots of exactly
   ``N // world_size`` events, so every rank yields exactly :attr:`EventStream.batches_per_epoch`
   batches (uneven batch counts hang DDP; see NOTES.md). A block on a slot boundary is read by
   both neighbours, each taking its part; at most ``world_size - 1`` events per epoch are left
   out, different ones each epoch.
3. A rank's slot is cut into *windows* of ``shuffle_buffer`` events (rounded up to whole
   batches). A window's events are read block by block (random access, only the requested
   fields), permuted with ``rng(seed, epoch, rank, window)`` and yielded as consecutive batches.
4. DataLoader workers take windows round-robin (worker ``w`` of ``W``: windows ``w, w+W, ...``).
   The DataLoader interleaves workers round-robin, so the rank's batch sequence is fixed for a
   given number of workers, and :meth:`EventStream.load_state_dict` can resume it exactly: each
   worker skips the batches already consumed and the worker roles are rotated so the batch
   that comes next is the one an uninterrupted run would have yielded.

All work is on whole numpy blocks; there is no per-event Python.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .manifest import load_manifest, manifest_schema, resolve_format, select_shards
from .schema import EventSchema
from .shards import ShardReader

logger = logging.getLogger(__name__)

DEFAULT_FIELDS = ("waveform", "channel_offsets_um", "channel_mask", "unit_label")
_STATE_VERSION = 1
_MAX_OPEN_SHARDS = 16

try:  # IterableDataset base when torch is present; EventStream still works as a plain iterable.
    from torch.utils.data import IterableDataset as _Base
except ImportError:  # pragma: no cover
    _Base = object


def _round_robin_roles(counts: Sequence[int]) -> Iterator[int]:
    """Roles in the order a DataLoader yields them: cycle over workers, skipping exhausted ones."""
    left = list(counts)
    w = 0
    W = len(left)
    while any(left):
        if left[w]:
            left[w] -= 1
            yield w
        w = (w + 1) % W


class _ShardCache:
    """A few open shards per worker (LRU)."""

    def __init__(self, root: Path, fmt: str, schema: EventSchema):
        self.root, self.fmt, self.schema = root, fmt, schema
        self.open: OrderedDict[str, ShardReader] = OrderedDict()

    def get(self, rel: str) -> ShardReader:
        r = self.open.pop(rel, None)
        if r is None:
            r = ShardReader(self.root / rel, self.fmt, self.schema)
            if len(self.open) >= _MAX_OPEN_SHARDS:
                _, old = self.open.popitem(last=False)
                old.close()
        self.open[rel] = r
        return r

    def close(self) -> None:
        for r in self.open.values():
            r.close()
        self.open.clear()


class EventStream(_Base):
    """Shuffled, node- and worker-split, resumable stream of event batches from a corpus.

    Parameters
    ----------
    corpus_dir : path
        A corpus built by ``spikevault build`` (has ``manifest.json``).
    split : {"train", "val", "test"}
    batch_size : int
        Events per yielded batch.
    shuffle_buffer : int
        Events read and shuffled together (rounded up to whole batches); 0 disables shuffling
        (blocks and events in manifest order).
    seed : int
        With the epoch, fixes every random choice.
    fields : sequence of str
        Fields to read. Numeric fields become torch tensors (``waveform`` float32 ``[B, T, K]``);
        string fields stay numpy unicode arrays.
    rank, world_size : int, optional
        This node's place; default: ``torch.distributed`` when initialised, else 0 of 1.
    num_workers_hint : int, optional
        Number of DataLoader workers, recorded in :meth:`state_dict` so that a resume with
        another number of workers fails clearly (the batch order depends on it). Batch counts
        do not depend on it.
    drop_last : bool
        Drop the last incomplete batch of the rank's slot.
    format : {"auto", "webdataset", "parquet"}
        Which shards to read; ``auto`` prefers WebDataset.
    expected_schema : EventSchema, optional
        Fail with ``SchemaMismatchError`` unless the corpus has this event schema (the model's).

    Attributes
    ----------
    schema : EventSchema
        The corpus's event schema.
    batches_per_epoch : int
        Batches every rank yields per epoch.
    num_events : int
        Events in the split.
    """

    def __init__(
        self,
        corpus_dir: str | Path,
        split: str = "train",
        batch_size: int = 256,
        shuffle_buffer: int = 8192,
        seed: int = 0,
        fields: Sequence[str] = DEFAULT_FIELDS,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers_hint: int | None = None,
        drop_last: bool = True,
        format: str = "auto",
        expected_schema: EventSchema | None = None,
    ):
        super().__init__()
        self.corpus_dir = Path(corpus_dir)
        manifest = load_manifest(self.corpus_dir)
        self.schema = manifest_schema(manifest)
        if expected_schema is not None:
            expected_schema.check_compatible(self.schema, what=f"corpus {self.corpus_dir}")
        self.format = resolve_format(manifest, format)
        known = set(self.schema.field_names())
        unknown = [f for f in fields if f not in known]
        if unknown:
            raise ValueError(f"fields {unknown} are not event fields; choose from {sorted(known)}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if rank is None or world_size is None:
            rank, world_size = _dist_rank_world(rank, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size): rank={rank}, world_size={world_size}")
        self.split, self.batch_size, self.shuffle_buffer, self.seed = split, batch_size, shuffle_buffer, seed
        self.fields = tuple(fields)
        self.rank, self.world_size = rank, world_size
        self.num_workers_hint = num_workers_hint
        self.drop_last = drop_last
        shards = select_shards(manifest, split, self.format)
        self._shard_paths = [s.path for s in shards]
        blocks = [(i, b, n) for i, s in enumerate(shards) for b, n in enumerate(s.blocks) if n]
        self._blocks = np.array([(i, b) for i, b, _ in blocks], dtype=np.int64).reshape(-1, 2)
        self._block_sizes = np.array([n for *_, n in blocks], dtype=np.int64)
        self.num_events = int(self._block_sizes.sum())
        self.events_per_rank = self.num_events // world_size
        self.window_events = max(1, math.ceil(max(shuffle_buffer, batch_size) / batch_size)) * batch_size
        if drop_last:
            self.batches_per_epoch = self.events_per_rank // batch_size
        else:
            self.batches_per_epoch = math.ceil(self.events_per_rank / batch_size)
        if self.batches_per_epoch == 0:
            logger.warning("split %r of %s has %d events: no batch of %d for %d rank(s)",
                           split, corpus_dir, self.num_events, batch_size, world_size)
        self.epoch = 0
        self._start = 0        # batches of the rank's sequence to skip at the next __iter__
        self._yielded = 0      # position of the in-process iteration (for state_dict)
        self._cache: _ShardCache | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles); resets the position to the start of that epoch."""
        self.epoch = int(epoch)
        self._start = self._yielded = 0

    def state_dict(self, batches_yielded: int | None = None) -> dict[str, Any]:
        """Position in the stream.

        With ``num_workers=0`` the stream counts the batches it yielded itself; with DataLoader
        workers, pass the number of batches this rank consumed in the current epoch.
        """
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "batches_yielded": int(self._yielded if batches_yielded is None else batches_yielded),
            "seed": self.seed, "split": self.split, "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer, "world_size": self.world_size, "rank": self.rank,
            "num_events": self.num_events, "format": self.format, "drop_last": self.drop_last,
            "num_workers": self.num_workers_hint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next batches are those an uninterrupted run yields."""
        mine = self.state_dict()
        bad = [f"{k}={state.get(k)!r} (this stream: {mine[k]!r})"
               for k in ("seed", "split", "batch_size", "shuffle_buffer", "world_size", "num_events",
                         "format", "drop_last")
               if state.get(k) != mine[k]]
        if bad:
            raise ValueError("cannot resume this EventStream from a state made with other settings: " + ", ".join(bad))
        if state.get("num_workers") is not None:
            self.num_workers_hint = state["num_workers"]
        self.epoch = int(state["epoch"])
        self._start = self._yielded = int(state["batches_yielded"])

    # ------------------------------------------------------------------ plan
    def _order(self) -> np.ndarray:
        if self.shuffle_buffer == 0:
            return np.arange(len(self._block_sizes))
        return np.random.default_rng([self.seed, self.epoch, 0x5B10C]).permutation(len(self._block_sizes))

    def _window_batches(self, num_windows: int) -> list[int]:
        sizes = [min(self.window_events, self.events_per_rank - i * self.window_events) for i in range(num_windows)]
        return [s // self.batch_size if self.drop_last else math.ceil(s / self.batch_size) for s in sizes]

    def _worker_plan(self, worker: int, num_workers: int, start: int):
        """(windows of this worker, batches of its own sequence to skip)."""
        num_windows = math.ceil(self.events_per_rank / self.window_events) if self.events_per_rank else 0
        per_window = self._window_batches(num_windows)
        counts = [sum(per_window[i] for i in range(r, num_windows, num_workers)) for r in range(num_workers)]
        consumed = [0] * num_workers
        next_role = 0
        if start:
            last = None
            for j, role in enumerate(_round_robin_roles(counts)):
                if j == start:
                    break
                consumed[role] += 1
                last = role
            # The DataLoader restarts at worker 0: rotate roles so worker 0 plays the next one.
            next_role = ((last + 1) % num_workers) if last is not None else 0
            while counts[next_role] == consumed[next_role] and any(c > k for c, k in zip(counts, consumed)):
                next_role = (next_role + 1) % num_workers
        role = (next_role + worker) % num_workers
        windows = [(i, per_window[i]) for i in range(role, num_windows, num_workers)]
        return windows, consumed[role]

    def _read_window(self, cache: _ShardCache, order: np.ndarray, cum: np.ndarray, lo: int, hi: int):
        """Events [lo, hi) of the permuted sequence (global positions) as a dict of arrays."""
        first = int(np.searchsorted(cum, lo, side="right"))
        parts = []
        pos = int(cum[first - 1]) if first else 0
        k = first
        while pos < hi:
            b = int(order[k])
            shard_i, block_i = self._blocks[b]
            n = int(self._block_sizes[b])
            block = cache.get(self._shard_paths[shard_i]).read_block(int(block_i), self.fields)
            a, z = max(lo - pos, 0), min(hi - pos, n)
            if len(block[self.fields[0]]) != n:
                raise ValueError(
                    f"shard {self._shard_paths[shard_i]} block {block_i} has {len(block[self.fields[0]])} events, "
                    f"the manifest says {n}: the corpus changed after its manifest was written; run spikevault verify"
                )
            parts.append({f: v[a:z] for f, v in block.items()})
            pos += n
            k += 1
        if len(parts) == 1:
            return parts[0]
        return {f: np.concatenate([p[f] for p in parts]) for f in self.fields}

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.num_workers_hint is not None and self._start and max(self.num_workers_hint, 1) != num_workers:
            raise ValueError(
                f"resuming a stream saved with {self.num_workers_hint} DataLoader workers with {num_workers}: "
                "the batch order depends on the number of workers; use the same num_workers"
            )
        start, self._start = self._start, 0
        self._yielded = start
        windows, skip = self._worker_plan(worker, num_workers, start)
        order = self._order()
        cum = np.cumsum(self._block_sizes[order])
        base = self.rank * self.events_per_rank
        if self._cache is None:  # open shards (and tar indexes) persist across epochs
            self._cache = _ShardCache(self.corpus_dir, self.format, self.schema)
        cache = self._cache
        B = self.batch_size
        for w, nb in windows:
            if skip >= nb:
                skip -= nb
                continue
            lo = w * self.window_events
            hi = min(lo + self.window_events, self.events_per_rank)
            data = self._read_window(cache, order, cum, base + lo, base + hi)
            n = hi - lo
            perm = None
            if self.shuffle_buffer:
                perm = np.random.default_rng([self.seed, self.epoch, self.rank, w]).permutation(n)
            for j in range(skip, nb):
                idx = perm[j * B:(j + 1) * B] if perm is not None else np.arange(j * B, min((j + 1) * B, n))
                batch = self._to_batch(data, idx, torch)
                self._yielded += 1  # counted when handed out, so state_dict() after next() includes it
                yield batch
            skip = 0

    def close(self) -> None:
        """Close the shard files this stream keeps open."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def __getstate__(self):  # DataLoader workers get a copy without open files
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def _to_batch(self, data: dict[str, np.ndarray], idx, torch) -> dict[str, Any]:
        batch = {}
        for f in self.fields:
            arr = data[f][idx]
            if arr.dtype.kind == "U":
                batch[f] = arr
            elif f == "waveform":
                batch[f] = _half_to_float(arr, torch)
            else:
                batch[f] = torch.from_numpy(np.ascontiguousarray(arr))
        return batch


_HALF_LUT = None


def _half_to_float(arr: np.ndarray, torch):
    """float16 -> float32 tensor, exactly. torch's vectorised cast when it runs single-threaded
    (DataLoader workers); else a 65,536-entry lookup table (numpy's astype is ~5x slower, and
    torch's thread pool stalls on a busy machine)."""
    global _HALF_LUT
    if torch.get_num_threads() == 1:
        return torch.from_numpy(arr).to(torch.float32)
    if _HALF_LUT is None:
        _HALF_LUT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    out = np.empty(arr.shape, dtype=np.float32)
    np.take(_HALF_LUT, arr.view(np.uint16), out=out)
    return torch.from_numpy(out)


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return (dist.get_rank() if rank is None else rank,
                    dist.get_world_size() if world_size is None else world_size)
    except ImportError:  # pragma: no cover
        pass
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


def load_events(
    corpus_dir: str | Path,
    split: str | None = None,
    fields: Sequence[str] | None = None,
    max_events: int | None = None,
    format: str = "auto",
) -> dict[str, np.ndarray]:
    """Read the events of a split (``None``: all) into one block, in manifest order.

    For validation, fine-tuning and tests; memory grows with the events read (cap it with
    ``max_events``). Fields keep their on-disk dtypes (``waveform`` float16).
    """
    corpus_dir = Path(corpus_dir)
    manifest = load_manifest(corpus_dir)
    schema = manifest_schema(manifest)
    fmt = resolve_format(manifest, format)
    names = list(fields) if fields is not None else list(schema.field_names())
    unknown = [f for f in names if f not in schema.field_names()]
    if unknown:
        raise ValueError(f"fields {unknown} are not event fields; choose from {list(schema.field_names())}")
    parts, total = [], 0
    for info in select_shards(manifest, split, fmt):
        if max_events is not None and total >= max_events:
            break
        with ShardReader(corpus_dir / info.path, fmt, schema) as r:
            for i in range(r.num_blocks):
                if max_events is not None and total >= max_events:
                    break
                block = r.read_block(i, names)
                parts.append(block)
                total += len(block[names[0]])
    if not parts:
        empty = schema.empty_block()
        return {f: empty[f] for f in names}
    out = {f: np.concatenate([p[f] for p in parts]) for f in names}
    if max_events is not None:
        out = {f: v[:max_events] for f, v in out.items()}
    return out
