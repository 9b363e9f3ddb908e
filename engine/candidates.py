"""Global-codebook candidates: which strings are embedded (step 2), and which of them
CLIP's image tower hits often enough to keep (step 3).

Candidates are the 3V strings [subwords; bigrams; trigrams] of the expanded
vocabulary. A candidate is *valid* when its source token is printable and its
text is neither blank nor holds a control character (a bigram such as "()" +
"\n" would put line breaks into every prompt that reads it); invalid ones are
embedded (the global codebook stays aligned with the vocabulary) but can
never be hit.

Hit counting is a bincount of each image's top-k candidate indices into one
int64 counter of length 3V: memory does not grow with the data set (the
authors materialise a [B*k, 3V] one-hot per batch).
"""
from __future__ import annotations

import math
import unicodedata
from fractions import Fraction

import torch

from utils.errors import V2LError

from models.clip import autocast_context

KINDS = ("subword", "bigram", "trigram")


def has_control(text: str) -> bool:
    """True when the text holds a control character (line breaks, tabs, ...)."""
    return any(unicodedata.category(c)[0] == "C" for c in text)


def build_candidates(vocab: dict) -> dict:
    """The candidate table of a step-1 ``vocab.json``: strings, kind, source LLM id, valid."""
    ids, printable = list(vocab["ids"]), list(vocab["printable"])
    strings, kind, llm_ids, valid = [], [], [], []
    for k in KINDS:
        column = list(vocab[k])
        strings += column
        kind += [k] * len(column)
        llm_ids += ids
        valid += [bool(p) and bool(s.strip()) and not has_control(s) for p, s in zip(printable, column)]
    return {"strings": strings, "kind": kind, "llm_ids": llm_ids, "valid": valid}


def unique_strings(strings: list[str]) -> tuple[list[str], torch.Tensor]:
    """(distinct strings in first-seen order, inverse [N] with strings[i] == unique[inverse[i]])."""
    first: dict[str, int] = {}
    inverse = [first.setdefault(s, len(first)) for s in strings]
    return list(first), torch.tensor(inverse, dtype=torch.long)


def candidate_scores(image_emb: torch.Tensor, candidates: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
    """Similarity [B, N] of L2-normalised image embeddings to candidate embeddings, invalid
    candidates at -inf."""
    scores = image_emb @ candidates.T
    return scores.masked_fill_(~valid, float("-inf"))


def count_topk_hits(image_emb: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor,
                    k: int, counts: torch.Tensor) -> torch.Tensor:
    """Add each image's top-k candidates to ``counts`` (int64 [N], in place) and return it."""
    top = candidate_scores(image_emb, candidates, valid).topk(k, dim=1).indices
    counts += torch.bincount(top.flatten(), minlength=counts.numel())
    return counts


@torch.no_grad()
def count_hits(clip, batches, candidates: torch.Tensor, valid: torch.Tensor, k: int,
               precision: str = "auto") -> tuple[torch.Tensor, int, int]:
    """(hit counts [N] int64 on the CPU, images counted, images skipped) over ``batches``
    (dicts from ``data.images.collate_skip_bad``); candidates and valid live on CLIP's device."""
    counts = torch.zeros(candidates.shape[0], dtype=torch.long, device=candidates.device)
    n_images = n_skipped = 0
    for batch in batches:
        n_skipped += batch["n_skipped"]
        if "image" not in batch:
            continue
        with autocast_context(clip.device, precision):
            emb = clip.encode_images(batch["image"].to(clip.device, non_blocking=True))
        count_topk_hits(emb, candidates, valid, k, counts)
        n_images += emb.shape[0]
    return counts.cpu(), n_images, n_skipped


def parse_rate(rate) -> Fraction:
    """A threshold rate as an exact fraction: ``"100/1281167"``, ``"0.004"``, ``"7.8e-05"``
    (decimal text is taken exactly, not as the nearest binary float)."""
    try:
        value = Fraction(str(rate).strip())
    except (ValueError, ZeroDivisionError):
        raise V2LError(f"--threshold_rate {rate}: expected a fraction such as 100/1281167 "
                       "or a decimal such as 0.004") from None
    if value < 0:
        raise V2LError(f"--threshold_rate {rate}: must not be negative")
    return value


def hit_threshold(n_images: int, threshold: int | None, threshold_rate) -> int | float:
    """The count a candidate must EXCEED to be kept.

    An absolute ``threshold`` wins when given (the paper: 100 for ImageNet's 1.28M train
    images); otherwise ``threshold_rate * n_images`` scales the paper's rate to the data
    set actually counted. Hits are integers, so "more than rate x n" is "more than
    floor(rate x n)", computed exactly: with the paper's rate 100/1281167 on ImageNet's
    1,281,167 images that is exactly 100, as theirs (a rounded decimal rate would land
    just below 100 and also keep the candidates hit exactly 100 times)."""
    if threshold is not None:
        return threshold
    return math.floor(parse_rate(threshold_rate) * n_images)


def select_global(hits: torch.Tensor, min_hits: float) -> torch.Tensor:
    """Indices (ascending) of the candidates hit more than ``min_hits`` times."""
    return torch.nonzero(hits > min_hits).flatten()
