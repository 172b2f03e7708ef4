"""Ground-truth recordings for development, tests and pretraining corpora.

Everything here builds on SpikeInterface's generators
(:func:`spikeinterface.core.generate_ground_truth_recording`, ``generate_templates``,
``InjectTemplatesRecording``, ``NoiseGeneratorRecording``) and probeinterface's probe generators.
Two kinds of recordings are made:

* **synthetic**: SpikeInterface's parametric templates with randomised shapes, placed around the
  probe (:func:`generate_recording`);
* **hybrid**: real mean waveforms recorded by other labs (``../shared/data``, see
  :func:`find_shared_data`) placed on our probes and scaled to a chosen SNR
  (:func:`generate_hybrid_recording`).

All recordings are in microvolts (float32 traces, gain 1, offset 0, so
``get_traces(return_in_uV=True)`` works) and carry their probe. Same arguments and seed, same
recording.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Probe names understood by :func:`make_probe`.
PROBE_NAMES = ("single", "tetrode", "linear32", "dense64", "neuropixels")

#: Folder with the real templates, relative to the repository root (override: SPIKEVAULT_SHARED_DATA).
SHARED_DATA_RELATIVE = Path("..") / "shared" / "data"


# ----------------------------------------------------------------------------------------- probes
def make_probe(name: str):
    """Build a probeinterface ``Probe`` by name.

    Parameters
    ----------
    name : str
        ``"single"`` (one wire at the origin), ``"tetrode"`` (4 contacts on a 10 um radius),
        ``"linear32"`` (32 contacts in one column, 25 um pitch), ``"dense64"`` (64 contacts in
        4 staggered columns, 16 um x 20 um, Neuropixels-like density) or ``"neuropixels"``
        (384 contacts in the Neuropixels 1.0 checkerboard: 4 columns, 20 um rows).

    Returns
    -------
    probe : probeinterface.Probe
        With device channel indices ``0..C-1`` set.
    """
    import probeinterface as pi

    if name == "single":
        probe = pi.Probe(ndim=2, si_units="um")
        probe.set_contacts(positions=np.zeros((1, 2)), shapes="circle", shape_params={"radius": 7})
        probe.model_name = "single"
    elif name == "tetrode":
        probe = pi.generate_tetrode(r=10.0)
        probe.model_name = "tetrode"
    elif name == "linear32":
        probe = pi.generate_linear_probe(num_elec=32, ypitch=25.0)
        probe.model_name = "linear32"
    elif name == "dense64":
        probe = pi.generate_multi_columns_probe(
            num_columns=4, num_contact_per_column=16, xpitch=16.0, ypitch=20.0,
            y_shift_per_column=[0.0, 10.0, 0.0, 10.0], contact_shapes="square", contact_shape_params={"width": 12},
        )
        probe.model_name = "dense64"
    elif name == "neuropixels":
        # Neuropixels 1.0 layout: x = 27/59 um on even rows, 11/43 um on odd rows, 20 um row pitch.
        rows = np.arange(192)
        xs = np.where((rows % 2)[:, None] == 0, [[27.0, 59.0]], [[11.0, 43.0]])
        positions = np.stack([xs.ravel(), np.repeat(rows * 20.0, 2)], axis=1)
        probe = pi.Probe(ndim=2, si_units="um")
        probe.set_contacts(positions=positions, shapes="square", shape_params={"width": 12})
        probe.model_name = "neuropixels"
    else:
        raise ValueError(f"unknown probe {name!r}; choose one of {', '.join(PROBE_NAMES)}")
    probe.set_device_channel_indices(np.arange(probe.get_contact_count()))
    probe.annotate(model_name=name)
    return probe


def _unit_location_kwargs(num_channels: int) -> dict:
    # Small probes (a wire, a tetrode): units around the contacts, no minimum spacing (the
    # distance constraint cannot be met in the small volume and is not what separates them there).
    if num_channels <= 4:
        return dict(margin_um=20.0, minimum_z=5.0, maximum_z=35.0, minimum_distance=None)
    return dict(margin_um=10.0, minimum_z=5.0, maximum_z=45.0, minimum_distance=15.0, max_iteration=200)


# ------------------------------------------------------------------------------ synthetic recordings
def generate_recording(
    probe: str = "linear32",
    duration_s: float = 10.0,
    num_units: int = 10,
    sampling_rate_hz: float = 30_000.0,
    noise_level_uv: float = 10.0,
    seed: int = 0,
    firing_rate_range_hz: tuple[float, float] = (2.0, 15.0),
    amplitude_range_uv: tuple[float, float] = (150.0, 500.0),
    drift_amplitude_um: float = 0.0,
    drift_period_s: float | None = None,
):
    """Generate a ground-truth recording with SpikeInterface's parametric templates.

    Parameters
    ----------
    probe : str
        Probe name, see :func:`make_probe`.
    duration_s : float
        Duration in seconds (one segment).
    num_units : int
        Number of ground-truth units.
    sampling_rate_hz : float
        Sampling rate of the recording.
    noise_level_uv : float
        Standard deviation of the additive Gaussian noise in microvolts.
    seed : int
        Seed for spike trains, unit locations, template shapes and noise.
    firing_rate_range_hz : (float, float)
        Firing rates are drawn uniformly in this range.
    amplitude_range_uv : (float, float)
        Range of the templates' ``alpha`` (amplitude at the soma) in microvolts; the amplitude seen
        on the nearest contact is lower, depending on the unit's distance.
    drift_amplitude_um : float
        0 (default): a static recording. Above 0, every unit moves along the probe's depth in a
        zigzag between ``+drift_amplitude_um`` and ``-drift_amplitude_um``, starting after the
        first fifth of the recording (rigid drift, made by
        :func:`spikeinterface.generation.generate_drifting_recording` with the same probe, unit
        placement, firing rates, amplitudes and white noise as the static recording).
    drift_period_s : float, optional
        Period of the zigzag (default: two thirds of the duration).

    Returns
    -------
    recording : spikeinterface.BaseRecording
        Float32 traces in microvolts (gain 1, offset 0) with the probe attached and annotated
        ``is_filtered=True`` (the noise is white, the templates band-limited).
    sorting : spikeinterface.BaseSorting
        The ground-truth spike trains (property ``main_channel_id`` set).
    """
    from spikeinterface.core import generate_ground_truth_recording

    _check_args(duration_s=duration_s, num_units=num_units, sampling_rate_hz=sampling_rate_hz,
                noise_level_uv=noise_level_uv, firing_rate_range_hz=firing_rate_range_hz)
    if drift_amplitude_um < 0 or (drift_period_s is not None and not drift_period_s > 0):
        raise ValueError(f"drift_amplitude_um must be >= 0 and drift_period_s > 0, got {drift_amplitude_um} and "
                         f"{drift_period_s}")
    prb = make_probe(probe)
    num_channels = prb.get_contact_count()
    if drift_amplitude_um > 0:
        return _generate_drifting(prb, probe, float(duration_s), int(num_units), float(sampling_rate_hz),
                                  float(noise_level_uv), int(seed), firing_rate_range_hz, amplitude_range_uv,
                                  float(drift_amplitude_um), drift_period_s)
    recording, sorting = generate_ground_truth_recording(
        durations=[float(duration_s)],
        sampling_frequency=float(sampling_rate_hz),
        num_units=int(num_units),
        probe=prb,
        ms_before=1.0,
        ms_after=2.5,
        generate_sorting_kwargs=dict(firing_rates=tuple(map(float, firing_rate_range_hz)), refractory_period_ms=4.0),
        noise_kwargs=dict(noise_levels=float(noise_level_uv), strategy="on_the_fly"),
        generate_unit_locations_kwargs=_unit_location_kwargs(num_channels),
        generate_templates_kwargs=dict(unit_params=dict(alpha=tuple(map(float, amplitude_range_uv)))),
        dtype="float32",
        seed=int(seed),
    )
    recording.annotate(probe_name=probe)
    return recording, sorting


def _generate_drifting(prb, probe_name, duration_s, num_units, sampling_rate_hz, noise_level_uv, seed,
                       firing_rate_range_hz, amplitude_range_uv, drift_amplitude_um, drift_period_s):
    from spikeinterface.generation import generate_drifting_recording

    _, recording, sorting = generate_drifting_recording(
        num_units=num_units,
        duration=duration_s,
        sampling_frequency=sampling_rate_hz,
        probe=prb,
        generate_unit_locations_kwargs=_unit_location_kwargs(prb.get_contact_count()),
        generate_displacement_vector_kwargs=dict(
            displacement_sampling_frequency=5.0, drift_start_um=[0.0, drift_amplitude_um],
            drift_stop_um=[0.0, -drift_amplitude_um], drift_step_um=1,
            motion_list=[dict(drift_mode="zigzag", non_rigid_gradient=None, t_start_drift=duration_s / 5,
                              t_end_drift=None, period_s=drift_period_s or duration_s / 1.5)],
        ),
        generate_templates_kwargs=dict(ms_before=1.0, ms_after=2.5, mode="ellipsoid",
                                       unit_params=dict(alpha=tuple(map(float, amplitude_range_uv)))),
        generate_sorting_kwargs=dict(firing_rates=tuple(map(float, firing_rate_range_hz)), refractory_period_ms=4.0),
        generate_noise_kwargs=dict(noise_levels=noise_level_uv, spatial_decay=None),
        seed=seed,
    )
    recording.annotate(probe_name=probe_name, is_filtered=True)
    recording.set_probe(prb, in_place=True) if not recording.has_probe() else None
    recording.set_channel_gains(1.0)  # generated in microvolts, as the static recordings say
    recording.set_channel_offsets(0.0)
    return recording, sorting


def _check_args(*, duration_s, num_units, sampling_rate_hz, noise_level_uv, firing_rate_range_hz):
    problems = []
    if not duration_s > 0:
        problems.append(f"duration_s must be > 0 (got {duration_s})")
    if int(num_units) < 1:
        problems.append(f"num_units must be >= 1 (got {num_units})")
    if not 1_000.0 <= sampling_rate_hz <= 100_000.0:
        problems.append(f"sampling_rate_hz must be within 1-100 kHz (got {sampling_rate_hz})")
    if not noise_level_uv > 0:
        problems.append(f"noise_level_uv must be > 0 (got {noise_level_uv})")
    lo, hi = firing_rate_range_hz
    if not 0 < lo <= hi:
        problems.append(f"firing_rate_range_hz must be (low, high) with 0 < low <= high (got {firing_rate_range_hz})")
    if problems:
        raise ValueError("generate_recording: " + "; ".join(problems))


# ----------------------------------------------------------------------------- shared real templates
def find_shared_data(repo_root: str | Path | None = None) -> Path | None:
    """Locate the folder of real templates, or ``None`` when it is absent.

    Looks at ``$SPIKEVAULT_SHARED_DATA`` first, then ``../shared/data`` relative to the repository
    root (the folder holding the ``spikevault`` package).
    """
    env = os.environ.get("SPIKEVAULT_SHARED_DATA")
    candidates = [Path(env)] if env else []
    root = Path(repo_root) if repo_root is not None else Path(__file__).resolve().parent.parent
    candidates.append((root / SHARED_DATA_RELATIVE).resolve())
    for c in candidates:
        if (c / "kilosort_emouse_templates" / "templates.npz").is_file() or (
            c / "kampff_dense_templates" / "templates.npz"
        ).is_file():
            return c
    return None


@dataclass(frozen=True)
class RealTemplates:
    """A set of real mean waveforms with their site layout.

    Attributes
    ----------
    name : str
        ``"kilosort-emouse"`` or ``"kampff-dense"``.
    waveforms : list of np.ndarray
        One ``[num_samples, n_sites]`` float32 array per unit (arbitrary scale, negative-going).
    site_locations_um : list of np.ndarray
        One ``[n_sites, 2]`` array per unit, in micrometres, relative to the unit's peak site.
    sampling_rate_hz : float
        Rate at which the waveforms are sampled.
    licence : str
        Licence of the source data.
    """

    name: str
    waveforms: list
    site_locations_um: list
    sampling_rate_hz: float
    licence: str = "GPL-2.0"


def load_real_templates(which: str = "kilosort-emouse", shared_data: str | Path | None = None) -> RealTemplates:
    """Read one of the real template sets from the shared data folder.

    Parameters
    ----------
    which : {"kilosort-emouse", "kampff-dense"}
        ``kilosort-emouse``: 76 units x 82 samples x 32 channels at 25 kHz with ``xc``/``yc``.
        ``kampff-dense``: 17 units, 81 samples at 30 kHz, 165-195 dense sites per unit.
    shared_data : path, optional
        The folder (default: :func:`find_shared_data`).

    Raises
    ------
    FileNotFoundError
        When the folder or the file is absent (callers that can do without skip on it).
    """
    folder = Path(shared_data) if shared_data is not None else find_shared_data()
    if folder is None:
        raise FileNotFoundError(
            "real templates not found: set SPIKEVAULT_SHARED_DATA or place them in ../shared/data "
            "relative to the repository root"
        )
    if which == "kilosort-emouse":
        path = folder / "kilosort_emouse_templates" / "templates.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        with np.load(path) as z:
            templates = np.asarray(z["templates"], dtype="float32")
            fs = float(np.asarray(z["fs"]).squeeze()) if "fs" in z.files else 25_000.0
            locs = np.stack([np.asarray(z["xc"], float).ravel(), np.asarray(z["yc"], float).ravel()], axis=1)
        waveforms, sites = [], []
        for t in templates:
            peak = int(np.argmax(np.ptp(t, axis=0)))
            waveforms.append(t)
            sites.append((locs - locs[peak]).astype("float32"))
        return RealTemplates("kilosort-emouse", waveforms, sites, fs)
    if which == "kampff-dense":
        path = folder / "kampff_dense_templates" / "templates.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        waveforms, sites = [], []
        with np.load(path) as z:
            fs = float(np.asarray(z["fs"]).squeeze()) if "fs" in z.files else 30_000.0
            ids = sorted({k[4:6] for k in z.files if k.startswith("unit") and k.endswith("_waves")})
            for uid in ids:
                w = np.asarray(z[f"unit{uid}_waves"], dtype="float32")
                xy = np.stack([np.asarray(z[f"unit{uid}_xc"], float).ravel(),
                               np.asarray(z[f"unit{uid}_yc"], float).ravel()], axis=1)
                if w.shape[0] != xy.shape[0] and w.shape[1] == xy.shape[0]:
                    pass  # [samples, sites] as documented
                elif w.shape[0] == xy.shape[0]:
                    w = w.T
                peak = int(np.argmax(np.ptp(w, axis=0)))
                waveforms.append(w)
                sites.append((xy - xy[peak]).astype("float32"))
        return RealTemplates("kampff-dense", waveforms, sites, fs)
    raise ValueError(f"unknown template set {which!r}; choose 'kilosort-emouse' or 'kampff-dense'")


# ----------------------------------------------------------------------------- hybrid recordings
def place_template(
    waveform: np.ndarray,
    site_locations_um: np.ndarray,
    template_rate_hz: float,
    channel_locations_um: np.ndarray,
    anchor_um: np.ndarray,
    sampling_rate_hz: float,
) -> tuple[np.ndarray, int]:
    """Put one real template on a probe: spatial interpolation, then resampling to the recording rate.

    Parameters
    ----------
    waveform : np.ndarray
        ``[num_samples, n_sites]`` template.
    site_locations_um : np.ndarray
        ``[n_sites, 2]`` site positions relative to the template's peak site.
    template_rate_hz : float
        Rate of ``waveform``.
    channel_locations_um : np.ndarray
        ``[C, 2]`` contact positions of the destination probe.
    anchor_um : np.ndarray
        Where on the probe the template's peak site goes.
    sampling_rate_hz : float
        Rate of the destination recording.

    Returns
    -------
    template : np.ndarray
        ``[num_samples_out, C]`` float32, tapered at both ends (zero outside the source sites).
    nbefore : int
        Index of the trough on the peak channel (the spike time of the template).
    """
    from scipy.interpolate import CubicSpline
    from scipy.signal.windows import tukey
    from scipy.interpolate import LinearNDInterpolator

    dest = np.asarray(channel_locations_um, float)[:, :2] - np.asarray(anchor_um, float)[None, :2]
    src = np.asarray(site_locations_um, float)
    if src.shape[0] >= 4 and np.linalg.matrix_rank(src - src.mean(0)) == 2:
        # the same linear (Delaunay) interpolation as spikeinterface's interpolate_templates, but one
        # triangulation for all samples instead of one per sample
        spatial = LinearNDInterpolator(src, waveform.T.astype("float64"), fill_value=0.0)(dest).T
    else:  # a degenerate layout: nearest site within 10 um
        d = np.linalg.norm(dest[:, None] - src[None], axis=2)
        near = np.argmin(d, axis=1)
        spatial = waveform[:, near] * (d[np.arange(len(near)), near] <= 10.0)
    n_in = waveform.shape[0]
    n_out = int(round(n_in * sampling_rate_hz / template_rate_hz))
    t_in = np.arange(n_in) / template_rate_hz
    t_out = np.arange(n_out) / sampling_rate_hz
    out = CubicSpline(t_in, spatial, axis=0)(np.clip(t_out, 0, t_in[-1]))
    out *= tukey(n_out, alpha=0.2)[:, None]
    peak_channel = int(np.argmax(np.abs(out).max(axis=0)))
    nbefore = int(np.argmax(np.abs(out[:, peak_channel])))
    return out.astype("float32"), nbefore


def generate_hybrid_recording(
    probe: str = "linear32",
    duration_s: float = 10.0,
    num_units: int = 10,
    sampling_rate_hz: float = 30_000.0,
    noise_level_uv: float = 10.0,
    seed: int = 0,
    firing_rate_range_hz: tuple[float, float] = (2.0, 15.0),
    snr_range: tuple[float, float] = (5.0, 20.0),
    templates: str = "kilosort-emouse",
    shared_data: str | Path | None = None,
):
    """Ground truth from real templates: real mean waveforms from other labs on one of our probes.

    Each unit draws a template from the chosen set (without replacement while possible), is
    anchored at a random point along the probe, interpolated linearly onto the contacts, resampled to ``sampling_rate_hz``
    and scaled so its peak amplitude is ``snr * noise_level_uv`` with ``snr`` drawn in
    ``snr_range``. Spike trains come from :func:`spikeinterface.core.generate_sorting`, noise from
    ``NoiseGeneratorRecording`` and the sum from ``InjectTemplatesRecording``.

    Returns
    -------
    recording, sorting
        As :func:`generate_recording` (microvolts, probe attached); the sorting carries
        ``main_channel_id`` and ``template_index`` (index in the source set) properties.

    Raises
    ------
    FileNotFoundError
        When the shared templates are absent.
    """
    from spikeinterface.core import InjectTemplatesRecording, generate_sorting
    from spikeinterface.generation import NoiseGeneratorRecording

    _check_args(duration_s=duration_s, num_units=num_units, sampling_rate_hz=sampling_rate_hz,
                noise_level_uv=noise_level_uv, firing_rate_range_hz=firing_rate_range_hz)
    real = load_real_templates(templates, shared_data)
    rng = np.random.default_rng(seed)
    prb = make_probe(probe)
    locs = np.asarray(prb.contact_positions, float)[:, :2]
    num_channels = locs.shape[0]

    picks = rng.permutation(len(real.waveforms))
    picks = np.concatenate([picks, rng.integers(0, len(real.waveforms), max(0, num_units - len(picks)))])[:num_units]
    lo, hi = locs.min(0), locs.max(0)
    placed, nbefores, main = [], [], []
    for u, k in enumerate(picks):
        anchor = rng.uniform(lo - 5.0, hi + 5.0)
        tpl, nb = place_template(real.waveforms[k], real.site_locations_um[k], real.sampling_rate_hz, locs, anchor,
                                 sampling_rate_hz)
        peak = float(np.abs(tpl).max())
        if peak <= 0:  # anchored away from every site: re-anchor on a contact
            anchor = locs[rng.integers(num_channels)]
            tpl, nb = place_template(real.waveforms[k], real.site_locations_um[k], real.sampling_rate_hz, locs,
                                     anchor, sampling_rate_hz)
            peak = float(np.abs(tpl).max())
        tpl *= rng.uniform(*snr_range) * noise_level_uv / peak
        placed.append(tpl)
        nbefores.append(nb)
        main.append(int(np.argmax(np.abs(tpl).max(axis=0))))
    # align every template's trough on one common nbefore (InjectTemplatesRecording takes one)
    nbefore = max(nbefores)
    length = max(nbefore + t.shape[0] - nb for t, nb in zip(placed, nbefores))
    templates_array = np.zeros((num_units, length, num_channels), dtype="float32")
    for u, (t, nb) in enumerate(zip(placed, nbefores)):
        templates_array[u, nbefore - nb : nbefore - nb + t.shape[0]] = t

    sorting = generate_sorting(
        num_units=int(num_units), sampling_frequency=float(sampling_rate_hz), durations=[float(duration_s)],
        firing_rates=tuple(map(float, firing_rate_range_hz)), refractory_period_ms=4.0, seed=int(seed),
    )
    noise = NoiseGeneratorRecording(
        num_channels=num_channels, sampling_frequency=float(sampling_rate_hz), durations=[float(duration_s)],
        noise_levels=float(noise_level_uv), dtype="float32", seed=int(seed), strategy="on_the_fly",
        noise_block_size=int(sampling_rate_hz),
    )
    recording = InjectTemplatesRecording(sorting, templates_array, nbefore=nbefore, parent_recording=noise)
    recording.set_probe(prb)
    recording.set_channel_gains(1.0)
    recording.set_channel_offsets(0.0)
    recording.annotate(is_filtered=True, probe_name=probe)
    sorting.set_property("main_channel_id", recording.channel_ids[np.asarray(main)])
    sorting.set_property("template_index", picks.astype("int64"))
    recording.name = f"HybridRecording({real.name})"
    return recording, sorting


# ------------------------------------------------------------------------------ source sets
#: Sampling rates drawn for synthetic source sets (common acquisition systems, 20-40 kHz).
SYNTH_RATES_HZ = (20_000.0, 24_000.0, 25_000.0, 30_000.0, 32_000.0, 40_000.0)
#: Units per recording by probe, drawn uniformly in this inclusive range.
UNITS_BY_PROBE = {"single": (1, 3), "tetrode": (2, 6), "linear32": (6, 16), "dense64": (8, 20), "neuropixels": (30, 60)}
#: Integer storage gain (microvolts per bit), as on Intan headstages.
STORAGE_GAIN_UV = 0.195
SYNTHETIC_LICENCE = "CC-BY-4.0"


@dataclass(frozen=True)
class SynthSpec:
    """What one generated recording of a source set is (drawn from the set's seed)."""

    recording_id: str
    kind: str  # "synthetic" or "hybrid"
    probe: str
    sampling_rate_hz: float
    noise_level_uv: float
    num_units: int
    firing_rate_range_hz: tuple
    seed: int
    templates: str | None = None
    drift_um: float = 0.0  # zigzag rigid drift amplitude (synthetic recordings on DRIFT_PROBES only)


#: Probes long enough for drift along depth to move units from channel to channel.
DRIFT_PROBES = ("linear32", "dense64", "neuropixels")
#: Drift amplitudes (um, zigzag +-) drawn for the drifting recordings of a source set.
DRIFT_RANGE_UM = (10.0, 30.0)


def plan_source_set(num_recordings: int, seed: int = 0, probes=("single", "tetrode", "linear32", "dense64"),
                    hybrid: bool = True, hybrid_fraction: float = 0.5, hybrid_available: bool = True,
                    drift_fraction: float = 0.0) -> list[SynthSpec]:
    """Draw the specs of a varied source set (deterministic per seed; probes cycle in order).

    ``drift_fraction``: the chance that a synthetic recording on a probe of ``DRIFT_PROBES`` drifts
    (zigzag, amplitude drawn from ``DRIFT_RANGE_UM``). Drawn after everything else, so the other
    fields of a spec do not depend on it.
    """
    probes = list(probes)
    unknown = [p for p in probes if p not in PROBE_NAMES]
    if unknown or not probes:
        raise ValueError(f"--probes: unknown probe(s) {unknown}; choose from {', '.join(PROBE_NAMES)}")
    if not 0.0 <= hybrid_fraction <= 1.0:
        raise ValueError(f"--hybrid-fraction must be within [0, 1] (got {hybrid_fraction})")
    if not 0.0 <= drift_fraction <= 1.0:
        raise ValueError(f"--drift-fraction must be within [0, 1] (got {drift_fraction})")
    specs = []
    for i in range(int(num_recordings)):
        rng = np.random.default_rng([int(seed), i])
        probe = probes[i % len(probes)]
        # stratified: exactly round(fraction * n) hybrids, evenly spread over the set
        is_hybrid = hybrid and hybrid_available and int((i + 1) * hybrid_fraction) > int(i * hybrid_fraction)
        lo_u, hi_u = UNITS_BY_PROBE[probe]
        low_rate = float(rng.uniform(1.0, 5.0))
        spec = SynthSpec(
            recording_id=f"{'hybrid' if is_hybrid else 'synth'}-{i:04d}-{probe}",
            kind="hybrid" if is_hybrid else "synthetic",
            probe=probe,
            sampling_rate_hz=float(rng.choice(SYNTH_RATES_HZ)),
            noise_level_uv=round(float(rng.uniform(5.0, 20.0)), 2),
            num_units=int(rng.integers(lo_u, hi_u + 1)),
            firing_rate_range_hz=(round(low_rate, 2), round(float(low_rate + rng.uniform(3.0, 20.0)), 2)),
            seed=int(rng.integers(0, 2**31 - 1)),
            templates=("kilosort-emouse" if rng.random() < 0.5 else "kampff-dense") if is_hybrid else None,
        )
        if drift_fraction > 0 and not is_hybrid and probe in DRIFT_PROBES and rng.random() < drift_fraction:
            spec = dataclasses.replace(spec, recording_id=spec.recording_id + "-drift",
                                       drift_um=round(float(rng.uniform(*DRIFT_RANGE_UM)), 1))
        specs.append(spec)
    return specs


def _available_template_sets(shared_data) -> set[str]:
    if shared_data is None:
        return set()
    out = set()
    if (Path(shared_data) / "kilosort_emouse_templates" / "templates.npz").is_file():
        out.add("kilosort-emouse")
    if (Path(shared_data) / "kampff_dense_templates" / "templates.npz").is_file():
        out.add("kampff-dense")
    return out


def generate_source_set(
    out_dir: str | Path,
    num_recordings: int = 8,
    duration_s: float = 10.0,
    seed: int = 0,
    probes=("single", "tetrode", "linear32", "dense64"),
    hybrid: bool = True,
    hybrid_fraction: float = 0.5,
    shared_data: str | Path | None = None,
    progress: bool = False,
    drift_fraction: float = 0.0,
):
    """Generate recordings + ground-truth sortings and write ``out_dir/sources.yaml``.

    Recordings are saved as SpikeInterface binary folders (int16, gain ``STORAGE_GAIN_UV``
    microvolts per bit, probe attached) under ``recordings/<id>``, sortings as SpikeInterface
    folders under ``sortings/<id>``. Each recording is written to a temporary name and renamed,
    so a rerun skips finished ones and completes the rest with identical content.
    Hybrid recordings need the shared real templates; without them every recording is synthetic
    (a warning says so). ``drift_fraction`` makes that share of the synthetic recordings on long
    probes drift (see :func:`plan_source_set`).

    Returns
    -------
    sources : list[spikevault.sources.RecordingSource]
    """
    import shutil
    import warnings

    from spikeinterface.preprocessing import scale

    from .sources import RecordingSource, write_sources

    out_dir = Path(out_dir)
    shared = Path(shared_data) if shared_data is not None else find_shared_data()
    available = _available_template_sets(shared)
    if hybrid and not available:
        logger.warning("real templates not found (../shared/data or $SPIKEVAULT_SHARED_DATA): "
                       "generating synthetic recordings only")
    specs = plan_source_set(num_recordings, seed, probes, hybrid, hybrid_fraction, bool(available), drift_fraction)
    (out_dir / "recordings").mkdir(parents=True, exist_ok=True)
    (out_dir / "sortings").mkdir(parents=True, exist_ok=True)
    sources = []
    iterator = specs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(specs, desc="synth", unit="recording")
    for spec in iterator:
        rec_dir = out_dir / "recordings" / spec.recording_id
        sort_dir = out_dir / "sortings" / spec.recording_id
        templates = spec.templates
        if spec.kind == "hybrid" and templates not in available:
            templates = sorted(available)[0]
        if not (rec_dir.exists() and sort_dir.exists()):
            common = dict(probe=spec.probe, duration_s=duration_s, num_units=spec.num_units,
                          sampling_rate_hz=spec.sampling_rate_hz, noise_level_uv=spec.noise_level_uv,
                          seed=spec.seed, firing_rate_range_hz=spec.firing_rate_range_hz)
            if spec.kind == "hybrid":
                rec, gt = generate_hybrid_recording(**common, templates=templates, shared_data=shared)
            else:
                rec, gt = generate_recording(**common, drift_amplitude_um=spec.drift_um)
            stored = scale(rec, gain=1.0 / STORAGE_GAIN_UV, offset=0.0, dtype="int16")
            stored.set_channel_gains(STORAGE_GAIN_UV)
            stored.set_channel_offsets(0.0)
            for d in (rec_dir, sort_dir):
                shutil.rmtree(d.with_name(d.name + ".tmp"), ignore_errors=True)
            with warnings.catch_warnings():
                # generated recordings are not JSON-serialisable: provenance is not saved, the data is
                warnings.filterwarnings("ignore", message="The extractor is not serializable")
                stored.save(folder=rec_dir.with_name(rec_dir.name + ".tmp"), format="binary", n_jobs=1,
                            progress_bar=False, verbose=False)
                gt.save(folder=sort_dir.with_name(sort_dir.name + ".tmp"))
            # a recording is complete when both folders exist; each appears by an atomic rename
            for d in (rec_dir, sort_dir):
                shutil.rmtree(d, ignore_errors=True)
                d.with_name(d.name + ".tmp").rename(d)
        if spec.kind == "hybrid":
            lab = {"kilosort-emouse": "kilosort-emouse (hybrid)", "kampff-dense": "kampff-dense (hybrid)"}[templates]
            licence = "GPL-2.0"
        else:
            lab, licence = "synthetic", SYNTHETIC_LICENCE
        sources.append(RecordingSource(
            recording_id=spec.recording_id, path=str(rec_dir.resolve()), probe=spec.probe, lab=lab, licence=licence,
            subject=None, region=None, sorting=str(sort_dir.resolve()), label_source="ground_truth",
            format="spikeinterface",
        ))
    write_sources(out_dir / "sources.yaml", sources)
    return sources
