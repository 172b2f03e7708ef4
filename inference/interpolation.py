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
