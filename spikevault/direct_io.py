"""Binary recordings read around the page cache (``O_DIRECT``).

A sort or a corpus build reads each raw recording once, front to back, in chunks. Through
SpikeInterface's memory map, every chunk of a file not already in the page cache is first copied
into newly allocated cache pages. On the virtual machines these benchmarks run on, a newly
allocated page is expensive (the host backs it on first touch), and cached file pages are handed
back to the host after 20-60 s unused (DAMON's page-out). The same read of drift64's 2.3 GB then
cost 2.8 s of both cores when the file was out of the cache and 0.2 s when it was in, depending on
how long ago it was last read. Read with ``O_DIRECT``, the disk writes straight into the chunk's
own buffer: 1.3 s of waiting and 0.2 s of CPU. A one-pass read of a recording larger than the RAM
no longer evicts everything else either.

:class:`DirectReadRecording` wraps a binary-compatible recording (SpikeInterface's
``is_binary_compatible()``: binary files and folders, time along the first axis) and returns the
same traces, bit for bit:

- a chunk mostly in the page cache already (``mincore``: ``MIN_RESIDENT_FRACTION``) is read from
  it, through the parent's memory map, as before;
- any other is read with ``O_DIRECT`` into an aligned buffer;
- each process reads its next chunk ahead in a thread once its requests advance by a steady
  stride (:class:`_ReadAhead`), so the disk works while the chunk before is filtered.

Where the file system refuses ``O_DIRECT`` (tmpfs, some network file systems) or the platform has
none, it reads through the parent recording. drift64's cache pass alone (the sort's only read of
the raw file): 3.3-4.0 s against 4.9-5.3 s with the file out of the page cache, 3.3-3.4 s either
way with it in.
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np
from spikeinterface.preprocessing.basepreprocessor import BasePreprocessor, BasePreprocessorSegment

#: Offsets, lengths and buffers aligned to this many bytes (the largest logical block size in use).
ALIGNMENT = 4096
#: A chunk this much in the page cache already is read from it (through the parent's memory map).
MIN_RESIDENT_FRACTION = 0.9


def direct_readable(recording) -> bool:
    """Whether :class:`DirectReadRecording` can read ``recording``'s files directly: a binary-compatible
    recording with time along the first axis, on a platform with ``O_DIRECT``."""
    if not hasattr(os, "O_DIRECT") or not recording.is_binary_compatible():
        return False
    description = recording.get_binary_description()
    return description["time_axis"] == 0 and len(description["file_paths"]) == recording.get_num_segments()


class DirectReadRecording(BasePreprocessor):
    """``recording`` (binary-compatible, see :func:`direct_readable`) with its traces read by
    ``O_DIRECT``: the same values, no page cache."""

    def __init__(self, recording):
        if not direct_readable(recording):
            raise ValueError(f"{recording} is not a binary recording with time along its first axis: it cannot be "
                             "read directly; read it as it is")
        super().__init__(recording)
        description = recording.get_binary_description()
        for path, segment in zip(description["file_paths"], recording.segments):
            self.add_recording_segment(_DirectReadSegment(segment, path, description["dtype"],
                                                          description["num_channels"], description["file_offset"]))
        self._kwargs = {"recording": recording}


class _DirectReadSegment(BasePreprocessorSegment):
    def __init__(self, parent_segment, path, dtype, num_channels: int, file_offset: int):
        super().__init__(parent_segment)
        self.dtype = np.dtype(dtype)
        self.num_channels = int(num_channels)
        self.file_offset = int(file_offset)
        self.path = str(path)
        self.fd = None  # None: read through the parent
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # the file system does not take O_DIRECT
            pass
        self._opened = self.fd  # closed with the segment (self.fd may give up on it before)
        self._read_ahead = _ReadAhead(self._read, self.get_num_samples())

    def get_traces(self, start_frame, end_frame, channel_indices):
        start_frame = 0 if start_frame is None else int(start_frame)
        end_frame = self.get_num_samples() if end_frame is None else int(end_frame)
        traces = None
        if self.fd is not None and end_frame > start_frame:
            traces = self._read_ahead.take(start_frame, end_frame)
            if traces is None:
                traces = self._read(start_frame, end_frame)
        if traces is None:
            return self.parent_recording_segment.get_traces(start_frame, end_frame, channel_indices)
        return traces if channel_indices is None else traces[:, channel_indices]

    def _read(self, start_frame: int, end_frame: int) -> np.ndarray | None:
        """The traces ``[start_frame, end_frame)``, or None when this file is to be read through the
        parent (no ``O_DIRECT``, or a read it refused). Called from the read-ahead thread too."""
        fd = self.fd
        if fd is None:
            return None
        frame_bytes = self.num_channels * self.dtype.itemsize
        first = self.file_offset + start_frame * frame_bytes
        last = self.file_offset + end_frame * frame_bytes
        if _resident_fraction(fd, first, last) >= MIN_RESIDENT_FRACTION:
            return self.parent_recording_segment.get_traces(start_frame, end_frame, None)
        begin = first - first % ALIGNMENT
        size = -(-(last - begin) // ALIGNMENT) * ALIGNMENT
        raw = np.empty(size + ALIGNMENT, dtype=np.uint8)
        shift = -raw.ctypes.data % ALIGNMENT
        buffer = raw[shift:shift + size]
        done = 0
        try:
            while done < last - begin:
                n = os.preadv(fd, [buffer[done:]], begin + done)
                if n <= 0:
                    break
                done += n
        except OSError:  # an alignment this file system does not take: read through the parent from now on
            self.fd = None
            return None
        if done < last - begin:
            raise OSError(f"{self.path}: {last - begin - done} bytes missing at offset {begin + done} (file truncated?)")
        return np.ndarray((end_frame - start_frame, self.num_channels), dtype=self.dtype, buffer=buffer,
                          offset=first - begin)

    def __del__(self):
        if getattr(self, "_opened", None) is not None:
            try:
                os.close(self._opened)
            except OSError:
                pass


class _ReadAhead:
    """Reads the chunk a process will most likely ask for next while it computes the current one.

    SpikeInterface's workers each take the next chunk of a pass when they finish one, so a
    worker's requests mostly advance by a constant stride (the chunk length times the number of
    workers). Once two consecutive requests confirm a stride, the chunk one stride further is read
    in a background thread; a request for exactly that range takes it, any other reads on its own.
    A wrong guess costs only the disk's time. The state is per process: a forked worker starts
    afresh, with a thread of its own."""

    def __init__(self, read, num_samples: int):
        self.read = read
        self.num_samples = int(num_samples)
        self.pid = None

    def _start(self):
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.last_start = self.stride = None
        self.pending = None  # ((start, end), future)
        self.executor = None

    def take(self, start: int, end: int) -> np.ndarray | None:
        """The traces ``[start, end)`` when they were read ahead (None otherwise); reads the next guess ahead."""
        if self.pid != os.getpid():
            self._start()
        with self.lock:
            pending, self.pending = self.pending, None
            stride = None if self.last_start is None else start - self.last_start
            confirmed = stride is not None and stride > 0 and stride == self.stride
            self.last_start, self.stride = start, stride
            if confirmed and start + stride < self.num_samples:
                if self.executor is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spikevault-read-ahead")
                guess = (start + stride, min(end + stride, self.num_samples))
                self.pending = (guess, self.executor.submit(self.read, *guess))
        if pending is None or pending[0] != (start, end):
            return None
        try:
            return pending[1].result()
        except OSError:
            return None


def _resident_fraction(fd: int, first: int, last: int) -> float:
    """The fraction of the file's bytes ``[first, last)`` in the page cache (``mincore`` on a
    mapping of them: no page is read or faulted in); 0 where it cannot be told."""
    import ctypes
    import mmap

    begin = first - first % mmap.ALLOCATIONGRANULARITY
    length = last - begin
    try:
        with mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=begin) as mapping:
            view = np.frombuffer(mapping, dtype=np.uint8)
            pages = np.zeros(-(-length // mmap.PAGESIZE), dtype=np.uint8)
            failed = _libc().mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(length),
                                     ctypes.c_void_p(pages.ctypes.data))
            del view
    except (OSError, ValueError, AttributeError):
        return 0.0
    return 0.0 if failed else float(np.mean(pages & 1))


@functools.cache
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)
