"""The probe-agnostic spike encoder: one set of weights for every probe.

An event is ``waveform [B, T, K]`` (microvolts), ``offsets [B, K, 2]`` (micrometres from the peak
channel) and ``mask [B, K]`` (False for padding channels of probes with fewer than K channels).

Encoder
    1. *Normalise* each event inside the model: divide by a scale in microvolts (the event's own
       peak absolute amplitude over its valid channels, or a fixed reference) and keep
       ``log(scale / amplitude_ref_uv)`` as a feature, so the spatial footprint and shape are
       amplitude-free but the amplitude itself still informs the latent.
    2. A *shared per-channel temporal encoder* (1-D CNN by default, GRU optional) turns each
       channel's trace into a token.
    3. Each token gets a *position encoding of its channel offset* (Fourier features of x, y);
       a small masked self-attention stack lets channels see each other, and masked *attention
       pooling* over channels gives one vector per event, independent of K and of the probe.
    4. A head maps it (plus the log-amplitude) to the latent mean and log-variance (VAE) or a
       point (AE).

Decoder
    The latent plus each channel's offset encoding -> that channel's normalised waveform, so a
    decoder can be asked for any channel layout.

This module imports only torch and ``spikevault.schema`` (no Lightning): the ``inference``
package loads these weights from ``model.safetensors`` + ``config.json``
(``SpikeVAE(ModelConfig.from_dict(json.load(...)))``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from spikevault.schema import DEFAULT_SCHEMA, EventSchema

BACKBONES = ("cnn", "gru")
VARIANTS = ("vae", "beta_vae", "ae")
NORMALIZATIONS = ("per_event", "fixed")


@dataclass
class ModelConfig:
    """Architecture of a :class:`SpikeVAE` plus the event schema it reads.

    Stored as ``config.json`` next to ``model.safetensors``; ``from_dict(to_dict())`` rebuilds
    the same architecture.
    """

    latent_dim: int = 10
    """Size of the latent (embedding) vector."""
    backbone: str = "cnn"
    """Per-channel temporal encoder: 'cnn' (1-D convolutions) or 'gru'."""
    variant: str = "vae"
    """'vae' or 'beta_vae' (Gaussian latent: mean + log-variance) or 'ae' (deterministic point)."""
    conv_channels: tuple[int, ...] = (16, 32, 32)
    """CNN backbone: output channels of each conv layer (every layer after the first has stride 2)."""
    kernel_size: int = 5
    """CNN backbone: temporal kernel size in samples (odd)."""
    gru_hidden: int = 32
    """GRU backbone: hidden size per direction (bidirectional, one layer)."""
    channel_dim: int = 64
    """Width of the per-channel tokens and of the attention over channels."""
    attention_heads: int = 4
    """Heads of the channel self-attention and of the attention pooling."""
    channel_layers: int = 1
    """Masked self-attention layers across the channels of an event before pooling (0 = none)."""
    position_frequencies: int = 6
    """Fourier frequencies per coordinate in the channel-offset encoding."""
    offset_scale_um: float = 100.0
    """Length scale of the offset encoding, in micrometres (lowest frequency has this period x 2)."""
    decoder_hidden: int = 128
    """Hidden width of the per-channel decoder MLP."""
    normalization: str = "per_event"
    """'per_event': divide each event by its peak |amplitude| over valid channels;
    'fixed': divide every event by amplitude_ref_uv."""
    amplitude_ref_uv: float = 100.0
    """Reference amplitude in microvolts (fixed scale; and the zero of the log-amplitude feature)."""
    use_log_amplitude: bool = True
    """Feed log(event amplitude / amplitude_ref_uv) to the latent head (amplitude identifies units)."""
    schema: dict = field(default_factory=DEFAULT_SCHEMA.to_dict)
    """The event schema (EventSchema.to_dict()) of the events this model reads."""

    def __post_init__(self) -> None:
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        if isinstance(self.schema, EventSchema):
            self.schema = self.schema.to_dict()
        problems = self.problems()
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def problems(self, prefix: str = "") -> list[str]:
        """Every invalid setting, each message naming its key (empty when valid)."""
        p = []
        if self.latent_dim < 1:
            p.append(f"{prefix}latent_dim must be >= 1, got {self.latent_dim}")
        if self.backbone not in BACKBONES:
            p.append(f"{prefix}backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.variant not in VARIANTS:
            p.append(f"{prefix}variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.normalization not in NORMALIZATIONS:
            p.append(f"{prefix}normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if not self.conv_channels or min(self.conv_channels) < 1:
            p.append(f"{prefix}conv_channels must be a non-empty list of positive ints, got {list(self.conv_channels)}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            p.append(f"{prefix}kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.channel_dim < 1 or self.attention_heads < 1 or self.channel_dim % self.attention_heads:
            p.append(
                f"{prefix}channel_dim ({self.channel_dim}) must be a positive multiple of "
                f"attention_heads ({self.attention_heads})"
            )
        for name in ("gru_hidden", "decoder_hidden", "position_frequencies"):
            if getattr(self, name) < 1:
                p.append(f"{prefix}{name} must be >= 1, got {getattr(self, name)}")
        if self.channel_layers < 0:
            p.append(f"{prefix}channel_layers must be >= 0, got {self.channel_layers}")
        for name in ("offset_scale_um", "amplitude_ref_uv"):
            if not getattr(self, name) > 0:
                p.append(f"{prefix}{name} must be > 0, got {getattr(self, name)}")
        try:
            EventSchema.from_dict(self.schema)
        except ValueError as err:
            p.append(f"{prefix}schema: {err}")
        return p

    @property
    def event_schema(self) -> EventSchema:
        return EventSchema.from_dict(self.schema)

    @property
    def num_samples(self) -> int:
        return self.event_schema.num_samples

    @property
    def num_channels(self) -> int:
        return self.event_schema.num_channels

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conv_channels"] = list(self.conv_channels)
        d["schema"] = dict(self.schema)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Rebuild a config; unknown keys are an error (a checkpoint from another architecture)."""
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}: this config.json was not written for this "
                f"SpikeVAE version (known keys: {sorted(known)})"
            )
        return cls(**d)


def event_scale(waveform: torch.Tensor, mask: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale that turns an event into model units, and its log-amplitude feature.

    Parameters
    ----------
    waveform : torch.Tensor
        ``[B, T, K]`` in microvolts.
    mask : torch.Tensor
        ``[B, K]`` bool.
    config : ModelConfig
        ``normalization`` and ``amplitude_ref_uv`` are used.

    Returns
    -------
    scale : torch.Tensor
        ``[B]`` microvolts per model unit: the event's peak |amplitude| over its valid channels
        (at least 1 uV) for ``per_event``, ``amplitude_ref_uv`` for ``fixed``.
    log_amplitude : torch.Tensor
        ``[B]`` ``log(peak |amplitude| / amplitude_ref_uv)``.
    """
    w = waveform.float() * mask[:, None, :].to(torch.float32)
    amp = w.abs().amax(dim=(1, 2)).clamp_min(1e-3)
    log_amp = torch.log(amp / config.amplitude_ref_uv)
    if config.normalization == "per_event":
        scale = amp.clamp_min(1.0)
    else:
        scale = torch.full_like(amp, config.amplitude_ref_uv)
    return scale, log_amp


# --------------------------------------------------------------------------- building blocks
class OffsetEncoding(nn.Module):
    """Fourier features of a channel's (x, y) offset from the peak channel -> ``channel_dim``."""

    def __init__(self, num_frequencies: int, scale_um: float, dim: int):
        super().__init__()
        self.scale_um = float(scale_um)
        freqs = math.pi * (2.0 ** torch.arange(num_frequencies, dtype=torch.float32)) / 2.0
        self.register_buffer("freqs", freqs, persistent=False)
        self.proj = nn.Sequential(nn.Linear(2 + 4 * num_frequencies, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:  # [B, K, 2] -> [B, K, dim]
        u = offsets.float() / self.scale_um
        ang = u[..., None] * self.freqs  # [B, K, 2, F]
        feats = torch.cat([u, torch.sin(ang).flatten(-2), torch.cos(ang).flatten(-2)], dim=-1)
        return self.proj(feats.to(self.proj[0].weight.dtype))


class CNNBackbone(nn.Module):
    """Shared 1-D CNN over the samples of one channel: ``[N, T] -> [N, dim]``."""

    def __init__(self, num_samples: int, conv_channels: tuple[int, ...], kernel_size: int, dim: int):
        super().__init__()
        layers, c_in, length = [], 1, num_samples
        for i, c_out in enumerate(conv_channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv1d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2), nn.GELU()]
            length = (length + 2 * (kernel_size // 2) - kernel_size) // stride + 1
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(c_in * length, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x[:, None, :]).flatten(1))


class GRUBackbone(nn.Module):
    """Shared bidirectional GRU over the samples of one channel: ``[N, T] -> [N, dim]``."""

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x[:, :, None])  # h: [2, N, hidden]
        return self.out(torch.cat([h[0], h[1]], dim=-1))


class ChannelBlock(nn.Module):
    """Pre-norm masked self-attention + MLP over the channels of an event."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        a = self.norm1(h)
        h = h + self.attn(a, a, a, key_padding_mask=pad, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class AttentionPool(nn.Module):
    """A learned query attends over the valid channels: ``[B, K, dim] -> [B, dim]``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        kv = self.norm(h)
        q = self.query.expand(h.shape[0], -1, -1).to(kv.dtype)
        # The padding as the additive attention mask MultiheadAttention makes of a
        # key_padding_mask (the same values, the same computation): its check of a
        # key_padding_mask's shape imports torch.fx's symbolic shapes, 0.5 s in every process.
        mask = torch.zeros(pad.shape, dtype=kv.dtype, device=kv.device).masked_fill_(pad, float("-inf"))
        mask = mask[:, None, None, :].expand(-1, self.attn.num_heads, -1, -1).reshape(-1, 1, pad.shape[1])
        return self.attn(q, kv, kv, attn_mask=mask, need_weights=False)[0][:, 0]


# --------------------------------------------------------------------------- the model
class SpikeVAE(nn.Module):
    """Probe-agnostic spike VAE / AE (see the module docstring for the architecture).

    Parameters
    ----------
    config : ModelConfig
        Architecture and event schema. ``model.config.to_dict()`` is what a checkpoint stores.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"SpikeVAE needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        c = config
        T, d = c.num_samples, c.channel_dim
        if c.backbone == "cnn":
            self.backbone = CNNBackbone(T, c.conv_channels, c.kernel_size, d)
        else:
            self.backbone = GRUBackbone(c.gru_hidden, d)
        self.offset_encoding = OffsetEncoding(c.position_frequencies, c.offset_scale_um, d)
        self.channel_blocks = nn.ModuleList(ChannelBlock(d, c.attention_heads) for _ in range(c.channel_layers))
        self.pool = AttentionPool(d, c.attention_heads)
        head_in = d + (1 if c.use_log_amplitude else 0)
        n_out = c.latent_dim * (1 if c.variant == "ae" else 2)
        self.head = nn.Sequential(nn.Linear(head_in, d), nn.GELU(), nn.Linear(d, n_out))
        # decoder: latent + offset encoding of each channel -> that channel's T samples
        self.decoder_latent = nn.Linear(c.latent_dim, d)
        self.decoder_offset = OffsetEncoding(c.position_frequencies, c.offset_scale_um, d)
        self.decoder = nn.Sequential(
            nn.GELU(),
            nn.Linear(d, c.decoder_hidden),
            nn.GELU(),
            nn.Linear(c.decoder_hidden, c.decoder_hidden),
            nn.GELU(),
            nn.Linear(c.decoder_hidden, T),
        )

    # ------------------------------------------------------------------ helpers
    @property
    def is_variational(self) -> bool:
        return self.config.variant != "ae"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_inputs(self, waveform: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor) -> None:
        T = self.config.num_samples
        if waveform.ndim != 3 or waveform.shape[1] != T:
            raise ValueError(
                f"waveform must be [batch, T={T}, K] (event schema of this model: "
                f"{self.config.event_schema}), got shape {tuple(waveform.shape)}"
            )
        B, _, K = waveform.shape
        if tuple(offsets.shape) != (B, K, 2):
            raise ValueError(f"offsets must be [batch, K, 2] = {(B, K, 2)}, got {tuple(offsets.shape)}")
        if tuple(mask.shape) != (B, K):
            raise ValueError(f"mask must be [batch, K] = {(B, K)}, got {tuple(mask.shape)}")

    def normalize(self, waveform: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale events to model units (see :func:`event_scale`).

        Returns
        -------
        x : torch.Tensor
            ``[B, T, K]`` float32 waveform divided by the event scale, zero on masked channels.
        log_amplitude : torch.Tensor
            ``[B]`` ``log(peak |amplitude| over valid channels / amplitude_ref_uv)``.
        """
        w = waveform.float() * mask[:, None, :].to(torch.float32)
        scale, log_amp = event_scale(w, mask, self.config)
        return w / scale[:, None, None], log_amp

    # ------------------------------------------------------------------ encoder / decoder
    def encode(
        self, waveform: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent mean and log-variance of events (log-variance is None for the AE variant).

        Parameters
        ----------
        waveform : torch.Tensor
            ``[B, T, K]`` in microvolts (any float dtype).
        offsets : torch.Tensor
            ``[B, K, 2]`` channel offsets from the peak channel in micrometres.
        mask : torch.Tensor
            ``[B, K]`` bool, True for real channels.
        """
        self._check_inputs(waveform, offsets, mask)
        mask = mask.bool()
        x, log_amp = self.normalize(waveform, mask)
        B, T, K = x.shape
        tokens = self.backbone(x.transpose(1, 2).reshape(B * K, T)).view(B, K, -1)
        h = tokens + self.offset_encoding(offsets).to(tokens.dtype)
        pad = ~mask
        for block in self.channel_blocks:
            h = block(h, pad)
        pooled = self.pool(h, pad)
        if self.config.use_log_amplitude:
            pooled = torch.cat([pooled, log_amp[:, None].to(pooled.dtype)], dim=-1)
        out = self.head(pooled).float()
        if not self.is_variational:
            return out, None
        mu, logvar = out.chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 8.0)

    def embed(self, waveform: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The embedding used for clustering: the latent mean ``[B, latent_dim]``.

        Gradients flow (fine-tuning uses this); wrap in ``torch.inference_mode()`` for inference.
        """
        return self.encode(waveform, offsets, mask)[0]

    def decode(self, z: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reconstruct the *normalised* waveforms ``[B, T, K]`` (model units, see ``normalize``)
        of the channels at ``offsets``; masked channels are zero."""
        h = self.decoder_latent(z)[:, None, :] + self.decoder_offset(offsets).to(z.dtype)
        out = self.decoder(h)  # [B, K, T]
        return out.transpose(1, 2) * mask[:, None, :].to(out.dtype)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
        if logvar is None or not self.training:
            return mu
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(
        self, waveform: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        """Encode, sample (training only) and decode.

        Returns a dict with ``mu``, ``logvar`` (None for the AE), ``z`` and ``recon``
        (``[B, T, K]`` in model units; compare with ``normalize(waveform, mask)[0]``).
        """
        mu, logvar = self.encode(waveform, offsets, mask)
        z = self.reparameterize(mu, logvar)
        return {"mu": mu, "logvar": logvar, "z": z, "recon": self.decode(z, offsets, mask.bool())}
