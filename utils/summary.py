"""The end-of-run summary: one table per evaluation, and the same numbers in OUT/summary.json.

    python -m utils.summary OUT [STAGE_ID=SECONDS|skipped ...]

run.sh calls it last, with each stage's wall time. ``summary.json`` is what
scripts and CI read::

    {"out": "out",
     "stage_seconds": {"vocab": 12.3, "codebook": null, ...},   # null: skipped (already complete)
     "reconstruction": {"n_images", "psnr", "ssim", "lpips", "fid", "is", "codebook_used",
                        "codebook_perplexity", "skipped": {metric: reason}} or null,
     "understanding": [{"n_way", "k_shot", "global_k", "induction", "repeat", "n", "accuracy",
                        "ci95": [lo, hi], "chance", "ceiling", "floor"}, ...],   # one per setting
     "denoising": [{"task", "variant", "n_images", "psnr", "ssim", "lpips", "fid", "token_acc"},
                   ...],                                     # one per task and variant
     "captioning": [{"variant", "n", "cider_d", "cider_d_ci95", "bleu4"}, ...],  # image/ceiling/floor
     "vqa": [{"variant", "answer_type", "n", "accuracy", "ci95"}, ...],  # per variant, answer type
     "compression": [{"condition", "k", "n", "accuracy", "ci95", "retention", "retention_ci95",
                      "tokens_per_image", "kv_bytes_per_image", "kv_reduction", "episodes_per_s"},
                     ...]}
                                                 # upper, none, then lower and voco per k

An evaluation that has not run (or not finished), or whose inputs changed since it ran
(a tokenizer retrained after it, say: utils/artifacts.py ``broken_chain``), is null; a value
an artifact does not hold (an older run without ``ceiling``, a metric not
computed, a non-finite number) is null.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from utils.artifacts import broken_chain, load_json, read_manifest, save_json
from utils.errors import V2LError
from utils.stages import (EVAL_CAPTIONING, EVAL_COMPRESSION, EVAL_DENOISING, EVAL_RECONSTRUCTION,
                          EVAL_LLAVA, EVAL_UNDERSTANDING, EVAL_VIDEO, EVAL_VQA)

SUMMARY_JSON = "summary.json"
RECONSTRUCTION_KEYS = ["n_images", "psnr", "ssim", "lpips", "fid", "is", "codebook_used",
                       "codebook_perplexity"]
UNDERSTANDING_KEYS = ["n_way", "k_shot", "global_k", "induction", "repeat", "n", "accuracy", "ci95",
                      "chance", "ceiling", "floor"]
DENOISING_KEYS = ["task", "variant", "n_images", "psnr", "ssim", "lpips", "fid", "token_acc"]
CAPTIONING_KEYS = ["variant", "n", "cider_d", "cider_d_ci95", "bleu4"]
VQA_KEYS = ["variant", "answer_type", "n", "accuracy", "ci95"]
COMPRESSION_KEYS = ["condition", "k", "n", "accuracy", "ci95", "retention", "retention_ci95",
                    "tokens_per_image", "kv_bytes_per_image", "kv_reduction", "episodes_per_s"]


def _clean(x):
    """JSON-safe: non-finite floats become null (strict JSON readers reject NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


def is_current(d: Path, stage) -> bool:
    """A finished artifact made from the artifacts that are there now (up the chain); a stale
    one is named on stderr, so that its numbers are never reported as this run's."""
    try:
        manifest = read_manifest(d, stage)
    except V2LError:
        return False
    why = broken_chain(manifest)
    if why:
        print(f"{stage.title}: the results in {d} are not shown: {why}", file=sys.stderr)
    return why is None


def reconstruction_results(out: Path) -> dict | None:
    d = out / EVAL_RECONSTRUCTION.out_dir
    if not is_current(d, EVAL_RECONSTRUCTION):
        return None
    r = load_json(d / "results.json")
    return _clean({k: r.get(k) for k in RECONSTRUCTION_KEYS}
                  | {"skipped": r.get("skipped", {}), "image_size": r.get("image_size")})


def understanding_rows(out: Path) -> list[dict] | None:
    d = out / EVAL_UNDERSTANDING.out_dir
    if not is_current(d, EVAL_UNDERSTANDING):
        return None
    rows = read_manifest(d, EVAL_UNDERSTANDING)["info"].get("settings", [])
    return [_clean({k: r.get(k) for k in UNDERSTANDING_KEYS}) for r in rows]


def denoising_rows(out: Path) -> list[dict] | None:
    d = out / EVAL_DENOISING.out_dir
    if not is_current(d, EVAL_DENOISING):
        return None
    results = load_json(d / "results.json")
    return [_clean({"task": task, "variant": variant} | {k: r.get(k) for k in DENOISING_KEYS[2:]})
            for task, variants in results.items() for variant, r in variants.items()]


def _results(out: Path, stage) -> dict | None:
    d = out / stage.out_dir
    return load_json(d / "results.json") if is_current(d, stage) else None


def captioning_rows(out: Path) -> list[dict] | None:
    r = _results(out, EVAL_CAPTIONING)
    if r is None:
        return None
    return [_clean({"variant": v, "n": x.get("n"), "cider_d": x.get("CIDEr-D"),
                    "cider_d_ci95": x.get("CIDEr-D_ci95"), "bleu4": x.get("BLEU-4")})
            for v, x in r["variants"].items()]


def vqa_rows(out: Path) -> list[dict] | None:
    r = _results(out, EVAL_VQA)
    if r is None:
        return None
    return [_clean({"variant": v, "answer_type": t} | {k: x.get(k) for k in VQA_KEYS[2:]})
            for v, per in r["variants"].items() for t, x in per.items()]


def compression_rows(out: Path) -> list[dict] | None:
    r = _results(out, EVAL_COMPRESSION)
    if r is None:
        return None
    return [_clean({k: x.get(k) for k in COMPRESSION_KEYS}) for x in r.get("summary", [])]


VIDEO_KEYS = ["condition", "k", "n", "accuracy", "ci95", "retention", "retention_ci95",
              "tokens_per_clip", "kv_reduction", "clips_per_s"]
LLAVA_KEYS = ["condition", "k", "n", "score", "ci95", "retention", "retention_ci95",
              "tokens_per_image", "kv_bytes_per_image", "images_per_s"]


def video_rows(out: Path) -> list[dict] | None:
    r = _results(out, EVAL_VIDEO)
    if r is None:
        return None
    return [_clean({k: x.get(k) for k in VIDEO_KEYS}) for x in r.get("summary", [])]


def llava_rows(out: Path) -> list[dict] | None:
    r = _results(out, EVAL_LLAVA)
    if r is None:
        return None
    return [_clean({"benchmark": r.get("benchmark")} | {k: x.get(k) for k in LLAVA_KEYS})
            for x in r.get("rows", [])]


def collect(out, stage_seconds: dict[str, float | None] | None = None) -> dict:
    """Everything summary.json holds (see the module docstring)."""
    out = Path(out)
    return {"out": str(out), "stage_seconds": dict(stage_seconds or {}),
            "reconstruction": reconstruction_results(out),
            "understanding": understanding_rows(out), "denoising": denoising_rows(out),
            "captioning": captioning_rows(out), "vqa": vqa_rows(out),
            "compression": compression_rows(out), "video": video_rows(out),
            "llava": llava_rows(out)}


def _f(x, digits=3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_f(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip()
                     for r in cells)


def reconstruction_text(out: Path, r: dict | None) -> str:
    if r is None:
        return "reconstruction: not run"
    d = out / EVAL_RECONSTRUCTION.out_dir
    text = (f"reconstruction ({r.get('image_size', 128)} px):\n"
            + _table(RECONSTRUCTION_KEYS, [[r[k] for k in RECONSTRUCTION_KEYS]]))
    for name, reason in r["skipped"].items():
        text += f"\n  skipped {name}: {reason}"
    for png in ("reconstructions.png", "token_usage.png"):
        if (d / png).is_file():
            text += f"\n  picture: {d / png}"
    return text


def understanding_text(rows: list[dict] | None) -> str:
    if rows is None:
        return "few-shot understanding: not run"
    keys = ["n_way", "k_shot", "global_k", "induction", "repeat", "n"]
    body = [[r[k] for k in keys]
            + [_pct(r["accuracy"]),
               "-" if r["ci95"] is None else f"{_pct(r['ci95'][0])}-{_pct(r['ci95'][1])}",
               _pct(r["chance"]), _pct(r["floor"]), _pct(r["ceiling"])] for r in rows]
    return ("few-shot understanding (accuracy %, beside chance = 1/n_way and the floor and "
            "ceiling reference runs):\n"
            + _table(keys + ["acc", "95% CI", "chance", "floor", "ceiling"], body))


def denoising_text(out: Path, rows: list[dict] | None) -> str:
    if rows is None:
        return "denoising: not run"
    text = ("denoising with the frozen LLM (vs the clean image):\n"
            + _table(DENOISING_KEYS, [[r[k] for k in DENOISING_KEYS] for r in rows]))
    strips = sorted((out / EVAL_DENOISING.out_dir).glob("*/strips"))
    if strips:
        text += ("\n  strips (clean | corrupted | baseline | restored | ceiling): "
                 + ", ".join(str(s) for s in strips))
    return text


def _ci(ci) -> str:
    return "-" if ci is None else f"{_f(ci[0])}-{_f(ci[1])}"


def _pct_ci(ci) -> str:
    return "-" if ci is None else f"{_pct(ci[0])}-{_pct(ci[1])}"


def _with_gallery(folder: Path, text: str) -> str:
    gallery = folder / "gallery.png"
    return text + (f"\n  picture: {gallery}" if gallery.is_file() else "")


def captioning_text(out: Path, rows: list[dict] | None) -> str:
    if rows is None:
        return "captioning: not run"
    body = [[r["variant"], r["n"], r["cider_d"], _ci(r["cider_d_ci95"]), r["bleu4"]] for r in rows]
    return _with_gallery(out / EVAL_CAPTIONING.out_dir,
                         "captioning with the frozen LLM (image: the tokenizer's words; ceiling: "
                         "each image's own caption as its words; floor: no words):\n"
                         + _table(["variant", "n", "CIDEr-D", "95% CI", "BLEU-4"], body))


def vqa_text(out: Path, rows: list[dict] | None) -> str:
    if rows is None:
        return "visual question answering: not run"
    body = [[r["variant"], r["answer_type"], r["n"], _pct(r["accuracy"]), _pct_ci(r["ci95"])]
            for r in rows]
    return _with_gallery(out / EVAL_VQA.out_dir,
                         "visual question answering (VQAv2 accuracy %; image: the tokenizer's words; "
                         "ceiling: each image's own labels as its words; floor: no words):\n"
                         + _table(["variant", "answer type", "n", "acc", "95% CI"], body))


def compression_text(out: Path, rows: list[dict] | None) -> str:
    if rows is None:
        return "VoCo compression: not run"
    body = [[r["condition"], "-" if r["k"] is None else r["k"], r["n"], _pct(r["accuracy"]),
             _pct_ci(r["ci95"]), _pct(r["retention"]), _pct_ci(r["retention_ci95"]),
             _f(r["tokens_per_image"], 1), _pct(r["kv_reduction"]), _f(r["episodes_per_s"], 1)]
            for r in rows]
    text = ("VoCo compression, few-shot accuracy % (ceiling: upper, the full image tokens; floors: "
            "lower, untrained VoCo,\n  and none, no image; retention = (voco - lower) / "
            "(upper - lower) at the same k):\n"
            + _table(["condition", "k", "n", "acc", "95% CI", "retention %", "95% CI",
                      "tokens/image", "KV saved %", "episodes/s"], body))
    plot = out / EVAL_COMPRESSION.out_dir / "retention.png"
    return text + (f"\n  picture: {plot}" if plot.is_file() else "")


def video_text(rows: list[dict] | None) -> str:
    if rows is None:        # run only with a video dataset: nothing to say otherwise
        return ""
    body = [[r["condition"], "-" if r["k"] is None else r["k"], r["n"], _pct(r["accuracy"]),
             _pct_ci(r["ci95"]), _pct(r["retention"]), _pct_ci(r["retention_ci95"]),
             _f(r["tokens_per_clip"], 1), _pct(r["kv_reduction"]), _f(r["clips_per_s"], 2)]
            for r in rows]
    return ("video QA through compressed frames, exact match % (not the paper's GPT judge; "
            "controls: last frame only, frames shuffled):\n"
            + _table(["condition", "k", "n", "acc", "95% CI", "retention %", "95% CI",
                      "tokens/clip", "KV saved %", "clips/s"], body))


def llava_text(rows: list[dict] | None) -> str:
    if rows is None:        # run only with LLAVA: nothing to say otherwise
        return ""
    body = [[r["condition"], "-" if r["k"] is None else r["k"], r["n"], _f(r["score"], 2),
             _pct_ci(r["ci95"]), _pct(r["retention"]), _pct_ci(r["retention_ci95"]),
             _f(r["tokens_per_image"], 1), _f(r["images_per_s"], 2)] for r in rows]
    name = rows[0]["benchmark"] if rows else ""
    return (f"LLaVA benchmark {name} (upper: image embeddings read whole; lower: untrained VoCo; "
            "retention = (voco - lower) / (upper - lower)):\n"
            + _table(["condition", "k", "n", "score", "95% CI (mean %)", "retention %", "95% CI",
                      "tokens/image", "images/s"], body))


def summary(out, stage_seconds: dict[str, float | None] | None = None, write: bool = True) -> str:
    """The summary tables; with ``write``, also OUT/summary.json."""
    out = Path(out)
    data = collect(out, stage_seconds)
    parts = ["== summary", reconstruction_text(out, data["reconstruction"]),
             understanding_text(data["understanding"]), denoising_text(out, data["denoising"]),
             captioning_text(out, data["captioning"]), vqa_text(out, data["vqa"]),
             compression_text(out, data["compression"]), video_text(data["video"]),
             llava_text(data["llava"])]
    parts = [p for p in parts if p]
    if write:
        save_json(out / SUMMARY_JSON, data)
        parts.append(f"numbers: {out / SUMMARY_JSON}")
    return "\n\n".join(parts)


def parse_seconds(args: list[str]) -> dict[str, float | None]:
    """``["vocab=12.5", "codebook=skipped"]`` -> ``{"vocab": 12.5, "codebook": None}``."""
    seconds = {}
    for a in args:
        name, sep, value = a.partition("=")
        try:
            seconds[name] = None if value == "skipped" else float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise V2LError(f"utils.summary: bad stage time {a!r}; expected STAGE_ID=SECONDS or "
                           "STAGE_ID=skipped")
    return seconds


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    out = argv[0] if argv else "out"
    print(summary(out, parse_seconds(argv[1:])))


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(lambda: main(sys.argv[1:]))
