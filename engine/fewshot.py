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

Episodes are decoded in batches by ``engine.greedy.BatchedGreedy``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.data import DataLoader, Dataset

from engine.greedy import BatchedGreedy

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
        out += v2l.global_strings(topk_nearest(emb, weight, k, v2l.config.global_metric))
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
