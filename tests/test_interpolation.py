"""Motion correction with precomputed kriging kernels (inference.interpolation) against
SpikeInterface's own interpolation."""

from __future__ import annotations

import numpy as np
import pytest

FS = 30_000.0


def _recording(probe_name: str, duration_s: float, seed: int = 0):
    from spikeinterface.core import NumpyRecording

    from spikevault.synth import make_probe

    probe = make_probe(probe_name)
    rng = np.random.default_rng(seed)
    traces = rng.normal(0.0, 10.0, size=(int(duration_s * FS), probe.get_contact_count())).astype(np.float32)
    rec = NumpyRecording([traces], sampling_frequency=FS)
    rec.set_probe(probe)
    return rec


def _motion(rec, rigid: bool, bin_s: float = 0.1):
    """A zigzag displacement, one value per time bin (rigid) or varying along the probe; the
    zigzag repeats its displacements (the shared kernels)."""
    from spikeinterface.core.motion import Motion

    depth = rec.get_channel_locations()[:, 1]
    bins = np.arange(bin_s / 2, rec.get_total_duration(), bin_s)
    zigzag = np.tile([0.0, 4.5, 9.0, 13.5, 18.0, 13.5, 9.0, 4.5, 0.0, -4.5, -9.0, -4.5], len(bins))[:len(bins)]
    if rigid:
        return Motion([zigzag[:, None]], [bins], np.array([float(np.median(depth))]))
    spatial = np.linspace(depth.min(), depth.max(), 4)
    return Motion([zigzag[:, None] * (1.0 + spatial[None, :] / np.ptp(depth))], [bins], spatial)


@pytest.mark.parametrize("probe_name,rigid,border_mode", [
    ("neuropixels", False, "force_extrapolate"),
    ("dense64", True, "force_extrapolate"),
    ("dense64", True, "remove_channels"),
])
def test_kernels_and_traces_are_spikeinterfaces(probe_name, rigid, border_mode):
    from spikeinterface.preprocessing import get_spatial_interpolation_kernel
    from spikeinterface.sortingcomponents.motion import interpolate_motion

    from inference.interpolation import KRIGING_ZERO, KrigingMotionRecording, kriging_kernels

    rec = _recording(probe_name, duration_s=2.0)
    motion = _motion(rec, rigid)
    kw = dict(border_mode=border_mode, spatial_interpolation_method="kriging", sigma_um=20.0, p=2)
    theirs = interpolate_motion(rec, motion, **kw)
    ours = KrigingMotionRecording(rec, motion, **kw)
    assert ours.get_num_channels() == theirs.get_num_channels()
    assert list(ours.channel_ids) == list(theirs.channel_ids)

    # every bin's kernel, SpikeInterface's bit for bit with its weights below KRIGING_ZERO zeroed
    segment = theirs.segments[0]
    locations = rec.get_channel_locations()
    # SpikeInterface's segment evaluates the motion at the midpoints of its bins' edges
    centers = 0.5 * (segment.interpolation_time_bin_edges_s[1:] + segment.interpolation_time_bin_edges_s[:-1])
    kernels, index = kriging_kernels(locations, motion, 0, centers,
                                     channel_inds=segment.channel_inds, dtype="float32",
                                     **segment.spatial_interpolation_kwargs)
    assert len(kernels) < len(index)  # repeated displacements share a kernel
    for b, t in enumerate(centers):
        moved = locations.copy()
        moved[:, 1] += motion.get_displacement_at_time_and_depth(np.full(len(locations), t), locations[:, 1])
        if segment.channel_inds is not None:
            moved = moved[segment.channel_inds]
        expected = get_spatial_interpolation_kernel(locations, moved, method="kriging", dtype="float32",
                                                    **segment.spatial_interpolation_kwargs)
        expected[np.abs(expected) < KRIGING_ZERO] = 0
        np.testing.assert_array_equal(kernels[index[b]], expected)

    # traces: whole, and chunks that start and end inside time bins
    for start, end in [(None, None), (1234, 20_000), (7_500, 7_501), (59_000, 60_000)]:
        a = ours.get_traces(start_frame=start, end_frame=end)
        b = theirs.get_traces(start_frame=start, end_frame=end)
        assert a.dtype == b.dtype and a.shape == b.shape
        # float32 rounding: the largest difference is a few 1e-7 of the traces' largest value
        assert float(np.abs(a - b).max()) < 2e-6 * float(np.abs(b).max())
    sub = ours.get_traces(start_frame=100, end_frame=900, channel_ids=ours.channel_ids[3:9])
    np.testing.assert_array_equal(sub, ours.get_traces(start_frame=100, end_frame=900)[:, 3:9])


def test_neuropixels_kernels_are_stored_by_blocks():
    """On a 384-channel probe the kernels' zeros are skipped: the blocks cover well under half of
    each kernel."""
    from inference.interpolation import KrigingMotionRecording

    rec = _recording("neuropixels", duration_s=1.0)
    ours = KrigingMotionRecording(rec, _motion(rec, rigid=False), border_mode="force_extrapolate",
                                  spatial_interpolation_method="kriging", sigma_um=20.0, p=2)
    for dense, blocks in ours.segments[0].kernels:
        assert dense is None and blocks is not None
        covered = sum(block.size for _, _, block in blocks)
        assert covered < 0.5 * 384 * 384


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_motion_correction_written_over_the_cache_equals_the_lazy_correction(n_jobs):
    """The sort's int16 cache, corrected in place chunk by chunk (in worker processes or not),
    holds the lazily corrected traces quantised as the cache quantises: within half a step."""
    from inference.interpolation import KrigingMotionRecording
    from inference.sort import _cache, _correct_cache_in_place

    rec = _recording("dense64", duration_s=2.0)
    jk = {"n_jobs": n_jobs, "chunk_duration": "250ms", "progress_bar": False}
    cache = _cache(rec, "memory", jk)
    motion = _motion(rec, rigid=False)
    kw = dict(border_mode="force_extrapolate", spatial_interpolation_method="kriging", sigma_um=20.0, p=2)
    corrected = KrigingMotionRecording(cache, motion, **kw)
    expected = corrected.get_traces()
    step = float(np.asarray(cache._kwargs["gain"]).ravel()[0])
    assert _correct_cache_in_place(cache, corrected, jk)
    got = cache.get_traces()
    assert np.max(np.abs(got - expected)) <= 0.5 * step * (1 + 1e-4)
    assert np.allclose(got / step, np.round(got / step), atol=1e-3)  # whole steps, as cached
    assert not _correct_cache_in_place(rec, KrigingMotionRecording(rec, motion, **kw), jk)  # not a cache


def test_interpolated_events_are_those_the_corrected_traces_show():
    """The recorded events, interpolated window by window, have the waveforms, peak channels and
    amplitudes that extraction from the lazily corrected traces gives the same spikes (the same
    kernels; float16 waveforms), in time order, each within PEAK_SHIFT samples of its detection."""
    from inference.interpolation import PEAK_SHIFT, KrigingMotionRecording, interpolated_events
    from inference.sort import _cache, _cache_windows, _channel_index
    from spikevault.extract import ExtractParams, event_noise_levels, extract_events, preprocess
    from spikevault.schema import DEFAULT_SCHEMA
    from spikevault.synth import generate_recording

    raw, _ = generate_recording(probe="dense64", duration_s=6.0, num_units=6, seed=11)
    params = ExtractParams()
    jk = {"n_jobs": 1, "progress_bar": False}
    cache = _cache(preprocess(raw, params), "memory", jk)
    motion = _motion(cache, rigid=True, bin_s=1.0)
    corrected = KrigingMotionRecording(cache, motion, border_mode="force_extrapolate",
                                       spatial_interpolation_method="kriging", sigma_um=20.0, p=2)
    kw = dict(schema=DEFAULT_SCHEMA, params=params, recording_id="t", preprocessed=True, job_kwargs=jk)
    recorded = extract_events(cache, **kw)
    noise = event_noise_levels(corrected)
    got = interpolated_events(recorded, _channel_index(recorded, cache), _cache_windows(cache), corrected,
                              DEFAULT_SCHEMA, params, noise, n_threads=2)
    assert len(recorded["waveform"]) > 100 and len(got["waveform"]) == len(recorded["waveform"])  # none merged here
    shift = got["sample_index"] - recorded["sample_index"]
    assert np.all(np.abs(shift) <= PEAK_SHIFT) and np.any(shift != 0) and np.all(np.diff(got["sample_index"]) >= 0)
    assert got["waveform"].dtype == np.float16 and got["waveform"].shape == recorded["waveform"].shape
    assert np.array_equal(got["noise_level_uv"], noise[_channel_index(got, corrected)])

    want = extract_events(corrected, **kw)
    key = {(int(s), str(c)): i for i, (s, c) in enumerate(zip(want["sample_index"], want["peak_channel_id"]))}
    pairs = [(i, key[(int(s), str(c))]) for i, (s, c) in enumerate(zip(got["sample_index"], got["peak_channel_id"]))
             if (int(s), str(c)) in key]
    assert len(pairs) > 0.9 * len(want["waveform"])  # the same spike, peaking on the same contact and sample
    mine, theirs = np.array(pairs).T
    # the corrected traces change kernel at each motion bin's edge; an event's window takes its
    # peak's kernel throughout: compared where the window lies within one bin
    edges = corrected.segments[0].interpolation_time_bin_edges_s * FS
    first = got["sample_index"][mine] - DEFAULT_SCHEMA.nbefore - PEAK_SHIFT
    one_bin = np.searchsorted(edges, first, side="right") == np.searchsorted(
        edges, first + DEFAULT_SCHEMA.num_samples + 2 * PEAK_SHIFT, side="right")
    assert one_bin.mean() > 0.9
    mine, theirs = mine[one_bin], theirs[one_bin]
    scale = np.abs(want["waveform"][theirs].astype(np.float32)).max()
    diff = np.abs(got["waveform"][mine].astype(np.float32) - want["waveform"][theirs].astype(np.float32))
    assert diff.max() < 2e-3 * scale  # float16 rounding
    assert np.allclose(got["amplitude_uv"][mine], want["amplitude_uv"][theirs], rtol=1e-4, atol=1e-3)
    for field in ("channel_offsets_um", "channel_mask"):
        assert np.array_equal(got[field][mine], want[field][theirs])
