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
an example is never the query's own image. Results go to resumable JSONL
logs, one file per rank, keyed by the query; queries are split over ranks by
index, so every rank count writes the same rows.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from engine.fewshot import check_prompt_length, context_length
from engine.greedy import BatchedGreedy
from models.llm import encode_segment
from utils.artifacts import load_json, save_json
from utils.errors import V2LError

SEPARATOR = "###"
STOPS = (SEPARATOR, "\n")           # the answer ends at the separator or a line break
IN_TEXT = "###\nInput: < "
CLOSE_TEXT = " >\n"
CAPTION_LABEL = "Output: "
QUESTION_TEXT = "Question: {}\n"
ANSWER_LABEL = "Answer: "
VARIANTS = ("image", "ceiling", "floor")


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


def answer_queries(settings: dict, queries, pool, picker, variants, key: dict, ddp) -> dict:
    """Every variant's answers, run with a script's ``settings`` (its configure() result):
    ``run_variants`` with the LLM and tokenizer loaded only when something is left to answer."""
    from models.llm import llm_dtype
    load_llm_fn, load_tokenizer_fn = model_loaders(
        settings["llm"], llm_dtype(settings["llm_dtype"], ddp.device), settings["tokenizer_dir"],
        ddp.device)
    return run_variants(queries, pool, picker, variants, settings["out_dir"], key, ddp,
                        load_llm_fn, load_tokenizer_fn, settings["global_k"],
                        settings["local_tokens"], settings["batch_size"],
                        settings["max_new_tokens"], settings["prefix_cache"],
                        settings["num_workers"])


def finish(stage, settings: dict, variants, files: list[str] | None, info: dict | None, ddp) -> None:
    """Rank 0 writes the stage's manifest (chained to the tokenizer when the image variant ran);
    then every rank leaves the process group."""
    from utils import dist
    from utils.artifacts import finished_inputs, write_manifest
    if ddp.is_main:
        inputs = finished_inputs(tokenizer=settings["tokenizer_dir"]) if "image" in variants else {}
        write_manifest(settings["out_dir"], stage, settings, files, inputs=inputs, info=info)
    dist.barrier(ddp)
    dist.shutdown(ddp)


def model_loaders(llm: str, llm_dtype: str, tokenizer_dir: str, device):
    """(load the LLM, load the tokenizer): called only when there is something to answer."""
    from models.llm import load_llm
    from models.tokenizer_io import load_tokenizer
    return (lambda: load_llm(llm, dtype=llm_dtype, device=str(device)),
            lambda: load_tokenizer(tokenizer_dir, device=str(device)))


# ----------------------------------------------------------------------------- generation

def generate(greedy: BatchedGreedy, prompter: OpenEndedPrompter, jobs: list[tuple[str, Prompt]],
             max_new_tokens: int, batch_size: int, settings: str):
    """Yield (key, prompt, answer) for each (key, prompt), ``batch_size`` prompts at a time."""
    context = context_length(greedy.model)
    text_tokenizer = prompter.text_tokenizer
    stop = StopAtSeparator(text_tokenizer)
    for key, prompt in jobs:
        check_prompt_length(len(prompt.ids), max_new_tokens, context, f"query {key}", settings)
    for s in range(0, len(jobs), batch_size):
        batch = jobs[s:s + batch_size]
        out = greedy.generate([p.ids for _, p in batch], max_new_tokens, [stop] * len(batch),
                              eos_id=text_tokenizer.eos_token_id)
        for (key, prompt), ids in zip(batch, out):
            yield key, prompt, cut_answer(text_tokenizer.decode(ids, skip_special_tokens=True))


# ----------------------------------------------------------------------------- logs

def shard(items: list, rank: int, world: int) -> list:
    """This rank's items: every world-th from its rank (the same split for any batching)."""
    return items[rank::world]


class JsonlLog:
    """Rows keyed by ``key`` in ``<dir>/log.rank<r>.jsonl``, one file per rank; reading takes
    every rank's file (so a rerun with another rank count resumes), dropping torn lines.
    ``<dir>/key.json`` holds the settings; a log made with other settings is refused."""

    def __init__(self, folder, settings: dict, rank: int = 0):
        self.dir, self.rank = Path(folder), rank
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if key_file.is_file():
            old = load_json(key_file)
            if old != json.loads(json.dumps(settings)):
                changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise V2LError(f"{self.dir}: holds results made with other settings ({', '.join(changed)}"
                               "); pass another --out_dir or delete it")
        elif rank == 0:
            save_json(key_file, settings)
        self.path = self.dir / f"log.rank{rank}.jsonl"

    def read(self) -> dict[str, dict]:
        rows = {}
        for f in sorted(self.dir.glob("log.rank*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue                         # a line torn by a kill
                rows[row["key"]] = row
        return rows

    def writer(self):
        """Append to this rank's file (a torn last line is removed first)."""
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):
                self.path.write_text(text[:text.rfind("\n") + 1], encoding="utf-8")
        return open(self.path, "a", encoding="utf-8")


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


def answer_of(item) -> str:
    """An example's answer in the prompt: its first reference caption, or VQAv2's most
    common human answer (ties: the first given)."""
    if hasattr(item, "captions"):
        return item.captions[0]
    return max(item.answers, key=item.answers.count)


def run_variants(queries: list, pool: list, picker: ExamplePicker, variants: list[str], out_dir,
                 settings: dict, ddp, load_llm_fn, load_tokenizer_fn, global_k: int, local: bool,
                 batch_size: int, max_new_tokens: int, prefix_cache: bool, num_workers: int = 0,
                 progress: bool = True) -> dict[str, dict[str, dict]]:
    """Answer this rank's share of ``queries`` in each variant (resuming from the logs) and
    return every rank's rows, per variant, once all ranks are done."""
    from tqdm import tqdm
    from utils import dist
    if not queries:
        raise V2LError("no images or questions to answer; check the data files and --split")
    question = (lambda it: None) if not hasattr(queries[0], "question") else (lambda it: it.question)
    examples = {q.key: picker(q) for q in queries}
    logs = {v: JsonlLog(Path(out_dir) / v, settings | {"variant": v}, ddp.rank) for v in variants}
    mine = shard(queries, ddp.rank, ddp.world)
    todo = {v: [q for q in mine if q.key not in logs[v].read()] for v in variants}
    if any(todo.values()):
        words: dict[str, ImageWords] = {}
        if todo.get("image"):
            paths = sorted({p for q in todo["image"]
                            for p in [q.path] + [pool[i].path for i in examples[q.key]]})
            words = image_words(load_tokenizer_fn(), paths, global_k, local, num_workers)
        llm = load_llm_fn()
        text_tokenizer = llm.text_tokenizer
        pad = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else 0
        greedy = BatchedGreedy(llm.model, pad, prefix_cache=prefix_cache)
        prompter = OpenEndedPrompter(text_tokenizer)
        for v in variants:
            items = sorted(todo[v], key=picker.group) if picker.fixed else todo[v]
            jobs = [(q.key, prompter.build(_shots(q, v, pool, examples[q.key], words, question)))
                    for q in items]
            out = generate(greedy, prompter, jobs, max_new_tokens, batch_size,
                           "--k_shot, --global_k or --local_tokens")
            with logs[v].writer() as f:
                for key, prompt, answer in tqdm(out, total=len(jobs), desc=f"{v} (rank {ddp.rank})",
                                                disable=not progress):
                    row = {"key": key, "answer": answer, "prompt_tokens": len(prompt.ids),
                           "examples": [pool[i].key for i in examples[key]], "prompt": prompt.text}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()
    dist.barrier(ddp)
    return {v: logs[v].read() for v in variants}
