"""The end-of-run summary: one table per evaluation, read from the artifacts under OUT.

    python -m utils.summary out
"""
from __future__ import annotations

import sys
from pathlib import Path

from utils.artifacts import is_complete, load_json


def _f(x, digits=3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_f(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells)


def reconstruction(out: Path) -> str:
    d = out / "eval_reconstruction"
    if not is_complete(d, "eval_reconstruction"):
        return "reconstruction: not run"
    r = load_json(d / "results.json")
    keys = ["n_images", "psnr", "ssim", "lpips", "fid", "is", "codebook_used", "codebook_perplexity"]
    text = "reconstruction (128 px):\n" + _table(keys, [[r.get(k) for k in keys]])
    for name, reason in r.get("skipped", {}).items():
        text += f"\n  skipped {name}: {reason}"
    for png in ("reconstructions.png", "token_usage.png"):
        if (d / png).is_file():
            text += f"\n  picture: {d / png}"
    return text


def understanding(out: Path) -> str:
    d = out / "eval_understanding"
    if not is_complete(d, "eval_understanding"):
        return "few-shot understanding: not run"
    rows = load_json(d / "manifest.json")["info"]["settings"]
    keys = ["n_way", "k_shot", "global_k", "induction", "repeat", "n"]
    body = [[r[k] for k in keys] + [f"{100 * r['accuracy']:.1f}",
                                    f"{100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f}",
                                    f"{100 * r['chance']:.1f}"] for r in rows]
    return "few-shot understanding (accuracy %):\n" + _table(keys + ["acc", "95% CI", "chance"], body)


def denoising(out: Path) -> str:
    d = out / "eval_denoising"
    if not is_complete(d, "eval_denoising"):
        return "denoising: not run"
    results = load_json(d / "results.json")
    keys = ["n_images", "psnr", "ssim", "lpips", "fid", "token_acc"]
    body = [[task, variant] + [r.get(k) for k in keys]
            for task, variants in results.items() for variant, r in variants.items()]
    text = "denoising with the frozen LLM (vs the clean image):\n" + _table(["task", "variant"] + keys, body)
    strips = sorted(d.glob("*/strips"))
    if strips:
        text += "\n  strips (clean | corrupted | restored): " + ", ".join(str(s) for s in strips)
    return text


def summary(out) -> str:
    out = Path(out)
    return "\n\n".join(["== summary", reconstruction(out), understanding(out), denoising(out)])


if __name__ == "__main__":
    print(summary(sys.argv[1] if len(sys.argv) > 1 else "out"))
