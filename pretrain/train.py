"""Self-supervised pretraining of the spike encoder under Lightning Fabric.

Read top to bottom: :func:`setup` builds Fabric (devices, nodes, strategy, precision, loggers) and
launches the processes; :func:`main` opens the corpus, builds the model and optimiser and restores
a checkpoint; :func:`fit` is the loop; :func:`validate` the evaluation (reconstruction, KL and the
clustering probe against PCA); :func:`save_checkpoint` the atomic checkpoint writer.

Launching (every rank streams a disjoint part of the corpus; rank 0 alone writes logs and
checkpoints):

* directly: ``spikevault pretrain --devices 2 --strategy ddp ...`` (Fabric starts the other local
  processes);
* ``torchrun --nproc-per-node 2 -m spikevault.cli pretrain --devices 2 --strategy ddp ...``;
* ``fabric run --devices 2 --strategy ddp spikevault/cli.py pretrain ...``: ``LT_CLI_USED`` is set,
  Fabric is not launched a second time and ``fabric run``'s device/strategy/precision flags rule;
* SLURM: ``srun --ntasks-per-node 4 spikevault pretrain --devices 4 --num-nodes N ...`` (Fabric
  reads the SLURM environment; ntasks must equal devices x num_nodes).

Output folder::

    out/
      pretrain_config.yaml     the resolved config of the last start
      train.log                log file (rank 0)
      logs/version_N/          CSV metrics (and TensorBoard events when installed)
      step-00000500/           model.safetensors + config.json + README.md + training_state.pt
      final/                   weights-only export (loadable by inference.load_model)
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.model import ModelConfig, SpikeVAE, event_scale
from spikevault.schema import EventSchema, SchemaMismatchError

from .augment import Augmenter
from .config import PretrainConfig, save_config
from .probe import run_probe

logger = logging.getLogger(__name__)

STEP_DIR_RE = re.compile(r"^step-(\d{8})$")
STATE_NAME = "training_state.pt"
TRAIN_FIELDS = ("waveform", "channel_offsets_um", "channel_mask", "unit_label")
VAL_FIELDS = TRAIN_FIELDS + ("recording_id",)


# =============================================================================== setup
def setup(config: PretrainConfig, out_dir: str | Path, resume: str = "auto") -> dict[str, Any]:
    """Build Fabric, launch the processes and run :func:`main` on every rank.

    Parameters
    ----------
    config : PretrainConfig
        The validated run configuration (``config.fabric`` gives devices, strategy, precision).
    out_dir : path
        Output folder (checkpoints, logs).
    resume : str
        ``"auto"`` (continue from the newest ``out/step-*`` if any), ``"none"`` (start fresh;
        refuses an output folder that already has checkpoints) or a ``step-*`` folder.

    Returns
    -------
    dict
        The last validation metrics (rank 0; other ranks get the same dict).
    """
    from lightning_fabric import Fabric

    out_dir = Path(out_dir)
    fc = config.fabric
    under_fabric_run = bool(os.environ.get("LT_CLI_USED"))
    if under_fabric_run:
        # `fabric run --devices ... --strategy ...` has launched the processes and its flags rule;
        # passing ours too would conflict.
        fabric = Fabric(loggers=_loggers(out_dir))
    else:
        fabric = Fabric(
            accelerator=fc.accelerator,
            devices=fc.devices,
            num_nodes=fc.num_nodes,
            strategy=_strategy(fc.strategy),
            precision=fc.precision,
            loggers=_loggers(out_dir),
        )
        fabric.launch()
    return main(fabric, config, out_dir, resume)


def _strategy(name: str):
    if name == "fsdp":
        from lightning_fabric.strategies import FSDPStrategy

        return FSDPStrategy(state_dict_type="full")
    return name


def _loggers(out_dir: Path) -> list:
    from lightning_fabric.loggers import CSVLogger

    loggers = [CSVLogger(root_dir=str(out_dir), name="logs", flush_logs_every_n_steps=50)]
    try:
        import tensorboard  # noqa: F401
        from lightning_fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root_dir=str(out_dir), name="logs"))
    except ImportError:
        pass
    return loggers


# =============================================================================== main
def main(fabric, config: PretrainConfig, out_dir: Path, resume: str = "auto") -> dict[str, Any]:
    """Open the data, build model + optimiser, restore the checkpoint, then :func:`fit`."""
    handler = None
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        handler = _log_to_file(out_dir / "train.log")
        save_config(config, out_dir / "pretrain_config.yaml")
    try:
        return _main(fabric, config, out_dir, resume)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _main(fabric, config: PretrainConfig, out_dir: Path, resume: str) -> dict[str, Any]:
    fabric.seed_everything(config.seed)
    resume_dir = find_resume_dir(out_dir, resume)

    # ---- data: every rank streams its own disjoint part of the training split
    train_stream, schema = open_train_stream(config, fabric.global_rank, fabric.world_size)
    val_block = load_val_events(config, schema)
    model_config = ModelConfig.from_dict({**config.model.to_dict(), "schema": schema.to_dict()})
    config.model = model_config

    # ---- model and optimiser
    with fabric.init_module():
        model = SpikeVAE(model_config)
    if config.init_from and resume_dir is None:
        _init_weights(model, config.init_from, model_config)
    if resume_dir is not None:
        _check_resume_compatible(resume_dir, model_config)
    state = make_train_state(fabric, model, config, lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                             resume_dir=resume_dir)
    if resume_dir is not None:
        fabric.print(f"Resuming from {resume_dir} (step {state['step']})")
    state["config"] = config.to_dict()
    if fabric.global_rank == 0:
        logger.info("model: %s parameters, %s", f"{_count(model):,}", model_config)

    metrics = fit(fabric, state, train_stream, val_block, config, out_dir)
    fabric.barrier()
    return metrics


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
        for h in root.handlers:
            if h is not handler and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, logging.WARNING))
    return handler


def open_train_stream(config: PretrainConfig, rank: int, world_size: int):
    """The training :class:`spikevault.reader.EventStream` of this rank, and the corpus schema."""
    from spikevault.reader import EventStream

    d = config.data
    if not d.corpus:
        raise ValueError("data.corpus is not set: pass --data.corpus PATH (a `spikevault build` output folder)")
    if not Path(d.corpus).exists():
        raise FileNotFoundError(f"data.corpus {d.corpus!r} does not exist; build one with `spikevault build`")
    stream = EventStream(
        d.corpus, split=d.train_split, batch_size=d.batch_size, shuffle_buffer=d.shuffle_buffer,
        seed=config.seed, fields=TRAIN_FIELDS + (("recording_id", "sample_index") if d.log_event_ids else ()),
        rank=rank, world_size=world_size,
        num_workers_hint=d.num_workers, drop_last=True,
    )
    schema = stream.schema
    if not isinstance(schema, EventSchema):
        schema = EventSchema.from_dict(schema)
    if stream.batches_per_epoch < 1:
        raise ValueError(
            f"corpus {d.corpus!r} split {d.train_split!r} has fewer than one batch of {d.batch_size} events "
            f"per rank ({world_size} ranks): add recordings or lower data.batch_size"
        )
    return stream, schema


def load_val_events(config: PretrainConfig, schema: EventSchema) -> dict[str, np.ndarray] | None:
    """The first ``data.val_max_events`` events of the validation split (None when disabled/absent)."""
    from spikevault.reader import load_events

    d = config.data
    if not d.val_split or d.val_max_events == 0:
        return None
    try:
        block = load_events(d.corpus, split=d.val_split, fields=VAL_FIELDS, max_events=d.val_max_events)
    except (KeyError, FileNotFoundError) as err:
        logger.warning("no validation split %r in %s (%s): validation disabled", d.val_split, d.corpus, err)
        return None
    if len(block["waveform"]) == 0:
        logger.warning("validation split %r of %s is empty: validation disabled", d.val_split, d.corpus)
        return None
    T, K = block["waveform"].shape[1:]
    if (T, K) != (schema.num_samples, schema.num_channels):
        raise SchemaMismatchError(
            f"validation events are [T={T}, K={K}] but the training split's schema says "
            f"[T={schema.num_samples}, K={schema.num_channels}]"
        )
    return block


def lr_schedule(config: PretrainConfig):
    o, total = config.optim, config.max_steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _init_weights(model: SpikeVAE, folder: str, model_config: ModelConfig) -> None:
    """Copy weights from a checkpoint folder whose architecture and schema match."""
    from inference.checkpoint import load_model

    src = load_model(folder)
    _check_same_architecture(src.config, model_config, f"init_from checkpoint {folder}")
    model.load_state_dict(src.state_dict())
    logger.info("initialised weights from %s", folder)


def _check_same_architecture(found: ModelConfig, expected: ModelConfig, what: str) -> None:
    found_schema, expected_schema = found.event_schema, expected.event_schema
    expected_schema.check_compatible(found_schema, what=what, expected_by="this corpus")
    a, b = found.to_dict(), expected.to_dict()
    a.pop("schema"), b.pop("schema")
    diffs = [f"{k}={a.get(k)!r} (config says {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise ValueError(
            f"{what} has another architecture: " + ", ".join(diffs)
            + ". Use the same model settings, or another --out folder / --resume none to start fresh."
        )


# =============================================================================== resume
def make_train_state(fabric, model, config: PretrainConfig, *, lr: float, weight_decay: float,
                     resume_dir: Path | None = None, **extra) -> dict[str, Any]:
    """Set up the model and its optimiser under Fabric and return the state a checkpoint saves.

    The state holds the model, an AdamW optimiser over the parameters that require gradients, the
    warm-up + cosine schedule of ``config``, the step, the data position and the RNG (plus any
    ``extra`` entries, e.g. fine-tuning's); with ``resume_dir`` it is restored from that checkpoint.
    Pretraining and fine-tuning share it, so both resume the same way.
    """
    model = fabric.setup_module(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "step": 0,
        "data": {"epoch": 0, "batch": 0, "stream": {}},
        "rng": {"torch": torch.get_rng_state()},
        "config": config.to_dict(),
        **extra,
    }
    if resume_dir is not None:
        fabric.load(resume_dir / STATE_NAME, state)
        torch.set_rng_state(state["rng"]["torch"])
        logger.info("resumed from %s at step %d", resume_dir, state["step"])
    return state


def list_step_dirs(out_dir: Path) -> list[Path]:
    """Complete ``step-XXXXXXXX`` checkpoint folders of a run, oldest first."""
    if not out_dir.is_dir():
        return []
    dirs = [p for p in out_dir.iterdir() if p.is_dir() and STEP_DIR_RE.match(p.name) and (p / STATE_NAME).exists()]
    return sorted(dirs, key=lambda p: int(STEP_DIR_RE.match(p.name).group(1)))


def find_resume_dir(out_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from for ``--resume auto|none|PATH``."""
    existing = list_step_dirs(out_dir)
    if resume == "auto":
        return existing[-1] if existing else None
    if resume == "none":
        if existing:
            raise FileExistsError(
                f"{out_dir} already holds checkpoints ({existing[-1].name} ...); use --resume auto to continue "
                "that run, or another --out folder to start a new one (nothing is overwritten)"
            )
        return None
    path = Path(resume)
    if not (path / STATE_NAME).exists():
        raise FileNotFoundError(
            f"--resume {resume}: no {STATE_NAME} there; give a step-XXXXXXXX folder of a pretraining run, "
            "'auto' or 'none'"
        )
    return path


def _check_resume_compatible(resume_dir: Path, model_config: ModelConfig) -> None:
    import json

    cfg_path = resume_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{resume_dir} has no config.json: not a pretraining checkpoint")
    saved = json.loads(cfg_path.read_text())
    try:
        found = ModelConfig.from_dict(saved["model"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"checkpoint {resume_dir} was written for another model: {err}") from err
    _check_same_architecture(found, model_config, f"checkpoint {resume_dir}")


# =============================================================================== objective
def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR) loss: ``a[i]`` and ``b[i]`` are positives, all other 2B-2 events negatives."""
    z = torch.nn.functional.normalize(torch.cat([a, b]).float(), dim=1)
    n = a.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
    return torch.nn.functional.cross_entropy(sim, target)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent dimensions, per event."""
    if logvar is None:
        return torch.zeros(mu.shape[0], device=mu.device)
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=1)


def pretrain_loss(
    model, batch: dict[str, torch.Tensor], config: PretrainConfig, augmenter: Augmenter,
    generator: torch.Generator, step: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The pretraining objective on one batch.

    Two augmented views of every event (one when ``loss.contrastive_weight`` is 0) go through the
    model in one forward pass. Loss = denoising reconstruction (squared error, summed over the
    valid samples of an event, of the clean view in the noisy view's units) + beta(step) * KL +
    contrastive_weight * NT-Xent between the two views' latent means.

    Returns the loss and detached per-term values.
    """
    mcfg = config.model
    w, off, m = batch["waveform"], batch["channel_offsets_um"], batch["channel_mask"].bool()
    n_views = 2 if config.loss.contrastive_weight > 0 else 1
    views = [augmenter(w, off, m, generator) for _ in range(n_views)]
    x = torch.cat([v.waveform for v in views])
    clean = torch.cat([v.clean for v in views])
    offsets = torch.cat([v.offsets for v in views])
    mask = torch.cat([v.mask for v in views])
    out = model(x, offsets, mask)
    scale, _ = event_scale(x, mask, mcfg)
    target = clean / scale[:, None, None]
    valid = mask[:, None, :].float()
    recon = ((out["recon"].float() - target).square() * valid).sum(dim=(1, 2)).mean()
    kl = kl_divergence(out["mu"], out["logvar"]).mean()
    beta = config.loss.kl_weight * min(1.0, (step + 1) / max(1, config.loss.kl_warmup_steps))
    loss = recon + beta * kl
    contrast = torch.zeros((), device=loss.device)
    if n_views == 2:
        B = w.shape[0]
        contrast = nt_xent(out["mu"][:B], out["mu"][B:], config.loss.temperature)
        loss = loss + config.loss.contrastive_weight * contrast
    stats = {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach(), "contrastive": contrast.detach()}
    return loss, stats


def step_seed(seed: int, rank: int, step: int) -> int:
    """Seed of the augmentations and latent sampling of one (rank, step): resume replays them."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


# =============================================================================== the loop
def fit(fabric, state: dict, stream, val_block, config: PretrainConfig, out_dir: Path) -> dict[str, Any]:
    """Train until ``config.max_steps``, validating and checkpointing on schedule."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    model, optimizer, scheduler = state["model"], state["optimizer"], state["scheduler"]
    augmenter = Augmenter(config.augment)
    world = fabric.world_size
    events_per_step = config.data.batch_size * world
    metrics: dict[str, Any] = {}

    def batches_from(position: dict | None):
        """Iterate the stream from a saved position (None: the start of the next epoch)."""
        if position is None:
            stream.set_epoch(data["epoch"])
        else:
            stream.load_state_dict(position)
        loader = DataLoader(stream, batch_size=None, num_workers=config.data.num_workers,
                            prefetch_factor=4 if config.data.num_workers else None)
        return iter(loader)

    data = state["data"]  # {"epoch", "batch" (consumed in this epoch), "stream" (EventStream.state_dict)}
    batches = batches_from(data["stream"] or None)
    pbar = tqdm(total=config.max_steps, initial=state["step"], disable=fabric.global_rank != 0,
                desc="pretrain", unit="step", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), state["step"]
    model.train()
    while state["step"] < config.max_steps:
        step = state["step"]
        try:
            batch = next(batches)
        except StopIteration:
            if data["batch"] == 0:
                raise ValueError(f"the training split of {config.data.corpus} yielded no batch on rank "
                                 f"{fabric.global_rank}: the corpus is empty for this rank") from None
            data["epoch"], data["batch"] = data["epoch"] + 1, 0
            batches = batches_from(None)
            continue
        data["batch"] += 1
        if config.data.log_event_ids:
            _log_event_ids(out_dir, fabric.global_rank, step + 1, batch)
        batch = fabric.to_device({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        generator = torch.Generator(device=fabric.device).manual_seed(step_seed(config.seed, fabric.global_rank, step))
        torch.manual_seed(step_seed(config.seed + 1, fabric.global_rank, step))

        loss, stats = pretrain_loss(model, batch, config, augmenter, generator, step)
        reduced = fabric.all_reduce(torch.stack(list(stats.values())), reduce_op="mean")
        if not torch.isfinite(reduced).all():
            values = dict(zip(stats, reduced.tolist()))
            last = list_step_dirs(out_dir)
            raise RuntimeError(
                f"non-finite loss at step {step + 1}: {values}. Stopped without writing a checkpoint "
                f"(last good one: {last[-1] if last else 'none'}). Lower optim.lr, raise loss.kl_warmup_steps "
                "or check the corpus for non-finite waveforms (spikevault verify)."
            )
        fabric.backward(loss)
        if config.optim.grad_clip_norm > 0:
            fabric.clip_gradients(model, optimizer, max_norm=config.optim.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state["step"] = step = step + 1
        pbar.update(1)

        if step % config.log_every_steps == 0 or step == config.max_steps:
            now = time.perf_counter()
            eps = (step - step_last) * events_per_step / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            values = dict(zip(stats, reduced.tolist()))
            fabric.log_dict({**{f"train/{k}": v for k, v in values.items()}, "train/lr": scheduler.get_last_lr()[0],
                             "train/events_per_s": eps, "train/epoch": data["epoch"]}, step=step)
            pbar.set_postfix(loss=f"{values['loss']:.3f}", ev_s=f"{eps:,.0f}")
        if val_block is not None and (
            (config.val_every_steps and step % config.val_every_steps == 0) or step == config.max_steps
        ):
            metrics = validate(fabric, model, val_block, config)
            fabric.log_dict(_flat_metrics(metrics), step=step)
            if fabric.global_rank == 0:
                logger.info("step %d validation: %s", step, _flat_metrics(metrics))
                pbar.write(_summary(step, metrics))
        if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0) or step == config.max_steps:
            state["rng"] = {"torch": torch.get_rng_state()}
            data["stream"] = stream.state_dict(batches_yielded=data["batch"])
            save_checkpoint(fabric, state, out_dir, config, metrics)
    pbar.close()
    save_final(fabric, model, out_dir, config, metrics, step=state["step"])
    for lg in fabric.loggers:
        lg.finalize("success")
    return metrics


def _log_event_ids(out_dir: Path, rank: int, step: int, batch: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"events-rank{rank}.tsv", "a") as f:
        for rid, idx in zip(np.asarray(batch["recording_id"]), batch["sample_index"].tolist()):
            f.write(f"{step}\t{rid}\t{idx}\n")


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    flat = {f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    for key in ("model", "pca"):
        for m, v in metrics.get("probe", {}).get(key, {}).items():
            flat[f"probe/{key}_{m}"] = v
    return flat


def _summary(step: int, metrics: dict[str, Any]) -> str:
    p = metrics.get("probe", {})
    text = f"step {step}: val recon {metrics.get('recon', float('nan')):.3f} kl {metrics.get('kl', float('nan')):.2f}"
    if p.get("n_recordings"):
        text += (f" | probe ({p['n_recordings']} rec) model acc {p['model']['cluster_acc']:.3f} "
                 f"ari {p['model']['ari']:.3f} knn {p['model']['knn_acc']:.3f} | pca acc {p['pca']['cluster_acc']:.3f} "
                 f"ari {p['pca']['ari']:.3f} knn {p['pca']['knn_acc']:.3f}")
    return text


# =============================================================================== validation
def validate(fabric, model, val_block: dict[str, np.ndarray], config: PretrainConfig, batch_size: int = 1024) -> dict:
    """Reconstruction and KL of the validation events (no augmentation, z = mean) and the
    clustering probe of their embeddings against PCA features (rank 0; every rank runs the
    forward passes so that sharded models work)."""
    was_training = model.training
    model.eval()
    mus, recon_sum, kl_sum = [], 0.0, 0.0
    n = len(val_block["waveform"])
    with torch.no_grad():
        for s in range(0, n, batch_size):
            w = torch.as_tensor(np.asarray(val_block["waveform"][s:s + batch_size], dtype=np.float32))
            off = torch.as_tensor(np.asarray(val_block["channel_offsets_um"][s:s + batch_size], dtype=np.float32))
            m = torch.as_tensor(np.asarray(val_block["channel_mask"][s:s + batch_size], dtype=bool))
            w, off, m = fabric.to_device((w, off, m))
            out = model(w, off, m)
            scale, _ = event_scale(w, m, config.model)
            target = w * m[:, None, :] / scale[:, None, None]
            recon_sum += float(((out["recon"].float() - target).square() * m[:, None, :]).sum())
            kl_sum += float(kl_divergence(out["mu"], out["logvar"]).sum())
            mus.append(out["mu"].float().cpu().numpy())
    model.train(was_training)
    metrics: dict[str, Any] = {"recon": recon_sum / max(n, 1), "kl": kl_sum / max(n, 1)}
    if fabric.global_rank == 0:
        metrics["probe"] = run_probe(None, val_block, config.probe, embeddings=np.concatenate(mus))
    fabric.barrier()
    return metrics


# =============================================================================== checkpoints
def _full_state_dict(fabric, model) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights (a collective under FSDP; every rank must call it)."""
    from lightning_fabric.strategies import FSDPStrategy

    if isinstance(fabric.strategy, FSDPStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model._forward_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _export(fabric, model, folder: Path, config: PretrainConfig, metrics: dict, step: int) -> None:
    """Write model.safetensors + config.json + README.md into ``folder`` (rank 0 writes)."""
    from inference.checkpoint import save_pretrained

    weights = _full_state_dict(fabric, model)
    if fabric.global_rank != 0:
        return
    export = SpikeVAE(config.model)
    export.load_state_dict(weights)
    corpus = _corpus_summary(config.data.corpus)
    save_pretrained(
        export, folder,
        card_info={
            "model_name": f"spikevault pretrain step {step}",
            "description": "Self-supervised spike encoder pretrained with `spikevault pretrain`.",
            "corpus_card": corpus.get("card", ""),
        },
        extra_config={
            "training": config.to_dict(),
            "step": step,
            "metrics": _json_metrics(metrics),
            "corpus": {k: v for k, v in corpus.items() if k != "card"},
        },
        preprocessing=corpus.get("preprocessing"),
    )


def _corpus_summary(corpus: str) -> dict[str, Any]:
    """Preprocessing parameters and a short description of the training corpus (from its manifest)."""
    import json

    manifest_path = Path(corpus) / "manifest.json"
    out: dict[str, Any] = {"path": str(corpus)}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        params = manifest.get("build_params") or manifest.get("build") or manifest.get("params") or {}
        if isinstance(params, dict):
            pre = params.get("extract") or params.get("extract_params") or params.get("preprocessing")
            if isinstance(pre, dict):
                out["preprocessing"] = pre
        for key in ("num_events", "total_events", "name"):
            if key in manifest:
                out[key] = manifest[key]
    card = Path(corpus) / "README.md"
    if card.exists():
        out["card"] = card.read_text()[:4000]
    return out


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    p = metrics.get("probe", {})
    return {
        "val_recon": metrics.get("recon"),
        "val_kl": metrics.get("kl"),
        "probe": {k: p[k] for k in ("model", "pca", "n_recordings") if k in p},
    }


def save_checkpoint(fabric, state: dict, out_dir: Path, config: PretrainConfig, metrics: dict) -> Path:
    """Write ``out/step-XXXXXXXX/`` atomically: into ``out/.tmp-step-XXXXXXXX`` then rename.

    A crash mid-write leaves only the temporary folder (ignored and replaced next time); an
    existing checkpoint is never overwritten.
    """
    step = state["step"]
    final = out_dir / f"step-{step:08d}"
    tmp = out_dir / f".tmp-step-{step:08d}"
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    fabric.barrier()
    fabric.save(tmp / STATE_NAME, state)
    _export(fabric, state["model"], tmp, config, metrics, step)
    if fabric.global_rank == 0:
        # Flush the logs first: once the checkpoint exists, a kill must not lose the steps before it.
        for lg in fabric.loggers:
            lg.save()
        if final.exists():  # only possible when resuming from an older step of the same run
            shutil.rmtree(final)
        os.replace(tmp, final)
        if config.keep_last_checkpoints:
            for old in list_step_dirs(out_dir)[:-config.keep_last_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", final)
    fabric.barrier()
    return final


def save_final(fabric, model, out_dir: Path, config: PretrainConfig, metrics: dict, step: int) -> Path:
    """Weights-only export to ``out/final/`` (atomic: written beside it, then swapped in)."""
    final = out_dir / "final"
    tmp = out_dir / ".tmp-final"
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    fabric.barrier()
    _export(fabric, model, tmp, config, metrics, step)
    if fabric.global_rank == 0:
        old = out_dir / ".old-final"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        fabric.print(f"Final weights: {final}")
    fabric.barrier()
    return final
