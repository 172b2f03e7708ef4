"""SpikeInterface's ``grid_convolution`` peak localisation with its percentile step vectorised.

The motion estimate localises every detected peak with SpikeInterface's ``grid_convolution``
(the localisation of its ``dredge_fast`` preset). Per peak channel, the method scores each peak
against a grid of artificial templates and keeps, per peak, the scores above their 95th
percentile among the non-negative ones: ``np.nanpercentile`` over the peaks' rows, which numpy
computes row by row in Python (``apply_along_axis``). That was 3.6 of the 8.0 s the method took
on the 64-channel, 300 s drift benchmark (34,500 peaks).

:func:`rows_nanpercentile` computes the same percentiles by sorting the rows once and calling
``np.percentile`` on every group of rows with the same number of valid scores, a few calls per
peak channel of a chunk instead of one per peak: the same values bit for bit (numpy's
interpolation, per element, on the same sorted values). The masks and weights of each peak
channel's grid positions, which ``compute`` derives again for every chunk (on a Neuropixels
probe, copying every masked contact's weights at every grid position was most of its time), are
kept per channel, the same arrays (:func:`sub_weights`). Everything else is SpikeInterface's
``compute``, unchanged.

From the sort's in-memory cache, :func:`localize_from_windows` reads each peak's window where it
is instead of passing over the recording (twice: once for the prototype waveform).

The grid's weights (:func:`convolution_weights`) are SpikeInterface's ``get_convolution_weights``,
the same values bit for bit, computed only where they can be nonzero. SpikeInterface computes
them for every (depth, contact, grid position): on a Neuropixels probe 5 x 384 x ~25,000 values,
1.3 s in the main process before the pass starts, nearly all of them underflowing to zero.
"""

from __future__ import annotations

import numpy as np
from spikeinterface.postprocessing import localization_tools
from spikeinterface.postprocessing.localization_tools import get_convolution_weights as _their_convolution_weights
from spikeinterface.sortingcomponents.peak_localization.grid import LocalizeGridConvolution

from spikevault.threads import thread_map


def rows_nanpercentile(values: np.ndarray, q: float) -> np.ndarray:
    """``np.nanpercentile(values, q, axis=1)`` of a 2-D array (NaN for a row of NaNs), the same
    values bit for bit, by one ``np.percentile`` call per distinct count of valid values."""
    out = np.full(values.shape[0], np.nan, dtype=values.dtype)
    counts = np.count_nonzero(~np.isnan(values), axis=1)
    ordered = np.sort(values, axis=1)  # NaNs last
    for n in np.unique(counts):
        if n == 0:
            continue
        rows = counts == n
        out[rows] = np.percentile(ordered[rows, :n], q, axis=1)
    return out


#: ``exp(-d / sigma)`` rounds to float32 zero beyond this many sigmas (float32's smallest
#: subnormal is 1.4e-45, ``exp(-103.28)``; half of it, ``exp(-103.97)``, rounds down to zero).
_FLOAT32_UNDERFLOW_SIGMAS = 104.0


def convolution_weights(distances: np.ndarray, z_list_um=np.linspace(0, 120.0, 5), sigma_list_um=np.linspace(5, 25, 5),
                        sparsity_threshold=None, sigma_3d=2.5, mode="exponential_3d"):
    """SpikeInterface's ``get_convolution_weights`` (same arguments; returns the weights
    ``[depths, contacts, positions]`` float32 and the depths), the same values bit for bit.

    For its default ``exponential_3d`` mode the weights ``exp(-sqrt(d^2 + z^2) / sigma_3d)`` of a
    contact further than ``_FLOAT32_UNDERFLOW_SIGMAS * sigma_3d`` from a grid position are float32
    zeros: only the nearer pairs are computed, by the same numpy expression; then, per depth and
    position over its contacts in order, the two normalisations and the pruning below
    ``sparsity_threshold`` as SpikeInterface does them (float32 norms summed contact after contact,
    as numpy reduces the contacts' axis). Other modes are SpikeInterface's own."""
    if mode != "exponential_3d":
        return _their_convolution_weights(distances, z_list_um=z_list_um, sigma_list_um=sigma_list_um,
                                       sparsity_threshold=sparsity_threshold, sigma_3d=sigma_3d, mode=mode)
    from spikevault.filters import _compiled

    if sparsity_threshold is not None:
        assert 0 <= sparsity_threshold <= 1, "sparsity_threshold should be in [0, 1]"
    channels, positions = distances.shape
    if sparsity_threshold is None:
        sparsity_threshold = 0.5 / np.sqrt(channels)
    # numpy compares float32 weights with a Python float in float32, with a numpy scalar in float64
    threshold = np.float64(np.float32(sparsity_threshold) if type(sparsity_threshold) is float else sparsity_threshold)
    position, channel = np.nonzero(distances.T < _FLOAT32_UNDERFLOW_SIGMAS * sigma_3d)  # by position, then contact
    near = distances[channel, position]
    weights = np.empty((len(z_list_um), len(near)), dtype=np.float32)
    for count, z in enumerate(z_list_um):
        weights[count] = np.exp(-np.sqrt(near**2 + z**2) / sigma_3d)
    starts = np.searchsorted(position, np.arange(positions + 1))
    _compiled(_normalise_py)(weights, starts, threshold)
    out = np.zeros((len(z_list_um), channels, positions), dtype=np.float32)
    out[:, channel, position] = weights
    return out, z_list_um


def _normalise_py(weights, starts, threshold):
    """In place, for each depth and each grid position's run of contacts ``starts[p]:starts[p + 1]``:
    divide by the float32 norm, zero what is below ``threshold`` (compared in float64), divide by
    the new norm. A zero norm zeroes the run (numpy's division gives infinities or NaNs there,
    which SpikeInterface zeroes; a nonzero norm is at least each weight: the quotients are finite)."""
    zero = np.float32(0.0)
    for k in range(weights.shape[0]):
        for p in range(len(starts) - 1):
            lo, hi = starts[p], starts[p + 1]
            for step in range(2):
                total = zero
                for j in range(lo, hi):
                    total += weights[k, j] * weights[k, j]
                norm = np.sqrt(total)
                for j in range(lo, hi):
                    v = weights[k, j] / norm if norm > zero else zero
                    weights[k, j] = zero if step == 0 and np.float64(v) < threshold else v


def sub_weights(weights: np.ndarray, channel_mask: np.ndarray, nearest_mask: np.ndarray) -> np.ndarray:
    """``weights[:, channel_mask, :][:, :, nearest_mask]``: the same values with the same strides
    (the boolean indexes leave the depth axis innermost in memory, and numpy's products follow the
    layout), gathered without first copying every masked contact's weights at every grid position
    (on a Neuropixels probe 1.1 against 0.17 ms)."""
    by_position = weights.transpose(2, 1, 0)  # a view: [positions, contacts, depths]
    return by_position[np.ix_(np.flatnonzero(nearest_mask), np.flatnonzero(channel_mask))].transpose(2, 1, 0)


class VectorisedGridConvolution(LocalizeGridConvolution):
    """``LocalizeGridConvolution`` whose per-peak percentile is :func:`rows_nanpercentile`, and
    whose per-channel masks and weights are computed once per peak channel."""

    def _for_channel(self, main_chan: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SpikeInterface's nearest grid positions, channels their weights reach, and those
        weights (:func:`sub_weights`), for peaks on ``main_chan``. SpikeInterface computes them for
        every chunk's every peak channel; here once per channel (on a Neuropixels probe, copying
        the weights was most of the method's time)."""
        per_channel = self.__dict__.setdefault("_per_channel", {})
        if main_chan not in per_channel:
            nearest_mask = self.nearest_template_mask[main_chan, :]
            channel_mask = np.sum(self.weights_sparsity_mask[:, :, nearest_mask], axis=(0, 2)) > 0
            per_channel[main_chan] = nearest_mask, channel_mask, sub_weights(self.weights, channel_mask, nearest_mask)
        return per_channel[main_chan]

    def compute(self, traces, peaks, waveforms):
        peak_locations = np.zeros(peaks.size, dtype=self._dtype)
        for main_chan in np.unique(peaks["channel_index"]):
            (idx,) = np.nonzero(peaks["channel_index"] == main_chan)
            _, channel_mask, _ = self._for_channel(int(main_chan))
            found = self.locate_on_channel(int(main_chan), waveforms[idx][:, :, channel_mask])
            peak_locations["x"][idx] = found[:, 0]
            peak_locations["y"][idx] = found[:, 1]
            peak_locations["z"][idx] = found[:, 2]
        return peak_locations

    def locate_on_channel(self, main_chan: int, waveforms: np.ndarray) -> np.ndarray:
        """Positions ``[peaks, 3]`` (x, y, z) of peaks on ``main_chan`` from their waveforms on the
        channels its grid positions' weights reach (``_for_channel``'s mask): SpikeInterface's
        ``compute`` for one peak channel, with the two changes above."""
        nb_weights = self.weights.shape[0]
        num_spikes = len(waveforms)
        nearest_mask, channel_mask, sub_w = self._for_channel(main_chan)  # the second change
        num_templates = np.sum(nearest_mask)
        global_products = (waveforms * self.prototype).sum(axis=1)

        dot_products = np.zeros((nb_weights, num_spikes, num_templates), dtype=np.float32)
        for count in range(nb_weights):
            dot_products[count] = np.dot(global_products, sub_w[count])

        mask = dot_products < 0
        if self.percentile > 0:
            dot_products[mask] = np.nan
            # the first change: SpikeInterface's np.nanpercentile(dot_products, p, axis=(0, 2))
            rows = np.moveaxis(dot_products, 1, 0).reshape(num_spikes, -1)
            thresholds = np.nan_to_num(rows_nanpercentile(rows, self.percentile))
            dot_products[dot_products < thresholds[np.newaxis, :, np.newaxis]] = 0
        dot_products[mask] = 0

        scalar_products = dot_products.sum(2)
        found_positions = np.zeros((num_spikes, 3), dtype=np.float32)
        nearest_templates = self.template_positions[nearest_mask]
        for count in range(nb_weights):
            found_positions[:, :2] += np.dot(dot_products[count], nearest_templates)

        found_positions[:, 2] = np.dot(self.z_factors, scalar_products)
        scalar_products = (scalar_products.sum(0))[:, np.newaxis]
        with np.errstate(divide="ignore", invalid="ignore"):
            found_positions /= scalar_products
        return np.nan_to_num(found_positions)


#: The waveform window of the grid localisation, before and after each peak (SpikeInterface's
#: ``get_localization_pipeline_nodes`` defaults, given to it explicitly).
GRID_MS_BEFORE = 0.5
GRID_MS_AFTER = 0.5
#: Prototype waveform: the median of this many peaks' normalised waveforms (SpikeInterface's
#: ``get_prototype_and_waveforms_from_peaks`` default).
PROTOTYPE_PEAKS = 5000
#: Peaks located per call from windows (a peak channel's peaks in blocks of at most this many).
WINDOW_BLOCK_PEAKS = 4096


def localize_grid_convolution(recording, peaks: np.ndarray, job_kwargs: dict, seed: int | None = None,
                              windows=None) -> np.ndarray:
    """``localize_peaks(recording, peaks, method="grid_convolution", seed=seed)`` with
    :class:`VectorisedGridConvolution`: SpikeInterface builds the pipeline (its prototype
    waveform from a seeded subset of the peaks, the dense waveform extraction, the grid's
    weights, by :func:`convolution_weights`), then its localisation node computes with
    :class:`VectorisedGridConvolution`.

    With ``windows``, a function giving the recording's traces around given samples
    (``windows(segment_index, sample_index, nbefore, nafter, channels)`` -> float32
    ``[peaks, nbefore + nafter, channels]``, zeros beyond the segment's ends, as SpikeInterface's
    chunks are padded), nothing reads the traces chunk by chunk: the prototype is computed from its
    peaks' windows and each peak is located from its own window, on the channels its peak
    channel's grid positions reach (:func:`localize_from_windows`)."""
    from spikeinterface.core.job_tools import fix_job_kwargs
    from spikeinterface.core.node_pipeline import run_node_pipeline

    job_kwargs = fix_job_kwargs(job_kwargs)
    if windows is not None:
        located = localize_from_windows(recording, peaks, windows, seed=seed, n_threads=job_kwargs["n_jobs"])
        if located is not None:
            return located
    nodes = _pipeline_nodes(recording, peaks, job_kwargs, seed=seed)
    return run_node_pipeline(recording, nodes, job_kwargs, job_name="localize peaks (grid_convolution)",
                             squeeze_output=True)


def _pipeline_nodes(recording, peaks: np.ndarray, job_kwargs: dict, seed: int | None = None, prototype=None) -> list:
    """SpikeInterface's grid_convolution pipeline nodes (its prototype computed from the peaks
    unless given), the last one computing with :class:`VectorisedGridConvolution`."""
    from spikeinterface.core.node_pipeline import PeakRetriever
    from spikeinterface.sortingcomponents.peak_localization.main import get_localization_pipeline_nodes

    # SpikeInterface's node computes its grid's weights when it is made: with ours, swapped in
    # for the length of this (single-threaded) call
    localization_tools.get_convolution_weights = convolution_weights
    try:
        nodes = get_localization_pipeline_nodes(recording, PeakRetriever(recording, peaks), peaks_or_spikes=peaks,
                                                method="grid_convolution",
                                                method_kwargs={} if prototype is None else {"prototype": prototype},
                                                ms_before=GRID_MS_BEFORE, ms_after=GRID_MS_AFTER,
                                                job_kwargs=job_kwargs, seed=seed)
    finally:
        localization_tools.get_convolution_weights = _their_convolution_weights
    theirs = nodes[-1]
    if type(theirs) is LocalizeGridConvolution:  # else a SpikeInterface that builds it otherwise: keep theirs
        # the node as SpikeInterface built it (its weights not computed twice), with our compute:
        # the subclass adds no state but the per-channel arrays it keeps (_for_channel)
        theirs.__class__ = VectorisedGridConvolution
    return nodes


def prototype_from_windows(recording, peaks: np.ndarray, windows, nbefore: int, nafter: int,
                           seed: int | None = None) -> np.ndarray:
    """SpikeInterface's ``get_prototype_and_waveforms_from_peaks`` prototype (the same seeded
    uniform selection of ``PROTOTYPE_PEAKS`` peaks, the median of their peak-channel waveforms
    each divided by its magnitude at the peak), from ``windows`` instead of a pass over the
    recording: the same values when the windows are the recording's traces."""
    from spikeinterface.sortingcomponents.peak_selection import select_peaks

    few = select_peaks(peaks, recording=recording, method="uniform", n_peaks=PROTOTYPE_PEAKS,
                       margin=(nbefore, nafter), seed=seed)
    at_peak = np.zeros((len(few), nbefore + nafter), dtype=np.float32)
    for (segment, channel), rows in _groups(few).items():
        at_peak[rows] = windows(segment, few["sample_index"][rows], nbefore, nafter, np.array([channel]))[:, :, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nanmedian(at_peak / np.abs(at_peak[:, nbefore][:, np.newaxis]), axis=0)


def localize_from_windows(recording, peaks: np.ndarray, windows, seed: int | None = None,
                          n_threads: int = 1) -> np.ndarray | None:
    """The positions :func:`localize_grid_convolution` gives (to float32 rounding), each peak
    located from its own window (see there), a peak channel's peaks together (in blocks of at
    most ``WINDOW_BLOCK_PEAKS``), in ``n_threads`` threads (numpy releases the GIL in the
    products and sorts).

    A chunked pass reads every frame of the recording and copies each peak's window on every
    channel; here only the peaks' windows on the channels their positions use are read. On the
    64-channel, 300 s drift benchmark (35,000 peaks), in the sort: 0.58 s against 1.49 s for the
    pass and its prototype's own pass. None when SpikeInterface's node is not the one this module was
    written for."""
    from spikeinterface.core.core_tools import ms_to_samples

    fs = recording.get_sampling_frequency()
    nbefore, nafter = ms_to_samples(GRID_MS_BEFORE, fs), ms_to_samples(GRID_MS_AFTER, fs)
    prototype = prototype_from_windows(recording, peaks, windows, nbefore, nafter, seed=seed)
    node = _pipeline_nodes(recording, peaks, {"n_jobs": 1}, seed=seed, prototype=prototype)[-1]
    if not isinstance(node, VectorisedGridConvolution) or (node.nbefore, node.nafter) != (nbefore, nafter):
        return None  # a SpikeInterface that builds the node otherwise: the caller's pass
    blocks = [(key, rows[s: s + WINDOW_BLOCK_PEAKS]) for key, rows in _groups(peaks).items()
              for s in range(0, len(rows), WINDOW_BLOCK_PEAKS)]

    def locate(block):
        (segment, channel), rows = block
        _, channel_mask, _ = node._for_channel(channel)
        waveforms = windows(segment, peaks["sample_index"][rows], nbefore, nafter, np.flatnonzero(channel_mask))
        return node.locate_on_channel(channel, waveforms)

    found = thread_map(locate, blocks, n_threads)
    locations = np.zeros(len(peaks), dtype=node._dtype)
    for (_, rows), xyz in zip(blocks, found):
        locations["x"][rows], locations["y"][rows], locations["z"][rows] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    return locations


def _groups(peaks: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """The indices of the peaks of each (segment, peak channel), in order."""
    keys = peaks["segment_index"].astype(np.int64) * (int(peaks["channel_index"].max(initial=0)) + 1) \
        + peaks["channel_index"]
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    return {(int(peaks["segment_index"][g[0]]), int(peaks["channel_index"][g[0]])): g
            for g in np.split(order, bounds) if len(g)}
