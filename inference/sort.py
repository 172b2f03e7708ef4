"""Zero-shot spike sorting with a pretrained encoder: :func:`sort` reads top to bottom as the pipeline.

::

    load + check        spikevault.extract.load_recording / check_recording (clear errors)
    preprocess          bandpass + common median reference, the model's own parameters (the
                        filter a numba kernel, spikevault.filters), cached in RAM as int16 (the
                        reference's subtraction and the quantisation one numba pass, written to
                        shared memory by the workers)
    detect + extract    spikevault.extract.extract_events: the corpus builder's code path
    localise            centre of mass of each event's K channels (SpikeInterface's method)
    motion              dense probes: dredge_ap (rigid on short probes) on the events' centre-of-mass
                        positions screens for drift, then on grid_convolution positions
                        (inference.grid_localization) estimates it; SpikeInterface's kriging
                        interpolation, its kernels computed once (inference.interpolation),
                        + re-extraction when drift is found
    embed               the encoder in batches (or PCA, the ablation)
    cluster             embedding + position, per probe region, in forked worker processes
    curate              split / merge until unimodal and distinct (tests in n_jobs threads),
                        reject noise clusters
    match               SpikeInterface template matching (wobble, whitened: the local whitening
                        folded into its objective, computed by FFT, and its subtraction by numba,
                        inference.fast_wobble) recovers missed spikes; a
                        template carrying the median reference's copy of its spike keeps every
                        channel (_template_mask); with rigid drift the templates follow the motion
                        over the recorded traces (inference.drift_matching), estimated in the rest
                        frame beyond the probe's ends
    final merge         SpikeInterface auto_merge_units joins units split in two (similar templates,
                        close, no refractory violations across the parts)
    save                sorting, rejected events, params + versions, sort.log, report

Sampling rates: events are resampled to the model's canonical rate by the extraction, so a
recording at any supported rate (10-100 kHz) sorts with any model; the sorting's spike times are
at the recording's own rate.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spikevault.jit import cache_spikeinterface_kernels
from spikevault.threads import thread_map

from .cluster import ClusterParams, cluster_by_region
from .curation import REJECT_REASONS, CurationParams, EventSet, curate, histogram_overlap

logger = logging.getLogger(__name__)

FEATURES = ("model", "pca")
MOTION_MODES = ("auto", True, False)
MATCHING_METHODS = ("wobble", "circus-omp", "tdc-peeler", "nearest")  # the default first
#: Marker file that says a folder was written by :func:`sort` (``overwrite`` only deletes those).
PARAMS_NAME = "params.json"
MIN_EVENTS = 50


@dataclass
class SortParams:
    """Every setting of :func:`sort` in one place (saved to ``params.json``)."""

    clusterer: str = "hdbscan"
    """'hdbscan', 'gmm', 'dpgmm' or 'kmeans' (each picks its own number of units)."""
    features: str = "model"
    """'model' (the encoder's embedding) or 'pca' (PCA of the same events: the ablation)."""
    matching: bool = True
    """Final template-matching pass over the whole recording (recovers overlapping/weak spikes)."""
    matching_method: str = "wobble"
    """SpikeInterface matching engine: 'wobble' (on whitened traces, see :func:`_wobble`),
    'circus-omp', 'tdc-peeler' or 'nearest'."""
    reject_noise_fits: bool = True
    """After wobble or circus-omp: remove the fits of a low-amplitude template that are more likely noise
    than its neuron's spikes (a mixture of the fitted amplitudes against the spread that noise
    alone gives that template; see :func:`noise_fits`). Templates of neurons well above the
    noise are never tested."""
    final_merge: bool = True
    """After matching, merge units that are one neuron cut in two: SpikeInterface's
    ``auto_merge_units`` (similar templates, close on the probe, no refractory violations
    across the two trains), with a template-difference threshold that grows step by step, as
    SpykingCircus2 does (see :func:`merge_units`)."""
    final_merge_max_distance_um: float = 50.0
    """Final merge: only units whose locations are at most this far apart."""
    final_merge_max_template_diff: float = 0.2
    """Final merge: largest normalised template difference (L1) the growing threshold reaches.
    Split parts of one unit differed by 0.03-0.2 in the benchmarks (drift64, and a static
    64-channel probe: 0.808 at 0.1, 0.860 at 0.2); two neurons were merged at 0.22 (a noisy
    32-channel recording) and 0.29 (static32)."""
    final_merge_max_template_diff_compact: float = 0.1
    """The same on a compact probe (a tetrode, a single wire: every channel within
    ``final_merge_max_distance_um`` of every other). There every unit sits at one place, so
    location does not keep two neurons apart, and matched spikes of similar templates never
    coincide, so the cross-contamination test does not either: on a 6-unit tetrode the merge
    joined two, then three, distinct neurons at 0.15-0.2 (0.820 -> 0.582 -> 0.360)."""
    final_merge_drift_splits: bool = True
    """After the final merge, on a recording whose motion was corrected: merge pairs of units that
    are one neuron cut in two by the drift. The waveform of a neuron changes a little with its
    place on the probe, even after the correction; a cluster can split along it, and its parts
    then fire each at its own displacements, never both at the same one. A pair merges when its
    templates differ by at most ``final_merge_drift_split_max_template_diff`` and the displacements
    at its two spike trains barely overlap (``final_merge_drift_split_max_overlap``), with the
    final merge's other tests (location, spike counts, cross-contamination). See
    :func:`merge_drift_splits`."""
    final_merge_drift_split_max_template_diff: float = 0.35
    """Drift-split merge: largest normalised template difference (L1) of a pair. The parts it
    merged in the benchmarks differed by 0.15-0.33 (drift64's 0.27, np384drift's 0.33)."""
    final_merge_drift_split_max_overlap: float = 0.3
    """Drift-split merge: largest overlap (0..1, the sum of the bin-wise minimum of the two
    normalised histograms, in ``DRIFT_SPLIT_BIN_UM`` bins) of the displacements at the two units'
    spikes. Two neurons present together sample the same displacements (an overlap near 1; a
    unit's alternate spikes in the tests: above 0.7); the parts merged in the benchmarks:
    0.03-0.18."""
    final_merge_censor_ms: float = 3.0
    """Final merge: in a merged unit, of two spikes closer than this only the first is kept (the
    same spike found in both parts)."""
    final_merge_min_spikes: int = 20
    """Final merge: units with fewer spikes are never merged. SpikeInterface's default is 100;
    wobble splits a drifting neuron's spikes among its near-identical templates (drift64: 67
    and 69 spikes beside 1116), and those parts must merge back."""
    max_contamination: float | None = 0.5
    """Units whose ISI-violation ratio (SpikeInterface's ``isi_violations`` (Hill et al. 2011),
    refractory period ``refractory_ms``; 0 for a neuron alone, about 0.5 for independent
    (Poisson) events, above 1 for noise whose threshold crossings come in bursts) is above this,
    with at least ``multi_unit_min_violations`` violations, are multi-unit activity or noise,
    not one neuron: they leave the sorting and are saved in ``out/multi_unit``. None keeps every
    unit. 0.5 is the usual cutoff of this metric (the Allen Institute's filter of its
    Neuropixels units). In the drift benchmark at a detection threshold of 4.5, three of the
    four units that matched no neuron had ratios 1.1-1.5 (the fourth 0.27); every unit of a
    neuron 0-0.24, here and in the static benchmark."""
    multi_unit_min_violations: int = 5
    """A unit is only called multi-unit with at least this many violations (one or two chance
    coincidences in a unit of a few hundred spikes give a large ratio and prove nothing)."""
    refractory_ms: float = 1.5
    """Refractory period of the multi-unit test (ISI violations are intervals shorter than this)."""
    min_unit_spikes: int = 20
    """Units with fewer spikes than this after matching and merging leave the sorting (listed in
    params.json ``dropped_units``). Every unit was a cluster of at least curation's
    ``min_cluster_size`` events; one its template then barely matched (the demo: 4 stray fits of a
    cluster of a neuron too small to detect) is no neuron anyone can assess. 0 keeps every unit."""
    motion_correction: Any = "auto"
    """'auto' (correct when estimated drift exceeds drift_threshold_um), True or False."""
    drift_threshold_um: float = 10.0
    """'auto' applies motion correction when the estimated displacement exceeds this (a cheap
    screening estimate within half of it settles that the recording is static)."""
    min_duration_for_motion_s: float = 30.0
    """'auto' only estimates motion on recordings at least this long."""
    drifting_templates: bool = True
    """With motion correction, wobble and a rigid motion (probes shorter than 800 um): the matching
    pass moves the templates with the motion over the recorded traces instead of matching the
    interpolated ones (:mod:`inference.drift_matching`), and the templates are estimated from the
    recorded traces in the probe's rest frame, beyond its ends where the drift carried neurons.
    Interpolated traces lose what drifted past the probe's ends."""
    position_scale_um: float = 12.0
    """Clustering weight of position: this many micrometres count as one SD of an embedding dim."""
    pca_components: int = 10
    """Components of the PCA features (features='pca')."""
    embed_batch_size: int = 128
    """Events per encoder batch. Small batches keep the convolutions' activations in the CPU's
    cache: on this machine 128 events embed about twice as fast as 512, and 1024 slower still."""
    template_ms_before: float = 1.0
    """Matching templates: window before the peak (ms)."""
    template_ms_after: float = 2.0
    """Matching templates: window after the peak (ms)."""
    template_radius_um: float = 100.0
    """Matching templates are sparse: channels within this radius of the template's peak channel."""
    max_spikes_per_template: int = 500
    """Spikes averaged per matching template (random subset)."""
    cache_preprocessing: str = "auto"
    """Keep the preprocessed traces in RAM (int16 in steps of noise/64, shared memory) for the
    passes after detection (motion, templates, matching): 'auto' (when they fit in a quarter of
    the available memory), 'memory' or 'none'."""
    detect_threshold: float | None = None
    """Detection threshold in MAD noise units (None: the model's own, from its preprocessing).
    Only which peaks become events changes; the events' schema and filtering stay the model's."""
    seed: int = 0
    cluster: ClusterParams = field(default_factory=ClusterParams)
    curation: CurationParams = field(default_factory=CurationParams)

    def __post_init__(self) -> None:
        if isinstance(self.cluster, dict):
            self.cluster = ClusterParams(**self.cluster)
        if isinstance(self.curation, dict):
            self.curation = CurationParams(**self.curation)
        if isinstance(self.motion_correction, str) and self.motion_correction in ("on", "off"):
            self.motion_correction = self.motion_correction == "on"
        self.cluster = ClusterParams(**{**self.cluster.to_dict(), "method": self.clusterer, "seed": self.seed})
        problems = []
        if self.features not in FEATURES:
            problems.append(f"features must be one of {FEATURES}, got {self.features!r}")
        if self.motion_correction not in MOTION_MODES:
            problems.append(f"motion_correction must be 'auto', True/'on' or False/'off', got {self.motion_correction!r}")
        if self.matching_method not in MATCHING_METHODS:
            problems.append(f"matching_method must be one of {MATCHING_METHODS}, got {self.matching_method!r}")
        for name in ("position_scale_um", "drift_threshold_um", "template_ms_before", "template_ms_after",
                     "template_radius_um", "final_merge_max_distance_um", "final_merge_max_template_diff",
                     "final_merge_max_template_diff_compact", "final_merge_drift_split_max_template_diff",
                     "final_merge_drift_split_max_overlap"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("pca_components", "embed_batch_size", "max_spikes_per_template"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_contamination is not None and not self.max_contamination > 0:
            problems.append(f"max_contamination must be > 0 or None, got {self.max_contamination}")
        if not self.refractory_ms > 0:
            problems.append(f"refractory_ms must be > 0, got {self.refractory_ms}")
        for name in ("min_unit_spikes", "multi_unit_min_violations"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.detect_threshold is not None and not self.detect_threshold > 0:
            problems.append(f"detect_threshold must be > 0 or None, got {self.detect_threshold}")
        if self.cache_preprocessing not in ("auto", "memory", "none"):
            problems.append(f"cache_preprocessing must be 'auto', 'memory' or 'none', got {self.cache_preprocessing!r}")
        if problems:
            raise ValueError("invalid sort parameters: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------- the pipeline
def sort(
    recording,
    model: Any = "default",
    *,
    out: str | os.PathLike | None = None,
    clusterer: str = "hdbscan",
    features: str = "model",
    matching: bool = True,
    motion_correction: Any = "auto",
    overwrite: bool = False,
    job_kwargs: dict | None = None,
    export_phy: bool = False,
    report: bool = True,
    recording_id: str | None = None,
    **params,
):
    """Sort a recording with a pretrained encoder, zero-shot.

    Parameters
    ----------
    recording : BaseRecording or path
        Anything :func:`spikevault.extract.load_recording` opens; it needs channel locations.
    model : str, path, SpikeVAE or None
        ``"default"`` (the embedded model), a registry name, a checkpoint folder,
        ``hf-hub:ORG/NAME@REV``, or a loaded ``SpikeVAE``. Its ``config.json`` fixes the event
        schema and the preprocessing. With ``features="pca"`` it may be None (default schema and
        preprocessing); when given, its schema and preprocessing are used so both runs see the
        same events.
    out : path, optional
        Output folder: ``sorting/``, ``multi_unit/`` (units moved out as multi-unit activity,
        when any: see ``SortParams.max_contamination``), ``rejected_events.npz``, ``events.npz``, ``params.json``,
        ``sort.log``, ``report/`` (+ ``phy/``). Nothing is written when None.
    clusterer : {"hdbscan", "gmm", "dpgmm", "kmeans"}
        None of them is given a number of units.
    features : {"model", "pca"}
        Cluster on the encoder's embedding, or on PCA of the same events (ablation).
    matching : bool
        Final template-matching pass (SpikeInterface ``wobble`` on whitened traces by default).
    motion_correction : "auto", True or False
        "auto" estimates the drift and corrects it when above ``drift_threshold_um``.
    overwrite : bool
        Replace an existing output folder (only one written by ``sort``).
    job_kwargs : dict, optional
        SpikeInterface job kwargs (``n_jobs``, ``progress_bar``...); ``n_jobs`` also sets the
        torch threads and the parallel region clustering.
    export_phy : bool
        Also write a phy folder (``out/phy``) through ``spikeinterface.exporters.export_to_phy``.
    report : bool
        Write the figures and ``report.html`` (needs ``out``).
    recording_id : str, optional
        Name stored in events and logs (default: from the recording).
    **params
        Any other field of :class:`SortParams` (``position_scale_um``, ``cluster={...}``,
        ``curation={...}``, ``matching_method``...).

    Returns
    -------
    sorting : spikeinterface.BaseSorting
        One unit per curated cluster; saved in ``out/sorting`` when ``out`` is given.

    Raises
    ------
    ValueError
        Bad parameters, an unreadable/unsuitable recording, no detectable spikes, a model whose
        schema the extraction cannot produce.
    FileExistsError
        ``out`` exists and ``overwrite`` is False.

    Notes
    -----
    On Linux with glibc, the process (and the workers it forks) keeps memory it frees for reuse
    instead of returning it to the system (:func:`spikevault.malloc.keep_freed_memory`): up to
    1 GiB, until the process exits.
    """
    p = SortParams(clusterer=clusterer, features=features, matching=matching, motion_correction=motion_correction,
                   **params)
    job_kwargs = _job_kwargs(job_kwargs)
    _skip_collection_at_exit()
    out = Path(out) if out is not None else None
    if out is not None:
        _prepare_out(out, overwrite)
    with _log_to(out):
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        from threadpoolctl import threadpool_limits

        from spikevault.malloc import keep_freed_memory

        # every pass allocates the same large temporaries chunk after chunk: reusing freed memory
        # instead of page-faulting fresh pages took a sixth off the drift benchmark's wall time
        keep_freed_memory()
        # One BLAS/OpenMP thread: the numerics here are many small matrices, where OpenBLAS and
        # OpenMP threads only spin (several times slower on a busy machine); parallelism comes
        # from job_kwargs' n_jobs (processes) and the encoder's torch threads.
        # scikit-learn's OpenMP and torch load later, while the traces are cached: late_limits
        # limits them then (see _run) and lifts the limits with the others
        with threadpool_limits(limits=1), _workers_inherit_thread_limits(job_kwargs), ExitStack() as late_limits, \
                _collector_spares_loaded_objects() as spare:
            result = _run(recording, model, p, out, job_kwargs, timings, recording_id, late_limits, spare)
        sorting, info = result["sorting"], result["info"]
        try:
            if out is not None:
                t = time.perf_counter()
                with warnings.catch_warnings():
                    # an in-memory sorting has no provenance to save; the folder is still complete
                    warnings.filterwarnings("ignore", message="The extractor is not serializable")
                    sorting = sorting.save(folder=out / "sorting")
                    if result["multi_unit"] is not None and len(result["multi_unit"].unit_ids):
                        result["multi_unit"].save(folder=out / "multi_unit")
                _save_events(out, result)
                if report:
                    from .report import make_report

                    make_report(out, sorting=sorting, recording=result["recording"], events=result["events"],
                                features=result["X"], labels=result["labels"], positions=result["positions"],
                                templates=result["templates"], info=info)
                if export_phy:
                    _export_phy(out, sorting, result["recording"], job_kwargs)
                timings["save_s"] = time.perf_counter() - t
        finally:
            _release_shared_memory(result["cache"])
        timings["total_s"] = time.perf_counter() - t_start
        info["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        logger.info("sorted %s: %d units in %.1f s", info["recording"]["name"], len(sorting.unit_ids),
                    timings["total_s"])
        if out is not None:
            _write_params(out, p, info, job_kwargs)
    return sorting


def _run(recording, model, p: SortParams, out, job_kwargs, timings, recording_id, late_limits: ExitStack,
         spare_loaded=lambda: None) -> dict:
    from spikevault.extract import check_recording, extract_events, load_recording, preprocess

    tick = _Ticker(timings)
    recording = load_recording(recording)
    name = recording_id or _recording_name(recording)
    schema, eparams, model_desc, load_network = model_contract(model, p.features)
    if p.detect_threshold is not None:  # detection only: the events' schema and filtering stay the model's
        from dataclasses import replace

        eparams = replace(eparams, detect_threshold=float(p.detect_threshold))
    info: dict[str, Any] = {"model": model_desc, "schema": schema.to_dict(), "preprocessing": eparams.to_dict()}
    check_recording(recording, schema, eparams, recording_id=name)
    fs = recording.get_sampling_frequency()
    duration_s = sum(recording.get_num_samples(s) for s in range(recording.get_num_segments())) / fs
    info["recording"] = {"name": name, "num_channels": int(recording.get_num_channels()),
                         "sampling_rate_hz": float(fs), "duration_s": float(duration_s),
                         "num_segments": int(recording.get_num_segments())}
    logger.info("sorting %s: %d channels, %.1f s at %g Hz, features=%s, clusterer=%s", name,
                recording.get_num_channels(), duration_s, fs, p.features, p.clusterer)

    estimate_motion = p.motion_correction is True or (p.motion_correction == "auto"
                                                      and duration_s >= p.min_duration_for_motion_s)
    if estimate_motion:
        from spikeinterface.sortingcomponents.tools import check_probe_for_drift_correction

        estimate_motion = check_probe_for_drift_correction(recording)
        if not estimate_motion:
            logger.info("probe geometry does not allow drift correction along depth: motion not estimated")
    loaded = {}

    def load_libraries():
        """The encoder, scikit-learn and SpikeInterface's peak detection, loaded in the main
        process while the workers cache the traces (or before, when nothing is cached)."""
        import sklearn.cluster  # noqa: F401 - its OpenMP, limited below with the rest
        # the peak detection imports torch whenever it is installed, encoder or not (the PCA
        # ablation paid that import alone, 1 s before the extraction pass)
        import spikeinterface.sortingcomponents.peak_detection.method_list  # noqa: F401
        from threadpoolctl import threadpool_limits

        loaded["net"] = load_network()
        late_limits.enter_context(threadpool_limits(limits=1))

    # No automatic collection until the libraries the sort loads (scipy.signal for the filters,
    # numba for the kernels, then scikit-learn and torch) are loaded and frozen out of the
    # collector's reach: imports make many objects that stay and few cycles, and each collection
    # in between walked them all (0.28 s of static32's main process, 0.13 s of it the first young
    # collection after the libraries, over every object they had made).
    with _collections_paused():
        preprocessed = preprocess(recording, eparams)
        rec = _cache(preprocessed, p.cache_preprocessing, job_kwargs, while_writing=load_libraries)
        spare_loaded()  # the libraries just loaded, out of the full collections' reach
    # the cache's own SharedMemoryRecording, when the traces were cached (never one the caller gave)
    shared = rec._kwargs["recording"] if rec is not preprocessed else None
    net = loaded["net"]
    tick("preprocess_s")
    extract_kw = dict(schema=schema, params=eparams, recording_id=name, preprocessed=True, job_kwargs=job_kwargs)
    events = extract_events(rec, **extract_kw)
    tick("detect_extract_s")
    _check_enough_events(events, name, eparams)
    channel_index = _channel_index(events, rec)
    positions = localize_events(events, rec.get_channel_locations(), channel_index,
                                n_threads=job_kwargs.get("n_jobs", 1))
    tick("localize_s")

    motion_info = {"mode": str(p.motion_correction), "applied": False}
    recorded, applied_motion = rec, None
    if estimate_motion:
        # 'auto' screens with a cheap estimate first; a forced correction always gets the full one
        screen = p.drift_threshold_um * DRIFT_SCREEN_FRACTION if p.motion_correction == "auto" else None
        motion, max_disp = estimate_drift(rec, events, channel_index, job_kwargs, seed=p.seed, screen_below_um=screen,
                                          positions=positions)
        motion_info["max_displacement_um"] = None if max_disp is None else round(float(max_disp), 2)
        motion_info["screened_out"] = motion is None and max_disp is not None
        if motion is not None and (p.motion_correction is True or max_disp > p.drift_threshold_um):
            from .interpolation import KrigingMotionRecording

            logger.info("correcting motion (max displacement %.1f um)", max_disp)
            corrected = KrigingMotionRecording(rec, motion, border_mode="force_extrapolate",
                                               spatial_interpolation_method="kriging", sigma_um=20.0, p=2)
            # Rigid drift with wobble's drifting templates matches the recorded traces, which
            # must stay as they are: the corrected ones (for re-detection) are interpolated
            # lazily from them. Otherwise every later pass reads corrected traces: written
            # over the cache once, they are read back as cheaply as before.
            if _matches_recorded_traces(p, motion) or not _correct_cache_in_place(rec, corrected, job_kwargs):
                rec = corrected
            motion_info["written_over_cache"] = rec is not corrected
            windows = _cache_windows(recorded) if rec is corrected else None
            if windows is not None:
                # the traces are interpolated lazily: the recorded events' windows are, not every sample
                from spikevault.extract import event_noise_levels

                from .interpolation import interpolated_events

                noise = event_noise_levels(rec, n_threads=job_kwargs.get("n_jobs", 1))
                events = interpolated_events(events, channel_index, windows, rec, schema, eparams, noise,
                                             n_threads=job_kwargs.get("n_jobs", 1))
            else:
                events = extract_events(rec, **extract_kw)
            _check_enough_events(events, name, eparams)
            channel_index = _channel_index(events, rec)
            positions = localize_events(events, rec.get_channel_locations(), channel_index,
                                        n_threads=job_kwargs.get("n_jobs", 1))
            motion_info["applied"] = True
            applied_motion = motion
        tick("motion_s")
    info["motion"] = motion_info

    if p.features == "model":
        emb, throughput = embed_events(net, events, batch_size=p.embed_batch_size,
                                       n_threads=job_kwargs.get("n_jobs", 1))
        info["embedding_events_per_s"] = round(throughput, 1)
    else:
        emb = pca_features(events, p.pca_components, seed=p.seed)
    tick("features_s")

    X = clustering_features(emb, positions, p.position_scale_um)
    labels, region = cluster_by_region(X, positions[:, 1], p.cluster, n_jobs=job_kwargs.get("n_jobs", 1))
    tick("cluster_s")
    noise = _noise_levels(rec, job_kwargs)
    from spikevault.extract import neighbour_table

    neigh, _, _ = neighbour_table(rec.get_channel_locations(), schema.num_channels)
    event_set = EventSet(events["waveform"], neigh[channel_index], rec.get_channel_locations()[:, :2], noise,
                         times_s=_event_times_s(events, rec))
    labels, reason, cstats = curate(event_set, labels, duration_s, schema.nbefore, p.curation,
                                    n_jobs=job_kwargs.get("n_jobs", 1))
    info["curation"] = cstats
    info["num_events"] = int(len(labels))
    info["num_rejected_events"] = int(np.sum(labels < 0))
    tick("curate_s")

    from spikeinterface.core import NumpySorting

    units = np.unique(labels[labels >= 0])
    templates = None
    if len(units) == 0:
        logger.warning("%s: every cluster was rejected as noise; the sorting is empty", name)
        sorting = NumpySorting.from_samples_and_labels([np.zeros(0, "int64")] * recording.get_num_segments(),
                                                       [np.zeros(0, "int64")] * recording.get_num_segments(), fs)
    else:
        drift = None
        if applied_motion is not None and _matches_recorded_traces(p, applied_motion):
            templates, drift = make_registered_templates(recorded, applied_motion, events, labels, p, noise, job_kwargs)
            drift.step_um = drift_step_um(applied_motion, templates)
            drift = drift if drift.step_um is not None else None
        else:
            templates = make_templates(rec, events, labels, channel_index, p, noise, job_kwargs)
        if applied_motion is not None:
            motion_info["drifting_templates"] = drift is not None
            if drift is not None:
                motion_info["drifting_templates_step_um"] = round(float(drift.step_um), 3)
        tick("templates_s")
        if p.matching:
            mstats: dict = {}
            sorting = match_templates(rec, templates, p.matching_method, job_kwargs, noise_levels=noise,
                                      refractory_ms=p.refractory_ms, reject_noise=p.reject_noise_fits, seed=p.seed,
                                      stats=mstats, drift=drift)
            info["matching"] = {"method": p.matching_method, **mstats}
            tick("matching_s")
        else:
            sorting = _sorting_from_labels(events, labels, recording.get_num_segments(), fs)
        if p.final_merge and len(sorting.unit_ids) > 1:
            n_before = len(sorting.unit_ids)
            max_diff = (p.final_merge_max_template_diff_compact if _is_compact(rec, p.final_merge_max_distance_um)
                        else p.final_merge_max_template_diff)
            merge_stats: dict = {}
            sorting, templates = merge_units(rec, sorting, templates, noise, p, job_kwargs, max_template_diff=max_diff,
                                             motion=applied_motion if p.final_merge_drift_splits else None,
                                             stats=merge_stats)
            info["final_merge"] = {"units_before": n_before, "units_after": int(len(sorting.unit_ids)),
                                   "max_template_diff": max_diff, **merge_stats}
            tick("final_merge_s")
    if p.min_unit_spikes > 0 and len(sorting.unit_ids):
        counts = sorting.count_num_spikes_per_unit(outputs="dict")
        few = {u: int(n) for u, n in counts.items() if n < p.min_unit_spikes}
        if few:
            keep = np.asarray([u for u in sorting.unit_ids if u not in few])
            sorting = sorting.select_units(keep)
            if templates is not None:
                templates = templates.select_units(keep)
            logger.info("%d units with fewer than %d spikes after matching left the sorting", len(few),
                        p.min_unit_spikes)
        info["dropped_units"] = {str(u): n for u, n in few.items()}
    multi_unit = None
    if p.max_contamination is not None and len(sorting.unit_ids):
        sorting, multi_unit, ratios = split_multi_unit(sorting, duration_s, p)
        info["multi_unit"] = {"max_contamination": p.max_contamination, "refractory_ms": p.refractory_ms,
                              "removed_units": [str(u) for u in multi_unit.unit_ids],
                              "isi_violations_ratio": {str(u): round(float(r), 3) for u, r in ratios.items()}}
        if templates is not None and len(multi_unit.unit_ids):
            templates = templates.select_units(np.asarray(sorting.unit_ids))
    info["num_units"] = int(len(sorting.unit_ids))
    return {"sorting": sorting, "info": info, "recording": rec, "events": events, "X": X, "labels": labels,
            "reason": reason, "positions": positions, "templates": templates, "region": region,
            "multi_unit": multi_unit, "cache": shared}


# ------------------------------------------------------------------------------------ the model
def _matches_recorded_traces(p: SortParams, motion) -> bool:
    """Whether matching runs on the recorded traces with templates following ``motion`` (wobble's
    drifting templates: rigid motion only), so the recorded traces must outlive the correction."""
    return bool(p.drifting_templates and p.matching and p.matching_method == "wobble"
                and len(motion.spatial_bins_um) == 1)


def load_contract(model, features: str):
    """Resolve ``model`` to (network or None, EventSchema, ExtractParams, description dict).

    With ``features="pca"`` the network is not needed: ``model=None`` means the default schema
    and preprocessing; a given model still provides its schema and preprocessing.
    """
    schema, eparams, desc, load_network = model_contract(model, features)
    return load_network(), schema, eparams, desc


def model_contract(model, features: str):
    """``model``'s event schema and preprocessing from its ``config.json`` alone (no torch),
    and a function that loads its network: (EventSchema, ExtractParams, description dict,
    ``load_network() -> SpikeVAE or None``; None with ``features="pca"``).

    The sort loads the network while its worker processes cache the preprocessed traces:
    importing torch and reading the weights costs 1-1.5 s, which it then shares with them.
    """
    from spikevault.extract import ExtractParams
    from spikevault.schema import DEFAULT_SCHEMA

    if model is None:
        if features == "model":
            raise ValueError("features='model' needs a model: pass model='default', a checkpoint folder or hf-hub id")
        return DEFAULT_SCHEMA, ExtractParams(), {"id": None}, lambda: None
    if hasattr(model, "embed") and hasattr(model, "config"):  # an already loaded SpikeVAE
        info = getattr(model, "model_info", None)
        desc = {"id": getattr(info, "model_id", "<in-memory SpikeVAE>"), "revision": getattr(info, "revision", None),
                "config": model.config.to_dict()}
        eparams = info.extract_params() if info is not None else ExtractParams()
        return model.config.event_schema, eparams, desc, (lambda: model if features == "model" else None)
    from .checkpoint import load_config, load_model_from_config

    info = load_config(model)
    desc = {"id": str(info.model_id), "folder": str(info.folder), "revision": info.revision, "source": info.source,
            "config": dict(info.config["model"])}

    def load_network():  # from the folder load_config resolved: a hub id is resolved once
        return load_model_from_config(info) if features == "model" else None

    return info.schema, info.extract_params(), desc, load_network


#: Encoder batches per block of events a thread embeds (see :func:`embed_events`).
EMBED_BLOCK_BATCHES = 16


def embed_events(net, events: dict, batch_size: int = 128, n_threads: int = 1) -> tuple[np.ndarray, float]:
    """Encoder embedding (latent mean) of every event, in batches, without gradients.

    With ``n_threads`` > 1 the batches are embedded in that many threads, blocks of
    ``EMBED_BLOCK_BATCHES`` at a time, each on one torch thread (torch releases the GIL in its
    operators). The batches are the same as in one thread, and so are the values. torch's own
    intra-op threads on a batch of 128 events synchronise at every operator: on drift64's
    34,500 events (five interleaved pairs) two intra-op threads embedded 9.7-15.4k events/s,
    two threads of batches 13.9-16.0k, with less CPU time.

    Returns the ``[N, D]`` float32 embedding and the throughput in events per second.
    """
    import torch

    n = len(events["waveform"])
    net.eval()
    block = EMBED_BLOCK_BATCHES * batch_size

    def embed_block(start: int) -> list[np.ndarray]:
        out = []
        with torch.inference_mode():  # thread-local: entered in each thread
            for s in range(start, min(n, start + block), batch_size):
                wf = torch.from_numpy(events["waveform"][s: s + batch_size].astype(np.float32))
                off = torch.from_numpy(events["channel_offsets_um"][s: s + batch_size])
                mask = torch.from_numpy(events["channel_mask"][s: s + batch_size])
                out.append(net.embed(wf, off, mask).float().numpy())
        return out

    t0 = time.perf_counter()
    with _torch_threads(1):
        parts = thread_map(embed_block, range(0, n, block), n_threads)
    dt = time.perf_counter() - t0
    out = [batch for part in parts for batch in part]
    emb = np.concatenate(out) if out else np.zeros((0, net.config.latent_dim), np.float32)
    logger.info("embedded %d events in %.2f s (%.0f events/s)", n, dt, n / max(dt, 1e-9))
    return emb, n / max(dt, 1e-9)


@contextmanager
def _torch_threads(n_threads: int):
    """torch's intra-op threads set to ``n_threads`` inside, restored after. For the steps of the
    main process that run while no worker does (dredge's cross-correlations, torch convolutions:
    0.78 s against 1.25 s with one thread on the drifting Neuropixels benchmark; the encoder sets
    one and runs its own threads, :func:`embed_events`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n_threads)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pca_features(events: dict, n_components: int = 10, seed: int = 0, max_fit: int = 20_000) -> np.ndarray:
    """PCA of the flattened ``[T, K]`` event waveforms (masked channels are zero)."""
    from sklearn.decomposition import PCA

    wf = events["waveform"]
    n = len(wf)
    X = wf.reshape(n, -1)
    rng = np.random.default_rng(seed)
    fit = rng.choice(n, min(n, max_fit), replace=False)
    k = int(min(n_components, X.shape[1], max(1, len(fit) - 1)))
    pca = PCA(k, svd_solver="covariance_eigh", random_state=seed).fit(X[fit].astype(np.float32))
    return np.concatenate([pca.transform(X[s: s + 50_000].astype(np.float32)) for s in range(0, n, 50_000)])


def clustering_features(emb: np.ndarray, positions: np.ndarray, position_scale_um: float) -> np.ndarray:
    """Embedding (centred, scaled to unit mean variance per dimension) beside position / scale.

    One global scale keeps the embedding's own geometry (its leading directions, where units
    differ, stay dominant: whitening would blow noise directions up to the same size), and
    ``position_scale_um`` micrometres of position weigh as much as one average embedding SD.
    """
    emb = np.asarray(emb, dtype=np.float64)
    emb = emb - emb.mean(axis=0)
    scale = np.sqrt(np.mean(emb.var(axis=0))) if len(emb) > 1 else 1.0
    emb = emb / (scale if scale > 0 else 1.0)
    return np.concatenate([emb, positions[:, :2] / position_scale_um], axis=1).astype(np.float32)


def _event_times_s(events: dict, rec) -> np.ndarray:
    """Event times in seconds with the recording's segments laid end to end."""
    fs = rec.get_sampling_frequency()
    starts = np.cumsum([0] + [rec.get_num_samples(s) for s in range(rec.get_num_segments())])
    return (starts[events["segment"].astype(np.int64)] + events["sample_index"]) / fs


# ------------------------------------------------------------------------------------ positions
def _channel_index(events: dict, rec) -> np.ndarray:
    ids = np.asarray([str(c) for c in rec.channel_ids])
    lookup = {c: i for i, c in enumerate(ids)}
    return np.fromiter((lookup[c] for c in events["peak_channel_id"]), dtype=np.int64,
                       count=len(events["peak_channel_id"]))


#: Events converted to float32 at a time by :func:`localize_events`.
LOCALIZE_BLOCK_EVENTS = 4096


def localize_events(events: dict, channel_locations: np.ndarray, channel_index: np.ndarray,
                    radius_um: float = 75.0, n_threads: int = 1) -> np.ndarray:
    """Centre of mass of each event on the probe, from its own K channels.

    The same estimate as SpikeInterface's ``center_of_mass`` peak localisation (peak-to-peak
    amplitudes as weights, channels within ``radius_um`` of the peak channel), computed from the
    extracted events instead of re-reading the traces. The peak-to-peak amplitudes are taken by
    blocks of events in ``n_threads`` threads (numpy's reductions release the interpreter lock:
    0.10 against 0.17 s for 36,000 events in two), the same values.

    Returns ``[N, 2]`` x, y in micrometres.
    """
    wf = events["waveform"]
    off = events["channel_offsets_um"].astype(np.float64)
    mask = events["channel_mask"] & (np.linalg.norm(off, axis=2) <= radius_um)
    ptp = np.zeros(mask.shape, dtype=np.float64)

    # in blocks whose float32 copy (12 MB on 12 channels) the allocator reuses: a fresh copy of a
    # large block costs the kernel more than the conversion (drift64's first call, in 50,000-event
    # blocks: 0.43 s, 0.26 s of it system time, against 0.17 s)
    def block(s: int) -> None:
        w = wf[s: s + LOCALIZE_BLOCK_EVENTS].astype(np.float32)
        ptp[s: s + LOCALIZE_BLOCK_EVENTS] = w.max(axis=1) - w.min(axis=1)

    thread_map(block, range(0, len(wf), LOCALIZE_BLOCK_EVENTS), n_threads)
    ptp *= mask
    com = np.sum(ptp[..., None] * off, axis=1) / np.maximum(ptp.sum(axis=1), 1e-9)[:, None]
    peak_xy = np.asarray(channel_locations, dtype=np.float64)[channel_index, :2]
    return (peak_xy + com).astype(np.float32)


#: 'auto' motion correction: a recording whose cheap screening estimate of the drift stays within
#: this fraction of ``SortParams.drift_threshold_um`` is taken as static (see :func:`estimate_drift`).
DRIFT_SCREEN_FRACTION = 0.5
#: Depth bin of the screening estimate's activity histograms (the full estimate keeps dredge's
#: 1 um). dredge's cost is the cross-correlation of every pair of time bins' histograms over
#: every lag, which shrinks with the square of the bin: on the drifting Neuropixels benchmark's
#: grid positions 0.40 s against 1.24 s, the displacement within 0.16 um RMS (0.43 um at most) of
#: the 1 um estimate, on 20 um contacts. The full estimate in 2 um bins too lost 0.006 of drift64's
#: mean accuracy over its three seeds (0.922 -> 0.916): only the screen, a detector, uses them.
SCREEN_BIN_UM = 2.0
#: The motion estimate's grid_convolution localisation reads chunks of this many channel-seconds
#: (10 s on 64 channels; 1.7 s on 384, where 10 s chunks peaked at 2.7 GB against 1.5 GB static).
GRID_CHUNK_CHANNEL_SECONDS = 640.0


def estimate_drift(rec, events: dict, channel_index: np.ndarray, job_kwargs: dict,
                   rigid_below_um: float = 800.0, time_smooth_s: float = 1.0, seed: int = 0,
                   screen_below_um: float | None = None, positions: np.ndarray | None = None):
    """Estimate motion with SpikeInterface from the detected events (``dredge_ap``).

    The events' peaks are localised with SpikeInterface's ``grid_convolution``, the localisation
    of its ``dredge_fast`` motion preset (its percentile step vectorised, the same positions:
    :mod:`inference.grid_localization`). It is far less biased towards the contacts than a centre
    of mass, which on a 20 um pitch turns a smooth drift into steps and made the estimate noisy.
    ``dredge_ap`` then estimates the displacement: rigid on probes shorter than ``rigid_below_um``
    (a single window; the 400 um non-rigid windows of the preset would sit beyond a short
    probe's ends), non-rigid with 400 um Gaussian windows on longer ones.

    With ``screen_below_um``, a cheap estimate comes first: the same ``dredge_ap``, in
    ``SCREEN_BIN_UM`` depth bins, on the events' centre-of-mass ``positions``
    (:func:`localize_events`, computed from the extracted events: no pass over the traces; without
    ``positions``, SpikeInterface's ``center_of_mass`` pass). The full estimate's
    ``grid_convolution`` pass is most of the cost. The centre of mass's steps make the screen a
    poor correction but a good detector (benchmark recordings, screen / full estimate: static
    np384 0.0 / 0.0 um; drift64 and its two seeds, +-20 um zigzags, 21.3 / 20.6, 19.3 / 20.7 and
    18.4 / 21.0 um; np384drift 24.0 / 20.3 um): when it stays within ``screen_below_um`` the
    recording is taken as static and the full estimate is skipped.

    Returns (Motion or None, max absolute displacement in um or None). The Motion is None when
    the probe is too short or too two-dimensional for depth drift correction (displacement None
    too), when the estimate failed (same), or when the screen found no drift (the displacement is
    the screen's).
    """
    from spikeinterface.sortingcomponents.motion import estimate_motion
    from spikeinterface.sortingcomponents.peak_localization import localize_peaks
    from spikeinterface.sortingcomponents.tools import check_probe_for_drift_correction

    from .grid_localization import localize_grid_convolution

    cache_spikeinterface_kernels()
    if not check_probe_for_drift_correction(rec):
        logger.info("probe geometry does not allow drift correction along depth: skipped")
        return None, None
    peaks = np.zeros(len(channel_index), dtype=[("sample_index", "int64"), ("channel_index", "int64"),
                                                ("amplitude", "float64"), ("segment_index", "int64")])
    peaks["sample_index"] = events["sample_index"]
    peaks["channel_index"] = channel_index
    peaks["amplitude"] = events["amplitude_uv"]
    peaks["segment_index"] = events["segment"]
    order = np.lexsort((peaks["sample_index"], peaks["segment_index"]))
    peaks = peaks[order]
    span_um = float(np.ptp(rec.get_channel_locations()[:, 1]))
    rigid = span_um < rigid_below_um
    jk = {k: v for k, v in job_kwargs.items() if k in ("n_jobs", "chunk_duration", "progress_bar")}
    methods = ["center_of_mass", "grid_convolution"] if screen_below_um is not None else ["grid_convolution"]
    for method in methods:
        try:
            if method == "center_of_mass" and positions is not None:
                locs = np.zeros(len(peaks), dtype=[("x", "float64"), ("y", "float64")])
                locs["x"], locs["y"] = positions[order, 0], positions[order, 1]
            elif method == "center_of_mass":
                locs = localize_peaks(rec, peaks, method=method, job_kwargs=jk)
            else:
                # Seeded: grid_convolution's prototype waveform comes from a random subset of the
                # peaks (unseeded, two runs gave positions up to 7 um apart and different sortings).
                # In long chunks: the method works channel by channel within a chunk, a few peaks
                # at a time in 1 s chunks (drift64: 7.1 s against 2.1 s in 10 s chunks, the same
                # positions). Its chunk holds every peak's waveform on every channel, so the
                # length shrinks with the channel count (GRID_CHUNK_CHANNEL_SECONDS)
                chunk_s = min(10.0, max(1.0, GRID_CHUNK_CHANNEL_SECONDS / rec.get_num_channels()))
                locs = localize_grid_convolution(rec, peaks, {**jk, "chunk_duration": f"{chunk_s:g}s"}, seed=seed,
                                                 windows=_cache_windows(rec))
            with _torch_threads(job_kwargs.get("n_jobs", 1)):
                motion = estimate_motion(rec, peaks, locs, method="dredge_ap", direction="y", rigid=rigid,
                                         bin_um=SCREEN_BIN_UM if method == "center_of_mass" else 1.0,
                                         win_shape="gaussian", win_step_um=400.0, win_scale_um=400.0,
                                         histogram_time_smooth_s=time_smooth_s, progress_bar=False)
        except Exception as err:  # noqa: BLE001 - a failed estimate must not stop the sort
            if method == "center_of_mass":
                logger.info("screening drift estimate failed (%s): estimating it in full", err)
                continue
            logger.warning("motion estimation failed (%s): sorting without motion correction", err)
            return None, None
        max_disp = max(float(np.max(np.abs(d))) for d in motion.displacement)
        if method == "center_of_mass" and max_disp <= screen_below_um:
            logger.info("no drift found by the screening estimate (%d peaks): max displacement %.1f um", len(peaks),
                        max_disp)
            return None, max_disp
        if method == "center_of_mass":
            logger.info("screening drift estimate: max displacement %.1f um; estimating it in full", max_disp)
    logger.info("estimated drift (%s, %d peaks): max displacement %.1f um", "rigid" if rigid else "non-rigid",
                len(peaks), max_disp)
    return motion, max_disp


def _cache(rec, mode: str, job_kwargs: dict, while_writing=None):
    """The preprocessed recording held in RAM: one filtering pass instead of one per stage.

    The traces are quantised to int16 in steps of 1/``_CACHE_STEPS_PER_NOISE`` of the median
    channel noise (rounding error about noise/220; the range, +-32000 steps, is +-500 noise
    units, and the rare sample beyond is clipped) and read back as float32 through a lazy
    one-pass scale (:class:`spikevault.filters.OnePassScaleRecording`). Int16 halves the memory,
    and reading it back costs a tenth of a float16 conversion, which the later passes (motion,
    templates, matching) pay on every chunk. The step follows the noise, so traces in volts or
    microvolts quantise alike; a channel whose noise is 50 times the median's keeps +-10 of its
    own noise units. (A step per channel was tried: static32 0.980 -> 0.959 with 16 units for 15
    neurons, drift64 0.856 -> 0.853, within the spread any small perturbation of the traces gives;
    see BENCHMARKS.md.) Shared memory lets SpikeInterface's worker processes read the cache instead
    of each receiving a pickled copy.

    ``while_writing()``, when given, runs in the main process while the workers write the cache
    (once; before returning when nothing is cached).
    """
    if mode == "none":
        if while_writing is not None:
            while_writing()
        return rec
    from spikevault.filters import OnePassScaleRecording, QuantiseRecording, mad_noise_levels

    noise = mad_noise_levels(rec, num_chunks_per_segment=4, chunk_size=min(10_000, rec.get_num_samples(0)), seed=0,
                             n_threads=job_kwargs.get("n_jobs", 1))
    live = noise[noise > 0]
    step = float(np.median(live)) / _CACHE_STEPS_PER_NOISE if len(live) else 1.0
    if mode == "auto":
        import psutil

        nbytes = rec.get_total_samples() * rec.get_num_channels() * 2
        if nbytes > 0.25 * psutil.virtual_memory().available:
            logger.info("preprocessed traces (%.1f GB) too large to cache in RAM: kept lazy", nbytes / 1e9)
            if while_writing is not None:
                while_writing()
            return rec
    jk = {k: v for k, v in job_kwargs.items() if k in ("n_jobs", "progress_bar", "chunk_duration")}
    limit = _INT16_LIMIT * step
    # OnePassScaleRecording(clip(rec, -limit, limit), gain=1 / step, dtype="int16"), bit for bit, with
    # the median reference's subtraction, the clip and the scaling in one pass
    quantised = QuantiseRecording(rec, step=step, limit=limit)
    cached = _save_to_shared_memory(quantised, jk, while_writing=while_writing)
    cached.set_probe(rec.get_probe(), in_place=True) if not cached.has_probe() and rec.has_probe() else None
    return OnePassScaleRecording(cached, gain=step, dtype="float32")


def _save_to_shared_memory(rec, job_kwargs: dict, while_writing=None):
    """``rec.save(format="memory", sharedmem=True)`` without its zero fill.

    SpikeInterface writes zeros over the whole new buffer before the workers write the traces:
    on this machine 0.9-3 s for drift64's 1.15 GB, in the main process while the workers wait.
    A new POSIX shared-memory block is zeroed by the system already; here the workers' writes are
    the first touch of each page. Returns the same ``SharedMemoryRecording`` (it unlinks the block
    when deleted).

    ``while_writing()`` runs once the first chunk is written, so after the workers started (they
    are forked without what it loads) and while they write the rest; with ``n_jobs=1``, between
    the first chunk and the others."""
    from multiprocessing.shared_memory import SharedMemory

    from spikeinterface.core import SharedMemoryRecording
    from spikeinterface.core.job_tools import TimeSeriesChunkExecutor, fix_job_kwargs

    dtype = np.dtype(rec.get_dtype())
    shapes = [(int(rec.get_num_samples(s)), int(rec.get_num_channels())) for s in range(rec.get_num_segments())]
    blocks = [SharedMemory(create=True, size=max(1, n * c * dtype.itemsize)) for n, c in shapes]
    try:
        names = [b.name for b in blocks]
        first_chunk_written = _once(while_writing)
        TimeSeriesChunkExecutor(rec, _write_shared_chunk, _init_shared_writer, (rec, names, shapes, dtype),
                                gather_func=first_chunk_written, job_name="cache preprocessed traces",
                                **fix_job_kwargs(job_kwargs)).run()
        first_chunk_written()  # a recording without chunks
        cached = SharedMemoryRecording(shm_names=names, shape_list=shapes, dtype=dtype,
                                       sampling_frequency=rec.get_sampling_frequency(), channel_ids=rec.channel_ids,
                                       t_starts=rec.get_segment_t_starts(), main_shm_owner=True)
    except BaseException:
        for block in blocks:
            block.close()
            block.unlink()
        raise
    for block in blocks:  # the recording holds its own handles
        block.close()
    rec.copy_metadata(cached)
    for segment_index in range(rec.get_num_segments()):  # as SpikeInterface's save keeps them
        if rec.has_time_vector(segment_index):
            cached.set_times(rec.get_times(segment_index=segment_index), segment_index=segment_index)
    return cached


def _correct_cache_in_place(cache, corrected, job_kwargs: dict) -> bool:
    """Write ``corrected`` (a lazy correction of ``cache``: no chunk reads beyond its own frames)
    over the sort's int16 cache (:func:`_cache`), chunk by chunk in the workers, quantised as the
    cache was. Returns False, writing nothing, when ``cache`` is not that cache (not cached).

    Each chunk reads its own frames and writes them back, and the chunks are disjoint, so the
    workers never read a frame another one has rewritten. On the drifting Neuropixels benchmark
    the lazy interpolation took 35-38 ms per 1 s chunk on each of 311 reads (re-detection,
    templates, noise, matching): here it runs once.
    """
    from spikeinterface.core.job_tools import TimeSeriesChunkExecutor, fix_job_kwargs

    from spikevault.filters import QuantiseRecording

    parts = _cache_parts(cache)
    if parts is None:
        return False
    shared, step = parts
    quantised = QuantiseRecording(corrected, step=step, limit=_INT16_LIMIT * step)
    kw = shared._kwargs
    jk = {k: v for k, v in job_kwargs.items() if k in ("n_jobs", "progress_bar", "chunk_duration")}
    TimeSeriesChunkExecutor(quantised, _write_shared_chunk, _init_shared_writer,
                            (quantised, kw["shm_names"], kw["shape_list"], np.dtype("int16")),
                            job_name="write the motion-corrected traces over the cache", **fix_job_kwargs(jk)).run()
    return True


def _cache_parts(cache):
    """(its int16 ``SharedMemoryRecording``, its quantisation step) when ``cache`` is the sort's
    cache (:func:`_cache`), else None."""
    from spikeinterface.core import SharedMemoryRecording

    from spikevault.filters import OnePassScaleRecording

    if not isinstance(cache, OnePassScaleRecording):
        return None
    shared = cache._kwargs["recording"]
    gain = np.unique(np.asarray(cache._kwargs["gain"]))
    if (not isinstance(shared, SharedMemoryRecording) or np.dtype(shared.get_dtype()) != np.int16 or len(gain) != 1
            or np.any(np.asarray(cache._kwargs["offset"]) != 0)):
        return None
    return shared, float(gain[0])


def _cache_windows(cache) -> CacheWindows | None:
    """A :class:`CacheWindows` reader of the sort's cache, or None when ``cache`` is not that
    cache (:func:`_cache_parts`)."""
    parts = _cache_parts(cache)
    return None if parts is None else CacheWindows(*parts)


class CacheWindows:
    """The sort's int16 cache read around given samples, in place in its shared memory: no pass
    over the recording, no workers.

    ``windows(segment_index, sample_index, nbefore, nafter, channels)`` -> float32
    ``[len(sample_index), nbefore + nafter, len(channels)]``: the values the cache's chunks hold
    (the int16 steps times the step in float64, rounded to float32, as
    :class:`spikevault.filters.OnePassScaleRecording` scales them), zeros beyond the segment's
    ends (as SpikeInterface pads its chunks). :meth:`steps` gives the int16 steps themselves
    (times ``step``: the values)."""

    def __init__(self, shared, step: float):
        self.shared = shared
        self.step = step

    def steps(self, segment_index, sample_index, nbefore: int, nafter: int, channels) -> np.ndarray:
        """The int16 steps ``[len(sample_index), nbefore + nafter, len(channels)]`` (0 beyond the ends)."""
        traces = self.shared.get_traces(segment_index=int(segment_index))  # the shared array itself
        channels = np.asarray(channels, dtype=np.int64)
        frames = np.asarray(sample_index, dtype=np.int64)[:, None] + np.arange(-nbefore, nafter)
        inside = (frames >= 0) & (frames < len(traces))
        # whole rows of the channels' span gathered (copies of contiguous runs), then the channels:
        # a gather per (frame, channel) was several times slower
        lo, hi = (int(channels.min()), int(channels.max()) + 1) if len(channels) else (0, 0)
        out = traces[:, lo:hi][np.where(inside, frames, 0)]
        if hi - lo != len(channels) or np.any(channels != np.arange(lo, hi)):
            out = out[:, :, channels - lo]
        if not inside.all():
            out[~inside] = 0
        return out

    def __call__(self, segment_index, sample_index, nbefore: int, nafter: int, channels) -> np.ndarray:
        return (self.steps(segment_index, sample_index, nbefore, nafter, channels) * self.step).astype(np.float32)


def _init_shared_writer(rec, names, shapes, dtype):
    from multiprocessing.shared_memory import SharedMemory

    blocks = [SharedMemory(name) for name in names]
    arrays = [np.ndarray(shape, dtype=dtype, buffer=b.buf) for b, shape in zip(blocks, shapes)]
    return {"recording": rec, "blocks": blocks, "arrays": arrays}


def _write_shared_chunk(segment_index, start_frame, end_frame, worker):
    traces = worker["recording"].get_traces(start_frame=start_frame, end_frame=end_frame, segment_index=segment_index)
    worker["arrays"][segment_index][start_frame:end_frame] = traces


#: Cache quantisation steps per unit of median channel noise (MAD).
_CACHE_STEPS_PER_NOISE = 64
#: Largest cached magnitude in steps (a little inside int16's range, so rounding cannot overflow).
_INT16_LIMIT = 32_000


# ------------------------------------------------------------------------------------ templates
def _noise_levels(rec, job_kwargs) -> np.ndarray:
    from spikevault.filters import mad_noise_levels

    fs = rec.get_sampling_frequency()
    n = int(min(fs * 0.5, min(rec.get_num_samples(s) for s in range(rec.get_num_segments())) - 1))
    # SpikeInterface's get_noise_levels (MAD, 20 seeded chunks of 0.5 s), the same values
    noise = mad_noise_levels(rec, num_chunks_per_segment=20, chunk_size=max(n, 1), seed=0,
                             n_threads=job_kwargs.get("n_jobs", 1))
    return np.where(noise > 0, noise, 1.0).astype(np.float64)


def _template_spikes(rec, events, labels, p: SortParams, nbefore: int, nafter: int):
    """The curated units and a spike vector of (at most ``max_spikes_per_template`` random)
    events of each, whose template window fits in the recording."""
    rng = np.random.default_rng(p.seed)
    units = np.unique(labels[labels >= 0])
    keep = []
    for u in units:
        idx = np.flatnonzero(labels == u)
        keep.append(idx if len(idx) <= p.max_spikes_per_template else rng.choice(idx, p.max_spikes_per_template, replace=False))
    keep = np.sort(np.concatenate(keep))
    seg_len = np.array([rec.get_num_samples(s) for s in range(rec.get_num_segments())])
    s = events["sample_index"][keep]
    seg = events["segment"][keep].astype(np.int64)
    ok = (s - nbefore >= 0) & (s + nafter < seg_len[seg])
    keep = keep[ok]
    spikes = np.zeros(len(keep), dtype=[("sample_index", "int64"), ("unit_index", "int64"), ("segment_index", "int64")])
    spikes["sample_index"] = events["sample_index"][keep]
    spikes["unit_index"] = np.searchsorted(units, labels[keep])
    spikes["segment_index"] = events["segment"][keep]
    return units, spikes


#: A template keeps every channel when the median of its waveforms on the channels beyond its
#: radius has at least this many noise levels peak to peak (and at least ``TEMPLATE_FAR_MIN_CHANNELS``
#: channels are there). On a short dense probe a large neuron's spike covers more than half the
#: contacts and moves their median: the common median reference then subtracts a copy of it from
#: every contact (drift64: 30 uV peak to peak on the far contacts for a 105 uV neuron, the same on
#: all of them to 0.3 uV), which the template, averaged from the referenced traces, carries. Kept,
#: matching fits and subtracts the copy with its spike; cut off, it stayed in the residual for far
#: neurons to fit. The median over the far channels is the copy; a noisy template's far channels,
#: each of which can pass 2 noise levels by chance, do not add up to one.
TEMPLATE_FAR_SNR = 2.0
#: Fewest channels beyond the radius for their median to tell a copy from noise.
TEMPLATE_FAR_MIN_CHANNELS = 8


def _template_mask(arr: np.ndarray, locations: np.ndarray, noise: np.ndarray, radius_um: float) -> np.ndarray:
    """Channels of each dense template [units, samples, channels]: within ``radius_um`` of its
    peak channel and at least the noise peak to peak (the peak channel always); every channel
    when the template carries the median reference's copy of its spike (``TEMPLATE_FAR_SNR``)."""
    peak_ch = np.argmax(np.ptp(arr, axis=1), axis=1)
    dist = np.linalg.norm(locations[peak_ch][:, None, :] - locations[None, :, :], axis=2)
    snr = np.ptp(arr, axis=1) / noise[None, :]
    mask = (dist <= radius_um) & (snr >= 1.0)
    mask[np.arange(len(arr)), peak_ch] = True
    far = dist > radius_um
    level = float(np.median(noise))
    for unit in np.flatnonzero(far.sum(axis=1) >= TEMPLATE_FAR_MIN_CHANNELS):
        copy = np.median(arr[unit][:, far[unit]], axis=1)
        if np.ptp(copy) >= TEMPLATE_FAR_SNR * level:
            mask[unit] = True
    return mask


def _sparse_templates(arr, units, rec, noise, p: SortParams, nbefore: int):
    from spikeinterface.core import Templates
    from spikeinterface.core.sparsity import ChannelSparsity

    mask = _template_mask(arr, rec.get_channel_locations()[:, :2], noise, p.template_radius_um)
    dense = Templates(templates_array=arr.astype(np.float32), sampling_frequency=rec.get_sampling_frequency(),
                      nbefore=nbefore, is_in_uV=True, sparsity_mask=None, channel_ids=rec.channel_ids, unit_ids=units,
                      probe=rec.get_probe() if rec.has_probe() else None)
    return dense.to_sparse(ChannelSparsity(mask, units, rec.channel_ids))


def _template_window(rec, p: SortParams) -> tuple[int, int]:
    fs = rec.get_sampling_frequency()
    return int(round(p.template_ms_before * fs / 1000)), int(round(p.template_ms_after * fs / 1000))


def make_templates(rec, events, labels, channel_index, p: SortParams, noise, job_kwargs):
    """Sparse SpikeInterface ``Templates`` of the curated units, from the preprocessed traces."""
    nbefore, nafter = _template_window(rec, p)
    units, spikes = _template_spikes(rec, events, labels, p, nbefore, nafter)
    arr = average_spikes(rec, spikes, len(units), nbefore, nafter, job_kwargs)
    return _sparse_templates(arr, units, rec, noise, p, nbefore)


#: Spikes read at a time by :func:`average_spikes` from the cache.
AVERAGE_BLOCK_SPIKES = 256


def average_spikes(rec, spikes: np.ndarray, num_units: int, nbefore: int, nafter: int, job_kwargs: dict) -> np.ndarray:
    """SpikeInterface's ``estimate_templates(rec, spikes, range(num_units), nbefore, nafter)``:
    the average window ``[units, nbefore + nafter, channels]`` float32 of each unit's spikes
    (``spikes``: a spike vector, ``unit_index`` in ``range(num_units)``).

    From the sort's cache (:func:`_cache_windows`), the spikes' windows are read where they are,
    not by a pass over the whole recording in the workers (18,000 spikes on drift64: 0.09-0.14
    s against the pass's 0.9-1.0 s), their int16 steps summed exactly and scaled once (SpikeInterface sums the scaled
    values in float32: the averages agree to float32 rounding). Otherwise SpikeInterface's
    ``estimate_templates``."""
    windows = _cache_windows(rec)
    if windows is None:
        from spikeinterface.core.waveform_tools import estimate_templates

        jk = {k: v for k, v in job_kwargs.items() if k in ("n_jobs", "chunk_duration", "progress_bar")}
        return estimate_templates(rec, spikes, np.arange(num_units), nbefore, nafter, return_in_uV=False, **jk)
    channels = np.arange(rec.get_num_channels())
    order = np.lexsort((spikes["sample_index"], spikes["segment_index"], spikes["unit_index"]))

    def block_sums(start: int) -> list[tuple[int, np.ndarray]]:
        block = spikes[order[start: start + AVERAGE_BLOCK_SPIKES]]
        out = []
        for segment in np.unique(block["segment_index"]):
            mine = block[block["segment_index"] == segment]
            got = windows.steps(segment, mine["sample_index"], nbefore, nafter, channels)
            units, first = np.unique(mine["unit_index"], return_index=True)
            # sorted by unit: one run of rows each
            out += [(int(u), part.sum(axis=0, dtype=np.int64)) for u, part in zip(units, np.split(got, first[1:]))]
        return out

    # numpy's gathers and sums release the GIL
    parts = thread_map(block_sums, range(0, len(order), AVERAGE_BLOCK_SPIKES), int(job_kwargs.get("n_jobs", 1)))
    sums = np.zeros((num_units, nbefore + nafter, len(channels)), dtype=np.int64)
    for part in parts:
        for unit, total in part:
            sums[unit] += total
    counts = np.bincount(spikes["unit_index"], minlength=num_units)[:num_units]
    # the int16 steps summed exactly, then scaled once
    return (sums * (windows.step / np.maximum(counts, 1))[:, None, None]).astype(np.float32)


def drift_step_um(motion, templates) -> float | None:
    """Displacement step of the drifting templates' wobble precomputations: ``DRIFT_STEP_UM``,
    coarser when one precomputation per step over the motion's range would take more than
    ``DRIFT_MEMORY_BYTES`` (each holds the pairwise convolutions of overlapping templates: units x
    8 jitters x most overlapping units x twice the template length, float32), or None (match the
    interpolated traces) when that needs a step above ``DRIFT_MAX_STEP_UM``."""
    from .drift_matching import displacement_grid

    mask = templates.sparsity.mask if templates.sparsity is not None else np.ones((len(templates.unit_ids), 1), bool)
    overlaps = int(((mask.astype(np.int64) @ mask.T.astype(np.int64)) > 0).sum(axis=1).max())
    per_engine = 4.0 * len(templates.unit_ids) * 8 * overlaps * 2 * templates.num_samples
    span = float(np.ptp(displacement_grid(motion, DRIFT_STEP_UM)))
    engines = max(int(DRIFT_MEMORY_BYTES // per_engine), 1)
    step = max(DRIFT_STEP_UM, span / max(engines - 1, 1))
    if step > DRIFT_MAX_STEP_UM:
        logger.info("drifting templates would need a %.1f um step (%d units, %.0f um of drift): matching the "
                    "interpolated traces", step, len(templates.unit_ids), span)
        return None
    return step


def make_registered_templates(recorded, motion, events, labels, p: SortParams, noise, job_kwargs):
    """Rest-frame templates of the curated units from the recorded (not motion-corrected) traces
    (:func:`inference.drift_matching.registered_templates`) -> (sparse ``Templates`` on the
    contacts, :class:`DriftInfo` for the matching pass)."""
    from .drift_matching import registered_templates

    nbefore, nafter = _template_window(recorded, p)
    units, spikes = _template_spikes(recorded, events, labels, p, nbefore, nafter)
    dense, locations, real, _ = registered_templates(
        recorded, motion, spikes["sample_index"], spikes["unit_index"], spikes["segment_index"], len(units), nbefore,
        nafter, DRIFT_STEP_UM, job_kwargs, average=average_spikes)
    templates = _sparse_templates(dense[:, :, real], units, recorded, noise, p, nbefore)
    return templates, DriftInfo(recorded, motion, dense, locations, p.template_radius_um)


#: Displacement step of the drifting templates (um): wobble's precomputation runs once per step.
DRIFT_STEP_UM = 2.0
#: Memory the drifting templates' wobble precomputations may take (an upper bound is estimated);
DRIFT_MEMORY_BYTES = 1.0e9
#: a coarser step than this falls back to matching the interpolated traces.
DRIFT_MAX_STEP_UM = 5.0


@dataclass
class DriftInfo:
    """What the matching pass needs to move the templates with the motion: the recorded
    (preprocessed, not corrected) traces, the rigid motion, the rest-frame templates on the
    extended locations, the template radius for their channel masks, and the displacement step
    of wobble's precomputations (:func:`drift_step_um`)."""

    recording: Any
    motion: Any
    dense: np.ndarray
    locations: np.ndarray
    radius_um: float
    step_um: float | None = DRIFT_STEP_UM


def match_templates(rec, templates, method: str, job_kwargs: dict, noise_levels: np.ndarray | None = None,
                    refractory_ms: float = 1.5, reject_noise: bool = True, seed: int = 0, stats: dict | None = None,
                    drift: DriftInfo | None = None):
    """Run SpikeInterface template matching over the whole recording -> NumpySorting.

    ``noise_levels`` (per channel, the traces' units) go to the engines that need them
    ('tdc-peeler', 'nearest'); they are measured here when not given. 'wobble' runs on whitened
    traces and its amplitudes are refitted (:func:`_wobble`); with ``drift`` (wobble only) its
    templates follow the motion over the recorded traces. After wobble or circus-omp, spikes
    of same-shape templates go to the unit whose amplitude fits them (:func:`reassign_by_amplitude`,
    never within ``refractory_ms`` of that unit's own spikes), and, with ``reject_noise``, the fits
    of low-amplitude templates that are more likely noise than spikes are removed
    (:func:`noise_fits`); ``stats`` (a dict) receives what was removed.
    """
    from spikeinterface.core import NumpySorting
    from spikeinterface.sortingcomponents.matching import find_spikes_from_templates
    from spikeinterface.sortingcomponents.matching.method_list import matching_methods

    cache_spikeinterface_kernels()
    jk = dict(job_kwargs)
    jk.setdefault("chunk_duration", "250ms" if method == "circus-omp" else "1s")
    fs = rec.get_sampling_frequency()
    refractory_samples = int(round(refractory_ms * fs / 1000))
    residual_window = int(round(RESIDUAL_WINDOW_MS * fs / 1000))
    measured = {}

    def measure_noise_sd():
        measured["noise_sd"] = amplitude_noise_sd(rec, templates, noise_levels=noise_levels, seed=seed)

    if method == "wobble":
        from spikevault.filters import local_whitening_matrix

        whitening = local_whitening_matrix(drift.recording if drift is not None else rec, WHITEN_RADIUS_UM,
                                           seed=0).astype(np.float32)
        # the noise fits' amplitude SDs read the traces in this process while the workers match
        # (0.24 s of static32's main process before the pass, 0.67 s of the drifting Neuropixels')
        spikes = _wobble(rec, templates, jk, refractory_samples, noise_levels, whitening, drift=drift,
                         while_running=measure_noise_sd if reject_noise else None)
    else:
        method_kwargs = {}
        if getattr(matching_methods[method], "need_noise_levels", False):
            method_kwargs["noise_levels"] = _noise_levels(rec, job_kwargs) if noise_levels is None else noise_levels
        spikes = find_spikes_from_templates(rec, templates, method=method, method_kwargs=method_kwargs, job_kwargs=jk)
        spikes = spikes[spikes["cluster_index"] >= 0]
        spikes = spikes[np.lexsort((spikes["sample_index"], spikes["segment_index"]))]
    logger.info("template matching (%s): %d spikes for %d templates", method, len(spikes), len(templates.unit_ids))
    if method in ("circus-omp", "wobble") and len(spikes):
        dense = templates.get_dense_templates()
        moved = reassign_by_amplitude(spikes, dense, refractory_samples=refractory_samples)
        if moved:
            logger.info("template matching: %d spikes moved to a unit of the same shape whose amplitude fits them "
                        "better", moved)
        if method == "wobble":
            residual = residual_fits(spikes, dense, window_samples=residual_window,
                                     num_samples=int(rec.get_total_samples()))
            if residual.any():
                logger.info("template matching: %d fits of small templates beside a larger neighbour's fit removed",
                            int(residual.sum()))
            if stats is not None:
                units, counts = np.unique(spikes["cluster_index"][residual], return_counts=True)
                stats["residual_fits_removed"] = {str(templates.unit_ids[u]): int(n) for u, n in zip(units, counts)}
            spikes = spikes[~residual]
        if reject_noise:
            if "noise_sd" not in measured:
                measure_noise_sd()
            noise_sd = measured["noise_sd"]
            keep = np.ones(len(spikes), dtype=bool)
            # wobble: a fit beside another one is the residual rule's business; a collision blurs
            # its amplitude fit, and the noise test took real coincident spikes for noise
            crowded = (_crowded(spikes, residual_window) if method == "wobble"
                       else np.zeros(len(spikes), dtype=bool))
            removed = {}
            tested = {}
            for k in range(len(templates.unit_ids)):
                sel = np.flatnonzero(spikes["cluster_index"] == k)
                if len(sel) == 0:
                    continue
                amps = spikes["amplitude"][sel]
                # circus-omp keeps fits above its fixed bound; wobble keeps those whose objective
                # clears its threshold, a bound per template: the smallest kept fit estimates it
                bound = CIRCUS_OMP_MIN_AMPLITUDE if method == "circus-omp" else max(float(amps.min()), MIN_WOBBLE_BOUND)
                if bound / noise_sd[k] >= NOISE_TEST_MAX_SDS:
                    continue
                tested[str(templates.unit_ids[k])] = round(float(noise_sd[k]), 4)
                noise = noise_fits(amps, noise_sd[k], min_amplitude=bound) & ~crowded[sel]
                if noise.any():
                    keep[sel[noise]] = False
                    removed[str(templates.unit_ids[k])] = int(noise.sum())
            spikes = spikes[keep]
            if removed:
                logger.info("template matching: %d fits of %d low-amplitude templates were noise, not spikes: removed",
                            sum(removed.values()), len(removed))
            if stats is not None:
                stats["noise_fits_removed"] = removed
                stats["amplitude_noise_sd_of_tested_units"] = tested
    samples = [spikes["sample_index"][spikes["segment_index"] == s] for s in range(rec.get_num_segments())]
    labels = [np.asarray(templates.unit_ids)[spikes["cluster_index"][spikes["segment_index"] == s]]
              for s in range(rec.get_num_segments())]
    sorting = NumpySorting.from_samples_and_labels(samples, labels, fs, unit_ids=np.asarray(templates.unit_ids))
    return sorting


def _wobble(rec, templates, job_kwargs: dict, refractory_samples: int, noise_levels, whitening: np.ndarray,
            drift: DriftInfo | None = None, while_running=None) -> np.ndarray:
    """SpikeInterface's wobble matching on spatially whitened traces; amplitudes as scalings.

    Wobble runs as :class:`inference.fast_wobble.FftWobbleMatch`: the same algorithm and output,
    its objective computed by one FFT per chunk (the objective was most of wobble's time).

    Wobble's objective assumes white noise: it is computed on whitened traces (``whitening``:
    SpikeInterface's local whitening matrix of the recorded traces, ``WHITEN_RADIUS_UM``,
    :func:`spikevault.filters.local_whitening_matrix`) with the templates through the same linear
    map. The matrix is folded into the objective's spatial components
    (``FftWobbleMatch(whitening=...)``): the traces are not whitened chunk by chunk (43 ms per 1 s
    chunk of 384 channels, 4 ms of 64). Its threshold (``WOBBLE_THRESHOLD``) is on the fitted
    spike's squared norm in noise units (25: a spike 5 noise SDs tall along its
    template); its refractory period is the sort's (at most a template's length). Wobble reports
    each spike's peak voltage, not its fitted amplitude: the amplitudes (scaling of the template,
    1 = the template), as the steps after matching expect, are fitted in the same pass, chunk by
    chunk, jointly for overlapping spikes, on the traces' template channels
    (:func:`inference.fast_wobble.refit_amplitudes`; SpikeInterface's ``amplitude_scalings`` with
    collisions did the same in a pass of its own, about 1 s of static32 and np384).

    With ``drift``, wobble runs on the recorded traces (whitened the same way), each 1 s chunk with
    the templates moved to the chunk's displacement (:class:`inference.drift_matching.DriftingWobble`),
    the amplitudes refitted on the moved templates.

    ``while_running()``, when given, runs once in this process while the workers match
    (:func:`_run_pipeline`).
    """
    from spikeinterface.core import Templates
    from spikeinterface.core.sparsity import ChannelSparsity

    from .fast_wobble import FftWobbleMatch

    # wobble masks its objective over the refractory window: beyond a template's length it indexes
    # past the chunk (IndexError); a longer refractory period is the multi-unit test's business
    refractory = int(min(refractory_samples, templates.num_samples - 1))
    params = {"threshold": WOBBLE_THRESHOLD, "refractory_period_frames": refractory,
              "amplitude_variance": WOBBLE_AMPLITUDE_VARIANCE, "approx_rank": WOBBLE_APPROX_RANK}
    if drift is not None:
        return _drifting_wobble(templates, drift, job_kwargs, params, noise_levels, whitening, while_running)
    mask = (templates.sparsity.mask if templates.sparsity is not None
            else np.ones((len(templates.unit_ids), len(templates.channel_ids)), dtype=bool))
    white_templates = Templates(
        templates_array=(templates.get_dense_templates() @ whitening).astype(np.float32),
        sampling_frequency=templates.sampling_frequency, nbefore=templates.nbefore, is_in_uV=True,
        sparsity_mask=None, channel_ids=templates.channel_ids, unit_ids=templates.unit_ids, probe=templates.probe,
    ).to_sparse(ChannelSparsity(mask, templates.unit_ids, templates.channel_ids))
    node = FftWobbleMatch(rec, white_templates, parameters=params, whitening=whitening,
                          refit=templates.get_dense_templates() * mask[:, None, :])
    try:
        spikes = _run_pipeline(rec, [node], job_kwargs, job_name="find spikes (wobble)", squeeze_output=True,
                               while_running=while_running)
    finally:
        node.clean()
    spikes = spikes[spikes["cluster_index"] >= 0]
    return spikes[np.lexsort((spikes["cluster_index"], spikes["sample_index"], spikes["segment_index"]))]


def _drifting_wobble(templates, drift: DriftInfo, job_kwargs: dict, params: dict, noise_levels,
                     matrix: np.ndarray, while_running=None) -> np.ndarray:
    """Wobble with the templates following the motion over the recorded traces (whitened in its
    objective by ``matrix``)."""
    from .drift_matching import DriftingWobble

    locations = drift.recording.get_channel_locations()[:, :2]
    noise = (_noise_levels(drift.recording, job_kwargs) if noise_levels is None else np.asarray(noise_levels))

    def sparsity(dense):
        return _template_mask(dense, locations, noise, drift.radius_um)

    node = DriftingWobble(drift.recording, templates, motion=drift.motion, whitening=matrix, sparsity=sparsity,
                          step_um=drift.step_um, parameters=params, source=(drift.dense, drift.locations),
                          min_norm_sq=WOBBLE_THRESHOLD, n_threads=job_kwargs.get("n_jobs", 1))
    try:
        from spikeinterface.core.job_tools import ensure_chunk_size, fix_job_kwargs

        node.pin_spectra(ensure_chunk_size(drift.recording, **fix_job_kwargs(job_kwargs)),
                         n_threads=job_kwargs.get("n_jobs", 1))
        spikes = _run_pipeline(drift.recording, [node], job_kwargs, job_name="find spikes (wobble, drifting templates)",
                               squeeze_output=True, while_running=while_running)
    finally:
        node.clean()
    spikes = spikes[spikes["cluster_index"] >= 0]
    return spikes[np.lexsort((spikes["cluster_index"], spikes["sample_index"], spikes["segment_index"]))]


def _run_pipeline(recording, nodes, job_kwargs: dict, *, job_name: str, squeeze_output: bool = False,
                  while_running=None):
    """SpikeInterface's ``run_node_pipeline`` (outputs gathered in memory) with ``while_running()``
    called once in this process at the first chunk's result.

    With worker processes, they have all started then (a fork context starts every worker at the
    first chunk submitted: they do not inherit what ``while_running`` makes) and compute the other
    chunks while it runs; with ``n_jobs=1``, it runs between the first chunk and the others. It
    suits work that leaves the interpreter often (numpy): the pool's result thread shares it.
    """
    from spikeinterface.core.job_tools import TimeSeriesChunkExecutor, fix_job_kwargs
    from spikeinterface.core.node_pipeline import (GatherToMemory, PeakSource, _compute_peak_pipeline_chunk,
                                                   _init_peak_pipeline, check_graph)

    check_graph(nodes, check_for_peak_source=False)
    if isinstance(nodes[0], PeakSource) and nodes[0].need_first_call_before_pipeline:
        nodes[0]._first_call_before_pipeline()  # as run_node_pipeline does, before the workers start
    first_result, gather = _once(while_running), GatherToMemory()

    def gather_func(res):
        first_result()
        gather(res)

    TimeSeriesChunkExecutor(recording, _compute_peak_pipeline_chunk, _init_peak_pipeline, (recording, nodes, None),
                            gather_func=gather_func, job_name=job_name, **fix_job_kwargs(job_kwargs)).run()
    first_result()  # a recording without chunks
    return gather.finalize_buffers(squeeze_output=squeeze_output)


def _once(hook):
    """A function (of any arguments, ignored) that calls ``hook()`` on its first call only; one that
    does nothing when ``hook`` is None."""
    pending = [hook] if hook is not None else []

    def call(*_):
        while pending:
            pending.pop()()

    return call


#: Radius of the local whitening before wobble (SpikeInterface's default, as Lupin uses).
WHITEN_RADIUS_UM = 100.0
#: Wobble's threshold on the fitted spike's squared norm in whitened (noise) units.
WOBBLE_THRESHOLD = 25.0
#: Wobble's prior variance of a spike's amplitude around its template's (SpikeInterface's default).
WOBBLE_AMPLITUDE_VARIANCE = 1.0
#: Rank of wobble's approximation of each template (a sum of this many space x time products).
#: SpikeInterface's default is 5; the objective's cost is mostly linear in it (drift64's matching
#: stage 5.9-6.3 -> 4.6-5.0 s with 3). Real templates are close to rank 3: the Kilosort eMouse
#: set's 76 are exactly rank 3, and of the 17 Kampff dense-probe units' energy within 100 um,
#: rank 3 leaves 3.2% out (median; 15% at most) against rank 5's 1.6% (11%), rank 2's 7.5% (22%).
#: Spikes' amplitudes are refitted with the full templates. Ranks 2 and 3 gave every benchmark
#: recording's accuracy within 0.005 of rank 5's (BENCHMARKS.md, seventeenth session).
WOBBLE_APPROX_RANK = 3
#: Floor of the per-template amplitude bound estimated from wobble's smallest fit.
MIN_WOBBLE_BOUND = 0.05
#: :func:`residual_fits`: a fit is a candidate when a fit within this window (either side)
RESIDUAL_WINDOW_MS = 0.5
#: has this many times its norm on its channels,
RESIDUAL_FACTOR = 2.0
#: and a residual when its amplitude is this many robust SDs from its unit's other fits
RESIDUAL_MAX_SDS = 2.0
#: and at least this far from their median (amplitude units; a collision blurs a real spike's fit);
RESIDUAL_MIN_DEVIATION = 0.3
#: and only for pairs of units with more such fits than chance gives by this many Poisson SDs.
RESIDUAL_CHANCE_SDS = 3.0


def _near_pairs(spikes: np.ndarray, window_samples: int):
    """Yield ``(first, second)`` index arrays of every pair of spikes (any unit, same segment) at
    most ``window_samples`` apart, ``first`` the earlier. ``spikes`` must be sorted by sample
    index within each segment."""
    t = spikes["sample_index"].astype(np.int64)
    seg = spikes["segment_index"] if "segment_index" in spikes.dtype.names else np.zeros(len(t), np.int64)
    for shift in range(1, len(t)):
        near = np.flatnonzero((t[shift:] - t[:-shift] <= window_samples) & (seg[shift:] == seg[:-shift]))
        if len(near) == 0:
            break
        yield near, near + shift


def _crowded(spikes: np.ndarray, window_samples: int) -> np.ndarray:
    """Which spikes have another spike (any unit, same segment) within ``window_samples``.

    ``spikes`` must be sorted by sample index within each segment.
    """
    crowded = np.zeros(len(spikes), dtype=bool)
    for first, second in _near_pairs(spikes, window_samples):
        crowded[first] = True
        crowded[second] = True
    return crowded


def residual_fits(spikes: np.ndarray, templates: np.ndarray, window_samples: int, num_samples: int | None = None,
                  factor: float | None = None, max_sds: float | None = None,
                  min_deviation: float | None = None) -> np.ndarray:
    """Which matched spikes are a small template fitted to what a larger neighbour's fit left.

    A drifting or bending large spike is not exactly its template: the residual after its fit
    is large enough for a small template on the same channels to be fitted to it (on drift64 at
    seed 2001, a 39 uV neuron beside a 238 uV one at the top of the probe took 844 fits of the
    large one's spikes, and its unit was lost). Three conditions, each against a real coincidence
    of two neurons:

    * a fit of template ``k`` at amplitude ``a_k`` is a candidate when, within ``window_samples``,
      another fit ``a_j t_j`` has more than ``factor`` (default ``RESIDUAL_FACTOR``) times its norm
      on ``k``'s channels: ``a_j ||t_j on channels(k)|| > factor a_k ||t_k||`` (the strongest such
      ``j`` is its neighbour);
    * residuals come with their neighbour's spikes: a pair ``(k, j)`` counts only when ``k`` has
      more candidates beside ``j`` than two independent trains would give by chance,
      ``C > E + RESIDUAL_CHANCE_SDS sqrt(E) + 1`` with ``E = n_k n_j (2 window + 1) / num_samples``
      (Poisson). On SpikeInterface's generator (si32), where no template leaves a residual, the
      rule without this condition removed 153 real coincident spikes and 17 residuals; with it, 3
      and 0. On drift64 at seed 2001 the large neuron's pair has 1030 candidates against 11 by
      chance;
    * a candidate of such a pair is removed only when its amplitude is more than ``max_sds``
      (default ``RESIDUAL_MAX_SDS``) robust SDs (MAD) from the median of the unit's other fits, and
      more than ``min_deviation`` (default ``RESIDUAL_MIN_DEVIATION``) from it: a real coincidence
      keeps its neuron's amplitude, give or take the blur a collision puts on the fit.

    ``num_samples`` is the recording's length (all segments; default: the last spike's sample).
    ``spikes`` must be sorted by sample index within each segment.
    """
    from scipy.stats import median_abs_deviation

    factor = RESIDUAL_FACTOR if factor is None else factor
    max_sds = RESIDUAL_MAX_SDS if max_sds is None else max_sds
    min_deviation = RESIDUAL_MIN_DEVIATION if min_deviation is None else min_deviation
    flagged = np.zeros(len(spikes), dtype=bool)
    if len(spikes) == 0:
        return flagged
    if num_samples is None:
        segments = spikes["segment_index"] if "segment_index" in spikes.dtype.names else np.zeros(len(spikes), int)
        num_samples = sum(int(spikes["sample_index"][segments == s].max()) + 1 for s in np.unique(segments))
    dense = templates.astype(np.float64)
    num_units = len(dense)
    channels = (np.abs(dense).max(axis=1) > 0).astype(np.float64)  # [U, C]
    norms = np.sqrt(np.sum(dense ** 2, axis=(1, 2)))
    # on_k[k, j]: norm of template j on the channels of template k, over the norm of k
    on_k = np.sqrt(np.einsum("jtc,kc->kj", dense ** 2, channels)) / np.maximum(norms, 1e-12)[:, None]
    k = spikes["cluster_index"]
    a = spikes["amplitude"].astype(np.float64)
    candidate = np.zeros(len(spikes), dtype=bool)
    neighbour = np.full(len(spikes), -1)
    strength = np.zeros(len(spikes))
    for first, second in _near_pairs(spikes, window_samples):
        for fit, other in ((first, second), (second, first)):
            beside = a[other] * on_k[k[fit], k[other]]
            stronger = (beside > factor * a[fit]) & (beside > strength[fit])
            candidate[fit[stronger]] = True
            neighbour[fit[stronger]] = k[other[stronger]]
            strength[fit[stronger]] = beside[stronger]
    counts = np.bincount(k, minlength=num_units).astype(np.float64)
    observed = np.zeros((num_units, num_units))
    np.add.at(observed, (k[candidate], neighbour[candidate]), 1)
    by_chance = np.outer(counts, counts) * (2 * window_samples + 1) / max(num_samples, 1)
    paired = observed > by_chance + RESIDUAL_CHANCE_SDS * np.sqrt(by_chance) + 1
    tested_fits = candidate & paired[k, np.maximum(neighbour, 0)]
    for unit in np.unique(k[tested_fits]):
        mine = k == unit
        reference = a[mine & ~candidate]
        tested = np.flatnonzero(mine & tested_fits)
        if len(reference) < 10:  # (nearly) every fit of the unit sits on a larger one's
            flagged[tested] = True
            continue
        centre = np.median(reference)
        spread = median_abs_deviation(reference, scale="normal")
        flagged[tested] = np.abs(a[tested] - centre) > max(max_sds * spread, min_deviation)
    return flagged


#: circus-omp's default amplitude bounds: a fit below the lower one is no spike.
CIRCUS_OMP_MIN_AMPLITUDE = 0.6
#: A template whose noise-fitted amplitude SD puts the lower bound this many SDs (or more) away
#: from 0 gets no noise fits worth testing for (a Gaussian tail beyond 6 SD is ~1e-9).
NOISE_TEST_MAX_SDS = 6.0
#: Upper bound of measured / white-noise amplitude SD (1.8-4.1 in the benchmarks), for skipping
#: the measurement of templates far above the noise.
WHITE_NOISE_UNDERESTIMATE = 6.0


def amplitude_noise_sd(rec, templates, noise_levels: np.ndarray | None = None, num_chunks: int = 5,
                       chunk_s: float = 1.0, seed: int = 0) -> np.ndarray:
    """Per template: the SD of the amplitude a matching engine fits to noise alone.

    The amplitude of template ``t`` at time ``s`` is ``<x(s), t> / <t, t>`` (its channels, its
    window). Its spread over random chunks of the traces (MAD-based SD: spikes are a small part
    of the samples) is that of the fits noise can produce. It is ~0.01-0.05 for a neuron of
    100-300 uV and ~0.2 for one of 30 uV on 10 uV noise: for that one circus-omp's lower bound
    0.6 is only 3 SDs, and noise alone yields hundreds of fits above it in two minutes.

    With ``noise_levels`` (per channel), templates far above the noise are not measured: their
    value is the white-noise estimate ``sqrt(sum_c noise_c^2 |t_c|^2) / |t|^2`` times
    ``WHITE_NOISE_UNDERESTIMATE`` (the filtered noise is correlated in time and across channels:
    the measured SD was 1.8-4.1 times the white estimate in the benchmarks), which already puts the
    bound ``NOISE_TEST_MAX_SDS`` SDs away. The rest are measured on the union of their channels only,
    the fits computed in float32 (the traces' precision; the SDs within 2e-6 of float64's on drift64,
    in 0.37 against 0.58 s: it runs in the main process while the matching workers use both cores).
    """
    from scipy import fft as sfft
    from scipy.stats import median_abs_deviation

    dense = templates.get_dense_templates().astype(np.float64)
    num_units, num_samples, _ = dense.shape
    mask = templates.sparsity.mask if templates.sparsity is not None else np.abs(dense).max(axis=1) > 0
    energy = np.sum(dense ** 2, axis=1)  # [U, C]
    norm2 = np.maximum(energy.sum(axis=1), 1e-12)
    sd = np.full(num_units, np.inf)
    measure = np.arange(num_units)
    if noise_levels is not None:
        sd = WHITE_NOISE_UNDERESTIMATE * np.sqrt(energy @ np.asarray(noise_levels, dtype=np.float64) ** 2) / norm2
        measure = np.flatnonzero(CIRCUS_OMP_MIN_AMPLITUDE / sd < NOISE_TEST_MAX_SDS)
    fs = rec.get_sampling_frequency()
    seg_len = np.array([rec.get_num_samples(s) for s in range(rec.get_num_segments())])
    n = int(min(chunk_s * fs, seg_len.max()))
    if len(measure) == 0 or n <= num_samples:
        return sd
    channels = np.flatnonzero(mask[measure].any(axis=0))
    local = {int(c): i for i, c in enumerate(channels)}
    nfft = sfft.next_fast_len(n + num_samples - 1, real=True)
    kernels = {int(k): ([local[int(c)] for c in np.flatnonzero(mask[k])],
                        sfft.rfft(dense[k][::-1][:, mask[k]].astype(np.float32), nfft, axis=0) / np.float32(norm2[k]))
               for k in measure}
    fits = {int(k): [] for k in measure}
    rng = np.random.default_rng(seed)
    segments = np.flatnonzero(seg_len >= n)
    for _ in range(num_chunks):
        seg = int(rng.choice(segments))
        start = int(rng.integers(0, seg_len[seg] - n + 1))
        x = rec.get_traces(segment_index=seg, start_frame=start, end_frame=start + n, channel_ids=rec.channel_ids[channels])
        X = sfft.rfft(x.astype(np.float32, copy=False), nfft, axis=0)
        for k, (cols, kernel) in kernels.items():
            fits[k].append(sfft.irfft(np.sum(X[:, cols] * kernel, axis=1), nfft)[num_samples - 1: n])
    for k, chunks in fits.items():
        a = np.concatenate(chunks).astype(np.float64)
        sd[k] = median_abs_deviation(a, scale="normal")
    return sd


def noise_fits(amplitudes: np.ndarray, noise_sd: float, min_amplitude: float = CIRCUS_OMP_MIN_AMPLITUDE,
               iterations: int = 30) -> np.ndarray:
    """Which of one unit's matched spikes are more likely noise fits than spikes (boolean mask).

    A two-component mixture of the fitted amplitudes, fit by EM, both components truncated at
    ``min_amplitude`` (the bound every kept fit passed): noise fits follow the tail of
    ``N(0, noise_sd)`` (``noise_sd`` known, from :func:`amplitude_noise_sd`), the neuron's spikes
    ``N(mu, sigma)`` (free; its mean is often below 1, the template being the mean of the events
    detection picked, which were the larger ones). A spike goes when the noise component is the
    more likely one. Nothing is tested when the bound is ``NOISE_TEST_MAX_SDS`` noise SDs or more:
    every neuron of the benchmarks above ~60 uV.
    """
    from scipy.optimize import minimize
    from scipy.special import log_ndtr

    a = np.asarray(amplitudes, dtype=np.float64)
    if len(a) < 20 or not np.isfinite(noise_sd) or noise_sd <= 0 or min_amplitude / noise_sd >= NOISE_TEST_MAX_SDS:
        return np.zeros(len(a), dtype=bool)
    log_noise = _norm_logpdf(a / noise_sd) - np.log(noise_sd) - log_ndtr(-(min_amplitude / noise_sd))

    def log_unit(theta):
        mu, log_sigma = theta
        sigma = np.exp(log_sigma)
        return _norm_logpdf((a - mu) / sigma) - np.log(sigma) - log_ndtr(-((min_amplitude - mu) / sigma))

    theta = np.array([float(np.median(a)), np.log(max(float(np.std(a)), 0.01))])
    share = 0.5
    p_noise = np.zeros(len(a))
    for _ in range(iterations):
        delta = np.clip(np.log1p(-share) + log_unit(theta) - np.log(share) - log_noise, -50, 50)
        p_noise = 1.0 / (1.0 + np.exp(delta))
        share = float(np.clip(p_noise.mean(), 1e-4, 1 - 1e-4))
        w = 1.0 - p_noise
        if w.sum() < 1:
            break
        theta = minimize(lambda th: -np.sum(w * log_unit(th)), theta, method="Nelder-Mead",
                         options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 200}).x
        theta[1] = max(theta[1], np.log(0.01))
    return p_noise > 0.5


def _norm_logpdf(z: np.ndarray) -> np.ndarray:
    """``scipy.stats.norm.logpdf(z)``, the same expression without the distribution machinery,
    whose call overhead (about 0.1 ms) was most of :func:`noise_fits`' time (log-sf likewise:
    ``norm.logsf(z)`` is ``log_ndtr(-z)``)."""
    return -z ** 2 / 2.0 - _LOG_SQRT_2PI


_LOG_SQRT_2PI = float(np.log(np.sqrt(2 * np.pi)))


#: Templates at least this similar (cosine, all channels) are one shape at two amplitudes to
#: circus-omp, which picks a template by the cosine with the traces and only then fits its amplitude.
SAME_SHAPE_COSINE = 0.9


def reassign_by_amplitude(spikes: np.ndarray, templates: np.ndarray, min_cosine: float = SAME_SHAPE_COSINE,
                          refractory_samples: int = 0) -> int:
    """Give each matched spike to the unit, among those whose templates have its template's shape,
    whose template is nearest to the spike as fitted (in place). Returns how many spikes moved.

    circus-omp chooses a template by its cosine with the traces and then fits an amplitude
    (within [0.6, inf] by default). Two neurons with one shape and different amplitudes (on a
    single wire, or side by side on a tetrode) are then one template to it: the smaller neuron's
    spikes go to the larger one at amplitude ~0.7, although clustering had separated them. The
    fitted spike ``a * t_k`` is compared with every same-shape template ``t_j`` unscaled:
    ``|a t_k - t_j|^2 = a^2 <t_k,t_k> - 2 a <t_k,t_j> + <t_j,t_j>``; the nearest one takes it, with
    its amplitude re-expressed against that template. A spike does not move to a unit that has a
    spike of its own within ``refractory_samples`` (matching fitted both: an overlap, not a
    confusion).
    """
    flat = templates.reshape(len(templates), -1).astype(np.float64)
    gram = flat @ flat.T
    norms = np.sqrt(np.maximum(np.diag(gram), 1e-12))
    cosine = gram / np.outer(norms, norms)
    moved = 0
    for k in range(len(templates)):
        cand = np.flatnonzero(cosine[k] >= min_cosine)
        if len(cand) < 2:
            continue
        sel = np.flatnonzero(spikes["cluster_index"] == k)
        if len(sel) == 0:
            continue
        a = spikes["amplitude"][sel].astype(np.float64)[:, None]
        dist = a ** 2 * gram[k, k] - 2.0 * a * gram[k, cand][None, :] + np.diag(gram)[cand][None, :]
        best = cand[np.argmin(dist, axis=1)]
        change = best != k
        for j in np.unique(best[change]) if refractory_samples > 0 else ():
            own = np.sort(spikes["sample_index"][spikes["cluster_index"] == j].astype(np.int64))
            if len(own) == 0:
                continue
            idx = np.flatnonzero(change & (best == j))
            t = spikes["sample_index"][sel[idx]].astype(np.int64)
            pos = np.searchsorted(own, t)
            near = np.minimum(np.abs(t - own[np.clip(pos - 1, 0, len(own) - 1)]),
                              np.abs(own[np.clip(pos, 0, len(own) - 1)] - t))
            change[idx[near <= refractory_samples]] = False
        if change.any():
            new = best[change]
            spikes["amplitude"][sel[change]] = (a[change, 0] * gram[k, new] / gram[new, new]).astype(
                spikes["amplitude"].dtype)
            spikes["cluster_index"][sel[change]] = new
            moved += int(change.sum())
    return moved


def merge_units(rec, sorting, templates, noise, p: SortParams, job_kwargs: dict,
                max_template_diff: float | None = None, motion=None, stats: dict | None = None):
    """Merge units that are one neuron cut in two, with SpikeInterface's ``auto_merge_units``.

    The test of a pair (the steps of SpikeInterface's 'x_contaminations' preset, see
    ``_MERGE_STEPS``): both units have enough spikes, lie within
    ``final_merge_max_distance_um``, have templates whose normalised L1 difference is below the
    threshold, and their trains do not violate each other's refractory period (a neuron split by
    drift or amplitude never fires twice within it across its parts; two neurons do, by chance).
    The threshold grows from 0.05 to ``max_template_diff`` (default: ``p.final_merge_max_template_diff``;
    the sort passes ``p.final_merge_max_template_diff_compact`` on a compact probe) so the surest pairs
    merge first. Returns the merged sorting (merged units get new ids) and its templates
    (spike-count weighted averages of the parts' templates, sparse on the union of their
    channels).

    With ``motion`` (the correction applied to the recording), the parts of a neuron cut in two
    by the drift are merged after that (:func:`merge_drift_splits`); ``stats`` (a dict) receives
    those merges.
    """
    from spikeinterface.curation.auto_merge import auto_merge_units
    from spikeinterface.sortingcomponents.tools import create_sorting_analyzer_with_existing_templates

    cache_spikeinterface_kernels()

    jk = {k: v for k, v in job_kwargs.items() if k in ("n_jobs", "chunk_duration", "progress_bar")}
    jk["progress_bar"] = False
    keep = np.isin(templates.unit_ids, sorting.get_non_empty_unit_ids())
    if keep.sum() < 2:
        return sorting, templates
    if templates.sparsity is None:  # dense templates: every channel
        from spikeinterface.core.sparsity import ChannelSparsity

        dense = np.ones((len(templates.unit_ids), len(templates.channel_ids)), dtype=bool)
        templates = templates.to_sparse(ChannelSparsity(dense, templates.unit_ids, templates.channel_ids))
    analyzer = create_sorting_analyzer_with_existing_templates(sorting, rec, templates, noise_levels=noise)
    analyzer.compute("unit_locations", method="center_of_mass")
    max_template_diff = p.final_merge_max_template_diff if max_template_diff is None else max_template_diff
    thresholds = np.arange(0.05, max(max_template_diff, 0.05) + 1e-9, 0.05)
    steps_params = [{"template_similarity": {"template_diff_thresh": float(t)},
                     "num_spikes": {"min_spikes": int(p.final_merge_min_spikes)},
                     "unit_locations": {"max_distance_um": p.final_merge_max_distance_um},
                     "remove_contaminated": {"contamination_thresh": _NEVER_EXCLUDE},
                     "cross_contamination": {"p_value": _CROSS_CONTAMINATION_P}} for t in thresholds]
    # every merge recomputes the similarity of the merged unit: keep the numpy kernel throughout
    with _numpy_template_similarity(len(templates.unit_ids)):
        analyzer.compute("template_similarity", method="l1", support="union", max_lag_ms=0.1)
        merged = auto_merge_units(analyzer, presets=None, steps=[list(_MERGE_STEPS)] * len(thresholds),
                                  steps_params=steps_params, recursive=True, censor_ms=p.final_merge_censor_ms,
                                  sparsity_overlap=0.5, **jk)
        if motion is not None and len(merged.unit_ids) > 1:
            merged, pairs = merge_drift_splits(merged, motion, p, steps_params[-1], jk)
            if stats is not None:
                stats["drift_splits_merged"] = pairs
    logger.info("final merge: %d units -> %d", len(sorting.unit_ids), len(merged.unit_ids))
    return merged.sorting, merged.get_extension("templates").get_templates(outputs="Templates")


#: Displacement bins (um) of the drift-split merge's overlap (:func:`merge_drift_splits`).
DRIFT_SPLIT_BIN_UM = 2.0


def merge_drift_splits(analyzer, motion, p: SortParams, steps_params: dict, job_kwargs: dict):
    """Merge the pairs of units that are one neuron cut in two by the drift.

    After motion correction a neuron's waveform still changes a little with its place on the
    probe; a cluster can split along that change, each part holding the spikes of a range of
    displacements. The parts then never fire at the same displacement, where two neurons
    present together always do. A pair of units is merged when it passes the final merge's tests
    (SpikeInterface's ``compute_merge_unit_groups`` with the steps of :func:`merge_units`) with a
    template difference up to ``p.final_merge_drift_split_max_template_diff``, and the
    displacements at its two spike trains (``motion`` at each spike's time, at the unit's
    depth) overlap by at most ``p.final_merge_drift_split_max_overlap``. Most similar pairs
    first, each unit in one merge per round, rounds until none merges.

    Returns (the merged analyzer, each merge: the two unit ids, their template difference and the
    displacements' overlap).
    """
    from spikeinterface.curation.auto_merge import compute_merge_unit_groups

    params = {**steps_params,
              "template_similarity": {"template_diff_thresh": float(p.final_merge_drift_split_max_template_diff)}}
    merged_pairs = []
    while len(analyzer.unit_ids) > 1:
        pairs, outs = compute_merge_unit_groups(analyzer, preset=None, steps=list(_MERGE_STEPS), steps_params=params,
                                                resolve_graph=False, extra_outputs=True, force_copy=False,
                                                **job_kwargs)
        if not pairs:
            break
        index = {u: i for i, u in enumerate(analyzer.unit_ids)}
        diff = outs["templates_diff"]
        depths = analyzer.get_extension("unit_locations").get_data()[:, motion.dim]
        used, groups = set(), []
        for a, b in sorted(pairs, key=lambda pair: diff[index[pair[0]], index[pair[1]]]):
            if a in used or b in used:
                continue
            overlap = _displacement_overlap(analyzer.recording, analyzer.sorting, (a, b), motion,
                                            (depths[index[a]], depths[index[b]]))
            if overlap <= p.final_merge_drift_split_max_overlap:
                groups.append([a, b])
                used.update((a, b))
                merged_pairs.append({"units": [str(a), str(b)],
                                     "template_diff": round(float(diff[index[a], index[b]]), 3),
                                     "displacement_overlap": round(overlap, 3)})
        if not groups:
            break
        logger.info("final merge: %d pairs of units cut in two by the drift merged", len(groups))
        # the merged template is the parts' average on the union of their channels; the parts of a
        # drifting neuron peak on different contacts (drift64: less than half their channels shared)
        analyzer = analyzer.merge_units(groups, censor_ms=p.final_merge_censor_ms, merging_mode="soft",
                                        sparsity_overlap=0.0, **job_kwargs)
    return analyzer, merged_pairs


def _displacement_overlap(recording, sorting, units, motion, depths) -> float:
    """Overlap (0..1) of the displacements at two units' spikes: the sum of the bin-wise minimum
    of their normalised histograms in ``DRIFT_SPLIT_BIN_UM`` bins (each unit's displacement at its
    own depth, over every segment). 1 when a unit has no spike or the drift spans less than two
    bins (nothing tells the parts of a neuron apart then)."""
    values = []
    for unit, depth in zip(units, depths):
        parts = []
        for seg in range(sorting.get_num_segments()):
            frames = sorting.get_unit_spike_train(unit, segment_index=seg)
            if len(frames):
                times = recording.sample_index_to_time(frames, segment_index=seg)
                parts.append(np.ravel(motion.get_displacement_at_time_and_depth(
                    times, np.full(len(times), float(depth)), segment_index=seg)))
        values.append(np.concatenate(parts) if parts else np.zeros(0))
    if min(len(v) for v in values) == 0:
        return 1.0
    lo, hi = min(v.min() for v in values), max(v.max() for v in values)
    edges = np.arange(lo, hi + DRIFT_SPLIT_BIN_UM, DRIFT_SPLIT_BIN_UM)
    if len(edges) < 3:
        return 1.0
    return histogram_overlap(values[0], values[1], edges)


def _is_compact(rec, radius_um: float) -> bool:
    """Every channel within ``radius_um`` of every other (a tetrode, a single wire)."""
    from spikeinterface.core import get_channel_distances

    return bool(np.max(get_channel_distances(rec)) <= radius_um)


def split_multi_unit(sorting, duration_s: float, p: SortParams):
    """Separate the units that are multi-unit activity or noise from the neurons.

    A unit is multi-unit when SpikeInterface's ISI-violation ratio (Hill et al. 2011: the
    violation rate within ``p.refractory_ms`` relative to what the unit's own rate would give if
    its spikes were independent) exceeds ``p.max_contamination`` and it has at least
    ``p.multi_unit_min_violations`` violations. Returns (neurons, multi-unit, ratio per unit).
    """
    from spikeinterface.metrics.quality.misc_metrics import isi_violations

    fs = sorting.get_sampling_frequency()
    ratios, bad = {}, []
    for u in sorting.unit_ids:
        trains = [sorting.get_unit_spike_train(u, segment_index=s) / fs for s in range(sorting.get_num_segments())]
        ratio, _, count = isi_violations(trains, duration_s, isi_threshold_s=p.refractory_ms / 1000.0)
        ratios[u] = 0.0 if np.isnan(ratio) else float(ratio)
        if ratios[u] > p.max_contamination and count >= p.multi_unit_min_violations:
            bad.append(u)
    if bad:
        logger.info("%d of %d units are multi-unit activity (ISI-violation ratio > %g): moved to multi_unit/",
                    len(bad), len(sorting.unit_ids), p.max_contamination)
    good = [u for u in sorting.unit_ids if u not in bad]
    return sorting.select_units(good), sorting.select_units(bad), ratios


#: 'remove_contaminated' threshold of the final merge: its estimate is at most 1, so no unit is
#: barred from merging by its own refractory violations. With a few hundred spikes in a few
#: minutes, a single violation puts the estimate at 1.0 (it barred half of a split unit of 515
#: spikes in the drift benchmark). The step still runs: the cross-contamination test uses its
#: estimates, and that test guards every merge.
_NEVER_EXCLUDE = 1.0

#: A pair is kept apart when the test that its cross-contamination exceeds SpikeInterface's 10%
#: has a p-value at or below this (SpikeInterface's default is 0.2). Two parts of a unit of a few
#: hundred spikes expect about one chance coincidence in two minutes; one such coincidence gives
#: p = 0.14 and kept a unit of the static benchmark split in two. Two neurons firing near each
#: other at a few Hz give p close to 0.
_CROSS_CONTAMINATION_P = 0.05

#: The merge test: SpikeInterface's 'x_contaminations' preset without its 'quality_score' step
#: (static32 0.874 with it, 0.898 without; drift64 and the tetrode and noisy recordings of
#: bench_default_model unchanged).
#: That step refuses a merge when the merged train's own refractory-violation estimate is worse
#: than its parts'; with a few hundred spikes, one coincidence (here the matching explaining one
#: spike with both parts of a split unit, 0.5 ms apart) decides it. The pair's cross-contamination
#: test above answers the same question with a p-value.
_MERGE_STEPS = ("num_spikes", "remove_contaminated", "unit_locations", "template_similarity", "cross_contamination")


@contextmanager
def _numpy_template_similarity(num_templates: int, max_templates: int = 300):
    """Use SpikeInterface's numpy template similarity instead of its numba one for few templates.

    The numba kernel is compiled with ``parallel=True`` on every new process: 15-20 s here, for a
    matrix the numpy loop computes in well under a second when there are tens of templates (the
    two give the same values). Falls back to the numba kernel when the numpy one is not there.
    """
    import spikeinterface.postprocessing.template_similarity as ts

    numpy_kernel = getattr(ts, "_compute_similarity_matrix_numpy", None)
    if numpy_kernel is None or num_templates > max_templates or not hasattr(ts, "_compute_similarity_matrix"):
        yield
        return
    kernel = ts._compute_similarity_matrix
    ts._compute_similarity_matrix = numpy_kernel
    try:
        yield
    finally:
        ts._compute_similarity_matrix = kernel


def _sorting_from_labels(events, labels, num_segments, fs):
    from spikeinterface.core import NumpySorting

    units = np.unique(labels[labels >= 0])
    ok = labels >= 0
    samples = [events["sample_index"][ok & (events["segment"] == s)] for s in range(num_segments)]
    labs = [labels[ok & (events["segment"] == s)] for s in range(num_segments)]
    return NumpySorting.from_samples_and_labels(samples, labs, fs, unit_ids=units)


# ------------------------------------------------------------------------------------ input checks
def _recording_name(recording) -> str:
    name = recording.get_annotation("name") if hasattr(recording, "get_annotation") else None
    return str(name or type(recording).__name__)


def _check_enough_events(events: dict, name: str, eparams) -> None:
    n = len(events["waveform"])
    if n < MIN_EVENTS:
        raise ValueError(
            f"{name}: only {n} spikes detected (at least {MIN_EVENTS} are needed to sort) with "
            f"detect_threshold={eparams.detect_threshold} x noise and peak_sign={eparams.peak_sign!r}. "
            "Check that the recording contains spikes (units, gains in microvolts, the right stream) "
            "or use a model whose preprocessing detects lower thresholds."
        )


def _job_kwargs(job_kwargs: dict | None) -> dict:
    from spikeinterface.core.job_tools import job_keys

    jk = dict(job_kwargs or {})
    unknown = sorted(set(jk) - set(job_keys))
    if unknown:
        raise ValueError(f"unknown job_kwargs {unknown}; known: {list(job_keys)}")
    jk.setdefault("n_jobs", 1)
    jk.setdefault("progress_bar", False)
    if isinstance(jk["n_jobs"], float) or jk["n_jobs"] < 0:
        from spikeinterface.core.job_tools import fix_job_kwargs

        jk["n_jobs"] = fix_job_kwargs({"n_jobs": jk["n_jobs"]})["n_jobs"]
    return jk


# ------------------------------------------------------------------------------------ output
def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"output folder {out} already exists; choose another --out or pass --overwrite")
        if any(out.iterdir()) and not (out / PARAMS_NAME).exists() and not (out / "sort.log").exists():
            raise FileExistsError(
                f"{out} exists and was not written by spikevault sort (no {PARAMS_NAME}); refusing to delete it "
                "even with --overwrite: choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)


@contextmanager
def _log_to(out: Path | None):
    """Send the inference and spikevault loggers to ``out/sort.log`` while sorting."""
    if out is None:
        yield
        return
    handler = logging.FileHandler(out / "sort.log", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("inference", "spikevault")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    except Exception:
        logging.getLogger(__name__).exception("sort failed")
        raise
    finally:
        for lg, lv in zip(loggers, old):
            lg.removeHandler(handler)
            lg.setLevel(lv)
        handler.close()


def versions() -> dict[str, str]:
    """Versions of the packages that shape a sorting."""
    from importlib.metadata import PackageNotFoundError, version

    import spikevault

    v = {"python": sys.version.split()[0], "spikevault": spikevault.__version__}
    for pkg in ("spikeinterface", "numpy", "torch", "scikit-learn", "hdbscan", "numba"):
        try:
            v[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return v


def _write_params(out: Path, p: SortParams, info: dict, job_kwargs: dict) -> None:
    doc = {"params": p.to_dict(), "job_kwargs": job_kwargs, "versions": versions(), **info}
    (out / PARAMS_NAME).write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _save_events(out: Path, r: dict) -> None:
    """``rejected_events.npz`` (the noise set, inspectable) and ``events.npz`` (labels of all).

    Stored uncompressed: float16 waveforms and float32 features barely compress (drift64: 16.6 MB
    raw, 13.7 MB compressed), and compressing them took 0.57 s of the main process."""
    ev, labels, reason = r["events"], r["labels"], r["reason"]
    rej = labels < 0
    codes = np.array(sorted(REJECT_REASONS))
    np.savez(
        out / "rejected_events.npz",
        sample_index=ev["sample_index"][rej], segment=ev["segment"][rej],
        peak_channel_id=ev["peak_channel_id"][rej], amplitude_uv=ev["amplitude_uv"][rej],
        waveform=ev["waveform"][rej], channel_offsets_um=ev["channel_offsets_um"][rej],
        channel_mask=ev["channel_mask"][rej], position_um=r["positions"][rej], reason=reason[rej],
        reason_codes=codes, reason_names=np.array([REJECT_REASONS[c] for c in codes]),
    )
    np.savez(
        out / "events.npz", sample_index=ev["sample_index"], segment=ev["segment"],
        peak_channel_id=ev["peak_channel_id"], cluster=labels, position_um=r["positions"],
        features=r["X"], region=r["region"],
    )


def _export_phy(out: Path, sorting, rec, job_kwargs) -> None:
    from spikeinterface.core import create_sorting_analyzer
    from spikeinterface.exporters import export_to_phy

    analyzer = create_sorting_analyzer(sorting, rec, format="memory", sparse=True, return_in_uV=True)
    jk = {k: v for k, v in job_kwargs.items() if k in ("n_jobs", "progress_bar")}
    analyzer.compute(["random_spikes", "templates", "noise_levels"], **jk)
    export_to_phy(analyzer, output_folder=out / "phy", compute_pc_features=False, compute_amplitudes=False,
                  copy_binary=False, remove_if_exists=True, verbose=False, **jk)


_exit_registered = False


def _skip_collection_at_exit() -> None:
    """Let the process exit without its final garbage collection (once per process).

    At exit Python's last collections walk every object still alive: with torch, scipy,
    scikit-learn and SpikeInterface loaded, millions of them, 1.1-1.4 s after a benchmark sort
    on this machine (0.2-0.3 s with this). ``gc.freeze()`` in an ``atexit`` handler moves them
    out of the collector's reach; objects freed by their reference counts are freed as before,
    and only unreachable reference cycles keep their finalizers from running at exit, which
    Python does not promise to run anyway.
    """
    global _exit_registered
    if not _exit_registered:
        import atexit
        import gc

        atexit.register(gc.freeze)
        _exit_registered = True


def _release_shared_memory(recording) -> None:
    """Unlink the shared memory of the sort's cache (a ``SharedMemoryRecording`` that owns it, else
    nothing) now, rather than when the collector gets to it.

    A cache left for the collector can be collected in a worker process forked later (which
    inherits it as garbage): the worker unlinks the block, and the owner's own unlink then fails
    with "Exception ignored in SharedMemoryRecording.__del__". Its memory is returned when the
    recording is freed, as before."""
    from spikeinterface.core import SharedMemoryRecording

    if not isinstance(recording, SharedMemoryRecording) or not recording.main_shm_owner:
        return
    for block in recording.shms:
        try:
            block.unlink()
        except FileNotFoundError:
            pass
    recording.main_shm_owner = False


@contextmanager
def _collector_spares_loaded_objects():
    """Keep the garbage collector's full collections off the objects alive at entry, and off those
    alive when the yielded function is called (after the libraries load), until the sort ends.

    With torch, scipy, scikit-learn and SpikeInterface loaded, every full collection walks
    hundreds of thousands of objects, none of them garbage: on drift64, 8 of them (5 while torch
    imported, 2 SpikeInterface's own ``gc.collect()`` in dredge) took 1.3 s of the main process.
    ``gc.freeze()`` moves them out of the collector's reach before the workers fork (which also
    spares the forked workers' collections, and the copy-on-write their headers' updates would
    cause, as Python's ``gc`` documentation recommends); ``gc.unfreeze()`` gives them back at the
    end. Objects freed by their reference counts are freed as before. The second freeze waits for
    the cache pass to end: frozen in the middle of it (from its gather function), its executor's
    reference cycles kept the cached traces' shared memory alive after the sort. The sort pauses
    automatic collection until that freeze (:func:`_run`), so the pass's own garbage cycles are
    frozen with the libraries and go back to the collector at the end (the test of the sort's
    shared memory checks that no cache is left). Nothing is frozen when something else has frozen
    objects already.
    """
    import gc

    owner = gc.get_freeze_count() == 0
    if owner:
        gc.freeze()
    try:
        yield gc.freeze if owner else (lambda: None)
    finally:
        if owner:
            gc.unfreeze()


@contextmanager
def _workers_inherit_thread_limits(job_kwargs: dict):
    """SpikeInterface's worker processes without its ``threadpool_limits`` around every chunk.

    With ``max_threads_per_worker`` set (SpikeInterface's default: 1), each worker enters
    threadpoolctl's ``threadpool_limits`` around every chunk it computes, and threadpoolctl lists
    and inspects every loaded shared library each time: 3.8 ms per call once torch and scikit-learn
    are loaded (0.3 ms with numpy alone), against 2-10 ms for computing a chunk. On drift64 that was
    4 of its 26 s. The sort holds its own process to one BLAS/OpenMP thread throughout, and the
    workers, forked from it, inherit that state: here the per-chunk limit changes nothing but
    the time. So, for the sort's duration, SpikeInterface's global default is None, its "apply no
    limit", and is restored after. Only when the workers are forked (Linux's default) or are
    threads of this process: spawned workers start without the limit and keep SpikeInterface's.
    """
    import platform

    import spikeinterface.core.globals as si_globals
    from spikeinterface.core.job_tools import fix_job_kwargs

    jk = fix_job_kwargs(job_kwargs)
    context = jk.get("mp_context") or ("fork" if platform.system() == "Linux" else "spawn")
    if jk.get("pool_engine") != "thread" and context != "fork":
        yield
        return
    before = si_globals.get_global_job_kwargs().get("max_threads_per_worker", 1)
    was_set = si_globals.global_job_kwargs_set
    si_globals.set_global_job_kwargs(max_threads_per_worker=None)
    try:
        yield
    finally:
        si_globals.set_global_job_kwargs(max_threads_per_worker=before)
        si_globals.global_job_kwargs_set = was_set


@contextmanager
def _collections_paused():
    """No automatic garbage collection inside (imports make few reference cycles, many objects
    that stay)."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Ticker:
    """Wall time per stage into ``timings``; the log also gives the CPU time the stage used (this
    process's threads and the worker processes that ended in it), which says how well it used the
    cores."""

    def __init__(self, timings: dict):
        self.timings = timings
        self.t = time.perf_counter()
        self.cpu = _cpu_seconds()

    def __call__(self, name: str) -> None:
        now, cpu = time.perf_counter(), _cpu_seconds()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.t
        logger.info("%s: %.2f s (cpu %.2f s)", name, now - self.t, cpu - self.cpu)
        self.t, self.cpu = now, cpu


def _cpu_seconds() -> float:
    try:
        import resource
    except ImportError:  # Windows has no resource module
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
