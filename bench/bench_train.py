"""Bench: tokenizer training iterations/s at 128 px, with and without the GAN + LPIPS terms.

Times ``engine.train.train_step`` (forward, generator loss, backward, Adam, and the
discriminator step when the GAN is on) on random 128 px images, for the paper
configuration (ch 128, D 768, V 32000, M 11908, k 21, CLIP ViT-L/14 with random
weights) and a tiny one. Rows: plain L1 + VQ; + LPIPS + GAN (adaptive weight,
discriminator step); the same with channels_last memory layout. There is no
reference implementation to compare with: ``speedup`` is channels_last vs the
default layout for the full loss. LPIPS uses the cached VGG16 weights when present,
else an explicitly random VGG trunk (same cost; timing only, never for training).

    python bench/bench_train.py                      # CPU, batch 2, tiny configuration
    python bench/bench_train.py --configs tiny paper # + the paper configuration
    python bench/bench_train.py --batch_size 8       # GPU, the paper's per-GPU batch
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import losses  # noqa: E402
from models.clip import load_clip  # noqa: E402
from models.tokenizer import TokenizerConfig, V2LTokenizer  # noqa: E402
from engine.train import TrainConfig, build_training, train_step  # noqa: E402
from tiny_clip import make_tiny_clip  # noqa: E402
from utils import dist  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402
from utils.errors import V2LError  # noqa: E402

BATCH_SIZE = 2  # images per iteration
ITERS = 2  # timed iterations per row (after one warm-up iteration)
CONFIGS: tuple[str, ...] = ("tiny",)  # configurations to time: tiny and/or paper (paper: minutes per row on CPU)
DEVICE = "auto"  # auto (CUDA when available), cuda or cpu
AMP = "bf16"  # mixed precision on GPUs (bf16, fp16, none)
SEED = 0  # weights and images seed
THREADS = 0  # CPU threads (0: torch's default; 1 is faster on a CPU shared with other jobs)

settings = configure(globals())

TINY = dict(ch=32, num_res_blocks=1, z_channels=32, cross_heads=2, cross_head_dim=32,
            global_topk=5)


def build_tokenizer(name: str, device) -> V2LTokenizer:
    torch.manual_seed(SEED)
    if name == "paper":
        clip = load_clip("ViT-L-14", device=device)
        v, m, arch = 32000, 11908, {}
    else:
        import tempfile
        clip = load_clip(make_tiny_clip(Path(tempfile.mkdtemp()) / "clip"), device=device)
        v, m, arch = 64, 16, TINY
    dim = clip.embed_dim
    local = F.normalize(torch.randn(v, dim), dim=-1)
    glob = F.normalize(torch.randn(m, dim), dim=-1)
    return V2LTokenizer(TokenizerConfig(**arch), local, torch.arange(v), glob,
                        [f"w{i}" for i in range(m)], clip)


def perceptual_net(device):
    try:
        return losses.load_lpips(device), "LPIPS (cached VGG16)"
    except V2LError:
        return losses.freeze(losses.lpips_random_trunk()).to(device), "LPIPS (random VGG16, timing only)"


def time_row(tokenizer, ddp, full: bool, channels_last: bool, lpips_net) -> float:
    weights = losses.LossWeights(perceptual_weight=0.1 if full else 0.0,
                                 disc_start=0 if full else 10 ** 9)
    state = build_training(tokenizer, losses.GeneratorLoss(weights, lpips_net if full else None),
                           losses.DiscriminatorLoss(), TrainConfig(amp=AMP, channels_last=channels_last),
                           ddp)
    g = torch.Generator().manual_seed(SEED)
    x128 = (torch.rand(BATCH_SIZE, 3, 128, 128, generator=g) * 2 - 1).to(ddp.device)
    size = tokenizer.clip.image_size
    x_clip = torch.randn(BATCH_SIZE, 3, size, size, generator=g).to(ddp.device)
    if channels_last:
        x128 = x128.contiguous(memory_format=torch.channels_last)
    train_step(state, x128, x_clip, lr=1e-5)                 # warm-up
    if ddp.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(ITERS):
        train_step(state, x128, x_clip, lr=1e-5)
    if ddp.device.type == "cuda":
        torch.cuda.synchronize()
    tokenizer.to(memory_format=torch.contiguous_format)
    return ITERS / (time.perf_counter() - t)


def main():
    ddp = dist.init(DEVICE)
    if THREADS:
        torch.set_num_threads(THREADS)
    lpips_net, lpips_kind = perceptual_net(ddp.device)
    print(f"device {ddp.device}, batch {BATCH_SIZE}, 128 px, {ITERS} timed iterations per row; {lpips_kind}")
    print(f"{'config':8} {'loss terms':28} {'layout':14} {'it/s':>8} {'img/s':>8}")
    results = {}
    for name in CONFIGS:
        tokenizer = build_tokenizer(name, ddp.device)
        for full, cl in ((False, False), (True, False), (True, True)):
            ips = time_row(tokenizer, ddp, full, cl, lpips_net)
            results[(name, full, cl)] = ips
            terms = "L1+VQ+LPIPS+GAN" if full else "L1+VQ"
            print(f"{name:8} {terms:28} {'channels_last' if cl else 'default':14} "
                  f"{ips:8.3f} {ips * BATCH_SIZE:8.2f}", flush=True)
    main_cfg = "paper" if "paper" in CONFIGS else CONFIGS[0]
    full = results[(main_cfg, True, False)]
    print(f"bench train: config={main_cfg} batch={BATCH_SIZE} it_per_s={full:.3f} "
          f"it_per_s_l1vq={results[(main_cfg, False, False)]:.3f} "
          f"speedup={results[(main_cfg, True, True)] / full:.2f}")


if __name__ == "__main__":
    run_main(main)
