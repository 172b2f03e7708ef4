"""The probe-agnostic SpikeVAE: shapes, variants, config round trip, channel-set invariances."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.model import ModelConfig, SpikeVAE, event_scale
from spikevault.schema import DEFAULT_SCHEMA, EventSchema

REPO = Path(__file__).resolve().parent.parent
T, K = DEFAULT_SCHEMA.num_samples, DEFAULT_SCHEMA.num_channels


def _batch(B=6, n_valid=(12, 12, 4, 4, 1, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(B, T, K, generator=g) * 20
    w[:, 24, 0] -= 150  # a negative peak on the peak channel
    off = torch.randn(B, K, 2, generator=g) * 40
    off[:, 0] = 0
    mask = torch.zeros(B, K, dtype=torch.bool)
    for b, n in enumerate(n_valid):
        mask[b, :n] = True
    w = w * mask[:, None, :]
    off = off * mask[:, :, None]
    return w, off, mask


def _tiny(**kw):
    base = dict(latent_dim=5, conv_channels=(4, 8), channel_dim=16, attention_heads=2, decoder_hidden=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("backbone", ["cnn", "gru"])
@pytest.mark.parametrize("variant", ["vae", "beta_vae", "ae"])
def test_shapes_and_variants(backbone, variant):
    model = SpikeVAE(_tiny(backbone=backbone, variant=variant)).eval()
    w, off, mask = _batch()
    mu, logvar = model.encode(w, off, mask)
    assert mu.shape == (6, 5)
    assert (logvar is None) == (variant == "ae")
    out = model(w, off, mask)
    assert out["recon"].shape == (6, T, K)
    # padded channels are reconstructed as exactly zero
    assert torch.all(out["recon"][~mask[:, None, :].expand(-1, T, -1)] == 0)
    assert torch.equal(model.embed(w, off, mask), mu)
    assert torch.isfinite(out["recon"]).all()


def test_default_model_is_small():
    model = SpikeVAE(ModelConfig())
    n = model.num_parameters()
    assert 20_000 < n < 500_000, n


def test_padding_content_and_channel_order_do_not_matter():
    """One set of weights for every probe: the embedding depends on the *set* of valid channels
    (waveform + offset), not on what sits in padded slots nor on the order of the channels."""
    model = SpikeVAE(_tiny()).eval()
    w, off, mask = _batch()
    with torch.no_grad():
        ref = model.embed(w, off, mask)
        junk = w + torch.randn_like(w) * 100 * (~mask[:, None, :])
        assert torch.allclose(model.embed(junk, off, mask), ref, atol=1e-5)
        perm = torch.tensor([0, 3, 1, 2, 7, 5, 6, 4, 8, 11, 10, 9])
        perm_emb = model.embed(w[:, :, perm], off[:, perm], mask[:, perm])
        assert torch.allclose(perm_emb, ref, atol=1e-4)


def test_normalisation_keeps_amplitude_as_a_feature():
    cfg = _tiny()
    model = SpikeVAE(cfg).eval()
    w, off, mask = _batch()
    scale, log_amp = event_scale(w, mask, cfg)
    assert torch.allclose(scale, (w.abs() * mask[:, None, :]).amax(dim=(1, 2)))
    x, _ = model.normalize(w, mask)
    assert torch.allclose(x.abs().amax(dim=(1, 2)), torch.ones(6))
    with torch.no_grad():  # doubling the amplitude only changes the log-amplitude input
        a, b = model.embed(w, off, mask), model.embed(2 * w, off, mask)
    assert not torch.allclose(a, b)
    no_amp = SpikeVAE(_tiny(use_log_amplitude=False)).eval()
    with torch.no_grad():
        assert torch.allclose(no_amp.embed(w, off, mask), no_amp.embed(2 * w, off, mask), atol=1e-5)


def test_config_round_trip_and_errors():
    cfg = _tiny(backbone="gru", variant="ae", schema=EventSchema(num_channels=4))
    d = json.loads(json.dumps(cfg.to_dict()))
    again = ModelConfig.from_dict(d)
    assert again == cfg and again.num_channels == 4
    m1, m2 = SpikeVAE(cfg), SpikeVAE(again)
    assert {k: v.shape for k, v in m1.state_dict().items()} == {k: v.shape for k, v in m2.state_dict().items()}
    with pytest.raises(ValueError, match="unknown model config keys \\['latent'\\]"):
        ModelConfig.from_dict({**d, "latent": 3})
    with pytest.raises(ValueError, match="backbone.*transformer"):
        ModelConfig(backbone="transformer")
    with pytest.raises(ValueError, match="channel_dim"):
        ModelConfig(channel_dim=10, attention_heads=4)


def test_wrong_input_shape_is_a_clear_error():
    model = SpikeVAE(_tiny())
    w, off, mask = _batch()
    with pytest.raises(ValueError, match="T=60"):
        model.encode(w[:, :50], off, mask)
    with pytest.raises(ValueError, match="offsets"):
        model.encode(w, off[:, :, :1], mask)


def test_inference_model_imports_without_lightning():
    code = (
        "import sys, inference.model as m; m.SpikeVAE(m.ModelConfig()); "
        "bad = [k for k in sys.modules if k.split('.')[0] in ('lightning', 'lightning_fabric', 'webdataset', 'datasets')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
