"""Few-shot classification with a frozen LLM reading images as words.

The prompt follows the authors' evaluation, token segment by token segment
(each piece is tokenised on its own and the ids concatenated, as they do):

    <bos>For each of the following input output pairs, output is one of ['a' or 'b']\\n
    ###\\nInput: < {image words} >\\nOutput: {class name}        (each support, repeated)
    ###\\nInput: < {image words} >\\nOutput:                      (the query)

Image words are the image's k global token strings concatenated. With the
induction line, decoding is constrained to the class names: a prefix trie over
their tokens (each ended by EOS) allows, at every step, only the tokens that
keep the answer a prefix of some name. Two defects of the authors' script are
not reproduced: their induction line opens a bracket per class
("['a' or ['b']"), and their context loop walks over every image of the
episode, the query included, so the query's answer is in its own prompt.

``BatchedGreedy`` decodes many prompts at once: left padding, an attention
mask and explicit position ids, and a key/value cache of the longest token
prefix the batch shares, computed once and expanded to the batch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import DynamicCache

from data.classes import class_name
from data.images import load_rgb
from models.quantizers import topk_nearest
from utils.errors import V2LError

INDUCTION_TEXT = "For each of the following input output pairs, output is one of "
IN_TEXT = "###\nInput: < "
OUT_TEXT = " >\nOutput: "


def induction_line(names: list[str]) -> str:
    return INDUCTION_TEXT + "[" + " or ".join(f"'{n}'" for n in names) + "]\n"


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (robust near 0 and 1 and for small n)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


class NameTrie:
    """Prefix trie over tokenised class names; each name ends with ``eos_id`` when given,
    so a name that is a prefix of another can still be chosen."""

    def __init__(self, sequences: list[list[int]], eos_id: int | None):
        self.root: dict = {}
        for seq in sequences:
            node = self.root
            for t in list(seq) + ([eos_id] if eos_id is not None else []):
                node = node.setdefault(t, {})

    def _node(self, prefix: list[int]) -> dict | None:
        node = self.root
        for t in prefix:
            node = node.get(t)
            if node is None:
                return None
        return node

    def allowed(self, prefix: list[int]) -> list[int]:
        node = self._node(prefix)
        return list(node) if node else []

    def finished(self, prefix: list[int]) -> bool:
        return not self._node(prefix)


class BatchedGreedy:
    """Greedy decoding of a batch of token-id prompts through a frozen causal LM."""

    def __init__(self, model, pad_id: int, prefix_cache: bool = True):
        self.model, self.pad_id, self.use_prefix_cache = model, pad_id, prefix_cache
        self._memo: tuple[tuple[int, ...], DynamicCache] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prefix(self, prefix: tuple[int, ...], batch: int) -> DynamicCache:
        """The prefix's cache expanded to ``batch`` rows (the last prefix is kept and reused)."""
        if self._memo is None or self._memo[0] != prefix:
            ids = torch.tensor([prefix], device=self.device)
            out = self.model(input_ids=ids, use_cache=True)
            self._memo = (prefix, out.past_key_values)
        cache = copy.deepcopy(self._memo[1])
        cache.batch_repeat_interleave(batch)
        return cache

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]):
        """Run the prompts; return (last-position logits [B, V] float32, cache, attention
        mask [B, T], next position ids [B])."""
        lengths = [len(p) for p in prompts]
        shared = 0
        if self.use_prefix_cache:
            limit = min(lengths) - 1          # every row keeps a token of its own
            while shared < limit and all(p[shared] == prompts[0][shared] for p in prompts):
                shared += 1
        suffixes = [p[shared:] for p in prompts]
        width = max(len(s) for s in suffixes)
        b, dev = len(prompts), self.device
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        pos = torch.zeros((b, width), dtype=torch.long)
        for i, s in enumerate(suffixes):
            n = len(s)
            ids[i, width - n:] = torch.tensor(s)
            mask[i, shared + width - n:] = 1
            pos[i, width - n:] = torch.arange(shared, shared + n)
        cache = self._prefix(tuple(prompts[0][:shared]), b) if shared else DynamicCache()
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         past_key_values=cache, use_cache=True)
        nxt = torch.tensor(lengths, device=dev)
        return out.logits[:, -1].float(), out.past_key_values, mask, nxt

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 constraints: list[NameTrie | None] | None = None,
                 vocab_mask: torch.Tensor | None = None,
                 eos_id: int | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt: at most ``max_new_tokens`` tokens, stopping at
        EOS or when the row's constraint is complete. ``vocab_mask`` (bool [V]) limits every
        step to the ids it marks; ``constraints[i]`` limits row i to its trie."""
        logits, cache, mask, pos = self.prefill(prompts)
        b = len(prompts)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(max_new_tokens):
            if vocab_mask is not None:
                logits = logits.masked_fill(~vocab_mask[: logits.shape[-1]].to(logits.device),
                                            float("-inf"))
            if constraints is not None:
                allow = torch.zeros_like(logits, dtype=torch.bool)
                for i, c in enumerate(constraints):
                    if c is None:
                        allow[i] = True
                    else:  # a finished row has nothing left: any id, it is ignored
                        allow[i, c.allowed(out[i]) or [self.pad_id]] = True
                logits = logits.masked_fill(~allow, float("-inf"))
            nxt = logits.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                out[i].append(t)
                c = constraints[i] if constraints is not None else None
                if t == eos_id or (c is not None and c.finished(out[i])):
                    done[i] = True
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            res = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                             past_key_values=cache, use_cache=True)
            cache, pos, logits = res.past_key_values, pos + 1, res.logits[:, -1].float()
        return [[t for t in row if t != eos_id] for row in out]


@dataclass
class Prompt:
    ids: list[int]
    text: str


class FewShotPrompter:
    """Builds the episode prompts with an HF tokenizer, tokenising each segment on its own."""

    def __init__(self, tokenizer, induction: bool = True, repeat: int = 0):
        self.tok, self.induction, self.repeat = tokenizer, induction, repeat
        self.encode = lru_cache(maxsize=None)(self._encode)

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok.encode(text, add_special_tokens=False))

    def name_ids(self, name: str) -> list[int]:
        """The class name's tokens; a name the tokenizer cannot represent is refused."""
        ids = list(self.encode(name))
        unk = getattr(self.tok, "unk_token_id", None)
        if not ids or (unk is not None and unk in ids):
            raise V2LError(f"class name '{name}' tokenises to {ids} (empty or unknown tokens) in "
                           "the LLM's tokenizer; rename the class folder or map it in "
                           "data/imagenet_classes.tsv")
        return ids

    def build(self, names: list[str], support: list[tuple[str, str]], query_words: str) -> Prompt:
        """names: the candidate class names (induction order); support: (image words, class
        name) pairs in prompt order; query_words: the query image's words."""
        bos = self.tok.bos_token_id
        ids: list[int] = [bos] if bos is not None else []
        text = []
        if self.induction:
            line = induction_line(names)
            ids += self.encode(line)
            text.append(line)
        for _ in range(self.repeat + 1):
            for words, name in support:
                ids += self.encode(IN_TEXT) + self.encode(words) + self.encode(OUT_TEXT)
                ids += self.name_ids(name)
                text.append(IN_TEXT + words + OUT_TEXT + name)
        ids += self.encode(IN_TEXT) + self.encode(query_words) + self.encode(OUT_TEXT)
        text.append(IN_TEXT + query_words + OUT_TEXT)
        return Prompt(ids, "".join(text))

    def constraint(self, names: list[str]) -> NameTrie | None:
        if not self.induction:
            return None
        return NameTrie([self.name_ids(n) for n in names], self.tok.eos_token_id)


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_prompt_length(n_tokens: int, max_new_tokens: int, context: int | None, what: str,
                        settings: str = "--k_shot, --global_k or --repeat") -> None:
    """Refuse a prompt that, with its answer, does not fit the LLM's context."""
    need = n_tokens + max_new_tokens
    if context is not None and need > context:
        raise V2LError(f"{what}: prompt of {n_tokens} tokens + {max_new_tokens} to generate is "
                       f"{need - context} tokens over the LLM context of {context}; lower {settings}")


class _ClipImages(Dataset):
    def __init__(self, paths: list[str], view):
        self.paths, self.view = paths, view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            return self.view(load_rgb(self.paths[i]))
        except (OSError, ValueError, SyntaxError) as e:
            raise V2LError(f"{self.paths[i]}: unreadable image ({e}); replace or remove it")


@torch.no_grad()
def global_token_strings(v2l, paths: list[str], k: int, batch_size: int = 64,
                         num_workers: int = 0, progress: bool = True) -> list[list[str]]:
    """Each image's k global token strings (the k nearest global entries to its CLIP image
    embedding, nearest first, by the tokenizer's own rule); any k, not only the k the
    tokenizer's decoder was trained with."""
    from tqdm import tqdm
    clip = v2l.clip
    weight = v2l.tok_embeddings_global.weight
    if k > weight.shape[0]:
        raise V2LError(f"--global_k {k} is more than the {weight.shape[0]} global codebook "
                       "entries; lower --global_k")
    loader = DataLoader(_ClipImages(paths, clip.image_view()), batch_size=batch_size,
                        num_workers=num_workers)
    out: list[list[str]] = []
    for x in tqdm(loader, desc="global tokens", disable=not progress):
        emb = clip.encode_images(x).to(weight.device)
        out += v2l.global_strings(topk_nearest(emb, weight, k, v2l.cfg.global_metric))
    return out


@dataclass
class EpisodeResult:
    index: int
    prompt: str
    prediction: str
    target: str
    correct: bool
    prompt_tokens: int


def evaluate_episodes(decoder: BatchedGreedy, prompter: FewShotPrompter, episodes: list,
                      words: dict[str, str], max_new_tokens: int, batch_size: int):
    """Yield the results of ``episodes`` (data.episodes.Episode), ``batch_size`` at a time."""
    context = context_length(decoder.model)
    eos = prompter.tok.eos_token_id
    for start in range(0, len(episodes), batch_size):
        batch = episodes[start:start + batch_size]
        prompts, constraints = [], []
        for ep in batch:
            names = ep.names
            support = [(words[p], class_name(f)) for p, f in ep.support]
            prompt = prompter.build(names, support, words[ep.query[0]])
            check_prompt_length(len(prompt.ids), max_new_tokens, context, f"episode {ep.index}")
            prompts.append(prompt)
            constraints.append(prompter.constraint(names))
        gen = decoder.generate([p.ids for p in prompts], max_new_tokens,
                               constraints if prompter.induction else None, eos_id=eos)
        for ep, prompt, toks in zip(batch, prompts, gen):
            pred = prompter.tok.decode(toks, skip_special_tokens=True)
            yield EpisodeResult(ep.index, prompt.text, pred, ep.target,
                                pred.strip().startswith(ep.target), len(prompt.ids))
