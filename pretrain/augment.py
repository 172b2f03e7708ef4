"""Augmentations that teach the encoder what does *not* identify a neuron.

Each augmentation acts on a batch (``waveform [B, T, K]`` in microvolts, ``offsets [B, K, 2]``,
``mask [B, K]``), is applied to each event independently with its own probability, draws its
randomness from an explicit ``torch.Generator`` (so a resumed run replays them exactly) and leaves
padded channels (mask False) at zero. :class:`Augmenter` chains them in a fixed order:

1. ``overlap``: a second spike, another event of the batch, time-shifted, scaled and placed at
   a random spatial displacement (its channels land on ours by nearest offset), added last;
2. ``amplitude``: scale the whole event by a log-uniform factor;
3. ``jitter``: shift by a fraction of a sample (exact band-limited shift in the Fourier domain);
4. ``dropout``: mask out some channels, never the peak channel;
5. ``noise``: add Gaussian noise of a random level in microvolts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the augmentations (probability 0 disables one)."""

    noise_p: float = 0.8
    """Probability that an event gets additive Gaussian noise."""
    noise_std_uv: tuple[float, float] = (2.0, 10.0)
    """Noise standard deviation is drawn uniformly in this range, in microvolts."""
    noise_smooth_samples: int = 3
    """Length of a moving-average filter applied to the noise (1 = white); real noise after the
    band-pass is coloured. The std is restored after smoothing."""
    amplitude_p: float = 0.8
    """Probability that an event is scaled."""
    amplitude_range: tuple[float, float] = (0.8, 1.25)
    """Scale factor range (log-uniform). Keep it narrow: amplitude helps identify a unit."""
    jitter_p: float = 0.8
    """Probability of a sub-sample time shift."""
    jitter_max_samples: float = 1.0
    """Largest shift, in samples at the canonical rate (uniform in [-max, max])."""
    dropout_p: float = 0.5
    """Probability that an event loses channels."""
    dropout_channel_p: float = 0.25
    """Probability that each non-peak channel of an affected event is dropped."""
    overlap_p: float = 0.3
    """Probability that a second spike from another event of the batch is added."""
    overlap_shift_samples: tuple[int, int] = (6, 30)
    """Absolute time shift of the second spike, in samples (sign random)."""
    overlap_scale: tuple[float, float] = (0.2, 0.8)
    """Amplitude of the second spike relative to its own, uniform."""
    overlap_displacement_um: float = 40.0
    """Largest spatial displacement of the second spike's peak from ours, in micrometres."""
    overlap_match_um: float = 12.0
    """A channel of ours receives the second spike's channel nearest to it if within this distance."""

    def problems(self, prefix: str = "") -> list[str]:
        """Every invalid setting, each message naming its key."""
        p = []
        for f in fields(self):
            if f.name.endswith("_p") and not 0.0 <= getattr(self, f.name) <= 1.0:
                p.append(f"{prefix}{f.name} must be a probability in [0, 1], got {getattr(self, f.name)}")
        for name in ("noise_std_uv", "amplitude_range", "overlap_shift_samples", "overlap_scale"):
            v = getattr(self, name)
            if len(v) != 2 or not 0 <= v[0] <= v[1]:
                p.append(f"{prefix}{name} must be [low, high] with 0 <= low <= high, got {list(v)}")
        if self.amplitude_range[0] <= 0:
            p.append(f"{prefix}amplitude_range must be positive, got {list(self.amplitude_range)}")
        if self.noise_smooth_samples < 1:
            p.append(f"{prefix}noise_smooth_samples must be >= 1, got {self.noise_smooth_samples}")
        for name in ("jitter_max_samples", "overlap_displacement_um", "overlap_match_um"):
            if getattr(self, name) < 0:
                p.append(f"{prefix}{name} must be >= 0, got {getattr(self, name)}")
        return p


def _uniform(n: int, low: float, high: float, gen: torch.Generator | None, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def _chosen(n: int, p: float, gen: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p


def add_noise(
    waveform: torch.Tensor, mask: torch.Tensor, *, p: float, std_uv: tuple[float, float],
    smooth_samples: int = 1, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add Gaussian noise (std uniform in ``std_uv`` microvolts) to a fraction ``p`` of events."""
    B, T, K = waveform.shape
    dev = waveform.device
    noise = torch.randn(B, T, K, generator=generator, device=dev)
    if smooth_samples > 1:
        kernel = torch.ones(1, 1, smooth_samples, device=dev) / math.sqrt(smooth_samples)
        flat = noise.permute(0, 2, 1).reshape(B * K, 1, T)
        noise = torch.nn.functional.conv1d(flat, kernel, padding="same").reshape(B, K, T).permute(0, 2, 1)
    std = _uniform(B, *std_uv, generator, dev) * _chosen(B, p, generator, dev)
    return waveform + noise * std[:, None, None] * mask[:, None, :]


def scale_amplitude(
    waveform: torch.Tensor, *, p: float, scale_range: tuple[float, float], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multiply a fraction ``p`` of events by a log-uniform factor in ``scale_range``."""
    B = waveform.shape[0]
    dev = waveform.device
    log_s = _uniform(B, math.log(scale_range[0]), math.log(scale_range[1]), generator, dev)
    s = torch.where(_chosen(B, p, generator, dev), torch.exp(log_s), torch.ones_like(log_s))
    return waveform * s[:, None, None]


def fractional_shift(waveform: torch.Tensor, shift_samples: torch.Tensor) -> torch.Tensor:
    """Delay each event by ``shift_samples[b]`` samples (any real number) along T.

    A band-limited (sinc) shift computed in the Fourier domain; the window is treated as periodic,
    which is harmless for sub-sample shifts of events that start and end near zero.
    """
    B, T, K = waveform.shape
    spec = torch.fft.rfft(waveform.float(), dim=1)
    freqs = torch.fft.rfftfreq(T, device=waveform.device)  # cycles per sample
    phase = torch.exp(-2j * math.pi * freqs[None, :] * shift_samples[:, None].float())
    if T % 2 == 0:  # the Nyquist bin of a real signal must stay real: shift by its real part
        phase[:, -1] = torch.cos(math.pi * shift_samples.float()).to(phase.dtype)
    return torch.fft.irfft(spec * phase[:, :, None], n=T, dim=1).to(waveform.dtype)


def time_jitter(
    waveform: torch.Tensor, *, p: float, max_samples: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shift a fraction ``p`` of events by a uniform sub-sample delay in ``[-max, max]`` samples."""
    B = waveform.shape[0]
    dev = waveform.device
    shift = _uniform(B, -max_samples, max_samples, generator, dev) * _chosen(B, p, generator, dev)
    return fractional_shift(waveform, shift)


def channel_dropout(
    waveform: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor, *, p: float, channel_p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask out channels of a fraction ``p`` of events, each channel with probability ``channel_p``.

    The peak channel (index 0 by the schema, and the channel of largest |amplitude|) is never
    dropped. Dropped channels become padding: waveform and offsets zero, mask False.
    """
    B, T, K = waveform.shape
    dev = waveform.device
    drop = torch.rand(B, K, generator=generator, device=dev) < channel_p
    drop &= _chosen(B, p, generator, dev)[:, None]
    keep = torch.zeros(B, K, dtype=torch.bool, device=dev)
    keep[:, 0] = True
    peak = (waveform.abs() * mask[:, None, :]).amax(dim=1).argmax(dim=1)
    keep[torch.arange(B, device=dev), peak] = True
    new_mask = mask & ~(drop & ~keep)
    m = new_mask.to(waveform.dtype)
    return waveform * m[:, None, :], offsets * m[:, :, None], new_mask


def overlap_spike(
    waveform: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor, *, p: float,
    shift_samples: tuple[int, int], scale: tuple[float, float], displacement_um: float, match_um: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add a second spike to a fraction ``p`` of events.

    The second spike is another event of the batch (a random permutation), delayed by an integer
    shift of random sign (zero-filled, not wrapped), scaled, and displaced in space by a random
    vector of length <= ``displacement_um``: our channel at offset ``o`` receives the other event's
    channel nearest to ``o - displacement`` when that is within ``match_um``.
    """
    B, T, K = waveform.shape
    dev = waveform.device
    if B < 2:
        return waveform
    perm = (torch.arange(B, device=dev) + torch.randint(1, B, (B,), generator=generator, device=dev)) % B
    other_w, other_off, other_mask = waveform[perm], offsets[perm], mask[perm]
    # spatial placement: nearest of the other's channels to each of ours, after displacement
    angle = _uniform(B, 0.0, 2 * math.pi, generator, dev)
    radius = displacement_um * torch.sqrt(torch.rand(B, generator=generator, device=dev))
    disp = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    dist = torch.cdist((offsets - disp[:, None, :]).float(), other_off.float())  # [B, K_ours, K_other]
    dist = dist.masked_fill(~other_mask[:, None, :], float("inf"))
    nearest_d, nearest = dist.min(dim=2)
    placed = torch.gather(other_w, 2, nearest[:, None, :].expand(B, T, K))
    placed = placed * ((nearest_d <= match_um) & mask)[:, None, :]
    # temporal shift (integer, zero fill) and scale
    lo, hi = shift_samples
    mag = torch.randint(int(lo), int(hi) + 1, (B,), generator=generator, device=dev)
    sign = torch.where(torch.rand(B, generator=generator, device=dev) < 0.5, -1, 1)
    shift = mag * sign
    src = torch.arange(T, device=dev)[None, :] - shift[:, None]  # [B, T]
    valid = (src >= 0) & (src < T)
    shifted = torch.gather(placed, 1, src.clamp(0, T - 1)[:, :, None].expand(B, T, K)) * valid[:, :, None]
    amp = _uniform(B, *scale, generator, dev) * _chosen(B, p, generator, dev)
    return waveform + shifted * amp[:, None, None].to(waveform.dtype)


class View(NamedTuple):
    """One augmented view of a batch.

    ``waveform`` is what the encoder sees; ``clean`` is the same event after the transforms that
    keep it one clean spike (amplitude, jitter, dropout) but without the added noise and second
    spike: the denoising reconstruction target.
    """

    waveform: torch.Tensor
    clean: torch.Tensor
    offsets: torch.Tensor
    mask: torch.Tensor


class Augmenter:
    """Apply every augmentation of an :class:`AugmentConfig` to a batch, in a fixed order."""

    def __init__(self, config: AugmentConfig):
        problems = config.problems()
        if problems:
            raise ValueError("invalid augmentation config: " + "; ".join(problems))
        self.config = config

    def __call__(
        self, waveform: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> View:
        """Return an augmented :class:`View` of the batch; the inputs are not modified."""
        c = self.config
        w, off, m = waveform.float(), offsets.float(), mask.bool()
        w = w * m[:, None, :]
        second = None
        if c.overlap_p > 0:
            second = overlap_spike(
                w, off, m, p=c.overlap_p, shift_samples=c.overlap_shift_samples, scale=c.overlap_scale,
                displacement_um=c.overlap_displacement_um, match_um=c.overlap_match_um, generator=generator,
            ) - w
        if c.amplitude_p > 0:
            w = scale_amplitude(w, p=c.amplitude_p, scale_range=c.amplitude_range, generator=generator)
        if c.jitter_p > 0 and c.jitter_max_samples > 0:
            w = time_jitter(w, p=c.jitter_p, max_samples=c.jitter_max_samples, generator=generator)
        if c.dropout_p > 0 and c.dropout_channel_p > 0:
            w, off, m = channel_dropout(w, off, m, p=c.dropout_p, channel_p=c.dropout_channel_p, generator=generator)
        keep = m[:, None, :].to(w.dtype)
        clean = w * keep
        noisy = clean if second is None else clean + second * keep
        if c.noise_p > 0:
            noisy = add_noise(noisy, m, p=c.noise_p, std_uv=c.noise_std_uv, smooth_samples=c.noise_smooth_samples,
                              generator=generator)
        return View(noisy * keep, clean, off, m)
