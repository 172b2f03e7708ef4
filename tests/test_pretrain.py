"""Pretraining: config and presets, the loop on a real (generated) corpus, DDP, exact resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.model import SpikeVAE
from pretrain.config import ConfigError, PretrainConfig, load_config
from spikevault.schema import EventSchema, SchemaMismatchError

REPO = Path(__file__).resolve().parent.parent
PRESETS = ("debug", "default", "large")


# ------------------------------------------------------------------------------------ fixtures
def _ids_for_split(split: str, seed: int, n: int, prefix: str) -> list[str]:
    from spikevault.manifest import assign_split

    out, i = [], 0
    while len(out) < n:
        rid = f"{prefix}-{i}"
        if assign_split(rid, seed, 0.3, 0.0) == split:
            out.append(rid)
        i += 1
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_recording_factory):
    """A corpus built by spikevault.build from extracted events of generated recordings:
    3 training recordings (32-ch, dense, tetrode) and one labelled validation recording."""
    from spikevault.build import BuildConfig, build_from_blocks
    from spikevault.extract import extract_events

    specs = [("linear32", 6, 1), ("dense64", 8, 2), ("tetrode", 4, 3), ("linear32", 6, 4)]
    train_ids = _ids_for_split("train", 0, 3, "train-rec")
    val_ids = _ids_for_split("val", 0, 1, "val-rec")
    recordings = {}
    for rid, (probe, units, seed) in zip(train_ids + val_ids, specs):
        rec, sorting = tiny_recording_factory(probe=probe, duration_s=4.0, num_units=units, seed=seed)
        block = extract_events(rec, recording_id=rid, sorting=sorting, label_source="ground_truth",
                               job_kwargs=dict(n_jobs=1))
        recordings[rid] = [block]
    out = tmp_path_factory.mktemp("corpus") / "c"
    build_from_blocks(out, recordings, BuildConfig(val_fraction=0.3, seed=0, block_size=128))
    return out


def debug_config(corpus, **overrides) -> PretrainConfig:
    base = {"data.corpus": str(corpus), "fabric.accelerator": "cpu", "probe.max_components": 6}
    base.update(overrides)
    return load_config("debug", base)


def read_metrics(out_dir: Path) -> dict[int, dict[str, float]]:
    """step -> metrics over every logs/version_*/metrics.csv (later versions win)."""
    rows: dict[int, dict[str, float]] = {}
    for path in sorted((out_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(path) as f:
            for row in csv.DictReader(f):
                step = int(float(row["step"]))
                rows.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny model trained 30 steps in-process (one CPU device)."""
    from pretrain.train import setup

    out = tmp_path_factory.mktemp("run") / "out"
    cfg = debug_config(corpus, max_steps=30, checkpoint_every_steps=10, keep_last_checkpoints=2)
    metrics = setup(cfg, out, resume="auto")
    return out, metrics


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_and_build(preset):
    cfg = load_config(REPO / "configs" / "pretrain" / f"{preset}.yaml", {"data.corpus": "somewhere"})
    model = SpikeVAE(cfg.model)
    B, T, K = 4, cfg.model.num_samples, cfg.model.num_channels
    out = model(torch.randn(B, T, K) * 50, torch.randn(B, K, 2) * 20, torch.ones(B, K, dtype=torch.bool))
    assert out["recon"].shape == (B, T, K) and out["mu"].shape == (B, cfg.model.latent_dim)
    n = model.num_parameters()
    if preset == "default":
        assert n < 500_000  # a few MB at most once exported
    if preset == "large":
        assert cfg.fabric.devices > 1 and cfg.fabric.strategy == "ddp" and cfg.fabric.precision == "bf16-mixed"


def test_config_errors_name_every_key_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("debug", {"optim.lrr": "1e-3", "model.latent_dim": "many", "loss.temperature": "-1",
                              "augment.dropout_p": 2})
    msg = str(err.value)
    for text in ("'optim.lrr'", "did you mean 'optim.lr'", "model.latent_dim: expected an integer"):
        assert text in msg, msg
    # type errors stop before range checks; a second call shows the value problems together
    with pytest.raises(ConfigError) as err:
        load_config("debug", {"loss.temperature": "-1", "augment.dropout_p": "2", "max_steps": "0"})
    msg = str(err.value)
    for text in ("loss.temperature must be > 0", "augment.dropout_p must be a probability", "max_steps must be >= 1",
                 "3 problem(s)"):
        assert text in msg, msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\nmodel:\n  schema: {}\n")
    with pytest.raises(ConfigError, match="optim.learning_rate.*bad.yaml") as err:
        load_config(bad)
    assert "comes from the corpus" in str(err.value)
    with pytest.raises(ConfigError, match="variant is 'vae'"):
        load_config("debug", {"model.variant": "vae", "loss.kl_weight": "0.1"})
    with pytest.raises(FileNotFoundError, match="preset"):
        load_config("no-such-preset")


def test_overrides_are_typed():
    cfg = load_config("debug", {"optim.lr": "3e-4", "model.conv_channels": "2,4", "augment.noise_std_uv": "[1, 2]",
                                "model.use_log_amplitude": "false", "seed": "7"})
    assert cfg.optim.lr == 3e-4 and cfg.model.conv_channels == (2, 4) and cfg.augment.noise_std_uv == (1.0, 2.0)
    assert cfg.model.use_log_amplitude is False and cfg.seed == 7


def test_cli_help_uses_attribute_docs():
    from spikevault.cli import build_parser

    parser = build_parser(["pretrain"])
    sub = next(a for a in parser._actions if a.dest == "command").choices["pretrain"]
    text = sub.format_help()
    assert "--optim.lr" in text and "Peak learning rate" in text and "--strategy" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--out", "x", "--optim.lrr", "1"])


# ------------------------------------------------------------------------------------ the loop
def test_tiny_vae_trains_and_exports(trained):
    out, metrics = trained
    rows = read_metrics(out)
    losses = [rows[s]["train/loss"] for s in range(1, 31)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert [p.name for p in sorted(out.glob("step-*"))] == ["step-00000020", "step-00000030"]  # keep_last 2
    for folder in (out / "step-00000030", out / "final"):
        assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in folder.iterdir()}
    assert (out / "step-00000030" / "training_state.pt").exists()
    assert not (out / "final" / "training_state.pt").exists()
    assert not list(out.glob(".tmp-*"))
    assert (out / "train.log").exists() and (out / "pretrain_config.yaml").exists()
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["schema"]["num_samples"] == 60 and config["training"]["max_steps"] == 30
    assert config["step"] == 30
    # validation ran the probe against PCA on the labelled validation recording
    assert metrics["probe"]["n_recordings"] == 1
    for key in ("model", "pca"):
        assert 0 < metrics["probe"][key]["cluster_acc"] <= 1 and 0 < metrics["probe"][key]["knn_acc"] <= 1
    assert "probe/model_cluster_acc" in rows[30] and "val/recon" in rows[30]


def test_export_loads_without_lightning(trained, corpus):
    out, _ = trained
    code = f"""
import sys, numpy as np, torch
from inference.checkpoint import load_model
from spikevault.reader import load_events
m = load_model({str(out / 'final')!r})
b = load_events({str(corpus)!r}, split="val", max_events=50)
with torch.inference_mode():
    e = m.embed(torch.as_tensor(b["waveform"].astype("float32")), torch.as_tensor(b["channel_offsets_um"]),
                torch.as_tensor(b["channel_mask"]))
assert e.shape == (50, m.config.latent_dim) and torch.isfinite(e).all()
bad = [k for k in sys.modules if k.split(".")[0] in ("lightning", "lightning_fabric")]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_resume_refuses_other_architecture_and_fresh_start(trained, corpus):
    from pretrain.train import setup

    out, _ = trained
    with pytest.raises(ValueError, match="another architecture: latent_dim=4 \\(config says 6\\)"):
        setup(debug_config(corpus, **{"model.latent_dim": 6, "max_steps": 40}), out, resume="auto")
    with pytest.raises(FileExistsError, match="--resume auto"):
        setup(debug_config(corpus, max_steps=40), out, resume="none")


def test_nan_loss_stops_without_checkpoint(corpus, tmp_path, monkeypatch):
    import pretrain.train as train

    real = train.pretrain_loss

    def poisoned(model, batch, config, augmenter, generator, step):
        loss, stats = real(model, batch, config, augmenter, generator, step)
        if step >= 3:
            loss = loss * float("nan")
            stats["loss"] = loss.detach()
        return loss, stats

    monkeypatch.setattr(train, "pretrain_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(RuntimeError, match="non-finite loss at step 4.*step-00000002"):
        train.setup(debug_config(corpus, max_steps=10, checkpoint_every_steps=2), out)
    assert [p.name for p in out.glob("step-*")] == ["step-00000002"]
    assert not (out / "final").exists() and not list(out.glob(".tmp-*"))


def test_bad_corpus_errors(corpus, trained, tmp_path):
    from pretrain.train import setup
    from spikevault.build import BuildConfig, build_from_blocks
    from spikevault.reader import load_events

    # another K: initialising from a K=12 checkpoint must name the field
    block = load_events(corpus, split="train")
    schema8 = EventSchema(num_channels=8)
    small = {k: v for k, v in block.items()}
    small["waveform"] = block["waveform"][:, :, :8].copy()
    small["channel_offsets_um"] = block["channel_offsets_um"][:, :8].copy()
    small["channel_mask"] = block["channel_mask"][:, :8].copy()
    c8 = tmp_path / "k8"
    build_from_blocks(c8, {"train-rec-0": [small]}, BuildConfig(val_fraction=0.0, schema=schema8.to_dict()))
    with pytest.raises(SchemaMismatchError, match="num_channels=12 \\(expected 8\\)"):
        setup(debug_config(c8, init_from=str(trained[0] / "final"), max_steps=2), tmp_path / "o1")
    # an empty corpus
    empty = tmp_path / "empty"
    build_from_blocks(empty, {"train-rec-0": []}, BuildConfig(val_fraction=0.0))
    with pytest.raises(ValueError, match="fewer than one batch"):
        setup(debug_config(empty, max_steps=2), tmp_path / "o2")
    with pytest.raises(ValueError, match="data.corpus is not set"):
        setup(load_config("debug"), tmp_path / "o3")


# ------------------------------------------------------------------------------------ subprocesses
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "spikevault.cli", "pretrain", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_ddp_two_processes_disjoint_events(corpus, tmp_path):
    out = tmp_path / "ddp"
    cmd = _cli("--config", "debug", "--data.corpus", str(corpus), "--devices", "2", "--strategy", "ddp",
               "--accelerator", "cpu", "--max_steps", "6", "--checkpoint_every_steps", "3",
               "--data.log_event_ids", "true", "--data.val_max_events", "300", "--probe.max_components", "4",
               "--out", str(out))
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = []
    for rank in (0, 1):
        lines = (out / f"events-rank{rank}.tsv").read_text().split("\n")
        seen.append({tuple(line.split("\t")[1:]) for line in lines if line})
        assert len(seen[-1]) == 6 * 32  # 6 steps x batch 32, no repeats within the epoch
    assert not seen[0] & seen[1]
    assert {p.name for p in out.glob("step-*")} == {"step-00000003", "step-00000006"}
    from inference.checkpoint import load_model

    model = load_model(str(out / "final"))
    assert isinstance(model, SpikeVAE)


@pytest.mark.slow
def test_exact_resume_after_sigkill(corpus, tmp_path):
    common = ["--config", "debug", "--data.corpus", str(corpus), "--accelerator", "cpu", "--max_steps", "16",
              "--checkpoint_every_steps", "4", "--data.val_split", "", "--seed", "3"]
    ref = tmp_path / "ref"
    proc = subprocess.run(_cli(*common, "--out", str(ref)), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    victim = subprocess.Popen(_cli(*common, "--out", str(out)), cwd=REPO, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "step-00000008").exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final").exists()
    proc = subprocess.run(_cli(*common, "--out", str(out), "--resume", "auto"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming from" in proc.stdout + proc.stderr

    a, b = read_metrics(ref), read_metrics(out)
    for step in range(1, 17):
        for key in ("train/loss", "train/recon", "train/kl", "train/contrastive"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    from safetensors.torch import load_file

    wa, wb = load_file(ref / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------------ probe
def test_probe_scores_model_and_pca_per_recording():
    from pretrain.probe import ProbeConfig, hungarian_accuracy, run_probe

    assert hungarian_accuracy(np.array([0, 0, 1, 1, 2, 2]), np.array([5, 5, 3, 3, 3, 9])) == pytest.approx(5 / 6)
    rng = np.random.default_rng(0)
    T, K, n = 60, 12, 120
    blocks = {"waveform": [], "channel_offsets_um": [], "channel_mask": [], "unit_label": [], "recording_id": []}
    for rec, n_units in (("rec-a", 3), ("rec-b", 4), ("rec-single", 1)):
        templates = rng.normal(0, 60, size=(n_units, T, K))
        labels = np.repeat(np.arange(n_units), n)
        blocks["waveform"].append((templates[labels] + rng.normal(0, 5, (len(labels), T, K))).astype("float16"))
        blocks["channel_offsets_um"].append(np.zeros((len(labels), K, 2), "float32"))
        blocks["channel_mask"].append(np.ones((len(labels), K), bool))
        blocks["unit_label"].append(labels)
        blocks["recording_id"].append(np.full(len(labels), rec))
    block = {k: np.concatenate(v) for k, v in blocks.items()}
    # an "embedding" that knows the units, and one that is noise
    good = np.eye(8)[block["unit_label"]] * 10 + rng.normal(0, 0.5, (len(block["unit_label"]), 8))
    cfg = ProbeConfig(max_components=8)
    result = run_probe(None, block, cfg, embeddings=good)
    assert result["n_recordings"] == 2  # the one-unit recording is skipped
    assert [e["n_units"] for e in result["per_recording"]] == [3, 4]
    assert result["model"]["cluster_acc"] > 0.95 and result["model"]["knn_acc"] > 0.95
    assert result["pca"]["cluster_acc"] > 0.95  # well-separated templates: PCA gets them too
    noise = run_probe(None, block, cfg, embeddings=rng.normal(size=good.shape), with_pca=False)
    assert noise["model"]["knn_acc"] < 0.6 and "pca" not in noise
