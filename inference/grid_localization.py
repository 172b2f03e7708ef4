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
        nb_weights = self.weights.shape[0]

        for main_chan in np.unique(peaks["channel_index"]):
            (idx,) = np.nonzero(peaks["channel_index"] == main_chan)
            num_spikes = len(idx)
            nearest_mask, channel_mask, sub_w = self._for_channel(int(main_chan))  # the second change
            num_templates = np.sum(nearest_mask)
            global_products = (waveforms[idx][:, :, channel_mask] * self.prototype).sum(axis=1)

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
            found_positions = np.nan_to_num(found_positions)
            peak_locations["x"][idx] = found_positions[:, 0]
            peak_locations["y"][idx] = found_positions[:, 1]
            peak_locations["z"][idx] = found_positions[:, 2]

        return peak_locations


def localize_grid_convolution(recording, peaks: np.ndarray, job_kwargs: dict, seed: int | None = None) -> np.ndarray:
    """``localize_peaks(recording, peaks, method="grid_convolution", seed=seed)`` with
    :class:`VectorisedGridConvolution`: SpikeInterface builds the pipeline (its prototype
    waveform from a seeded subset of the peaks, the dense waveform extraction, the grid's
    weights, by :func:`convolution_weights`), then its localisation node computes with
    :class:`VectorisedGridConvolution`."""
    from spikeinterface.core.job_tools import fix_job_kwargs
    from spikeinterface.core.node_pipeline import PeakRetriever, run_node_pipeline
    from spikeinterface.sortingcomponents.peak_localization.main import get_localization_pipeline_nodes

    job_kwargs = fix_job_kwargs(job_kwargs)
    # SpikeInterface's node computes its grid's weights when it is made: with ours, swapped in
    # for the length of this (single-threaded) call
    localization_tools.get_convolution_weights = convolution_weights
    try:
        nodes = get_localization_pipeline_nodes(recording, PeakRetriever(recording, peaks), peaks_or_spikes=peaks,
                                                method="grid_convolution", method_kwargs={}, job_kwargs=job_kwargs,
                                                seed=seed)
    finally:
        localization_tools.get_convolution_weights = _their_convolution_weights
    theirs = nodes[-1]
    if type(theirs) is LocalizeGridConvolution:  # else a SpikeInterface that builds it otherwise: keep theirs
        # the node as SpikeInterface built it (its weights not computed twice), with our compute:
        # the subclass adds no state but the per-channel arrays it keeps (_for_channel)
        theirs.__class__ = VectorisedGridConvolution
    return run_node_pipeline(recording, nodes, job_kwargs, job_name="localize peaks (grid_convolution)",
                             squeeze_output=True)
