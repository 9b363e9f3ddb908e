"""Bench: step 4's training iteration, CLIP's global tokens the old way (twice per iteration)
against the new way (once per image, then reused), same run, same losses.

Each way is its own training state from the same initial weights (both read one frozen
CLIP), fed the same batches in the same order, with the random stream set alike before
every iteration (LPIPS dropout draws from it); the iterations of the two ways alternate, so
that load on the machine falls on both. An iteration is ``engine.train.train_step`` as step
4 runs it: generator forward (with CLIP where it runs), L1 + VQ + LPIPS + adaptive-weighted
GAN loss, backward, Adam, then the discriminator step on a fresh forward of the updated
tokenizer (the GAN on from the first iteration, as for all but the first 10k of the
authors' 16M iterations).

Rows: the old way (CLIP in the generator's forward and again in the fresh forward); the new
way in its first epoch (CLIP once per iteration, its indices kept); the new way afterwards
(every image cached: no CLIP), which is 99 of the 100 epochs. ``speedup``: old / new
afterwards. ``maxdiff``: the largest difference of any logged loss term between the ways
over all iterations. ``GFLOP/it``: counted by torch's FlopCounterMode over one iteration of
each regime (iterations 1 and EPOCH_BATCHES, left out of the timing, as is the warm-up).
The last lines count the paper shape's FLOPs per part of the iteration on the meta device.

Configurations. ``paper``: the 75.2M-parameter tokenizer at 128 px (V 32000, M 11908, k
21), CLIP ViT-L/14 at 224 px, LPIPS VGG16, the PatchGAN, batch 8 (fp16 autocast on a GPU,
CLIP in fp16, as the stage runs; float32 on a CPU). ``cpu`` (the default on a CPU, where the
paper shape runs minutes per iteration): the same networks scaled down together, so
that CLIP's share of the iteration's FLOPs stays near the paper shape's (printed): the
tokenizer at a quarter of the width (ch 32, z 64) with a local codebook of 2000 rows (the
codebook projection is a per-iteration cost that batch 1 would otherwise inflate), CLIP
ViT-L/14 at full width and 224 px but CLIP_LAYERS of its 24 blocks, batch 1; LPIPS and the
PatchGAN as they are. Random weights (a random VGG16 trunk for LPIPS
when its weights are not cached: same cost).

    python bench/bench_step4.py                   # CPU: the scaled configuration
    python bench/bench_step4.py --config paper    # GPU: the paper shape
"""
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from engine.train import TrainConfig, build_training, train_step, use_global_cache  # noqa: E402
from models import losses  # noqa: E402
from models.clip import load_clip  # noqa: E402
from models.tokenizer import TokenizerConfig, V2LTokenizer  # noqa: E402
from utils import dist  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402
from utils.errors import V2LError  # noqa: E402

CONFIG = "auto"  # paper, cpu, or auto (paper on a GPU, cpu on a CPU)
ITERS = 20  # iterations of each way (not timed: the first, a warm-up, and the two FLOP-counted ones)
EPOCH_BATCHES = 4  # distinct batches, cycled: the new way's first epoch is this many iterations
BATCH_SIZE = 0  # images per iteration (0: the configuration's, 8 paper, 1 cpu)
CLIP_LAYERS = 5  # cpu configuration: CLIP ViT-L/14 blocks kept (of 24)
DEVICE = "auto"  # auto (CUDA when available), cuda or cpu
AMP = "fp16"  # the stage's default (fp16 on a GPU; a CPU runs float32)
SEED = 0  # weights and images seed
THREADS = 0  # CPU threads (0: torch's default)

settings = configure(globals())


def build(config: str, device: torch.device):
    """(tokenizer, description) with random weights."""
    torch.manual_seed(SEED)
    clip = load_clip("ViT-L-14", device=device)
    arch, what = {}, "tokenizer 128 px ch 128; CLIP ViT-L/14 24 blocks"
    if config == "cpu":
        blocks = clip.model.visual.transformer.resblocks
        clip.model.visual.transformer.resblocks = blocks[:CLIP_LAYERS]
        arch = dict(ch=32, z_channels=64)
        what = f"tokenizer 128 px ch 32 z 64 V 2000; CLIP ViT-L/14 {CLIP_LAYERS} of 24 blocks"
    dim, v, m = clip.embed_dim, (32000 if config == "paper" else 2000), 11908
    local = F.normalize(torch.randn(v, dim), dim=-1)
    glob = F.normalize(torch.randn(m, dim), dim=-1)
    tokenizer = V2LTokenizer(TokenizerConfig(**arch), local, torch.arange(v), glob,
                             [f"w{i}" for i in range(m)], clip)
    params = sum(p.numel() for p in tokenizer.trainable_parameters()) / 1e6
    return tokenizer, f"{what} ({params:.1f}M trainable)"


def perceptual_net(device):
    try:
        return losses.load_lpips(device), "LPIPS VGG16 (cached weights)"
    except V2LError:
        return losses.freeze(losses.lpips_random_trunk()).to(device), "LPIPS VGG16 (random trunk)"


def make_state(tokenizer, lpips_net, ddp, global_cache: bool):
    torch.manual_seed(SEED + 1)                 # the same discriminator for both ways
    weights = losses.LossWeights(disc_start=0)
    gen_loss = losses.GeneratorLoss(weights, lpips_net, perceptual_dropout=True)
    return build_training(tokenizer, gen_loss, losses.DiscriminatorLoss(),
                          TrainConfig(amp=AMP, global_cache=global_cache), ddp)


class _Images:
    """Stands in for the dataset: ``use_global_cache`` needs its length and paths."""

    def __init__(self, n):
        self.paths = [f"image{i}.png" for i in range(n)]

    def __len__(self):
        return len(self.paths)


def paper_flops(lpips_net) -> dict:
    """GFLOP per image of each part of the iteration at the paper shape, counted by
    FlopCounterMode on the meta device (shapes only: nothing is computed). The local
    quantiser's nearest-code search and codebook projection are counted from their matrix
    sizes (its float32 island does not run on the meta device)."""
    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9
    with torch.device("meta"):
        clip = load_clip("ViT-L-14", device="meta")
        config = TokenizerConfig()
        tok = V2LTokenizer(config, torch.randn(32000, 768), torch.arange(32000),
                           torch.randn(11908, 768), ["w"] * 11908)
        x, ctx = torch.randn(1, 3, 128, 128), torch.randn(1, 21, 768)
        lp = copy.deepcopy(lpips_net).to("meta")
        disc = losses.DiscriminatorLoss()
        gen_loss = losses.GeneratorLoss(losses.LossWeights(disc_start=0), lp,
                                        perceptual_dropout=True)

        def tokenizer_pass(backward: bool):
            h = F.normalize(tok.quant_conv(tok.encoder(x)), dim=1)
            rec = tok.decoder(tok.post_quant_conv(h), ctx)
            if backward:
                loss, _ = gen_loss(x, rec, h.sum() * 0, 0, disc.discriminator,
                                   tok.last_layer())
                loss.backward()
        out = {"clip_forward": count(lambda: clip.model.encode_image(torch.randn(1, 3, 224, 224))),
               "tokenizer_step": count(lambda: tokenizer_pass(True)),
               "fresh_forward": count(lambda: tokenizer_pass(False)),
               "discriminator_step": count(lambda: disc(x, x)["d_loss"].backward())}
    grid, v, d = config.grid, 32000, 768
    # nearest code: 2 * positions * V * D per image and forward; projection: 2 * V * D^2 per
    # forward, shared by the batch of 8 (two forwards per iteration)
    out["quantiser"] = 2 * (2 * grid * grid * v * d + 2 * v * d * d / 8) / 1e9
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ddp = dist.init(DEVICE)
    if THREADS:
        torch.set_num_threads(THREADS)
    device = ddp.device
    config = CONFIG if CONFIG != "auto" else ("paper" if device.type == "cuda" else "cpu")
    batch = BATCH_SIZE or (8 if config == "paper" else 1)
    lpips_net, lpips_kind = perceptual_net(device)
    old_tok, what = build(config, device)
    clip, old_tok.clip = old_tok.clip, None
    new_tok = copy.deepcopy(old_tok)            # the same initial weights
    old_tok.attach_clip(clip)                   # one frozen CLIP for both
    new_tok.attach_clip(clip)
    old = make_state(old_tok, lpips_net, ddp, global_cache=False)
    new = make_state(new_tok, lpips_net, ddp, global_cache=True)
    use_global_cache(new, _Images(EPOCH_BATCHES * batch))
    g = torch.Generator().manual_seed(SEED)
    size = old_tok.clip.image_size
    batches = []
    for b in range(EPOCH_BATCHES):
        x_clip = torch.randn(batch, 3, size, size, generator=g)
        x128 = (torch.rand(batch, 3, 128, 128, generator=g) * 2 - 1).to(device)
        batches.append((x128, x_clip, torch.arange(b * batch, (b + 1) * batch)))

    def step(state, i):
        x128, x_clip, index = batches[i % EPOCH_BATCHES]
        torch.manual_seed(SEED + 100 + i)       # the same dropout masks for both ways
        logs, _ = train_step(state, x128, x_clip, lr=1e-5, index=index)
        state.step += 1
        if state.global_cache is not None and (i + 1) % EPOCH_BATCHES == 0:
            state.global_cache.flush()          # what train_one_epoch does at an epoch's end
        return logs

    flops, times, maxdiff = {}, {"old": [], "new": []}, 0.0
    clip_calls = {"old": 0, "new": 0}
    encode, who = old_tok.clip.encode_images, ["old"]
    old_tok.clip.encode_images = lambda x: clip_calls.__setitem__(
        who[0], clip_calls[who[0]] + 1) or encode(x)
    print(f"device {device}, config {config}: {what}; {lpips_kind}; PatchGAN; batch {batch}; "
          f"{ITERS} iterations per way over {EPOCH_BATCHES} distinct batches "
          f"(amp {AMP if device.type == 'cuda' else 'none: float32 on a CPU'})", flush=True)
    for i in range(ITERS):
        logs = {}
        for name, state in (("old", old), ("new", new)):
            who[0] = name
            if i in (1, EPOCH_BATCHES):         # count one iteration of each regime
                with FlopCounterMode(display=False) as counter:
                    logs[name] = step(state, i)
                flops[(name, i)] = counter.get_total_flops() / 1e9
                times[name].append(None)
                continue
            sync(device)
            t = time.perf_counter()
            logs[name] = step(state, i)
            sync(device)
            times[name].append(time.perf_counter() - t if i else None)
        shown = [f"{t:.2f} s" if t is not None else "-" for t in (times["old"][-1], times["new"][-1])]
        print(f"iteration {i}: old {shown[0]}, new {shown[1]}", file=sys.stderr, flush=True)
        a, b = logs["old"], logs["new"]
        if a.keys() != b.keys():
            raise SystemExit(f"iteration {i}: logged terms differ: {sorted(a)} vs {sorted(b)}")
        maxdiff = max(maxdiff, max(float((a[k].float() - b[k].float()).abs()) for k in a))

    def mean(name, lo, hi):
        ts = [t for t in times[name][lo:hi] if t is not None]
        return sum(ts) / len(ts)
    old_s = mean("old", 1, ITERS)
    fill_s = mean("new", 1, EPOCH_BATCHES)
    hit_s = mean("new", EPOCH_BATCHES, ITERS)
    rows = [("old: CLIP twice per iteration", flops[("old", 1)], old_s),
            ("new, first epoch: CLIP once", flops[("new", 1)], fill_s),
            ("new, later epochs: cached", flops[("new", EPOCH_BATCHES)], hit_s)]
    clip_share = 1 - flops[("new", EPOCH_BATCHES)] / flops[("old", 1)]
    print(f"{'way':32} {'GFLOP/it':>9} {'s/it':>8} {'img/s':>8} {'vs old':>7}")
    for name, gf, s in rows:
        print(f"{name:32} {gf:9.1f} {s:8.3f} {batch / s:8.2f} {old_s / s:6.2f}x")
    print(f"CLIP calls: old {clip_calls['old']}, new {clip_calls['new']} over {ITERS} "
          f"iterations; CLIP's share of the old iteration's FLOPs {clip_share:.1%} (the "
          "paper shape: see docs/performance_step4.md)")
    parts = paper_flops(lpips_net)
    common = sum(v for k, v in parts.items() if k != "clip_forward")
    paper_old, paper_new = common + 2 * parts["clip_forward"], common
    print("paper shape, GFLOP per image of an iteration (counted on the meta device): " +
          ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) +
          f"; old {paper_old:.0f}, new {paper_new:.0f}: CLIP "
          f"{1 - paper_new / paper_old:.1%} of the old iteration, FLOP ratio "
          f"{paper_old / paper_new:.2f}x")
    print(f"largest difference of a logged loss term, old vs new, {ITERS} iterations: {maxdiff:.3g}")
    print(f"bench step4: config={config} device={device.type} batch={batch} "
          f"old_s_it={old_s:.3f} new_s_it={hit_s:.3f} first_epoch_s_it={fill_s:.3f} "
          f"clip_flop_share={clip_share:.3f} paper_flop_ratio={paper_old / paper_new:.2f} speedup={old_s / hit_s:.2f} maxdiff={maxdiff:.3g}")


if __name__ == "__main__":
    run_main(main)
