"""Losses: adaptive GAN weight, hinge loss, PatchGAN layout, LPIPS loading without downloads."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models import losses
from models.losses import (DiscriminatorLoss, GeneratorLoss, LossWeights, PatchDiscriminator,
                           adaptive_weight, hinge_d_loss, load_lpips)
from utils.errors import V2LError

AUTHORS_KEYS = Path(__file__).parent / "fixtures" / "v2l_authors_checkpoint_keys.json"


def test_adaptive_weight_matches_hand_computation():
    w = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    rec, g = (w * a).sum(), (w * b).sum() ** 2          # d rec/dw = a, d g/dw = 2 (w.b) b
    got = adaptive_weight(rec, g, w, disc_weight=0.75)
    g_grad = 2 * (w.detach() * b).sum() * b
    expected = a.norm() / (g_grad.norm() + 1e-4) * 0.75
    assert torch.allclose(got, expected, rtol=1e-6)
    assert not got.requires_grad
    # the fp16 loss scale cancels out
    assert torch.allclose(adaptive_weight(rec, g, w, 0.75, grad_scale=1024.0), expected, rtol=1e-5)


def test_adaptive_weight_is_clamped():
    w = torch.randn(3, requires_grad=True)
    rec, g = (w * 1e3).sum(), (w * 0.0).sum()           # zero GAN gradient: ratio 1e3 * sqrt(3) / 1e-4
    assert adaptive_weight(rec, g, w, 0.75).item() == pytest.approx(1e4 * 0.75)


def test_adaptive_weight_of_overflowing_scaled_gradients_is_nan():
    """A loss scale that overflows either last-layer gradient (or its norm) gives NaN, never
    inf / inf or a finite number clamped from an overflow: the step is then skipped as for
    overflowing gradients (engine/train.py)."""
    w = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    rec, g = (w * a).sum(), (w * b).sum()
    assert torch.isfinite(adaptive_weight(rec, g, w, 0.75, grad_scale=2.0 ** 16))
    assert torch.isnan(adaptive_weight(rec, g, w, 0.75, grad_scale=3e38))       # both overflow
    assert torch.isnan(adaptive_weight(rec * 1e6, g, w, 0.75, grad_scale=1e17))  # the numerator
    assert torch.isnan(adaptive_weight(rec, g * 1e6, w, 0.75, grad_scale=1e17))  # the denominator


def test_hinge_d_loss_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])               # relu(1 - x): 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0])                    # relu(1 + x): 0, 1 -> mean 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 0.5))


def test_discriminator_has_the_authors_names_and_shapes():
    keys = json.loads(AUTHORS_KEYS.read_text())
    theirs = {k: v for k, v in keys.items() if k.startswith("discriminator.")}
    ours = {k: list(v.shape) for k, v in DiscriminatorLoss().state_dict().items()}
    assert ours == theirs
    assert PatchDiscriminator()(torch.zeros(2, 3, 128, 128)).shape == (2, 1, 30, 30)


def test_discriminator_loss_trains_only_the_discriminator():
    disc = DiscriminatorLoss(ndf=8)
    fake = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = disc(torch.randn(2, 3, 32, 32), fake)
    out["d_loss"].backward()
    assert fake.grad is None
    assert all(p.grad is not None for p in disc.parameters())


class L2Perceptual(nn.Module):
    """A stand-in perceptual distance for tests (LPIPS needs downloaded VGG weights)."""

    def forward(self, a, b):
        return ((a - b) ** 2).mean(dim=(1, 2, 3), keepdim=True)


def test_generator_loss_terms_and_gan_switch():
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1)
    feats = torch.randn(2, 4, 16, 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    disc = PatchDiscriminator(ndf=8, n_layers=1)
    vq = torch.tensor(0.25)
    gl = GeneratorLoss(LossWeights(disc_start=5), perceptual=L2Perceptual())
    rec = last(feats)
    total, logs = gl(x, rec, vq, step=4, discriminator=disc, last_layer=last.weight)
    l1 = (x - rec).abs().mean()
    p = ((x - rec) ** 2).mean()
    assert "g_loss" not in logs
    assert torch.allclose(total, l1 + 1.0 * vq + 0.1 * p)
    rec = last(feats)
    total, logs = gl(x, rec, vq, step=5, discriminator=disc, last_layer=last.weight)
    g = -disc(rec).mean()
    w = adaptive_weight(l1 + 0.1 * p, g, last.weight, 0.75)
    assert logs["adaptive_w"] == pytest.approx(w.item(), rel=1e-5)
    assert torch.allclose(total, l1 + vq + 0.1 * p + w * g, atol=1e-6)


def test_l2_weight_adds_the_squared_error_and_is_off_by_default():
    torch.manual_seed(0)
    x, rec = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    vq = torch.tensor(0.5)
    l1, mse = (x - rec).abs().mean(), ((x - rec) ** 2).mean()
    total, logs = GeneratorLoss(LossWeights(perceptual_weight=0.0))(x, rec, vq, step=0)
    assert torch.allclose(total, l1 + vq) and "mse" not in logs
    total, logs = GeneratorLoss(LossWeights(perceptual_weight=0.0, l2_weight=4.0))(x, rec, vq, step=0)
    assert torch.allclose(total, l1 + 4.0 * mse + vq)
    assert torch.allclose(logs["mse"], mse)


def test_perceptual_weight_needs_a_net():
    with pytest.raises(V2LError, match="perceptual_weight 0"):
        GeneratorLoss(LossWeights(perceptual_weight=0.1), perceptual=None)
    assert GeneratorLoss(LossWeights(perceptual_weight=0.0), perceptual=None).perceptual is None


def _no_download(*a, **k):
    raise AssertionError("a download was attempted")


def test_lpips_missing_vgg_weights_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    with pytest.raises(V2LError) as e:
        load_lpips()
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "--perceptual_weight 0" in msg and "\n" not in msg


def _fake_vgg_file(path: Path, layers: int = 30) -> dict:
    """A torchvision-layout VGG16 'features' state dict with random weights."""
    from torchvision.models.vgg import cfgs, make_layers
    feats = make_layers(cfgs["D"])                      # vgg16().features without the classifier
    state = {f"features.{k}": v for k, v in feats.state_dict().items() if int(k.split(".")[0]) < layers}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_lpips_loads_the_cached_trunk_and_the_shipped_heads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    state = _fake_vgg_file(losses.vgg16_weights_path())
    net = load_lpips()
    assert torch.equal(net.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(getattr(net.net.slice5, "28").bias, state["features.28.bias"])
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    d = net(x, x.flip(-1))
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    assert net(x, x).abs().max() < 1e-6
    # a file that is not a VGG16 is refused, not half-loaded
    _fake_vgg_file(losses.vgg16_weights_path(), layers=20)
    with pytest.raises(V2LError, match="not torchvision's VGG16"):
        load_lpips()


def test_lpips_dropout_while_training_is_the_authors_choice():
    """With ``perceptual_dropout`` (the authors': LPIPS inside the trained model) the LPIPS
    term is stochastic, its dropout on; without, it is the calibrated deterministic metric."""
    net = losses.freeze(losses.lpips_random_trunk())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    vq = torch.tensor(0.0)
    values = {}
    for dropout in (True, False):
        loss = GeneratorLoss(LossWeights(disc_start=10 ** 9), perceptual=net,
                             perceptual_dropout=dropout)
        torch.manual_seed(0)
        values[dropout] = [float(loss(x, rec, vq, step=0)[1]["lpips"]) for _ in range(3)]
        assert net.training == dropout
        assert not any(p.requires_grad for p in net.parameters())
    assert len(set(values[True])) == 3                   # a new dropout mask every call
    assert len(set(values[False])) == 1
    assert values[False][0] == pytest.approx(float(net.eval()(x, rec).mean()), rel=1e-6)
