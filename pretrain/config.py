"""Typed pretraining configuration: dataclasses, YAML presets, ``--key value`` overrides.

One :class:`PretrainConfig` holds every setting of a run in sections (``model``, ``augment``,
``loss``, ``optim``, ``data``, ``probe``, ``fabric``) plus a few top-level ones. Each attribute's
docstring is its ``--help`` text. A run's config comes from a YAML preset
(``configs/pretrain/{debug,default,large}.yaml``) with dotted overrides on top::

    spikevault pretrain --config configs/pretrain/default.yaml --optim.lr 3e-4 --max_steps 2000

Every problem (unknown key, wrong type, out-of-range value) is collected and reported at once,
naming the key and, for a typo, the closest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.model import ModelConfig

from .augment import AugmentConfig
from .probe import ProbeConfig

STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("32-true", "bf16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "pretrain"

#: Keys of a section that the config does not expose (set by the loop, not by the user).
_HIDDEN = {"model": {"schema"}}


class ConfigError(ValueError):
    """The configuration has one or more problems; the message lists all of them."""


@dataclass
class LossConfig:
    """The objective: ELBO (reconstruction + beta * KL) + augmentation-invariance (NT-Xent)."""

    kl_weight: float = 0.01
    """Beta, the weight of the KL term (1.0 = plain VAE; 0 for the 'ae' variant)."""
    kl_warmup_steps: int = 200
    """The KL weight ramps linearly from 0 to kl_weight over this many steps."""
    contrastive_weight: float = 1.0
    """Weight of the invariance term: two augmented views of an event are positives, every other
    event of the batch a negative (NT-Xent on the latent means). 0 disables it (and the 2nd view)."""
    temperature: float = 0.1
    """Temperature of the NT-Xent similarity (cosine / temperature)."""

    def problems(self, prefix: str = "") -> list[str]:
        p = []
        for name in ("kl_weight", "contrastive_weight"):
            if getattr(self, name) < 0:
                p.append(f"{prefix}{name} must be >= 0, got {getattr(self, name)}")
        if self.kl_warmup_steps < 0:
            p.append(f"{prefix}kl_warmup_steps must be >= 0, got {self.kl_warmup_steps}")
        if not self.temperature > 0:
            p.append(f"{prefix}temperature must be > 0, got {self.temperature}")
        return p


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine decay until max_steps)."""
    grad_clip_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""

    def problems(self, prefix: str = "") -> list[str]:
        p = []
        if not self.lr > 0:
            p.append(f"{prefix}lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            p.append(f"{prefix}weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            p.append(f"{prefix}warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(f"{prefix}min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip_norm < 0:
            p.append(f"{prefix}grad_clip_norm must be >= 0, got {self.grad_clip_norm}")
        return p


@dataclass
class DataConfig:
    """The corpus and how it is streamed."""

    corpus: str = ""
    """Corpus directory (the output of `spikevault build`, with manifest.json)."""
    train_split: str = "train"
    """Split streamed for training."""
    val_split: str = "val"
    """Split used for validation and the clustering probe ('' = no validation)."""
    batch_size: int = 256
    """Events per batch per device (global batch = batch_size x devices x num_nodes)."""
    shuffle_buffer: int = 8192
    """Events in the reader's shuffle buffer."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = read in the training process)."""
    val_max_events: int = 20000
    """Validation events loaded (the first ones of the val split)."""
    log_event_ids: bool = False
    """Append the recording_id and sample_index of every training event a rank sees to
    out/events-rank<R>.tsv (audits the split of the stream across ranks; slows training)."""

    def problems(self, prefix: str = "") -> list[str]:
        p = []
        if self.batch_size < 2:
            p.append(f"{prefix}batch_size must be >= 2 (the contrastive term needs negatives), got {self.batch_size}")
        if self.shuffle_buffer < 0:
            p.append(f"{prefix}shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.num_workers < 0:
            p.append(f"{prefix}num_workers must be >= 0, got {self.num_workers}")
        if self.val_max_events < 0:
            p.append(f"{prefix}val_max_events must be >= 0, got {self.val_max_events}")
        if not self.train_split:
            p.append(f"{prefix}train_split must not be empty")
        return p


@dataclass
class FabricConfig:
    """Devices, strategy and precision (Lightning Fabric)."""

    accelerator: str = "auto"
    """'auto', 'cpu', 'gpu', 'cuda' or 'mps'."""
    devices: int = 1
    """Devices (processes) per node."""
    num_nodes: int = 1
    """Number of nodes."""
    strategy: str = "auto"
    """'auto', 'ddp' or 'fsdp' (fsdp needs GPUs)."""
    precision: str = "32-true"
    """'32-true' or 'bf16-mixed'."""

    def problems(self, prefix: str = "") -> list[str]:
        p = []
        if self.accelerator not in ACCELERATORS:
            p.append(f"{prefix}accelerator must be one of {ACCELERATORS}, got {self.accelerator!r}")
        if self.devices < 1:
            p.append(f"{prefix}devices must be >= 1, got {self.devices}")
        if self.num_nodes < 1:
            p.append(f"{prefix}num_nodes must be >= 1, got {self.num_nodes}")
        if self.strategy not in STRATEGIES:
            p.append(f"{prefix}strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            p.append(f"{prefix}precision must be one of {PRECISIONS}, got {self.precision!r}")
        return p


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (the event schema comes from the corpus)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmentations."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and streaming."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Clustering probe at validation."""
    fabric: FabricConfig = field(default_factory=FabricConfig)
    """Devices, strategy, precision."""
    seed: int = 0
    """Seed of the model initialisation, the data order and the augmentations."""
    max_steps: int = 1000
    """Optimisation steps of the run."""
    log_every_steps: int = 10
    """Write metrics (CSV / TensorBoard) every this many steps."""
    val_every_steps: int = 500
    """Validate (recon, KL, clustering probe vs PCA) every this many steps (0 = only at the end)."""
    checkpoint_every_steps: int = 500
    """Write out/step-XXXXXXXX/ every this many steps (and always at the end)."""
    keep_last_checkpoints: int = 3
    """Step checkpoints kept (older ones are deleted; 0 keeps all)."""
    init_from: str = ""
    """Optional checkpoint folder to initialise the weights from (its architecture and schema must
    match)."""

    def problems(self) -> list[str]:
        p = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "problems"):
                p += value.problems(prefix=f"{f.name}.")
        for name in ("max_steps", "log_every_steps"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_every_steps", "checkpoint_every_steps", "keep_last_checkpoints"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.model.variant == "ae" and self.loss.kl_weight > 0:
            p.append("loss.kl_weight must be 0 for model.variant 'ae' (an autoencoder has no KL term)")
        if self.model.variant == "vae" and self.loss.kl_weight != 1.0:
            p.append(
                f"loss.kl_weight is {self.loss.kl_weight} but model.variant is 'vae' (beta = 1); "
                "set model.variant: beta_vae to use another KL weight"
            )
        return p

    def validate(self) -> "PretrainConfig":
        problems = self.problems()
        if problems:
            raise ConfigError(_format_problems(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return _plain(d)


# --------------------------------------------------------------------------- attribute docs
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after each annotated attribute) of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def sections() -> dict[str, type]:
    """Section name -> dataclass of :class:`PretrainConfig`."""
    hints = typing.get_type_hints(PretrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(PretrainConfig) if dataclasses.is_dataclass(hints[f.name])}


def leaf_fields() -> dict[str, tuple[Any, Any, str]]:
    """Every settable key (``section.name`` or ``name``) -> (type, default, doc)."""
    out = {}
    top_hints = typing.get_type_hints(PretrainConfig)
    top_docs = field_docs(PretrainConfig)
    secs = sections()
    for f in dataclasses.fields(PretrainConfig):
        if f.name in secs:
            cls = secs[f.name]
            hints, docs, default = typing.get_type_hints(cls), field_docs(cls), cls()
            for sf in dataclasses.fields(cls):
                if sf.name in _HIDDEN.get(f.name, ()):
                    continue
                out[f"{f.name}.{sf.name}"] = (hints[sf.name], getattr(default, sf.name), docs.get(sf.name, ""))
        else:
            out[f.name] = (top_hints[f.name], getattr(PretrainConfig(), f.name), top_docs.get(f.name, ""))
    return out


# --------------------------------------------------------------------------- coercion
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to type ``tp``; raise ValueError naming the key."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        raise ValueError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            import yaml

            text = value.strip()
            value = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{key}: expected a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"{key}: expected a mapping, got {value!r}")
    return value


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively (for YAML / JSON)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _format_problems(problems: list[str]) -> str:
    head = f"{len(problems)} problem(s) in the pretraining config:" if len(problems) > 1 else "invalid pretraining config:"
    return head + "\n  - " + "\n  - ".join(problems)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in sections() and not prefix:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Build a :class:`PretrainConfig` from a YAML file (or the defaults) and dotted overrides.

    Parameters
    ----------
    path : path or None
        A YAML file (nested sections, e.g. ``optim: {lr: 1e-3}``), or a preset name
        (``debug``, ``default``, ``large``). None starts from the dataclass defaults.
    overrides : dict
        ``{"optim.lr": "3e-4", "max_steps": 10, ...}``; strings are converted to the key's type.

    Raises
    ------
    ConfigError
        Listing every unknown key (with the closest valid one), bad type and invalid value.
    """
    import yaml

    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists() and (PRESET_DIR / f"{path}.yaml").exists():
            p = PRESET_DIR / f"{path}.yaml"
        if not p.exists():
            raise FileNotFoundError(
                f"config file {str(path)!r} not found; give a YAML file or a preset name "
                f"({', '.join(sorted(q.stem for q in PRESET_DIR.glob('*.yaml')))})"
            )
        where = str(p)
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of config sections, got {type(loaded).__name__}")
        raw = loaded
    flat = _flatten(raw)
    sources = {k: where for k in flat}
    for k, v in (overrides or {}).items():
        flat[k] = v
        sources[k] = "command line"

    leaves = leaf_fields()
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if key not in leaves:
            if key in sections():
                problems.append(f"{key} must be a mapping of settings ({sources[key]}), got {value!r}")
                continue
            hint = difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6)
            hidden = key.split(".")[-1] in _HIDDEN.get(key.split(".")[0], ())
            msg = f"unknown key {key!r} ({sources[key]})"
            if hidden:
                msg += ": it is not configurable (the event schema comes from the corpus)"
            elif hint:
                msg += f"; did you mean {hint[0]!r}?"
            problems.append(msg)
            continue
        try:
            values[key] = _coerce(value, leaves[key][0], key)
        except ValueError as err:
            problems.append(f"{err} ({sources[key]})")
    if problems:
        raise ConfigError(_format_problems(problems))

    kwargs: dict[str, Any] = {}
    secs = sections()
    for name, cls in secs.items():
        sub = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(f"{name}.")}
        if cls is ModelConfig:
            # Build without its own validation so that all problems are reported together.
            cfg = ModelConfig()
            for k, v in sub.items():
                setattr(cfg, k, v)
            cfg.conv_channels = tuple(cfg.conv_channels)
            kwargs[name] = cfg
        else:
            kwargs[name] = cls(**sub)
    kwargs.update({k: v for k, v in values.items() if "." not in k})
    return PretrainConfig(**kwargs).validate()


def save_config(config: PretrainConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
