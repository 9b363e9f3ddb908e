"""Tokenizer training losses: LPIPS, PatchGAN discriminator, hinge loss, adaptive GAN weight.

Generator loss (the paper's tokenizer training, step 4 here; taming-transformers' VQGAN
recipe, its ``VQLPIPSWithDiscriminator``)::

    L1(x, x_rec) + codebook_weight * VQ + perceptual_weight * LPIPS(x, x_rec) + w * g_loss

(plus ``l2_weight * MSE(x, x_rec)`` when that weight is set: not the authors' loss, see
``LossWeights``)
with ``g_loss = -mean(D(x_rec))`` and the adaptive weight
``w = ||grad_last(L1 + perceptual_weight * LPIPS)|| / (||grad_last(g_loss)|| + 1e-4)``,
clamped to [0, 1e4] and multiplied by ``disc_weight``; ``grad_last`` is the
gradient w.r.t. the decoder's last conv weight. The GAN term (and the
discriminator's training) starts at iteration ``disc_start``.

LPIPS convention: our images are in [-1, 1], which is exactly what the
``lpips`` package expects with ``normalize=False`` (its ``normalize=True``
maps [0, 1] inputs to [-1, 1] first). Every call here passes [-1, 1] images
with ``normalize=False``. (The V2L authors' evaluation fed [-1, 1] images to
a metric configured for [0, 1]; this module does not.)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import V2LError

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_FILE
# torchvision's vgg16().features indices -> the lpips slice that holds them
_VGG_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)),
               (5, range(23, 30)))


def vgg16_weights_path() -> Path:
    """Where torchvision keeps the ImageNet VGG16 weights: <torch hub dir>/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def lpips_random_trunk() -> nn.Module:
    """lpips' VGG LPIPS net with its calibrated linear heads (shipped in the wheel) loaded and
    a randomly initialised trunk: ``pnet_rand=True`` builds torchvision's vgg16 without weights,
    so nothing is downloaded. ``load_lpips`` then loads the trunk; as it is, the net is only
    good for timing."""
    import lpips
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notice
        net = lpips.LPIPS(pretrained=True, net="vgg", version="0.1", pnet_rand=True, verbose=False)
    # lpips loads the heads with strict=False: make sure they really arrived
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth",
                       map_location="cpu", weights_only=True)
    own = net.state_dict()
    if not heads or any(k not in own or not torch.equal(own[k], v) for k, v in heads.items()):
        raise V2LError("lpips: the VGG linear heads shipped with the package did not load; "
                       "reinstall lpips (pip install --force-reinstall lpips==0.1.4)")
    return net


def load_lpips(device="cpu", vgg_path: str | Path | None = None) -> nn.Module:
    """The LPIPS(VGG) metric, frozen and in eval mode; call it as ``net(a, b)`` with both images
    in [-1, 1] (``normalize=False``, the default). Returns per-image distances [B, 1, 1, 1].

    The VGG16 trunk is torchvision's ImageNet checkpoint ``vgg16-397923af.pth`` read from
    ``vgg_path`` or the torch hub cache; it is never downloaded and never left random.
    """
    path = Path(vgg_path) if vgg_path else vgg16_weights_path()
    if not path.is_file():
        raise V2LError(
            f"LPIPS needs torchvision's ImageNet VGG16 weights: {path} not found; download "
            f"{VGG16_URL} and put it there (or set TORCH_HOME), or pass --perceptual_weight 0 "
            "to train without the LPIPS term")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download raises zip/pickle errors of many kinds
        raise V2LError(f"{path}: unreadable VGG16 checkpoint ({str(e).splitlines()[0]}); "
                       f"download {VGG16_URL} again")
    net = lpips_random_trunk()
    trunk = {}
    for s, idx in _VGG_SLICES:
        for i in idx:
            for p in ("weight", "bias"):
                if f"features.{i}.{p}" in state:
                    trunk[f"slice{s}.{i}.{p}"] = state[f"features.{i}.{p}"]
    expected = set(net.net.state_dict())
    if set(trunk) != expected:
        raise V2LError(f"{path}: not torchvision's VGG16 state dict (missing "
                       f"{sorted(expected - set(trunk))[:3]}); download {VGG16_URL} again")
    try:
        net.net.load_state_dict(trunk, strict=True)
    except RuntimeError as e:
        raise V2LError(f"{path}: VGG16 weights of the wrong shape ({str(e).splitlines()[-1]}); "
                       f"download {VGG16_URL} again")
    return freeze(net).to(device)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode (no dropout, fixed statistics) and no gradients for the module's weights."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (taming's NLayerDiscriminator layout, names ``main.N.*``).

    conv4x4/2 -> LeakyReLU, then ``n_layers`` conv4x4 blocks (stride 2 except the last,
    channels doubling up to 8 x ndf, BatchNorm, no conv bias), then conv4x4/1 -> 1 logit
    per patch. With n_layers 2 and 128 px input the output is a [B, 1, 30, 30] logit map.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class DiscriminatorLoss(nn.Module):
    """The discriminator and its hinge loss as one module, so DDP wraps a single forward.

    Real and fake images go through the discriminator separately (BatchNorm statistics
    per batch, as in taming). State-dict names: ``discriminator.main.N.*``.
    """

    def __init__(self, ndf: int = 64, n_layers: int = 2):
        super().__init__()
        self.discriminator = PatchDiscriminator(3, ndf, n_layers)

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        logits_real = self.discriminator(real.detach())
        logits_fake = self.discriminator(fake.detach())
        return {"d_loss": hinge_d_loss(logits_real, logits_fake),
                "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float, max_weight: float = 1e4, eps: float = 1e-4,
                    grad_scale: float = 1.0) -> torch.Tensor:
    """``disc_weight * clamp(||d rec/d W|| / (||d g/d W|| + eps), 0, max_weight)``, detached.

    ``grad_scale`` is the fp16 loss scale: both losses are scaled before differentiation so
    their gradients do not underflow, and the norms are divided by it again. When either
    scaled gradient (or its norm) overflows, the weight is NaN, not a ratio of infinities
    clamped to a finite number: the generator loss is then non-finite and the training step
    treats it as the GradScaler treats overflowing gradients (the step is skipped, the scale
    backs off; engine/train.py ``train_step``).
    """
    rec_grad = last_layer_grad(rec_loss * grad_scale, last_layer)
    g_grad = last_layer_grad(g_loss * grad_scale, last_layer)
    rec_norm, g_norm = rec_grad.float().norm() / grad_scale, g_grad.float().norm() / grad_scale
    w = (rec_norm / (g_norm + eps)).clamp(0.0, max_weight)
    w = torch.where(torch.isfinite(rec_norm) & torch.isfinite(g_norm), w, math.nan)
    return w.detach() * disc_weight


def last_layer_grad(loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """d loss / d last_layer, keeping the graph for the backward pass that follows."""
    return torch.autograd.grad(loss, last_layer, retain_graph=True)[0]


@dataclass
class LossWeights:
    """Defaults: the authors' recipe, as step4_train_tokenizer.py's constants give it (a test
    holds the two equal)."""
    codebook_weight: float = 1.0      # VQ loss
    # squared error added to L1 (0: the authors'). Without LPIPS, L1 alone weighs a pixel's
    # error by its sign only, so a small shape's colour counts for its few pixels and a short
    # training paints every shape in one average colour; the square weighs large errors more.
    l2_weight: float = 0.0
    perceptual_weight: float = 0.1    # LPIPS
    disc_weight: float = 0.75         # multiplies the adaptive GAN weight
    disc_start: int = 10000           # iteration at which the GAN term and D training start
    max_adaptive_weight: float = 1e4


class GeneratorLoss:
    """L1 + VQ + LPIPS + adaptive-weighted GAN term for the tokenizer.

    ``perceptual`` is the LPIPS net (``load_lpips``); it is required when
    ``perceptual_weight > 0`` and ignored otherwise. It is kept outside any module's
    state dict (it is frozen and reloaded, never trained or checkpointed).

    ``perceptual_dropout``: run the LPIPS net in training mode, so the dropout before its
    linear heads (p 0.5) is active. The authors' LPIPS module sits inside their trained
    model, so ``model.train()`` switches that dropout on; True reproduces it. False is
    the metric as calibrated (eval mode, deterministic).
    """

    def __init__(self, weights: LossWeights, perceptual: nn.Module | None = None,
                 perceptual_dropout: bool = False):
        if weights.perceptual_weight > 0 and perceptual is None:
            raise V2LError("perceptual_weight > 0 needs the LPIPS net (models.losses.load_lpips); "
                           "pass --perceptual_weight 0 to train without LPIPS")
        self.w = weights
        self.perceptual = perceptual if weights.perceptual_weight > 0 else None
        if self.perceptual is not None:
            self.perceptual.train(perceptual_dropout)   # its weights stay frozen either way

    def gan_active(self, step: int) -> bool:
        return self.w.disc_weight > 0 and step >= self.w.disc_start

    def __call__(self, x: torch.Tensor, rec: torch.Tensor, vq_loss: torch.Tensor, step: int,
                 discriminator: nn.Module | None = None, last_layer: torch.Tensor | None = None,
                 grad_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total generator loss and its detached terms. ``x`` and ``rec`` are in [-1, 1]."""
        diff = x.float() - rec.float()
        l1 = diff.abs().mean()
        rec_loss = l1
        logs = {"l1": l1.detach(), "vq": vq_loss.detach()}
        if self.w.l2_weight:
            mse = diff.square().mean()
            rec_loss = rec_loss + self.w.l2_weight * mse
            logs["mse"] = mse.detach()
        if self.perceptual is not None:
            p = self.perceptual(x.float(), rec.float()).mean()
            rec_loss = rec_loss + self.w.perceptual_weight * p
            logs["lpips"] = p.detach()
        total = rec_loss + self.w.codebook_weight * vq_loss
        if self.gan_active(step):
            g_loss = -discriminator(rec).float().mean()
            w = adaptive_weight(rec_loss, g_loss, last_layer, self.w.disc_weight,
                                self.w.max_adaptive_weight, grad_scale=grad_scale)
            total = total + w * g_loss
            logs |= {"g_loss": g_loss.detach(), "adaptive_w": w}
        logs["loss"] = total.detach()
        return total, logs
