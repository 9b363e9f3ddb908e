"""Bench: the FID trace term by symmetric eigenvalues vs scipy.linalg.sqrtm.

Both compute FID between two Gaussians fitted to random 2048-ddp features (the
Inception pool size); the table shows the time of each and the difference of
the results. Ours: a Cholesky factor S1 = L L^T, then the eigenvalues of the
symmetric L^T S2 L (engine.metrics.frechet_distance). Reference: pytorch-fid's recipe,
``sqrtm(S1 @ S2)`` (a Schur decomposition of a general matrix).

    python bench/bench_fid.py               # 2048-ddp, as for real FID
    python bench/bench_fid.py --dim 512     # quicker
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402

from engine.metrics import GaussianStats, frechet_distance  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402

DIM = 2048  # feature dimension (2048 = Inception pool features)
N_SAMPLES = 5000  # feature vectors per side (>= DIM for full-rank covariances)
SEED = 0  # random features' seed

settings = configure(globals())


def scipy_fid(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's formula: a general matrix square root of S1 S2."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def features(g: torch.Generator, shift: float) -> torch.Tensor:
    """Correlated, non-negative features like post-ReLU pool outputs."""
    mix = torch.randn(DIM, DIM, generator=g) / DIM ** 0.5
    return (torch.randn(N_SAMPLES, DIM, generator=g) @ mix + shift).relu()


def main():
    g = torch.Generator().manual_seed(SEED)
    stats = []
    for shift in (0.5, 0.7):
        s = GaussianStats.zeros(DIM)
        s.update(features(g, shift))
        stats.append(s.mean_cov())
    (mu1, s1), (mu2, s2) = stats

    small = [x[:8] if x.dim() == 1 else x[:8, :8] for x in (mu1, s1, mu2, s2)]
    frechet_distance(*small), scipy_fid(*(x.numpy() for x in small))  # warm up both libraries
    t = time.perf_counter()
    ours = frechet_distance(mu1, s1, mu2, s2)
    t_ours = time.perf_counter() - t
    np_args = [x.numpy() for x in (mu1, s1, mu2, s2)]
    t = time.perf_counter()
    ref = scipy_fid(*np_args)
    t_ref = time.perf_counter() - t

    diff = abs(ours - ref)
    print(f"FID of two {N_SAMPLES} x {DIM} random feature sets ({torch.get_num_threads()} threads)")
    print(f"{'method':<34}{'seconds':>10}{'FID':>16}")
    print(f"{'Cholesky + eigvalsh (ours)':<34}{t_ours:>10.2f}{ours:>16.6f}")
    print(f"{'scipy.linalg.sqrtm (pytorch-fid)':<34}{t_ref:>10.2f}{ref:>16.6f}")
    print(f"bench fid: dim={DIM} ours_s={t_ours:.2f} scipy_s={t_ref:.2f} "
          f"speedup={t_ref / t_ours:.1f} maxdiff={diff:.2e}")


if __name__ == "__main__":
    run_main(main)
