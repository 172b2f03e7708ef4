"""Spike-event extraction: the one code path shared by corpus building and inference.

The flow reads top to bottom::

    load_recording(path)                       any format SpikeInterface reads
    check_recording(recording, schema, params) refuse bad input with a message for people
    preprocess(recording, params)              microvolts -> bandpass -> common median reference
    iter_event_blocks(recording, ...)          detect + extract in ONE chunked pass, blocks of events

Detection and extraction run as one SpikeInterface node pipeline
(:func:`spikeinterface.core.node_pipeline.run_node_pipeline`): the ``locally_exclusive`` peak
detector feeds :class:`NeighbourWaveforms`, a pipeline node that cuts the window around each peak on
the K channels nearest the peak channel and resamples it to the schema's canonical rate. The
pipeline's outputs are gathered to ``.npy`` files in a temporary folder and read back in blocks
with plain file reads, so memory does not grow with the recording's length.

Conventions (part of the event contract, see ``spikevault.schema``):

* ``waveform`` is ``[T, K]`` float16 in microvolts; the peak sample sits at ``schema.nbefore``.
* Channel ``k`` of an event is the k-th nearest channel to the peak channel by Euclidean distance
  between contact positions (ties broken by channel index; the peak channel is always first).
  Slots beyond the probe's channel count are masked (``channel_mask`` false) and zero.
* ``sample_index`` is the peak sample at the recording's own rate; events whose window does not fit
  inside the segment (first/last ~1 ms) are dropped.
* Events come in time order: by segment, then sample index, then peak channel index.
* Same recording and parameters, same bytes (any ``n_jobs``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .jit import cache_spikeinterface_kernels
from .schema import DEFAULT_SCHEMA, EventSchema, concat_blocks, slice_block

logger = logging.getLogger(__name__)

#: Sampling rates we accept, in Hz. Below 10 kHz a spike (~1 ms) is too coarsely sampled to
#: resample faithfully; above 100 kHz nothing we know of records extracellular spikes.
SUPPORTED_RATE_RANGE_HZ = (10_000.0, 100_000.0)
#: Recordings shorter than this (per longest segment) are refused as "too short".
MIN_DURATION_S = 0.1
#: The common median reference is applied only with at least this many channels: on a tetrode or
#: a wire, a spike is on most channels and the median would subtract part of it.
MIN_CHANNELS_FOR_CMR = 8
#: Window, in ms, for matching a detected peak to a ground-truth spike (SpikeInterface's
#: ``compare_sorter_to_ground_truth`` default ``delta_time``).
MATCH_DELTA_MS = 0.4
#: Extra samples cut on each side of the window when resampling, so the spline is well behaved.
_RESAMPLE_PAD = 4

LABEL_SOURCES = ("ground_truth", "curated", "none")


# ------------------------------------------------------------------------------------------ params
@dataclass
class ExtractParams:
    """Preprocessing and detection parameters (stored in manifests and checkpoints).

    Attributes
    ----------
    freq_min_hz : float
        Bandpass low cut-off (Hz).
    freq_max_hz : float
        Bandpass high cut-off (Hz); must be below half the sampling rate.
    reference : str
        ``"median"``: global common median reference (on probes with at least
        ``MIN_CHANNELS_FOR_CMR`` channels); ``"none"``: no re-referencing.
    detect_threshold : float
        Detection threshold in multiples of each channel's MAD noise level.
    peak_sign : str
        ``"neg"``, ``"pos"`` or ``"both"``.
    exclude_sweep_ms : float
        A peak is kept only if it is the largest within this many ms and ``detect_radius_um``.
    detect_radius_um : float
        Spatial radius of the locally exclusive detection.
    chunk_duration : str
        Chunk length of the chunked pass (e.g. ``"1s"``); part of the parameters because it
        fixes the chunking and hence the exact output bytes.
    """

    freq_min_hz: float = 300.0
    freq_max_hz: float = 6000.0
    reference: str = "median"
    detect_threshold: float = 5.0
    peak_sign: str = "neg"
    exclude_sweep_ms: float = 0.2
    detect_radius_um: float = 50.0
    chunk_duration: str = "1s"

    def __post_init__(self):
        problems = []
        if not 0 <= self.freq_min_hz < self.freq_max_hz:
            problems.append(
                f"freq_min_hz/freq_max_hz must satisfy 0 <= freq_min_hz < freq_max_hz "
                f"(got {self.freq_min_hz}, {self.freq_max_hz})"
            )
        if self.reference not in ("median", "none"):
            problems.append(f"reference must be 'median' or 'none' (got {self.reference!r})")
        if not self.detect_threshold > 0:
            problems.append(f"detect_threshold must be > 0 (got {self.detect_threshold})")
        if self.peak_sign not in ("neg", "pos", "both"):
            problems.append(f"peak_sign must be 'neg', 'pos' or 'both' (got {self.peak_sign!r})")
        if not self.exclude_sweep_ms > 0:
            problems.append(f"exclude_sweep_ms must be > 0 (got {self.exclude_sweep_ms})")
        if not self.detect_radius_um >= 0:
            problems.append(f"detect_radius_um must be >= 0 (got {self.detect_radius_um})")
        if not isinstance(self.chunk_duration, str) or not self.chunk_duration.strip():
            problems.append(f"chunk_duration must be a duration string such as '1s' (got {self.chunk_duration!r})")
        if problems:
            raise ValueError("invalid extraction parameters: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractParams":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown extraction parameters {unknown}; known: {sorted(known)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------ input
def load_recording(path_or_recording):
    """Open a recording from a path (or pass a recording object through).

    Recognised inputs:

    * a folder saved by SpikeInterface (``recording.save(folder=...)``, binary or zarr) or a
      SpikeInterface ``.json``/``.pkl`` dump, or a ``.zarr`` folder: :func:`spikeinterface.load`;
    * an NWB file (``.nwb``): :func:`spikeinterface.extractors.read_nwb_recording`;
    * a MEArec file (``.h5``/``.hdf5``): ``read_mearec`` (needs the ``MEArec`` package);
    * a SpikeGLX folder (``*.ap.bin`` + ``*.meta``): ``read_spikeglx`` (the first AP stream);
    * an Open Ephys folder (``structure.oebin`` or ``settings.xml`` below it): ``read_openephys``.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        The path exists but cannot be read as a recording (the message names the path, the
        reader tried and its error).
    """
    from spikeinterface.core import BaseRecording

    if isinstance(path_or_recording, BaseRecording):
        return path_or_recording
    path = Path(path_or_recording)
    if not path.exists():
        raise FileNotFoundError(f"recording {path} does not exist")

    import spikeinterface as si

    suffix = path.suffix.lower()
    reader = None
    try:
        if path.is_dir():
            if (path / "si_folder.json").exists() or suffix == ".zarr" or (path / "binary.json").exists():
                reader = "spikeinterface.load"
                rec = si.load(path)
            elif any(path.glob("*.ap.bin")) or any(path.glob("*/*.ap.bin")):
                reader = "read_spikeglx"
                from spikeinterface.extractors import read_spikeglx, get_neo_streams

                stream_names, _ = get_neo_streams("spikeglx", path)
                ap = sorted(s for s in stream_names if s.endswith(".ap"))
                rec = read_spikeglx(path, stream_name=ap[0] if ap else stream_names[0])
            elif any(path.rglob("structure.oebin")) or any(path.rglob("settings.xml")):
                reader = "read_openephys"
                from spikeinterface.extractors import read_openephys

                rec = read_openephys(path)
            else:
                raise ValueError(
                    "folder layout not recognised (expected a SpikeInterface folder, a SpikeGLX folder "
                    "with *.ap.bin/*.meta, or an Open Ephys folder with structure.oebin/settings.xml)"
                )
        elif suffix == ".nwb":
            reader = "read_nwb_recording"
            from spikeinterface.extractors import read_nwb_recording

            rec = read_nwb_recording(path)
        elif suffix in (".h5", ".hdf5"):
            reader = "read_mearec"
            from spikeinterface.extractors import read_mearec

            rec, _ = read_mearec(path)
        elif suffix in (".json", ".pkl", ".pickle"):
            reader = "spikeinterface.load"
            rec = si.load(path)
        else:
            raise ValueError(
                f"file type {suffix or '(none)'} not recognised; give a SpikeInterface folder, .nwb, "
                "MEArec .h5, a SpikeGLX or Open Ephys folder (a raw .bin/.dat needs its rate, dtype and "
                "channel count: wrap it with spikeinterface.read_binary and save it as a folder)"
            )
    except Exception as err:  # noqa: BLE001 - re-raised with the path and the reader
        via = f" with {reader}" if reader else ""
        raise ValueError(f"cannot read recording {path}{via}: {type(err).__name__}: {err}") from err
    if not isinstance(rec, BaseRecording):
        raise ValueError(f"{path} holds a {type(rec).__name__}, not a recording")
    return rec


def _recording_name(recording, recording_id: str | None = None) -> str:
    if recording_id:
        return f"recording {recording_id!r}"
    return f"recording {getattr(recording, 'name', None) or type(recording).__name__}"


def check_recording(
    recording,
    schema: EventSchema = DEFAULT_SCHEMA,
    params: ExtractParams | None = None,
    recording_id: str | None = None,
) -> None:
    """Refuse recordings that cannot give valid events, with a message that says how to fix it.

    Checks: at least one channel; channel locations (a probe) attached; sampling rate within
    ``SUPPORTED_RATE_RANGE_HZ`` and above twice ``freq_max_hz``; not empty and at least
    ``MIN_DURATION_S`` long (and longer than one event window); no NaN/inf in a sample of random
    chunks (the extraction pass also checks every chunk it filters).

    Raises
    ------
    ValueError
        Naming the recording and the problem.
    """
    params = params or ExtractParams()
    name = _recording_name(recording, recording_id)
    num_channels = recording.get_num_channels()
    if num_channels < 1:
        raise ValueError(f"{name} has no channels; check the stream/channel selection of the reader")
    try:
        locations = recording.get_channel_locations()
    except Exception:  # noqa: BLE001 - SpikeInterface raises a bare error when there is no probe
        locations = None
    if locations is None or len(locations) != num_channels or not np.all(np.isfinite(locations)):
        raise ValueError(
            f"{name} has no channel locations: attach a probe (recording.set_probe(probe) with a "
            "probeinterface Probe, or recording.set_channel_locations(xy_um)) before extracting events"
        )
    fs = float(recording.get_sampling_frequency())
    lo, hi = SUPPORTED_RATE_RANGE_HZ
    if not lo <= fs <= hi:
        raise ValueError(
            f"{name} has an unsupported sampling rate of {fs:g} Hz: spikevault extracts events from "
            f"recordings sampled at {lo / 1000:g}-{hi / 1000:g} kHz (is the rate set correctly by the reader?)"
        )
    if params.freq_max_hz >= fs / 2:
        raise ValueError(
            f"{name}: freq_max_hz={params.freq_max_hz:g} is not below the Nyquist frequency ({fs / 2:g} Hz); "
            "lower --freq-max-hz"
        )
    lengths = [recording.get_num_samples(s) for s in range(recording.get_num_segments())]
    if sum(lengths) == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    window_s = max(MIN_DURATION_S, 2 * (schema.ms_before + schema.ms_after) / 1000.0)
    if max(lengths) / fs < window_s:
        raise ValueError(
            f"{name} is too short: its longest segment lasts {max(lengths) / fs:.4g} s, "
            f"at least {window_s:g} s is needed to extract events"
        )
    if recording.get_dtype().kind == "f":
        from spikeinterface.core import get_random_data_chunks

        chunk_size = int(min(10_000, min(n for n in lengths if n > 0)))
        data = get_random_data_chunks(
            recording, return_in_uV=False, num_chunks_per_segment=5, chunk_size=chunk_size, seed=0, concatenated=True
        )
        if not np.all(np.isfinite(data)):
            bad = np.flatnonzero(~np.all(np.isfinite(data), axis=0))
            ids = [str(c) for c in recording.channel_ids[bad][:5]]
            raise ValueError(
                f"{name} contains NaN or infinite samples (channels {', '.join(ids)}); "
                "fix or remove those channels/segments before extracting events"
            )


# ------------------------------------------------------------------------------------ preprocess
def preprocess(recording, params: ExtractParams | None = None, read_directly: bool = True):
    """Microvolt scaling, bandpass filter and common median reference (lazy SpikeInterface chain).

    1. with ``read_directly``, a binary recording's files read around the page cache
       (:class:`spikevault.direct_io.DirectReadRecording`: the same traces; a recording is read
       once, front to back, and reading it through the cache cost more than the disk did);
    2. ``scale_to_uV`` when the recording has gains/offsets other than 1/0 (traces without gains
       are taken to be in microvolts already; a warning says so);
    3. SpikeInterface's ``bandpass_filter(freq_min_hz, freq_max_hz)``, computed in float32
       (:mod:`spikevault.filters`: three times faster than its float64 default, same result to
       within 0.002 uV);
    4. ``common_reference(reference="global", operator="median")`` (:mod:`spikevault.filters`:
       the same values, three times faster) when ``reference="median"`` and
       the probe has at least ``MIN_CHANNELS_FOR_CMR`` channels (on a wire or a tetrode a spike is
       on most channels and the median would subtract part of it, so the step is skipped).

    Returns
    -------
    recording : spikeinterface.BaseRecording
        Float32 traces in microvolts, gain 1, offset 0.
    """
    import spikeinterface.preprocessing as spre

    params = params or ExtractParams()
    rec = recording
    if read_directly:
        from .direct_io import DirectReadRecording, direct_readable

        if direct_readable(rec):
            rec = DirectReadRecording(rec)
    if rec.has_scaleable_traces():
        gains, offsets = rec.get_channel_gains(), rec.get_channel_offsets()
        if not (np.all(gains == 1) and np.all(offsets == 0)):
            rec = spre.scale_to_uV(rec)
    else:
        logger.warning("%s has no gains: its traces are taken to be in microvolts", _recording_name(recording))
    from .filters import bandpass_float32, common_median_reference

    rec = bandpass_float32(rec, params.freq_min_hz, params.freq_max_hz)
    if params.reference == "median" and rec.get_num_channels() >= MIN_CHANNELS_FOR_CMR:
        rec = common_median_reference(rec)
    rec.set_channel_gains(1.0)
    rec.set_channel_offsets(0.0)
    return rec


# ----------------------------------------------------------------------------------- geometry
def neighbour_table(locations: np.ndarray, num_channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The K nearest channels of every channel.

    Parameters
    ----------
    locations : np.ndarray
        ``[C, 2 or 3]`` contact positions in micrometres (only x, y are used).
    num_channels : int
        K.

    Returns
    -------
    neighbours : np.ndarray
        ``[C, K]`` int64 channel indices, peak channel first, then by distance, ties by index;
        ``-1`` where the probe has fewer than K channels.
    offsets_um : np.ndarray
        ``[C, K, 2]`` float32 x, y of each neighbour relative to the channel (0 where masked).
    mask : np.ndarray
        ``[C, K]`` bool, false for padding.
    """
    xy = np.asarray(locations, dtype="float64")[:, :2]
    C, K = xy.shape[0], int(num_channels)
    dist = np.linalg.norm(xy[:, None, :] - xy[None, :, :], axis=2)
    idx = np.arange(C)
    neighbours = np.full((C, K), -1, dtype="int64")
    for c in range(C):
        # primary key: not the channel itself; then distance; then index
        order = np.lexsort((idx, dist[c], idx != c))[:K]
        neighbours[c, : order.size] = order
    mask = neighbours >= 0
    safe = np.where(mask, neighbours, 0)
    offsets = (xy[safe] - xy[:, None, :]).astype("float32")
    offsets[~mask] = 0.0
    return neighbours, offsets, mask


def _resample_matrix(fs_orig: float, schema: EventSchema) -> tuple[np.ndarray | None, int, int]:
    """Window (nbefore, nafter) at the original rate and the [T, L] cubic-spline resampling matrix.

    The matrix maps the L original samples of a window onto the T canonical samples so that the
    peak (original sample ``nbefore_orig``) lands exactly on canonical index ``schema.nbefore``.
    Returns ``None`` for the matrix when the rates are equal (plain slicing).
    """
    fs_c = float(schema.sampling_rate_hz)
    T, nb = schema.num_samples, schema.nbefore
    if abs(fs_orig - fs_c) < 1e-6 * fs_c:
        return None, nb, T - nb
    from scipy.interpolate import CubicSpline

    ratio = fs_orig / fs_c
    nb_o = int(np.ceil(nb * ratio)) + _RESAMPLE_PAD
    na_o = int(np.ceil((T - 1 - nb) * ratio)) + 1 + _RESAMPLE_PAD
    L = nb_o + na_o
    positions = nb_o + (np.arange(T) - nb) * ratio  # canonical sample times in original samples
    spline = CubicSpline(np.arange(L, dtype="float64"), np.eye(L), axis=0)
    matrix = spline(positions).astype("float32")  # [T, L]
    matrix[nb] = 0.0
    matrix[nb, nb_o] = 1.0  # exact at the peak
    return matrix, nb_o, na_o


# ---------------------------------------------------------------------------- the pipeline node
_NODE_CLASS = None


def _node_class():
    """The pipeline node class, built on first use (keeps SpikeInterface out of import time).

    It is published as the module attribute ``NeighbourWaveforms`` (see ``__getattr__``) so that
    worker processes can unpickle it.
    """
    global _NODE_CLASS
    if _NODE_CLASS is not None:
        return _NODE_CLASS
    from spikeinterface.core.node_pipeline import PipelineNode

    class NeighbourWaveforms(PipelineNode):
        """Node pipeline step: per peak, the window on its K nearest channels at the canonical rate.

        Outputs ``waveforms`` float16 ``[n, T, K]`` (masked slots zero) and ``amplitudes`` float32
        ``[n]`` (value at the peak sample on the peak channel). Also checks every chunk for NaN/inf.
        """

        _compute_has_extended_signature = True

        def __init__(self, recording, parents, neighbours, nbefore, nafter, matrix, canonical_nbefore, where,
                     return_output=True):
            PipelineNode.__init__(self, recording, return_output=return_output, parents=parents)
            self.neighbours = neighbours
            self.nbefore = int(nbefore)
            self.nafter = int(nafter)
            self.matrix = matrix
            self.canonical_nbefore = int(canonical_nbefore)
            self.where = where
            self._kwargs.update(dict(neighbours=neighbours, nbefore=nbefore, nafter=nafter, matrix=matrix,
                                     canonical_nbefore=canonical_nbefore, where=where))

        def get_margin(self):
            return max(self.nbefore, self.nafter)

        def get_dtype(self):
            return np.dtype("float16")

        def compute(self, traces, start_frame, end_frame, segment_index, max_margin, peaks):
            if not np.isfinite(traces).all():
                raise ValueError(
                    f"{self.where} contains NaN or infinite samples in segment {segment_index} between "
                    f"samples {start_frame} and {end_frame}; fix or remove them before extracting events"
                )
            chans = self.neighbours[peaks["channel_index"]]  # [n, K]
            valid = chans >= 0
            times = peaks["sample_index"][:, None] + np.arange(-self.nbefore, self.nafter)  # [n, L]
            wf = traces[times[:, :, None], np.where(valid, chans, 0)[:, None, :]]  # [n, L, K]
            wf = np.asarray(wf, dtype="float32")
            if self.matrix is not None:
                wf = np.einsum("tl,nlk->ntk", self.matrix, wf)
            wf = wf * valid[:, None, :]  # [n, T, K]
            amplitudes = np.ascontiguousarray(wf[:, self.canonical_nbefore, 0], dtype="float32")
            return wf.astype("float16"), amplitudes

    NeighbourWaveforms.__module__ = __name__
    NeighbourWaveforms.__qualname__ = "NeighbourWaveforms"
    _NODE_CLASS = NeighbourWaveforms
    return NeighbourWaveforms


def __getattr__(name):
    if name == "NeighbourWaveforms":
        return _node_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------- GT labels
def _unit_label_map(sorting) -> np.ndarray:
    """Integer label of each unit (by unit index): the id itself when ids are integers, else the index."""
    ids = sorting.unit_ids
    try:
        as_int = np.array([int(str(u)) for u in ids], dtype="int64")
        if np.all(as_int >= 0) and len(set(as_int.tolist())) == len(ids):
            return as_int
    except (TypeError, ValueError):
        pass
    return np.arange(len(ids), dtype="int64")


class _LabelMatcher:
    """Match detected peaks to the nearest ground-truth spike within ``MATCH_DELTA_MS``.

    Among the GT spikes within the window, the one whose unit's main channel (sorting property
    ``main_channel_id``, when present) is nearest the peak channel wins, then the nearest in time,
    then the earlier one. Deterministic.
    """

    def __init__(self, sorting, recording, delta_frames: int):
        fs_r, fs_s = recording.get_sampling_frequency(), sorting.get_sampling_frequency()
        if abs(fs_r - fs_s) > 1e-6 * fs_r:
            raise ValueError(
                f"the sorting's sampling rate ({fs_s:g} Hz) differs from the recording's ({fs_r:g} Hz); "
                "give the sorting of this recording"
            )
        if sorting.get_num_segments() != recording.get_num_segments():
            raise ValueError(
                f"the sorting has {sorting.get_num_segments()} segments, the recording "
                f"{recording.get_num_segments()}; give the sorting of this recording"
            )
        spikes = sorting.to_spike_vector()
        self.labels_of_unit = _unit_label_map(sorting)
        self.delta = int(delta_frames)
        self.by_segment = []
        for seg in range(sorting.get_num_segments()):
            s = spikes[spikes["segment_index"] == seg]
            order = np.lexsort((s["unit_index"], s["sample_index"]))
            self.by_segment.append((s["sample_index"][order].astype("int64"), s["unit_index"][order].astype("int64")))
        self.unit_xy = None
        main = sorting.get_property("main_channel_id")
        if main is not None:
            try:
                ind = recording.ids_to_indices(main)
                self.unit_xy = np.asarray(recording.get_channel_locations(), float)[ind, :2]
            except Exception:  # noqa: BLE001 - ids from another recording: fall back to time only
                self.unit_xy = None

    def match(self, segment: int, samples: np.ndarray, peak_xy: np.ndarray) -> np.ndarray:
        gt_t, gt_u = self.by_segment[segment]
        out = np.full(samples.size, -1, dtype="int64")
        if gt_t.size == 0 or samples.size == 0:
            return out
        lo = np.searchsorted(gt_t, samples - self.delta, side="left")
        hi = np.searchsorted(gt_t, samples + self.delta, side="right")
        best_key = np.full((samples.size, 2), np.inf)
        best = np.full(samples.size, -1, dtype="int64")
        for j in range(int((hi - lo).max(initial=0))):
            k = lo + j
            ok = k < hi
            kk = np.where(ok, k, 0)
            dt = np.abs(gt_t[kk] - samples).astype(float)
            if self.unit_xy is not None:
                dx = np.linalg.norm(self.unit_xy[gt_u[kk]] - peak_xy, axis=1)
            else:
                dx = np.zeros(samples.size)
            better = ok & ((dx < best_key[:, 0]) | ((dx == best_key[:, 0]) & (dt < best_key[:, 1])))
            best_key[better, 0] = dx[better]
            best_key[better, 1] = dt[better]
            best[better] = kk[better]
        found = best >= 0
        out[found] = self.labels_of_unit[gt_u[best[found]]]
        return out


# ------------------------------------------------------------------------------------ extraction
def _probe_name(recording) -> str:
    ann = recording.get_annotation("probe_name") if "probe_name" in recording.get_annotation_keys() else None
    if ann:
        return str(ann)
    try:
        probe = recording.get_probe()
        for attr in ("model_name", "name"):
            v = getattr(probe, attr, None)
            if v:
                return str(v)
        if getattr(probe, "manufacturer", None):
            return str(probe.manufacturer)
    except Exception:  # noqa: BLE001 - no probe / a probe group: fall through
        pass
    return f"unknown-{recording.get_num_channels()}ch"


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _read_npy_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a C-order ``.npy`` file with plain reads (no memory map kept)."""
    with open(path, "rb") as f:
        shape, fortran, dtype = _npy_header(f)
        assert not fortran
        row = int(np.prod(shape[1:], dtype="int64"))
        f.seek(f.tell() + start * row * dtype.itemsize)
        count = max(0, min(stop, shape[0]) - start) * row
        return np.fromfile(f, dtype=dtype, count=count).reshape((-1, *shape[1:]))


def _npy_len(path: Path) -> int:
    with open(path, "rb") as f:
        shape, _, _ = _npy_header(f)
    return int(shape[0])


def _assemble(paths, start, stop, nb_o, na_o, seg_lengths, matcher, xy, offsets_um, mask, noise_levels, fs,
              channel_ids, recording_id, label_source, probe_name):
    """Rows ``start:stop`` of the pipeline outputs as an event block (edge peaks dropped)."""
    peaks = _read_npy_rows(paths["peaks"], start, stop)
    seg = peaks["segment_index"].astype("int64")
    s = peaks["sample_index"].astype("int64")
    keep = (s - nb_o >= 0) & (s + na_o <= seg_lengths[seg])
    if not keep.any():
        return None
    wf = _read_npy_rows(paths["waveforms"], start, stop)[keep]
    amp = _read_npy_rows(paths["amplitudes"], start, stop)[keep]
    peaks, seg, s = peaks[keep], seg[keep], s[keep]
    ch = peaks["channel_index"].astype("int64")
    labels = np.full(s.size, -1, dtype="int64")
    if matcher is not None:
        for g in np.unique(seg):
            m = seg == g
            labels[m] = matcher.match(int(g), s[m], xy[ch[m]])
    n = s.size
    return {
        "waveform": np.ascontiguousarray(wf, dtype="float16"),
        "channel_offsets_um": offsets_um[ch],
        "channel_mask": mask[ch],
        "segment": seg.astype("int32"),
        "sample_index": s,
        "amplitude_uv": amp.astype("float32"),
        "noise_level_uv": noise_levels[ch],
        "unit_label": labels,
        "sampling_rate_hz": np.full(n, fs, dtype="float32"),
        "recording_id": np.full(n, str(recording_id)),
        "peak_channel_id": channel_ids[ch],
        "label_source": np.full(n, label_source),
        "probe": np.full(n, str(probe_name)),
    }


def iter_event_blocks(
    recording,
    *,
    schema: EventSchema = DEFAULT_SCHEMA,
    params: ExtractParams | None = None,
    recording_id: str,
    probe_name: str | None = None,
    sorting=None,
    label_source: str = "none",
    job_kwargs: dict | None = None,
    block_size: int = 4096,
    tmp_folder: str | Path | None = None,
    preprocessed: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Detect spikes and yield event blocks, in time order, with memory independent of length.

    Parameters
    ----------
    recording : spikeinterface.BaseRecording
        Raw recording (or already :func:`preprocess`-ed with ``preprocessed=True``).
    schema : EventSchema
        Window, K and canonical rate of the events.
    params : ExtractParams
        Preprocessing and detection parameters.
    recording_id : str
        Stored in every event; provenance is joined on it.
    probe_name : str, optional
        Stored in every event; default from the recording's ``probe_name`` annotation or its probe.
    sorting : spikeinterface.BaseSorting, optional
        Ground-truth or curated sorting of this recording; gives ``unit_label`` (-1 when a peak
        matches no spike within ``MATCH_DELTA_MS``).
    label_source : {"ground_truth", "curated", "none"}
        Must be ``"none"`` exactly when ``sorting`` is None.
    job_kwargs : dict, optional
        SpikeInterface job kwargs (``n_jobs``, ``progress_bar``, ``pool_engine``, ...).
        ``chunk_duration`` comes from ``params``.
    block_size : int
        Events per yielded block (the last block may be smaller).
    tmp_folder : path, optional
        Where the pipeline's temporary ``.npy`` files go (a fresh sub-folder, removed afterwards).
    preprocessed : bool
        Skip :func:`preprocess` (the recording is already filtered, referenced and in microvolts).

    Returns
    -------
    blocks : Iterator[dict[str, np.ndarray]]
        Event blocks valid under ``schema.validate_block``. The input is checked, preprocessed and
        its noise measured when this function is called (bad input raises here); detection and
        extraction run when the iterator is first advanced.
    """
    params = params or ExtractParams()
    if label_source not in LABEL_SOURCES:
        raise ValueError(f"label_source must be one of {LABEL_SOURCES} (got {label_source!r})")
    if sorting is None and label_source != "none":
        raise ValueError(f"label_source={label_source!r} needs a sorting; pass sorting=... or label_source='none'")
    if sorting is not None and label_source == "none":
        raise ValueError("a sorting was given with label_source='none'; say whether it is 'ground_truth' or 'curated'")
    block_size = int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 (got {block_size})")
    if not recording_id:
        raise ValueError("recording_id must be a non-empty string")

    check_recording(recording, schema, params, recording_id=recording_id)
    where = _recording_name(recording, recording_id)
    probe_name = probe_name or _probe_name(recording)
    rec = recording if preprocessed else preprocess(recording, params)

    from spikeinterface.core.job_tools import fix_job_kwargs, job_keys
    from spikeinterface.sortingcomponents.peak_detection.method_list import detect_peak_methods

    cache_spikeinterface_kernels()  # the detector's kernel: compiled once per machine, not per worker

    fs = float(rec.get_sampling_frequency())
    jk = dict(progress_bar=False)
    for k, v in (job_kwargs or {}).items():
        if k not in job_keys:
            raise ValueError(f"unknown job kwarg {k!r}; known: {list(job_keys)}")
        if k not in ("chunk_size", "chunk_memory", "total_memory", "chunk_duration"):
            jk[k] = v
    jk["chunk_duration"] = params.chunk_duration
    jk = fix_job_kwargs(jk)

    noise_levels = event_noise_levels(rec, n_threads=int(jk.get("n_jobs", 1)))
    # a dead channel (zero noise) would detect every sample: give it an infinite threshold
    detect_noise = np.where(noise_levels > 0, noise_levels, np.inf).astype("float32")

    locations = rec.get_channel_locations()
    neighbours, offsets_um, mask = neighbour_table(locations, schema.num_channels)
    matrix, nb_o, na_o = _resample_matrix(fs, schema)

    detector = detect_peak_methods["locally_exclusive"](
        rec, peak_sign=params.peak_sign, detect_threshold=params.detect_threshold,
        exclude_sweep_ms=params.exclude_sweep_ms, radius_um=params.detect_radius_um,
        noise_levels=detect_noise, return_output=True,
    )
    node = _node_class()(rec, [detector], neighbours, nb_o, na_o, matrix, schema.nbefore, where)

    matcher = _LabelMatcher(sorting, rec, int(MATCH_DELTA_MS * fs / 1000.0)) if sorting is not None else None
    channel_ids = np.asarray([str(c) for c in rec.channel_ids])
    xy = np.asarray(locations, float)[:, :2]
    seg_lengths = np.array([rec.get_num_samples(s) for s in range(rec.get_num_segments())], dtype="int64")

    context = dict(nb_o=nb_o, na_o=na_o, seg_lengths=seg_lengths, matcher=matcher, xy=xy, offsets_um=offsets_um,
                   mask=mask, noise_levels=noise_levels, fs=fs, channel_ids=channel_ids, recording_id=recording_id,
                   label_source=label_source, probe_name=probe_name)
    # everything above ran eagerly (bad input raises at the call); the pass itself runs on iteration
    return _run_and_read(rec, [detector, node], jk, where, schema, block_size, tmp_folder, context)


def event_noise_levels(rec, n_threads: int = 1) -> np.ndarray:
    """Each channel's noise level (float32) as the events carry it and detection thresholds it:
    SpikeInterface's ``get_noise_levels`` (MAD) on 20 seeded chunks of 0.1 s per segment, 2 s of
    data per segment (plenty for a MAD estimate), the same values, faster."""
    from .filters import mad_noise_levels

    fs = rec.get_sampling_frequency()
    chunk = int(min(fs * 0.1, min(rec.get_num_samples(s) for s in range(rec.get_num_segments())) - 1))
    return mad_noise_levels(rec, num_chunks_per_segment=20, chunk_size=max(chunk, 1), seed=0,
                            n_threads=n_threads).astype("float32")


def _run_and_read(rec, nodes, jk, where, schema, block_size, tmp_folder, context):
    from spikeinterface.core.node_pipeline import run_node_pipeline

    recording_id = context["recording_id"]
    work = Path(tempfile.mkdtemp(prefix="spikevault-extract-", dir=tmp_folder))
    try:
        names = ["peaks", "waveforms", "amplitudes"]
        run_node_pipeline(
            rec, nodes, jk, job_name=f"extract {recording_id}", gather_mode="npy",
            dest=work / "out", names=names, squeeze_output=False,
        )
        paths = {n: work / "out" / f"{n}.npy" for n in names}
        total = _npy_len(paths["peaks"])
        logger.info("%s: %d peaks detected", where, total)
        pending: list[dict[str, np.ndarray]] = []
        num_pending = 0
        read_rows = max(block_size, 4096)
        for start in range(0, total, read_rows):
            stop = min(total, start + read_rows)
            block = _assemble(paths, start, stop, **context)
            if block is None:
                continue
            pending.append(block)
            num_pending += len(block["waveform"])
            while num_pending >= block_size:
                merged = concat_blocks(pending, schema)
                yield slice_block(merged, slice(0, block_size))
                rest = slice_block(merged, slice(block_size, None))
                num_pending = len(rest["waveform"])
                pending = [rest] if num_pending else []
        if num_pending:
            yield concat_blocks(pending, schema)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def extract_events(recording, **kwargs) -> dict[str, np.ndarray]:
    """All events of a recording as one block (small recordings, inference, tests).

    Takes the same keyword arguments as :func:`iter_event_blocks`.
    """
    schema = kwargs.get("schema", DEFAULT_SCHEMA)
    return concat_blocks(list(iter_event_blocks(recording, **kwargs)), schema)
