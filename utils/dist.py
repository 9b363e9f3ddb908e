"""torchrun-aware process group setup: NCCL on GPUs, gloo on CPU, a no-op for one process.

Time limits. A collective (all-reduce, all-gather) fails when one rank waits for the
others longer than the process group's timeout: ``DIST_TIMEOUT_MIN`` minutes, from the
environment (run.sh sets it; default ``DEFAULT_TIMEOUT_MIN``). Waiting for the others'
*work* is not a collective here: ``barrier`` (after uneven per-rank work) and
``wait_for_main`` (a phase rank 0 runs alone: scoring, gathering, writing an artifact)
poll a key in the rendezvous store (torchrun's TCP store) with no deadline, so a phase of
any length never trips the timeout. A rank that dies still stops the job: torchrun ends
the other processes of its node, and a waiting rank stops with one line when another
rank's heartbeat (a counter each rank bumps in the store every few seconds) has not moved
for the timeout.

Shared output. With more than one process, ``init(device, out_dir)`` checks that every
rank sees the same output folder: rank 0 writes a file holding a random token into it,
the token goes to every rank through the process group, every rank reads the file, and
the verdicts are gathered, so that every rank stops (one line per node) when any rank
sees another folder. Rank 0 gathers every rank's chunks there, writes the manifests and
the training checkpoints every rank resumes from: several nodes need one output folder
shared by all of them (a network file system mounted at the same path).
"""
from __future__ import annotations

import atexit
import math
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as tdist

from utils.errors import V2LError

T = TypeVar("T")

DEFAULT_TIMEOUT_MIN = 30.0   # minutes a collective may wait (DIST_TIMEOUT_MIN overrides)
POLL_MAX_S = 1.0             # longest pause between two looks at the store while waiting
KEY = "v2l/"                 # the prefix of this module's keys in the rendezvous store


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_MIN * 60
    waits: int = field(default=0, repr=False)   # store waits so far (the same count on every rank)
    heartbeat: threading.Event | None = field(default=None, repr=False)   # set: heartbeat stops

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def next_key(self, kind: str) -> str:
        self.waits += 1
        return f"{KEY}{kind}/{self.waits}"


def timeout_minutes() -> float:
    """The collective timeout in minutes: DIST_TIMEOUT_MIN from the environment (a positive
    number; fractions allowed), else DEFAULT_TIMEOUT_MIN."""
    text = os.environ.get("DIST_TIMEOUT_MIN", "").strip()
    if not text:
        return DEFAULT_TIMEOUT_MIN
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise V2LError(f"DIST_TIMEOUT_MIN={text!r}: expected a positive number of minutes "
                       f"(default {DEFAULT_TIMEOUT_MIN:g}); set it in run.sh or the environment")
    return value


def init(device: str = "auto", out_dir=None) -> Dist:
    """Join the torchrun process group if there is one; pick this rank's device.

    device: "auto" (CUDA when available, else CPU), "cpu", or "cuda".
    out_dir: the stage's output folder; with several processes every rank must see the same
    one (``check_shared_output``), else every rank stops with one line.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    minutes = timeout_minutes()
    d = Dist(rank, world, local_rank, dev, timeout_s=minutes * 60)
    if world > 1 and not tdist.is_initialized():
        extra = {"device_id": dev} if use_cuda else {}   # NCCL binds this rank to its GPU now
        tdist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=minutes),
                                 **extra)
    if d.active:
        d.heartbeat = _start_heartbeat(d)
        if out_dir is not None:
            check_shared_output(d, out_dir)
    return d


FAST_BF16_CAPABILITIES = ("AVX512",)   # ATen CPU kernels that keep bf16 native where the CPU has it
# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) under which its bf16 matmuls stay native
ONEDNN_BF16_ISAS = ("ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX",
                    "AVX10_1_512_AMX_FP16")


def native_bf16(device) -> bool:
    """Whether bf16 runs natively on ``device``: a CUDA GPU that supports bf16, or a CPU with
    AVX512-BF16 or AMX whose ATen kernels run at AVX-512 (``get_cpu_capability()``, which
    ``ATEN_CPU_CAPABILITY=avx2`` lowers) and whose oneDNN, which runs the bf16 matmuls, is not
    capped below bf16 (``ONEDNN_MAX_CPU_ISA``). Elsewhere bf16 is emulated, slower than fp32.
    The variables rehearse a CPU without native bf16 on one that has it
    (docs/performance_llm.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    hardware = any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL"
    return (hardware and torch.backends.cpu.get_cpu_capability() in FAST_BF16_CAPABILITIES
            and isa.strip().upper() in ONEDNN_BF16_ISAS)


# ------------------------------------------------------------ waits without a deadline --

def _store():
    return tdist.distributed_c10d._get_default_store()


def _heartbeat_interval(d: Dist) -> float:
    return max(0.2, min(10.0, d.timeout_s / 6))


def _start_heartbeat(d: Dist) -> threading.Event:
    """A daemon thread that bumps this rank's counter in the store until the event is set."""
    stop, store, key = threading.Event(), _store(), f"{KEY}alive/{d.rank}"

    def beat():
        while not stop.is_set():
            try:
                store.add(key, 1)
            except Exception:   # the store is gone: the job is ending
                return
            stop.wait(_heartbeat_interval(d))
    thread = threading.Thread(target=beat, name="v2l-heartbeat", daemon=True)
    thread.start()

    def stop_at_exit():   # a process leaving without shutdown() must not end mid-call to the store
        stop.set()
        thread.join(timeout=30)
    atexit.register(stop_at_exit)
    return stop


def _wait(d: Dist, key: str, want: int, what: str) -> None:
    """Poll the store until the counter ``key`` reaches ``want``; no deadline while every rank's
    heartbeat moves, one line naming the rank when one has been silent for the timeout."""
    store, pause = _store(), 0.01
    seen = {}   # rank -> (heartbeat count, when it last changed)
    looked = -math.inf
    try:
        while store.add(key, 0) < want:
            now = time.monotonic()
            if now - looked >= _heartbeat_interval(d):   # the others' heartbeats, now and then
                looked = now
                for r in range(d.world):
                    count = store.add(f"{KEY}alive/{r}", 0)
                    if seen.get(r, (None,))[0] != count:
                        seen[r] = (count, now)
                    elif now - seen[r][1] > d.timeout_s:
                        raise V2LError(
                            f"rank {d.rank}: rank {r} stopped while the others waited for {what} "
                            f"(no sign of life for {d.timeout_s / 60:g} min, DIST_TIMEOUT_MIN); "
                            "see its error on its node")
            time.sleep(pause)
            pause = min(2 * pause, POLL_MAX_S)
    except V2LError:
        raise
    except Exception as e:   # the store is gone: the node that held it stopped
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise V2LError(f"rank {d.rank}: lost the other ranks while waiting for {what} ({first}); "
                       "see the first error above or on the other nodes") from None


def barrier(d: Dist, what: str = "the other ranks") -> None:
    """Wait until every rank has arrived here, for as long as it takes (uneven per-rank work:
    no collective timeout applies, see the module docstring)."""
    if not d.active:
        return
    key = d.next_key("barrier")
    _store().add(key, 1)
    _wait(d, key, d.world, what)


def wait_for_main(d: Dist, work: Callable[[], T], what: str) -> T | None:
    """Rank 0 runs ``work()`` alone while the other ranks wait for it with no deadline; returns
    its result on rank 0, None elsewhere. A V2LError in ``work`` stops every rank with its
    message (any other failure: with a line pointing at rank 0's error)."""
    if not d.active:
        return work()
    key = d.next_key("main")
    store = _store()
    if d.is_main:
        try:
            result = work()
        except BaseException as e:
            message = str(e) if isinstance(e, V2LError) else \
                f"rank 0 failed during {what} ({type(e).__name__}); see its error"
            store.set(key + "/error", message)
            store.add(key, 1)
            raise
        store.add(key, 1)
        return result
    _wait(d, key, 1, what)
    if store.check([key + "/error"]):
        raise V2LError(store.get(key + "/error").decode())
    return None


def fail_once_per_node(d: Dist, message: str) -> None:
    """Stop this rank: one error line per node (from its local rank 0), exit status 2 on all."""
    if d.local_rank == 0:
        raise V2LError(message)
    sys.exit(2)


def check_shared_output(d: Dist, out_dir) -> None:
    """Every rank must see the folder rank 0 writes into (module docstring): rank 0 writes a
    random token there, every rank reads it back, and all ranks stop when any does not."""
    out_dir = Path(out_dir)
    token, problem = None, None
    if d.is_main:
        token = secrets.token_hex(16)
        probe = out_dir / f".shared-output-check-{token}"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(probe, "w", encoding="ascii") as f:
                f.write(token)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            token, problem = None, f"cannot write into it ({e.strerror or e})"
    token, problem = all_gather_objects((token, problem), d)[0]
    seen = None
    if token is not None:
        probe = out_dir / f".shared-output-check-{token}"
        for attempt in range(20):   # a network file system may show a new file a moment late
            try:
                seen = probe.read_text(encoding="ascii")
            except OSError:
                seen = None
            if seen == token or d.is_main:
                break
            time.sleep(0.25)
    verdicts = all_gather_objects((seen == token, socket.gethostname()), d)
    if d.is_main and token is not None:
        (out_dir / f".shared-output-check-{token}").unlink(missing_ok=True)
    if problem is not None:
        fail_once_per_node(d, f"output folder {out_dir}: rank 0 ({verdicts[0][1]}) {problem}; "
                              "fix the path or its permissions")
    blind = [(r, host) for r, (ok, host) in enumerate(verdicts) if not ok]
    if blind:
        r, host = blind[0]
        others = f" (and {len(blind) - 1} more ranks)" if len(blind) > 1 else ""
        fail_once_per_node(
            d, f"output folder {out_dir}: rank {r} on {host}{others} does not see the file rank 0 "
               f"on {verdicts[0][1]} wrote there; all nodes need one output folder shared by all "
               "of them (a network file system mounted at the same path; OUT in run.sh)")


# ----------------------------------------------------------------------- collectives --

def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor over ranks in place (gloo needs it on CPU, NCCL on the GPU)."""
    if d.active:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: list[torch.Tensor], d: Dist) -> None:
    """Sum the parameters' gradients over the ranks, in one flat all-reduce (a missing gradient
    counts as zeros). A parameter without a gradient in every rank keeps none, as in one
    process (AdamW leaves it alone, moments and all). For a model DDP cannot wrap (adapters
    inside a frozen LLM)."""
    if not d.active or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in params])
    used = torch.tensor([p.grad is not None for p in params], dtype=flat.dtype, device=flat.device)
    flat = all_reduce_sum(torch.cat([flat, used]), d)
    grads = flat[:-len(params)].split([p.numel() for p in params])
    for p, g, u in zip(params, grads, flat[-len(params):].tolist()):
        p.grad = g.view_as(p).to(p.dtype, copy=True) if u else None


def all_gather_objects(obj, d: Dist) -> list:
    """Every rank's ``obj``, in rank order (a collective: call ``barrier`` first after uneven
    work, so that the wait is not subject to the timeout)."""
    if not d.active:
        return [obj]
    out = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


def shutdown(d: Dist) -> None:
    """Leave the process group once every rank is here (no rank leaves while rank 0 still
    writes the artifact the next stage reads)."""
    if d.active and tdist.is_initialized():
        barrier(d, "the end of the stage")
        if d.heartbeat is not None:
            d.heartbeat.set()
        tdist.destroy_process_group()
