"""Fine-tune a pretrained spike encoder: the mode dispatch and the loop of the labelled modes.

Read top to bottom: :func:`finetune` (Python API) and :func:`run` (CLI) resolve the parent model and
the tuning data, measure the zero-shot model on the held-out events, build Lightning Fabric and the
training state, then dispatch on the mode:

- ``self-supervised`` continues the pretraining objective by calling the pretraining loop itself
  (:func:`pretrain.train.fit`) on the new probe's events;
- ``contrastive`` and ``deepcluster`` run :func:`fit_labelled`, a loop with the same state layout,
  step seeding, checkpoint writer (:func:`pretrain.train.save_checkpoint`) and resume logic as
  the pretraining loop, whose loss is the mode's objective (:mod:`finetune.objectives`) plus
  ``pretrain_weight`` x the pretraining objective (:func:`pretrain.train.pretrain_loss`).

Finally the tuned model is measured on the same held-out events and written with
:func:`inference.checkpoint.save_pretrained` into ``out/`` (a normal checkpoint: ``load_model(out)``
works) whose config and card record the parent model (id + config hash), the data, the mode, the
settings and the before/after metrics.

Output folder::

    out/
      model.safetensors, config.json, README.md   the fine-tuned checkpoint
      finetune_config.json                        the settings (checked when resuming)
      finetune.log, logs/version_N/metrics.csv    log and per-step metrics
      data/README.md                              the events tuned on and held out
      eval_before.json                            zero-shot metrics of the parent (cached for resume)
      step-XXXXXXXX/                              resumable training checkpoints
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .config import FinetuneConfig
from .data import TuningData, describe_source, load_sorting, load_tuning_data

logger = logging.getLogger(__name__)

RUN_FILE = "finetune_config.json"
EVAL_BEFORE_FILE = "eval_before.json"
FREEZE_PRESETS = ("encoder-lower",)


@dataclass
class FinetuneResult:
    """What a fine-tune produced.

    Attributes
    ----------
    folder : Path
        The checkpoint folder (``inference.load_model(folder)`` loads the tuned model).
    metrics : dict
        ``before`` / ``after`` / ``pca`` probe metrics on the held-out events, and counts.
    wall_time_s : float
        Wall time of the tuning loop (excluding extraction and evaluation).
    """

    folder: Path
    metrics: dict
    wall_time_s: float

    def metrics_table(self) -> str:
        """A markdown table of the held-out clustering metrics before and after tuning."""
        m = self.metrics
        if not m.get("measured"):
            return f"held-out evaluation: not measured ({m.get('reason', 'no labels')})"
        rows = ["| held-out metric | zero-shot (parent) | fine-tuned | PCA |", "| --- | --- | --- | --- |"]
        for key in ("cluster_acc", "ari", "knn_acc", "n_clusters"):
            rows.append(f"| {key} | {m['before'][key]:.3f} | {m['after'][key]:.3f} | {m['pca'][key]:.3f} |")
        return "\n".join(rows)


# =============================================================================== public API
def finetune(model: str = "default", data=(), mode: str = "self-supervised", out=None, *, labels=None,
             **settings) -> FinetuneResult:
    """Fine-tune a pretrained encoder on new data and write a checkpoint with its lineage.

    Parameters
    ----------
    model : str
        Parent model id: ``"default"``, a registry name, a checkpoint folder or ``hf-hub:ORG/NAME@REV``.
    data : recording, path or list of them
        Recordings (paths SpikeInterface reads or ``BaseRecording`` objects) or spikevault corpus folders.
    mode : {"self-supervised", "contrastive", "deepcluster"}
        Objective (see :mod:`finetune`).
    out : path
        Output folder of the checkpoint.
    labels : sorting, path or list of them, optional
        One sorting per recording (phy folder, saved sorting, ``BaseSorting``): training labels for
        ``contrastive``, evaluation labels for every mode.
    **settings
        Any other :class:`~finetune.config.FinetuneConfig` field (``steps``, ``train_window_s``,
        ``holdout_fraction``, ``freeze_layers``, ``freeze``, ``resume``, ``lr``, ``seed`` ...).

    Returns
    -------
    FinetuneResult
    """
    if out is None:
        raise ValueError("finetune(out=...) is required: the folder of the fine-tuned checkpoint")
    data = list(data) if isinstance(data, (list, tuple)) else [data]
    if labels is not None and not isinstance(labels, (list, tuple)):
        labels = [labels]
    config = FinetuneConfig.from_dict(
        {"model": str(model), "data": data, "mode": mode, "out": str(out), "labels": labels, **settings}
    ).validate()
    return run(config)


def run(config: FinetuneConfig, _stop_after_steps: int | None = None) -> FinetuneResult:
    """Run a validated fine-tuning configuration (see :func:`finetune`).

    ``_stop_after_steps`` aborts the loop after that many steps of this process (used by tests to
    interrupt a run the way a crash would, after a checkpoint and before the end).
    """
    from inference.checkpoint import load_config, load_model

    out = Path(config.out)
    parent_info = load_config(config.model)
    identity = _run_identity(config, parent_info)
    _prepare_out(out, config, identity)
    _log_to_file(out / "finetune.log")
    logger.info("fine-tuning %s (%s) in mode %s into %s", config.model, parent_info.folder, config.mode, out)

    # ---- the parent and the data (extracted with the parent's schema and preprocessing)
    parent = load_model(config.model)
    if config.mode == "contrastive" and config.labels:
        _check_sortings_have_units(config.labels)
    tuning = load_tuning_data(
        config.data, parent_info.schema, labels=config.labels, extract_params=parent_info.preprocessing,
        train_window_s=config.train_window_s, holdout_fraction=config.holdout_fraction,
        max_events=config.max_events, eval_max_events=config.eval_max_events * len(config.data), seed=config.seed,
        job_kwargs={"n_jobs": config.n_jobs, "progress_bar": False},
    )
    _write_data_card(out, tuning)
    if tuning.num_train < config.batch_size:
        raise ValueError(
            f"only {tuning.num_train} events in the tuning window, fewer than --batch-size {config.batch_size}: "
            "lower --batch-size, widen --train-window-s or give a longer recording"
        )

    # ---- zero-shot metrics of the parent on the held-out events (cached so a resume skips them)
    before = _cached_eval_before(out, identity, parent, tuning, config)

    # ---- train
    t0 = time.perf_counter()
    tuned, frozen = _train(config, parent, tuning, out, _stop_after_steps)
    wall = time.perf_counter() - t0

    # ---- after, and the checkpoint
    after = evaluate(tuned, tuning, config)
    metrics = _metrics(before, after, tuning, wall)
    _export(tuned, out, config, parent_info, tuning, metrics, frozen, identity)
    result = FinetuneResult(folder=out, metrics=metrics, wall_time_s=wall)
    logger.info("done: %s", json.dumps(_jsonable(metrics)))
    return result


# =============================================================================== run folder
def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run_identity(config: FinetuneConfig, parent_info) -> dict[str, Any]:
    """What must not change between a run and its resume: parent, data, labels, settings."""
    return {
        "parent": config.model,
        "parent_config_sha256": _config_hash(parent_info.config),
        "data": [describe_source(d) for d in config.data],
        "labels": [describe_source(s) for s in config.labels] if config.labels else None,
        "hyperparameters": config.hyperparameters(),
    }


def _prepare_out(out: Path, config: FinetuneConfig, identity: dict) -> None:
    from pretrain.train import list_step_dirs

    run_file = out / RUN_FILE
    if run_file.exists():
        saved = json.loads(run_file.read_text())
        if config.resume is None and not config.overwrite:
            raise FileExistsError(
                f"{out} already holds a fine-tuning run; pass --resume auto to continue it, --overwrite to start "
                "it again, or another --out"
            )
        if config.resume is not None:
            diffs = _diff(saved.get("identity", {}), _jsonable(identity))
            if diffs:
                raise ValueError(
                    f"--resume {config.resume}: the run in {out} was started with other settings ("
                    + "; ".join(diffs[:8]) + "). Resume with the same settings, or use another --out."
                )
    elif out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder or pass --overwrite")
    if config.overwrite and config.resume is None:
        for step_dir in list_step_dirs(out):
            shutil.rmtree(step_dir)
        for name in (EVAL_BEFORE_FILE, RUN_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(_jsonable({"identity": identity, "config": _config_record(config)}), indent=2))


def _config_record(config: FinetuneConfig) -> dict:
    d = config.to_dict()
    d["data"] = [describe_source(x) for x in config.data]
    d["labels"] = [describe_source(x) for x in config.labels] if config.labels else None
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: was {a!r}, now {b!r}"]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _log_to_file(path: Path) -> None:
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
        for h in root.handlers:
            if h is not handler and type(h) is logging.StreamHandler:
                h.setLevel(max(h.level, logging.WARNING))


def _check_sortings_have_units(labels: list) -> None:
    for src in labels:
        sorting = load_sorting(src)
        if len(sorting.unit_ids) < 2:
            raise ValueError(
                f"--labels {describe_source(src)}: the sorting has {len(sorting.unit_ids)} unit(s); contrastive "
                "fine-tuning needs at least 2 units to push apart. Pass a sorting with several units, or use "
                "--mode self-supervised / deepcluster, which need no labels."
            )


def _write_data_card(out: Path, tuning: TuningData) -> None:
    folder = out / "data"
    folder.mkdir(exist_ok=True)
    lines = ["# Fine-tuning data", "",
             f"{tuning.num_train} events tuned on, {tuning.num_heldout} held out (never seen in tuning).", "",
             "```json", json.dumps(_jsonable(tuning.sources), indent=2), "```", ""]
    (folder / "README.md").write_text("\n".join(lines))


# =============================================================================== evaluation
def probe_config(config: FinetuneConfig):
    """The clustering probe (:mod:`pretrain.probe`) settings of the before/after evaluation."""
    from pretrain.probe import ProbeConfig

    return ProbeConfig(max_events_per_recording=config.eval_max_events, method=config.eval_clusterer,
                       max_components=config.eval_max_components, seed=config.seed)


def evaluate(model, tuning: TuningData, config: FinetuneConfig) -> dict:
    """Clustering probe of ``model`` on the held-out events (GMM with BIC, never told the unit count).

    Returns the probe result (``model``, ``pca``, ``per_recording``, ``n_recordings``) or
    ``{"n_recordings": 0, "reason": ...}`` when the held-out events carry no usable labels.
    """
    from pretrain.probe import run_probe

    if not tuning.has_heldout_labels():
        return {"n_recordings": 0, "reason": "the held-out events carry no unit labels (pass --labels to measure)"}
    result = run_probe(model, tuning.heldout, probe_config(config))
    if result["n_recordings"] == 0:
        result["reason"] = "no held-out recording has 2 or more labelled units with enough spikes"
    return result


def _cached_eval_before(out: Path, identity: dict, parent, tuning: TuningData, config: FinetuneConfig) -> dict:
    path = out / EVAL_BEFORE_FILE
    key = _config_hash(_jsonable(identity))
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("identity") == key:
            return cached["result"]
    result = _jsonable(evaluate(parent, tuning, config))
    path.write_text(json.dumps({"identity": key, "result": result}, indent=2))
    return result


def _metrics(before: dict, after: dict, tuning: TuningData, wall_s: float) -> dict:
    m: dict[str, Any] = {
        "n_train_events": tuning.num_train,
        "n_heldout_events": tuning.num_heldout,
        "tuning_wall_time_s": round(wall_s, 2),
        "evaluation": "pretrain.probe on the held-out events: GMM (components by BIC, true unit count never given), "
                      "Hungarian-matched accuracy, ARI, 5-fold kNN accuracy; PCA features of the same events as baseline",
    }
    if not after.get("n_recordings"):
        m.update(measured=False, reason=after.get("reason", "no labelled held-out events"))
        return m
    m.update(measured=True, n_recordings=after["n_recordings"], before=before["model"], after=after["model"],
             pca=after["pca"],
             per_recording=[{"recording_id": a["recording_id"], "n_events": a["n_events"], "n_units": a["n_units"],
                             "before": b["model"], "after": a["model"], "pca": a["pca"]}
                            for b, a in zip(before["per_recording"], after["per_recording"])])
    return m


# =============================================================================== freezing
def encoder_layers(model) -> list[tuple[str, Any]]:
    """The encoder's parameterised layers, input first (what ``--freeze-layers N`` counts).

    The per-channel backbone's layers (each convolution or the GRU, then its output projection),
    the channel-offset encoding, each channel self-attention block, the attention pooling and the
    latent head. Decoder modules (names starting with ``decoder``) are never listed.
    """
    from torch import nn

    layers: list[tuple[str, Any]] = []
    for name, child in model.named_children():
        if name.startswith("decoder"):
            continue
        if name == "backbone":
            for sub_name, sub in child.named_modules():
                if sub_name and not list(sub.children()) and any(True for _ in sub.parameters(recurse=False)):
                    layers.append((f"backbone.{sub_name}", sub))
        elif isinstance(child, nn.ModuleList):
            layers += [(f"{name}.{i}", m) for i, m in enumerate(child)]
        elif any(True for _ in child.parameters()):
            layers.append((name, child))
    return layers


def freeze_encoder(model, num_layers: int = 0, preset: str | None = None) -> list[str]:
    """Freeze the first ``num_layers`` encoder layers (or the ``preset``); return their names.

    ``preset="encoder-lower"`` freezes the lower half of :func:`encoder_layers` (rounded down).
    """
    layers = encoder_layers(model)
    if preset is not None:
        if preset not in FREEZE_PRESETS:
            raise ValueError(f"--freeze {preset!r}: the presets are {FREEZE_PRESETS}")
        num_layers = len(layers) // 2
    if num_layers > len(layers):
        raise ValueError(
            f"--freeze-layers {num_layers}: the encoder has only {len(layers)} layers "
            f"({', '.join(n for n, _ in layers)}); freezing all of them leaves nothing to tune"
        )
    if num_layers == len(layers):
        raise ValueError(f"--freeze-layers {num_layers} freezes the whole encoder; use at most {len(layers) - 1}")
    names = []
    for name, layer in layers[:num_layers]:
        for p in layer.parameters():
            p.requires_grad_(False)
        names.append(name)
    return names


# =============================================================================== training
class EventBlockStream(IterableDataset):
    """In-memory events as the pretraining loop's stream: shuffled per (seed, epoch), fixed batches.

    Implements what :func:`pretrain.train.fit` uses of ``spikevault.reader.EventStream``
    (``set_epoch``, ``state_dict(batches_yielded)``, ``load_state_dict``, iteration of dict batches of
    tensors, ``batches_per_epoch``) for an event block
    already in memory (the tuning window of a recording). Single process: no rank/worker split.
    """

    fields = ("waveform", "channel_offsets_um", "channel_mask", "unit_label")

    def __init__(self, block: dict, batch_size: int, seed: int = 0):
        super().__init__()
        self.tensors = {
            "waveform": torch.as_tensor(np.asarray(block["waveform"], dtype=np.float32)),
            "channel_offsets_um": torch.as_tensor(np.asarray(block["channel_offsets_um"], dtype=np.float32)),
            "channel_mask": torch.as_tensor(np.asarray(block["channel_mask"], dtype=bool)),
            "unit_label": torch.as_tensor(np.asarray(block["unit_label"], dtype=np.int64)),
        }
        self.n = len(block["waveform"])
        self.batch_size, self.seed, self.epoch, self._start = int(batch_size), int(seed), 0, 0
        self.batches_per_epoch = self.n // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles) and go to its start."""
        self.epoch, self._start = int(epoch), 0

    def state_dict(self, batches_yielded: int = 0) -> dict:
        """Position: the epoch and the batches of it already consumed (plus what must not change)."""
        return {"epoch": self.epoch, "batches_yielded": int(batches_yielded), "seed": self.seed,
                "batch_size": self.batch_size, "num_events": self.n}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: the next batches are those an uninterrupted run yields."""
        mine = self.state_dict()
        bad = [f"{k}={state.get(k)!r} (now {mine[k]!r})" for k in ("seed", "batch_size", "num_events")
               if state.get(k) != mine[k]]
        if bad:
            raise ValueError("cannot resume: the tuning events differ from the interrupted run's: " + ", ".join(bad))
        self.epoch, self._start = int(state["epoch"]), int(state["batches_yielded"])

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        for b in range(self._start, self.batches_per_epoch):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield {k: v[idx] for k, v in self.tensors.items()}

    def batch(self, idx: np.ndarray) -> dict:
        """The events at ``idx`` as a batch (for the labelled modes' samplers)."""
        return {k: v[idx] for k, v in self.tensors.items()}


def pretrain_config_for(config: FinetuneConfig, parent, out: Path):
    """The pretraining config that continues the parent's objective on the tuning events.

    Starts from the parent's recorded training config (loss, augmentations) when its checkpoint has
    one, else from the pretraining defaults; the architecture is the parent's; the optimisation,
    batch, step and checkpoint settings are the fine-tune's. The KL weight is used at full strength
    from the first step (the parent has already been through the warm-up).
    """
    from pretrain.config import ConfigError, load_config

    training = (getattr(parent, "model_info", None).config.get("training") if getattr(parent, "model_info", None)
                else None) or {}
    inherited = {}
    for section in ("loss", "augment"):
        for k, v in (training.get(section) or {}).items():
            inherited[f"{section}.{k}"] = v
    variant = parent.config.variant
    if "loss.kl_weight" not in inherited or variant in ("vae", "ae"):
        inherited["loss.kl_weight"] = {"vae": 1.0, "ae": 0.0}.get(variant, inherited.get("loss.kl_weight", 0.01))
    parent_warmup = int((training.get("optim") or {}).get("warmup_steps", 100))
    model_keys = {f"model.{k}": v for k, v in parent.config.to_dict().items() if k != "schema"}
    overrides = {
        **inherited,
        **model_keys,
        "loss.kl_warmup_steps": 0,
        "optim.lr": config.lr,
        "optim.weight_decay": config.weight_decay,
        "optim.warmup_steps": min(parent_warmup, max(1, config.steps // 10)),
        "data.corpus": str(out / "data"),
        "data.batch_size": config.batch_size,
        "data.num_workers": 0,
        "data.val_split": "",
        "fabric.accelerator": config.accelerator,
        "fabric.precision": config.precision,
        "seed": config.seed,
        "max_steps": config.steps,
        "log_every_steps": max(1, min(10, config.steps // 10)),
        "val_every_steps": 0,
        "checkpoint_every_steps": config.checkpoint_every,
        "keep_last_checkpoints": 2,
    }
    try:
        pcfg = load_config(None, overrides)
    except ConfigError as err:
        logger.warning("the parent's training config does not load in this pretrain version (%s); "
                       "using the pretraining defaults for the objective", err)
        pcfg = load_config(None, {k: v for k, v in overrides.items() if not k.startswith(("loss.", "augment."))}
                           | model_keys
                           | {"loss.kl_weight": inherited["loss.kl_weight"], "loss.kl_warmup_steps": 0})
    pcfg.model = copy.deepcopy(parent.config)
    return pcfg


def _make_fabric(config: FinetuneConfig, out: Path):
    from lightning_fabric import Fabric
    from lightning_fabric.loggers import CSVLogger

    return Fabric(accelerator=config.accelerator, devices=1, precision=config.precision,
                  loggers=[CSVLogger(root_dir=str(out), name="logs", flush_logs_every_n_steps=10)])


def _train(config: FinetuneConfig, parent, tuning: TuningData, out: Path, stop_after: int | None):
    """Build Fabric + state (the pretraining loop's layout), restore a checkpoint, run the mode."""
    from inference.model import SpikeVAE
    from pretrain.train import find_resume_dir, make_train_state

    pcfg = pretrain_config_for(config, parent, out)
    fabric = _make_fabric(config, out)
    fabric.seed_everything(config.seed)
    resume_dir = find_resume_dir(out, config.resume or "none")

    model = SpikeVAE(pcfg.model)
    model.load_state_dict(parent.state_dict())
    frozen = freeze_encoder(model, config.freeze_layers, config.freeze)
    if frozen:
        logger.info("frozen encoder layers: %s", ", ".join(frozen))
    state = make_train_state(fabric, model, pcfg, lr=config.lr, weight_decay=config.weight_decay,
                             resume_dir=resume_dir, finetune={"mode": config.mode, "deepcluster": {}})
    if resume_dir is not None:
        fabric.print(f"Resuming from {resume_dir} (step {state['step']})")

    stream = EventBlockStream(tuning.train, config.batch_size, seed=config.seed)
    if config.mode == "self-supervised":
        _fit_self_supervised(fabric, state, stream, pcfg, out, stop_after)
    else:
        fit_labelled(fabric, state, stream, tuning, config, pcfg, out, stop_after)

    tuned = SpikeVAE(pcfg.model)
    tuned.load_state_dict({k: v.detach().cpu() for k, v in state["model"].state_dict().items()})
    return tuned.eval(), frozen


class _Interrupted(RuntimeError):
    """Raised by the test hook that stops a run after N steps, like a crash would."""


class _StoppingStream(IterableDataset):
    """Wraps the stream so that the pretraining loop stops once it asks for one batch too many."""

    def __init__(self, stream: EventBlockStream, state: dict, stop_at_step: int):
        super().__init__()
        self.stream, self.state, self.stop_at_step = stream, state, stop_at_step
        self.batches_per_epoch = stream.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def state_dict(self, batches_yielded: int = 0) -> dict:
        return self.stream.state_dict(batches_yielded)

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self):
        for batch in self.stream:
            if self.state["step"] >= self.stop_at_step:
                raise _Interrupted(f"stopped after step {self.state['step']} (test interruption)")
            yield batch


def _fit_self_supervised(fabric, state: dict, stream: EventBlockStream, pcfg, out: Path, stop_after: int | None):
    """Continue the pretraining objective: the pretraining loop itself, on the tuning events."""
    from pretrain.train import fit

    if stop_after is not None:
        stream = _StoppingStream(stream, state, state["step"] + stop_after)
    fit(fabric, state, stream, None, pcfg, out)
    shutil.rmtree(out / "final", ignore_errors=True)  # fit's weights-only export; out/ itself is the result


def _global_units(block: dict) -> np.ndarray:
    """Unit labels made unique across recordings (``-1`` stays ``-1``)."""
    labels = np.asarray(block["unit_label"])
    out = np.full(len(labels), -1, dtype=np.int64)
    ok = labels >= 0
    keys = np.char.add(np.char.add(np.asarray(block["recording_id"]).astype(str), "/"), labels.astype(str))
    _, inv = np.unique(keys[ok], return_inverse=True)
    out[ok] = inv
    return out


def fit_labelled(fabric, state: dict, stream: EventBlockStream, tuning: TuningData, config: FinetuneConfig, pcfg,
                 out: Path, stop_after: int | None = None) -> None:
    """The loop of the ``contrastive`` and ``deepcluster`` modes.

    Same state layout, step seeding (:func:`pretrain.train.step_seed`), gradient clipping,
    logging and checkpoints (:func:`pretrain.train.save_checkpoint`) as the pretraining loop, so a
    run resumes with ``--resume auto`` and replays exactly. Batches are drawn by index from the
    step number (P units x M spikes for contrastive, cluster-balanced for deepcluster), so no
    sampler state needs saving; DeepCluster's head, its optimiser and the pseudo-labels do.
    """
    import torch
    from tqdm.auto import tqdm

    from pretrain.augment import Augmenter
    from pretrain.probe import embed_block
    from pretrain.train import list_step_dirs, pretrain_loss, save_checkpoint, step_seed

    from . import objectives as obj

    model, optimizer, scheduler = state["model"], state["optimizer"], state["scheduler"]
    augmenter = Augmenter(pcfg.augment)
    n_train = stream.n
    if config.mode == "contrastive":
        units = _global_units(tuning.train)
        sampler = obj.UnitBalancedSampler(units, config.batch_size, config.units_per_batch, seed=config.seed)
        units_t = torch.as_tensor(units)
    dc = state["finetune"]["deepcluster"]
    head = head_opt = None
    if config.mode == "deepcluster" and dc:
        head, head_opt = _restore_head(dc, pcfg.model.latent_dim, config)
    stop_at = state["step"] + stop_after if stop_after is not None else None
    pbar = tqdm(total=config.steps, initial=state["step"], desc=f"finetune {config.mode}", unit="step",
                dynamic_ncols=True, disable=None)
    t_last, step_last = time.perf_counter(), state["step"]
    model.train()
    while state["step"] < config.steps:
        step = state["step"]
        if stop_at is not None and step >= stop_at:
            raise _Interrupted(f"stopped after step {step} (test interruption)")
        if config.mode == "deepcluster" and (not dc or step % config.recluster_every == 0 and dc.get("step") != step):
            k = config.num_clusters or obj.auto_num_clusters(n_train, int(tuning.train["channel_mask"].sum(1).max()))
            emb = embed_block(model, tuning.train)
            pseudo = obj.cluster_embeddings(emb, min(k, n_train // 2), config.deepcluster_clusterer, seed=config.seed + step)
            round_index = step // config.recluster_every
            head = obj.new_linear_head(pcfg.model.latent_dim, int(pseudo.max()) + 1, seed=config.seed + round_index)
            head_opt = torch.optim.AdamW(head.parameters(), lr=config.lr * 10, weight_decay=config.weight_decay)
            dc.clear()
            dc.update(step=step, round=round_index, pseudo=torch.as_tensor(pseudo))
            counts = np.bincount(pseudo)
            logger.info("deepcluster step %d: %d pseudo-label clusters (sizes %d-%d)", step, len(counts),
                        counts.min(), counts.max())
        gen = torch.Generator(device=fabric.device).manual_seed(step_seed(config.seed, 0, step))
        torch.manual_seed(step_seed(config.seed + 1, 0, step))
        if config.mode == "contrastive":
            idx = sampler.indices(step)
            batch = fabric.to_device(stream.batch(idx))
            v1 = augmenter(batch["waveform"], batch["channel_offsets_um"], batch["channel_mask"].bool(), gen)
            v2 = augmenter(batch["waveform"], batch["channel_offsets_um"], batch["channel_mask"].bool(), gen)
            z = model.embed(torch.cat([v1.waveform, v2.waveform]), torch.cat([v1.offsets, v2.offsets]),
                            torch.cat([v1.mask, v2.mask]))
            lab = fabric.to_device(units_t[idx])
            task = obj.contrastive_loss(z, torch.cat([lab, lab]), loss=config.contrastive_loss,
                                        temperature=config.temperature, metric=config.similarity, margin=config.margin)
        else:
            pseudo = dc["pseudo"].numpy()
            idx = obj.ClusterBalancedSampler(pseudo, config.batch_size, seed=config.seed,
                                             round_index=dc["round"]).indices(step)
            batch = fabric.to_device(stream.batch(idx))
            v = augmenter(batch["waveform"], batch["channel_offsets_um"], batch["channel_mask"].bool(), gen)
            logits = head(model.embed(v.waveform, v.offsets, v.mask))
            task = torch.nn.functional.cross_entropy(logits, fabric.to_device(dc["pseudo"][idx]))
        loss, stats = task, {"task": task.detach()}
        if config.pretrain_weight > 0:
            ploss, pstats = pretrain_loss(model, batch, pcfg, augmenter, gen, step)
            loss = loss + config.pretrain_weight * ploss
            stats.update({f"pretrain_{k}": v for k, v in pstats.items()})
        stats["loss"] = loss.detach()
        if not torch.isfinite(loss):
            last = list_step_dirs(out)
            raise RuntimeError(
                f"non-finite loss at step {step + 1}: { {k: float(v) for k, v in stats.items()} }. Stopped without "
                f"writing a checkpoint (last good one: {last[-1] if last else 'none'}). Lower --lr."
            )
        fabric.backward(loss)
        if pcfg.optim.grad_clip_norm > 0:
            fabric.clip_gradients(model, optimizer, max_norm=pcfg.optim.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if head_opt is not None:
            head_opt.step()
            head_opt.zero_grad(set_to_none=True)
        scheduler.step()
        state["step"] = step = step + 1
        pbar.update(1)
        if step % pcfg.log_every_steps == 0 or step == config.steps:
            now = time.perf_counter()
            eps = (step - step_last) * config.batch_size / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            values = {f"train/{k}": float(v) for k, v in stats.items()}
            fabric.log_dict({**values, "train/lr": scheduler.get_last_lr()[0], "train/events_per_s": eps}, step=step)
            pbar.set_postfix(loss=f"{float(stats['loss']):.3f}", ev_s=f"{eps:,.0f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            if head is not None:
                dc.update(head={k: v.detach().clone() for k, v in head.state_dict().items()},
                          head_optimizer=head_opt.state_dict())
            state["rng"] = {"torch": torch.get_rng_state()}
            save_checkpoint(fabric, state, out, pcfg, {})
    pbar.close()
    for lg in fabric.loggers:
        lg.finalize("success")


def _restore_head(dc: dict, latent_dim: int, config: FinetuneConfig):
    import torch

    from .objectives import new_linear_head

    head = new_linear_head(latent_dim, int(dc["pseudo"].max()) + 1, seed=0)
    head.load_state_dict(dc["head"])
    head_opt = torch.optim.AdamW(head.parameters(), lr=config.lr * 10, weight_decay=config.weight_decay)
    head_opt.load_state_dict(dc["head_optimizer"])
    return head, head_opt


# =============================================================================== export
def _export(model, out: Path, config: FinetuneConfig, parent_info, tuning: TuningData, metrics: dict,
            frozen: list[str], identity: dict) -> None:
    """Write the tuned model as a normal checkpoint in ``out/`` with lineage, settings and metrics."""
    from inference.checkpoint import WEIGHTS_NAME, save_pretrained

    parent_cfg = parent_info.config
    probes = sorted({str(p) for s in tuning.sources for p in np.atleast_1d(s.get("probe", []))} |
                    {str(p) for p in parent_cfg.get("intended_probes", []) or []})
    rates = sorted({float(r) for s in tuning.sources for r in np.atleast_1d(s.get("sampling_rate_hz", []))} |
                   {float(r) for r in parent_cfg.get("sampling_rates_hz", []) or []})
    lineage = {
        "parent": config.model,
        "parent_folder": str(parent_info.folder),
        "parent_revision": parent_info.revision,
        "parent_config_sha256": identity["parent_config_sha256"],
        "parent_weights_sha256": _file_sha256(Path(parent_info.folder) / WEIGHTS_NAME),
        "mode": config.mode,
        "data": identity["data"],
        "labels": identity["labels"],
        "frozen_layers": frozen,
        "tuning_windows_s": {str(s.get("recording_id", s["source"])): s["train_window_s"] for s in tuning.sources},
        "heldout": "events outside the tuning window of every recording; never used for tuning or clustering",
    }
    metrics_cfg = {
        "heldout_before": metrics.get("before"),
        "heldout_after": metrics.get("after"),
        "heldout_pca": metrics.get("pca"),
        **{k: v for k, v in metrics.items() if k not in ("before", "after", "pca", "per_recording")},
    }
    description = (
        f"A SpikeVault spike encoder fine-tuned from `{config.model}` with `spikevault finetune --mode {config.mode}` "
        f"on {tuning.num_train} events of {len(tuning.sources)} source(s) (probes: {', '.join(probes) or 'unknown'})."
    )
    if metrics.get("measured"):
        b, a, p = metrics["before"]["cluster_acc"], metrics["after"]["cluster_acc"], metrics["pca"]["cluster_acc"]
        description += (f" Held-out clustering accuracy: zero-shot {b:.3f}, fine-tuned {a:.3f} (PCA features {p:.3f}).")
    save_pretrained(
        model, out,
        card_info={
            "model_name": f"{Path(config.out).name} (fine-tuned, {config.mode})",
            "description": description,
            "corpus_card": (out / "data" / "README.md").read_text(),
        },
        extra_config=_jsonable({
            "training": {"finetune": config.hyperparameters(), "parent_training": parent_cfg.get("training")},
            "metrics": metrics_cfg,
            "lineage": lineage,
            "corpus": {"tuning_data": tuning.sources},
            "intended_probes": probes,
            "sampling_rates_hz": rates,
        }),
        preprocessing=parent_info.preprocessing,
    )
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
