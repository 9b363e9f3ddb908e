"""Few-shot image classification by a frozen LLM reading images as words (N-way K-shot).

Each image becomes its k global token strings; the LLM sees K labelled
examples per class and names the query image's class (open-ended mini-ImageNet
protocol; constrained to the class names when the induction line is on).
Episodes are generated reproducibly from a class-folder data set (on ImageNet:
the 20 mini-ImageNet test classes) or read from the authors' CSV lists.

Beside the accuracy, two reference rows scored on the very same episodes
(``--references``): the ceiling (each image's words replaced by its class
name) and the floor (the image words left empty).

Writes, per setting, ``<out_dir>/<setting>/episodes.jsonl`` (prompt as the LLM
reads it, prediction, target, correct, the references; a rerun skips the
episodes already there), ``summary.json`` (accuracy, 95% Wilson interval,
ceiling, floor) and a manifest; plus ``results.md`` / ``results.csv``, one row
per setting. ``torchrun --nproc_per_node N`` splits the episodes over N
processes (same results as one process); only rank 0 writes.

    python eval_understanding.py --tokenizer_dir out/tokenizer --llm llama-2-7b-hf --data_dir imagenet
    python eval_understanding.py --sweep true      # 2/5-way x 1/3/5-shot x k in {5, 21}
"""
import json
from pathlib import Path

import torch

from data.episodes import generate_episodes, read_episode_csv
from engine.fewshot import (REFERENCES as REFERENCE_NAMES, FewShotPrompter, evaluate_episodes,
                            fetch_count, global_token_strings, image_words, wilson_interval)
from engine.greedy import BatchedGreedy
from models.llm import llm_dtype, load_llm
from models.tokenizer_io import load_tokenizer
from utils import dist
from utils.artifacts import atomic_path, load_json, save_json, write_manifest, finished_inputs
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.stages import EVAL_UNDERSTANDING, EVAL_UNDERSTANDING_SETTING

TOKENIZER_DIR = "out/tokenizer"   # the trained tokenizer (directory or tokenizer.pt)
LLM = "/models/llama-2-7b"        # the frozen LLM: Hugging Face dir, Meta LLaMA dir or .gguf
LLM_DTYPE = "fp16"                # fp16 (the authors'), bf16 or fp32; a CPU runs bf16 if asked and native, else fp32
DATA_DIR = "/data/imagenet"      # class-folder images; wnid folders -> the mini-ImageNet test classes
SPLIT = "train"                   # sub-folder of DATA_DIR (mini-ImageNet images are ImageNet train images)
EPISODES_CSV = ""                 # the authors' episode list (paths relative to DATA_DIR) instead of generated ones
N_WAY: tuple[int, ...] = (2,)     # classes per episode (several values: one setting each, e.g. 2 5)
K_SHOT = 1                        # support images per class
GLOBAL_K = 21                     # global tokens per image (the paper uses 5 and 21)
INDUCTION = True                  # task induction line + decoding constrained to the class names
CONSTRAINT = "trie"               # trie (a prefix trie over the names, sound) or union (the authors': any name's j-th token at step j)
CLASS_NAMES = "raw"               # raw (the authors': golden_retriever) or spaces (golden retriever)
WORD_SEPARATOR = ""               # placed between an image's global words ("" = the authors' concatenation)
STRIP_WORDS = False               # strip each global word's spaces first ("" separator: the authors' glued "dogpuppy")
GLOBAL_DEDUP = False              # skip a global word repeating a higher-ranked one (case/spaces/punctuation ignored), fill from further down
SORT_WORDS = False                # an image's chosen words in alphabetical order (the authors': nearest first)
REFERENCES = True                 # also score the ceiling (class names as words) and floor (empty words) on the same episodes
REPEAT = 0                        # extra repetitions of the support set in the prompt
N_EPISODES = 1000                 # episodes per setting
SEED = 0                          # episode sampling seed
BATCH_SIZE = 8                    # episodes decoded together
MAX_NEW_TOKENS = 16               # longest answer
PREFIX_CACHE = True               # run the batch's shared prompt prefix once (same results, faster)
SWEEP = False                     # run the paper's grid: 2/5-way x 1/3/5-shot x k in {5, 21} (induction on)
DEVICE = "auto"                   # auto, cpu or cuda
NUM_WORKERS = 4                   # image loading workers
OUT_DIR = "out/eval_understanding"  # where results are written

settings = configure(globals())

SWEEP_WAYS, SWEEP_SHOTS, SWEEP_KS = (2, 5), (1, 3, 5), (5, 21)


def setting_grid() -> list[dict]:
    if SWEEP:
        return [dict(n_way=n, k_shot=k, global_k=g, induction=True, repeat=REPEAT)
                for n in SWEEP_WAYS for k in SWEEP_SHOTS for g in SWEEP_KS]
    return [dict(n_way=n, k_shot=K_SHOT, global_k=GLOBAL_K, induction=INDUCTION, repeat=REPEAT)
            for n in dict.fromkeys(N_WAY)]


def setting_name(s: dict) -> str:
    return (f"{s['n_way']}way_{s['k_shot']}shot_k{s['global_k']}"
            f"_ind{int(s['induction'])}_rep{s['repeat']}")


def check_options() -> None:
    if CLASS_NAMES not in ("raw", "spaces"):
        raise V2LError(f"--class_names {CLASS_NAMES!r} unknown; use raw or spaces")
    if BATCH_SIZE < 1 or N_EPISODES < 1:
        raise V2LError("--batch_size and --n_episodes must be at least 1")


def episodes_for(s: dict) -> list:
    if EPISODES_CSV:
        if SWEEP or len(set(N_WAY)) > 1:
            raise V2LError("--episodes_csv holds one setting's episodes; run it without --sweep "
                           "and with one --n_way")
        return read_episode_csv(EPISODES_CSV, DATA_DIR)[:N_EPISODES]
    return generate_episodes(DATA_DIR, s["n_way"], s["k_shot"], N_EPISODES, SEED, SPLIT)


def load_done(path: Path, key: dict) -> dict[int, dict]:
    """The results already in the JSONL log by episode index (a later line wins; a torn last
    line is dropped), after checking that they were made with the same settings."""
    key_file = path.parent / "key.json"
    if key_file.is_file() and load_json(key_file) != key:
        raise V2LError(f"{path.parent}: holds results made with other settings "
                       f"({load_json(key_file)}); pass another --out_dir or delete it")
    save_json(key_file, key)
    if not path.is_file():
        return {}
    rows, lines = [], path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if len(rows) < len(lines):
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return {r["index"]: r for r in rows}


def on_main(fn, ddp: dist.Dist):
    """fn() run on rank 0 only, its result (or its V2LError) handed to every rank."""
    result = None
    if ddp.is_main:
        try:
            result = ("ok", fn())
        except V2LError as e:
            result = ("error", str(e))
    status, value = dist.all_gather_objects(result, ddp)[0]
    if status == "error":
        raise V2LError(value)
    return value


def is_done(row: dict | None) -> bool:
    return row is not None and (not REFERENCES or all(v in row for v in REFERENCE_NAMES))


def rounds(todo: list, ddp: dist.Dist) -> list[list]:
    """This rank's batches: each round hands consecutive batches of BATCH_SIZE episodes to
    ranks 0, 1, ..., so every batch is the one a single process would decode."""
    step = BATCH_SIZE * ddp.world
    return [todo[i + ddp.rank * BATCH_SIZE:i + (ddp.rank + 1) * BATCH_SIZE]
            for i in range(0, len(todo), step)]


def setting_words(strings: dict, k: int) -> dict[str, str]:
    return {p: image_words(strings[p], k, WORD_SEPARATOR, GLOBAL_DEDUP, STRIP_WORDS, SORT_WORDS)
            for p in strings}


def run_setting(s: dict, episodes: list, todo: list, strings: dict, greedy: BatchedGreedy, llm,
                ddp: dist.Dist) -> dict | None:
    """Decode this rank's share of ``todo``; rank 0 logs every rank's rows and returns the
    setting's summary (other ranks: None)."""
    out = Path(OUT_DIR) / setting_name(s)
    log = out / "episodes.jsonl"
    words = setting_words(strings, s["global_k"])
    prompter = FewShotPrompter(llm.text_tokenizer, induction=s["induction"], repeat=s["repeat"],
                               constraint=CONSTRAINT)
    for batch in rounds(todo, ddp):
        rows, error = [], None
        try:
            for r in evaluate_episodes(greedy, prompter, batch, words, MAX_NEW_TOKENS, BATCH_SIZE,
                                       spaces=CLASS_NAMES == "spaces", references=REFERENCES):
                rows.append({"index": r.index, "prediction": r.prediction, "target": r.target,
                             "correct": r.correct, "prompt_tokens": r.prompt_tokens,
                             "prompt": r.prompt} | r.references)
        except V2LError as e:     # every rank stops, not only the one that met the problem
            error = str(e)
        gathered = dist.all_gather_objects((rows, error), ddp)
        errors = [e for _, e in gathered if e]
        if errors:
            raise V2LError(errors[0])
        if ddp.is_main:
            with open(log, "a", encoding="utf-8") as f:
                for rank_rows, _ in gathered:
                    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rank_rows)
                f.flush()
    if not ddp.is_main:
        return None
    done = load_done(log, key_for(s, llm))
    summary = summarise(s, [done[ep.index] for ep in episodes])
    save_json(out / "summary.json", summary)
    write_manifest(out, EVAL_UNDERSTANDING_SETTING, settings | s, ["episodes.jsonl", "summary.json"],
                   inputs=finished_inputs(tokenizer=TOKENIZER_DIR), info=summary)
    refs = (f"; ceiling {100 * summary['ceiling']:.1f}%, floor {100 * summary['floor']:.1f}%"
            if REFERENCES else "")
    print(f"{setting_name(s)}: accuracy {100 * summary['accuracy']:.1f}% (95% CI "
          f"{100 * summary['ci95'][0]:.1f}-{100 * summary['ci95'][1]:.1f}, "
          f"{summary['n']} episodes){refs}")
    return summary


def summarise(s: dict, rows: list[dict]) -> dict:
    """The setting's row: accuracy, ceiling and floor (each with its 95% Wilson interval) over
    the same episodes."""
    n, correct = len(rows), sum(r["correct"] for r in rows)
    summary = s | {"n": n, "correct": correct, "accuracy": correct / n,
                   "ci95": list(wilson_interval(correct, n)), "chance": 1 / s["n_way"],
                   "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rows) / n}
    for v in REFERENCE_NAMES:
        hits = sum(r[v]["correct"] for r in rows) if REFERENCES else None
        summary[v] = hits / n if REFERENCES else None
        summary[f"{v}_ci95"] = list(wilson_interval(hits, n)) if REFERENCES else None
    return summary


TABLE = ["n_way", "k_shot", "global_k", "induction", "repeat", "n", "accuracy", "ci95",
         "ceiling", "ceiling_ci95", "floor", "floor_ci95", "chance"]


def cell(row: dict, col: str) -> str:
    value = row[col]
    if value is None:
        return ""
    if col.endswith("ci95"):
        return f"{100 * value[0]:.1f}-{100 * value[1]:.1f}"
    if col in ("accuracy", "ceiling", "floor", "chance"):
        return f"{100 * value:.1f}"
    return str(value)


def write_table(rows: list[dict]) -> None:
    md = ["| " + " | ".join(TABLE) + " |", "|" + " --- |" * len(TABLE)]
    md += ["| " + " | ".join(cell(r, c) for c in TABLE) + " |" for r in rows]
    out = Path(OUT_DIR)
    with atomic_path(out / "results.md") as tmp:
        Path(tmp).write_text("\n".join(md) + "\n", encoding="utf-8")
    with atomic_path(out / "results.csv") as tmp:
        Path(tmp).write_text("\n".join([",".join(TABLE)] + [
            ",".join(cell(r, c) for c in TABLE) for r in rows]) + "\n", encoding="utf-8")
    print("\n".join(md))


def key_for(s: dict, llm) -> dict:
    """What the logged answers depend on beside the setting (a mismatch refuses to resume)."""
    return s | {"tokenizer": str(TOKENIZER_DIR), "llm": llm.ident, "llm_dtype": str(llm.model.dtype),
                "data_dir": str(DATA_DIR), "split": SPLIT, "episodes_csv": EPISODES_CSV,
                "seed": SEED, "max_new_tokens": MAX_NEW_TOKENS, "constraint": CONSTRAINT,
                "class_names": CLASS_NAMES, "word_separator": WORD_SEPARATOR,
                "strip_words": STRIP_WORDS, "global_dedup": GLOBAL_DEDUP, "sort_words": SORT_WORDS}


def main():
    check_options()
    ddp = dist.init(DEVICE)
    torch.manual_seed(SEED)
    plan = [(s, episodes_for(s)) for s in setting_grid()]
    tokenizer = load_tokenizer(TOKENIZER_DIR, device=ddp.device)
    dtype = llm_dtype(LLM_DTYPE, ddp.device)
    llm = load_llm(LLM, dtype=dtype, device=ddp.device)
    todos = []
    for s, episodes in plan:
        done = on_main(lambda: load_done(Path(OUT_DIR) / setting_name(s) / "episodes.jsonl",
                                         key_for(s, llm)), ddp)
        todos.append([ep for ep in episodes if not is_done(done.get(ep.index))])
    # global words only for the images of this rank's remaining episodes
    paths = sorted({p for todo in todos for batch in rounds(todo, ddp) for ep in batch
                    for p, _ in ep.support + (ep.query,)})
    k_max = max(s["global_k"] for s, _ in plan)
    k_fetch = fetch_count(k_max, GLOBAL_DEDUP, tokenizer.tok_embeddings_global.weight.shape[0])
    strings = dict(zip(paths, global_token_strings(tokenizer, paths, k_fetch,
                                                   batch_size=64, num_workers=NUM_WORKERS,
                                                   progress=ddp.is_main))) if paths else {}
    pad = llm.text_tokenizer.pad_token_id if llm.text_tokenizer.pad_token_id is not None else 0
    greedy = BatchedGreedy(llm.model, pad, prefix_cache=PREFIX_CACHE)
    rows = [run_setting(s, eps, todo, strings, greedy, llm, ddp)
            for (s, eps), todo in zip(plan, todos)]
    if ddp.is_main:
        write_table(rows)
        write_manifest(OUT_DIR, EVAL_UNDERSTANDING, settings, ["results.md", "results.csv"],
                       inputs=finished_inputs(tokenizer=TOKENIZER_DIR),
                       info={"settings": rows, "llm_dtype": dtype})
    dist.shutdown(ddp)


if __name__ == "__main__":
    run_main(main, EVAL_UNDERSTANDING, settings)
