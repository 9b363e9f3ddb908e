"""Step 1's expansion: each token id -> subword, greedy bigram, greedy trigram."""
from __future__ import annotations

import torch

from engine.greedy import greedy_next_tokens
from models.llm import encode_prompts, token_strings


def prompt_text(template: str, text: str) -> str:
    """The prompt for a token's text: ``template`` with ``text`` in place of {}.

    One leading space is dropped first, so " cat" (a word-initial token) and
    "cat" both read "a photo of cat", as in the authors' prompts (sentencepiece
    drops that space when decoding a sequence that starts with the token).
    """
    return template.format(text[1:] if text.startswith(" ") else text)


def expand_tokens(model, tokenizer, subwords: list[str], template: str = "a photo of {}",
                  add_bos: bool = True, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """For each subword s1: the greedy token after the prompt of s1 (next1, text s2), then the
    greedy token after the prompt of s1 + s2 re-tokenised as text (next2). Returns (next1, next2)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    first = greedy_next_tokens(model, encode_prompts(
        tokenizer, [prompt_text(template, s) for s in subwords], add_bos), batch_size, pad)
    s2 = token_strings(tokenizer, first, skip_special=True)
    second = greedy_next_tokens(model, encode_prompts(
        tokenizer, [prompt_text(template, a + b) for a, b in zip(subwords, s2)], add_bos),
        batch_size, pad)
    return first, second
