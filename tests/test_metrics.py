"""Reconstruction metrics against reference implementations (scikit-image, scipy, torch-fidelity)."""
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from engine import metrics as M
from utils.errors import V2LError


def _images(b=3, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    # a blurred, noisy copy: realistic PSNR/SSIM, not the trivial extremes
    fake = torch.nn.functional.avg_pool2d(real, 3, 1, 1) + 0.1 * torch.randn(real.shape, generator=g)
    return real, fake.clamp(-1, 1)


def _y_numpy(x8):
    """The documented Y formula, written independently in numpy: [3, H, W] uint8 -> [H, W]."""
    r, g, b = (x8.numpy().astype(np.float64) / 255.0)
    return 16.0 + 65.481 * r + 128.553 * g + 24.966 * b


def test_psnr_and_ssim_match_scikit_image():
    real, fake = _images()
    r8, f8 = M.to_uint8(real), M.to_uint8(fake)
    psnr, ssim = M.psnr_y(r8, f8), M.ssim_y(r8, f8)
    for i in range(real.shape[0]):
        yr, yf = _y_numpy(r8[i]), _y_numpy(f8[i])
        ref_psnr = peak_signal_noise_ratio(yr, yf, data_range=255)
        ref_ssim = structural_similarity(yr, yf, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=255)
        assert abs(psnr[i].item() - ref_psnr) < 1e-3
        assert abs(ssim[i].item() - ref_ssim) < 1e-3
    assert 0.0 < ssim.min() and ssim.max() < 0.99  # a non-trivial comparison


def test_psnr_ssim_identical_images():
    real, _ = _images(b=2)
    r8 = M.to_uint8(real)
    assert torch.all(M.psnr_y(r8, r8) == M.PSNR_IDENTICAL_DB)
    assert torch.allclose(M.ssim_y(r8, r8), torch.ones(2, dtype=torch.float64))


def test_y_channel_range_and_quantisation():
    x = torch.tensor([-1.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    x8 = M.to_uint8(x)
    assert x8[0, :, 0, 0].tolist() == [0, 255, 128]
    white = M.rgb_to_y(torch.full((1, 3, 1, 1), 255.0))
    black = M.rgb_to_y(torch.zeros(1, 3, 1, 1))
    assert abs(white.item() - 235.0) < 1e-9 and abs(black.item() - 16.0) < 1e-9


EPS64 = torch.finfo(torch.float64).eps


def _fid_roundoff_bound(f1, f2):
    """How far float64 round-off can move our FID of features f1, f2 [n, d] (n - 1 < d allowed).

    Two sources: the streaming sums (a different order of the same n terms moves each
    entry of sum f f^T and of n mu mu^T by at most 2 (n - 1) u sum_k |f_ki f_kj|), and the
    factorisation of the covariances (backward error about d u lambda_max). Either moves a
    covariance by delta in spectral norm (bounded by the Frobenius norm). The traces move by
    at most d delta. When the covariance is rank deficient, its k = d - (n - 1) zero
    eigenvalues may become delta, and tr sqrt(S1 S2) picks up to sqrt(delta lambda_max(other))
    per such direction: the square root amplifies round-off from u to about sqrt(u)."""
    def side(f):
        n, d = f.shape
        a = f.double().abs()
        sums = 2 * (2 * (n - 1) * EPS64 * (a.T @ a)).norm() / (n - 1)
        lam = torch.linalg.eigvalsh(torch.cov(f.double().T))[-1].item()
        return sums.item() + d * EPS64 * lam, lam, max(0, d - (n - 1))
    (d1, l1, k1), (d2, l2, k2) = side(f1), side(f2)
    d = f1.shape[1]
    return 2 * (k1 * math.sqrt(d1 * l2) + k2 * math.sqrt(d2 * l1)) + 2 * d * (d1 + d2)


def _scipy_fid(f1, f2):
    f1, f2 = f1.double().numpy(), f2.double().numpy()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n,d", [(300, 64), (40, 64)])  # full-rank and rank-deficient covariances
def test_fid_matches_scipy_sqrtm(n, d):
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    f1 = torch.randn(n, d, generator=g) @ mix + 1.0
    f2 = torch.randn(n, d, generator=g) * 1.3 + 0.8
    ours, ref = M.fid_from_features(f1, f2), _scipy_fid(f1, f2)
    assert abs(ours - ref) <= 1e-3 * abs(ref)
    assert ours > 1.0
    bound = _fid_roundoff_bound(f1, f1)
    assert abs(M.fid_from_features(f1, f1)) <= bound < 1e-3 * ref


def test_fid_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(100, 16, generator=g) * 3 + 5
    stats = M.GaussianStats.zeros(16)
    for part in f.split(7):
        stats.update(part)
    mu, cov = stats.mean_cov()
    assert torch.allclose(mu, f.double().mean(0))
    assert torch.allclose(cov, torch.from_numpy(np.cov(f.double().numpy(), rowvar=False)))


def test_inception_score_known_distributions():
    n_cls, n = 7, 700
    onehot = torch.nn.functional.one_hot(torch.arange(n) // 10 % n_cls, n_cls).double() * 100
    mean, std = M.inception_score(onehot, splits=10)
    assert abs(mean - n_cls) < 1e-6 and std < 1e-6
    same = torch.randn(1, n_cls).expand(n, n_cls)
    assert abs(M.inception_score(same)[0] - 1.0) < 1e-9


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 30, generator=g) * 3
    ours = M.inception_score(logits, splits=10)
    # ours: image i -> split i % 10; torch-fidelity: contiguous chunks of the (unshuffled) order
    grouped = torch.cat([logits[s::10] for s in range(10)])
    ref = isc_features_to_metric(grouped, splits=10, shuffle=False)
    assert abs(ours[0] - ref["inception_score_mean"]) < 1e-9
    assert abs(ours[1] - ref["inception_score_std"]) < 1e-9


def test_codebook_usage():
    out = M.codebook_usage(torch.tensor([5, 5, 0, 5, 5, 0, 0, 0]))
    assert out["codebook_used"] == 4 and out["codebook_usage"] == 0.5
    assert abs(out["codebook_perplexity"] - 4.0) < 1e-9
    assert abs(M.codebook_usage(torch.tensor([9, 0, 0]))["codebook_perplexity"] - 1.0) < 1e-12


class _StandIn:
    """A fixed random projection in place of Inception: uint8 images -> (features, logits).

    One image at a time in float64, so an image's features do not depend on the batch it
    came in (a float32 matrix product may round differently for another batch shape, and
    the rank-deficient FID below amplifies 1-ulp float32 changes to ~1e-4)."""

    def __init__(self, size=16):
        g = torch.Generator().manual_seed(4)
        self.wf = torch.randn(3 * size * size, 12, generator=g, dtype=torch.float64)
        self.wl = torch.randn(3 * size * size, 5, generator=g, dtype=torch.float64) / 50

    def __call__(self, x8):
        x = x8.double().flatten(1) / 255
        return (torch.cat([row[None] @ self.wf for row in x]),
                torch.cat([row[None] @ self.wl for row in x]))


def _lpips_standin(a, b):
    return torch.stack([(x - y).double().abs().mean() for x, y in zip(a, b)])


def test_accumulator_streams_merges_and_matches_plain_functions():
    real, fake = _images(b=10, size=16, seed=5)
    codes = torch.randint(0, 20, (10, 4, 4))
    net = _StandIn()
    kwargs = dict(inception=net, lpips=_lpips_standin, n_codes=20, is_splits=2,
                  fid_dim=net.wf.shape[1], is_classes=net.wl.shape[1])
    whole = M.ReconstructionMetrics(**kwargs)
    whole.update(real, fake, codes=codes, index=torch.arange(10))
    res = whole.compute()

    parts = []
    for sl in (slice(0, 3), slice(3, 10)):  # two "processes" / chunks
        acc = M.ReconstructionMetrics(**kwargs)
        acc.update(real[sl], fake[sl], codes=codes[sl], index=torch.arange(10)[sl])
        parts.append(acc.state_dict())
    merged = M.ReconstructionMetrics(**kwargs)
    for p in parts:
        merged.merge(p)
    res2 = merged.compute()
    # Per-image values are float64 reductions over at most 3 * 16 * 16 terms (a batch of
    # another shape may take another kernel), then float64 sums over 10 images: both
    # round by well under 1e3 * u relative (is_std, a spread of scores near res["is"],
    # relative to those scores).
    rel = 1e3 * EPS64
    for k in ("psnr", "ssim", "lpips", "is", "is_std", "codebook_perplexity"):
        scale = res["is"] if k == "is_std" else abs(res[k])
        assert abs(res[k] - res2[k]) <= rel * scale, k
    r8, f8 = M.to_uint8(real), M.to_uint8(fake)
    # 10 images, 12 features: rank-deficient covariances, where round-off grows to ~sqrt(u)
    fid_tol = _fid_roundoff_bound(net(r8)[0], net(f8)[0])
    assert abs(res["fid"] - res2["fid"]) <= fid_tol < 1e-4 * res["fid"]

    assert res["n_images"] == 10 and res["skipped"] == {}
    assert abs(res["psnr"] - M.psnr_y(r8, f8).mean().item()) <= rel * res["psnr"]
    assert abs(res["ssim"] - M.ssim_y(r8, f8).mean().item()) <= rel * res["ssim"]
    assert abs(res["fid"] - M.fid_from_features(net(r8)[0], net(f8)[0])) <= fid_tol
    assert abs(res["is"] - M.inception_score(net(f8)[1], splits=2)[0]) <= rel * res["is"]
    assert res["codebook_used"] == len(codes.unique())


def _is_standin(x):
    """A fixed projection in place of the authors' IS network: images in [-1, 1] -> 7 logits,
    one image at a time in float64 (as :class:`_StandIn`)."""
    w = torch.randn(x[0].numel(), 7, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return torch.cat([row[None] @ w for row in x.double().flatten(1)]) / 20


def _standin_metrics(protocol, metrics=M.ALL_METRICS, **kw):
    net = _StandIn()
    if protocol == "authors":
        kw.update(is_net=_is_standin, is_classes=7)
    return M.ReconstructionMetrics(metrics, protocol=protocol, inception=net, lpips=_lpips_standin,
                                   fid_dim=12, is_classes=kw.pop("is_classes", 5), **kw)


@pytest.mark.parametrize("protocol", M.PROTOCOLS)
def test_state_is_sized_by_the_settings_not_by_the_first_batch(protocol):
    acc = _standin_metrics(protocol, n_codes=20, is_splits=3, n_total=10)
    assert isinstance(acc, {"standard": M.StandardMetrics, "authors": M.AuthorsMetrics}[protocol])
    classes = 7 if protocol == "authors" else 5
    expected = {"n": (), "psnr_sum": (), "ssim_sum": (), "lpips_sum": (),
                "fid_real_n": (), "fid_real_sum": (12,), "fid_real_outer": (12, 12),
                "fid_fake_n": (), "fid_fake_sum": (12,), "fid_fake_outer": (12, 12),
                "is_n": (3,), "is_p_sum": (3, classes), "is_plogp_sum": (3,), "codebook_counts": (20,)}
    empty = acc.state_dict()
    assert {k: tuple(v.shape) for k, v in empty.items()} == expected
    assert not any(v.any() for v in empty.values())
    real, fake = _images(b=4, size=16, seed=10)
    codes = torch.randint(0, 20, (4, 2, 2))
    acc.update(real, fake, codes=codes, index=torch.arange(4))
    assert {k: tuple(v.shape) for k, v in acc.state_dict().items()} == expected
    # a chunk without images (all unreadable) adds exactly nothing
    one = acc.compute()
    merged = _standin_metrics(protocol, n_codes=20, is_splits=3, n_total=10)
    merged.merge(empty)
    merged.merge(acc.state_dict())
    assert merged.compute() == one


def test_networks_of_other_widths_are_refused():
    real, fake = _images(b=2, size=16)
    acc = M.ReconstructionMetrics(("psnr", "fid"), inception=_StandIn(), fid_dim=M.INCEPTION_POOL_DIM)
    with pytest.raises(V2LError, match="fid_dim"):
        acc.update(real, fake)
    with pytest.raises(V2LError, match="no images"):  # nothing was added
        acc.compute()
    acc = M.ReconstructionMetrics(("is",), protocol="authors", n_total=2, is_net=_is_standin)
    with pytest.raises(V2LError, match="is_classes"):  # 7 logits, not torchvision's 1000
        acc.update(real, fake)
    small = _standin_metrics("standard", ("fid",))
    with pytest.raises(V2LError, match="other sizes"):
        small.merge(M.ReconstructionMetrics(("fid",), inception=_StandIn()).state_dict())


def test_authors_fid_and_is_read_their_own_networks():
    """Under the authors' protocol FID takes TF-Inception's pool features and IS the other
    network's logits (contiguous splits), both in one pass; the standard IS takes
    TF-Inception's logits (split i % splits)."""
    n, splits = 10, 3
    real, fake = _images(b=n, size=16, seed=11)
    net = _StandIn()
    r8, f8 = M.to_uint8(real), M.to_uint8(fake)
    fid = M.fid_from_features(net(r8)[0], net(f8)[0])
    fid_tol = _fid_roundoff_bound(net(r8)[0], net(f8)[0])
    results = {}
    for protocol in M.PROTOCOLS:
        acc = _standin_metrics(protocol, ("fid", "is"), n_total=n, is_splits=splits)
        for sl in (slice(0, 4), slice(4, n)):
            acc.update(real[sl], fake[sl], index=torch.arange(n)[sl])
        results[protocol] = acc.compute()
        assert abs(results[protocol]["fid"] - fid) <= fid_tol, protocol
    rel = 1e3 * EPS64
    authors_is = M.inception_score(_is_standin(fake.clamp(-1, 1)), splits, contiguous=True)[0]
    standard_is = M.inception_score(net(f8)[1], splits)[0]
    assert abs(results["authors"]["is"] - authors_is) <= rel * authors_is
    assert abs(results["standard"]["is"] - standard_is) <= rel * standard_is
    assert abs(authors_is - standard_is) > 1e-3 * standard_is  # the two are told apart


def test_inception_missing_weights_skips_fid_and_is_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    acc = M.ReconstructionMetrics(metrics=("psnr", "fid", "is"))
    assert set(acc.skipped) == {"fid", "is"}
    msg = acc.skipped["fid"]
    assert M.INCEPTION_FILES[0] in msg and str(tmp_path / "hub" / "checkpoints") in msg
    real, fake = _images(b=2, size=16)
    acc.update(real, fake)
    res = acc.compute()
    assert "fid" not in res and "is" not in res and "psnr" in res
    assert res["skipped"]["is"] == msg

    with pytest.raises(V2LError, match="nowhere.pth"):
        M.load_inception(tmp_path / "nowhere.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(V2LError, match="bad.pth"):
        M.load_inception(bad)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(V2LError, match="unknown metrics"):
        M.ReconstructionMetrics(metrics=("psnr", "bleu"))
    acc = M.ReconstructionMetrics(metrics=("psnr",))
    with pytest.raises(V2LError, match="same shape"):
        acc.update(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 8, 8))
    with pytest.raises(V2LError, match="no images"):
        acc.compute()


def test_lpips_missing_vgg_skips_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    acc = M.ReconstructionMetrics(metrics=("ssim", "lpips"))
    assert list(acc.skipped) == ["lpips"]
    assert "vgg16-397923af.pth" in acc.skipped["lpips"]
    assert str(tmp_path / "hub" / "checkpoints") in acc.skipped["lpips"]


def test_lpips_from_a_vgg_file_uses_the_minus_one_one_range(tmp_path):
    """A (random) VGG16 file through the shared loader: our LPIPS equals the lpips package
    fed the 8-bit images in [0, 1] with normalize=True (the same as [-1, 1], normalize=False)."""
    import warnings

    import lpips
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notice
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # calibrated heads, random trunk
    trunk = {f"features.{k.split('.', 1)[1]}": v for k, v in ref.net.state_dict().items()}
    torch.save(trunk, tmp_path / "vgg16.pth")
    acc = M.ReconstructionMetrics(metrics=("lpips",), lpips_vgg=tmp_path / "vgg16.pth")
    assert acc.skipped == {}
    real, fake = _images(b=2, size=32)
    acc.update(real, fake)
    with torch.no_grad():
        expected = ref(M.to_uint8(real) / 255.0, M.to_uint8(fake) / 255.0, normalize=True).mean()
    assert abs(acc.compute()["lpips"] - expected.item()) < 1e-5
    assert expected.item() > 1e-4


# ----------------------------------------------------------------------------- authors' protocol

@pytest.fixture
def authors_weights(tmp_path, monkeypatch):
    """Random stand-ins for torchvision's inception_v3 and AlexNet and pyiqa's LPIPS heads,
    saved under the names and folders the real files go to (a temporary torch hub)."""
    import pyiqa.utils.download_util as pyiqa_download
    from pyiqa.archs.lpips_arch import LPIPS
    from torchvision.models import alexnet, inception_v3
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "pyiqa").mkdir()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(pyiqa_download, "DEFAULT_CACHE_DIR", str(hub / "pyiqa"))
    torch.manual_seed(6)
    net = inception_v3(weights=None, aux_logits=True, init_weights=True, transform_input=False)
    # Random weights give logits ~1e11 and one class for every image: calibrate the batch
    # norms on images like the test's, then centre and scale the classifier (logits ~2).
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    calib = torch.nn.functional.interpolate(_images(b=8, size=32, seed=8)[1], size=(299, 299),
                                            mode="bilinear")
    with torch.no_grad():
        net.train()(calib)
        logits = net.eval()(calib)
        scale = 2 / (logits - logits.mean(0)).std()
        net.fc.weight *= scale
        net.fc.bias.copy_(scale * (net.fc.bias - logits.mean(0)))
    torch.save(net.state_dict(), hub / "checkpoints" / M.TV_INCEPTION_FILE)
    torch.save(alexnet().state_dict(), hub / "checkpoints" / M.ALEXNET_FILE)
    heads = LPIPS(pretrained=False, pnet_rand=True, net="alex", version="0.1")
    for p in heads.lins.parameters():  # positive weights, as calibrated heads have
        p.data.uniform_(0.1, 1.0)
    torch.save({k: v for k, v in heads.state_dict().items() if k.startswith("lin")},
               hub / "pyiqa" / M.PYIQA_LPIPS_FILE)
    return hub


def _classic_is(logits, splits):
    """The improved-GAN Inception Score as the authors' script computes it, in numpy:
    softmax, contiguous splits of N // splits, the rest dropped."""
    p = torch.softmax(logits.double(), dim=1).numpy()
    size, scores = p.shape[0] // splits, []
    for k in range(splits):
        part = p[k * size:(k + 1) * size]
        py = part.mean(0, keepdims=True)
        scores.append(np.exp(scipy.special.rel_entr(part, py).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_authors_protocol_uses_their_libraries(authors_weights):
    import piq
    from pyiqa.archs.lpips_arch import LPIPS
    from torchvision.models import inception_v3
    n, splits = 12, 5
    real, fake = _images(b=n, size=32, seed=7)
    acc = M.ReconstructionMetrics(("psnr", "ssim", "lpips", "is"), protocol="authors",
                                  n_total=n, is_splits=splits)
    assert acc.skipped == {}
    for sl in (slice(0, 5), slice(5, n)):  # contiguous splits follow the dataset index
        acc.update(real[sl], fake[sl], index=torch.arange(n)[sl])
    res = acc.compute()
    assert res["protocol"] == "authors" and res["n_images"] == n

    # PSNR-Y on the float images (no 8-bit rounding), against scikit-image
    y = lambda x: 16.0 + torch.einsum("chw,c->hw", (x.double() + 1) / 2,  # noqa: E731
                                      torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64))
    ref_psnr = np.mean([peak_signal_noise_ratio(y(a).numpy(), y(b).numpy(), data_range=255)
                        for a, b in zip(real, fake)])
    assert abs(res["psnr"] - ref_psnr) <= 1e3 * EPS64 * ref_psnr
    rounded = M.psnr_y(M.to_uint8(real), M.to_uint8(fake)).mean().item()
    assert abs(res["psnr"] - rounded) > 1e3 * EPS64 * ref_psnr  # rounding does change it

    # SSIM: piq on RGB in [0, 1] (float32 inside piq: ~1e-6)
    ref_ssim = piq.ssim((fake + 1) / 2, (real + 1) / 2, data_range=1.0, reduction="none").mean()
    assert abs(res["ssim"] - ref_ssim.item()) < 1e-5
    assert abs(res["ssim"] - M.ssim_y(M.to_uint8(real), M.to_uint8(fake)).mean().item()) > 1e-3

    # LPIPS: pyiqa's network from the same files, fed [-1, 1] with normalize=True (their call)
    net = LPIPS(net="alex", version="0.1", pretrained_model_path=str(
        authors_weights / "pyiqa" / M.PYIQA_LPIPS_FILE))
    with torch.no_grad():
        theirs = net(fake, real).mean().item()
        proper = net(fake, real, normalize=False).mean().item()
    assert abs(res["lpips"] - theirs) <= 1e-5 * theirs
    assert abs(theirs - proper) > 1e-3 * theirs  # the range slip matters

    # IS: torchvision inception_v3 on [-1, 1] resized to 299, contiguous splits
    tv = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False)
    tv.load_state_dict(torch.load(authors_weights / "checkpoints" / M.TV_INCEPTION_FILE))
    with torch.no_grad():
        logits = tv.eval()(torch.nn.functional.interpolate(fake, size=(299, 299), mode="bilinear"))
    mean, std = _classic_is(logits, splits)
    # float32 logits from differently sized batches: ~1e-6 relative, through exp and softmax
    assert abs(res["is"] - mean) <= 1e-4 * mean and abs(res["is_std"] - std) <= 1e-4 * mean
    assert abs(M.inception_score(logits, splits)[0] - mean) > 1e-4 * mean  # i % splits differs


def test_authors_protocol_missing_weights_skip_by_name(tmp_path, monkeypatch):
    import pyiqa.utils.download_util as pyiqa_download
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(pyiqa_download, "DEFAULT_CACHE_DIR", str(tmp_path / "hub" / "pyiqa"))
    acc = M.ReconstructionMetrics(("psnr", "lpips", "is"), protocol="authors", n_total=4)
    assert set(acc.skipped) == {"lpips", "is"}
    assert M.TV_INCEPTION_FILE in acc.skipped["is"]
    assert str(tmp_path / "hub" / "checkpoints") in acc.skipped["is"]
    assert M.ALEXNET_FILE in acc.skipped["lpips"]
    with pytest.raises(V2LError, match="n_total"):
        M.ReconstructionMetrics(("is",), protocol="authors")
    with pytest.raises(V2LError, match="protocol"):
        M.ReconstructionMetrics(("psnr",), protocol="theirs")
    with pytest.raises(TypeError):  # the shared part alone measures no protocol
        M.MetricsAccumulator(("psnr",))
