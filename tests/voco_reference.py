"""References and controls for the VoCo tests and bench/bench_voco.py, kept out of models/voco.py.

``single_pass`` computes what ``VoCo.compress`` + ``VoCo.prefill`` compute, in one masked
forward of the frozen LLM over whole prompts (each image's tokens placed at the positions
just before its VoCo block, visible only to that block): the reference the cached path is
tested against. Its ``mask`` variants and ``prefill_positions_from_cache`` are controls that
must give other logits.

A prompt for ``single_pass`` is a list of segments: token ids (text) or an ``Image``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.voco import VoCo, _causal_allowed, additive


@dataclass
class Image:
    """An uncompressed image: token ids [n] or embeddings [n, hidden]."""
    tokens: torch.Tensor


def single_pass(voco: VoCo, prompts: list[list], k: int,
                mask: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """One masked forward of the frozen LLM (adapters off) over whole prompts of text segments
    and ``Image``s, each image followed by k VoCo tokens; returns (logits [B, T, V] float,
    text_index [B, T]). ``mask`` "bool" (the same mask as booleans) and "causal" (a plain
    causal mask) are controls."""
    voco._check_k(k)
    dev, dtype = voco.device, voco.dtype
    embeddings = voco.embeddings[:k].to(dtype)
    rows = []
    for prompt in prompts:
        embeds, pos, group, is_text, span_key, p, g = [], [], [], [], [], 0, 0
        for seg in prompt:
            if isinstance(seg, Image):
                g += 1
                span = voco._span(seg.tokens)
                n = span.shape[0]
                embeds += [span, embeddings]
                pos += range(p - n, p + k)          # the VoCo block sits at p..p+k-1
                group += [g] * (n + k)
                is_text += [False] * (n + k)
                span_key += [True] * n + [False] * k  # VoCo entries stay visible later
                p += k
            else:
                embeds.append(voco._embed(torch.tensor(list(seg), dtype=torch.long)))
                pos += range(p, p + len(seg))
                group += [0] * len(seg)
                is_text += [True] * len(seg)
                span_key += [False] * len(seg)
                p += len(seg)
        rows.append((torch.cat(embeds), pos, group, is_text, span_key))
    b, width = len(rows), max(r[0].shape[0] for r in rows)
    x = rows[0][0].new_zeros(b, width, rows[0][0].shape[1])
    pos = torch.zeros(b, width, dtype=torch.long)
    group = torch.full((b, width), -1, dtype=torch.long)
    span_key = torch.zeros(b, width, dtype=torch.bool)
    text_index = torch.full((b, width), -1, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    for i, (e, p_, g_, t_, s_) in enumerate(rows):
        n = e.shape[0]
        x[i, width - n:] = e
        pos[i, width - n:] = torch.tensor(p_)
        group[i, width - n:] = torch.tensor(g_)
        span_key[i, width - n:] = torch.tensor(s_)
        valid[i, width - n:] = True
        t = torch.tensor(t_)
        idx = torch.full((n,), -1, dtype=torch.long)
        idx[t] = torch.arange(int(t.sum()))
        text_index[i, width - n:] = idx
    allowed = _causal_allowed(valid)
    in_image = group > 0
    same = group[:, :, None] == group[:, None, :]
    # image tokens and their VoCo tokens see only their own image; text sees no image tokens
    allowed &= torch.where(in_image[:, :, None], same, ~span_key[:, None, :])
    allowed |= torch.eye(width, dtype=torch.bool)[None] & ~valid[:, :, None]
    attention = {"float": lambda: additive(allowed.to(dev), dtype),
                 "bool": lambda: allowed[:, None].to(dev), "causal": lambda: None}[mask]()
    with voco.frozen():
        out = voco.llm(inputs_embeds=x, attention_mask=attention, position_ids=pos.to(dev))
    return out.logits.float(), text_index


def prefill_logits(voco: VoCo, prompts: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
    """``VoCo.prefill``'s logits at every text token: (logits [B, T, V] float, text_index)."""
    hidden, _, _, _, text_index = voco.prefill(prompts, hidden=True)
    return voco.logits_of(hidden), text_index


def prefill_positions_from_cache(voco: VoCo, prompts: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
    """A control: ``prefill_logits`` without explicit position ids, so that transformers counts
    positions from the cache length (wrong: every text token then follows every cached VoCo
    entry, also the text before a block)."""
    inputs, _, _, text_index = voco._prefill_inputs(prompts)
    with voco.frozen():
        out = voco.llm(**{**inputs, "position_ids": None})
    return out.logits.float(), text_index


def text_logits(logits: torch.Tensor, text_index: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the logits of its text tokens in order ([T_i, V])."""
    return [logits[i][text_index[i] >= 0] for i in range(logits.shape[0])]
