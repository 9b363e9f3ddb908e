"""Small artifacts and image folders for the step tests, and an in-process script runner."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from utils.artifacts import save_json, save_tensors, write_manifest
from utils.stages import (EVAL_CAPTIONING, EVAL_COMPRESSION, EVAL_DENOISING, EVAL_RECONSTRUCTION,
                          EVAL_UNDERSTANDING, EVAL_VQA)

REPO = Path(__file__).resolve().parent.parent


def make_vocab_artifact(out_dir, words: list[str], printable: list[bool] | None = None) -> str:
    """A step-1 ``vocab/`` artifact for ``words`` (token ids 0..n-1, made-up bigrams and
    trigrams with deliberate duplicates)."""
    import torch
    n = len(words)
    bigram = [w + (" cat" if i % 2 else " dog") for i, w in enumerate(words)]
    trigram = [b + " toy" for b in bigram]
    vocab = {"ids": list(range(n)), "subword": list(words), "bigram": bigram, "trigram": trigram,
             "printable": list(printable) if printable is not None else [True] * n}
    save_json(Path(out_dir) / "vocab.json", vocab)
    ids = torch.arange(n)
    save_tensors(Path(out_dir) / "vocab_tokens.safetensors",
                 {"ids": ids, "next1": (ids + 1) % n, "next2": (ids + 2) % n})
    write_manifest(out_dir, "vocab", {"words": n}, ["vocab.json", "vocab_tokens.safetensors"])
    return str(out_dir)


def make_eval_artifacts(out, ceiling: bool = True) -> dict:
    """Finished eval_reconstruction/, eval_understanding/, eval_denoising/, eval_captioning/
    and eval_vqa/ artifacts under ``out`` holding made-up numbers in the layout the eval
    scripts write (with ``ceiling`` False, understanding rows as older runs wrote them: no
    ceiling/floor). Returns the numbers."""
    out = Path(out)
    rec = {"n_images": 300, "psnr": 23.5, "ssim": 0.71, "lpips": float("nan"), "fid": 11.2,
           "is": 80.1, "codebook_used": 0.93, "codebook_perplexity": 1234.5,
           "skipped": {"lpips": "no VGG weights"}}
    save_json(out / EVAL_RECONSTRUCTION.out_dir / "results.json", rec)
    write_manifest(out / EVAL_RECONSTRUCTION.out_dir, EVAL_RECONSTRUCTION, {}, ["results.json"])
    settings = []
    for k_shot, accuracy in [(1, 0.625), (3, 0.75)]:
        row = {"n_way": 2, "k_shot": k_shot, "global_k": 21, "induction": True, "repeat": 0,
               "n": 200, "correct": int(200 * accuracy), "accuracy": accuracy,
               "ci95": [accuracy - 0.125, accuracy + 0.125], "chance": 0.5}
        if ceiling:
            row |= {"ceiling": 0.95, "floor": 0.5}
        settings.append(row)
    folder = out / EVAL_UNDERSTANDING.out_dir
    save_json(folder / "results.json", settings)
    write_manifest(folder, EVAL_UNDERSTANDING, {}, ["results.json"], info={"settings": settings})
    den = {task: {variant: {"n_images": 2, "psnr": 20.0 + i, "ssim": 0.5 + i / 10,
                            "lpips": None, "fid": None,
                            "token_acc": None if variant in ("corrupted", "ceiling") else 0.25 * i}
                  for i, variant in enumerate(["corrupted", "baseline", "restored", "ceiling"])}
           for task in ["inpainting", "rotation"]}
    save_json(out / EVAL_DENOISING.out_dir / "results.json", den)
    write_manifest(out / EVAL_DENOISING.out_dir, EVAL_DENOISING, {}, ["results.json"])
    cap = {"variants": {v: {"n": 90, "CIDEr-D": c, "CIDEr-D_ci95": [c - 0.5, c + 0.5], "BLEU-4": b}
                        for v, c, b in [("image", 4.5, 0.5), ("ceiling", 9.9, 0.99), ("floor", 1.0, 0.3)]}}
    save_json(out / EVAL_CAPTIONING.out_dir / "results.json", cap)
    write_manifest(out / EVAL_CAPTIONING.out_dir, EVAL_CAPTIONING, {}, ["results.json"])
    vqa = {"variants": {v: {t: {"n": 60, "accuracy": a, "ci95": [a - 0.1, a + 0.1]}
                            for t, a in [("colour", acc), ("shape", acc / 2)]}
                        for v, acc in [("image", 0.6), ("ceiling", 1.0), ("floor", 0.2)]}}
    save_json(out / EVAL_VQA.out_dir / "results.json", vqa)
    write_manifest(out / EVAL_VQA.out_dir, EVAL_VQA, {}, ["results.json"])
    row = lambda c, k, acc, tokens=None, ret=None: {  # noqa: E731  (eval_compression's rows)
        "condition": c, "k": k, "n": 50, "accuracy": acc, "ci95": [acc - 0.1, acc + 0.1],
        "retention": ret, "retention_ci95": None if ret is None else [ret - 0.2, ret + 0.1],
        "tokens_per_image": tokens, "kv_bytes_per_image": None,
        "kv_reduction": 1 - tokens / 40.0 if c == "voco" else None, "episodes_per_s": 4.0}
    comp = {"summary": [row("upper", None, 0.9, 40.0), row("none", None, 0.5),
                        row("lower", 2, 0.5), row("voco", 2, 0.8, 2, 0.75)]}
    save_json(out / EVAL_COMPRESSION.out_dir / "results.json", comp)
    write_manifest(out / EVAL_COMPRESSION.out_dir, EVAL_COMPRESSION, {}, ["results.json"])
    return {"reconstruction": rec, "understanding": settings, "denoising": den,
            "captioning": cap, "vqa": vqa, "compression": comp}


def make_image_folder(root, n_per_class: int = 4, classes=("cls_a", "cls_b"),
                      odd: bool = True) -> str:
    """``root/train/<class>/`` with random RGB JPEGs; with ``odd``, also a grayscale PNG, a CMYK
    JPEG, a 5x5 PNG and one corrupt file (which a reader must skip)."""
    rng = np.random.default_rng(0)
    for c in classes:
        folder = Path(root) / "train" / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            size = tuple(int(s) for s in rng.integers(40, 90, 2))
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"img{i}.jpg", quality=90)
    if odd:
        folder = Path(root) / "train" / classes[0]
        Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), "L").save(folder / "gray.png")
        Image.fromarray(rng.integers(0, 256, (60, 60, 4), dtype=np.uint8), "CMYK").save(folder / "cmyk.jpg")
        Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(folder / "tiny.png")
        (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return str(root)


def run_script(name: str, **flags) -> int:
    """Run a top-level script in this process with ``--flag value`` arguments (a list or tuple
    value: ``--flag v1 v2 ...``); return its exit status (0 on success, 2 for a V2LError)."""
    argv = [str(REPO / name)]
    for k, v in flags.items():
        argv += [f"--{k}", *map(str, v)] if isinstance(v, (list, tuple)) else [f"--{k}", str(v)]
    old = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = old
