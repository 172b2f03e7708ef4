"""Binary recordings read around the page cache (:mod:`spikevault.direct_io`)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from spikevault import direct_io
from spikevault.direct_io import DirectReadRecording, direct_readable


def _binary(folder, num_samples=50_000, num_channels=7, dtype="int16", file_offset=0, segments=1, time_axis=0):
    """A binary recording of random traces (with a header of ``file_offset`` bytes) and its traces."""
    from spikeinterface.core import BinaryRecordingExtractor

    rng = np.random.default_rng(3)
    paths, traces = [], []
    for s in range(segments):
        data = rng.integers(-3000, 3000, size=(num_samples + 101 * s, num_channels)).astype(dtype)
        path = folder / f"seg{s}.raw"
        with open(path, "wb") as f:
            f.write(b"h" * file_offset)
            f.write((data if time_axis == 0 else data.T).tobytes())
        paths.append(path)
        traces.append(data)
    rec = BinaryRecordingExtractor(paths, sampling_frequency=30_000.0, dtype=dtype, num_channels=num_channels,
                                   file_offset=file_offset, time_axis=time_axis, gain_to_uV=0.195, offset_to_uV=0.0)
    return rec, traces


def _direct_or_skip(rec):
    direct = DirectReadRecording(rec)
    if any(segment.fd is None for segment in direct.segments):
        pytest.skip("this file system does not take O_DIRECT")
    return direct


@pytest.mark.parametrize("resident", ["never", "always"])
def test_direct_reads_are_the_binary_recordings_traces(tmp_path, monkeypatch, resident):
    # a 10-byte header and 7 int16 channels: no read starts on an aligned offset
    rec, traces = _binary(tmp_path, file_offset=10, segments=2)
    direct = _direct_or_skip(rec)
    # 'never': every chunk read with O_DIRECT; 'always': every chunk through the parent's memory map
    monkeypatch.setattr(direct_io, "MIN_RESIDENT_FRACTION", 2.0 if resident == "never" else 0.0)
    for segment_index, expected in enumerate(traces):
        n = len(expected)
        for start, end in [(0, n), (0, 1), (n - 1, n), (12_345, 23_456), (4_000, 4_681), (None, None)]:
            got = direct.get_traces(segment_index=segment_index, start_frame=start, end_frame=end)
            assert got.dtype == np.int16
            np.testing.assert_array_equal(got, expected[start:end])
        got = direct.get_traces(segment_index=segment_index, start_frame=100, end_frame=200,
                                channel_ids=direct.channel_ids[[5, 1]])
        np.testing.assert_array_equal(got, expected[100:200, [5, 1]])
        scaled = direct.get_traces(segment_index=segment_index, start_frame=0, end_frame=50, return_in_uV=True)
        np.testing.assert_array_equal(scaled, rec.get_traces(segment_index=segment_index, start_frame=0, end_frame=50,
                                                             return_in_uV=True))


def test_direct_read_of_a_chunk_out_of_the_page_cache_uses_no_cache(tmp_path):
    rec, traces = _binary(tmp_path, num_samples=200_000, num_channels=32, dtype="float32")
    direct = _direct_or_skip(rec)
    segment = direct.segments[0]
    with open(segment.path, "rb+") as f:  # the file written out, then out of the page cache
        os.fsync(f.fileno())
    os.posix_fadvise(segment.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    frame = 32 * 4
    if direct_io._resident_fraction(segment.fd, 0, 200_000 * frame) > 0.5:
        pytest.skip("this system keeps the file in its page cache")
    got = direct.get_traces(start_frame=1_000, end_frame=101_000)
    np.testing.assert_array_equal(got, traces[0][1_000:101_000])
    # read around the cache: it still does not hold the chunk
    assert direct_io._resident_fraction(segment.fd, 1_000 * frame, 101_000 * frame) < 0.5


def test_workers_chunks_are_read_ahead_by_their_stride(tmp_path, monkeypatch):
    rec, traces = _binary(tmp_path, num_samples=100_000, dtype="float32")
    direct = _direct_or_skip(rec)
    monkeypatch.setattr(direct_io, "MIN_RESIDENT_FRACTION", 2.0)
    ahead = direct.segments[0]._read_ahead
    taken = []
    take = ahead.take
    monkeypatch.setattr(ahead, "take", lambda start, end: taken.append(take(start, end)) or taken[-1])
    chunk, margin = 5_000, 300
    for k in [0, 2, 4, 6, 8, 9, 11, 13, 15]:  # one worker's chunks of a two-worker pass, an uneven turn at 9
        start, end = max(k * chunk - margin, 0), min((k + 1) * chunk + margin, 100_000)
        np.testing.assert_array_equal(direct.get_traces(start_frame=start, end_frame=end), traces[0][start:end])
    read_ahead = [t is not None for t in taken]
    # 2 and 4 give the stride (0 starts clipped), 6 confirms it: 8 comes read ahead; the turn at 9 breaks
    # it, 11 and 13 confirm it again: 15 comes read ahead
    assert read_ahead == [False, False, False, False, True, False, False, False, True]


def test_read_ahead_state_starts_afresh_in_a_forked_worker(tmp_path, monkeypatch):
    rec, traces = _binary(tmp_path, dtype="float32")
    direct = _direct_or_skip(rec)
    monkeypatch.setattr(direct_io, "MIN_RESIDENT_FRACTION", 2.0)
    for start in (0, 1_000, 2_000):  # the parent reads ahead 3,000-3,500
        direct.get_traces(start_frame=start, end_frame=start + 500)
    assert direct.segments[0]._read_ahead.pending is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child takes nothing of the parent's: its own reads, its own thread
        try:
            got = direct.get_traces(start_frame=3_000, end_frame=3_500)
            ok = np.array_equal(got, traces[0][3_000:3_500]) and direct.segments[0]._read_ahead.pending is None
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)


def test_direct_recording_serialises_and_pickles(tmp_path):
    from spikeinterface.core import load

    rec, traces = _binary(tmp_path, dtype="float32", num_channels=4)
    direct = DirectReadRecording(rec)
    for copy in (load(direct.to_dict()), pickle.loads(pickle.dumps(direct))):
        assert isinstance(copy, DirectReadRecording)
        np.testing.assert_array_equal(copy.get_traces(start_frame=10, end_frame=2_000), traces[0][10:2_000])
        assert copy.get_channel_gains().tolist() == rec.get_channel_gains().tolist()


def test_only_binary_recordings_with_time_first_are_read_directly(tmp_path):
    from spikeinterface.core import NumpyRecording

    rec, _ = _binary(tmp_path)
    assert direct_readable(rec)
    channels_first, _ = _binary(tmp_path, time_axis=1)
    assert not direct_readable(channels_first)
    in_memory = NumpyRecording([np.zeros((100, 3), "float32")], 30_000.0)
    assert not direct_readable(in_memory)
    with pytest.raises(ValueError, match="cannot be read directly"):
        DirectReadRecording(in_memory)


def test_a_file_system_without_o_direct_reads_through_the_parent(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    rec, traces = _binary(tmp_path)
    monkeypatch.setattr(os, "open", refuse_direct)
    direct = DirectReadRecording(rec)
    assert direct.segments[0].fd is None
    np.testing.assert_array_equal(direct.get_traces(start_frame=5, end_frame=905), traces[0][5:905])


def test_a_read_o_direct_refuses_falls_back_to_the_parent(tmp_path, monkeypatch):
    rec, traces = _binary(tmp_path, dtype="float32")
    direct = _direct_or_skip(rec)
    monkeypatch.setattr(direct_io, "MIN_RESIDENT_FRACTION", 2.0)
    real_preadv = os.preadv
    calls = []

    def refuse(fd, buffers, offset, *args):
        calls.append(offset)
        if len(calls) > 3:  # the fourth read on: refused, as a file system with other alignment rules would
            raise OSError(22, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", refuse)
    for start in range(0, 10_000, 1_000):  # a stride: reads ahead in the thread too
        np.testing.assert_array_equal(direct.get_traces(start_frame=start, end_frame=start + 500),
                                      traces[0][start:start + 500])
    segment = direct.segments[0]
    assert segment.fd is None and segment._opened is not None  # through the parent; closed with the segment


def test_preprocessing_reads_binary_recordings_directly(tmp_path):
    from spikevault.extract import ExtractParams, preprocess

    rec, _ = _binary(tmp_path, num_channels=8)
    pre = preprocess(rec, ExtractParams())

    def chain(r):
        while r is not None:
            yield r
            r = getattr(r, "_parent", None)

    assert any(isinstance(r, DirectReadRecording) for r in chain(pre))
    expected = preprocess(rec, ExtractParams(), read_directly=False)
    assert not any(isinstance(r, DirectReadRecording) for r in chain(expected))
    np.testing.assert_array_equal(pre.get_traces(start_frame=1_000, end_frame=20_000),
                                  expected.get_traces(start_frame=1_000, end_frame=20_000))
