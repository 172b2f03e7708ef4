"""Template matching whose templates follow the estimated motion; the traces stay as recorded.

Correcting the traces for drift (SpikeInterface's ``interpolate_motion``) loses what moved past
the probe's ends: when the tissue has moved by ``d``, the corrected trace of a contact within
``|d|`` of the end is the recorded signal at a place no contact covers, and extrapolation fills
it with the nearest contacts' signal. A neuron near that end then looks, in the corrected
traces, like a smaller neuron further out, and matching gave its spikes to that neuron's
template (drift64: two neurons at the bottom of the probe lost 0.47 and 1.00 of their spikes
during the drift's far end, one to the other).

Moving the templates instead loses nothing the probe recorded: at time ``t`` a neuron's
template on contact ``c`` is its rest-frame template at ``c - d(t)`` (kriging, as the trace
correction). The rest-frame templates are estimated from the recorded traces
(:func:`registered_templates`): each spike is seen at its own displacement, so a neuron near an
end is known beyond the contacts wherever the drift carried it onto the probe, on locations
extending the probe past its ends (:func:`extended_locations`). Wobble's precomputation runs
once per displacement on a grid (``step_um``); each chunk of the recording (1 s) is matched
with the grid point nearest the displacement at its centre (:class:`DriftingWobble`), and the
amplitudes are refitted on the same moved templates
(:func:`inference.fast_wobble.refit_amplitudes`). A neuron the drift carries out of reach is left
out of the chunks where its moved template is too weak to tell from noise.

On drift64 (SpikeInterface's drifting generator, +-20 um zigzag) and its two other seeds the
sort went from 0.857 / 0.868 / 0.923 to 0.875 / 0.921 / 0.931 (BENCHMARKS.md).

The motion must be rigid (one displacement for the whole probe at a time): the correction of
long probes, whose drift differs along the probe, keeps interpolating the traces.
"""

from __future__ import annotations

import numpy as np
from spikeinterface.sortingcomponents.matching.base import BaseTemplateMatching

from spikevault.threads import thread_map


def moved_templates(dense: np.ndarray, source_locations: np.ndarray, channel_locations: np.ndarray,
                    displacement_um: float, dim: int = 1, sigma_um: float = 20.0, p: int = 2) -> np.ndarray:
    """Dense templates ``[units, samples, channels]`` on the contacts ``channel_locations`` after
    the tissue moved by ``displacement_um`` along ``dim``: the rest-frame templates, given at
    ``source_locations``, at each contact's location minus the displacement (kriging; zero where
    that location is beyond the source locations)."""
    from spikeinterface.preprocessing import get_spatial_interpolation_kernel

    target = np.array(channel_locations, dtype=np.float64, copy=True)
    target[:, dim] -= displacement_um
    kernel = get_spatial_interpolation_kernel(np.asarray(source_locations, np.float64), target, method="kriging",
                                              sigma_um=sigma_um, p=p, dtype="float32", force_extrapolate=False)
    return (dense.astype(np.float32) @ kernel).astype(np.float32)


def extended_locations(channel_locations: np.ndarray, margin_um: float, dim: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The contacts plus the rows of copies of the probe placed past each end along ``dim`` (its
    span plus multiples of its pitch away), within ``margin_um`` of the end: the places a drifting
    neuron's rest-frame template can be known at. Returns (locations [n, 2], index of each real
    contact in them)."""
    loc = np.asarray(channel_locations, dtype=np.float64)[:, :2]
    depths = np.unique(np.round(loc[:, dim], 3))
    pitch = float(np.median(np.diff(depths))) if len(depths) > 1 else max(margin_um, 1.0)
    span = float(depths[-1] - depths[0])
    steps = int(np.ceil(margin_um / pitch)) + 1 if pitch > 0 else 0
    points = {tuple(np.round(x, 3)): None for x in loc}
    for k in range(1, steps + 1):
        for sign in (-1, 1):
            shifted = loc.copy()
            shifted[:, dim] += sign * (span + k * pitch)
            for x in shifted:  # whole copies of the probe beyond each end, the nearest rows kept
                if depths[0] - margin_um - 1e-6 <= x[dim] < depths[0] - 1e-6 \
                        or depths[-1] + 1e-6 < x[dim] <= depths[-1] + margin_um + 1e-6:
                    points.setdefault(tuple(np.round(x, 3)), None)
    ext = np.array(list(points), dtype=np.float64)
    return ext, np.arange(len(loc))


def registered_templates(rec, motion, sample_index: np.ndarray, unit_index: np.ndarray, segment_index: np.ndarray,
                         num_units: int, nbefore: int, nafter: int, step_um: float, job_kwargs: dict,
                         min_spikes: int = 50, sigma_um: float = 20.0, p: int = 2, average=None):
    """Rest-frame templates on the probe extended beyond its ends, from the recorded traces.

    Each spike is read from ``rec`` (not motion corrected) and binned by the displacement at its
    time (``step_um`` grid); SpikeInterface's ``estimate_templates`` averages every (unit, bin).
    A bin's average seen from the rest frame sits at the contacts minus the bin's displacement,
    so it is interpolated (kriging) to the extended locations that fall within the probe's span
    there; the bins are combined weighted by their spike counts. A neuron near an end is thus
    known where the drift carried it past the contacts, and no extrapolated trace enters it.
    Locations few spikes reached (below ``min_spikes``) take the value of the nearest
    well-reached location in their column of contacts.

    Returns (dense templates [units, samples, extended locations] float32, extended locations,
    index of the real contacts among them, number of spikes behind each value [units, locations]).

    ``average``, when given, stands in for ``estimate_templates`` (the same arguments as
    :func:`inference.sort.average_spikes`).
    """
    from spikeinterface.core.waveform_tools import estimate_templates
    from spikeinterface.preprocessing import get_spatial_interpolation_kernel

    dim = motion.dim
    loc = np.asarray(rec.get_channel_locations(), dtype=np.float64)[:, :2]
    grid = displacement_grid(motion, step_um)
    depth = float(np.median(loc[:, dim]))
    disp = np.zeros(len(sample_index))
    for seg in np.unique(segment_index):
        sel = segment_index == seg
        times = rec.sample_index_to_time(sample_index[sel], segment_index=int(seg))
        disp[sel] = motion.get_displacement_at_time_and_depth(times, np.full(sel.sum(), depth), segment_index=int(seg))
    bins = np.argmin(np.abs(disp[:, None] - grid[None, :]), axis=1)
    pseudo = unit_index.astype(np.int64) * len(grid) + bins
    present, pseudo_index = np.unique(pseudo, return_inverse=True)
    spikes = np.zeros(len(sample_index), dtype=[("sample_index", "int64"), ("unit_index", "int64"),
                                                 ("segment_index", "int64")])
    spikes["sample_index"] = sample_index
    spikes["unit_index"] = pseudo_index
    spikes["segment_index"] = segment_index
    order = np.lexsort((spikes["sample_index"], spikes["segment_index"]))
    if average is not None:
        avg = average(rec, spikes[order], len(present), nbefore, nafter, job_kwargs)
    else:
        jk = {k: v for k, v in job_kwargs.items() if k in ("n_jobs", "chunk_duration", "progress_bar")}
        avg = estimate_templates(rec, spikes[order], np.arange(len(present)), nbefore, nafter, return_in_uV=False,
                                 **jk)
    counts = np.bincount(pseudo_index, minlength=len(present)).astype(np.float64)
    margin = float(np.max(np.abs(grid))) + 1.0
    ext, real = extended_locations(loc, margin, dim)
    total = np.zeros((num_units, avg.shape[1], len(ext)), dtype=np.float64)
    weight = np.zeros((num_units, len(ext)), dtype=np.float64)
    lo, hi = loc[:, dim].min(), loc[:, dim].max()
    for b, d in enumerate(grid):
        rows = np.flatnonzero(present % len(grid) == b)
        if len(rows) == 0:
            continue
        source = loc.copy()
        source[:, dim] -= d
        kernel = get_spatial_interpolation_kernel(source, ext, method="kriging", sigma_um=sigma_um, p=p,
                                                  dtype="float32", force_extrapolate=False)
        inside = (ext[:, dim] >= lo - d - 1e-6) & (ext[:, dim] <= hi - d + 1e-6)
        units = present[rows] // len(grid)
        w = counts[rows][:, None] * inside[None, :]
        total[units] += (avg[rows].astype(np.float64) @ kernel) * w[:, None, :]
        weight[units] += w
    dense = total / np.maximum(weight[:, None, :], 1e-12)
    # a location few snippets reached (fewer than min_spikes, or half the unit's best-reached
    # location for a unit with fewer spikes: the drift's far end) takes the value of the nearest
    # well-reached location in its column: an average of a couple of snippets is mostly noise and
    # other neurons' spikes, and matching fitted it
    column = np.round(ext[:, 1 - dim], 3)
    for u in range(num_units):
        known = weight[u] >= min(min_spikes, 0.5 * weight[u].max())
        for j in np.flatnonzero(~known):
            same = np.flatnonzero(known & (column == column[j]))
            if len(same):
                dense[u, :, j] = dense[u, :, same[np.argmin(np.abs(ext[same, dim] - ext[j, dim]))]]
            else:
                dense[u, :, j] = 0.0
    return dense.astype(np.float32), ext, real, weight


def displacement_grid(motion, step_um: float) -> np.ndarray:
    """Displacements from the motion's smallest to its largest, ``step_um`` apart (0 included)."""
    values = np.concatenate([np.ravel(d) for d in motion.displacement])
    lo = np.floor(values.min() / step_um) * step_um
    hi = np.ceil(values.max() / step_um) * step_um
    return np.round(np.arange(lo, hi + step_um / 2, step_um), 6)


#: Displacements whose buffers (and temporal spectra, when not pinned) a :class:`DriftingWobble`
#: worker keeps: the ones it used last. A chunk at another displacement remakes them (drift64:
#: an 8 MB buffer, and 12 MB of spectra in 9 ms).
KEPT_ENGINES = 3
#: Memory the temporal spectra of every displacement may take, computed once before the workers
#: start (:meth:`DriftingWobble.pin_spectra`; drift64's 22 displacements: 270 MB).
PINNED_SPECTRA_BYTES = 512e6
#: :class:`DriftingWobble` leaves a unit out at a displacement where its moved template's squared
#: norm (whitened) is below this fraction of its rest norm and below this many times the threshold.
OUT_OF_REACH_FRACTION = 0.25
OUT_OF_REACH_THRESHOLDS = 4.0


class DriftingWobble(BaseTemplateMatching):
    """SpikeInterface's wobble with one precomputed template set per displacement.

    ``templates`` are the rest-frame templates on the contacts, unwhitened (their ids, sampling
    and window); ``source`` = (dense rest-frame templates, their locations), e.g. from
    :func:`registered_templates`, is what is moved (default: ``templates`` on the contacts);
    ``whitening`` the matrix wobble whitens with (each moved template goes through it, and the
    objective is the whitened traces', the recording given staying as it is: ``FftWobbleMatch``'s
    ``whitening``); ``sparsity`` a function of moved dense
    templates giving their channel masks; ``motion`` a rigid SpikeInterface ``Motion``;
    ``parameters`` wobble's. A unit whose moved template's whitened squared norm is below
    ``min_norm_sq`` (wobble's threshold), or below ``OUT_OF_REACH_FRACTION`` of its rest norm and
    ``OUT_OF_REACH_THRESHOLDS`` thresholds, is left out at that displacement. Each spike's
    amplitude is its least-squares scaling (:func:`inference.fast_wobble.refit_amplitudes`).
    """

    def __init__(self, recording, templates, return_output=True, motion=None, whitening=None, sparsity=None,
                 step_um: float = 2.0, parameters=None, source=None, min_norm_sq: float = 0.0, n_threads: int = 1):
        from spikeinterface.core import Templates
        from spikeinterface.core.sparsity import ChannelSparsity

        from .fast_wobble import FftWobbleMatch

        BaseTemplateMatching.__init__(self, recording, templates, return_output=return_output)
        if motion is None:
            raise ValueError("DriftingWobble needs the motion")
        self.motion = motion
        self.grid = displacement_grid(motion, step_um)
        locations = np.asarray(recording.get_channel_locations(), dtype=np.float64)[:, :2]
        self.depth = float(np.median(locations[:, motion.dim]))
        dense, source_locations = (templates.get_dense_templates(), locations) if source is None else source
        matrix = np.eye(dense.shape[2], dtype=np.float32) if whitening is None else np.asarray(whitening, np.float32)
        rest = moved_templates(dense, source_locations, locations, 0.0, dim=motion.dim)
        rest_mask = sparsity(rest) if sparsity is not None else np.abs(rest).max(axis=1) > 0
        rest_norm_sq = np.sum(((rest @ matrix) * rest_mask[:, None, :]) ** 2, axis=(1, 2))
        # a neuron the drift carried out of reach: its moved template is too weak to tell its
        # spikes from noise (below a quarter of its rest norm, and below 4 thresholds), and wobble
        # fitted noise with scaled-up copies of it
        floor = np.maximum(min_norm_sq, np.minimum(OUT_OF_REACH_FRACTION * rest_norm_sq,
                                                   OUT_OF_REACH_THRESHOLDS * min_norm_sq))
        self.engines, self.kept = [], []
        sets = []  # each displacement's whitened templates and refit, its wobble precomputation made below
        for d in self.grid:
            moved = moved_templates(dense, source_locations, locations, float(d), dim=motion.dim)
            mask = sparsity(moved) if sparsity is not None else np.abs(moved).max(axis=1) > 0
            white = (moved @ matrix).astype(np.float32)
            norm_sq = np.sum((white * mask[:, None, :]) ** 2, axis=(1, 2))
            keep = np.flatnonzero(norm_sq >= floor)
            self.kept.append(keep)
            if len(keep) == 0:
                self.engines.append(None)
                continue
            ids = templates.unit_ids[keep]
            white = Templates(templates_array=white[keep], sampling_frequency=templates.sampling_frequency,
                              nbefore=templates.nbefore, is_in_uV=True, sparsity_mask=None,
                              channel_ids=templates.channel_ids, unit_ids=ids, probe=templates.probe)
            sets.append((white.to_sparse(ChannelSparsity(mask[keep], ids, templates.channel_ids)),
                         moved[keep] * mask[keep][:, None, :]))
            self.engines.append(len(sets) - 1)

        def precompute(white_and_refit):
            white, refit = white_and_refit
            return FftWobbleMatch(recording, white, return_output=return_output, parameters=dict(parameters or {}),
                                  refit=refit, whitening=None if whitening is None else matrix)

        # wobble's precomputations (FFT convolutions, SVDs: numpy and SciPy release the GIL) in
        # n_threads threads: drift64's 22 took 1.6-1.8 s in the main process, 1.0-1.1 s in two
        built = thread_map(precompute, sets, n_threads)
        self.engines = [None if e is None else built[e] for e in self.engines]
        self._recent: list[int] = []  # engine indices, the last used last
        self.margin = built[0].get_margin() if built else 300  # wobble's own margin
        self.nbefore = templates.nbefore
        self.nafter = templates.nafter

    def get_margin(self):
        return self.margin

    def pin_spectra(self, chunk_size: int, max_bytes: float = PINNED_SPECTRA_BYTES, n_threads: int = 1) -> int:
        """Compute every displacement's temporal spectra for chunks of ``chunk_size`` samples now
        (:meth:`inference.fast_wobble.FftWobbleMatch.pin_spectra`), when they take at most
        ``max_bytes`` together. Called before the workers are forked, they share these pages
        instead of each recomputing a displacement's spectra whenever its chunks move to another
        (drift64: 88 of 300 chunks, 9 ms each). Returns the bytes pinned (0 when over the bound)."""
        engines = [e for e in self.engines if e is not None]
        if not engines:
            return 0
        samples = int(chunk_size) + 2 * self.get_margin()
        # each [rank, units, n/2 + 1] complex64, n the transform length of a chunk
        channels = self.recording.get_num_channels()
        estimate = sum(8.0 * np.prod(e.template_data.compressed_templates[0].shape[:2])
                       * (e._transform(samples, channels)[0] // 2 + 1) for e in engines)
        if estimate > max_bytes:
            return 0
        return int(sum(thread_map(lambda engine: engine.pin_spectra(samples), engines, n_threads)))

    def engine_for(self, start_frame: int, end_frame: int, segment_index: int) -> int:
        """Index of the grid displacement nearest the motion at the chunk's centre."""
        t = self.recording.sample_index_to_time(np.array([(start_frame + end_frame) // 2]), segment_index=segment_index)
        d = self.motion.get_displacement_at_time_and_depth(np.asarray(t, dtype=np.float64), np.array([self.depth]),
                                                            segment_index=segment_index)
        return int(np.argmin(np.abs(self.grid - float(np.ravel(d)[0]))))

    def compute_matching(self, traces, start_frame, end_frame, segment_index):
        from spikeinterface.sortingcomponents.matching.base import _base_matching_dtype

        index = self.engine_for(start_frame, end_frame, segment_index)
        # the cached spectra of the KEPT_ENGINES displacements used last, not one per displacement
        if index in self._recent:
            self._recent.remove(index)
        self._recent.append(index)
        if len(self._recent) > KEPT_ENGINES:
            dropped = self._recent.pop(0)
            if self.engines[dropped] is not None:
                self.engines[dropped].release()
        if self.engines[index] is None:
            return np.zeros(0, dtype=_base_matching_dtype)
        spikes = self.engines[index].compute_matching(traces, start_frame, end_frame, segment_index)
        spikes["cluster_index"] = self.kept[index][spikes["cluster_index"]]
        return spikes

    def clean(self):
        for engine in self.engines:
            if engine is not None:
                engine.clean()
