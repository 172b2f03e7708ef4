"""Wobble with its objective and set-up by FFT (inference.fast_wobble) against SpikeInterface's."""

from __future__ import annotations

import numpy as np
import pytest


def _recording_and_templates(probe="linear32", num_units=8):
    from spikeinterface.core import create_sorting_analyzer
    from spikeinterface.core.sparsity import ChannelSparsity

    from spikevault.synth import generate_recording

    rec, gt = generate_recording(probe=probe, duration_s=4.0, num_units=num_units, seed=3)
    analyzer = create_sorting_analyzer(gt, rec, sparse=False)
    analyzer.compute(["random_spikes", "templates"])
    templates = analyzer.get_extension("templates").get_data(outputs="Templates")
    dense = templates.get_dense_templates()
    mask = np.abs(dense).max(axis=1) > 0.1 * np.abs(dense).max(axis=(1, 2))[:, None]
    return rec, templates.to_sparse(ChannelSparsity(mask, templates.unit_ids, templates.channel_ids))


@pytest.fixture(scope="module")
def recording_and_templates():
    return _recording_and_templates()


@pytest.mark.parametrize("probe", ["linear32", "single"])  # a single wire: rank 1, not wobble's 5
def test_fft_convolve_templates_equals_wobbles(recording_and_templates, probe):
    from spikeinterface.sortingcomponents.matching import wobble

    from inference.fast_wobble import fft_convolve_templates

    _, templates = recording_and_templates if probe == "linear32" else _recording_and_templates(probe, 2)
    params = wobble.WobbleParameters(threshold=25.0)
    dense = templates.get_dense_templates()
    meta = wobble.TemplateMetadata.from_parameters_and_templates(params, dense)
    sparsity = wobble.WobbleSparsity.from_templates(params, templates)
    temporal, singular, spatial = wobble.compress_templates(
        np.where(sparsity.visible_channels[:, None, :], dense, 0), params.approx_rank)
    compressed = (temporal, singular, spatial,
                  wobble.upsample_and_jitter(temporal, params.jitter_factor, meta.num_samples))
    args = (compressed, params.jitter_factor, params.approx_rank, meta.jittered_indices, sparsity)
    want, got = wobble.convolve_templates(*args), fft_convolve_templates(*args)
    assert len(got) == len(want) == len(meta.jittered_indices)
    scale = max(np.abs(w).max() for w in want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == np.float32
        assert np.max(np.abs(g - w)) < 1e-5 * scale


@pytest.mark.parametrize("amplitude_variance", [0.0, 1.0])  # 1.0: the sort's (amplitudes scaled)
def test_fft_wobble_finds_the_same_spikes_as_wobble(recording_and_templates, amplitude_variance):
    from spikeinterface.sortingcomponents.matching import wobble
    from spikeinterface.sortingcomponents.matching.wobble import WobbleMatch

    from inference.fast_wobble import FftWobbleMatch, fft_convolve_templates, find_strict_peaks

    rec, templates = recording_and_templates
    params = {"threshold": 25.0, "refractory_period_frames": 10, "amplitude_variance": amplitude_variance}
    reference = WobbleMatch(rec, templates, parameters=dict(params), engine="numpy")
    fast = FftWobbleMatch(rec, templates, parameters=dict(params))
    assert wobble.convolve_templates is not fft_convolve_templates  # the swap ends with the set-up
    fs, margin = int(rec.sampling_frequency), fast.get_margin()
    total = 0
    try:
        for start in range(margin, rec.get_num_samples() - fs // 2 - margin, fs // 2):
            traces = rec.get_traces(start_frame=start - margin, end_frame=start + fs // 2 + margin).astype(np.float32)
            want = reference.compute_matching(traces, start, start + fs // 2, 0)
            got = fast.compute_matching(traces, start, start + fs // 2, 0)
            order_w = np.lexsort((want["cluster_index"], want["sample_index"]))
            order_g = np.lexsort((got["cluster_index"], got["sample_index"]))
            for field in ("sample_index", "cluster_index", "channel_index"):
                assert np.array_equal(got[field][order_g], want[field][order_w])
            assert np.allclose(got["amplitude"][order_g], want["amplitude"][order_w])
            total += len(got)
    finally:
        reference.clean()
        fast.clean()
    assert total > 50  # the recording's spikes were found, not an empty match on both sides
    assert wobble._find_strict_peaks is not find_strict_peaks  # the peak scan's swap ends with each chunk


def test_set_ups_in_threads_are_the_same_and_leave_spikeinterface_as_it_was(recording_and_templates):
    """FftWobbleMatch's set-up (batched convolutions) gives the same engine in concurrent threads as
    alone, and SpikeInterface's wobble, set up outside it, is its own."""
    from concurrent.futures import ThreadPoolExecutor

    from spikeinterface.sortingcomponents.matching import wobble

    from inference.fast_wobble import FftWobbleMatch

    rec, templates = recording_and_templates
    params = {"threshold": 25.0, "refractory_period_frames": 10}
    engines = [FftWobbleMatch(rec, templates, parameters=dict(params))]
    with ThreadPoolExecutor(2) as pool:
        engines += list(pool.map(lambda _: FftWobbleMatch(rec, templates, parameters=dict(params)), range(4)))
    reference = wobble.WobbleMatch(rec, templates, parameters=dict(params), engine="numpy")
    try:
        alone = engines[0].template_data.pairwise_convolution[0]
        for engine in engines[1:]:
            np.testing.assert_array_equal(engine.template_data.pairwise_convolution[0], alone)
        # SpikeInterface's np.convolve loop: the same values but for the FFT's rounding
        theirs = reference.template_data.pairwise_convolution[0]
        assert not np.array_equal(alone, theirs)
        np.testing.assert_allclose(alone, theirs, atol=1e-5 * np.abs(theirs).max())
    finally:
        for engine in engines + [reference]:
            engine.clean()


@pytest.mark.parametrize("amplitude_variance", [0.0, 1.0])  # 1.0: the sort's (amplitudes scaled)
def test_subtraction_equals_wobbles_bit_for_bit(recording_and_templates, amplitude_variance):
    """The numba subtraction with one refractory pass leaves the objective wobble's loop leaves."""
    from spikeinterface.sortingcomponents.matching.wobble import WobbleMatch

    from inference.fast_wobble import FftWobbleMatch

    rec, templates = recording_and_templates
    fast = FftWobbleMatch(rec, templates, parameters={"threshold": 25.0, "refractory_period_frames": 10,
                                                      "amplitude_variance": amplitude_variance})
    assert fast.params.scale_amplitudes == (amplitude_variance > 0)
    margin = fast.get_margin()
    traces = rec.get_traces(start_frame=0, end_frame=rec.sampling_frequency // 2 + 2 * margin).astype(np.float32)
    data, params = fast.template_data, fast.params
    objective = fast.objective(traces)
    normalized = 2 * objective - data.norm_squared[:, np.newaxis]
    checked = 0
    try:
        for _ in range(3):  # wobble's first iterations: the spikes of each overlap many templates
            train, scaling, _ = fast.find_peaks(objective, normalized, np.array([]), params, data, fast.template_meta)
            if len(train) == 0:
                break
            args = (params, fast.template_meta, fast.sparsity)
            want = WobbleMatch.subtract_spike_train(train, scaling, data, objective.copy(), normalized.copy(), *args)
            got = fast.subtract_spike_train(train, scaling, data, objective.copy(), normalized.copy(), *args)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and np.array_equal(g, w)  # -inf where wobble has -inf
            objective, normalized = got
            checked += len(train)
    finally:
        fast.clean()
    assert checked > 20


def test_objective_over_each_units_channel_span_equals_the_dense_product(recording_and_templates, monkeypatch):
    from inference import fast_wobble
    from inference.fast_wobble import FftWobbleMatch

    rec, templates = recording_and_templates
    monkeypatch.setattr(fast_wobble, "SPARSE_FRACTION", 1.0)  # the span path whatever the spans
    fast = FftWobbleMatch(rec, templates, parameters={"threshold": 25.0})
    try:
        spans = fast._channel_spans()
        assert spans is not None and any(stop - first < rec.get_num_channels() for first, stop in spans)
        traces = rec.get_traces(start_frame=0, end_frame=20_000).astype(np.float32)
        sparse = fast.objective(traces)
        fast._spans = False  # the dense product
        dense = fast.objective(traces)
    finally:
        fast.clean()
    assert sparse.dtype == dense.dtype == np.float32
    assert np.max(np.abs(sparse - dense)) < 1e-4 * np.max(np.abs(dense))


@pytest.mark.parametrize("num_units", [8, 2])  # 40 rows on 32 channels: by channel; 10 rows: by row
def test_objective_equals_wobbles_by_channel_and_by_row(num_units):
    from spikeinterface.sortingcomponents.matching.wobble import compute_objective

    from inference.fast_wobble import FftWobbleMatch

    rec, templates = _recording_and_templates(num_units=num_units)
    fast = FftWobbleMatch(rec, templates, parameters={"threshold": 25.0})
    try:
        rank, units, _ = fast.template_data.compressed_templates[0].shape
        assert (rec.get_num_channels() < rank * units) == (num_units == 8)
        traces = rec.get_traces(start_frame=0, end_frame=20_000).astype(np.float32)
        want = compute_objective(traces, fast.template_data, fast.params.approx_rank)
        for _ in range(2):  # the second time from the buffers and spectra kept from the first
            got = fast.objective(traces)
            assert got.shape == want.shape and got.dtype == np.float32
            assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want))
        shorter = fast.objective(traces[:15_000])  # a shorter (last) chunk: new buffers, same values
        assert np.max(np.abs(shorter - got[:, : shorter.shape[1]])[:, :14_000]) < 1e-4 * np.max(np.abs(want))
    finally:
        fast.clean()


def test_refit_amplitudes_agree_with_spikeinterfaces_amplitude_scalings(recording_and_templates):
    """Wobble with ``refit`` (and the whitening folded into its objective) reports each spike's
    scaling of its template, as SpikeInterface's ``amplitude_scalings`` with collisions fits it in
    a pass of its own."""
    from spikeinterface.core import NumpySorting, Templates
    from spikeinterface.core.node_pipeline import run_node_pipeline
    from spikeinterface.core.sparsity import ChannelSparsity
    from spikeinterface.preprocessing import whiten
    from spikeinterface.sortingcomponents.tools import create_sorting_analyzer_with_existing_templates

    from inference.fast_wobble import FftWobbleMatch

    rec, templates = recording_and_templates
    white = whiten(rec, mode="local", radius_um=100.0, dtype="float32", seed=0)
    matrix = np.asarray(white._kwargs["W"], dtype=np.float32)
    mask = templates.sparsity.mask
    dense = templates.get_dense_templates()
    white_templates = Templates(templates_array=(dense @ matrix).astype(np.float32),
                                sampling_frequency=templates.sampling_frequency, nbefore=templates.nbefore,
                                is_in_uV=True, channel_ids=templates.channel_ids, unit_ids=templates.unit_ids,
                                probe=templates.probe).to_sparse(ChannelSparsity(mask, templates.unit_ids,
                                                                                 templates.channel_ids))
    node = FftWobbleMatch(rec, white_templates, parameters={"threshold": 25.0}, whitening=matrix,
                          refit=dense * mask[:, None, :])
    try:
        spikes = run_node_pipeline(rec, [node], {"n_jobs": 1, "chunk_duration": "1s"}, job_name="wobble",
                                   squeeze_output=True, names=["spikes"])
    finally:
        node.clean()
    spikes = spikes[np.lexsort((spikes["cluster_index"], spikes["sample_index"]))]
    assert len(spikes) > 50
    fields = [("sample_index", "int64"), ("unit_index", "int64"), ("segment_index", "int64")]
    vector = np.zeros(len(spikes), dtype=fields)
    vector["sample_index"], vector["unit_index"] = spikes["sample_index"], spikes["cluster_index"]
    sorting = NumpySorting(vector, rec.sampling_frequency, templates.unit_ids)
    analyzer = create_sorting_analyzer_with_existing_templates(sorting, rec, templates)
    analyzer.compute("amplitude_scalings", handle_collisions=True)
    want = analyzer.get_extension("amplitude_scalings").get_data()
    ordered = sorting.to_spike_vector()
    want = want[np.lexsort((ordered["unit_index"], ordered["sample_index"]))]
    diff = np.abs(spikes["amplitude"] - want)  # here: median 0.002, 90th percentile 0.006, max 0.013
    assert np.median(diff) < 0.005 and np.percentile(diff, 90) < 0.02 and diff.max() < 0.05


@pytest.mark.parametrize("by_span", [False, True])
def test_whitening_folded_into_the_objective_equals_whitening_the_traces(recording_and_templates, by_span,
                                                                         monkeypatch):
    """``whitening=W`` on the recorded traces gives the objective of the whitened traces (and the
    same spikes), over the dense product and over each unit's channel span, widened by W's reach."""
    from spikeinterface.core import Templates
    from spikeinterface.core.sparsity import ChannelSparsity

    from inference import fast_wobble
    from inference.fast_wobble import FftWobbleMatch
    from spikevault.filters import local_whitening_matrix

    if by_span:
        monkeypatch.setattr(fast_wobble, "SPARSE_FRACTION", 1.0)
    rec, templates = recording_and_templates
    matrix = local_whitening_matrix(rec, 50.0, seed=0).astype(np.float32)
    assert 0 < np.count_nonzero(matrix) < matrix.size  # local: a band
    white_templates = Templates(templates_array=(templates.get_dense_templates() @ matrix).astype(np.float32),
                                sampling_frequency=templates.sampling_frequency, nbefore=templates.nbefore,
                                is_in_uV=True, channel_ids=templates.channel_ids, unit_ids=templates.unit_ids,
                                probe=templates.probe).to_sparse(ChannelSparsity(templates.sparsity.mask,
                                                                                 templates.unit_ids,
                                                                                 templates.channel_ids))
    params = {"threshold": 25.0}
    folded = FftWobbleMatch(rec, white_templates, parameters=dict(params), whitening=matrix)
    plain = FftWobbleMatch(rec, white_templates, parameters=dict(params))
    try:
        assert (folded._channel_spans() is not None) == by_span
        if by_span:  # the spans reach the channels that whiten into the visible ones
            assert all(f[0] <= p[0] and f[1] >= p[1] for f, p in zip(folded._channel_spans(), plain._channel_spans()))
        traces = rec.get_traces(start_frame=0, end_frame=20_000).astype(np.float32)
        want = plain.objective(traces @ matrix)
        got = folded.objective(traces)
        assert np.max(np.abs(got - want)) < 1e-4 * np.max(np.abs(want))
        a = folded.compute_matching(traces, 300, 19_700, 0)
        b = plain.compute_matching(traces @ matrix, 300, 19_700, 0)
        assert len(a) > 10 and np.array_equal(a["sample_index"], b["sample_index"])
        assert np.array_equal(a["cluster_index"], b["cluster_index"])
    finally:
        folded.clean()
        plain.clean()


def test_strict_peaks_are_wobbles():
    """The peak scan returns wobble's indices: plateaus and ties (never strict peaks), windows
    reaching either end, thresholds given as Python and numpy floats, tiny arrays and NaNs."""
    from spikeinterface.sortingcomponents.matching.wobble import _find_strict_peaks

    from inference.fast_wobble import find_strict_peaks

    rng = np.random.default_rng(0)
    cases = []
    for n in (1, 2, 3, 4, 50, 3000):
        for dtype in (np.float32, np.float64):
            smooth = np.convolve(rng.standard_normal(n + 20), np.hanning(9), mode="same")[10:10 + n]
            cases.append(smooth.astype(dtype))
            cases.append(np.round(rng.standard_normal(n) * 2).astype(dtype))  # many ties
    with_nan = cases[-1].copy()
    with_nan[7] = np.nan
    cases.append(with_nan)
    for x in cases:
        for order in (1, 2, 5, 89):
            for threshold in (-np.inf, 0.0, 0.5, np.float64(0.3), 25.1):
                assert np.array_equal(find_strict_peaks(x, order, threshold), _find_strict_peaks(x, order, threshold))


def test_transpose_into_and_flush_subnormals():
    """The blocked transpose is ``x.T`` for any length (blocks and a partial last one, or none);
    only subnormal values are flushed, and a product with them flushed is the same."""
    from inference.fast_wobble import TRANSPOSE_BLOCK_ROWS, flush_subnormals, transpose_into

    rng = np.random.default_rng(1)
    for n in (0, 1, TRANSPOSE_BLOCK_ROWS, 3 * TRANSPOSE_BLOCK_ROWS + 5):
        x = rng.standard_normal((n, 7)).astype(np.float32)
        out = np.full((7, n + 4), 9.0, np.float32)
        transpose_into(out, x)
        assert np.array_equal(out[:, :n], x.T) and np.all(out[:, n:] == 9.0)
    tiny = np.finfo(np.float32).tiny
    w = rng.standard_normal((6, 20)).astype(np.float32)
    w[0, :4] = np.array([tiny / 2, -tiny / 8, 1e-45, tiny], np.float32)  # three subnormals, one normal
    flushed = flush_subnormals(w)
    assert flushed.dtype == np.float32
    assert np.array_equal(flushed[0, :4], np.array([0, 0, 0, tiny], np.float32))
    assert np.array_equal(flushed[:, 4:], w[:, 4:]) and np.array_equal(flushed[1:], w[1:])
    x = rng.standard_normal((20, 300)).astype(np.float32)
    assert np.array_equal(flushed @ x, w @ x)


def test_pinned_spectra_give_the_same_objective_and_outlive_release(recording_and_templates):
    """Spectra pinned for a chunk length before the pass are those the objective would compute;
    release() drops the per-chunk ones, not the pinned; another length computes its own."""
    from inference.fast_wobble import FftWobbleMatch

    rec, templates = recording_and_templates
    fast = FftWobbleMatch(rec, templates, parameters={"threshold": 25.0})
    try:
        traces = rec.get_traces(start_frame=0, end_frame=20_000).astype(np.float32)
        want = fast.objective(traces)
        fast.release()
        assert fast.pin_spectra(len(traces)) > 0
        fast.release()
        assert fast._pinned is not None and fast._spectra is None
        assert np.array_equal(fast.objective(traces), want)
        assert fast._spectra is None  # read from the pinned ones
        shorter = fast.objective(traces[:15_000])
        assert fast._spectra is not None and fast._pinned is not None
        assert np.max(np.abs(shorter - want[:, : shorter.shape[1]])[:, :14_000]) < 1e-4 * np.max(np.abs(want))
    finally:
        fast.clean()
