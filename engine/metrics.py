"""Reconstruction metrics: PSNR and SSIM on Y, LPIPS (VGG), FID, Inception Score, codebook usage.

Two protocols. ``standard`` (below) is this project's. ``authors`` reproduces the
metric code of the paper's evaluation script, to compare with its table:

- no rounding to 8 bits: PSNR-Y on the float images;
- SSIM: piq's ``ssim`` on RGB in [0, 1] (11x11 Gaussian window, sigma 1.5, data range 1);
- LPIPS: pyiqa's (AlexNet, v0.1) fed images in [-1, 1] while it expects [0, 1]
  (it maps x -> 2x - 1, so it sees [-3, 1]), as their script does;
- IS: torchvision's ``inception_v3`` (ImageNet weights, ``transform_input=False``) on
  the unnormalised [-1, 1] reconstructions, bilinearly resized to 299, softmax over 1000
  classes, 10 contiguous splits of N // 10 images (the last N mod 10 dropped);
- FID: as standard. Deviation: the TF-Inception extractor takes 8-bit images, so FID's
  inputs are still rounded (theirs are not); the effect is below one grey level.

Conventions of the standard protocol (the same for every evaluation in this project):

- Images come in as float tensors [B, 3, H, W] in [-1, 1] and are first
  quantised to 8 bits, ``round((x + 1) * 127.5)``, as if both were read back
  from PNG files; every metric sees these 8-bit images.
- PSNR and SSIM are computed on the luma channel Y of ITU-R BT.601 as in the
  common super-resolution code: with R, G, B scaled to [0, 1],
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (range [16, 235]), peak 255,
  no border crop, averaged over images. Identical images count as 100 dB.
- SSIM: Gaussian window 11x11 with sigma 1.5, K1 = 0.01, K2 = 0.03, data
  range 255, population (not sample) covariances, mean of the SSIM map over
  the positions where the whole window fits in the image (what
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255)`` returns).
- LPIPS: the VGG variant, fed images in [-1, 1] (``normalize=False``), the
  range the LPIPS network expects; mean over images.
- FID and IS use the TF-Inception (2015-12-05) weights of pytorch-fid /
  torch-fidelity through torch-fidelity's ``inception-v3-compat`` extractor:
  FID on the 2048-d pool features (real vs reconstructed), IS on the
  reconstructions' 1008-way logits, 10 splits. Without the weights file the
  two are skipped by name, with the reason; numbers from random weights are
  never reported.
- Codebook usage: how many distinct local codes were used, that count over
  the codebook size, and the perplexity (exp of the entropy) of the histogram.

Everything streams: an accumulator keeps only sums (float64 first and second
moments for FID, per-split sums for IS), allocated up front at sizes its
settings fix, so its state is small, can be saved to resume, and adds up
across processes. :class:`MetricsAccumulator` holds the sums and the steps
both protocols share; :class:`StandardMetrics` and :class:`AuthorsMetrics`
each say what their protocol measures; :func:`ReconstructionMetrics` makes
the one a protocol name asks for.
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from utils.errors import V2LError

PSNR_IDENTICAL_DB = 100.0
INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth",   # torch-fidelity's name
                   "pt_inception-2015-12-05-6726825d.pth")        # pytorch-fid's name
ALL_METRICS = ("psnr", "ssim", "lpips", "fid", "is", "codebook")
PROTOCOLS = ("authors", "standard")
TV_INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"   # torchvision's IMAGENET1K_V1 weights
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"                # torchvision's IMAGENET1K_V1 weights
PYIQA_LPIPS_FILE = "LPIPS_v0.1_alex-df73285e.pth"        # pyiqa's LPIPS (AlexNet, v0.1) heads
INCEPTION_POOL_DIM, INCEPTION_LOGITS = 2048, 1008        # TF-Inception: FID features, IS logits
TV_INCEPTION_CLASSES = 1000                              # torchvision's inception_v3: IS logits


# ----------------------------------------------------------------------------- pixels

def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 images (round half up, clamped)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch.uint8)


def rgb_to_y(x255: torch.Tensor) -> torch.Tensor:
    """RGB [B, 3, H, W] in [0, 255] -> BT.601 luma [B, 1, H, W] in [16, 235] (float64)."""
    w = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64, device=x255.device)
    return 16.0 + torch.einsum("bchw,c->bhw", x255.double() / 255.0, w)[:, None]


def psnr_y(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) on Y between uint8 RGB batches [B, 3, H, W]; identical -> 100 dB."""
    mse = (rgb_to_y(real) - rgb_to_y(fake)).pow(2).flatten(1).mean(1)
    psnr = 10.0 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-300))
    return torch.where(mse == 0, torch.full_like(psnr, PSNR_IDENTICAL_DB), psnr)


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_y(real: torch.Tensor, fake: torch.Tensor, win_size: int = 11, sigma: float = 1.5,
           k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM on Y between uint8 RGB batches [B, 3, H, W] (Gaussian window, valid part)."""
    x, y = rgb_to_y(real), rgb_to_y(fake)
    if min(x.shape[-2:]) < win_size:
        raise V2LError(f"SSIM needs images of at least {win_size}x{win_size} pixels, "
                       f"got {tuple(x.shape[-2:])}")
    g = _gaussian_window(win_size, sigma, x.device)

    def blur(t):  # separable valid convolution
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        return F.conv2d(t, g.view(1, 1, -1, 1))

    c1, c2 = (k1 * 255) ** 2, (k2 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def ssim_piq(real01: torch.Tensor, fake01: torch.Tensor) -> torch.Tensor:
    """The authors' SSIM: piq's ``ssim`` on RGB images in [0, 1] (its defaults: 11x11
    Gaussian window, sigma 1.5), per image."""
    import piq
    return piq.ssim(fake01.float(), real01.float(), data_range=1.0, reduction="none").double()


# ----------------------------------------------------------------------------- FID

class GaussianStats:
    """Streaming mean and covariance of feature vectors (float64 sums, no features kept)."""

    def __init__(self, n: torch.Tensor, sum_: torch.Tensor, outer: torch.Tensor):
        self.n, self.sum, self.outer = n, sum_, outer  # updated in place

    @classmethod
    def zeros(cls, dim: int, device="cpu") -> "GaussianStats":
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros((), **z), torch.zeros(dim, **z), torch.zeros(dim, dim, **z))

    def update(self, feats: torch.Tensor) -> None:
        f = feats.to(self.sum.device, torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased covariance (as numpy.cov, which pytorch-fid uses)."""
        n = self.n.item()
        if n < 2:
            raise V2LError(f"FID needs at least 2 images per side, got {int(n)}")
        mu = self.sum / n
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu, (cov + cov.T) / 2


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64.

    tr sqrt(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2,
    which equal those of the symmetric PSD matrix R^T S2 R for any R with
    R R^T = S1: the Cholesky factor when S1 is positive definite (cheap), else
    the symmetric square root of S1 (fewer images than dimensions). Only
    symmetric eigenvalues are needed, no general matrix square root, and
    round-off negatives are clipped to 0.
    """
    mu1, mu2, cov1, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, cov1, cov2))
    r, info = torch.linalg.cholesky_ex(cov1)
    if info.item() != 0:
        r = _sqrt_psd(cov1)
    middle = r.T @ cov2 @ r
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + cov1.trace() + cov2.trace() - 2 * tr_sqrt)


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets [N, D] (plain helper over :class:`GaussianStats`)."""
    a, b = GaussianStats.zeros(real.shape[1]), GaussianStats.zeros(fake.shape[1])
    a.update(real)
    b.update(fake)
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


# ----------------------------------------------------------------------------- IS

class InceptionScoreStats:
    """Streaming Inception Score: images go to split ``index % splits`` (or, given the total
    ``n_total``, to contiguous splits of n_total // splits images, the rest dropped); per
    split the count, the sum of class probabilities and the sum of sum_c p log p are kept."""

    def __init__(self, n: torch.Tensor, p_sum: torch.Tensor, plogp_sum: torch.Tensor,
                 n_total: int | None = None):
        self.n, self.p_sum, self.plogp_sum = n, p_sum, plogp_sum  # [splits], [splits, C], [splits]
        self.splits = n.numel()
        self.n_total = n_total

    @classmethod
    def zeros(cls, n_classes: int, splits: int = 10, device="cpu") -> "InceptionScoreStats":
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(splits, **z), torch.zeros(splits, n_classes, **z),
                   torch.zeros(splits, **z))

    def update(self, logits: torch.Tensor, index: torch.Tensor) -> None:
        dev = self.n.device
        log_p = torch.log_softmax(logits.to(dev, torch.float64), dim=1)
        p = log_p.exp()
        index = index.to(dev).long()
        if self.n_total is None:
            split = index % self.splits
        else:
            size = self.n_total // self.splits
            if size == 0:
                raise V2LError(f"contiguous Inception Score splits need at least {self.splits} "
                               f"images, got {self.n_total}")
            keep = index < size * self.splits
            log_p, p, split = log_p[keep], p[keep], index[keep] // size
        self.n.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        self.p_sum.index_add_(0, split, p)
        self.plogp_sum.index_add_(0, split, (p * log_p).sum(1))

    def compute(self) -> tuple[float, float]:
        """(mean, std) over the non-empty splits of exp(E_x KL(p(y|x) || p(y)))."""
        keep = self.n > 0
        n, p_sum, plogp = self.n[keep], self.p_sum[keep], self.plogp_sum[keep]
        if n.numel() == 0:
            raise V2LError("Inception Score needs at least one image")
        p_mean = p_sum / n[:, None]
        kl = plogp / n - torch.special.xlogy(p_mean, p_mean).sum(1)
        scores = kl.exp()
        return float(scores.mean()), float(scores.std(unbiased=False))


def inception_score(logits: torch.Tensor, splits: int = 10,
                    contiguous: bool = False) -> tuple[float, float]:
    """IS (mean, std) of logits [N, C]; image i goes to split i % splits, or with
    ``contiguous`` to split i // (N // splits) (the last N mod splits images dropped)."""
    stats = InceptionScoreStats.zeros(logits.shape[1], splits)
    stats.n_total = logits.shape[0] if contiguous else None
    stats.update(logits, torch.arange(logits.shape[0]))
    return stats.compute()


# ----------------------------------------------------------------------------- codebook

def codebook_usage(counts: torch.Tensor) -> dict:
    """Distinct codes used, fraction of the codebook, perplexity of the histogram."""
    counts = counts.double()
    total = counts.sum()
    q = counts / total.clamp_min(1)
    entropy = -torch.special.xlogy(q, q).sum()
    used = int((counts > 0).sum())
    return {"codebook_used": used, "codebook_size": counts.numel(),
            "codebook_usage": used / counts.numel(), "codebook_perplexity": float(entropy.exp())}


# ----------------------------------------------------------------------------- networks

def inception_weights_path(path=None) -> Path:
    """The TF-Inception weights file: ``path`` if given, else torch hub's checkpoint folder."""
    if path is not None:
        if not Path(path).is_file():
            raise V2LError(f"{path}: Inception weights file not found; give the path of "
                           f"{INCEPTION_FILES[0]} (torch-fidelity) or {INCEPTION_FILES[1]} (pytorch-fid)")
        return Path(path)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_FILES:
        if (folder / name).is_file():
            return folder / name
    raise V2LError(f"TF-Inception weights not found: put {INCEPTION_FILES[0]} (torch-fidelity's "
                   f"release file) or {INCEPTION_FILES[1]} (pytorch-fid's) into {folder}, "
                   "or pass its path with --inception_weights")


def load_inception(path=None, device="cpu") -> Callable:
    """torch-fidelity's TF-compatible InceptionV3: uint8 [B, 3, H, W] -> (pool [B, 2048], logits [B, 1008])."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights_path(path)
    try:  # refuse anything but a plain tensor state dict before torch-fidelity unpickles it
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise V2LError(f"{path}: not a readable Inception state dict ({str(e).splitlines()[0]}); "
                       "download the file again")
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(path))
    except RuntimeError as e:
        raise V2LError(f"{path}: does not fit torch-fidelity's InceptionV3 "
                       f"({str(e).splitlines()[0]}); use {INCEPTION_FILES[0]}")
    return net.to(device)


def load_lpips_metric(device="cpu", vgg_path=None):
    """The project's LPIPS (VGG) network (the one loader, in models.losses): (a, b) in [-1, 1] -> [B]."""
    from models.losses import VGG16_URL, load_lpips, vgg16_weights_path

    path = Path(vgg_path) if vgg_path else vgg16_weights_path()
    if not path.is_file():
        raise V2LError(f"LPIPS needs torchvision's ImageNet VGG16 weights: {path} not found; "
                       f"download {VGG16_URL} and put it there, or pass --lpips_vgg FILE")
    return load_lpips(device=device, vgg_path=path)


def _hub_file(folder: Path, name: str, what: str) -> Path:
    if not (folder / name).is_file():
        raise V2LError(f"{what} needs {name}: not found in {folder}; download it there")
    return folder / name


def load_torchvision_inception(device="cpu") -> Callable:
    """The authors' IS network: torchvision's inception_v3 with its ImageNet weights,
    ``transform_input=False``: images in [-1, 1] (as they are, unnormalised), bilinearly
    resized to 299 -> 1000 logits."""
    from torchvision.models import inception_v3

    path = _hub_file(Path(torch.hub.get_dir()) / "checkpoints", TV_INCEPTION_FILE,
                     "the authors' Inception Score (torchvision inception_v3)")
    net = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False)
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise V2LError(f"{path}: not torchvision's inception_v3 weights "
                       f"({str(e).splitlines()[0]}); download {TV_INCEPTION_FILE} again")
    net = net.eval().to(device)

    def logits(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return net(x)
    return logits


def load_pyiqa_lpips(device="cpu") -> Callable:
    """The authors' LPIPS: pyiqa's LPIPS (AlexNet trunk from torchvision, v0.1 heads from
    pyiqa's cache folder), called as their script does: (a, b) in [-1, 1] into a metric that
    expects [0, 1] (``normalize=True``) -> [B]."""
    from pyiqa.archs.lpips_arch import LPIPS
    from pyiqa.utils.download_util import DEFAULT_CACHE_DIR

    _hub_file(Path(torch.hub.get_dir()) / "checkpoints", ALEXNET_FILE, "the authors' LPIPS (pyiqa)")
    heads = _hub_file(Path(DEFAULT_CACHE_DIR), PYIQA_LPIPS_FILE, "the authors' LPIPS (pyiqa)")
    try:  # refuse anything but a plain state dict before pyiqa unpickles it
        torch.load(heads, map_location="cpu", weights_only=True)
    except Exception as e:
        raise V2LError(f"{heads}: not a readable LPIPS state dict ({str(e).splitlines()[0]}); "
                       "download the file again")
    net = LPIPS(net="alex", version="0.1", pretrained_model_path=str(heads)).to(device)

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return net(a.float(), b.float()).flatten()
    return distance


# ----------------------------------------------------------------------------- accumulators

class Batch(NamedTuple):
    """A batch as the protocols read it: the images in [-1, 1] and their 8-bit copies."""
    real: torch.Tensor
    fake: torch.Tensor
    real8: torch.Tensor
    fake8: torch.Tensor


class Features(NamedTuple):
    """A batch's network outputs: the pool features FID compares (sources, reconstructions)
    and the reconstructions' logits IS scores; None where the metric is off."""
    fid_real: torch.Tensor | None
    fid_fake: torch.Tensor | None
    is_logits: torch.Tensor | None


class MetricsAccumulator(ABC):
    """Streaming PSNR/SSIM/LPIPS/FID/IS/codebook-usage sums, shared by the two protocols.

    ``update(real, fake)`` takes image batches in [-1, 1]; ``compute()`` returns a flat dict
    of numbers plus ``skipped`` ({metric: reason}) for the metrics that could not run
    (missing weights). ``state_dict()``/``load_state_dict()`` and ``merge()`` save, resume
    and add up partial results (sums only), so accumulators of different processes or
    chunks combine exactly. The sums are allocated when the accumulator is made, at sizes
    fixed by its settings: ``fid_dim``, the width of the FID features, and ``is_classes``,
    the number of IS logits (default: those of the protocol's networks); a network that
    gives other widths is an error.

    ``inception`` and ``lpips`` may be given as callables (tests, custom networks):
    ``inception(uint8 images) -> (pool features, logits)``, ``lpips(a, b) -> [B]`` (or
    [B, 1, 1, 1]) distances. ``inception_weights``: the TF-Inception file when it is not
    in torch hub's cache. Codebook usage is tracked only when ``n_codes`` (the codebook
    size) is given.

    A protocol (subclass) supplies its networks (``_load_networks``), the per-image PSNR,
    SSIM and LPIPS (``_psnr``, ``_ssim``, ``_lpips``), the features FID and IS see
    (``_features``), the width of its IS logits (``IS_CLASSES``) and how IS splits the
    images (``is_split_total``: None puts dataset index i in split i % is_splits; a total
    N cuts contiguous splits of N // is_splits, the last N mod is_splits dropped).
    """

    protocol: str
    IS_CLASSES: int
    is_split_total: int | None = None

    def __init__(self, metrics=ALL_METRICS, *, device="cpu", n_codes: int | None = None,
                 inception: Callable | None = None, inception_weights=None,
                 lpips: Callable | None = None, is_splits: int = 10,
                 fid_dim: int = INCEPTION_POOL_DIM, is_classes: int | None = None):
        unknown = set(metrics) - set(ALL_METRICS)
        if unknown:
            raise V2LError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(ALL_METRICS)}")
        self.device = torch.device(device)
        self.skipped: dict[str, str] = {}
        self.metrics = list(metrics)
        if "codebook" in self.metrics and n_codes is None:
            self.metrics.remove("codebook")
        self.n_codes, self.is_splits = n_codes, is_splits
        self.fid_dim = fid_dim
        self.is_classes = self.IS_CLASSES if is_classes is None else is_classes
        self.inception, self.lpips = inception, lpips
        self._load_networks(inception_weights)
        self.reset()

    # ------------------------------------------------------------------ protocol
    @abstractmethod
    def _load_networks(self, inception_weights) -> None:
        """Load the networks of the requested metrics not given (``_try`` skips by name)."""

    @abstractmethod
    def _psnr(self, x: Batch) -> torch.Tensor: ...

    @abstractmethod
    def _ssim(self, x: Batch) -> torch.Tensor: ...

    @abstractmethod
    def _lpips(self, x: Batch) -> torch.Tensor: ...

    @abstractmethod
    def _features(self, x: Batch) -> Features:
        """Called only when FID or IS is on."""

    def _try(self, names: tuple[str, ...], load: Callable):
        """``load()``; when it fails for missing weights: None, and those of ``names`` that
        were requested are skipped, with the reason."""
        try:
            return load()
        except V2LError as e:
            for m in names:
                if m in self.metrics:
                    self.metrics.remove(m)
                    self.skipped[m] = str(e)
                    print(f"warning: metric {m} skipped: {e}", file=sys.stderr)
            return None

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget all images (the loaded networks stay): every sum at zero, at its full size."""
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=self.device)  # noqa: E731
        st = {"n": z(())}
        for m in ("psnr", "ssim", "lpips"):
            if m in self.metrics:
                st[f"{m}_sum"] = z(())
        if "fid" in self.metrics:
            for side in ("real", "fake"):
                st[f"fid_{side}_n"], st[f"fid_{side}_sum"] = z(()), z(self.fid_dim)
                st[f"fid_{side}_outer"] = z(self.fid_dim, self.fid_dim)
        if "is" in self.metrics:
            st["is_n"], st["is_p_sum"] = z(self.is_splits), z(self.is_splits, self.is_classes)
            st["is_plogp_sum"] = z(self.is_splits)
        if "codebook" in self.metrics:
            st["codebook_counts"] = z(self.n_codes)
        self._state, self._seen = st, 0

    # Views of the state as the streaming helpers (they share the tensors).
    def _fid_stats(self, side: str) -> GaussianStats:
        return GaussianStats(*(self._state[f"fid_{side}_{k}"] for k in ("n", "sum", "outer")))

    def _is_stats(self) -> InceptionScoreStats:
        return InceptionScoreStats(*(self._state[f"is_{k}"] for k in ("n", "p_sum", "plogp_sum")),
                                   n_total=self.is_split_total)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the sums (CPU float64 tensors; later updates do not change it)."""
        return {k: v.to("cpu", copy=True) for k, v in self._state.items()}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        """Add another accumulator's ``state_dict()`` (a chunk, a process) to this one; an
        empty dict adds nothing."""
        if not state:
            return
        if state.keys() != self._state.keys():
            raise V2LError(f"cannot merge metric states with different metrics "
                           f"({sorted(state)} vs {sorted(self._state)}); rerun with the same settings")
        for k, v in state.items():
            if v.shape != self._state[k].shape:
                raise V2LError(f"cannot merge metric states of other sizes ({k}: {tuple(v.shape)} "
                               f"vs {tuple(self._state[k].shape)}); rerun with the same settings")
        for k, v in state.items():
            self._state[k] += v.to(self.device, torch.float64)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        self.merge(state)

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def update(self, real: torch.Tensor, fake: torch.Tensor, codes: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> None:
        """Add a batch: ``real``/``fake`` [B, 3, H, W] in [-1, 1]; ``codes`` local codebook rows
        (any shape, values in [0, n_codes)); ``index`` the images' dataset indices (IS splits;
        default: the order of arrival)."""
        if real.shape != fake.shape or real.dim() != 4 or real.shape[1] != 3:
            raise V2LError(f"metrics need real and fake batches of the same shape [B, 3, H, W], "
                           f"got {tuple(real.shape)} and {tuple(fake.shape)}")
        if "codebook" in self.metrics and codes is None:
            raise V2LError("codebook usage is on (n_codes given) but update() got no codes")
        b = real.shape[0]
        if index is None:
            index = torch.arange(self._seen, self._seen + b)
        real, fake = real.to(self.device), fake.to(self.device)
        x = Batch(real, fake, to_uint8(real), to_uint8(fake))
        feats = self._features(x) if {"fid", "is"} & set(self.metrics) else Features(None, None, None)
        if "fid" in self.metrics:
            _check_width(feats.fid_real, self.fid_dim, "FID features", "fid_dim")
            _check_width(feats.fid_fake, self.fid_dim, "FID features", "fid_dim")
        if "is" in self.metrics:
            _check_width(feats.is_logits, self.is_classes, "IS logits", "is_classes")
        scorers = {"psnr": self._psnr, "ssim": self._ssim, "lpips": self._lpips}
        scores = {m: score(x) for m, score in scorers.items() if m in self.metrics}

        self._seen += b
        st = self._state
        st["n"] += b
        for m, per_image in scores.items():  # LPIPS: [B] or [B, 1, 1, 1]
            st[f"{m}_sum"] += per_image.double().sum()
        if "fid" in self.metrics:
            self._fid_stats("real").update(feats.fid_real)
            self._fid_stats("fake").update(feats.fid_fake)
        if "is" in self.metrics:
            self._is_stats().update(feats.is_logits, index)
        if "codebook" in self.metrics:
            st["codebook_counts"] += torch.bincount(codes.reshape(-1).to(self.device),
                                                    minlength=self.n_codes).double()

    # ------------------------------------------------------------------ results
    def compute(self) -> dict:
        """{"protocol", "n_images", "psnr", "ssim", "lpips", "fid", "is", "is_std",
        "codebook_*", "skipped"}."""
        st = self._state
        n = st["n"].item()
        if n == 0:
            raise V2LError("no images were evaluated; check the data path and MAX_IMAGES")
        out: dict = {"protocol": self.protocol, "n_images": int(n)}
        for m in ("psnr", "ssim", "lpips"):
            if m in self.metrics:
                out[m] = float(st[f"{m}_sum"] / n)
        if "fid" in self.metrics:
            out["fid"] = frechet_distance(*self._fid_stats("real").mean_cov(),
                                          *self._fid_stats("fake").mean_cov())
        if "is" in self.metrics:
            out["is"], out["is_std"] = self._is_stats().compute()
        if "codebook" in self.metrics:
            out.update(codebook_usage(st["codebook_counts"]))
        out["skipped"] = dict(self.skipped)
        return out

    def codebook_counts(self) -> torch.Tensor | None:
        """The histogram of local codes used so far (for plots), or None when not tracked."""
        if "codebook" not in self.metrics:
            return None
        return self._state["codebook_counts"].cpu().long()


def _check_width(t: torch.Tensor, width: int, what: str, setting: str) -> None:
    if t.dim() != 2 or t.shape[1] != width:
        raise V2LError(f"the network gave {what} of shape {tuple(t.shape)}, but the sums were "
                       f"made for [B, {width}]; give the network's width as {setting}")


class StandardMetrics(MetricsAccumulator):
    """This project's protocol (module docstring): every metric on the 8-bit images; FID
    and IS from TF-Inception (IS: image i in split i % is_splits); LPIPS (VGG) on [-1, 1].
    ``lpips_vgg``: the VGG16 weights file when it is not in torch hub's cache."""

    protocol = "standard"
    IS_CLASSES = INCEPTION_LOGITS

    def __init__(self, metrics=ALL_METRICS, *, lpips_vgg=None, **common):
        self.lpips_vgg = lpips_vgg
        super().__init__(metrics, **common)

    def _load_networks(self, inception_weights) -> None:
        if self.inception is None and {"fid", "is"} & set(self.metrics):
            self.inception = self._try(("fid", "is"),
                                       lambda: load_inception(inception_weights, self.device))
        if self.lpips is None and "lpips" in self.metrics:
            self.lpips = self._try(("lpips",), lambda: load_lpips_metric(self.device, self.lpips_vgg))

    def _psnr(self, x: Batch) -> torch.Tensor:
        return psnr_y(x.real8, x.fake8)

    def _ssim(self, x: Batch) -> torch.Tensor:
        return ssim_y(x.real8, x.fake8)

    def _lpips(self, x: Batch) -> torch.Tensor:
        return self.lpips(x.real8.float() / 127.5 - 1, x.fake8.float() / 127.5 - 1)

    def _features(self, x: Batch) -> Features:
        pool_real = self.inception(x.real8)[0] if "fid" in self.metrics else None
        pool_fake, logits_fake = self.inception(x.fake8)  # one pass for both FID and IS
        return Features(pool_real, pool_fake, logits_fake)


def _unrounded(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> float64 in [0, 255], not rounded to 8 bits."""
    return (x.double().clamp(-1, 1) + 1) * 127.5


class AuthorsMetrics(MetricsAccumulator):
    """The paper script's metric code (module docstring): PSNR-Y on the float images, piq's
    SSIM on RGB, pyiqa's LPIPS (AlexNet) fed [-1, 1], IS from torchvision's inception_v3 on
    the reconstructions in [-1, 1] in contiguous splits of ``n_total`` (the number of
    dataset indices) // is_splits; FID as standard. ``is_net(images in [-1, 1]) -> logits``
    may be given (else torchvision's inception_v3 is loaded)."""

    protocol = "authors"
    IS_CLASSES = TV_INCEPTION_CLASSES

    def __init__(self, metrics=ALL_METRICS, *, n_total: int | None = None,
                 is_net: Callable | None = None, **common):
        if "is" in metrics and n_total is None:
            raise V2LError("the authors' Inception Score uses contiguous splits: give n_total")
        self.n_total, self.is_split_total, self.is_net = n_total, n_total, is_net
        super().__init__(metrics, **common)

    def _load_networks(self, inception_weights) -> None:
        if self.is_net is None and "is" in self.metrics:
            self.is_net = self._try(("is",), lambda: load_torchvision_inception(self.device))
        if self.inception is None and "fid" in self.metrics:
            self.inception = self._try(("fid",), lambda: load_inception(inception_weights, self.device))
        if self.lpips is None and "lpips" in self.metrics:
            self.lpips = self._try(("lpips",), lambda: load_pyiqa_lpips(self.device))

    def _psnr(self, x: Batch) -> torch.Tensor:
        return psnr_y(_unrounded(x.real), _unrounded(x.fake))

    def _ssim(self, x: Batch) -> torch.Tensor:
        return ssim_piq(_unrounded(x.real) / 255, _unrounded(x.fake) / 255)

    def _lpips(self, x: Batch) -> torch.Tensor:
        # (reconstruction, source), as their script calls it
        return self.lpips(x.fake.float().clamp(-1, 1), x.real.float().clamp(-1, 1))

    def _features(self, x: Batch) -> Features:
        fid = "fid" in self.metrics
        return Features(
            fid_real=self.inception(x.real8)[0] if fid else None,
            fid_fake=self.inception(x.fake8)[0] if fid else None,
            is_logits=self.is_net(x.fake.float().clamp(-1, 1)) if "is" in self.metrics else None)


def ReconstructionMetrics(metrics=ALL_METRICS, *, protocol: str = "standard", lpips_vgg=None,
                          n_total: int | None = None, is_net: Callable | None = None,
                          **common) -> MetricsAccumulator:
    """The accumulator of ``protocol`` (the scripts' entry point): a :class:`StandardMetrics`
    or an :class:`AuthorsMetrics`. The settings only one protocol has go to that one
    (``lpips_vgg`` to standard; ``n_total``, ``is_net`` to authors) and are ignored by the
    other, so one call serves both; ``common`` are :class:`MetricsAccumulator`'s."""
    if protocol == "authors":
        return AuthorsMetrics(metrics, n_total=n_total, is_net=is_net, **common)
    if protocol == "standard":
        return StandardMetrics(metrics, lpips_vgg=lpips_vgg, **common)
    raise V2LError(f"metric protocol '{protocol}': choose from {', '.join(PROTOCOLS)}")
