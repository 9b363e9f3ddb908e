"""utils/dist.py under torchrun on the CPU (gloo, 2 processes): waits without a deadline for
work that one rank does alone, the collective timeout from DIST_TIMEOUT_MIN, a failure in
rank 0's phase stopping every rank, and a bad DIST_TIMEOUT_MIN."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils import dist
from utils.errors import V2LError

ROOT = Path(__file__).resolve().parent.parent


def _torchrun(phase: str, timeout_min: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
           "DIST_TIMEOUT_MIN": timeout_min}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(ROOT / "tests" / "dist_worker.py"), phase],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_rank0_alone_longer_than_the_collective_timeout_does_not_stop_the_job():
    t0 = time.time()
    r = _torchrun("long_main_phase", "0.05")     # a 3-second collective timeout
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "rank 0: survived" in r.stdout and "rank 1: survived" in r.stdout
    assert "rank 1: the collective timed out" in r.stdout     # the timeout is really that short
    assert time.time() - t0 < 120


def test_an_error_in_rank0s_phase_stops_every_rank_with_its_line():
    r = _torchrun("main_error", "1")
    assert r.returncode != 0 and "not reached" not in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: scores.json: unreadable; rerun"] * 2, r.stderr[-3000:]


@pytest.mark.parametrize("value,minutes", [("", dist.DEFAULT_TIMEOUT_MIN), ("90", 90.0),
                                           ("0.5", 0.5), ("ten", None), ("0", None), ("-3", None)])
def test_timeout_setting(monkeypatch, value, minutes):
    monkeypatch.setenv("DIST_TIMEOUT_MIN", value)
    if minutes is None:
        with pytest.raises(V2LError, match="DIST_TIMEOUT_MIN=.*positive number of minutes"):
            dist.timeout_minutes()
    else:
        assert dist.timeout_minutes() == minutes
