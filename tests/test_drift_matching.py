"""Matching with templates that follow the motion (inference.drift_matching)."""

from __future__ import annotations

import numpy as np

FS = 30_000.0
NBEFORE, NAFTER = 30, 60


def _waveform() -> np.ndarray:
    t = (np.arange(NBEFORE + NAFTER) - NBEFORE) / FS * 1e3  # ms
    return (-np.exp(-(t / 0.15) ** 2) + 0.4 * np.exp(-((t - 0.5) / 0.3) ** 2)).astype(np.float32)


def _template(locations: np.ndarray, position: np.ndarray, amplitude: float) -> np.ndarray:
    """[samples, channels]: a neuron at ``position`` (x, y, z) seen by contacts at ``locations``."""
    dist = np.sqrt(np.sum((locations - position[:2]) ** 2, axis=1) + position[2] ** 2)
    return _waveform()[:, None] * (amplitude / (1.0 + (dist / 20.0) ** 2))[None, :].astype(np.float32)


def _drifting_recording(duration_s=8.0, noise_uv=4.0, seed=0):
    """Two neurons on the dense 64-channel probe, one just beyond its bottom end, drifting
    +-16 um (rigid, sine); white noise. Returns (recording, motion, neuron positions, their
    amplitudes, spike trains)."""
    from spikeinterface.core import NumpyRecording
    from spikeinterface.core.motion import Motion

    from spikevault.synth import make_probe

    rng = np.random.default_rng(seed)
    probe = make_probe("dense64")
    locations = probe.contact_positions.astype(np.float64)
    n = int(duration_s * FS)
    bins = np.arange(0.0, duration_s, 0.1) + 0.05
    drift = 16.0 * np.sin(2 * np.pi * bins / duration_s)
    motion = Motion([drift[:, None]], [bins], np.array([float(np.median(locations[:, 1]))]))
    neurons = [np.array([16.0, -12.0, 12.0]), np.array([32.0, 150.0, 15.0])]
    amplitudes = [180.0, 150.0]
    traces = rng.normal(0.0, noise_uv, size=(n, 64)).astype(np.float32)
    trains = []
    for k, (pos, amp) in enumerate(zip(neurons, amplitudes)):
        train = np.sort(rng.choice(np.arange(NBEFORE + 400, n - NAFTER - 400, 90), size=int(15 * duration_s),
                                   replace=False)) + k * 37
        for s in train:
            d = np.interp(s / FS, bins, drift)
            traces[s - NBEFORE: s + NAFTER] += _template(locations, pos + np.array([0.0, d, 0.0]), amp)
        trains.append(train)
    rec = NumpyRecording([traces], FS)
    rec.set_probe(probe)
    return rec, motion, neurons, amplitudes, trains


def _register(rec, motion, trains):
    """Rest-frame templates of the neurons from their true spike trains (registered_templates)."""
    from inference.drift_matching import registered_templates

    units = np.concatenate([np.full(len(t), k) for k, t in enumerate(trains)])
    samples = np.concatenate(trains)
    order = np.argsort(samples)
    return registered_templates(rec, motion, samples[order], units[order], np.zeros(len(samples), np.int64),
                                len(trains), NBEFORE, NAFTER, 2.0, {"n_jobs": 1}, min_spikes=20)


def test_moved_templates_follow_the_displacement():
    """A template moved by d is the rest template of a neuron d further along the probe
    (kriging, as the trace correction), and moving by 0 changes nothing."""
    from spikevault.synth import make_probe

    from inference.drift_matching import moved_templates

    locations = make_probe("dense64").contact_positions.astype(np.float64)
    rest = _template(locations, np.array([16.0, 150.0, 15.0]), 100.0)[None]
    assert np.allclose(moved_templates(rest, locations, locations, 0.0), rest, atol=1e-3)
    for d in (20.0, -7.0):
        moved = moved_templates(rest, locations, locations, d)[0]
        truth = _template(locations, np.array([16.0, 150.0 + d, 15.0]), 100.0)
        assert np.abs(moved - truth).max() < 0.1 * np.abs(truth).max()


def test_registered_templates_reach_beyond_the_probe_end():
    """Rest-frame templates from drifting traces: the neuron beyond the bottom end is known where
    the drift carried it onto the probe, below the contacts, and matches its true shape there."""
    from spikevault.synth import make_probe

    rec, motion, neurons, amplitudes, trains = _drifting_recording()
    dense, ext, real, weight = _register(rec, motion, trains)
    locations = make_probe("dense64").contact_positions.astype(np.float64)
    assert np.array_equal(ext[real], locations)
    below = np.flatnonzero(ext[:, 1] < locations[:, 1].min())
    assert len(below) and weight[0, below].max() >= 20  # reached by the drift
    for k in range(2):
        truth = _template(ext, neurons[k], amplitudes[k])
        near = np.flatnonzero(np.abs(truth).max(axis=0) > 0.2 * np.abs(truth).max())
        err = np.abs(dense[k][:, near] - truth[:, near]).max() / np.abs(truth).max()
        assert err < 0.15, (k, err)
    truth = _template(ext, neurons[0], amplitudes[0])
    reached = below[weight[0, below] >= 20]
    assert np.abs(dense[0][:, reached] - truth[:, reached]).max() < 0.15 * np.abs(truth).max()


def test_drifting_wobble_finds_the_drifting_spikes():
    """Wobble with moved templates over the drifting traces finds nearly every spike of both
    neurons, the one at the probe's end included, each in its own unit, with amplitudes near 1
    all along the drift."""
    from spikeinterface.core import Templates
    from spikeinterface.core.node_pipeline import run_node_pipeline

    from inference.drift_matching import DriftingWobble

    rec, motion, neurons, amplitudes, trains = _drifting_recording(seed=1)
    dense, ext, real, _ = _register(rec, motion, trains)
    templates = Templates(templates_array=dense[:, :, real], sampling_frequency=FS, nbefore=NBEFORE, is_in_uV=True,
                          channel_ids=rec.channel_ids, unit_ids=np.array([0, 1]), probe=rec.get_probe())

    def sparsity(moved):
        return np.ptp(moved, axis=1) > 0.05 * np.ptp(moved, axis=1).max(axis=1, keepdims=True)

    # the noise is white (4 uV): whitening is a scaling, which wobble's objective applies
    node = DriftingWobble(rec, templates, motion=motion, whitening=np.eye(64, dtype=np.float32) / 4.0,
                          sparsity=sparsity, step_um=2.0, source=(dense, ext), min_norm_sq=25.0,
                          parameters={"threshold": 25.0, "refractory_period_frames": 45})
    try:
        spikes = run_node_pipeline(rec, [node], {"n_jobs": 1, "chunk_duration": "1s"}, job_name="test",
                                   squeeze_output=True, names=["spikes"])
        # every displacement's spectra pinned before the pass (within the bound; none over it):
        # the same spikes
        engines = [e for e in node.engines if e is not None]
        assert node.pin_spectra(int(FS), max_bytes=1.0) == 0 and all(e._pinned is None for e in engines)
        pinned = node.pin_spectra(int(FS), n_threads=2)
        assert pinned == sum(e._pinned[1].nbytes for e in engines) > 0
        again = run_node_pipeline(rec, [node], {"n_jobs": 1, "chunk_duration": "1s"}, job_name="test",
                                  squeeze_output=True, names=["spikes"])
        assert np.array_equal(again, spikes)
    finally:
        node.clean()
    for k, train in enumerate(trains):
        mine = spikes[spikes["cluster_index"] == k]
        idx = np.clip(np.searchsorted(mine["sample_index"], train), 1, len(mine) - 1)
        hit = np.minimum(np.abs(mine["sample_index"][idx] - train), np.abs(mine["sample_index"][idx - 1] - train)) <= 5
        assert hit.mean() > 0.95, (k, hit.mean())
        assert len(mine) < 1.05 * len(train)
        # the templates follow the neuron: its amplitude stays near 1 all along the drift (with a
        # template left at rest, the neuron at the end drifts to 0.5-1.5 of it)
        assert np.percentile(np.abs(mine["amplitude"] - 1.0), 90) < 0.15, (k, np.percentile(mine["amplitude"], [5, 95]))


def test_refit_amplitudes_shares_overlapping_spikes():
    """Joint least squares: two overlapping spikes at 0.7 and 1.3 of their templates are fitted
    to those scalings, where fitting each alone takes the other's overlap."""
    from inference.fast_wobble import refit_amplitudes

    rng = np.random.default_rng(0)
    templates = rng.normal(size=(2, 40, 4)).astype(np.float32) * np.hanning(40)[None, :, None].astype(np.float32)
    traces = rng.normal(0, 0.01, size=(200, 4)).astype(np.float32)
    starts = np.array([50, 60])
    traces[50:90] += 0.7 * templates[0]
    traces[60:100] += 1.3 * templates[1]
    amps = refit_amplitudes(traces, starts, np.array([0, 1]), templates)
    assert np.allclose(amps, [0.7, 1.3], atol=0.02)
    alone = [np.sum(traces[s: s + 40] * templates[u]) / np.sum(templates[u] ** 2) for s, u in zip(starts, (0, 1))]
    assert np.abs(np.array(alone) - [0.7, 1.3]).max() > np.abs(amps - [0.7, 1.3]).max()


def test_drift_step_follows_the_memory_of_the_precomputations():
    """One wobble precomputation per displacement step: 2 um for a few units; coarser when the
    pairwise convolutions of many overlapping units over a wide drift would not fit the memory
    bound; None (match the interpolated traces) when the step would exceed 5 um."""
    from spikeinterface.core import Templates
    from spikeinterface.core.motion import Motion
    from spikeinterface.core.sparsity import ChannelSparsity

    from inference.sort import DRIFT_MAX_STEP_UM, DRIFT_STEP_UM, drift_step_um

    def templates(num_units):
        mask = np.zeros((num_units, 64), dtype=bool)
        for k in range(num_units):
            mask[k, (2 * k) % 56: (2 * k) % 56 + 8] = True
        ids = np.arange(num_units)
        dense = Templates(templates_array=np.ones((num_units, 90, 64), np.float32), sampling_frequency=FS,
                          nbefore=NBEFORE, channel_ids=np.arange(64), unit_ids=ids)
        return dense.to_sparse(ChannelSparsity(mask, ids, np.arange(64)))

    def motion(span_um):
        return Motion([np.linspace(-span_um / 2, span_um / 2, 50)[:, None]], [np.arange(50.0)], np.array([150.0]))

    assert drift_step_um(motion(40.0), templates(30)) == DRIFT_STEP_UM
    coarse = drift_step_um(motion(40.0), templates(250))
    assert DRIFT_STEP_UM < coarse <= DRIFT_MAX_STEP_UM
    assert drift_step_um(motion(100.0), templates(250)) is None
