"""Ground-truth generation (synthetic + hybrid), the synth CLI and sources files."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from spikevault.sources import RecordingSource, load_sources, recording_id_from_path, resolve_sources, write_sources
from spikevault.synth import (
    PROBE_NAMES,
    generate_hybrid_recording,
    generate_recording,
    make_probe,
    place_template,
    plan_source_set,
)


@pytest.mark.parametrize("name, channels", [("single", 1), ("tetrode", 4), ("linear32", 32), ("dense64", 64),
                                            ("neuropixels", 384)])
def test_probes(name, channels):
    probe = make_probe(name)
    assert probe.get_contact_count() == channels
    assert len(np.unique(probe.contact_positions, axis=0)) == channels
    assert probe.model_name == name


def test_generate_recording_is_seeded_and_in_microvolts():
    a, gt_a = generate_recording("tetrode", duration_s=1.0, num_units=3, seed=4, noise_level_uv=8.0)
    b, gt_b = generate_recording("tetrode", duration_s=1.0, num_units=3, seed=4, noise_level_uv=8.0)
    c, _ = generate_recording("tetrode", duration_s=1.0, num_units=3, seed=5, noise_level_uv=8.0)
    np.testing.assert_array_equal(a.get_traces(return_in_uV=True), b.get_traces(return_in_uV=True))
    np.testing.assert_array_equal(gt_a.to_spike_vector(), gt_b.to_spike_vector())
    assert not np.array_equal(a.get_traces(), c.get_traces())
    assert a.get_num_channels() == 4 and a.has_scaleable_traces()
    # robust (MAD) noise close to the requested microvolts
    tr = a.get_traces(return_in_uV=True)
    mad = np.median(np.abs(tr - np.median(tr, axis=0)), axis=0) / 0.6745
    assert np.all((mad > 7.0) & (mad < 9.5))
    with pytest.raises(ValueError, match="duration_s"):
        generate_recording("single", duration_s=0)
    with pytest.raises(ValueError, match="unknown probe"):
        generate_recording("utah")


def test_plan_is_varied_and_deterministic():
    plan = plan_source_set(12, seed=3, hybrid=True, hybrid_fraction=0.5)
    assert plan == plan_source_set(12, seed=3, hybrid=True, hybrid_fraction=0.5)
    assert plan != plan_source_set(12, seed=4, hybrid=True, hybrid_fraction=0.5)
    assert {s.probe for s in plan} == {"single", "tetrode", "linear32", "dense64"}
    assert sum(s.kind == "hybrid" for s in plan) == 6
    assert len({s.sampling_rate_hz for s in plan}) > 2
    assert all(20_000 <= s.sampling_rate_hz <= 40_000 for s in plan)
    assert len({s.recording_id for s in plan}) == 12
    assert all(s.kind == "synthetic" for s in plan_source_set(4, hybrid_available=False))
    with pytest.raises(ValueError, match="--probes"):
        plan_source_set(2, probes=("utah",))


def test_plan_drift_fraction_only_adds_drift():
    probes = ("tetrode", "linear32", "dense64")
    still = plan_source_set(24, seed=5, probes=probes)
    moving = plan_source_set(24, seed=5, probes=probes, drift_fraction=1.0)
    assert all(s.drift_um == 0.0 for s in still)
    for a, b in zip(still, moving):
        drifts = b.kind == "synthetic" and b.probe in ("linear32", "dense64")
        assert (b.drift_um > 0) == drifts and b.recording_id.endswith("-drift") == drifts
        assert b.drift_um == 0.0 or 10.0 <= b.drift_um <= 30.0
        # every other field is drawn as without drift
        assert a == dataclasses.replace(b, drift_um=0.0, recording_id=a.recording_id)
    with pytest.raises(ValueError, match="--drift-fraction"):
        plan_source_set(2, drift_fraction=1.5)


def test_synth_cli_drifting_recording(tmp_path, capsys):
    from spikevault.cli import main

    out = tmp_path / "set"
    argv = ["synth", "--out", str(out), "--num-recordings", "2", "--duration-s", "3", "--seed", "1",
            "--probes", "linear32", "--no-hybrid", "--drift-fraction", "1"]
    assert main(argv) == 0
    sources = load_sources(out / "sources.yaml")
    assert [s.recording_id for s in sources] == ["synth-0000-linear32-drift", "synth-0001-linear32-drift"]
    rec, gt = sources[0].load_recording(), sources[0].load_sorting()
    assert rec.get_num_channels() == 32 and gt.get_num_units() >= 1
    assert main(argv[:-1] + ["-0.1"]) != 0
    assert "--drift-fraction must be within [0, 1]" in capsys.readouterr().err


def _tree_digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".raw", ".npy", ".dat"):
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_synth_cli_writes_loadable_sources(tmp_path, capsys):
    from spikevault.cli import main
    from spikevault.extract import extract_events

    out = tmp_path / "set"
    argv = ["synth", "--out", str(out), "--num-recordings", "3", "--duration-s", "1.5", "--seed", "2",
            "--probes", "single", "tetrode", "linear32", "--no-hybrid"]
    assert main(argv) == 0
    assert "sources.yaml" in capsys.readouterr().out
    sources = load_sources(out / "sources.yaml")
    assert [s.probe for s in sources] == ["single", "tetrode", "linear32"]
    for s in sources:
        assert s.lab == "synthetic" and s.licence == "CC-BY-4.0" and s.label_source == "ground_truth"
        rec, gt = s.load_recording(), s.load_sorting()
        assert rec.get_dtype() == np.int16 and rec.has_scaleable_traces()
        assert rec.get_num_channels() == make_probe(s.probe).get_contact_count()
        assert gt.get_sampling_frequency() == rec.get_sampling_frequency()
        assert gt.get_num_units() >= 1
    s = sources[2]
    events = extract_events(s.load_recording(), recording_id=s.recording_id, probe_name=s.probe,
                            sorting=s.load_sorting(), label_source=s.label_source)
    assert len(events["waveform"]) > 10 and (events["unit_label"] >= 0).mean() > 0.8

    # rerun after losing a recording: it is regenerated identically, the others are kept
    digest = _tree_digest(out)
    import shutil

    shutil.rmtree(out / "recordings" / sources[1].recording_id)
    assert main(argv) == 0
    assert _tree_digest(out) == digest


def test_sources_validation_names_entry_and_key(tmp_path):
    f = tmp_path / "sources.yaml"
    f.write_text(
        "version: 1\nsources:\n"
        "  - {recording_id: a, path: rec_a}\n"
        "  - {recording_id: b.c, path: rec_b, sorting: s_b}\n"
        "  - {recording_id: d, path: rec_d, lisence: MIT}\n"
        "  - {recording_id: a, path: rec_e}\n"
        "  - {path: rec_f}\n"
    )
    with pytest.raises(ValueError) as err:
        load_sources(f)
    msg = str(err.value)
    assert "entry 1 (b.c)" in msg and "no dots" in msg and "label_source" in msg
    assert "entry 2 (d)" in msg and "'lisence'" in msg
    assert "entry 3 (a)" in msg and "already used" in msg
    assert "entry 4" in msg and "'recording_id'" in msg
    with pytest.raises(FileNotFoundError):
        load_sources(tmp_path / "missing.yaml")
    f.write_text("sources: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_sources(f)


def test_sources_round_trip_and_command_line_paths(tmp_path):
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "y").mkdir(parents=True)
    (tmp_path / "data" / "y" / "rec.1").mkdir()
    (tmp_path / "other" / "rec.1").mkdir(parents=True)
    src = [RecordingSource("x-1", str(tmp_path / "data" / "x"), probe="tetrode", lab="lab", licence="CC0-1.0",
                           sorting=str(tmp_path / "data" / "x"), label_source="curated")]
    write_sources(tmp_path / "data" / "sources.yaml", src)
    assert "path: x" in (tmp_path / "data" / "sources.yaml").read_text()  # stored relative
    back = load_sources(tmp_path / "data" / "sources.yaml")
    assert back[0].to_dict() == {**src[0].to_dict(), "path": str((tmp_path / "data" / "x").resolve()),
                                 "sorting": str((tmp_path / "data" / "x").resolve())}
    assert recording_id_from_path("/a/b/rec 1.nwb") == "rec-1"
    items = [tmp_path / "data" / "sources.yaml", tmp_path / "data" / "y" / "rec.1", tmp_path / "other" / "rec.1",
             tmp_path / "data" / "y"]
    resolved = resolve_sources(items)
    ids = [s.recording_id for s in resolved]
    assert ids[0] == "x-1" and ids[3] == "y"
    assert ids[1].startswith("rec-1-") and ids[2].startswith("rec-1-") and ids[1] != ids[2]
    assert ids == [s.recording_id for s in resolve_sources(items)]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_sources([tmp_path / "nope"])


# --------------------------------------------------------------------------------- hybrid
def test_place_template_resamples_and_aligns(shared_data_dir):
    from spikevault.synth import load_real_templates

    real = load_real_templates("kilosort-emouse", shared_data_dir)
    assert len(real.waveforms) == 76 and real.sampling_rate_hz == 25_000.0
    probe = make_probe("linear32")
    w = real.waveforms[0]
    tpl, nb = place_template(w, real.site_locations_um[0], real.sampling_rate_hz, probe.contact_positions,
                             probe.contact_positions[10], 30_000.0)
    assert tpl.shape == (round(w.shape[0] * 30_000 / 25_000), 32)
    assert int(np.argmax(np.abs(tpl).max(axis=0))) in (9, 10, 11)
    # the trough keeps its time: nbefore at 30 kHz ~ the source trough index * 1.2
    src_nb = int(np.argmax(np.abs(w[:, int(np.argmax(np.ptp(w, axis=0)))])))
    assert abs(nb - src_nb * 1.2) <= 2
    dense = load_real_templates("kampff-dense", shared_data_dir)
    assert len(dense.waveforms) == 17 and dense.sampling_rate_hz == 30_000.0


@pytest.mark.parametrize("probe, templates", [("linear32", "kilosort-emouse"), ("tetrode", "kampff-dense")])
def test_hybrid_recording_ground_truth_is_detectable(shared_data_dir, probe, templates):
    from spikevault.extract import extract_events

    rec, gt = generate_hybrid_recording(probe, duration_s=3.0, num_units=4, sampling_rate_hz=25_000.0,
                                        noise_level_uv=8.0, seed=11, snr_range=(8.0, 15.0), templates=templates,
                                        shared_data=shared_data_dir)
    assert rec.get_num_channels() == make_probe(probe).get_contact_count()
    rec2, gt2 = generate_hybrid_recording(probe, duration_s=3.0, num_units=4, sampling_rate_hz=25_000.0,
                                          noise_level_uv=8.0, seed=11, snr_range=(8.0, 15.0), templates=templates,
                                          shared_data=shared_data_dir)
    np.testing.assert_array_equal(rec.get_traces(end_frame=5000), rec2.get_traces(end_frame=5000))
    b = extract_events(rec, recording_id="hyb", sorting=gt, label_source="ground_truth")
    labels = b["unit_label"]
    assert len(labels) > 0.6 * gt.to_spike_vector().size
    assert (labels >= 0).mean() > 0.8
    assert len(set(labels[labels >= 0])) >= 3


def test_all_probe_names_listed():
    assert set(PROBE_NAMES) == {"single", "tetrode", "linear32", "dense64", "neuropixels"}


def test_generate_recording_with_drift_moves_units_along_depth():
    """drift_amplitude_um > 0: same arguments, units drift by about +-amplitude along the probe;
    the default stays static."""
    kw = dict(probe="dense64", duration_s=10.0, num_units=3, seed=2, amplitude_range_uv=(400.0, 500.0))
    rec, gt = generate_recording(drift_amplitude_um=25.0, drift_period_s=4.0, **kw)
    again, _ = generate_recording(drift_amplitude_um=25.0, drift_period_s=4.0, **kw)
    np.testing.assert_array_equal(rec.get_traces(end_frame=3000), again.get_traces(end_frame=3000))
    assert rec.get_num_channels() == 64 and rec.has_probe() and rec.get_annotation("probe_name") == "dense64"
    with pytest.raises(ValueError, match="drift_amplitude_um"):
        generate_recording(drift_amplitude_um=-1.0, **kw)

    def depth_over_time(recording, sorting):
        """Amplitude-weighted depth of each unit's mean waveform in 1 s windows -> [units, windows]."""
        y = recording.get_channel_locations()[:, 1]
        fs = recording.get_sampling_frequency()
        tr = recording.get_traces(return_in_uV=True)
        out = []
        for u in sorting.unit_ids:
            st = sorting.get_unit_spike_train(unit_id=u)
            st = st[(st > 30) & (st < len(tr) - 60)]
            depths = []
            for w in range(int(recording.get_total_duration())):
                s = st[(st >= w * fs) & (st < (w + 1) * fs)]
                if len(s) < 2:
                    continue
                wf = np.mean([tr[i - 30: i + 60] for i in s], axis=0)
                ptp = np.ptp(wf, axis=0)
                ptp = np.where(ptp > 0.5 * ptp.max(), ptp, 0.0)
                depths.append(np.sum(ptp * y) / ptp.sum())
            out.append(np.ptp(depths))
        return np.array(out)

    moved = depth_over_time(rec, gt)
    static, gt_static = generate_recording(**kw)
    assert np.median(moved) > 20.0  # +-25 um zigzag: the units travel tens of micrometres
    assert np.median(depth_over_time(static, gt_static)) < 10.0
