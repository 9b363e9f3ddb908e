"""Bench: tokenizer training steps in float32 and under bf16 autocast, on the demo's tokenizer.

Times ``engine.train.train_step`` (forward, the demo's generator loss: L1 + 4 x squared
error + VQ with the entropy penalty, backward, Adam) for the demo's step-4 network (0.1 of
the paper's width at 64 px, channels_last, random codebooks of the demo's size) in three
ways, on the same images and weights:

- float32;
- bf16 autocast with torch's own ``nn.GroupNorm`` (the reference way: on a CPU its
  channels-last and bf16 kernels are slow, and autocast gained nothing);
- bf16 autocast with ``models.vqgan.GroupNorm`` (float32 on an NCHW copy), what step 4 runs.

``speedup`` is ours vs the reference way under autocast (``speedup_fp32``: ours vs float32);
``maxdiff`` is the largest difference between the two GroupNorms' outputs on one bf16
channels-last activation (the same float32 maths; only the summation order differs). bf16
runs only where the device computes it natively (a GPU, or a CPU with AVX512-BF16/AMX);
elsewhere every row is float32 and the summary says so.

    python bench/bench_amp.py                 # CPU, batch 8, 10 timed steps per row
    python bench/bench_amp.py --device cuda
"""
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import timed  # noqa: E402
from engine.train import TrainConfig, amp_dtype, build_training, train_step  # noqa: E402
from models import losses, vqgan  # noqa: E402
from models.clip import load_clip  # noqa: E402
from models.tokenizer import TokenizerConfig, V2LTokenizer  # noqa: E402
from tiny_clip import make_tiny_clip  # noqa: E402
from utils import dist  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402

BATCH_SIZE = 8  # images per step (the demo's)
ITERS = 10  # timed steps per row (after 2 warm-up steps), best of REPEATS
REPEATS = 3  # timing rounds, the three ways in turns (a shared machine's speed drifts)
DEVICE = "auto"  # auto (CUDA when available), cuda or cpu
SEED = 0  # weights and images seed

settings = configure(globals())

# the demo's step-4 network (run.sh) and codebook sizes
DEMO = dict(resolution=64, ch=32, num_res_blocks=1, z_channels=64, cross_heads=8,
            cross_head_dim=64, global_topk=21, cross_residual=True, entropy_weight=0.01)
N_LOCAL, N_GLOBAL = 1020, 24


def build_tokenizer(clip) -> V2LTokenizer:
    torch.manual_seed(SEED)
    dim = clip.embed_dim
    return V2LTokenizer(TokenizerConfig(**DEMO), F.normalize(torch.randn(N_LOCAL, dim), dim=-1),
                        torch.arange(N_LOCAL), F.normalize(torch.randn(N_GLOBAL, dim), dim=-1),
                        [f"w{i}" for i in range(N_GLOBAL)], clip)


def torch_group_norm(module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return nn.GroupNorm.forward(module, x)


def make_state(clip, ddp, amp: str):
    tokenizer = build_tokenizer(clip)
    weights = losses.LossWeights(l2_weight=4.0, perceptual_weight=0.0, disc_weight=0.0)
    return build_training(tokenizer, losses.GeneratorLoss(weights, None), losses.DiscriminatorLoss(),
                          TrainConfig(amp=amp, lr=1e-3, channels_last=True), ddp)


def time_steps(state, x64, x_clip, reference_norm: bool) -> float:
    """Seconds per step; ``reference_norm``: torch's GroupNorm in place of ours."""
    ours = vqgan.GroupNorm.forward
    if reference_norm:
        vqgan.GroupNorm.forward = torch_group_norm
    try:
        steps = lambda n: [train_step(state, x64, x_clip, lr=1e-3) for _ in range(n)]  # noqa: E731
        steps(2)                                               # warm-up
        return timed(lambda: steps(ITERS))[0] / ITERS
    finally:
        vqgan.GroupNorm.forward = ours


def group_norm_maxdiff(device) -> float:
    """Ours vs torch's GroupNorm on a bf16 channels-last activation of the demo's first level."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(BATCH_SIZE, 32, 64, 64, generator=g).to(device, torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    norm = vqgan.GroupNorm(32, 32, eps=1e-6).to(device)
    with torch.no_grad():
        return (norm(x).float() - torch_group_norm(norm, x.float())).abs().max().item()


def main():
    ddp = dist.init(DEVICE)
    bf16 = amp_dtype("bf16", ddp.device) is not None
    clip = load_clip(make_tiny_clip(Path(tempfile.mkdtemp()) / "clip"), device=ddp.device)
    g = torch.Generator().manual_seed(SEED)
    x64 = (torch.rand(BATCH_SIZE, 3, 64, 64, generator=g) * 2 - 1).to(ddp.device)
    x64 = x64.contiguous(memory_format=torch.channels_last)
    x_clip = torch.randn(BATCH_SIZE, 3, clip.image_size, clip.image_size, generator=g).to(ddp.device)
    rows = [("float32", "none", False), ("bf16 autocast, torch's GroupNorm", "bf16", True),
            ("bf16 autocast, ours (step 4)", "bf16", False)]
    states = {name: make_state(clip, ddp, amp) for name, amp, _ in rows}
    best = {name: float("inf") for name, _, _ in rows}
    for _ in range(REPEATS):
        for name, _, reference in rows:
            best[name] = min(best[name], time_steps(states[name], x64, x_clip, reference))
    print(f"device {ddp.device}, demo tokenizer (ch 32, 64 px, channels_last), batch {BATCH_SIZE}, "
          f"best of {REPEATS} x {ITERS} steps; bf16 {'native' if bf16 else 'not native: every row float32'}")
    print(f"{'way':36} {'s/step':>8} {'img/s':>8}")
    for name, _, _ in rows:
        print(f"{name:36} {best[name]:8.3f} {BATCH_SIZE / best[name]:8.1f}")
    ours, reference, fp32 = (best[name] for name in (rows[2][0], rows[1][0], rows[0][0]))
    print(f"bench amp: device={ddp.device.type} bf16_native={bf16} s_per_step={ours:.3f} "
          f"speedup={reference / ours:.2f} speedup_fp32={fp32 / ours:.2f} "
          f"maxdiff={group_norm_maxdiff(ddp.device):.2e}")


if __name__ == "__main__":
    run_main(main)
