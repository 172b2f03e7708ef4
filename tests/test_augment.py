"""Each augmentation does what it says, respects the mask and is reproducible."""

import math

import pytest
import torch

from pretrain.augment import (
    AugmentConfig,
    Augmenter,
    add_noise,
    channel_dropout,
    fractional_shift,
    overlap_spike,
    scale_amplitude,
    time_jitter,
)

T, K = 60, 12


def _spikes(B=64, n_valid=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=torch.float32)
    shape = -torch.exp(-0.5 * ((t - 24) / 2.0) ** 2) + 0.3 * torch.exp(-0.5 * ((t - 34) / 4.0) ** 2)
    decay = torch.exp(-torch.arange(K, dtype=torch.float32) / 3)
    amp = 50 + 200 * torch.rand(B, generator=g)
    w = amp[:, None, None] * shape[None, :, None] * decay[None, None, :]
    off = torch.stack([torch.zeros(K), torch.arange(K, dtype=torch.float32) * 20], dim=1).expand(B, K, 2).clone()
    mask = torch.zeros(B, K, dtype=torch.bool)
    mask[:, :n_valid] = True
    mask[: B // 4, 4:] = False  # some 4-channel (tetrode-like) events
    return w * mask[:, None, :], off * mask[:, :, None], mask


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def test_noise_level_range_and_mask():
    w, off, mask = _spikes()
    out = add_noise(w, mask, p=1.0, std_uv=(5.0, 5.0), generator=gen())
    added = (out - w)[mask[:, None, :].expand(-1, T, -1)]
    assert added.std().item() == pytest.approx(5.0, rel=0.05)
    assert torch.all(out[~mask[:, None, :].expand(-1, T, -1)] == 0)
    smooth = add_noise(w, mask, p=1.0, std_uv=(5.0, 5.0), smooth_samples=3, generator=gen())
    d = (smooth - w)[:, 5:-5][mask[:, None, :].expand(-1, T - 10, -1)]
    assert d.std().item() == pytest.approx(5.0, rel=0.08)
    assert torch.equal(add_noise(w, mask, p=0.0, std_uv=(5.0, 5.0), generator=gen()), w)


def test_amplitude_scaling_range():
    w, _, mask = _spikes()
    out = scale_amplitude(w, p=1.0, scale_range=(0.8, 1.25), generator=gen())
    ratio = out.abs().amax(dim=(1, 2)) / w.abs().amax(dim=(1, 2))
    assert ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.25 + 1e-5
    assert ratio.std() > 0.05
    shape_w = w / w.abs().amax(dim=(1, 2), keepdim=True)
    shape_o = out / out.abs().amax(dim=(1, 2), keepdim=True)
    assert torch.allclose(shape_w, shape_o, atol=1e-5)  # only the scale changes


def test_fractional_shift_is_exact():
    t = torch.arange(T, dtype=torch.float32)
    sine = torch.sin(2 * math.pi * 3 * t / T)[None, :, None].repeat(2, 1, 1)
    shifted = fractional_shift(sine, torch.tensor([0.37, -0.5]))
    expected = torch.stack([torch.sin(2 * math.pi * 3 * (t - d) / T) for d in (0.37, -0.5)])[:, :, None]
    assert torch.allclose(shifted, expected, atol=1e-5)
    w, _, _ = _spikes(B=4)
    one = fractional_shift(w, torch.ones(4))
    assert torch.allclose(one, torch.roll(w, 1, dims=1), atol=1e-3)
    back = fractional_shift(fractional_shift(w, torch.full((4,), 0.3)), torch.full((4,), -0.3))
    assert torch.allclose(back, w, atol=1e-3)


def test_time_jitter_moves_peak_by_subsample_amounts():
    w, _, mask = _spikes()
    out = time_jitter(w, p=1.0, max_samples=0.4, generator=gen())
    assert not torch.allclose(out, w)
    # the peak sample stays put for sub-sample shifts, the trough's centre of mass moves < 0.4
    assert torch.equal(out[:, :, 0].argmin(dim=1), w[:, :, 0].argmin(dim=1))
    t = torch.arange(T, dtype=torch.float32)

    def centre(x):
        weight = (-x[:, 14:34, 0]).clamp_min(0)
        return (weight * t[14:34]).sum(1) / weight.sum(1)

    moved = (centre(out) - centre(w)).abs()
    assert moved.max() < 0.45 and moved.mean() > 0.05
    # masked channels stay zero
    assert torch.allclose(out * (~mask[:, None, :]), torch.zeros_like(out), atol=1e-4)


def test_channel_dropout_never_drops_peak_channel():
    w, off, mask = _spikes(B=200)
    out_w, out_off, out_mask = channel_dropout(w, off, mask, p=1.0, channel_p=0.9, generator=gen())
    assert out_mask[:, 0].all()
    assert torch.all(out_mask <= mask)  # never adds channels
    assert (mask.sum() - out_mask.sum()) > 0.5 * (mask.sum() - mask.shape[0])
    dropped = mask & ~out_mask
    assert torch.all(out_w.permute(0, 2, 1)[dropped] == 0) and torch.all(out_off[dropped] == 0)
    kept = out_mask
    assert torch.equal(out_w.permute(0, 2, 1)[kept], w.permute(0, 2, 1)[kept])
    # the channel with the largest amplitude is protected even when it is not channel 0
    w2 = w.clone()
    w2[:, :, 2] *= 5
    _, _, m2 = channel_dropout(w2, off, mask, p=1.0, channel_p=1.0, generator=gen())
    assert m2[:, 2].all() and m2[:, 0].all() and m2.sum(1).max() == 2


def test_overlap_adds_a_shifted_other_spike():
    w, off, mask = _spikes(B=32)
    out = overlap_spike(w, off, mask, p=1.0, shift_samples=(10, 10), scale=(0.5, 0.5), displacement_um=0.0,
                        match_um=1.0, generator=gen())
    added = out - w
    assert torch.all(out[~mask[:, None, :].expand(-1, T, -1)] == 0)
    # each added spike is another event's waveform, scaled by 0.5 and moved by exactly 10 samples
    for b in range(32):
        a = added[b, :, 0]
        trough = int(a.argmin())
        assert trough in (24 - 10, 24 + 10)
        assert a.min() < -0.5 * 50 * 0.5 * 0.99
    none = overlap_spike(w, off, mask, p=0.0, shift_samples=(10, 10), scale=(0.5, 0.5), displacement_um=0.0,
                         match_um=1.0, generator=gen())
    assert torch.equal(none, w)


def test_augmenter_views_reproducible_and_clean_target():
    w, off, mask = _spikes()
    aug = Augmenter(AugmentConfig())
    v1, v2 = aug(w, off, mask, gen(3)), aug(w, off, mask, gen(3))
    for a, b in zip(v1, v2):
        assert torch.equal(a, b)
    v3 = aug(w, off, mask, gen(4))
    assert not torch.equal(v1.waveform, v3.waveform)
    # clean target: no noise / overlap, same channels as the view
    only_clean = Augmenter(AugmentConfig(noise_p=0, overlap_p=0))(w, off, mask, gen(3))
    assert torch.equal(only_clean.waveform, only_clean.clean)
    assert torch.all(v1.mask[:, 0]) and torch.all(v1.mask <= mask)
    assert torch.all(v1.waveform.permute(0, 2, 1)[~v1.mask] == 0)


def test_invalid_augment_config_names_the_key():
    with pytest.raises(ValueError, match="dropout_p.*probability"):
        Augmenter(AugmentConfig(dropout_p=1.5))
    with pytest.raises(ValueError, match="amplitude_range"):
        Augmenter(AugmentConfig(amplitude_range=(1.2, 0.8)))
