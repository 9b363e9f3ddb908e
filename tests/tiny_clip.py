"""A tiny randomly initialised open_clip CLIP (real classes, real BPE tokenizer), saved
as an open_clip model directory, so tests exercise the same loading path as real models."""
from __future__ import annotations

import open_clip
import torch

from models.clip import save_open_clip_dir

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_PREPROCESS = {"size": 64, "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic"}


def make_tiny_clip(out_dir, seed: int = 0) -> str:
    """Write a tiny CLIP model directory and return its path."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    save_open_clip_dir(model, TINY_CLIP_CFG, out_dir, TINY_PREPROCESS)
    return str(out_dir)
