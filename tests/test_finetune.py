"""Fine-tuning: every mode from the Python API and the CLI, lineage, freezing, the time split,
bad inputs and exact resume, on small generated recordings (a tetrode at 15 kHz and a 32-channel
probe at 25 kHz) starting from a tiny SpikeVAE saved with ``save_pretrained``."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

MODES = ("self-supervised", "contrastive", "deepcluster")
# Small and fast: a few steps, a small evaluation probe.
FAST = dict(steps=4, batch_size=32, checkpoint_every=2, recluster_every=2, eval_max_events=400,
            eval_max_components=6, units_per_batch=4)


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    """A tiny randomly initialised SpikeVAE checkpoint (the parent of every fine-tune here)."""
    import torch

    from inference.checkpoint import save_pretrained
    from inference.model import ModelConfig, SpikeVAE

    torch.manual_seed(0)
    model = SpikeVAE(ModelConfig(latent_dim=6, variant="beta_vae", conv_channels=(4, 8), channel_dim=16,
                                 attention_heads=2, position_frequencies=3, decoder_hidden=32))
    folder = tmp_path_factory.mktemp("parent") / "tiny"
    save_pretrained(model, folder, card_info={"model_name": "tiny test parent"})
    return folder


@pytest.fixture(scope="module")
def tetrode():
    from spikevault.synth import generate_recording

    return generate_recording("tetrode", duration_s=12.0, num_units=4, sampling_rate_hz=15_000.0, seed=3)


@pytest.fixture(scope="module")
def short_tetrode():
    from spikevault.synth import generate_recording

    return generate_recording("tetrode", duration_s=8.0, num_units=3, sampling_rate_hz=15_000.0, seed=5)


@pytest.fixture(scope="module")
def probe32_on_disk(tmp_path_factory):
    """A 32-channel 25 kHz recording and its ground truth, saved as folders (what a user passes the CLI)."""
    from spikevault.synth import generate_recording

    rec, sorting = generate_recording("linear32", duration_s=10.0, num_units=6, sampling_rate_hz=25_000.0, seed=4)
    root = tmp_path_factory.mktemp("probe32")
    rec.save(folder=root / "rec", verbose=False)
    sorting.save(folder=root / "gt")
    return root / "rec", root / "gt"


def _check_checkpoint(out, parent_dir, mode):
    from inference.checkpoint import load_model

    model = load_model(str(out))
    assert type(model).__name__ == "SpikeVAE"
    config = json.loads((out / "config.json").read_text())
    lineage = config["lineage"]
    parent_config = json.loads((parent_dir / "config.json").read_text())
    assert lineage["parent"] == str(parent_dir)
    assert lineage["parent_config_sha256"] == hashlib.sha256(
        json.dumps(parent_config, sort_keys=True, default=str).encode()).hexdigest()
    assert lineage["mode"] == mode
    assert config["training"]["finetune"]["mode"] == mode
    metrics = config["metrics"]
    assert metrics["measured"] is True
    for key in ("heldout_before", "heldout_after", "heldout_pca"):
        assert 0.0 <= metrics[key]["cluster_acc"] <= 1.0
    card = (out / "README.md").read_text()
    assert f"Fine-tuned from `{parent_dir}`" in card and mode in card
    return model, config


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_api_each_mode_tetrode_15khz(mode, parent_dir, tetrode, tmp_path):
    import finetune

    rec, sorting = tetrode
    result = finetune.finetune(model=str(parent_dir), data=rec, labels=sorting, mode=mode, out=tmp_path / mode,
                               **FAST)
    model, config = _check_checkpoint(tmp_path / mode, parent_dir, mode)
    assert result.metrics["n_train_events"] > 0 and result.metrics["n_heldout_events"] > 0
    assert config["intended_probes"] == ["tetrode"] and config["sampling_rates_hz"] == [15000.0]
    assert (tmp_path / mode / "step-00000004").is_dir()  # resumable training checkpoints
    assert "zero-shot (parent)" in result.metrics_table()
    # the tuned weights differ from the parent's
    from inference.checkpoint import load_model

    parent = load_model(str(parent_dir))
    assert any(not np.allclose(a.numpy(), b.numpy()) for a, b in zip(parent.state_dict().values(),
                                                                    model.state_dict().values()))


@pytest.mark.slow
@pytest.mark.parametrize("mode,extra", [
    ("self-supervised", ["--freeze", "encoder-lower"]),
    ("contrastive", ["--train-window-s", "1", "7"]),
    ("deepcluster", ["--freeze-layers", "2", "--holdout-fraction", "0.4"]),
])
def test_cli_each_mode_32ch_25khz(mode, extra, parent_dir, probe32_on_disk, tmp_path):
    from inference.checkpoint import load_model
    from spikevault.cli import main

    rec_dir, gt_dir = probe32_on_disk
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(parent_dir), "--data", str(rec_dir), "--labels", str(gt_dir), "--mode", mode,
            "--out", str(out), "--steps", "4", "--batch-size", "32", "--checkpoint-every", "2",
            "--recluster-every", "2", "--eval-max-events", "400", "--eval-max-components", "6", *extra]
    assert main(argv) == 0
    model, config = _check_checkpoint(out, parent_dir, mode)
    assert config["intended_probes"] == ["linear32"] and config["sampling_rates_hz"] == [25000.0]
    parent = load_model(str(parent_dir)).state_dict()
    tuned = model.state_dict()
    frozen = config["lineage"]["frozen_layers"]
    if "--freeze" in extra or "--freeze-layers" in extra:
        assert frozen, "freezing was requested"
        for layer in frozen:  # frozen layers kept the parent's weights exactly
            keys = [k for k in tuned if k.startswith(layer + ".")]
            assert keys and all(np.array_equal(tuned[k].numpy(), parent[k].numpy()) for k in keys)
        assert not np.array_equal(tuned["head.2.weight"].numpy(), parent["head.2.weight"].numpy())
    windows = list(config["lineage"]["tuning_windows_s"].values())
    if "--train-window-s" in extra:
        assert windows == [[1.0, 7.0]]
    elif "--holdout-fraction" in extra:
        assert windows == [[0.0, pytest.approx(6.0)]]


def test_time_split_never_leaks_heldout(parent_dir, tetrode):
    from finetune.data import load_tuning_data
    from inference.checkpoint import load_config

    rec, sorting = tetrode
    info = load_config(str(parent_dir))
    data = load_tuning_data([rec], info.schema, labels=[sorting], train_window_s=(2.0, 8.0))
    t_train = data.train["sample_index"] / 15_000.0
    t_held = data.heldout["sample_index"] / 15_000.0
    assert t_train.min() >= 2.0 and t_train.max() < 8.0
    assert np.all((t_held < 2.0) | (t_held >= 8.0)) and len(t_held) > 0
    assert set(np.unique(data.train["unit_label"])) - {-1}  # labels carried into the events
    data = load_tuning_data([rec], info.schema, labels=[sorting], holdout_fraction=0.25)
    assert (data.train["sample_index"] / 15_000.0).max() < 9.0 <= (data.heldout["sample_index"] / 15_000.0).min()


# ------------------------------------------------------------------------------------- bad input
def _run(parent_dir, data, tmp_path, **kw):
    import finetune

    settings = {**FAST, **kw}
    return finetune.finetune(model=str(parent_dir), data=data, out=tmp_path / "bad", **settings)


def test_labels_with_another_sampling_rate(parent_dir, tetrode, tmp_path):
    from spikeinterface.core import NumpySorting

    rec, sorting = tetrode
    other = NumpySorting.from_samples_and_labels([np.array([100, 2000, 5000])], [np.array([0, 1, 0])], 30_000.0)
    with pytest.raises(ValueError, match=r"sampling rate is 30000 Hz but the recording's is 15000 Hz"):
        _run(parent_dir, rec, tmp_path, labels=other, mode="contrastive")


def test_labels_past_the_end(parent_dir, tetrode, tmp_path):
    from spikeinterface.core import NumpySorting

    rec, _ = tetrode
    n = rec.get_num_samples()
    longer = NumpySorting.from_samples_and_labels([np.array([100, n - 10, n + 500])], [np.array([0, 1, 0])], 15_000.0)
    with pytest.raises(ValueError, match=r"spikes up to sample .* but the recording ends"):
        _run(parent_dir, rec, tmp_path, labels=longer, mode="deepcluster")


def test_contrastive_needs_two_units(parent_dir, tetrode, tmp_path):
    rec, sorting = tetrode
    one = sorting.select_units([sorting.unit_ids[0]])
    with pytest.raises(ValueError, match=r"has 1 unit\(s\); contrastive fine-tuning needs at least 2"):
        _run(parent_dir, rec, tmp_path, labels=one, mode="contrastive")
    with pytest.raises(ValueError, match="--mode contrastive needs unit labels"):
        _run(parent_dir, rec, tmp_path, mode="contrastive")


def test_model_preprocessing_that_does_not_fit_the_probe(parent_dir, tetrode, tmp_path):
    """A model whose preprocessing (band up to 9 kHz) cannot be applied to a 15 kHz recording."""
    from inference.checkpoint import load_model, save_pretrained

    wide = tmp_path / "wideband"
    save_pretrained(load_model(str(parent_dir)), wide, preprocessing={"freq_max_hz": 9000.0})
    rec, sorting = tetrode
    with pytest.raises(ValueError, match=r"does not fit the model's event schema.*freq_max_hz=9000"):
        _run(wide, rec, tmp_path, labels=sorting, mode="deepcluster")


def test_cli_reports_bad_settings(parent_dir, probe32_on_disk, tmp_path, capsys):
    from spikevault.cli import main

    rec_dir, _ = probe32_on_disk
    code = main(["finetune", "--model", str(parent_dir), "--data", str(rec_dir), "--mode", "contrastive",
                 "--out", str(tmp_path / "o"), "--holdout-fraction", "1.5", "--freeze-layers", "-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--holdout-fraction must be in (0, 1)" in err and "--freeze-layers must be >= 0" in err
    assert "--mode contrastive needs unit labels" in err


def test_existing_run_needs_resume_or_overwrite(parent_dir, tetrode, tmp_path):
    out = tmp_path / "bad"
    out.mkdir()
    (out / "finetune_config.json").write_text("{}")
    rec, sorting = tetrode
    with pytest.raises(FileExistsError, match="--resume auto"):
        _run(parent_dir, rec, tmp_path, labels=sorting, mode="deepcluster")


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["deepcluster", "self-supervised"])
def test_interrupted_run_resumes_to_the_same_weights(mode, parent_dir, short_tetrode, tmp_path):
    import torch

    from finetune.config import FinetuneConfig
    from finetune.train import _Interrupted, run
    from inference.checkpoint import load_model

    rec, sorting = short_tetrode
    settings = dict(model=str(parent_dir), data=[rec], labels=[sorting], mode=mode,
                    **{**FAST, "steps": 6, "eval_max_components": 4})
    run(FinetuneConfig.from_dict({**settings, "out": str(tmp_path / "straight")}).validate())

    interrupted = FinetuneConfig.from_dict({**settings, "out": str(tmp_path / "resumed")}).validate()
    with pytest.raises(_Interrupted):
        run(interrupted, _stop_after_steps=3)  # the last checkpoint is step 2; step 3 is lost as in a crash
    assert (tmp_path / "resumed" / "step-00000002").is_dir()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    with pytest.raises(FileExistsError):
        run(interrupted)  # no silent restart over an interrupted run
    changed = FinetuneConfig.from_dict({**settings, "out": str(tmp_path / "resumed"), "resume": "auto",
                                        "lr": 1e-2}).validate()
    with pytest.raises(ValueError, match="started with other settings.*lr"):
        run(changed)
    run(FinetuneConfig.from_dict({**settings, "out": str(tmp_path / "resumed"), "resume": "auto"}).validate())

    a = load_model(str(tmp_path / "straight")).state_dict()
    b = load_model(str(tmp_path / "resumed")).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
