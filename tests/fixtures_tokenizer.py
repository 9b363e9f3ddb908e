"""Tiny codebook artifacts and a tiny V2L tokenizer, for any test that needs one.

``make_codebook_artifacts`` writes ``vocab/``, ``codebook/`` and ``global/``
artifact directories with the real file layouts and chained manifests (random
unit-ish embeddings instead of CLIP text embeddings). ``make_tiny_tokenizer``
adds a tiny CLIP and builds a small tokenizer of the real architecture on them:
128 px images -> a 16x16 grid of local tokens + 5 global tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from data.transforms import clip_normalize
from engine.tokenizer_build import tokenizer_from_artifacts
from models.clip import load_clip
from tiny_clip import make_tiny_clip
from utils.artifacts import save_json, save_tensors, write_manifest

TINY_TOKENIZER = dict(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=32,
                      cross_heads=2, cross_head_dim=32, global_topk=5)


def _unit_mean_like(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Rows like means of unit vectors: random directions, norms in [0.6, 0.9]."""
    x = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return x * (0.6 + 0.3 * torch.rand(n, 1, generator=g))


def make_codebook_artifacts(tmp, clip_dir, V: int = 64, M: int = 16,
                            llm_ids: torch.Tensor | None = None, seed: int = 0,
                            clip=None) -> dict[str, Path]:
    """Write vocab/, codebook/ and global/ under ``tmp``; return {"vocab", "codebook", "global"}.

    The codebooks have the embedding dimension of the CLIP in ``clip_dir`` (its
    loaded bundle may be passed as ``clip``); ``llm_ids`` (default 0..V-1) gives
    the LLM token id of each local codebook row.
    """
    clip = clip or load_clip(clip_dir)
    D = clip.embed_dim
    tmp, g = Path(tmp), torch.Generator().manual_seed(seed)
    ids = torch.arange(V) if llm_ids is None else torch.as_tensor(llm_ids).long()
    dirs = {name: tmp / name for name in ("vocab", "codebook", "global")}

    subword = [f"w{i}" for i in ids.tolist()]
    bigram = [s + "x" for s in subword]
    trigram = [s + "y" for s in bigram]
    save_json(dirs["vocab"] / "vocab.json", {"ids": ids.tolist(), "subword": subword,
                                             "bigram": bigram, "trigram": trigram,
                                             "printable": [True] * V})
    save_tensors(dirs["vocab"] / "vocab_tokens.safetensors",
                 {"ids": ids, "next1": ids.roll(1), "next2": ids.roll(2)})
    write_manifest(dirs["vocab"], "vocab", {"llm": "tiny"}, ["vocab.json", "vocab_tokens.safetensors"])

    candidates = _unit_mean_like(3 * V, D, g)
    strings = subword + bigram + trigram
    save_tensors(dirs["codebook"] / "local_codebook.safetensors",
                 {"embeddings": candidates[:V], "llm_ids": ids})
    save_tensors(dirs["codebook"] / "global_candidates.safetensors", {"embeddings": candidates})
    save_json(dirs["codebook"] / "candidates.json",
              {"strings": strings, "kind": ["subword"] * V + ["bigram"] * V + ["trigram"] * V,
               "llm_ids": ids.tolist() * 3, "valid": [True] * (3 * V)})
    write_manifest(dirs["codebook"], "codebook", {"clip": str(clip_dir), "clip_pretrained": None},
                   ["local_codebook.safetensors", "global_candidates.safetensors", "candidates.json"],
                   inputs={"vocab": dirs["vocab"]},
                   info={"clip": clip.ident, "embed_dim": D, "vocab_size": V})

    keep = torch.randperm(3 * V, generator=g)[:M].sort().values
    save_tensors(dirs["global"] / "global_codebook.safetensors",
                 {"embeddings": candidates[keep], "candidate_index": keep,
                  "hits": torch.randint(1, 100, (M,), generator=g)})
    save_json(dirs["global"] / "global_strings.json", {"strings": [strings[i] for i in keep]})
    write_manifest(dirs["global"], "global", {"min_hits": 1},
                   ["global_codebook.safetensors", "global_strings.json"],
                   inputs={"vocab": dirs["vocab"], "codebook": dirs["codebook"]})
    return dirs


def make_tiny_tokenizer(tmp, V: int = 64, M: int = 16, llm_ids=None, **overrides):
    """(tokenizer, clip_bundle, dirs): a tiny CLIP + artifacts under ``tmp`` and a tokenizer on them.

    dirs = {"clip", "vocab", "codebook", "global"}. ``overrides`` change TINY_TOKENIZER.
    """
    tmp = Path(tmp)
    clip_dir = make_tiny_clip(tmp / "clip")
    clip = load_clip(clip_dir)
    dirs = make_codebook_artifacts(tmp, clip_dir, V=V, M=M, llm_ids=llm_ids, clip=clip)
    tokenizer = tokenizer_from_artifacts(dirs["codebook"], dirs["global"], clip,
                                   **{**TINY_TOKENIZER, **overrides})
    return tokenizer, clip, {"clip": Path(clip_dir), **dirs}


def tiny_images(clip, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x128 in [-1, 1] [B, 3, 128, 128], CLIP-normalised view [B, 3, S, S]) of random images."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, clip.image_size, clip.image_size, generator=g)
    x128 = F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False) * 2 - 1
    return x128, clip_normalize(x, clip.mean, clip.std)
