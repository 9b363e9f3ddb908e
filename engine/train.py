"""Training engine for the V2L tokenizer (MAE-style): one epoch at a time, exact resume.

Per iteration: the tokenizer reconstructs the batch; the generator loss
(``models.losses.GeneratorLoss``) updates the trainable tokenizer parts with Adam
(betas 0.5, 0.9); from ``disc_start`` on, the PatchGAN discriminator takes a
hinge-loss step with its own Adam. The learning rate of both follows
``lr_at``: linear warm-up, then a half-cycle cosine to ``min_lr``, set every
iteration from the fractional epoch.

Mixed precision on GPUs: bf16 autocast, or fp16 autocast with a GradScaler.
On CPU everything runs in float32. Under torchrun both networks are wrapped in
DistributedDataParallel (gradients averaged over ranks).

A checkpoint (``save_checkpoint``) holds everything an exact resume needs: the
tokenizer's own weights (not the frozen CLIP, which is reloaded), the
discriminator, both optimisers, the GradScaler, the epoch and iteration
counters, every rank's RNG states (torch, CUDA, numpy, python) and the
sampler epoch. Resuming from the checkpoint written after epoch e reproduces
epoch e + 1 of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data.images import collate_skip_bad
from models.losses import DiscriminatorLoss, GeneratorLoss
from utils import dist as udist
from utils.artifacts import atomic_path, save_torch
from utils.errors import V2LError
from utils.figures import save_image_grid

CHECKPOINT_FORMAT = "v2l-tokenizer-train-v1"


@dataclass
class TrainConfig:
    epochs: int = 100
    warmup_epochs: int = 5
    lr: float = 4.5e-4
    min_lr: float = 0.0
    betas: tuple = (0.5, 0.9)
    amp: str = "bf16"                      # "bf16", "fp16" or "none" (GPU only; CPU runs fp32)
    log_every: int = 50                    # iterations between log records
    max_steps_per_epoch: int | None = None  # cut epochs short (quick runs)
    find_unused_parameters: bool = False    # DDP option, for architectures with unused branches
    channels_last: bool = False             # NHWC memory layout for the convolutions


def lr_at(epoch: float, cfg: TrainConfig) -> float:
    """Learning rate at a fractional epoch: linear warm-up, then half-cycle cosine to min_lr."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * epoch / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    progress = min((epoch - cfg.warmup_epochs) / span, 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_loader(dataset, batch_size: int, num_workers: int, seed: int, d: udist.Dist,
                shuffle: bool = True) -> DataLoader:
    """Per-rank loader over a DistributedSampler (also for one process, so the order is the
    same function of (seed, epoch) in every setting); unreadable images are dropped."""
    sampler = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=shuffle,
                                 seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_skip_bad, pin_memory=d.device.type == "cuda",
                      drop_last=False)


@dataclass
class Training:
    """Everything one training run updates, plus where it logs."""
    tokenizer: nn.Module
    gen_loss: GeneratorLoss
    disc: DiscriminatorLoss
    cfg: TrainConfig
    dist: udist.Dist
    out_dir: Path | None = None
    opt_g: torch.optim.Optimizer = field(init=False)
    opt_d: torch.optim.Optimizer = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)
    epoch: int = 0                      # next epoch to run
    step: int = 0                       # iterations done
    _writer: object = field(default=None, init=False)

    def __post_init__(self):
        dev = self.dist.device
        self.tokenizer.to(dev)
        self.disc.to(dev)
        if self.cfg.channels_last:
            self.tokenizer.to(memory_format=torch.channels_last)
            self.disc.to(memory_format=torch.channels_last)
        params = list(self.tokenizer.trainable_parameters())
        # foreach: one multi-tensor kernel per Adam operation instead of one per parameter
        self.opt_g = torch.optim.Adam(params, lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                      foreach=True)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=self.cfg.lr,
                                      betas=tuple(self.cfg.betas), foreach=True)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16)
        if self.dist.active:
            ids = [dev.index] if dev.type == "cuda" else None
            self.gen = DDP(self.tokenizer, device_ids=ids,
                           find_unused_parameters=self.cfg.find_unused_parameters)
            self.disc_ddp = DDP(self.disc, device_ids=ids)
        else:
            self.gen, self.disc_ddp = self.tokenizer, self.disc

    @property
    def amp_dtype(self) -> torch.dtype | None:
        if self.dist.device.type != "cuda" or self.cfg.amp == "none":
            return None
        if self.cfg.amp not in ("bf16", "fp16"):
            raise V2LError(f"--amp {self.cfg.amp}: expected bf16, fp16 or none")
        return torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16

    def autocast(self):
        dt = self.amp_dtype
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=dt)

    # ---- logging ---------------------------------------------------------------------
    def writer(self):
        if self._writer is None and self.dist.is_main and self.out_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.step)
        return self._writer

    def log(self, record: dict, prefix: str = "train") -> None:
        """One JSONL line and TensorBoard scalars ``<prefix>/<key>`` per record (rank 0)."""
        if not self.dist.is_main or self.out_dir is None:
            return
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": prefix, **record}) + "\n")
        w = self.writer()
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                w.add_scalar(f"{prefix}/{k}", v, record["step"])
        w.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ---- one iteration -----------------------------------------------------------------
    def train_step(self, x128: torch.Tensor, x_clip: torch.Tensor, lr: float) -> tuple[dict, torch.Tensor]:
        for opt in (self.opt_g, self.opt_d):
            for g in opt.param_groups:
                g["lr"] = lr
        gan = self.gen_loss.gan_active(self.step)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.disc.requires_grad_(False)            # the generator step does not train D
        with self.autocast():
            out = self.gen(x128, x_clip)
            loss, logs = self.gen_loss(x128, out["rec"], out["vq_loss"], self.step,
                                       discriminator=self.disc.discriminator,
                                       last_layer=self.tokenizer.last_layer(), grad_scale=scale)
        if not torch.isfinite(loss):
            raise V2LError(f"training diverged: non-finite loss at iteration {self.step}; resume "
                           "from the last checkpoint with a lower --lr or --amp bf16")
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt_g)
        if gan:
            self.disc.requires_grad_(True)
            with self.autocast():
                d = self.disc_ddp(x128, out["rec"])
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler.scale(d["d_loss"]).backward()
            self.scaler.step(self.opt_d)
            logs |= {k: v.detach() for k, v in d.items()}
        self.scaler.update()
        self.disc.requires_grad_(True)
        return logs, out["local_ids"]

    # ---- one epoch ---------------------------------------------------------------------
    def train_one_epoch(self, loader: DataLoader) -> dict:
        """Run epoch ``self.epoch``; return its summary (mean losses, codebook usage)."""
        d, cfg = self.dist, self.cfg
        loader.sampler.set_epoch(self.epoch)
        n_iter = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        self.tokenizer.train()
        self.disc.train()
        used = torch.zeros(len(self.tokenizer.llm_ids), dtype=torch.bool, device=d.device)
        sums: dict[str, torch.Tensor] = {}
        window: dict[str, torch.Tensor] = {}
        skipped = count = 0
        bar = tqdm(total=n_iter, desc=f"epoch {self.epoch}", disable=not d.is_main, leave=False)
        for i, batch in enumerate(loader):
            if i >= n_iter:
                break
            skipped += batch["n_skipped"]
            if "image" not in batch:
                if d.active:
                    raise V2LError("a whole batch of images was unreadable (files named above); "
                                   "remove them from the data folder and rerun to resume")
                continue
            x128, x_clip = (t.to(d.device, non_blocking=True) for t in batch["image"])
            if cfg.channels_last:
                x128 = x128.contiguous(memory_format=torch.channels_last)
            lr = lr_at(self.epoch + i / n_iter, cfg)
            logs, local_ids = self.train_step(x128, x_clip, lr)
            used[self.tokenizer.rows_from_llm_ids(local_ids.reshape(-1))] = True
            for k, v in logs.items():
                v = v.float()
                sums[k] = sums.get(k, 0) + v
                window[k] = window.get(k, 0) + v
            window["_n"] = window.get("_n", 0) + 1
            count += 1
            self.step += 1
            bar.update()
            if self.step % cfg.log_every == 0:
                rec = self._reduce_means(window)
                window = {}
                self.log({"step": self.step, "epoch": self.epoch, "lr": lr, **rec})
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
        bar.close()
        summary = self._reduce_means({**sums, "_n": max(count, 1)})
        used_all = udist.all_reduce_sum(used.float(), d) > 0
        summary |= {"codebook_used": int(used_all.sum()), "codebook_size": len(used_all),
                    "skipped_images": int(udist.all_reduce_sum(torch.tensor(float(skipped), device=d.device), d))}
        self.epoch += 1
        return summary

    def _reduce_means(self, sums: dict) -> dict:
        """Per-key means over the iterations and ranks (a collective: every rank calls it)."""
        keys = sorted(k for k in sums if k != "_n")
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.dist.device)
                           for k in keys] + [torch.tensor(float(sums["_n"]), device=self.dist.device)])
        vec = udist.all_reduce_sum(vec, self.dist)
        return {k: float(vec[j] / vec[-1]) for j, k in enumerate(keys)}

    # ---- samples -----------------------------------------------------------------------
    @torch.no_grad()
    def save_samples(self, x128: torch.Tensor, x_clip: torch.Tensor, path: Path) -> list[list[str]]:
        """PNG grid: originals (top row) over reconstructions; returns the images' global words."""
        self.tokenizer.eval()
        x128, x_clip = x128.to(self.dist.device), x_clip.to(self.dist.device)
        with self.autocast():
            gidx, local_ids = self.tokenizer.encode(x128, x_clip)
            rec = self.tokenizer.decode(local_ids, global_idx=gidx)
        save_image_grid(torch.cat([x128, rec.float()]), path, per_line=len(x128))
        self.tokenizer.train()
        return self.tokenizer.global_strings(gidx)

    # ---- checkpoints -------------------------------------------------------------------
    def state(self, model_config: dict, extra: dict | None = None) -> dict | None:
        """The full resume state (a collective: every rank contributes its RNG states);
        returned on rank 0, None elsewhere."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
               "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state() if self.dist.device.type == "cuda" else None}
        all_rng = udist.all_gather_objects(rng, self.dist)
        if not self.dist.is_main:
            return None
        return {"format": CHECKPOINT_FORMAT, "config": model_config,
                "train_config": asdict(self.cfg), "loss_weights": asdict(self.gen_loss.w),
                "model": self.tokenizer.state_dict(),   # CLIP is not part of it
                "discriminator": self.disc.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
                "sampler_epoch": self.epoch, "world": self.dist.world, "rng": all_rng,
                **(extra or {})}

    def load_state(self, ckpt: dict, model_config: dict, source: str) -> None:
        """Restore a ``state()`` dict; refuse one made for another architecture."""
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise V2LError(f"{source}: not a tokenizer training checkpoint; move it away or "
                           "choose another --out_dir")
        diff = sorted(k for k in set(model_config) | set(ckpt["config"])
                      if model_config.get(k) != ckpt["config"].get(k))
        if diff:
            shown = ", ".join(f"{k}: {ckpt['config'].get(k)!r} there vs {model_config.get(k)!r} now"
                              for k in diff[:4])
            raise V2LError(f"{source}: checkpoint of another tokenizer architecture ({shown}); "
                           "use the same settings to resume, or another --out_dir to start anew")
        try:
            self.tokenizer.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise V2LError(f"{source}: checkpoint weights do not fit this tokenizer "
                           f"({str(e).splitlines()[1].strip()}); use another --out_dir")
        self.disc.load_state_dict(ckpt["discriminator"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        rngs = ckpt["rng"]
        if len(rngs) != self.dist.world:
            print(f"warning: {source} was written by {len(rngs)} processes, resuming with "
                  f"{self.dist.world}: the data order is the same, the random streams are not",
                  file=sys.stderr)
        rng = rngs[self.dist.rank % len(rngs)]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic write (a killed run never leaves a half-written checkpoint)."""
    save_torch(path, state)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign files raise zip/pickle errors of many kinds
        raise V2LError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]}); delete it to "
                       "start over, or restore a copy")


def truncate_log(path: Path, step: int) -> None:
    """Drop log records past ``step`` (left by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in keep), encoding="utf-8")
