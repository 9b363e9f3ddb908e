"""Step-3 counting speed: the whole per-batch work of step 3 (CLIP image tower, scores against
all 3V candidates, top-5, bincount into the hit counter) against the bare CLIP image tower,
on the same pre-loaded batches, so the ratio is the cost of counting (target >= 0.9).

Paper sizes for the candidates (3 x 32000, random); the default CPU preset is a random
ViT-B-32 image tower (a few minutes at most); ``--preset vit-l-14`` for GPU timing.

    python bench/bench_step3.py
    python bench/bench_step3.py --preset vit-l-14 --device cuda --batch_size 256 --n_batches 8
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import open_clip  # noqa: E402
import torch  # noqa: E402

from engine.candidates import count_hits  # noqa: E402
from models.clip import ClipBundle, autocast_context  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402
from utils.errors import V2LError  # noqa: E402

PRESET = "vit-b-32"  # vit-b-32 (CPU default) or vit-l-14 (the paper's CLIP), random weights
DEVICE = "cpu"  # cpu or cuda
BATCH_SIZE = 8  # images per batch
N_BATCHES = 2  # pre-loaded batches per timed pass
N_CANDIDATES = 96000  # global candidates (3 x LLaMA-2's 32000)
TOPK = 5  # candidates hit per image
REPEATS = 3  # timed rounds, methods interleaved (the best pass of each is kept)
PRECISION = "auto"  # auto (fp16 autocast on CUDA, fp32 on CPU), fp32, fp16 or bf16
SEED = 0  # random weights and inputs

settings = configure(globals())
ARCH = {"vit-b-32": "ViT-B-32", "vit-l-14": "ViT-L-14"}


def best_times(fns: dict, device: torch.device) -> dict:
    """Best seconds per function over REPEATS rounds, the functions interleaved in each round
    so that a busy machine slows both alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(REPEATS):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def main():
    if PRESET not in ARCH:
        raise V2LError(f"--preset {PRESET}: expected one of {', '.join(ARCH)}")
    device = torch.device(DEVICE)
    torch.manual_seed(SEED)
    model = open_clip.create_model(ARCH[PRESET], device=device).eval().requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    dim = model.visual.output_dim
    clip = ClipBundle(model, None, size, (), (), "bicubic", dim, f"random:{PRESET}")
    batches = [{"image": torch.randn(BATCH_SIZE, 3, size, size, device=device), "n_skipped": 0}
               for _ in range(N_BATCHES)]
    candidates = torch.randn(N_CANDIDATES, dim, device=device)
    valid = torch.rand(N_CANDIDATES, device=device) > 0.05

    def bare():
        with autocast_context(device, PRECISION):
            for b in batches:
                clip.encode_images(b["image"])

    def ours():
        count_hits(clip, batches, candidates, valid, TOPK, PRECISION)

    n = BATCH_SIZE * N_BATCHES
    best = best_times({"bare": bare, "ours": ours}, device)
    t_bare, t_ours = best["bare"], best["ours"]
    counts, n_images, _ = count_hits(clip, batches, candidates, valid, TOPK, PRECISION)
    assert n_images == n and int(counts.sum()) == n * TOPK
    ratio = t_bare / t_ours
    print(f"preset {PRESET} on {device}, {N_CANDIDATES} candidates, top-{TOPK}, {PRECISION}")
    print(f"{'method':<44}{'images':>8}{'seconds':>10}{'images/s':>11}")
    print(f"{'bare CLIP image tower':<44}{n:>8}{t_bare:>10.2f}{n / t_bare:>11.2f}")
    print(f"{'step-3 loop: tower + scores + top-k + bincount':<44}{n:>8}{t_ours:>10.2f}"
          f"{n / t_ours:>11.2f}")
    print(f"bench step3: preset={PRESET} device={device.type} ours_images_per_s={n / t_ours:.2f} "
          f"bare_images_per_s={n / t_bare:.2f} ratio={ratio:.3f} speedup={ratio:.3f}")


if __name__ == "__main__":
    run_main(main)
