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


TINY_ARCH = "tiny-clip-test"


def register_tiny_arch(config_dir, quick_gelu: bool = False) -> str:
    """Register the tiny config as a named open_clip architecture (like ``ViT-L-14``;
    quick_gelu: its ``-quickgelu`` sibling, like ``ViT-L-14-quickgelu``)."""
    import json
    from pathlib import Path
    name = f"{TINY_ARCH}-quickgelu" if quick_gelu else TINY_ARCH
    path = Path(config_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**TINY_CLIP_CFG, "quick_gelu": True} if quick_gelu else TINY_CLIP_CFG))
    open_clip.add_model_config(str(path))
    return name


def make_tiny_openai_archive(path, seed: int = 0) -> torch.nn.Module:
    """Save a tiny QuickGELU CLIP the way OpenAI's ``ViT-L-14.pt`` is stored (a traced
    TorchScript archive whose state dict has OpenAI's key names and no attention-mask
    buffer) and return the eager model it was traced from."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG, quick_gelu=True).eval()
    model.attn_mask = model._buffers.pop("attn_mask")  # a traced constant, as in OpenAI's archive
    image = torch.zeros(1, 3, TINY_PREPROCESS["size"], TINY_PREPROCESS["size"])
    text = torch.zeros(1, TINY_CLIP_CFG["text_cfg"]["context_length"], dtype=torch.long)
    text[0, :2] = torch.tensor([49406, 49407])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about shape checks
        torch.jit.trace(model, (image, text), check_trace=False).save(str(path))
    return model
