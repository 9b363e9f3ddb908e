"""bench/scale.py at its tiny setting: every stage's row is printed, with finite numbers."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["step1", "step2", "step3", "step4", "fewshot", "denoising", "captioning", "vqa",
          "step5", "eval_compression", "step7", "step7_trained", "eval_llava"]


@pytest.mark.slow
def test_scale_prints_every_stage_finite():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--tiny", "true",
                          "--layers", "1", "--iters", "1", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in STAGES}
    assert sorted(rows) == sorted(STAGES)
    for stage, cols in rows.items():
        rate, peak = float(cols[1]), float(cols[3])
        assert math.isfinite(rate) and rate > 0 and math.isfinite(peak) and peak > 0, stage
        assert "projected, 1 of" in " ".join(cols) or stage in ("step3", "step4"), stage
    summary = [line for line in lines if line.startswith("bench scale: ")]
    assert len(summary) == 1
    values = dict(kv.split("=") for kv in summary[0].split()[2:])
    for key in ("step4_it_s", "step3_img_s", "fewshot_tok_s", "step5_steps_s", "step7_samples_s",
                "step7_trained_samples_s", "llava_q_s"):
        assert math.isfinite(float(values[key])) and float(values[key]) > 0
    assert all(math.isfinite(float(values[f"{s}_projected_h"])) for s in STAGES)


def test_workloads_follow_the_paper_counts():
    sys.path.insert(0, str(ROOT / "bench"))
    import scale
    work, batch, _ = scale.llm_workload("fewshot")
    assert batch == 8 and len(work) == 12 * 3
    assert sum(c for c, _, _ in work) == 12 * 3 * 1000
    # 5-way 5-shot with k = 21: 26 images of 21 words each dominate the longest prompt
    assert max(p for _, p, _ in work) > 26 * 21 * scale.TOKENS_PER_WORD
    work, _, _ = scale.llm_workload("step1")
    assert work[0][0] == 2 * 32000
    work, _, _ = scale.llm_workload("denoising")
    assert sum(c for c, _, _ in work) == 5000 * (32 + 64 + 3 * 128)
