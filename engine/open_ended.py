"""Open-ended answers by a frozen LLM reading images as words: captioning and VQA.

The prompt has the layout of few-shot classification (each piece tokenised on
its own and the ids concatenated), K in-context examples then the query:

    <bos>###\\nInput: < {image words} >\\nOutput: {caption}                      (captioning)
    <bos>###\\nInput: < {image words} >\\nQuestion: {question}\\nAnswer: {answer}  (VQA)

The query's answer is left open; the LLM continues greedily and stops at the
separator ("###") or a line break, which are cut off. Image words are the
image's global token strings (``engine.fewshot.global_token_strings``) and,
as an option, its local tokens (LLM token ids, inserted as ids). Two
references frame the number: the *ceiling* puts each image's own reference
caption or labels where its words go, the *floor* leaves the brackets empty
(what the LLM writes from the examples alone).

Examples are drawn with a seeded generator per query (or per question type
with ``fixed``, so a batch shares its examples and their prefix cache pays);
an example is never the query's own image.

Answers are saved as they finish in ``utils.artifacts.ChunkStore`` chunks, one
store per variant under ``<out_dir>/<variant>/``: the queries, in order, are
cut into chunks of ``chunk_size``, chunk i is answered by rank i % world, and
batches of ``batch_size`` are cut inside a chunk (with ``fixed`` the chunk's
queries are first sorted by group, so that a batch shares its examples). A
chunk's answers therefore depend neither on the number of ranks nor on a
resume. With ``chunk_size`` a multiple of ``batch_size`` (otherwise a chunk
ends in a smaller batch) and without ``fixed``, the batches are those of one
process decoding all queries in order; with ``fixed`` the sort by group
happens within each chunk rather than over all queries, so a batch may mix
groups where one sort over all queries would not.
The store's key (``run_key``) holds the settings the answers depend on, the
LLM precision actually used (a CPU without native bf16 runs fp32 whatever
--llm_dtype says) and the inputs by artifact id (the tokenizer, for the image
variant only; the LLM when it is a pipeline artifact): a tokenizer retrained
into the same directory, or any changed setting, starts afresh instead of
resuming. Once every rank is done, rank 0 gathers the rows into
``<variant>/answers.jsonl``; the chunks are removed after the manifest.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from engine.fewshot import check_prompt_length, context_length
from engine.greedy import BatchedGreedy, auto_batch_size, parse_batch_size
from models.llm import encode_segment
from utils.artifacts import ChunkStore, finished_inputs, run_key, save_text
from utils.errors import V2LError

SEPARATOR = "###"
STOPS = (SEPARATOR, "\n")           # the answer ends at the separator or a line break
IN_TEXT = "###\nInput: < "
CLOSE_TEXT = " >\n"
CAPTION_LABEL = "Output: "
QUESTION_TEXT = "Question: {}\n"
ANSWER_LABEL = "Answer: "
VARIANTS = ("image", "ceiling", "floor")
LENGTH_FLAGS = "--k_shot, --global_k or --local_tokens"   # what shortens a prompt


@dataclass(frozen=True)
class ImageWords:
    text: str                       # global token strings joined (or reference words, or "")
    ids: tuple[int, ...] = ()       # local tokens: LLM ids, placed after the text


@dataclass(frozen=True)
class Shot:
    words: ImageWords
    question: str | None            # None: captioning
    answer: str | None              # None: the query


@dataclass
class Prompt:
    ids: list[int]
    text: str


class OpenEndedPrompter:
    """Builds caption / VQA prompts with the LLM's text tokenizer, segment by segment."""

    def __init__(self, text_tokenizer):
        self.text_tokenizer = text_tokenizer
        self.encode = lru_cache(maxsize=None)(self._encode)

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(encode_segment(self.text_tokenizer, text)) if text else ()

    def shot(self, shot: Shot) -> tuple[list[int], str]:
        label = CAPTION_LABEL if shot.question is None else QUESTION_TEXT.format(shot.question) + ANSWER_LABEL
        ids = list(self.encode(IN_TEXT)) + list(self.encode(shot.words.text)) + list(shot.words.ids)
        ids += self.encode(CLOSE_TEXT + label)
        local = self.text_tokenizer.decode(list(shot.words.ids)) if shot.words.ids else ""
        text = IN_TEXT + shot.words.text + local + CLOSE_TEXT + label
        if shot.answer is not None:
            ids += self.encode(shot.answer)
            text += shot.answer
        return ids, text

    def build(self, shots: list[Shot]) -> Prompt:
        """``shots``: the examples (with answers) then the query (answer None)."""
        bos = self.text_tokenizer.bos_token_id
        ids, text = ([bos] if bos is not None else []), []
        for s in shots:
            i, t = self.shot(s)
            ids += i
            text.append(t)
        return Prompt(ids, "".join(text))


class StopAtSeparator:
    """A ``BatchedGreedy`` constraint that allows every token and ends a row as soon as its
    text holds a stop string (the separator or a line break)."""

    def __init__(self, text_tokenizer, stops=STOPS):
        self.text_tokenizer, self.stops = text_tokenizer, stops

    def allowed(self, prefix: list[int]):
        return slice(None)                           # every id

    def finished(self, prefix: list[int]) -> bool:
        text = self.text_tokenizer.decode(prefix, skip_special_tokens=True)
        return any(s in text for s in self.stops)


def cut_answer(text: str, stops=STOPS) -> str:
    """The generated text up to the first stop string, stripped."""
    for s in stops:
        text = text.split(s, 1)[0]
    return text.strip()


class ExamplePicker:
    """Seeded in-context examples from a pool, never the query's own image.

    per query (default): a generator seeded by (seed, query key); ``fixed``: by (seed, group),
    so all queries of a group share examples. ``same_type``: the group is the query's question
    type (``qtype``) and examples come from that type only."""

    def __init__(self, pool: list, k: int, seed: int, fixed: bool = False, same_type: bool = False):
        self.pool, self.k, self.seed, self.fixed, self.same_type = pool, k, seed, fixed, same_type
        self.groups: dict[str, list[int]] = {}
        for i, it in enumerate(pool):
            self.groups.setdefault(getattr(it, "qtype", "") if same_type else "", []).append(i)

    def group(self, query) -> str:
        return getattr(query, "qtype", "") if self.same_type else ""

    def __call__(self, query) -> list[int]:
        if self.k == 0:
            return []
        group = self.group(query)
        members = self.groups.get(group, [])
        rng = random.Random(f"{self.seed}/{group if self.fixed else query.key}")
        # a few spares cover examples that turn out to be the query's own image
        order = rng.sample(members, min(len(members), 2 * self.k + 8))
        picked = [i for i in order if self.pool[i].image_id != query.image_id][:self.k]
        if len(picked) < self.k:
            what = f" of question type '{group}'" if self.same_type else ""
            raise V2LError(f"only {len(picked)} example images{what} besides the query's own for "
                           f"--k_shot {self.k}; lower --k_shot or give more example images")
        return picked


# ----------------------------------------------------------------------------- image words

@torch.no_grad()
def local_token_ids(tokenizer, paths: list[str], batch_size: int = 16) -> list[tuple[int, ...]]:
    """Each image's local tokens (LLM ids, row-major over the grid)."""
    from data.images import load_rgb
    views = tokenizer.clip.image_views(tokenizer.config.resolution)
    device = tokenizer.llm_ids.device
    out = []
    for s in range(0, len(paths), batch_size):
        try:
            x = torch.stack([views(load_rgb(p))[0] for p in paths[s:s + batch_size]])
        except (OSError, ValueError, SyntaxError) as e:
            raise V2LError(f"unreadable image among {paths[s:s + batch_size][:2]}... ({e}); "
                           "replace or remove it")
        out += [tuple(row) for row in tokenizer.local_tokens(x.to(device)).flatten(1).tolist()]
    return out


def image_words(tokenizer, paths: list[str], global_k: int, local: bool,
                num_workers: int = 0) -> dict[str, ImageWords]:
    """path -> its words: the k global token strings, plus the local token ids when ``local``."""
    from engine.fewshot import global_token_strings
    if not paths:
        return {}
    strings = global_token_strings(tokenizer, paths, global_k, batch_size=64, num_workers=num_workers)
    ids = local_token_ids(tokenizer, paths) if local else [()] * len(paths)
    return {p: ImageWords("".join(s), i) for p, s, i in zip(paths, strings, ids)}


def variant_words(item, variant: str, words: dict[str, ImageWords]) -> ImageWords:
    if variant == "image":
        return words[item.path]
    if variant == "floor":
        return ImageWords("")
    ref = item.captions[0] if hasattr(item, "captions") else item.labels
    return ImageWords(ref)


def check_variants(variants, have_labels: bool, what: str) -> tuple[list[str], dict[str, str]]:
    """(the variants to run, {skipped variant: why}): the ceiling is skipped by name when the
    data gives no labels to put in the images' place."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise V2LError(f"--variants {' '.join(variants)}: unknown {bad}; use some of "
                       f"{', '.join(VARIANTS)}")
    if "ceiling" in variants and not have_labels:
        why = f"{what} gives no labels for its images; pass --labels_file (COCO captions)"
        print(f"warning: ceiling skipped: {why}", file=sys.stderr)
        return [v for v in variants if v != "ceiling"], {"ceiling": why}
    return list(variants), {}


@dataclass
class Answers:
    """What ``answer_queries`` hands back. ``rows``: variant -> query key -> row, in query order
    (rank 0 only; None on the other ranks); ``files``: the ``<variant>/answers.jsonl`` files
    rank 0 wrote (relative to out_dir); ``stores``: the chunk stores, removed by ``finish``."""
    rows: dict[str, dict[str, dict]] | None
    files: list[str]
    stores: dict[str, ChunkStore] = field(repr=False)


def answer_queries(queries: list, pool: list, picker: ExamplePicker, variants: list[str], *,
                   out_dir, key_settings: dict, tokenizer_dir, llm: str, llm_dtype: str,
                   global_k: int, local_tokens: bool, batch_size, chunk_size: int,
                   max_new_tokens: int, prefix_cache: bool, num_workers: int, ddp,
                   words_tf32: bool = False, words_amp: str = "fp32") -> Answers:
    """Every variant's answers to ``queries``, resuming from the chunks on disk.

    ``key_settings``: the caller's settings that the answers depend on (run-only ones are
    dropped by ``run_key``); the resume key adds the variant, the LLM precision in effect and
    the inputs by artifact id (``variant_key``). The LLM (``llm``, loaded at ``llm_dtype``, or
    fp32/bf16 on a CPU: ``models.llm.llm_dtype``) and the tokenizer are loaded only when this
    rank has something left to answer. Rank 0 writes ``<out_dir>/<variant>/answers.jsonl``."""
    from models.llm import llm_dtype as effective_dtype
    if not queries:
        raise V2LError("no images or questions to answer; check the data files and --split")
    from engine.fewshot import WORDS_AMPS
    batch_size = parse_batch_size(batch_size)
    if words_amp not in WORDS_AMPS:
        raise V2LError(f"--words_amp {words_amp!r}: use one of {', '.join(WORDS_AMPS)}")
    if chunk_size < 1:
        raise V2LError(f"--chunk_size {chunk_size}: must be at least 1")
    dtype = effective_dtype(llm_dtype, ddp.device)
    stores = {v: ChunkStore(Path(out_dir) / v, len(queries), chunk_size,
                            variant_key(key_settings, v, dtype, tokenizer_dir, llm), rows=True)
              for v in variants}
    load_llm_fn, load_tokenizer_fn = model_loaders(llm, dtype, tokenizer_dir, ddp.device)
    rows = run_variants(queries, pool, picker, stores, ddp, load_llm_fn, load_tokenizer_fn,
                        global_k, local_tokens, batch_size, max_new_tokens, prefix_cache,
                        num_workers, word_precision=(words_tf32, words_amp))
    files = write_answers(out_dir, rows) if ddp.is_main else []
    return Answers(rows, files, stores)


def answer_settings(settings: dict) -> dict:
    """The script settings the answers depend on: all but these (the tokenizer enters the key by
    artifact id; run_key drops the run-only ones)."""
    return {k: v for k, v in settings.items()
            if k not in ("tokenizer_dir", "variants", "chunk_size", "gallery")}


def variant_key(key_settings: dict, variant: str, llm_dtype: str, tokenizer_dir, llm) -> dict:
    """The resume key of one variant's chunks (``utils.artifacts.run_key``): the settings, the
    variant, the LLM precision in effect, the LLM by artifact id where it is a pipeline artifact
    (the demo's) and, for the image variant, the tokenizer by artifact id: never by path, so a
    tokenizer retrained into the same directory does not resume the old one's answers."""
    inputs = finished_inputs(llm=llm)
    if variant == "image":
        inputs["tokenizer"] = tokenizer_file(tokenizer_dir)
    return run_key(key_settings | {"variant": variant, "llm_dtype": llm_dtype}, **inputs)


def tokenizer_file(tokenizer_dir) -> Path:
    """The saved tokenizer a directory (or .pt path) names, which must exist."""
    from models.tokenizer_io import FILE_NAME
    path = Path(tokenizer_dir)
    path = path / FILE_NAME if path.is_dir() else path
    if not path.is_file():
        raise V2LError(f"{path}: tokenizer not found; train one with step4_train_tokenizer.py "
                       "or give the tokenizer directory / .pt file")
    return path


def write_answers(out_dir, rows: dict[str, dict[str, dict]]) -> list[str]:
    """``<variant>/answers.jsonl`` (one row per query, in query order) for every variant."""
    files = []
    for v, by_key in rows.items():
        save_text(Path(out_dir) / v / "answers.jsonl",
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in by_key.values()))
        files.append(f"{v}/answers.jsonl")
    return files


def finish(stage, config: dict, *, out_dir, tokenizer_dir, variants: list[str],
           files: list[str] | None, info: dict | None, answers: Answers | None, ddp) -> None:
    """Rank 0 writes the stage's manifest (``config``: the script's settings; chained to the
    tokenizer when the image variant ran) and then removes the answers' chunk folders; every
    rank then leaves the process group."""
    from utils import dist
    from utils.artifacts import write_manifest
    if ddp.is_main:
        inputs = finished_inputs(tokenizer=tokenizer_dir) if "image" in variants else {}
        write_manifest(out_dir, stage, config, files, inputs=inputs, info=info)
        for store in (answers.stores.values() if answers else ()):
            store.cleanup()
    dist.barrier(ddp)
    dist.shutdown(ddp)


def model_loaders(llm: str, llm_dtype: str, tokenizer_dir: str, device):
    """(load the LLM, load the tokenizer): called only when there is something to answer."""
    from models.llm import load_llm
    from models.tokenizer_io import load_tokenizer
    return (lambda: load_llm(llm, dtype=llm_dtype, device=str(device)),
            lambda: load_tokenizer(tokenizer_dir, device=str(device)))


# ----------------------------------------------------------------------------- generation

def check_lengths(greedy: BatchedGreedy, jobs: list[tuple[str, Prompt]], max_new_tokens: int,
                  flags: str) -> None:
    """Refuse the first prompt that, with its answer, does not fit the LLM's context."""
    context = context_length(greedy.model)
    for key, prompt in jobs:
        check_prompt_length(len(prompt.ids), max_new_tokens, context, f"query {key}", flags)


def generate(greedy: BatchedGreedy, prompter: OpenEndedPrompter, jobs: list[tuple[str, Prompt]],
             max_new_tokens: int, batch_size: int, flags: str = "--k_shot"):
    """Yield (key, prompt, answer) for each (key, prompt), ``batch_size`` prompts at a time.
    A prompt too long for the LLM's context is refused first, naming ``flags`` to lower."""
    text_tokenizer = prompter.text_tokenizer
    stop = StopAtSeparator(text_tokenizer)
    check_lengths(greedy, jobs, max_new_tokens, flags)
    for s in range(0, len(jobs), batch_size):
        batch = jobs[s:s + batch_size]
        out = greedy.generate([p.ids for _, p in batch], max_new_tokens, [stop] * len(batch),
                              eos_id=text_tokenizer.eos_token_id)
        for (key, prompt), ids in zip(batch, out):
            yield key, prompt, cut_answer(text_tokenizer.decode(ids, skip_special_tokens=True))


def bootstrap_ci(values: list[float], seed: int = 0, n: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of a mean (seeded)."""
    if not values:
        return 0.0, 0.0
    g = torch.Generator().manual_seed(seed)
    v = torch.tensor(values, dtype=torch.float64)
    means = v[torch.randint(len(v), (n, len(v)), generator=g)].mean(1).sort().values
    return float(means[int(0.025 * n)]), float(means[int(0.975 * n) - 1])


# ----------------------------------------------------------------------------- the stage

def _shots(query, variant: str, pool: list, example_idx: list[int], words: dict[str, ImageWords],
           question) -> list[Shot]:
    shots = [Shot(variant_words(pool[i], variant, words), question(pool[i]), answer_of(pool[i]))
             for i in example_idx]
    return shots + [Shot(variant_words(query, variant, words), question(query), None)]


def chunk_prompts(prompter: OpenEndedPrompter, chunk: list, variant: str, pool: list,
                  picker: ExamplePicker, examples: dict[str, list[int]],
                  words: dict[str, ImageWords], question) -> list[tuple[str, Prompt]]:
    """(query key, prompt) for a chunk's queries in decoding order: the chunk's order, or with
    ``picker.fixed`` sorted by group (stable), so that a batch shares its examples."""
    items = sorted(chunk, key=picker.group) if picker.fixed else chunk
    return [(q.key, prompter.build(_shots(q, variant, pool, examples[q.key], words, question)))
            for q in items]


def answer_of(item) -> str:
    """An example's answer in the prompt: its first reference caption, or VQAv2's most
    common human answer (ties: the first given)."""
    if hasattr(item, "captions"):
        return item.captions[0]
    return max(item.answers, key=item.answers.count)


def run_variants(queries: list, pool: list, picker: ExamplePicker, stores: dict[str, ChunkStore],
                 ddp, load_llm_fn, load_tokenizer_fn, global_k: int, local: bool,
                 batch_size: int | None,
                 max_new_tokens: int, prefix_cache: bool, num_workers: int = 0,
                 progress: bool = True, word_precision: tuple[bool, str] = (False, "fp32"),
                 ) -> dict[str, dict[str, dict]] | None:
    """Answer this rank's chunks of every variant's store (chunk i: rank i % world), then, once
    every rank is done, return all rows per variant by query key on rank 0 (None elsewhere).
    ``batch_size`` None: ``--batch_size auto`` (``engine.greedy.auto_batch_size`` for the longest
    prompt of this rank's work, a divisor of the chunk size). A V2LError on any rank stops
    every rank with it. ``word_precision``: (TF32, autocast) for the image words on a GPU
    (``engine.fewshot.words_precision``)."""
    from tqdm import tqdm
    from engine.fewshot import words_precision
    from utils import dist
    question = (lambda it: None) if not hasattr(queries[0], "question") else (lambda it: it.question)
    examples = {q.key: picker(q) for q in queries}
    todo = {v: [(i, queries[slice(*store.bounds(i))]) for i in store.todo(ddp.rank, ddp.world)]
            for v, store in stores.items()}
    error = None
    try:
        if any(todo.values()):
            words: dict[str, ImageWords] = {}
            if todo.get("image"):
                paths = sorted({p for _, chunk in todo["image"] for q in chunk
                                for p in [q.path] + [pool[i].path for i in examples[q.key]]})
                tokenizer = load_tokenizer_fn()
                with words_precision(ddp.device, *word_precision):
                    words = image_words(tokenizer, paths, global_k, local, num_workers)
            llm = load_llm_fn()
            text_tokenizer = llm.text_tokenizer
            pad = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else 0
            greedy = BatchedGreedy(llm.model, pad, prefix_cache=prefix_cache)
            prompter = OpenEndedPrompter(text_tokenizer)
            # every prompt is built and its length checked before anything is decoded
            work = {v: [(i, chunk, chunk_prompts(prompter, chunk, v, pool, picker, examples, words,
                                                 question)) for i, chunk in chunks]
                    for v, chunks in todo.items()}
            for chunks in work.values():
                for _, _, jobs in chunks:
                    check_lengths(greedy, jobs, max_new_tokens, LENGTH_FLAGS)
            if batch_size is None:     # auto: from the longest prompt of this rank's work
                longest = max(len(p.ids) for chunks in work.values() for _, _, jobs in chunks
                              for _, p in jobs)
                chunk = next(iter(stores.values())).chunk_size
                batch_size = auto_batch_size(llm.model, longest, max_new_tokens, divides=chunk)
                print(f"rank {ddp.rank}: --batch_size auto: {batch_size} prompts")
            for v, chunks in work.items():
                with tqdm(total=sum(len(chunk) for _, chunk, _ in chunks),
                          desc=f"{v} (rank {ddp.rank})", disable=not progress or not chunks) as bar:
                    for i, chunk, jobs in chunks:
                        rows = {}
                        for key, prompt, answer in generate(greedy, prompter, jobs, max_new_tokens,
                                                            batch_size, LENGTH_FLAGS):
                            rows[key] = {"key": key, "answer": answer,
                                         "prompt_tokens": len(prompt.ids),
                                         "examples": [pool[j].key for j in examples[key]],
                                         "prompt": prompt.text}
                            bar.update()
                        stores[v].save(i, [rows[q.key] for q in chunk])
    except V2LError as e:          # every rank stops, not only the one that met the problem
        error = str(e)
    # every rank waits here until all have saved their chunks (or failed): uneven work, so a
    # wait without a deadline before the gather (utils/dist.py)
    dist.barrier(ddp, "every rank's answers")
    errors = [e for e in dist.all_gather_objects(error, ddp) if e]
    if errors:
        raise V2LError(errors[0])
    if not ddp.is_main:
        return None
    return {v: {row["key"]: row for row in store.gather()} for v, store in stores.items()}
