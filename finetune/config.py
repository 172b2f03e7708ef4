"""Typed configuration of a fine-tuning run.

Every field has a type, a default that works and a description (shown by ``spikevault finetune
--help``). :meth:`FinetuneConfig.validate` reports every problem at once, naming the CLI flag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MODES = ("self-supervised", "contrastive", "deepcluster")


def _f(default, help: str, flag: str | None = None, **kw):
    """A dataclass field carrying its CLI help text (and flag name when it differs from the field)."""
    metadata = {"help": help}
    if flag:
        metadata["flag"] = flag
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class FinetuneConfig:
    """Settings of ``spikevault finetune`` / :func:`finetune.finetune`."""

    model: str = _f("default", "model id to start from: 'default', a registry name, a local checkpoint folder "
                    "or hf-hub:ORG/NAME@REV")
    data: list[str] = _f(list, "recording(s) SpikeInterface can read, or spikevault corpus folder(s)")
    mode: str = _f("self-supervised", "self-supervised (continue the pretraining objective), contrastive (needs "
                   "--labels) or deepcluster (pseudo-labels from clustering)")
    out: str = _f("", "output folder of the fine-tuned checkpoint")
    labels: list[str] | None = _f(None, "sorting(s) giving unit labels, one per recording (any folder "
                                  "SpikeInterface reads: phy, a saved sorting, NWB ...); used for training by "
                                  "contrastive and for the before/after evaluation by every mode")
    freeze_layers: int = _f(0, "freeze the first N parameterised layers of the encoder")
    freeze: str | None = _f(None, "named freezing preset: 'encoder-lower' freezes the lower half of the encoder")
    train_window_s: tuple[float, float] | None = _f(None, "tune only on events in [START, END) seconds of each "
                                                    "recording; everything outside is held out for evaluation")
    holdout_fraction: float = _f(0.3, "without --train-window-s: the last fraction of each recording (by time) "
                                 "held out for evaluation and never seen in tuning")
    steps: int = _f(200, "optimisation steps")
    batch_size: int = _f(128, "events per step")
    lr: float = _f(5e-4, "AdamW learning rate")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    pretrain_weight: float = _f(0.1, "weight of the pretraining objective (ELBO + invariance) added to the "
                                "contrastive/deepcluster loss as a regulariser; 0 turns it off")
    contrastive_loss: str = _f("supcon", "contrastive objective: supcon (supervised contrastive) or triplet "
                               "(batch-hard)")
    temperature: float = _f(0.2, "supcon softmax temperature")
    similarity: str = _f("cosine", "supcon similarity: cosine or euclidean (negative squared distance)")
    margin: float = _f(1.0, "triplet margin")
    units_per_batch: int = _f(8, "contrastive: units per batch (P of P x M sampling)")
    num_clusters: int = _f(0, "deepcluster: number of pseudo-label clusters (0 = auto over-clustering from the "
                           "number of events; the true unit count is never used)")
    recluster_every: int = _f(50, "deepcluster: steps between re-clusterings (the linear head is re-initialised "
                              "each time)")
    deepcluster_clusterer: str = _f("kmeans", "deepcluster: kmeans or gmm")
    max_events: int = _f(50_000, "cap on the number of tuning events kept in memory (a deterministic subsample)")
    checkpoint_every: int = _f(50, "write a resumable training checkpoint every N steps")
    resume: str | None = _f(None, "'auto' continues from the newest checkpoint in --out; a path resumes from it")
    seed: int = _f(0, "random seed")
    eval_clusterer: str = _f("gmm", "clusterer of the before/after evaluation probe: gmm (components by BIC) or "
                             "hdbscan; never given the true unit count")
    eval_max_events: int = _f(3000, "held-out events per recording used by the before/after evaluation")
    eval_max_components: int = _f(30, "largest number of GMM components the evaluation's BIC search tries")
    n_jobs: int = _f(1, "SpikeInterface job workers for event extraction")
    accelerator: str = _f("cpu", "Lightning Fabric accelerator (cpu, cuda, auto)")
    precision: str = _f("32-true", "Lightning Fabric precision (32-true, bf16-mixed)")
    overwrite: bool = _f(False, "allow writing into an existing --out that holds a different run")

    # -------------------------------------------------------------------------------------
    @staticmethod
    def flag(name: str) -> str:
        """CLI flag of a field (``train_window_s`` -> ``--train-window-s``)."""
        return "--" + name.replace("_", "-")

    def validate(self) -> "FinetuneConfig":
        """Raise ``ValueError`` listing every invalid setting with its flag and the fix."""
        p: list[str] = []
        fl = self.flag
        if self.mode not in MODES:
            p.append(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not self.data:
            p.append("--data: give at least one recording or corpus folder")
        if not self.out:
            p.append("--out: give an output folder for the fine-tuned checkpoint")
        if self.labels is not None and self.data and len(self.labels) not in (1, len(self.data)):
            p.append(f"--labels: give one sorting per --data source ({len(self.data)}), got {len(self.labels)}")
        if self.mode == "contrastive" and not self.labels and not self._data_may_carry_labels():
            p.append("--mode contrastive needs unit labels: pass --labels SORTING (e.g. a phy folder), or tune a "
                     "corpus built with a sorting")
        if self.freeze_layers < 0:
            p.append(f"--freeze-layers must be >= 0, got {self.freeze_layers}")
        if self.freeze not in (None, "encoder-lower"):
            p.append(f"--freeze {self.freeze!r}: the only preset is 'encoder-lower'")
        if self.freeze and self.freeze_layers:
            p.append("--freeze and --freeze-layers are exclusive: use one")
        if self.train_window_s is not None:
            w = tuple(self.train_window_s)
            if len(w) != 2 or not (0 <= w[0] < w[1]):
                p.append(f"--train-window-s START END needs 0 <= START < END seconds, got {list(w)}")
        if not 0.0 < self.holdout_fraction < 1.0:
            p.append(f"--holdout-fraction must be in (0, 1), got {self.holdout_fraction}")
        for name in ("steps", "batch_size", "max_events", "checkpoint_every", "recluster_every", "eval_max_events",
                     "eval_max_components"):
            if getattr(self, name) < 1:
                p.append(f"{fl(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "temperature", "margin"):
            if not getattr(self, name) > 0:
                p.append(f"{fl(name)} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "pretrain_weight"):
            if getattr(self, name) < 0:
                p.append(f"{fl(name)} must be >= 0, got {getattr(self, name)}")
        if self.contrastive_loss not in ("supcon", "triplet"):
            p.append(f"--contrastive-loss {self.contrastive_loss!r}: use supcon or triplet")
        if self.similarity not in ("cosine", "euclidean"):
            p.append(f"--similarity {self.similarity!r}: use cosine or euclidean")
        if self.units_per_batch < 2:
            p.append(f"--units-per-batch must be >= 2, got {self.units_per_batch}")
        if self.num_clusters == 1 or self.num_clusters < 0:
            p.append(f"--num-clusters must be 0 (auto) or >= 2, got {self.num_clusters}")
        if self.deepcluster_clusterer not in ("kmeans", "gmm"):
            p.append(f"--deepcluster-clusterer {self.deepcluster_clusterer!r}: use kmeans or gmm")
        if self.eval_clusterer not in ("gmm", "hdbscan"):
            p.append(f"--eval-clusterer {self.eval_clusterer!r}: use gmm or hdbscan")
        if self.resume not in (None, "auto") and not Path(self.resume).exists():
            p.append(f"--resume {self.resume!r}: no such checkpoint; use 'auto' or an existing step folder")
        if self.n_jobs < 1:
            p.append(f"--n-jobs must be >= 1, got {self.n_jobs}")
        if p:
            raise ValueError("invalid fine-tuning settings:\n  - " + "\n  - ".join(p))
        return self

    def _data_may_carry_labels(self) -> bool:
        # A spikevault corpus (a folder with manifest.json) may hold labelled events; checked on load.
        return any(isinstance(d, (str, Path)) and (Path(d) / "manifest.json").exists() for d in self.data)

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that shape the result (recorded in the checkpoint's card and config)."""
        skip = {"model", "data", "labels", "out", "resume", "overwrite", "n_jobs"}
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        if d["train_window_s"] is not None:
            d["train_window_s"] = list(d["train_window_s"])
        return d

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["train_window_s"] is not None:
            d["train_window_s"] = list(d["train_window_s"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown fine-tuning setting(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if isinstance(d.get("data"), (str, Path)):
            d["data"] = [d["data"]]
        if isinstance(d.get("labels"), (str, Path)):
            d["labels"] = [d["labels"]]
        # Paths become strings; in-memory recordings/sortings (Python API) are kept as they are.
        for key in ("data", "labels"):
            if d.get(key) is not None:
                d[key] = [str(x) if isinstance(x, (str, Path)) else x for x in d[key]]
        if d.get("out") is not None:
            d["out"] = str(d["out"])
        if d.get("train_window_s") is not None:
            d["train_window_s"] = tuple(float(x) for x in d["train_window_s"])
        return cls(**d)
