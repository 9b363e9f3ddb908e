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
diverged", naming the iteration) when ``max_overflow_steps`` iterations in a row backed the
scale off, or on a non-finite loss without loss scaling (a flag all-reduced over the
ranks). Both are watched on the device and read by ``check_divergence`` at logging steps,
epoch ends and before every checkpoint (no wait for the device in the iteration itself), so
a diverged state is never saved.

Each image's global tokens are computed by CLIP once and reused (``use_global_cache``,
engine/global_cache.py); a checkpoint is also written every ``save_every`` iterations and
resumes part-way through an epoch exactly.
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
from engine.global_cache import GlobalTokenCache, cache_ident
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
    cudnn_benchmark: bool = True            # cuDNN picks the fastest convolution algorithms (GPUs)
    global_cache: bool = True               # CLIP's global tokens once per image, then reused
    #                                         (False: CLIP on every forward, twice per iteration)
    save_every: int = 2000                  # iterations between mid-epoch checkpoints (0: none)
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
    batch_in_epoch: int = 0             # batches of epoch ``epoch`` done (a mid-epoch checkpoint)
    global_cache: GlobalTokenCache | None = None   # the images' global tokens (use_global_cache)
    epoch_acc: dict | None = None       # the epoch's running sums, saved mid-epoch
    # divergence watch, kept on the device and read by check_divergence (no host sync per step)
    last_scale: torch.Tensor | None = None   # the GradScaler's scale at the previous iteration
    overflow_streak: torch.Tensor | int = 0  # iterations in a row that backed the scale off
    diverged: torch.Tensor | None = None     # [iteration the streak reached the limit, its scale]
    nonfinite_at: torch.Tensor | None = None  # first iteration with a non-finite loss (-1: none)


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


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way (``start``: samples to skip), so a
    mid-epoch checkpoint resumes with the batches an uninterrupted run would see next."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def make_loader(dataset, batch_size: int, num_workers: int, seed: int, ddp: dist.Dist,
                shuffle: bool = True) -> DataLoader:
    """Per-rank loader over a DistributedSampler (also for one process, so the order is the
    same function of (seed, epoch) in every setting); unreadable images are dropped. The
    loader draws its workers' seeds from a generator of its own (reseeded every epoch in
    ``train_one_epoch``), not from the training's random stream, so that starting it
    part-way through an epoch leaves that stream as an uninterrupted run has it."""
    sampler = ResumableSampler(dataset, num_replicas=ddp.world, rank=ddp.rank, shuffle=shuffle,
                               seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_skip_bad, pin_memory=ddp.device.type == "cuda",
                      drop_last=False, generator=torch.Generator(),
                      persistent_workers=False)


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
    if device.type == "cuda" and train_config.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True    # fixed shapes: the fastest algorithms pay
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


def use_global_cache(state: TrainState, dataset) -> None:
    """Keep the global tokens of ``dataset``'s images (indexed as the loader's ``index``) once
    CLIP gave them (``TrainConfig.global_cache``; engine/global_cache.py). Call before
    ``resume``, which restores the cache a checkpoint holds."""
    if not state.train_config.global_cache:
        return
    tokenizer = state.tokenizer
    clip = tokenizer.clip
    ident = cache_ident(getattr(dataset, "paths", range(len(dataset))),
                        clip.ident if clip is not None else "", tokenizer.config.global_topk,
                        tokenizer.config.global_metric, tokenizer.tok_embeddings_global.weight)
    state.global_cache = GlobalTokenCache(len(dataset), tokenizer.config.global_topk,
                                          tokenizer.config.n_global, ident)


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
def train_step(state: TrainState, x128: torch.Tensor, x_clip: torch.Tensor | None,
               lr: float, index: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """One generator update, then (once the GAN is on) one discriminator update.

    ``index``: the images' dataset indices; with a global cache (``use_global_cache``) their
    global tokens come from it once CLIP gave them, and ``x_clip`` (on any device) is used
    only for images not cached yet. Either way the discriminator step's fresh forward reuses
    the generator step's global tokens (``global_cache`` False: both run CLIP, the old way).

    Returns the detached loss terms and the codebook rows of the batch's local tokens.
    Divergence is watched on the device; ``check_divergence`` reads it."""
    for opt in (state.opt_g, state.opt_d):
        for group in opt.param_groups:
            group["lr"] = lr
    scaler, step = state.scaler, state.step
    grad_scale = loss_scale(state)
    cache = state.global_cache if state.train_config.global_cache else None
    global_idx = cache.lookup(index, state.device) if cache is not None and index is not None         else None
    if global_idx is None:
        x_clip = x_clip.to(state.device, non_blocking=True)
    # generator: L1 + VQ + LPIPS (+ adaptive-weighted GAN term); D is frozen for this step
    state.disc_loss.requires_grad_(False)
    with autocast(state):
        if global_idx is None:
            out = state.generator(x128, x_clip)
            if cache is not None and index is not None:
                cache.add(index, out["global_idx"])
        else:
            out = state.generator(x128, global_idx=global_idx)
        loss, logs = state.gen_loss(x128, out["rec"], out["vq_loss"], step,
                                    discriminator=state.disc_loss.discriminator,
                                    last_layer=state.tokenizer.last_layer(),
                                    grad_scale=grad_scale)
    state.opt_g.zero_grad(set_to_none=True)
    finite = torch.isfinite(loss.detach())
    if scaler.is_enabled():
        # a non-finite loss is an overflow: NaN gradients make the GradScaler skip the step
        scaled = scaler.scale(loss) * torch.where(finite, 1.0, math.nan)
        scaled.backward()
    else:
        note_non_finite(finite, state)
        scaler.scale(loss).backward()
    scaler.step(state.opt_g)
    state.disc_loss.requires_grad_(True)
    # discriminator: hinge loss on real images vs reconstructions
    if state.gen_loss.gan_active(step):
        fake = out["rec"]
        if state.train_config.disc_fresh_forward:   # the authors: reconstruct with the updated G
            with torch.no_grad(), autocast(state):
                if state.train_config.global_cache:    # CLIP's answer is the one just used
                    fake = state.tokenizer(x128, global_idx=out["global_idx"])["rec"]
                else:
                    fake = state.tokenizer(x128, x_clip)["rec"]
        with autocast(state):
            disc_logs = state.critic(x128, fake)
        state.opt_d.zero_grad(set_to_none=True)
        scaler.scale(disc_logs["d_loss"]).backward()
        scaler.step(state.opt_d)
        logs |= {k: v.detach() for k, v in disc_logs.items()}
    scaler.update()
    return logs, out["rows"]


def _scale_tensor(scaler: torch.amp.GradScaler, device: torch.device) -> torch.Tensor:
    """The GradScaler's current scale as a 0-d device tensor (``get_scale`` would read it to
    the host: a wait for the device every iteration)."""
    if scaler._get_scale_async() is None:
        scaler._lazy_init_scale_growth_tracker(device)
    return scaler._get_scale_async().detach().reshape(()).clone()


def loss_scale(state: TrainState) -> torch.Tensor | float:
    """The GradScaler's scale for this iteration (1.0 without loss scaling), a device tensor.
    Counts on the device the iterations in a row that backed it off (each skipped); when the
    count reaches ``max_overflow_steps`` the iteration and scale are recorded, and
    ``check_divergence`` stops training. The scale is the same on every rank (it follows the
    all-reduced gradients), so is the decision."""
    scaler = state.scaler
    if not scaler.is_enabled():
        return 1.0
    scale = _scale_tensor(scaler, state.device)
    if state.diverged is None:
        state.diverged = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=state.device)
    if state.last_scale is not None:
        streak = torch.where(scale < state.last_scale, state.overflow_streak + 1, 0)
        hit = (streak >= state.train_config.max_overflow_steps) & (state.diverged[0] < 0)
        state.diverged = torch.where(hit, torch.stack([torch.full_like(scale, state.step, dtype=torch.float64),
                                                 scale.double()]),
                                     state.diverged)
        state.overflow_streak = streak
    state.last_scale = scale
    return scale


def note_non_finite(finite: torch.Tensor, state: TrainState) -> None:
    """Without loss scaling: record on the device the first iteration whose loss is not
    finite (``check_divergence`` stops training then)."""
    if state.nonfinite_at is None:
        state.nonfinite_at = torch.tensor(-1, dtype=torch.long, device=state.device)
    state.nonfinite_at = torch.where(~finite & (state.nonfinite_at < 0), state.step,
                                     state.nonfinite_at)


def check_divergence(state: TrainState) -> None:
    """Stop every rank with one line when training diverged since the start: under loss
    scaling the last ``max_overflow_steps`` iterations before some iteration all overflowed
    (and were skipped); without it, a loss on some rank was not finite. A collective (every
    rank calls it at the same iterations: logging steps, epoch ends, before a checkpoint),
    and the one place the divergence watch is read to the host, so the iterations between
    two checks run on (a diverged state is never saved)."""
    if state.diverged is not None:
        at, scale = state.diverged.tolist()
        if at >= 0:
            limit = state.train_config.max_overflow_steps
            stop_every_rank(f"training diverged: the last {limit} iterations before iteration "
                            f"{int(at)} overflowed in fp16 and were skipped (loss scale down to "
                            f"{scale:g}); resume from the last checkpoint with a lower --lr or "
                            "--amp bf16", state.ddp)
    if state.scaler.is_enabled():
        return
    at = state.nonfinite_at if state.nonfinite_at is not None else \
        torch.tensor(-1, dtype=torch.long, device=state.device)
    flag = (at >= 0).to(torch.float32).reshape(1)
    bad = int(dist.all_reduce_sum(flag, state.ddp).item())
    if bad:
        steps = [s for s in dist.all_gather_objects(int(at), state.ddp) if s >= 0]
        first = min(steps)
        where = f" on {steps.count(first)} of {state.ddp.world} processes" \
            if state.ddp.active else ""
        stop_every_rank(f"training diverged: non-finite loss at iteration {first}{where}; "
                        "resume from the last checkpoint with a lower --lr", state.ddp)


def stop_every_rank(message: str, ddp: dist.Dist) -> None:
    """Stop a decision every rank took alike: rank 0 raises the one error line, the other
    ranks leave with the same exit status, silently."""
    if ddp.is_main:
        raise V2LError(message)
    raise SystemExit(2)


# ---- one epoch ---------------------------------------------------------------------------
def train_one_epoch(state: TrainState, loader: DataLoader, ddp: dist.Dist, run_log: "RunLog",
                    save=None) -> dict:
    """Run epoch ``state.epoch`` (from batch ``state.batch_in_epoch`` on, after a mid-epoch
    checkpoint); return its summary (mean losses, codebook usage). ``save``: called every
    ``save_every`` iterations inside the epoch (a collective writing the mid-epoch
    checkpoint); the epoch's end is the caller's to save."""
    train_config = state.train_config
    sampler = loader.sampler
    sampler.set_epoch(state.epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(sampler.seed * 100003 + state.epoch * 1009 + ddp.rank)
    full = math.ceil(sampler.num_samples / loader.batch_size)
    n_iter = full if train_config.max_steps_per_epoch is None \
        else min(full, train_config.max_steps_per_epoch)
    start = state.batch_in_epoch
    if start and not isinstance(sampler, ResumableSampler):
        raise V2LError("resuming part-way through an epoch needs the loader of make_loader")
    if isinstance(sampler, ResumableSampler):
        sampler.start = start * loader.batch_size
    state.tokenizer.train()
    state.disc_loss.train()
    acc = epoch_accumulators(state, ddp.device)
    used, sums, window = acc["used"], acc["sums"], acc["window"]
    bar = tqdm(total=n_iter, initial=start, desc=f"epoch {state.epoch}", disable=not ddp.is_main,
               leave=False)
    i = start
    for i, batch in enumerate(loader, start=start):
        if i >= n_iter:
            break
        acc["skipped"] += batch["n_skipped"]
        if "image" not in batch:
            if ddp.active:
                raise V2LError("a whole batch of images was unreadable (files named above); "
                               "remove them from the data folder and rerun to resume")
            continue
        x128, x_clip = batch["image"]
        x128 = x128.to(ddp.device, non_blocking=True)
        if train_config.channels_last:
            x128 = x128.contiguous(memory_format=torch.channels_last)
        lr = lr_at(state.epoch + i / n_iter, train_config)
        try:
            logs, rows = train_step(state, x128, x_clip, lr, index=batch["index"])
        except (V2LError, SystemExit):
            bar.close()                 # so that the error line starts a line of its own
            raise
        used[rows.reshape(-1)] = True
        # an iteration the GradScaler skipped (non-finite loss) stays out of the means
        finite = torch.isfinite(logs["loss"])
        for k, v in logs.items():
            v = torch.where(finite, v.float(), 0.0)
            sums[k] = sums.get(k, 0) + v
            window[k] = window.get(k, 0) + v
        window["_n"] = window.get("_n", 0) + finite.float()
        acc["count"] += finite.float()
        acc["n_run"] += 1
        state.step += 1
        bar.update()
        if state.step % train_config.log_every == 0:
            checked(state, bar)
            means = reduce_means(window, ddp)
            window.clear()
            run_log.write({"step": state.step, "epoch": state.epoch, "lr": lr, **means})
            bar.set_postfix(loss=f"{means['loss']:.4f}")
            if state.global_cache is not None:
                state.global_cache.flush()
        if save is not None and train_config.save_every and \
                state.step % train_config.save_every == 0 and i + 1 < n_iter:
            state.batch_in_epoch, state.epoch_acc = i + 1, acc
            checked(state, bar)
            save()
            state.epoch_acc = None
    bar.close()
    checked(state, bar)
    if state.global_cache is not None:
        state.global_cache.sync(ddp)
    count = acc["count"]
    summary = reduce_means({**sums, "_n": count.clamp(min=1)}, ddp)
    used_all = dist.all_reduce_sum(used.float(), ddp) > 0
    skipped_all = dist.all_reduce_sum(
        torch.tensor([float(acc["skipped"]), float(acc["n_run"]) - float(count)],
                     device=ddp.device), ddp)
    summary |= {"codebook_used": int(used_all.sum()), "codebook_size": len(used_all),
                "skipped_images": int(skipped_all[0])}
    if state.scaler.is_enabled():   # iterations the GradScaler skipped for a non-finite loss
        summary["overflow_steps"] = int(skipped_all[1])
    state.epoch += 1
    state.batch_in_epoch, state.epoch_acc = 0, None
    return summary


def checked(state: TrainState, bar) -> None:
    """``check_divergence``, closing the progress bar first when it stops training."""
    try:
        check_divergence(state)
    except (V2LError, SystemExit):
        bar.close()
        raise


def epoch_accumulators(state: TrainState, device: torch.device) -> dict:
    """The epoch's running sums: restored from a mid-epoch checkpoint, else zero."""
    saved = state.epoch_acc
    state.epoch_acc = None
    if saved is not None:
        return {"used": saved["used"].to(device), "skipped": saved["skipped"],
                "n_run": saved["n_run"], "count": saved["count"].to(device),
                "sums": {k: v.to(device) for k, v in saved["sums"].items()},
                "window": {k: v.to(device) for k, v in saved["window"].items()}}
    return {"used": torch.zeros(len(state.tokenizer.llm_ids), dtype=torch.bool, device=device),
            "skipped": 0, "n_run": 0, "count": torch.zeros((), device=device),
            "sums": {}, "window": {}}


def _acc_to_cpu(acc: dict | None) -> dict | None:
    if acc is None:
        return None
    return {"used": acc["used"].cpu(), "skipped": int(acc["skipped"]), "n_run": int(acc["n_run"]),
            "count": acc["count"].cpu(), "sums": {k: v.cpu() for k, v in acc["sums"].items()},
            "window": {k: torch.as_tensor(v).cpu() for k, v in acc["window"].items()}}


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
    its RNG states and, mid-epoch, its running sums of the epoch; rank 0 writes), and a copy
    ``epoch_NNNN.pt`` every ``keep_every`` epochs (at an epoch's end)."""
    check_divergence(state)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if state.device.type == "cuda" else None}
    mine = {"rng": rng, "epoch_acc": _acc_to_cpu(state.epoch_acc)}
    if state.global_cache is not None:
        state.global_cache.sync(ddp)
    gathered = dist.all_gather_objects(mine, ddp)
    if ddp.is_main:
        write_checkpoint(ckpt_dir / "last.pt", key, {
            "train_config": asdict(state.train_config), "loss_weights": asdict(state.gen_loss.w),
            "model": state.tokenizer.state_dict(),   # CLIP is not part of it
            "discriminator": state.disc_loss.state_dict(),
            "opt_g": state.opt_g.state_dict(), "opt_d": state.opt_d.state_dict(),
            "scaler": state.scaler.state_dict(), "epoch": state.epoch, "step": state.step,
            "batch_in_epoch": state.batch_in_epoch,
            "epoch_acc": [g["epoch_acc"] for g in gathered],
            "global_cache": state.global_cache.state_dict() if state.global_cache else None,
            "world": ddp.world, "rng": [g["rng"] for g in gathered]})
        if keep_every and state.batch_in_epoch == 0 and state.epoch % keep_every == 0:
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
    state.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
    accs = ckpt.get("epoch_acc") or [None]
    state.epoch_acc = accs[ddp.rank] if len(accs) == ddp.world else None
    if state.global_cache is not None and ckpt.get("global_cache"):
        state.global_cache.load_state_dict(ckpt["global_cache"])
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
        within = f" (batch {state.batch_in_epoch} of the epoch)" if state.batch_in_epoch else ""
        print(f"resuming from {path}: epoch {state.epoch}{within}, iteration {state.step}",
              file=sys.stderr)
    return True


def truncate_log(path: Path, step: int) -> None:
    """Drop log records past ``step`` (left by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in keep), encoding="utf-8")
