"""Few-shot classification with a frozen LLM reading images as words.

The prompt follows the authors' evaluation, token segment by token segment
(each piece is tokenised on its own and the ids concatenated, as they do):

    <bos>For each of the following input output pairs, output is one of ['a' or 'b']\\n
    ###\\nInput: < {image words} >\\nOutput: {class name}        (each support, repeated)
    ###\\nInput: < {image words} >\\nOutput:                      (the query)

The logged prompt is the decode of exactly these ids (so it shows what the LLM
reads, e.g. the space a sentencepiece tokenizer puts before each segment).

Image words are the image's k global token strings joined (``image_words``):
the authors concatenate them, and since their step 1 lost the tokens' leading
spaces their words read glued ("dogpuppy"); our strings keep the space
(" dog puppy"). With the induction line, decoding is constrained to the class
names: by default a prefix trie over their tokens (each ended by EOS) allows,
at every step, only the tokens that keep the answer a prefix of some name; the
authors' rule (``PositionUnion``: at step j any name's j-th token, which can mix
two names) is an option. Two defects of the authors' script are not
reproduced: their induction line opens a bracket per class ("['a' or ['b']"),
and their context loop walks over every image of the episode, the query
included, so the query's answer is in its own prompt.

Reference rows (``references=True``): every episode is also run with each
image's words replaced by its class name (the ceiling: a perfect image
description) and with empty words (the floor: names and layout only).

Episodes are decoded in batches by ``engine.greedy.BatchedGreedy``.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch.utils.data import DataLoader, Dataset

from data.images import load_rgb
from engine.greedy import BatchedGreedy
from models.llm import encode_segment
from models.quantizers import topk_nearest
from utils.errors import V2LError

INDUCTION_TEXT = "For each of the following input output pairs, output is one of "
IN_TEXT = "###\nInput: < "
OUT_TEXT = " >\nOutput: "
CONSTRAINTS = ("trie", "union")
REFERENCES = ("ceiling", "floor")


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


def normalised(word: str) -> str:
    """A global word reduced to what a reader sees: lowercased, spaces and punctuation removed."""
    return re.sub(r"[\W_]+", "", word.lower())


DEDUP_POOL = 4   # with dedup, ranked strings fetched per image: DEDUP_POOL x k (repeats are refilled)


def fetch_count(k: int, dedup: bool, n_global: int) -> int:
    """How many ranked global strings to fetch per image to make its ``k`` words."""
    return max(k, min(DEDUP_POOL * k, n_global)) if dedup else k


def image_words(strings: list[str], k: int, separator: str = "", dedup: bool = False,
                strip: bool = False, sort: bool = False) -> str:
    """An image's words: its first ``k`` global strings (nearest first) joined by ``separator``.

    The authors join with "" (the default). ``strip``: each string's spaces are removed first
    (with separator "" this gives the authors' glued "dogpuppy"; our strings keep the leading
    space of word-initial tokens, " dog puppy"). ``dedup``: a string whose normalised text
    repeats a higher-ranked one is skipped and the next one down the ranking taken instead, so
    ``strings`` should run past ``k`` (fewer than k words when it runs out). ``sort``: the
    chosen words in alphabetical order of their normalised text instead of nearest first, so
    two images with the same words read the same string.
    """
    chosen, seen = [], set()
    for s in strings:
        if len(chosen) == k:
            break
        if dedup:
            key = normalised(s)
            if key in seen:
                continue
            seen.add(key)
        chosen.append(s.strip() if strip else s)
    if sort:
        chosen.sort(key=lambda w: (normalised(w), w))
    return separator.join(chosen)


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


class PositionUnion:
    """The authors' constraint: at step j, any token that is the j-th token of some class name,
    whatever came before (so "golden_retriever" and "king_crab" can give "golden_crab").
    No EOS: the answer runs to the longest name's length (or ``max_new_tokens``)."""

    def __init__(self, sequences: list[list[int]]):
        self.columns: list[list[int]] = []
        for seq in sequences:
            for j, t in enumerate(seq):
                if j == len(self.columns):
                    self.columns.append([])
                if t not in self.columns[j]:
                    self.columns[j].append(t)

    def allowed(self, prefix: list[int]) -> list[int]:
        return list(self.columns[len(prefix)]) if len(prefix) < len(self.columns) else []

    def finished(self, prefix: list[int]) -> bool:
        return len(prefix) >= len(self.columns)


@dataclass
class Prompt:
    ids: list[int]
    text: str            # the decode of ``ids``: what the LLM reads


class FewShotPrompter:
    """Builds the episode prompts with the LLM's text tokenizer, tokenising each segment on its
    own. constraint: "trie" (sound) or "union" (the authors') when the induction line is on."""

    def __init__(self, text_tokenizer, induction: bool = True, repeat: int = 0,
                 constraint: str = "trie"):
        if constraint not in CONSTRAINTS:
            raise V2LError(f"--constraint {constraint!r} unknown; use one of {CONSTRAINTS}")
        self.text_tokenizer, self.induction, self.repeat = text_tokenizer, induction, repeat
        self.constraint_kind = constraint
        self.encode = lru_cache(maxsize=None)(self._encode)

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(encode_segment(self.text_tokenizer, text))

    def name_ids(self, name: str) -> list[int]:
        """The class name's tokens; a name the tokenizer cannot represent is refused."""
        ids = list(self.encode(name))
        unk = getattr(self.text_tokenizer, "unk_token_id", None)
        if not ids or (unk is not None and unk in ids):
            raise V2LError(f"class name '{name}' tokenises to {ids} (empty or unknown tokens) in "
                           "the LLM's tokenizer; rename the class folder or map it in "
                           "data/imagenet_classes.tsv")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.text_tokenizer.decode(ids, skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False)

    def build(self, names: list[str], support: list[tuple[str, str]], query_words: str) -> Prompt:
        """names: the candidate class names (induction order); support: (image words, class
        name) pairs in prompt order; query_words: the query image's words."""
        bos = self.text_tokenizer.bos_token_id
        ids: list[int] = [bos] if bos is not None else []
        if self.induction:
            ids += self.encode(induction_line(names))
        for _ in range(self.repeat + 1):
            for words, name in support:
                ids += self.encode(IN_TEXT) + self.encode(words) + self.encode(OUT_TEXT)
                ids += self.name_ids(name)
        ids += self.encode(IN_TEXT) + self.encode(query_words) + self.encode(OUT_TEXT)
        return Prompt(ids, self.decode(ids))

    def constraint(self, names: list[str]) -> NameTrie | PositionUnion | None:
        if not self.induction:
            return None
        sequences = [self.name_ids(n) for n in names]
        if self.constraint_kind == "union":
            return PositionUnion(sequences)
        return NameTrie(sequences, self.text_tokenizer.eos_token_id)


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
def global_token_strings(tokenizer, paths: list[str], k: int, batch_size: int = 64,
                         num_workers: int = 0, progress: bool = True) -> list[list[str]]:
    """Each image's k global token strings (the k nearest global entries to its CLIP image
    embedding, nearest first, by the tokenizer's own rule); any k, not only the k the
    tokenizer's decoder was trained with."""
    from tqdm import tqdm
    clip = tokenizer.clip
    weight = tokenizer.tok_embeddings_global.weight
    if k > weight.shape[0]:
        raise V2LError(f"--global_k {k} is more than the {weight.shape[0]} global codebook "
                       "entries; lower --global_k")
    loader = DataLoader(_ClipImages(paths, clip.image_view()), batch_size=batch_size,
                        num_workers=num_workers)
    out: list[list[str]] = []
    for x in tqdm(loader, desc="global tokens", disable=not progress):
        emb = clip.encode_images(x).to(weight.device)
        out += tokenizer.global_strings(topk_nearest(emb, weight, k, tokenizer.config.global_metric))
    return out


WORDS_AMPS = ("fp32", "fp16", "bf16")


@contextlib.contextmanager
def words_precision(device, tf32: bool = False, amp: str = "fp32"):
    """How the image words are computed (the tokenizer's encoder and quantiser, the nearest
    global entries; CLIP runs as the tokenizer was trained). On a CUDA GPU, options: ``tf32``
    lets float32 matmuls and convolutions use TF32, ``amp`` fp16/bf16 runs them under autocast
    (faster; a near-tie between two codebook entries can then go the other way). The default,
    fp32 without TF32, is the faithful one; on a CPU nothing changes."""
    if amp not in WORDS_AMPS:
        raise V2LError(f"--words_amp {amp!r}: expected one of {', '.join(WORDS_AMPS)}")
    if torch.device(device).type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        if amp == "fp32":
            yield
        else:
            with torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16):
                yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv


@dataclass
class EpisodeResult:
    index: int
    prompt: str
    prediction: str
    target: str
    correct: bool
    prompt_tokens: int
    references: dict[str, dict] = field(default_factory=dict)   # "ceiling"/"floor" -> outcome


def is_correct(prediction: str, target: str) -> bool:
    """The authors' rule: the answer starts with the true class name."""
    return prediction.strip().startswith(target)


def episode_variants(words: dict[str, str], references: bool) -> dict:
    """variant -> (image path, class name) -> the image's words in the prompt."""
    variants = {"images": lambda path, name: words[path]}
    if references:
        variants |= {"ceiling": lambda path, name: name, "floor": lambda path, name: ""}
    return variants


def episode_prompt(prompter: FewShotPrompter, ep, words_of, spaces: bool = False) -> Prompt:
    names = ep.names(spaces)
    support = [(words_of(p, ep.name(f, spaces)), ep.name(f, spaces)) for p, f in ep.support]
    return prompter.build(names, support, words_of(ep.query[0], ep.target(spaces)))


def longest_prompt(prompter: FewShotPrompter, episodes: list, words: dict[str, str],
                   spaces: bool = False, references: bool = False) -> int:
    """Tokens of the longest prompt ``evaluate_episodes`` would decode for ``episodes``."""
    return max((len(episode_prompt(prompter, ep, words_of, spaces).ids)
                for words_of in episode_variants(words, references).values() for ep in episodes),
               default=1)


def evaluate_episodes(greedy: BatchedGreedy, prompter: FewShotPrompter, episodes: list,
                      words: dict[str, str], max_new_tokens: int, batch_size: int,
                      spaces: bool = False, references: bool = False,
                      merge_variants: bool = True):
    """Yield the results of ``episodes`` (data.episodes.Episode), ``batch_size`` at a time.

    spaces: class names with spaces instead of the raw underscored names. references: also
    run each batch with every image's words replaced by its class name (ceiling) and with
    empty words (floor), on the same episodes. merge_variants (with references): a batch's
    variants are decoded in one pass of 3 x ``batch_size`` prompts, each episode's shared
    prefix (its induction line and first "Input:") run once for its three prompts; otherwise
    one pass per variant. The answers are the same either way (in fp32 exactly, up to a
    near-tie between the top two logits, as with any change of batch shape).
    """
    context = context_length(greedy.model)
    eos = prompter.text_tokenizer.eos_token_id
    variants = episode_variants(words, references)
    for start in range(0, len(episodes), batch_size):
        batch = episodes[start:start + batch_size]
        prompts, constraints, groups = [], [], []
        for variant, words_of in variants.items():
            for i, ep in enumerate(batch):
                prompt = episode_prompt(prompter, ep, words_of, spaces)
                check_prompt_length(len(prompt.ids), max_new_tokens, context,
                                    f"episode {ep.index}")
                prompts.append(prompt)
                constraints.append(prompter.constraint(ep.names(spaces)))
                groups.append(i)
        if merge_variants:      # one pass; an episode's variants share its induction line
            gen = greedy.generate([p.ids for p in prompts], max_new_tokens,
                                  constraints if prompter.induction else None, eos_id=eos,
                                  groups=groups)
        else:                   # one batch per variant
            gen, n = [], len(batch)
            for s in range(0, len(prompts), n):
                gen += greedy.generate([p.ids for p in prompts[s:s + n]], max_new_tokens,
                                       constraints[s:s + n] if prompter.induction else None,
                                       eos_id=eos)
        preds = [prompter.text_tokenizer.decode(t, skip_special_tokens=True) for t in gen]
        outcome = {v: list(zip(prompts[j * len(batch):(j + 1) * len(batch)],
                               preds[j * len(batch):(j + 1) * len(batch)]))
                   for j, v in enumerate(variants)}
        for i, ep in enumerate(batch):
            prompt, pred = outcome["images"][i]
            target = ep.target(spaces)
            refs = {v: {"prediction": outcome[v][i][1],
                        "correct": is_correct(outcome[v][i][1], target)}
                    for v in REFERENCES if v in outcome}
            yield EpisodeResult(ep.index, prompt.text, pred, target, is_correct(pred, target),
                                len(prompt.ids), refs)
