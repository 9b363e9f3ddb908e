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
reads it, prediction, target, correct, the references), ``summary.json``
(accuracy, 95% Wilson interval, ceiling, floor) and a manifest; plus
``results.md`` / ``results.csv``, one row per setting. Episodes are answered in
chunks of CHUNK_EPISODES (utils/artifacts.py ``ChunkStore``), saved as they
finish: a killed run resumes, a longer run (--n_episodes) reuses the finished
chunks, other settings or another tokenizer never do. ``torchrun
--nproc_per_node N`` shares the chunks between N processes, each decoding its
chunks in the batches a single process would (same results); rank 0 writes.

    python eval_understanding.py --tokenizer_dir out/tokenizer --llm llama-2-7b-hf --data_dir imagenet
    python eval_understanding.py --sweep true      # 2/5-way x 1/3/5-shot x k in {5, 21}
"""
import json
from pathlib import Path

import torch

from data.episodes import generate_episodes, read_episode_csv
from engine.fewshot import (REFERENCES as REFERENCE_NAMES, FewShotPrompter, evaluate_episodes,
                            WORDS_AMPS, fetch_count, global_token_strings, image_words,
                            longest_prompt, wilson_interval, words_precision)
from engine.greedy import BatchedGreedy, auto_batch_size, parse_batch_size
from models.llm import llm_dtype, load_llm
from models.tokenizer_io import load_tokenizer
from utils import dist
from utils.artifacts import (ChunkStore, finished_inputs, run_key, save_json, save_text,
                             write_manifest)
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.tables import write_table
from utils.stages import EVAL_UNDERSTANDING, EVAL_UNDERSTANDING_SETTING

TOKENIZER_DIR = "out/tokenizer"   # the trained tokenizer (directory or tokenizer.pt)
LLM = "/models/llama-2-7b"        # the frozen LLM: Hugging Face dir, Meta LLaMA dir or .gguf
LLM_DTYPE = "fp16"                # fp16 (the authors'), bf16, fp32 or auto (fp16 on a GPU); a CPU runs bf16 if asked (bf16, auto) and native, else fp32
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
BATCH_SIZE = "auto"               # episodes decoded together: auto (on a GPU the most its free memory holds, a divisor of CHUNK_EPISODES; 8 on a CPU) or a number
CHUNK_EPISODES = 64               # episodes per saved chunk (the resume granularity), a multiple of BATCH_SIZE
MAX_NEW_TOKENS = 16               # longest answer
PREFIX_CACHE = True               # run the batch's shared prompt prefix once (same results, faster)
SWEEP = False                     # run the paper's grid: 2/5-way x 1/3/5-shot x k in {5, 21} (induction on)
DEVICE = "auto"                   # auto, cpu or cuda
TF32 = False                      # image words on a CUDA GPU: let fp32 matmuls and convolutions use TF32 (faster on Ampere and later; not the faithful numbers); a CPU ignores it
WORDS_AMP = "fp32"                # image words on a CUDA GPU: fp32 (faithful), or fp16 / bf16 autocast over the tokenizer (faster; a near-tie between codebook entries may flip); a CPU ignores it
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
    batch = parse_batch_size(BATCH_SIZE)
    if WORDS_AMP not in WORDS_AMPS:
        raise V2LError(f"--words_amp {WORDS_AMP!r}: use one of {', '.join(WORDS_AMPS)}")
    if N_EPISODES < 1:
        raise V2LError("--n_episodes must be at least 1")
    if batch is not None and (CHUNK_EPISODES < batch or CHUNK_EPISODES % batch):
        raise V2LError(f"--chunk_episodes {CHUNK_EPISODES}: use a multiple of --batch_size "
                       f"{BATCH_SIZE}, so that a chunk's batches are those of an unchunked run")


def episodes_for(s: dict) -> list:
    if EPISODES_CSV:
        if SWEEP or len(set(N_WAY)) > 1:
            raise V2LError("--episodes_csv holds one setting's episodes; run it without --sweep "
                           "and with one --n_way")
        return read_episode_csv(EPISODES_CSV, DATA_DIR)[:N_EPISODES]
    return generate_episodes(DATA_DIR, s["n_way"], s["k_shot"], N_EPISODES, SEED, SPLIT)


def store_for(s: dict, n_episodes: int, llm) -> ChunkStore:
    """The setting's chunks of answered episodes, keyed by what the answers depend on: the
    settings (the episode count aside: a longer run reuses the finished chunks), the tokenizer
    by artifact id and the LLM as it runs (its dtype after the CPU fallback)."""
    config = {k: v for k, v in settings.items() if k != "n_episodes"} | s
    key = run_key(config, tokenizer=TOKENIZER_DIR) | {"llm": llm.ident,
                                                      "llm_dtype": str(llm.model.dtype)}
    return ChunkStore(Path(OUT_DIR) / setting_name(s), n_episodes, CHUNK_EPISODES, key, rows=True)


def setting_words(strings: dict, k: int) -> dict[str, str]:
    return {p: image_words(strings[p], k, WORD_SEPARATOR, GLOBAL_DEDUP, STRIP_WORDS, SORT_WORDS)
            for p in strings}


def answer_chunks(s: dict, episodes: list, store: ChunkStore, strings: dict,
                  greedy: BatchedGreedy, llm, ddp: dist.Dist) -> None:
    """Answer and save this rank's unfinished chunks of the setting's episodes."""
    words = setting_words(strings, s["global_k"])
    prompter = FewShotPrompter(llm.text_tokenizer, induction=s["induction"], repeat=s["repeat"],
                               constraint=CONSTRAINT)
    todo = store.todo(ddp.rank, ddp.world)
    spaces = CLASS_NAMES == "spaces"
    batch = parse_batch_size(BATCH_SIZE)
    if batch is None and todo:    # auto: from the longest prompt of this rank's episodes
        mine = [ep for i in todo for ep in episodes[slice(*store.bounds(i))]]
        batch = auto_batch_size(greedy.model, longest_prompt(prompter, mine, words, spaces,
                                                             REFERENCES),
                                MAX_NEW_TOKENS, 3 if REFERENCES else 1, CHUNK_EPISODES)
        print(f"{setting_name(s)} (rank {ddp.rank}): --batch_size auto: {batch} episodes")
    for i in todo:
        lo, hi = store.bounds(i)
        results = evaluate_episodes(greedy, prompter, episodes[lo:hi], words, MAX_NEW_TOKENS,
                                    batch, spaces=spaces, references=REFERENCES)
        store.save(i, [{"index": r.index, "prediction": r.prediction, "target": r.target,
                        "correct": r.correct, "prompt_tokens": r.prompt_tokens,
                        "prompt": r.prompt} | r.references for r in results])


def finish_setting(s: dict, store: ChunkStore) -> dict:
    """Rank 0: the setting's episodes.jsonl, summary.json and manifest from its chunks."""
    out = Path(OUT_DIR) / setting_name(s)
    rows = store.gather()
    save_text(out / "episodes.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = summarise(s, rows)
    save_json(out / "summary.json", summary)
    write_manifest(out, EVAL_UNDERSTANDING_SETTING, settings | s, ["episodes.jsonl", "summary.json"],
                   inputs=finished_inputs(tokenizer=TOKENIZER_DIR), info=summary)
    store.cleanup()
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


def main():
    check_options()
    ddp = dist.init(DEVICE, OUT_DIR)
    torch.manual_seed(SEED)
    plan = [(s, episodes_for(s)) for s in setting_grid()]
    tokenizer = load_tokenizer(TOKENIZER_DIR, device=ddp.device)
    dtype = llm_dtype(LLM_DTYPE, ddp.device)
    llm = load_llm(LLM, dtype=dtype, device=ddp.device)
    stores = [store_for(s, len(episodes), llm) for s, episodes in plan]
    # global words only for the images of this rank's unfinished chunks
    paths = sorted({p for (_, episodes), store in zip(plan, stores)
                    for i in store.todo(ddp.rank, ddp.world) for ep in episodes[slice(*store.bounds(i))]
                    for p, _ in ep.support + (ep.query,)})
    k_max = max(s["global_k"] for s, _ in plan)
    k_fetch = fetch_count(k_max, GLOBAL_DEDUP, tokenizer.tok_embeddings_global.weight.shape[0])
    with words_precision(ddp.device, TF32, WORDS_AMP):
        strings = dict(zip(paths, global_token_strings(tokenizer, paths, k_fetch,
                                                       batch_size=64, num_workers=NUM_WORKERS,
                                                       progress=ddp.is_main))) if paths else {}
    pad = llm.text_tokenizer.pad_token_id if llm.text_tokenizer.pad_token_id is not None else 0
    greedy = BatchedGreedy(llm.model, pad, prefix_cache=PREFIX_CACHE)
    error = None
    try:
        for (s, episodes), store in zip(plan, stores):
            answer_chunks(s, episodes, store, strings, greedy, llm, ddp)
    except V2LError as e:     # every rank stops, not only the one that met the problem
        error = str(e)
    dist.barrier(ddp, "every rank's answers")   # uneven work: a wait without a deadline
    errors = [e for e in dist.all_gather_objects(error, ddp) if e]
    if errors:
        raise V2LError(errors[0])
    if ddp.is_main:
        rows = [finish_setting(s, store) for (s, _), store in zip(plan, stores)]
        write_table(OUT_DIR, TABLE, [[cell(r, c) for c in TABLE] for r in rows], csv=True)
        write_manifest(OUT_DIR, EVAL_UNDERSTANDING, settings, ["results.md", "results.csv"],
                       inputs=finished_inputs(tokenizer=TOKENIZER_DIR),
                       info={"settings": rows, "llm_dtype": dtype})
    dist.shutdown(ddp)


if __name__ == "__main__":
    run_main(main, EVAL_UNDERSTANDING, settings)
