"""Launched by tests/test_dist.py under torchrun (2 processes, gloo): phases of one job."""
import os
import sys
import time

import torch
import torch.distributed as tdist

from utils import dist
from utils.cli import run_main
from utils.errors import V2LError


def long_main_phase():
    """With a collective timeout of a few seconds: rank 0 working alone for longer, then a rank
    whose share of the work is longer, do not stop the job; the same wait in a collective does."""
    d = dist.init("cpu")
    pause = 2 * d.timeout_s

    def score():
        time.sleep(pause)
        return "scored"
    got = dist.wait_for_main(d, score, "scoring")
    assert got == ("scored" if d.is_main else None), got
    if d.rank == 1:
        time.sleep(pause)                 # uneven work before a barrier
    dist.barrier(d)
    total = dist.all_reduce_sum(torch.ones(1), d)
    assert total.item() == 2
    print(f"rank {d.rank}: survived", flush=True)
    if d.is_main:                         # the same wait as a collective: the timeout applies
        time.sleep(pause + 2)
        os._exit(0)
    try:
        tdist.barrier()
    except Exception:
        print("rank 1: the collective timed out", flush=True)
        os._exit(0)
    os._exit(1)


def main_error():
    """A V2LError in rank 0's phase stops every rank with its message."""
    d = dist.init("cpu")

    def fail():
        raise V2LError("scores.json: unreadable; rerun")
    dist.wait_for_main(d, fail, "scoring")
    print("not reached", flush=True)


if __name__ == "__main__":
    run_main({"long_main_phase": long_main_phase, "main_error": main_error}[sys.argv[1]])
