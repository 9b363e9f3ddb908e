"""torchrun-aware process group setup: NCCL on GPUs, gloo on CPU, a no-op for one process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; pick this rank's device.

    device: "auto" (CUDA when available, else CPU), "cpu", or "cuda".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, dev)


def native_bf16(device) -> bool:
    """Whether bf16 matrix products run natively on ``device``: a CUDA GPU that supports bf16,
    or a CPU with AVX512-BF16 or AMX (where bf16 is several times faster than fp32; elsewhere
    the CPU emulates it, slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def barrier(d: Dist) -> None:
    if d.active:
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks in place (gloo needs it on CPU, NCCL on the GPU)."""
    if d.active:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: list[torch.Tensor], d: Dist) -> None:
    """Sum the parameters' gradients over the ranks, in one flat all-reduce (a missing gradient
    counts as zeros). For a model DDP cannot wrap (adapters inside a frozen LLM)."""
    if not d.active:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in params])
    all_reduce_sum(flat, d)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def all_gather_objects(obj, d: Dist) -> list:
    if not d.active:
        return [obj]
    out = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


def shutdown(d: Dist) -> None:
    if d.active and tdist.is_initialized():
        tdist.destroy_process_group()
