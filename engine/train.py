"""Training procedures for the V2L tokenizer (step 4): plain functions over one ``TrainState``.

- ``seed_everything``: the one place the random streams are seeded.
- ``build_training``: moves the networks to the device, builds both Adam optimisers and the
  GradScaler, wraps both networks in DistributedDataParallel under torchrun.
- ``train_step``: one generator update, then one discriminator update (from ``disc_start`` on).
- ``train_one_epoch``: the loader loop around ``train_step``, with logging and codebook usage.
- ``reconstruct_samples``: the epoch's reconstruction grid.
- ``save_checkpoint`` / ``resume``: everything an exact resume needs, in the one checkpoint
  format of utils/artifacts.py (``write_checkpoint``, keyed by the run's settings and inputs): the tokenizer's own weights (not the frozen CLIP, which is reloaded), the
  discriminator, both optimisers, the GradScaler, the epoch and iteration counters and every
  rank's RNG states (torch, CUDA, numpy, python). Resuming from the checkpoint written after
  epoch e reproduces epoch e + 1 of an uninterrupted run.

The learning rate of both optimisers follows ``lr_at``: linear warm-up, then a half-cycle
cosine to ``min_lr``, set every iteration from the fractional epoch.

``TrainConfig``'s defaults are the authors' run: Adam eps 1e-7; fp16 autocast with a
GradScaler and CLIP's weights in fp16 (bf16 autocast is the option; a CPU runs float32, or
bf16 autocast for ``amp="bf16"`` where it computes bf16 natively); the discriminator step
on a fresh forward of the just-updated tokenizer (taming and LlamaGen reuse the generator
step's reconstructions: ``disc_fresh_forward`` False); the discriminator's BatchNorm per
process (``sync_bn`` True: SyncBatchNorm over the processes, GPUs only). The batch is per
process (the authors': 8 on one GPU), the global batch that times the processes, and its
learning rate: ``batch_and_lr``.

Loss scaling (fp16): the GradScaler skips an iteration whose scaled gradients overflow and
backs its scale off. A non-finite generator loss under loss scaling counts as such an
overflow: its gradients are made non-finite, so the GradScaler skips the step (the adaptive
GAN weight, taken from scaled gradients, is NaN when they overflow, see
models/losses.py ``adaptive_weight``). Every rank decides alike, as the gradients are
all-reduced before the GradScaler looks at them. Training stops with one line ("training
diverged") when ``max_overflow_steps`` iterations in a row backed the scale off, or at once
on a non-finite loss without loss scaling (a flag all-reduced over the ranks, read where the
finiteness check always was).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data.images import collate_skip_bad
from models.losses import DiscriminatorLoss, GeneratorLoss
from models.tokenizer import V2LTokenizer
from utils import dist
from utils.artifacts import atomic_path, read_checkpoint, write_checkpoint
from utils.errors import V2LError
from utils.figures import save_image_grid

AUTHORS_BATCH = 8          # the authors' run: one GPU x 8 images per iteration,
AUTHORS_LR = 4.5e-4        # at this learning rate
LR_SCALINGS = ("none", "linear", "sqrt")


@dataclass
class TrainConfig:
    """Defaults: the authors' run."""
    epochs: int = 100
    warmup_epochs: int = 5
    lr: float = AUTHORS_LR
    min_lr: float = 0.0
    betas: tuple = (0.5, 0.9)
    eps: float = 1e-7                      # Adam epsilon (the authors'; PyTorch's default is 1e-8)
    amp: str = "fp16"                      # "fp16" (+ GradScaler), "bf16" or "none"; CPU runs fp32
    disc_fresh_forward: bool = True        # D step on a new forward of the updated tokenizer
    log_every: int = 50                    # iterations between log records
    max_steps_per_epoch: int | None = None  # cut epochs short (quick runs)
    find_unused_parameters: bool = False    # DDP option, for architectures with unused branches
    channels_last: bool = False             # NHWC memory layout for the convolutions
    sync_bn: bool = False                   # the discriminator's BatchNorm synchronised over the
    #                                         processes (GPUs only; False: per process, the authors')
    max_overflow_steps: int = 32            # fp16: stop after this many skipped iterations in a row


@dataclass
class TrainState:
    """Everything one training run updates (built by ``build_training``, saved by
    ``save_checkpoint``). ``generator`` and ``critic`` are the tokenizer and the
    discriminator as called in a training step: DDP-wrapped under torchrun."""
    tokenizer: V2LTokenizer
    disc_loss: DiscriminatorLoss        # the PatchGAN discriminator and its hinge loss
    gen_loss: GeneratorLoss
    train_config: TrainConfig
    device: torch.device
    generator: nn.Module
    critic: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    epoch: int = 0                      # next epoch to run
    step: int = 0                       # iterations done
    ddp: dist.Dist = field(default_factory=dist.Dist)
    last_scale: float | None = None     # the GradScaler's scale read at the previous iteration
    overflow_streak: int = 0            # iterations in a row that backed the scale off


def seed_everything(seed: int, rank: int) -> None:
    """Seed torch, numpy and python with ``seed + rank`` (each rank its own streams; the
    initial weights still agree, as DDP copies rank 0's to every rank)."""
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


def lr_at(epoch: float, train_config: TrainConfig) -> float:
    """Learning rate at a fractional epoch: linear warm-up, then half-cycle cosine to min_lr."""
    c = train_config
    if epoch < c.warmup_epochs:
        return c.lr * epoch / c.warmup_epochs
    span = max(c.epochs - c.warmup_epochs, 1e-8)
    progress = min((epoch - c.warmup_epochs) / span, 1.0)
    return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_and_lr(batch_size: int, world: int, lr: float, scaling: str = "none",
                 reference_batch: int = AUTHORS_BATCH) -> tuple[int, float]:
    """(global batch, learning rate) for ``batch_size`` images per process on ``world``
    processes: the global batch is ``batch_size * world``.

    ``scaling``: "none" keeps ``lr``; "linear" / "sqrt" multiply it by
    ``global batch / reference_batch`` or its square root (``lr`` is the rate at the
    authors' global batch of 8: one GPU x 8 images).
    """
    if scaling not in LR_SCALINGS:
        raise V2LError(f"--lr_scaling {scaling}: expected one of {', '.join(LR_SCALINGS)}")
    if batch_size < 1:
        raise V2LError(f"--batch_size {batch_size}: the images per process must be at least 1")
    global_batch = batch_size * world
    ratio = global_batch / reference_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[scaling]
    return global_batch, lr * factor


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on this device (None: float32). A CPU runs float32, or
    bf16 autocast for ``--amp bf16`` where it computes bf16 natively (``native_bf16``)."""
    if amp not in ("bf16", "fp16", "none"):
        raise V2LError(f"--amp {amp}: expected bf16, fp16 or none")
    if amp == "none":
        return None
    if device.type != "cuda":
        return torch.bfloat16 if amp == "bf16" and dist.native_bf16(device) else None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(state: TrainState):
    if state.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(state.device.type, dtype=state.amp_dtype)


def make_loader(dataset, batch_size: int, num_workers: int, seed: int, ddp: dist.Dist,
                shuffle: bool = True) -> DataLoader:
    """Per-rank loader over a DistributedSampler (also for one process, so the order is the
    same function of (seed, epoch) in every setting); unreadable images are dropped."""
    sampler = DistributedSampler(dataset, num_replicas=ddp.world, rank=ddp.rank, shuffle=shuffle,
                                 seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_skip_bad, pin_memory=ddp.device.type == "cuda",
                      drop_last=False)


def build_optimizers(tokenizer: V2LTokenizer, discriminator: DiscriminatorLoss,
                     train_config: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Adam for the tokenizer's trainable parts and Adam for the discriminator."""
    # foreach: one multi-tensor kernel per Adam operation instead of one per parameter
    settings = dict(lr=train_config.lr, betas=tuple(train_config.betas), eps=train_config.eps,
                    foreach=True)
    return (torch.optim.Adam(tokenizer.trainable_parameters(), **settings),
            torch.optim.Adam(discriminator.parameters(), **settings))


def build_training(tokenizer: V2LTokenizer, gen_loss: GeneratorLoss,
                   discriminator: DiscriminatorLoss, train_config: TrainConfig,
                   ddp: dist.Dist) -> TrainState:
    device = ddp.device
    dtype = amp_dtype(train_config.amp, device)
    if dtype == torch.float16 and tokenizer.clip is not None:
        half_clip(tokenizer.clip)
    # the precision CLIP computes the global tokens in, saved with the tokenizer so that
    # models/tokenizer_io.py load_tokenizer runs CLIP alike
    tokenizer.config = dataclasses.replace(tokenizer.config, clip_precision=CLIP_PRECISIONS[dtype])
    discriminator = sync_batchnorm(discriminator, ddp, train_config.sync_bn)
    for net in (tokenizer, discriminator):
        net.to(device)
        if train_config.channels_last:
            net.to(memory_format=torch.channels_last)
    opt_g, opt_d = build_optimizers(tokenizer, discriminator, train_config)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    generator, critic = tokenizer, discriminator
    if ddp.active:
        ids = [device.index] if device.type == "cuda" else None
        generator = DistributedDataParallel(tokenizer, device_ids=ids,
                                            find_unused_parameters=train_config.find_unused_parameters)
        critic = DistributedDataParallel(discriminator, device_ids=ids)
    return TrainState(tokenizer, discriminator, gen_loss, train_config, device, generator, critic,
                      opt_g, opt_d, scaler, dtype, ddp=ddp)


CLIP_PRECISIONS = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def sync_batchnorm(discriminator: DiscriminatorLoss, ddp: dist.Dist,
                   sync_bn: bool) -> DiscriminatorLoss:
    """The discriminator with SyncBatchNorm layers when ``sync_bn`` under DDP (statistics over
    the global batch; same parameter and buffer names, so checkpoints load either way); as it
    is otherwise (BatchNorm per process: the authors' one GPU of 8 images)."""
    if not (sync_bn and ddp.active):
        return discriminator
    if ddp.device.type != "cuda":
        raise V2LError(f"--sync_bn true: SyncBatchNorm runs on GPUs only and these {ddp.world} "
                       f"processes run on {ddp.device.type}; pass --sync_bn false")
    return nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)


def half_clip(clip) -> None:
    """CLIP's weights in float16, as the authors run it under fp16 (it is frozen: no
    master copy needed)."""
    clip.model.half()


# ---- one iteration ---------------------------------------------------------------------
def train_step(state: TrainState, x128: torch.Tensor, x_clip: torch.Tensor,
               lr: float) -> tuple[dict, torch.Tensor]:
    """One generator update, then (once the GAN is on) one discriminator update.

    Returns the detached loss terms and the batch's local token ids."""
    for opt in (state.opt_g, state.opt_d):
        for group in opt.param_groups:
            group["lr"] = lr
    scaler, step = state.scaler, state.step
    grad_scale = loss_scale(state)
    # generator: L1 + VQ + LPIPS (+ adaptive-weighted GAN term); D is frozen for this step
    state.disc_loss.requires_grad_(False)
    with autocast(state):
        out = state.generator(x128, x_clip)
        loss, logs = state.gen_loss(x128, out["rec"], out["vq_loss"], step,
                                    discriminator=state.disc_loss.discriminator,
                                    last_layer=state.tokenizer.last_layer(),
                                    grad_scale=grad_scale)
    state.opt_g.zero_grad(set_to_none=True)
    if scaler.is_enabled():
        # a non-finite loss is an overflow: NaN gradients make the GradScaler skip the step
        scaled = scaler.scale(loss) * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)
        scaled.backward()
    else:
        stop_if_not_finite(loss, state)
        scaler.scale(loss).backward()
    scaler.step(state.opt_g)
    state.disc_loss.requires_grad_(True)
    # discriminator: hinge loss on real images vs reconstructions
    if state.gen_loss.gan_active(step):
        fake = out["rec"]
        if state.train_config.disc_fresh_forward:   # the authors: reconstruct with the updated G
            with torch.no_grad(), autocast(state):
                fake = state.tokenizer(x128, x_clip)["rec"]
        with autocast(state):
            disc_logs = state.critic(x128, fake)
        state.opt_d.zero_grad(set_to_none=True)
        scaler.scale(disc_logs["d_loss"]).backward()
        scaler.step(state.opt_d)
        logs |= {k: v.detach() for k, v in disc_logs.items()}
    scaler.update()
    return logs, out["local_ids"]


def loss_scale(state: TrainState) -> float:
    """The GradScaler's scale for this iteration (1.0 without loss scaling). Stops training
    when the last ``max_overflow_steps`` iterations all backed it off (each skipped); the
    scale is the same on every rank (it follows the all-reduced gradients), so is the
    decision."""
    scaler = state.scaler
    if not scaler.is_enabled():
        return 1.0
    scale = scaler.get_scale()
    backed_off = state.last_scale is not None and scale < state.last_scale
    state.overflow_streak = state.overflow_streak + 1 if backed_off else 0
    state.last_scale = scale
    limit = state.train_config.max_overflow_steps
    if state.overflow_streak >= limit:
        stop_every_rank(f"training diverged: the last {state.overflow_streak} iterations before "
                        f"iteration {state.step} overflowed in fp16 and were skipped (loss scale "
                        f"down to {scale:g}); resume from the last checkpoint with a lower --lr "
                        "or --amp bf16", state.ddp)
    return scale


def stop_if_not_finite(loss: torch.Tensor, state: TrainState) -> None:
    """Without loss scaling, a non-finite loss on any rank stops every rank at this iteration
    (before any weight changes): a flag all-reduced over the ranks."""
    flag = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    bad = int(dist.all_reduce_sum(flag, state.ddp).item())
    if bad:
        where = f" on {bad} of {state.ddp.world} processes" if state.ddp.active else ""
        stop_every_rank(f"training diverged: non-finite loss at iteration {state.step}{where}; "
                        "resume from the last checkpoint with a lower --lr", state.ddp)


def stop_every_rank(message: str, ddp: dist.Dist) -> None:
    """Stop a decision every rank took alike: rank 0 raises the one error line, the other
    ranks leave with the same exit status, silently."""
    if ddp.is_main:
        raise V2LError(message)
    raise SystemExit(2)


# ---- one epoch ---------------------------------------------------------------------------
def train_one_epoch(state: TrainState, loader: DataLoader, ddp: dist.Dist, run_log: "RunLog") -> dict:
    """Run epoch ``state.epoch``; return its summary (mean losses, codebook usage)."""
    train_config = state.train_config
    loader.sampler.set_epoch(state.epoch)
    n_iter = len(loader) if train_config.max_steps_per_epoch is None \
        else min(len(loader), train_config.max_steps_per_epoch)
    state.tokenizer.train()
    state.disc_loss.train()
    used = torch.zeros(len(state.tokenizer.llm_ids), dtype=torch.bool, device=ddp.device)
    sums: dict[str, torch.Tensor] = {}
    window: dict[str, torch.Tensor] = {}
    skipped = n_run = 0
    count = torch.zeros((), device=ddp.device)     # iterations with a finite loss
    bar = tqdm(total=n_iter, desc=f"epoch {state.epoch}", disable=not ddp.is_main, leave=False)
    for i, batch in enumerate(loader):
        if i >= n_iter:
            break
        skipped += batch["n_skipped"]
        if "image" not in batch:
            if ddp.active:
                raise V2LError("a whole batch of images was unreadable (files named above); "
                               "remove them from the data folder and rerun to resume")
            continue
        x128, x_clip = (t.to(ddp.device, non_blocking=True) for t in batch["image"])
        if train_config.channels_last:
            x128 = x128.contiguous(memory_format=torch.channels_last)
        lr = lr_at(state.epoch + i / n_iter, train_config)
        try:
            logs, local_ids = train_step(state, x128, x_clip, lr)
        except (V2LError, SystemExit):
            bar.close()                 # so that the error line starts a line of its own
            raise
        used[state.tokenizer.rows_from_llm_ids(local_ids.reshape(-1))] = True
        # an iteration the GradScaler skipped (non-finite loss) stays out of the means
        finite = torch.isfinite(logs["loss"])
        for k, v in logs.items():
            v = torch.where(finite, v.float(), 0.0)
            sums[k] = sums.get(k, 0) + v
            window[k] = window.get(k, 0) + v
        window["_n"] = window.get("_n", 0) + finite.float()
        count += finite.float()
        n_run += 1
        state.step += 1
        bar.update()
        if state.step % train_config.log_every == 0:
            means = reduce_means(window, ddp)
            window = {}
            run_log.write({"step": state.step, "epoch": state.epoch, "lr": lr, **means})
            bar.set_postfix(loss=f"{means['loss']:.4f}")
    bar.close()
    summary = reduce_means({**sums, "_n": count.clamp(min=1)}, ddp)
    used_all = dist.all_reduce_sum(used.float(), ddp) > 0
    skipped_all = dist.all_reduce_sum(torch.tensor([float(skipped), float(n_run) - float(count)],
                                                   device=ddp.device), ddp)
    summary |= {"codebook_used": int(used_all.sum()), "codebook_size": len(used_all),
                "skipped_images": int(skipped_all[0])}
    if state.scaler.is_enabled():   # iterations the GradScaler skipped for a non-finite loss
        summary["overflow_steps"] = int(skipped_all[1])
    state.epoch += 1
    return summary


def reduce_means(sums: dict, ddp: dist.Dist) -> dict:
    """Per-key means over the iterations and ranks (a collective: every rank calls it)."""
    keys = sorted(k for k in sums if k != "_n")
    vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=ddp.device)
                       for k in keys] + [torch.tensor(float(sums["_n"]), device=ddp.device)])
    vec = dist.all_reduce_sum(vec, ddp)
    return {k: float(vec[j] / vec[-1]) for j, k in enumerate(keys)}


@torch.no_grad()
def reconstruct_samples(state: TrainState, x128: torch.Tensor, x_clip: torch.Tensor,
                        path: Path) -> list[list[str]]:
    """PNG grid: originals (top row) over reconstructions; returns the images' global words."""
    tokenizer = state.tokenizer
    tokenizer.eval()
    x128, x_clip = x128.to(state.device), x_clip.to(state.device)
    with autocast(state):
        global_idx, local_ids = tokenizer.encode(x128, x_clip)
        rec = tokenizer.decode(local_ids, global_idx=global_idx)
    save_image_grid(torch.cat([x128, rec.float()]), path, per_line=len(x128))
    tokenizer.train()
    return tokenizer.global_strings(global_idx)


# ---- logging -----------------------------------------------------------------------------
class RunLog:
    """log.jsonl lines and TensorBoard scalars ``<kind>/<key>`` (rank 0 only)."""

    def __init__(self, out_dir: Path, ddp: dist.Dist):
        self.out_dir, self.enabled = out_dir, ddp.is_main
        self.writer = None

    def write(self, record: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, **record}) + "\n")
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=record["step"])
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                self.writer.add_scalar(f"{kind}/{k}", v, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ---- checkpoints: written and read here only ----------------------------------------------
def save_checkpoint(state: TrainState, ckpt_dir: Path, ddp: dist.Dist, key: dict,
                    keep_every: int = 0) -> None:
    """Write ``ckpt_dir/last.pt`` under the run's ``key`` (a collective: every rank contributes
    its RNG states; rank 0 writes), and a copy ``epoch_NNNN.pt`` every ``keep_every`` epochs."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if state.device.type == "cuda" else None}
    all_rng = dist.all_gather_objects(rng, ddp)
    if ddp.is_main:
        write_checkpoint(ckpt_dir / "last.pt", key, {
            "train_config": asdict(state.train_config), "loss_weights": asdict(state.gen_loss.w),
            "model": state.tokenizer.state_dict(),   # CLIP is not part of it
            "discriminator": state.disc_loss.state_dict(),
            "opt_g": state.opt_g.state_dict(), "opt_d": state.opt_d.state_dict(),
            "scaler": state.scaler.state_dict(), "epoch": state.epoch, "step": state.step,
            "world": ddp.world, "rng": all_rng})
        if keep_every and state.epoch % keep_every == 0:
            with atomic_path(ckpt_dir / f"epoch_{state.epoch:04d}.pt") as tmp:
                shutil.copyfile(ckpt_dir / "last.pt", tmp)
    dist.barrier(ddp)


def resume(state: TrainState, ckpt_dir: Path, ddp: dist.Dist, key: dict,
           log_path: Path | None = None) -> bool:
    """Continue from ``ckpt_dir/last.pt`` when there is one (False: a fresh run). A checkpoint
    of a run with another ``key`` (settings, input artifacts) is refused with one line
    (utils/artifacts.py ``read_checkpoint``). Log records past the checkpoint (left by a run
    killed after it) are dropped from ``log_path``."""
    path = ckpt_dir / "last.pt"
    ckpt = read_checkpoint(path, key)
    if ckpt is None:
        return False
    state.tokenizer.load_state_dict(ckpt["model"], strict=True)
    state.disc_loss.load_state_dict(ckpt["discriminator"])
    state.opt_g.load_state_dict(ckpt["opt_g"])
    state.opt_d.load_state_dict(ckpt["opt_d"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.step = int(ckpt["epoch"]), int(ckpt["step"])
    rngs = ckpt["rng"]
    if len(rngs) != ddp.world:
        print(f"warning: {path} was written by {len(rngs)} processes, resuming with "
              f"{ddp.world}: the global batch is now {ddp.world} x --batch_size (it was "
              f"{len(rngs)} x), and the data order and the random streams differ",
              file=sys.stderr)
    rng = rngs[ddp.rank % len(rngs)]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and state.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    if ddp.is_main and log_path is not None:
        truncate_log(log_path, state.step)
        print(f"resuming from {path}: epoch {state.epoch}, iteration {state.step}", file=sys.stderr)
    return True


def truncate_log(path: Path, step: int) -> None:
    """Drop log records past ``step`` (left by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in keep), encoding="utf-8")
