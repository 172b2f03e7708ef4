"""Event extraction: schema, geometry, resampling, labels, determinism, streaming, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from spikevault.extract import (
    ExtractParams,
    check_recording,
    extract_events,
    iter_event_blocks,
    load_recording,
    neighbour_table,
    preprocess,
)
from spikevault.schema import DEFAULT_SCHEMA, concat_blocks


@pytest.fixture(scope="module")
def small_events(small_recording):
    rec, gt = small_recording
    return extract_events(rec, recording_id="small", sorting=gt, label_source="ground_truth")


def test_events_match_schema(small_recording, small_events):
    rec, gt = small_recording
    b = small_events
    n = DEFAULT_SCHEMA.validate_block(b)
    assert 0.7 * gt.to_spike_vector().size < n < 1.3 * gt.to_spike_vector().size
    T, K = DEFAULT_SCHEMA.num_samples, DEFAULT_SCHEMA.num_channels
    assert b["waveform"].shape == (n, T, K) and b["waveform"].dtype == np.float16
    assert b["channel_mask"].all()  # 32 channels >= K
    # peak channel first, at offset 0; neighbours sorted by distance
    np.testing.assert_array_equal(b["channel_offsets_um"][:, 0], 0)
    dist = np.linalg.norm(b["channel_offsets_um"], axis=2)
    assert np.all(np.diff(dist, axis=1) >= 0)
    # amplitude is the waveform at the peak sample on the peak channel, negative (peak_sign="neg"), in uV
    np.testing.assert_allclose(b["waveform"][:, DEFAULT_SCHEMA.nbefore, 0].astype("float32"), b["amplitude_uv"],
                               rtol=2e-3, atol=0.05)
    assert np.all(b["amplitude_uv"] < -5 * b["noise_level_uv"] * 0.99)
    assert np.all((b["noise_level_uv"] > 1) & (b["noise_level_uv"] < 20))
    assert set(b["recording_id"]) == {"small"} and set(b["label_source"]) == {"ground_truth"}
    assert set(b["probe"]) == {"linear32"}
    assert np.all(b["sampling_rate_hz"] == 30_000.0)
    assert set(b["peak_channel_id"]) <= {str(c) for c in rec.channel_ids}
    # time order: segment, sample, channel
    order = np.lexsort((b["peak_channel_id"].astype(int), b["sample_index"], b["segment"]))
    np.testing.assert_array_equal(order, np.arange(n))
    # windows fit inside the recording
    assert b["sample_index"].min() >= DEFAULT_SCHEMA.nbefore
    assert b["sample_index"].max() + DEFAULT_SCHEMA.nafter <= rec.get_num_samples(0)


def test_ground_truth_labels(small_recording, small_events):
    rec, gt = small_recording
    labels = small_events["unit_label"]
    assert (labels >= 0).mean() > 0.8
    assert set(labels[labels >= 0]) <= {int(u) for u in gt.unit_ids}
    # a labelled event lies within 0.4 ms of a spike of its unit
    for unit in np.unique(labels[labels >= 0])[:3]:
        train = gt.get_unit_spike_train(unit_id=gt.unit_ids[list(map(int, gt.unit_ids)).index(unit)])
        s = small_events["sample_index"][labels == unit]
        d = np.abs(train[np.clip(np.searchsorted(train, s), 0, len(train) - 1)] - s)
        d2 = np.abs(train[np.clip(np.searchsorted(train, s) - 1, 0, len(train) - 1)] - s)
        assert np.all(np.minimum(d, d2) <= 12)


@pytest.mark.parametrize("probe, num_channels", [("single", 1), ("tetrode", 4)])
def test_small_probes_are_masked(tiny_recording_factory, probe, num_channels):
    rec, gt = tiny_recording_factory(probe=probe, duration_s=3.0, num_units=3, seed=3)
    b = extract_events(rec, recording_id=probe, sorting=gt, label_source="ground_truth")
    n = DEFAULT_SCHEMA.validate_block(b)
    assert n > 20
    np.testing.assert_array_equal(b["channel_mask"].sum(axis=1), num_channels)
    assert b["channel_mask"][:, :num_channels].all()
    assert not b["waveform"][:, :, num_channels:].any()
    assert not b["channel_offsets_um"][:, num_channels:].any()
    assert (b["unit_label"] >= 0).mean() > 0.8


def test_neighbour_table_orders_by_distance_then_index():
    xy = np.array([[0, 0], [0, 10], [0, -10], [0, 20], [5, 0]], dtype=float)
    nb, off, mask = neighbour_table(xy, 4)
    np.testing.assert_array_equal(nb[0], [0, 4, 1, 2])  # 5 um, then a 10 um tie broken by index
    np.testing.assert_array_equal(nb[3], [3, 1, 0, 4])  # 10, 20, 20.6 um
    np.testing.assert_allclose(off[0, 1], [5, 0])
    nb, off, mask = neighbour_table(xy[:2], 4)
    np.testing.assert_array_equal(nb, [[0, 1, -1, -1], [1, 0, -1, -1]])
    np.testing.assert_array_equal(mask, [[True, True, False, False]] * 2)
    assert not off[~mask].any()
    # duplicate positions: the channel itself still comes first
    nb, _, _ = neighbour_table(np.zeros((3, 2)), 3)
    np.testing.assert_array_equal(nb[:, 0], [0, 1, 2])


@pytest.mark.parametrize("rate_hz", [20_000.0, 40_000.0])
def test_resampling_keeps_peak_at_nbefore(tiny_recording_factory, rate_hz):
    rec, gt = tiny_recording_factory(probe="linear32", duration_s=3.0, num_units=4, seed=5, sampling_rate_hz=rate_hz)
    b = extract_events(rec, recording_id="r", sorting=gt, label_source="ground_truth")
    n = DEFAULT_SCHEMA.validate_block(b)
    assert n > 20
    assert b["waveform"].shape[1] == DEFAULT_SCHEMA.num_samples
    assert np.all(b["sampling_rate_hz"] == rate_hz)
    trough = np.argmin(b["waveform"][:, :, 0].astype("float32"), axis=1)
    # upsampling can reveal a trough between two original samples: one canonical sample away
    assert np.mean(trough == DEFAULT_SCHEMA.nbefore) > 0.8
    assert np.all(np.abs(trough - DEFAULT_SCHEMA.nbefore) <= 1)
    # sample_index stays at the original rate
    assert b["sample_index"].max() < rec.get_num_samples(0)
    # the value at nbefore is the original (filtered) sample value
    pp = preprocess(rec, ExtractParams())
    ch = rec.ids_to_indices(b["peak_channel_id"][:10])
    raw = np.array([pp.get_traces(start_frame=s, end_frame=s + 1)[0, c] for s, c in zip(b["sample_index"][:10], ch)])
    np.testing.assert_allclose(b["amplitude_uv"][:10], raw, rtol=1e-4, atol=1e-3)
    assert (b["unit_label"] >= 0).mean() > 0.8


def test_deterministic_and_streaming_equals_extract(tiny_recording_factory, tmp_path):
    rec, gt = tiny_recording_factory(probe="linear32", duration_s=3.0, num_units=5, seed=7)
    kw = dict(recording_id="det", sorting=gt, label_source="ground_truth")
    a = extract_events(rec, **kw)
    b = extract_events(rec, **kw, job_kwargs=dict(n_jobs=2), tmp_folder=tmp_path)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    blocks = list(iter_event_blocks(rec, **kw, block_size=37))
    assert all(len(x["waveform"]) == 37 for x in blocks[:-1]) and 0 < len(blocks[-1]["waveform"]) <= 37
    c = concat_blocks(blocks)
    for name in a:
        np.testing.assert_array_equal(a[name], c[name])
    assert not list(tmp_path.iterdir())  # temporary files removed


def test_params_validation_and_round_trip():
    p = ExtractParams(detect_threshold=6.0, reference="none")
    assert ExtractParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown extraction parameters"):
        ExtractParams.from_dict({"threshold": 5})
    with pytest.raises(ValueError, match="freq_min_hz"):
        ExtractParams(freq_min_hz=7000.0)
    with pytest.raises(ValueError, match="peak_sign"):
        ExtractParams(peak_sign="up")


def test_label_source_must_agree_with_sorting(tiny_recording_factory):
    rec, gt = tiny_recording_factory()
    with pytest.raises(ValueError, match="needs a sorting"):
        extract_events(rec, recording_id="x", label_source="ground_truth")
    with pytest.raises(ValueError, match="label_source='none'"):
        extract_events(rec, recording_id="x", sorting=gt)
    with pytest.raises(ValueError, match="label_source must be"):
        extract_events(rec, recording_id="x", sorting=gt, label_source="gt")


# ------------------------------------------------------------------------------------ bad input
def _numpy_recording(traces, rate_hz=30_000.0, probe=True):
    from probeinterface import generate_linear_probe
    from spikeinterface.core import NumpyRecording

    rec = NumpyRecording([np.asarray(traces, dtype="float32")], sampling_frequency=rate_hz)
    if probe:
        p = generate_linear_probe(num_elec=traces.shape[1], ypitch=25.0)
        p.set_device_channel_indices(np.arange(traces.shape[1]))
        rec.set_probe(p)
    return rec


def _noise(num_samples, num_channels=8, seed=0):
    return np.random.default_rng(seed).normal(0, 10, size=(num_samples, num_channels))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _numpy_recording(_noise(30_000), probe=False), "no channel locations"),
        (lambda: _numpy_recording(_noise(0)), "empty"),
        (lambda: _numpy_recording(_noise(600)), "too short"),
        (lambda: _numpy_recording(_noise(5_000), rate_hz=5_000.0), "unsupported sampling rate"),
        (lambda: _numpy_recording(_noise(300_000), rate_hz=300_000.0), "unsupported sampling rate"),
        (lambda: _numpy_recording(np.where(np.ones((30_000, 8)), np.nan, 0)), "NaN or infinite"),
    ],
    ids=["no-probe", "empty", "too-short", "rate-too-low", "rate-too-high", "all-nan"],
)
def test_bad_recordings_are_refused(make, match):
    rec = make()
    with pytest.raises(ValueError, match=match):
        check_recording(rec, DEFAULT_SCHEMA, ExtractParams(), recording_id="bad")
    with pytest.raises(ValueError, match=match):
        iter_event_blocks(rec, recording_id="bad")  # raises at the call, before iteration


def test_nan_outside_sampled_chunks_is_caught_during_extraction():
    traces = _noise(90_000)
    traces[45_000:45_010, 3] = np.inf
    rec = _numpy_recording(traces)
    with pytest.raises(ValueError, match="recording 'bad' contains NaN or infinite samples"):
        extract_events(rec, recording_id="bad")


def test_pure_noise_gives_an_empty_valid_block():
    rec = _numpy_recording(_noise(60_000, seed=1))
    b = extract_events(rec, recording_id="quiet", params=ExtractParams(detect_threshold=50.0))
    assert DEFAULT_SCHEMA.validate_block(b) == 0


def test_nyquist_is_checked():
    rec = _numpy_recording(_noise(20_000), rate_hz=10_000.0)
    with pytest.raises(ValueError, match="Nyquist"):
        check_recording(rec, DEFAULT_SCHEMA, ExtractParams(), recording_id="lowrate")


@pytest.mark.filterwarnings("ignore:The extractor is not serializable")
def test_load_recording(tiny_recording_factory, tmp_path):
    rec, _ = tiny_recording_factory()
    assert load_recording(rec) is rec
    saved = rec.save(folder=tmp_path / "rec", n_jobs=1, progress_bar=False)
    loaded = load_recording(tmp_path / "rec")
    assert loaded.get_num_channels() == saved.get_num_channels()
    np.testing.assert_array_equal(loaded.get_traces(end_frame=100), rec.get_traces(end_frame=100))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recording(tmp_path / "missing")
    (tmp_path / "garbage.nwb").write_bytes(b"not an nwb file")
    with pytest.raises(ValueError, match="garbage.nwb"):
        load_recording(tmp_path / "garbage.nwb")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="not recognised"):
        load_recording(tmp_path / "empty_dir")


def test_float32_bandpass_matches_spikeinterface_and_survives_pickling():
    import pickle

    import spikeinterface.preprocessing as spre
    from spikeinterface.core import load

    from spikevault.filters import Float32BandpassRecording, bandpass_float32
    from spikevault.synth import generate_recording

    rec, _ = generate_recording(probe="tetrode", duration_s=2.0, num_units=2, seed=5)
    reference = spre.bandpass_filter(rec, 300, 6000, dtype="float32").get_traces()
    fast = bandpass_float32(rec, 300, 6000)
    assert fast.segments[0].coeff.dtype == np.float32
    assert np.max(np.abs(fast.get_traces() - reference)) < 0.01
    for copy in (pickle.loads(pickle.dumps(fast)), load(fast.to_dict())):  # worker processes rebuild it
        assert isinstance(copy, Float32BandpassRecording) and copy.segments[0].coeff.dtype == np.float32
        assert np.array_equal(copy.get_traces(), fast.get_traces())


@pytest.mark.parametrize("num_channels", [1, 4, 64])
@pytest.mark.parametrize("dtype", ["float32", "int16", "float64"])
def test_numba_sosfiltfilt_is_scipys_bit_for_bit(num_channels, dtype):
    from scipy.signal import butter, sosfiltfilt

    from spikevault.filters import sosfiltfilt_float32

    sos = butter(5, [300, 6000], btype="bandpass", fs=30_000, output="sos").astype(np.float32)
    x = (np.random.default_rng(num_channels).standard_normal((3_000, num_channels)) * 50).astype(dtype)
    expected = sosfiltfilt(sos, x, axis=0)  # float32 (float64 for float64 traces)
    got = sosfiltfilt_float32(sos, x)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert np.array_equal(sosfiltfilt_float32(sos, x[:, ::-1]), sosfiltfilt(sos, x[:, ::-1], axis=0))  # strided
    short = x[:34]  # SciPy's padding is 33 samples: the shortest chunk it filters
    assert np.array_equal(sosfiltfilt_float32(sos, short), sosfiltfilt(sos, short, axis=0))
    with pytest.raises(ValueError, match="padlen"):
        sosfiltfilt_float32(sos, x[:33])


def test_float32_bandpass_chunks_are_spikeinterfaces_filter_bit_for_bit():
    from spikeinterface.preprocessing.filter import FilterRecordingSegment

    from spikevault.filters import bandpass_float32
    from spikevault.synth import generate_recording

    rec, _ = generate_recording(probe="linear32", duration_s=1.0, num_units=3, seed=2)
    segment = bandpass_float32(rec, 300, 6000).segments[0]
    for start, end, channels in ((0, 30_000, slice(None)), (1_000, 4_000, [3, 7, 8]), (29_000, 30_000, slice(None))):
        fast = segment.get_traces(start, end, channels)
        scipy_path = FilterRecordingSegment.get_traces(segment, start, end, channels)
        assert fast.dtype == np.float32 and np.array_equal(fast, scipy_path)


def test_fast_median_reference_equals_spikeinterface_cmr():
    import pickle

    import spikeinterface.preprocessing as spre
    from spikeinterface.core import load

    from spikevault.filters import FastMedianReferenceRecording, common_median_reference, fast_median
    from spikevault.synth import generate_recording

    rng = np.random.default_rng(0)
    for n_channels in (7, 8, 64):  # odd and even counts: the even median is the mean of two values
        x = rng.standard_normal((500, n_channels)).astype(np.float32)
        assert np.array_equal(fast_median(x, axis=1, keepdims=True), np.median(x, axis=1, keepdims=True))
        assert np.array_equal(fast_median(x, axis=1), np.median(x, axis=1))
    x[3, 5] = np.nan  # falls back to numpy (NaN propagates as in np.median)
    assert np.isnan(fast_median(x, axis=1)[3]) and np.isnan(np.median(x, axis=1)[3])

    rec, _ = generate_recording(probe="linear32", duration_s=2.0, num_units=3, seed=5)
    reference = spre.common_reference(rec, reference="global", operator="median").get_traces()
    fast = common_median_reference(rec)
    assert np.array_equal(fast.get_traces(), reference)
    for copy in (pickle.loads(pickle.dumps(fast)), load(fast.to_dict())):  # worker processes rebuild it
        assert isinstance(copy, FastMedianReferenceRecording)
        assert np.array_equal(copy.get_traces(start_frame=100, end_frame=900), reference[100:900])


_NUMBA_CACHE_PROBE = """
import json
import numpy as np
from spikeinterface.core import NumpySorting, sorting_tools
from spikeinterface.sortingcomponents.peak_detection import locally_exclusive
from spikevault.extract import extract_events
from spikevault.synth import generate_recording
rec, _ = generate_recording(probe="linear32", duration_s=1.0, num_units=3, seed=0)
events = extract_events(rec, recording_id="jit", job_kwargs={"n_jobs": 1})
spike_samples = events["sample_index"]
sorting = NumpySorting.from_samples_and_labels([spike_samples], [np.arange(len(spike_samples)) % 3], 30000.0)
sorting.get_spike_vector_to_indices()  # a kernel SpikeInterface jits on first use (lazy getter)
stats = locally_exclusive.detect_peaks_numba_locally_exclusive_on_chunk.stats
lazy = sorting_tools.get_numba_vector_to_list_of_spiketrain().stats
print(json.dumps({"events": len(events["waveform"]), "hits": sum(stats.cache_hits.values()),
                  "misses": sum(stats.cache_misses.values()), "lazy_hits": sum(lazy.cache_hits.values()),
                  "lazy_misses": sum(lazy.cache_misses.values())}))
"""


def test_the_detector_kernel_is_compiled_once_then_read_from_numba_cache(tmp_path):
    """A new process reuses the compiled peak detector, and a kernel SpikeInterface only builds on
    first use, from numba's on-disk cache."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _NUMBA_CACHE_PROBE], env=env, capture_output=True, text=True,
                             check=True, cwd=os.getcwd())
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["events"] > 0 and runs[0]["events"] == runs[1]["events"]
    assert runs[0]["misses"] >= 1 and runs[0]["hits"] == 0  # compiled, and written to the cache
    assert any((tmp_path / "numba").rglob("*detect_peaks_numba_locally_exclusive_on_chunk*.nbi"))
    assert runs[1]["hits"] >= 1 and runs[1]["misses"] == 0  # the second process read it back
    assert runs[0]["lazy_misses"] >= 1 and runs[1]["lazy_hits"] >= 1 and runs[1]["lazy_misses"] == 0


def test_one_pass_scale_equals_spikeinterface_scale():
    import pickle

    import spikeinterface.preprocessing as spre
    from spikeinterface.core import load

    from spikevault.filters import OnePassScaleRecording
    from spikevault.synth import generate_recording

    rec, _ = generate_recording(probe="linear32", duration_s=1.0, num_units=3, seed=5)
    as_int16 = spre.scale(rec, gain=7.3, dtype="int16")
    some = rec.channel_ids[3:11]
    # int16 -> float32 (the sort's cache read back), float32 -> int16 (writing it), an offset,
    # float64 traces (converted to float32 first, as SpikeInterface does)
    cases = [(as_int16, 0.137, 0.0, "float32"), (rec, 7.3, 0.0, "int16"), (as_int16, 0.137, 2.5, "float32"),
             (spre.scale(rec, gain=1.0, dtype="float64"), 0.5, 0.0, "float32"),
             (rec, np.linspace(0.5, 2.0, 32), np.linspace(-3.0, 3.0, 32), "float32")]  # gains, offsets per channel
    for source, gain, offset, dtype in cases:
        fast = OnePassScaleRecording(source, gain=gain, offset=offset, dtype=dtype)
        reference = spre.scale(source, gain=gain, offset=offset, dtype=dtype)
        for kw in ({}, {"channel_ids": some, "start_frame": 100, "end_frame": 2000}):
            got, want = fast.get_traces(**kw), reference.get_traces(**kw)
            assert got.dtype == want.dtype and np.array_equal(got, want)
    for copy in (pickle.loads(pickle.dumps(fast)), load(fast.to_dict())):  # worker processes rebuild it
        assert isinstance(copy, OnePassScaleRecording) and np.array_equal(copy.get_traces(), fast.get_traces())


def test_keep_freed_memory_is_in_effect_on_linux_and_idempotent():
    import sys

    from spikevault.malloc import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first
    if sys.platform.startswith("linux"):
        import platform

        assert first is (platform.libc_ver()[0] == "glibc")
    buffers = [np.ones(2_000_000, dtype=np.float32) for _ in range(3)]  # 8 MB blocks, now from the heap
    assert all(float(b.sum()) == 2_000_000 for b in buffers)


def test_local_whitening_matrix_is_spikeinterfaces():
    from spikeinterface.core import generate_ground_truth_recording
    from spikeinterface.preprocessing import scale, whiten

    from spikevault.filters import local_whitening_matrix, whitening_blocks

    for channels, blocked in ((96, True), (8, False)):  # 20 um pitch: 100 um reaches 10 of 96
        rec, _ = generate_ground_truth_recording(durations=[2.0], num_channels=channels, num_units=4, seed=0)
        rec.set_channel_locations(np.c_[np.zeros(channels), 20.0 * np.arange(channels)])
        for gain in (1.0, 1e-6):  # microvolts; volts (SpikeInterface regularises by the median square)
            scaled = scale(rec, gain=gain, dtype="float32")
            mine = local_whitening_matrix(scaled, 100.0, seed=0)
            theirs = np.asarray(whiten(scaled, mode="local", radius_um=100.0, seed=0)._kwargs["W"])
            # the covariance summed chunk by chunk: float32 rounding apart, the same matrix
            assert np.array_equal(mine != 0, theirs != 0)
            assert np.max(np.abs(mine - theirs)) <= 1e-4 * np.max(np.abs(theirs))
        # its blocks carry every nonzero term: their products are the dense one's
        blocks = whitening_blocks(mine)
        assert (blocks is not None) == blocked
        if blocked:
            x = np.random.default_rng(0).standard_normal((500, channels)).astype(np.float32)
            out = np.zeros((500, channels), dtype=np.float32)
            for columns, rows, block in blocks:
                out[:, columns] = x[:, rows] @ block
            assert np.max(np.abs(out - x @ mine)) <= 1e-4 * np.max(np.abs(x @ mine))


@pytest.mark.parametrize("channels", [33, 32, 3])  # odd, even (median of two middle values), no reference
def test_quantise_recording_is_clip_then_int16_scaling_bit_for_bit(channels):
    from spikeinterface.core import NumpyRecording
    from spikeinterface.preprocessing import clip

    from spikevault.extract import MIN_CHANNELS_FOR_CMR
    from spikevault.filters import (OnePassScaleRecording, QuantiseRecording, bandpass_float32,
                                    common_median_reference)

    rng = np.random.default_rng(channels)
    raw = (rng.standard_normal((60_000, channels)) * 10).astype(np.float32)
    raw[30_000, 1] = 1e5  # beyond the limit: clipped, not wrapped around
    raw[40_000, 2] = -1e5
    rec = bandpass_float32(NumpyRecording(raw, 30_000.0), 300.0, 6000.0)
    if channels >= MIN_CHANNELS_FOR_CMR:
        rec = common_median_reference(rec)
    step = 10.0 / 64
    limit = 32_000 * step
    want = OnePassScaleRecording(clip(rec, a_min=-limit, a_max=limit), gain=1.0 / step, dtype="int16")
    got = QuantiseRecording(rec, step=step, limit=limit)
    assert (got.segments[0].median_of is not None) == (channels >= MIN_CHANNELS_FOR_CMR)
    for start, end in ((0, 30_000), (29_990, 45_000), (59_000, 60_000)):
        a, b = want.get_traces(start_frame=start, end_frame=end), got.get_traces(start_frame=start, end_frame=end)
        assert b.dtype == np.int16 and np.array_equal(a, b)
    full = got.get_traces()
    assert full.max() == 32_000 and full.min() == -32_000
    assert np.array_equal(got.get_traces(start_frame=0, end_frame=100, channel_ids=[1, 2]),
                          want.get_traces(start_frame=0, end_frame=100, channel_ids=[1, 2]))


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_mad_noise_levels_are_spikeinterfaces_bit_for_bit(dtype):
    from spikeinterface.core import NumpyRecording, get_noise_levels

    from spikevault.filters import mad_noise_levels

    rng = np.random.default_rng(1)
    for channels in (1, 4, 33):
        rec = NumpyRecording((rng.standard_normal((40_000, channels)) * 7).astype(dtype), 30_000.0)
        for chunks, size in ((20, 1001), (4, 10_000)):  # odd and even chunk lengths
            want = get_noise_levels(rec, return_in_uV=False, method="mad", force_recompute=True, n_jobs=1,
                                    random_slices_kwargs=dict(num_chunks_per_segment=chunks, chunk_size=size, seed=0))
            for threads in (1, 2):
                got = mad_noise_levels(rec, chunks, size, seed=0, n_threads=threads)
                assert got.dtype == want.dtype and np.array_equal(got, want)
        assert np.array_equal(rec.get_property("noise_level_mad_raw"), got)


def test_thread_map_gives_the_serial_results_in_order():
    import threading

    from spikevault.threads import thread_map

    seen = set()

    def square(x):
        seen.add(threading.get_ident())
        return x * x

    assert thread_map(square, range(50), 1) == [x * x for x in range(50)]
    assert seen == {threading.get_ident()}  # one thread: this one
    assert thread_map(square, iter(range(50)), 3) == [x * x for x in range(50)]
    assert thread_map(square, [7], 4) == [49] and thread_map(square, [], 4) == []
