"""Motion correction of the traces: SpikeInterface's kriging, each kernel computed once.

SpikeInterface's ``interpolate_motion`` corrects a chunk bin by bin of the motion's time bins.
On every read of every chunk it rebuilds each bin's kriging kernel, including the pseudo-inverse
of the contacts' own kernel matrix, which depends only on the fixed contact positions: 44 ms per
bin on a 384-channel probe. It then multiplies the chunk by the dense 384 x 384 kernel: 90 ms per
1 s chunk here, although all but a tenth of the kernel's weights are below 1e-7.

:class:`KrigingMotionRecording` takes the same arguments and gives the same traces to float32
rounding. Its kernels are computed once, when it is made: the pseudo-inverse once, then one
kernel per time bin, each SpikeInterface's bit for bit (bins with the same displacements share
one) with its weights below ``KRIGING_ZERO`` set to zero. Each column of the kernel sums to
about 1, so those weights are below float32's rounding of the product: on a 384-channel probe the
traces moved by 1-2e-7 of their size. The product then skips the zeros as the local whitening
does (:func:`spikevault.filters.whitening_blocks`): 40 ms instead of 90 per 1 s chunk.
"""

from __future__ import annotations

import numpy as np
from spikeinterface.core.motion import ensure_time_bins
from spikeinterface.sortingcomponents.motion.motion_interpolation import (
    InterpolateMotionRecording,
    InterpolateMotionRecordingSegment,
)

from spikevault.filters import whitening_blocks
from spikevault.threads import thread_map


#: Kriging weights smaller than this in magnitude are set to zero (see the module's docstring).
KRIGING_ZERO = 1e-7


def kriging_kernels(channel_locations: np.ndarray, motion, segment_index: int, bin_centers_s: np.ndarray,
                    sigma_um=20.0, p=1, force_extrapolate: bool = False, channel_inds=None,
                    dtype="float32", zero_below: float = KRIGING_ZERO, **_ignored) -> tuple[list, np.ndarray]:
    """Each time bin's kriging kernel, as SpikeInterface's ``interpolate_motion_on_traces`` builds
    it (``get_spatial_interpolation_kernel(channel_locations, moved, method="kriging", ...)``,
    the same values bit for bit), with the contacts' pseudo-inverse computed once; then its
    weights below ``zero_below`` in magnitude set to zero.

    Returns (the distinct kernels, each ``[channels, output channels]`` in ``dtype``; for each
    bin, the index of its kernel)."""
    from spikeinterface.preprocessing.preprocessing_tools import get_kriging_kernel_distance

    source = np.asarray(channel_locations)
    n = source.shape[0]
    inside_low, inside_high = source.min(axis=0), source.max(axis=0)
    Kxx = get_kriging_kernel_distance(source, source, sigma_um, p)
    inverse = np.linalg.pinv(Kxx + 1e-6 * np.eye(n))
    kernels, index, seen = [], np.zeros(len(bin_centers_s), dtype=np.int64), {}
    for b, t in enumerate(bin_centers_s):
        shift = motion.get_displacement_at_time_and_depth(np.full(n, t), source[:, motion.dim],
                                                          segment_index=segment_index)
        key = np.asarray(shift).tobytes()
        if key not in seen:
            moved = source.copy()
            moved[:, motion.dim] += shift
            if channel_inds is not None:
                moved = moved[channel_inds]
            inside = np.all((moved >= inside_low) & (moved <= inside_high), axis=1)
            kernel = (get_kriging_kernel_distance(moved, source, sigma_um, p) @ inverse).T.copy()
            total = np.sum(kernel, axis=0)
            kernel[:, inside] /= total[inside].reshape(1, -1)
            if not force_extrapolate:
                kernel[:, ~inside] = 0
            kernel = kernel.astype(dtype)
            kernel[np.abs(kernel) < zero_below] = 0
            seen[key] = len(kernels)
            kernels.append(kernel)
        index[b] = seen[key]
    return kernels, index


class KrigingMotionRecording(InterpolateMotionRecording):
    """SpikeInterface's ``InterpolateMotionRecording`` (same arguments, the same traces to float32
    rounding) with its kriging kernels computed once and its products restricted to their
    nonzero blocks.

    Other interpolation methods keep SpikeInterface's segments. The kernels of a 300 s
    recording on 384 channels with 1 s motion bins would take ~180 MB dense; by blocks (15-18% of
    a Neuropixels kernel) about a sixth of that."""

    def __init__(self, recording, motion, **kwargs):
        super().__init__(recording, motion, **kwargs)
        for i, segment in enumerate(self.segments):
            if segment.spatial_interpolation_method != "kriging":
                continue
            # the bins' times as SpikeInterface's segment uses them: the midpoints of its edges
            centers, _ = ensure_time_bins(None, segment.interpolation_time_bin_edges_s)
            kernels, index = kriging_kernels(segment.channel_locations, motion, segment.segment_index, centers,
                                             channel_inds=segment.channel_inds, dtype=segment.dtype,
                                             **segment.spatial_interpolation_kwargs)
            blocks = [whitening_blocks(k) for k in kernels]
            fast = _KrigingMotionSegment(segment, [(k if b is None else None, b) for k, b in zip(kernels, blocks)],
                                         index, kernels[0].shape[1])
            fast.set_parent_extractor(self)
            self.segments[i] = fast


class _KrigingMotionSegment(InterpolateMotionRecordingSegment):
    """``interpolate_motion_on_traces`` with precomputed kernels: the chunk's frames bin by bin,
    each bin's frames times its kernel (by blocks where the kernel is sparse enough).

    ``kernels``: for each distinct kernel, (the dense kernel or None, its blocks or None)."""

    def __init__(self, segment: InterpolateMotionRecordingSegment, kernels: list, index: np.ndarray,
                 num_out: int):
        super().__init__(segment.parent_recording_segment, segment.channel_locations, segment.motion,
                         segment.spatial_interpolation_method, segment.spatial_interpolation_kwargs,
                         segment.channel_inds, segment.segment_index, segment.interpolation_time_bin_centers_s,
                         segment.interpolation_time_bin_edges_s, dtype=segment.dtype)
        self.kernels = kernels
        self.kernel_index = index
        self.num_out = num_out

    def get_traces(self, start_frame, end_frame, channel_indices):
        start_frame = 0 if start_frame is None else start_frame
        end_frame = self.get_num_samples() if end_frame is None else end_frame
        times = self.parent_recording_segment.sample_index_to_time(np.arange(start_frame, end_frame))
        traces = self.parent_recording_segment.get_traces(start_frame, end_frame, channel_indices=slice(None))
        traces = traces.astype(self.dtype, copy=False)
        edges = self.interpolation_time_bin_edges_s
        bins = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, len(edges) - 2)
        # every frame falls in one bin's run below, so every row is written: no zero fill
        out = np.empty((len(times), self.num_out), dtype=traces.dtype)
        if len(times):
            # the frames of each bin: bins is sorted, so each is one run of frames
            bounds = np.searchsorted(bins, np.arange(bins[0], bins[-1] + 2), side="left")
            for b, lo, hi in zip(range(bins[0], bins[-1] + 1), bounds[:-1], bounds[1:]):
                if hi == lo:
                    continue
                kernel, blocks = self.kernels[self.kernel_index[b]]
                if blocks is None:
                    np.matmul(traces[lo:hi], kernel, out=out[lo:hi])
                else:
                    for columns, rows, block in blocks:
                        out[lo:hi, columns] = traces[lo:hi, rows] @ block
        if channel_indices is not None:
            out = out[:, channel_indices]
        return out


#: Samples by which :func:`interpolated_events` lets an event's peak move from the detected one
#: (re-detection on the corrected traces found 28 of 244 test spikes 1-2 samples off).
PEAK_SHIFT = 2
#: Events interpolated at a time by :func:`interpolated_events` (their windows on every contact,
#: float32: 1,024 events of 60 samples on 64 contacts are 16 MB).
INTERPOLATE_BLOCK_EVENTS = 1024


def interpolated_events(events: dict, channel_index: np.ndarray, windows, corrected: KrigingMotionRecording, schema,
                        params, noise_levels: np.ndarray, n_threads: int = 1) -> dict:
    """The events detected on the recorded traces, as the motion-corrected traces show them.

    Each event's window on every contact is read from the recorded traces' cache (``windows``, an
    :class:`inference.sort.CacheWindows`) and multiplied by the kriging kernel of its time bin,
    the product ``corrected`` computes for those samples (the same kernels). Its peak becomes the
    contact within ``params.detect_radius_um`` of the recorded one and the sample within
    ``PEAK_SHIFT`` of the detected one where the corrected window peaks (in ``params.peak_sign``),
    and its waveform the corrected window around that sample on that contact's K nearest, as
    :func:`spikevault.extract.extract_events` takes them (resampled to ``schema``'s rate the same
    way). On a test recording 223 of the 244 spikes that re-detection on the corrected traces
    finds come out on the same sample and contact, 7 on a neighbouring contact, and 14 (near
    the threshold) are not among the recorded ones, which had 234.

    Re-detecting on the corrected traces instead costs a pass that interpolates every sample:
    on drift64 1.5-1.7 s of its 21 s sort, against 0.2 s here.

    ``events``: :func:`spikevault.extract.extract_events`'s block from the recorded traces, with
    ``channel_index`` its peak channels' indices; ``noise_levels``: the corrected traces' noise
    per channel (each event's ``noise_level_uv``). Returns a block of the same events in time
    order, with the corrected times, waveforms, channels, offsets, masks and amplitudes (an event
    that lands on another's sample and contact only once).
    """
    from spikevault.extract import _resample_matrix, neighbour_table

    n = len(events["waveform"])
    fs = corrected.get_sampling_frequency()
    matrix, nb_o, na_o = _resample_matrix(fs, schema)
    locations = np.asarray(corrected.get_channel_locations(), dtype=np.float64)[:, :2]
    neighbours, offsets_um, mask = neighbour_table(locations, schema.num_channels)
    distance = np.linalg.norm(locations[:, None] - locations[None], axis=2)
    near = distance <= params.detect_radius_um  # [recorded channel, candidate peak channel]
    channels = np.arange(len(locations))

    segment_of = events["segment"].astype(np.int64)
    samples = events["sample_index"].astype(np.int64)
    kernel_of = np.zeros(n, dtype=np.int64)
    dense_kernels = []  # every segment's kernels, dense [channels, output channels], one list
    offsets = {}  # segment -> the index of its first kernel in that list
    for g in np.unique(segment_of):
        segment = corrected.segments[int(g)]
        at = np.flatnonzero(segment_of == g)
        kernels = getattr(segment, "kernels", None)
        if kernels is None:
            raise ValueError("interpolated_events needs KrigingMotionRecording's kriging segments")
        times = segment.parent_recording_segment.sample_index_to_time(samples[at])
        edges = segment.interpolation_time_bin_edges_s
        bins = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, len(edges) - 2)
        offsets[int(g)] = len(dense_kernels)
        for dense, blocks in kernels:
            if dense is None:  # rebuilt from its blocks
                dense = np.zeros((len(locations), segment.num_out), dtype=np.float32)
                for columns, rows, block in blocks:
                    dense[rows, columns] = block
            dense_kernels.append(dense)
        kernel_of[at] = offsets[int(g)] + segment.kernel_index[bins]

    waveform = np.zeros((n, schema.num_samples, schema.num_channels), dtype=np.float16)
    amplitude = np.zeros(n, dtype=np.float32)
    peak = np.zeros(n, dtype=np.int64)
    moved = samples.copy()
    lengths = [corrected.get_num_samples(g) for g in range(corrected.get_num_segments())]
    order = np.lexsort((samples, kernel_of))  # by kernel, then time
    starts = range(0, n, INTERPOLATE_BLOCK_EVENTS)

    def one(start: int) -> None:
        rows = order[start: start + INTERPOLATE_BLOCK_EVENTS]
        # the rows of one block may span kernels: each run of one kernel multiplied once
        runs = np.flatnonzero(np.diff(kernel_of[rows])) + 1
        for run in np.split(rows, runs):
            g = int(segment_of[run[0]])
            # [m, PEAK_SHIFT + L + PEAK_SHIFT, C]: the window with room for the peak to move
            w = windows(g, samples[run], nb_o + PEAK_SHIFT, na_o + PEAK_SHIFT, channels)
            w = w @ dense_kernels[kernel_of[run[0]]]
            around = w[:, nb_o: nb_o + 2 * PEAK_SHIFT + 1]  # [m, 2 PEAK_SHIFT + 1, C] around the detected sample
            score = -around if params.peak_sign == "neg" else around if params.peak_sign == "pos" else np.abs(around)
            shifts = samples[run, None] + np.arange(-PEAK_SHIFT, PEAK_SHIFT + 1)  # the candidate peak samples
            inside = (shifts - nb_o >= 0) & (shifts + na_o <= lengths[g])
            score = np.where(near[channel_index[run]][:, None, :] & inside[:, :, None], score, -np.inf)
            flat = np.argmax(score.reshape(len(run), -1), axis=1)
            shift, best = np.divmod(flat, score.shape[2])
            chans = neighbours[best]  # [m, K]
            valid = chans >= 0
            frames = shift[:, None] + np.arange(nb_o + na_o)  # the peak at frame nb_o of the window kept
            wf = w[np.arange(len(run))[:, None, None], frames[:, :, None], np.where(valid, chans, 0)[:, None, :]]
            if matrix is not None:
                wf = np.einsum("tl,nlk->ntk", matrix, wf)
            wf = wf * valid[:, None, :]
            waveform[run] = wf.astype(np.float16)
            amplitude[run] = wf[:, schema.nbefore, 0]
            peak[run] = best
            moved[run] = samples[run] + shift - PEAK_SHIFT

    thread_map(one, starts, n_threads)

    channel_ids = np.asarray([str(c) for c in corrected.channel_ids])
    out = dict(events)
    out.update({
        "waveform": waveform,
        "channel_offsets_um": offsets_um[peak],
        "channel_mask": mask[peak],
        "sample_index": moved.astype(events["sample_index"].dtype),
        "amplitude_uv": amplitude,
        "noise_level_uv": np.asarray(noise_levels, dtype=np.float32)[peak],
        "peak_channel_id": channel_ids[peak],
    })
    # in time order again, each (segment, sample, channel) once: two detections of one spike on
    # contacts further apart than the detection radius can move to the same corrected peak
    order = np.lexsort((peak, moved, segment_of))
    key = np.stack([segment_of[order], moved[order], peak[order]], axis=1)
    first = np.ones(n, dtype=bool)
    first[1:] = np.any(key[1:] != key[:-1], axis=1)
    return {name: values[order[first]] for name, values in out.items()}
