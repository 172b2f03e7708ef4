"""SpikeInterface's bandpass filter and common median reference, computed faster, same results.

Bandpass, in float32.

``scipy.signal.sosfiltfilt`` computes in the common type of its coefficients and its input: with
SpikeInterface's float64 coefficients every chunk is filtered in float64, even when the output is
float32. The same second-order sections in float32 filter three times faster here, and differ
from the float64 result by less than 0.002 uV on traces whose noise is several uV. Everything
else (coefficients, margins, direction, serialisation) is SpikeInterface's own
``BandpassFilterRecording``; the class is importable, so worker processes rebuild it from its
kwargs like any SpikeInterface preprocessor.

Common median reference, by one partition per sample. ``np.median`` along the channels of a
``[time, channels]`` chunk takes three times longer than ``np.partition`` at the middle index plus
the maximum of the lower half, which give the same value bit for bit (the mean of the two middle
values for an even channel count). The reference is computed on every chunk of every pass, and on a
64-channel probe it cost as much as the filter. NaNs (never in a checked recording) fall back to
``np.median``. Everything else is SpikeInterface's ``CommonReferenceRecording``.

Scaling, in one pass. SpikeInterface's ``ScaleRecording`` converts each chunk to float32, then
multiplies by the gains and adds the offsets in place: three passes over the chunk (four with
rounding to an integer type). One ``np.multiply`` into a float32 output computes the same products
(in float64, rounded to float32 once, as the in-place product does) in half the time: 2.7 ms
against 5.5 ms on a 1 s, 64-channel int16 chunk, bit for bit the same. The sort reads its int16
cache of the preprocessed traces back through it on every pass.
"""

from __future__ import annotations

import numpy as np
from spikeinterface.preprocessing.common_reference import CommonReferenceRecording
from spikeinterface.preprocessing.filter import BandpassFilterRecording
from spikeinterface.preprocessing.normalize_scale import ScaleRecording, ScaleRecordingSegment


class Float32BandpassRecording(BandpassFilterRecording):
    """``BandpassFilterRecording`` whose second-order sections are float32 (float32 output)."""

    def __init__(self, recording, freq_min=300.0, freq_max=6000.0, margin_ms="auto", dtype="float32", **kwargs):
        super().__init__(recording, freq_min=freq_min, freq_max=freq_max, margin_ms=margin_ms, dtype=dtype, **kwargs)
        if kwargs.get("filter_mode", "sos") == "sos" and np.dtype(self.get_dtype()) == np.float32:
            for segment in self.segments:
                segment.coeff = np.asarray(segment.coeff, dtype=np.float32)


def bandpass_float32(recording, freq_min: float, freq_max: float) -> Float32BandpassRecording:
    """Lazy float32 bandpass filter (SpikeInterface's Butterworth, order 5, forward-backward)."""
    return Float32BandpassRecording(recording, freq_min=freq_min, freq_max=freq_max, dtype="float32")


def fast_median(x: np.ndarray, axis: int = 1, keepdims: bool = False) -> np.ndarray:
    """``np.median(x, axis, keepdims=keepdims)`` along the last axis of a 2-D array by one
    partition (identical values); anything else goes to ``np.median``."""
    if x.ndim != 2 or axis not in (1, -1) or x.shape[1] == 0 or not np.issubdtype(x.dtype, np.floating) \
            or np.isnan(x).any():
        return np.median(x, axis=axis, keepdims=keepdims)
    n = x.shape[1]
    k = n // 2
    part = np.partition(x, k, axis=1)
    med = part[:, k]
    if n % 2 == 0:  # the lower middle value is the largest of the values partitioned below k
        med = (part[:, :k].max(axis=1) + med) * x.dtype.type(0.5)
    return med[:, None] if keepdims else med


class FastMedianReferenceRecording(CommonReferenceRecording):
    """``CommonReferenceRecording`` whose median is :func:`fast_median` (same values)."""

    def __init__(self, recording, reference="global", operator="median", **kwargs):
        super().__init__(recording, reference=reference, operator=operator, **kwargs)
        if operator == "median":
            for segment in self.segments:
                segment.operator_func = fast_median


def common_median_reference(recording) -> FastMedianReferenceRecording:
    """Lazy global common median reference (SpikeInterface's, with a faster median)."""
    return FastMedianReferenceRecording(recording, reference="global", operator="median")


#: Trace dtypes that float32 holds exactly: scaling them without a float32 copy first is exact.
_EXACT_IN_FLOAT32 = (np.int8, np.uint8, np.int16, np.uint16, np.float32)


class _OnePassScaleSegment(ScaleRecordingSegment):
    def get_traces(self, start_frame, end_frame, channel_indices) -> np.ndarray:
        traces = self.parent_recording_segment.get_traces(start_frame, end_frame, channel_indices)
        if traces.dtype.type not in _EXACT_IN_FLOAT32:
            traces = traces.astype(np.float32)
        gain, offset = self.gain[:, channel_indices], self.offset[:, channel_indices]
        scaled = np.empty(traces.shape, dtype=np.float32)
        np.multiply(traces, gain, out=scaled, casting="same_kind")
        if np.any(offset):
            np.add(scaled, offset, out=scaled, casting="same_kind")
        if np.issubdtype(self._dtype, np.integer):
            np.round(scaled, out=scaled)
        return scaled.astype(self._dtype, copy=False)


class OnePassScaleRecording(ScaleRecording):
    """``ScaleRecording`` whose chunks are scaled in one pass (the same values, bit for bit)."""

    def __init__(self, recording, gain=1.0, offset=0.0, dtype="float32"):
        super().__init__(recording, gain=gain, offset=offset, dtype=dtype)
        for i, segment in enumerate(self.segments):
            fast = _OnePassScaleSegment(segment.parent_recording_segment, segment.gain, segment.offset,
                                        segment._dtype)
            fast.set_parent_extractor(self)
            self.segments[i] = fast
