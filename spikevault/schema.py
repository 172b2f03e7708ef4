"""The spike event schema: the one contract shared by shards, manifests, checkpoints and cards.

One event is one detected spike: a ``[T, K]`` float16 waveform in microvolts (T samples at the
canonical rate, K channels nearest the peak channel, peak channel first), the channels' offsets
from the peak channel, a mask for probes with fewer than K channels, and per-event metadata.

Everything that stores or consumes events carries ``EventSchema.to_dict()`` and checks it with
``EventSchema.check_compatible`` so that a mismatch fails loudly instead of silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

SCHEMA_VERSION = 1


class SchemaMismatchError(ValueError):
    """Raised when events, a corpus or a model were made with an incompatible event schema."""


@dataclass(frozen=True)
class EventSchema:
    """Shape and sampling of a spike event.

    Parameters
    ----------
    sampling_rate_hz : float
        Canonical sampling rate; events from recordings at another rate are resampled to it.
    ms_before : float
        Window before the peak, in milliseconds.
    ms_after : float
        Window after the peak, in milliseconds (the peak sample itself counts as "after").
    num_channels : int
        K, the number of channels nearest the peak channel kept per event.
    version : int
        Schema version; bumped whenever field names, dtypes or semantics change.
    """

    sampling_rate_hz: float = 30_000.0
    ms_before: float = 0.8
    ms_after: float = 1.2
    num_channels: int = 12
    version: int = SCHEMA_VERSION

    @property
    def nbefore(self) -> int:
        """Samples before the peak at the canonical rate."""
        return int(round(self.ms_before * self.sampling_rate_hz / 1000.0))

    @property
    def nafter(self) -> int:
        """Samples from the peak (inclusive) to the end of the window at the canonical rate."""
        return int(round(self.ms_after * self.sampling_rate_hz / 1000.0))

    @property
    def num_samples(self) -> int:
        """T, the number of samples of a waveform."""
        return self.nbefore + self.nafter

    # ------------------------------------------------------------------ fields
    def array_fields(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Numeric per-event fields: name -> (dtype, per-event shape)."""
        T, K = self.num_samples, self.num_channels
        return {
            "waveform": (np.dtype("float16"), (T, K)),
            "channel_offsets_um": (np.dtype("float32"), (K, 2)),
            "channel_mask": (np.dtype("bool"), (K,)),
            "segment": (np.dtype("int32"), ()),
            "sample_index": (np.dtype("int64"), ()),
            "amplitude_uv": (np.dtype("float32"), ()),
            "noise_level_uv": (np.dtype("float32"), ()),
            "unit_label": (np.dtype("int64"), ()),
            "sampling_rate_hz": (np.dtype("float32"), ()),
        }

    @staticmethod
    def string_fields() -> tuple[str, ...]:
        """Per-event string fields (stored as numpy unicode arrays in memory)."""
        return ("recording_id", "peak_channel_id", "label_source", "probe")

    def field_names(self) -> tuple[str, ...]:
        return tuple(self.array_fields()) + self.string_fields()

    # ------------------------------------------------------------ blocks
    def empty_block(self) -> dict[str, np.ndarray]:
        """A block with zero events, every field present with the right dtype and shape."""
        block = {name: np.zeros((0, *shape), dtype=dt) for name, (dt, shape) in self.array_fields().items()}
        for name in self.string_fields():
            block[name] = np.zeros(0, dtype="U1")
        return block

    def validate_block(self, block: dict[str, np.ndarray], where: str = "event block") -> int:
        """Check a block of events against the schema; return its number of events.

        Raises ``SchemaMismatchError`` naming the field and what was expected.
        """
        missing = [n for n in self.field_names() if n not in block]
        if missing:
            raise SchemaMismatchError(f"{where}: missing fields {missing} (schema v{self.version})")
        n = len(block["waveform"])
        problems = []
        for name, (dt, shape) in self.array_fields().items():
            arr = block[name]
            if arr.dtype != dt:
                problems.append(f"{name}: dtype {arr.dtype}, expected {dt}")
            if tuple(arr.shape) != (n, *shape):
                problems.append(f"{name}: shape {tuple(arr.shape)}, expected {(n, *shape)}")
        for name in self.string_fields():
            arr = block[name]
            if arr.dtype.kind != "U" or arr.shape != (n,):
                problems.append(f"{name}: expected a unicode array of shape ({n},), got {arr.dtype} {arr.shape}")
        if problems:
            raise SchemaMismatchError(f"{where} does not match event schema v{self.version}: " + "; ".join(problems))
        return n

    # ------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_samples"] = self.num_samples
        d["nbefore"] = self.nbefore
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EventSchema":
        if not isinstance(d, dict) or "version" not in d:
            raise SchemaMismatchError(f"not an event schema (no 'version'): {d!r}")
        if d["version"] != SCHEMA_VERSION:
            raise SchemaMismatchError(
                f"event schema version {d['version']} is not supported by this spikevault "
                f"(which reads version {SCHEMA_VERSION}); rebuild the corpus or upgrade spikevault"
            )
        names = {f.name for f in fields(cls)}
        schema = cls(**{k: v for k, v in d.items() if k in names})
        for derived in ("num_samples", "nbefore"):
            if derived in d and d[derived] != getattr(schema, derived):
                raise SchemaMismatchError(f"event schema {derived}={d[derived]} disagrees with its own parameters")
        return schema

    def check_compatible(self, other: "EventSchema", what: str = "data", expected_by: str = "this model") -> None:
        """Raise ``SchemaMismatchError`` unless ``other`` describes the same events as ``self``."""
        diffs = []
        for name in ("version", "sampling_rate_hz", "num_channels"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                diffs.append(f"{name}={b} (expected {a})")
        if (self.nbefore, self.num_samples) != (other.nbefore, other.num_samples):
            diffs.append(
                f"window {other.nbefore}+{other.nafter} samples (expected {self.nbefore}+{self.nafter}, "
                f"i.e. ms_before={self.ms_before}, ms_after={self.ms_after})"
            )
        if diffs:
            raise SchemaMismatchError(
                f"{what} uses an event schema that {expected_by} cannot read: " + ", ".join(diffs)
                + ". Re-extract the events with the matching schema (spikevault build --schema ...) "
                "or use a model trained on this schema."
            )


DEFAULT_SCHEMA = EventSchema()


def concat_blocks(blocks: list[dict[str, np.ndarray]], schema: EventSchema = DEFAULT_SCHEMA) -> dict[str, np.ndarray]:
    """Concatenate event blocks field by field (an empty list gives an empty block)."""
    blocks = [b for b in blocks if len(b["waveform"])]
    if not blocks:
        return schema.empty_block()
    return {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}


def slice_block(block: dict[str, np.ndarray], sl) -> dict[str, np.ndarray]:
    """Index every field of a block with the same slice, mask or index array."""
    return {name: arr[sl] for name, arr in block.items()}
