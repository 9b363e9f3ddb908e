"""Few-shot image classification by a frozen LLM reading images as words (N-way K-shot).

Each image becomes its k global token strings; the LLM sees K labelled
examples per class and names the query image's class (open-ended mini-ImageNet
protocol; constrained to the class names when the induction line is on).
Episodes are generated reproducibly from a class-folder data set (on ImageNet:
the 20 mini-ImageNet test classes) or read from the authors' CSV lists.

Writes, per setting, ``<out_dir>/<setting>/episodes.jsonl`` (prompt,
prediction, target, correct; a rerun skips the episodes already there),
``summary.json`` (accuracy, 95% Wilson interval) and a manifest; plus
``results.md`` / ``results.csv``, one row per setting.

    python eval_understanding.py --tokenizer_dir out/tokenizer --llm llama-2-7b-hf --data_dir imagenet
    python eval_understanding.py --sweep true      # 2/5-way x 1/3/5-shot x k in {5, 21}
"""
import json
from pathlib import Path

import torch
from tqdm import tqdm

from data.episodes import generate_episodes, read_episode_csv
from engine.fewshot import FewShotPrompter, evaluate_episodes, global_token_strings, wilson_interval
from engine.greedy import BatchedGreedy
from models.llm import load_llm
from models.tokenizer_io import load_tokenizer
from utils.artifacts import atomic_path, load_json, save_json, write_manifest, finished_inputs
from utils.cli import configure, run_main
from utils.errors import V2LError

TOKENIZER_DIR = "out/tokenizer"   # the trained tokenizer (directory or tokenizer.pt)
LLM = "models/llama-2-7b"         # the frozen LLM: Hugging Face dir, Meta LLaMA dir or .gguf
LLM_DTYPE = "auto"                # auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16, bf16
DATA_DIR = "data/imagenet"       # class-folder images; wnid folders -> the mini-ImageNet test classes
SPLIT = "train"                   # sub-folder of DATA_DIR (mini-ImageNet images are ImageNet train images)
EPISODES_CSV = ""                 # the authors' episode list (paths relative to DATA_DIR) instead of generated ones
N_WAY = 2                         # classes per episode
K_SHOT = 1                        # support images per class
GLOBAL_K = 21                     # global tokens per image (the paper uses 5 and 21)
INDUCTION = True                  # task induction line + decoding constrained to the class names
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

cfg = configure(globals())

SWEEP_WAYS, SWEEP_SHOTS, SWEEP_KS = (2, 5), (1, 3, 5), (5, 21)


def settings() -> list[dict]:
    if SWEEP:
        return [dict(n_way=n, k_shot=k, global_k=g, induction=True, repeat=REPEAT)
                for n in SWEEP_WAYS for k in SWEEP_SHOTS for g in SWEEP_KS]
    return [dict(n_way=N_WAY, k_shot=K_SHOT, global_k=GLOBAL_K, induction=INDUCTION, repeat=REPEAT)]


def setting_name(s: dict) -> str:
    return (f"{s['n_way']}way_{s['k_shot']}shot_k{s['global_k']}"
            f"_ind{int(s['induction'])}_rep{s['repeat']}")


def episodes_for(s: dict) -> list:
    if EPISODES_CSV:
        if SWEEP:
            raise V2LError("--episodes_csv holds one setting's episodes; run it without --sweep")
        return read_episode_csv(EPISODES_CSV, DATA_DIR)[:N_EPISODES]
    return generate_episodes(DATA_DIR, s["n_way"], s["k_shot"], N_EPISODES, SEED, SPLIT)


def load_done(path: Path, key: dict) -> list[dict]:
    """The results already in the JSONL log (a torn last line is dropped), after checking
    that they were made with the same settings."""
    key_file = path.parent / "key.json"
    if key_file.is_file() and load_json(key_file) != key:
        raise V2LError(f"{path.parent}: holds results made with other settings "
                       f"({load_json(key_file)}); pass another --out_dir or delete it")
    save_json(key_file, key)
    if not path.is_file():
        return []
    rows, lines = [], path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if len(rows) < len(lines):
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return rows


def run_setting(s: dict, episodes: list, strings: dict, decoder: BatchedGreedy, llm, key: dict) -> dict:
    out = Path(OUT_DIR) / setting_name(s)
    log = out / "episodes.jsonl"
    done = {r["index"]: r for r in load_done(log, key | s)}
    todo = [ep for ep in episodes if ep.index not in done]
    words = {p: "".join(strings[p][:s["global_k"]]) for p in strings}
    prompter = FewShotPrompter(llm.text_tokenizer, induction=s["induction"], repeat=s["repeat"])
    results = evaluate_episodes(decoder, prompter, todo, words, MAX_NEW_TOKENS, BATCH_SIZE)
    with open(log, "a", encoding="utf-8") as f:
        for r in tqdm(results, total=len(todo), desc=setting_name(s)):
            row = {"index": r.index, "prediction": r.prediction, "target": r.target,
                   "correct": r.correct, "prompt_tokens": r.prompt_tokens, "prompt": r.prompt}
            done[r.index] = row
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
    rows = [done[ep.index] for ep in episodes]
    n, correct = len(rows), sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(correct, n)
    summary = s | {"n": n, "correct": correct, "accuracy": correct / n, "ci95": [lo, hi],
                   "chance": 1 / s["n_way"],
                   "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rows) / n}
    save_json(out / "summary.json", summary)
    inputs = finished_inputs(tokenizer=TOKENIZER_DIR)
    write_manifest(out, "eval_understanding_setting", cfg | s, ["episodes.jsonl", "summary.json"],
                   inputs=inputs, info=summary)
    print(f"{setting_name(s)}: accuracy {100 * correct / n:.1f}% "
          f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}, {n} episodes)")
    return summary


def write_table(rows: list[dict]) -> None:
    cols = ["n_way", "k_shot", "global_k", "induction", "repeat", "n", "accuracy", "ci95", "chance"]
    fmt = lambda r, c: (f"{100 * r[c]:.1f}" if c in ("accuracy", "chance") else  # noqa: E731
                        f"{100 * r[c][0]:.1f}-{100 * r[c][1]:.1f}" if c == "ci95" else str(r[c]))
    md = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    md += ["| " + " | ".join(fmt(r, c) for c in cols) + " |" for r in rows]
    out = Path(OUT_DIR)
    with atomic_path(out / "results.md") as tmp:
        Path(tmp).write_text("\n".join(md) + "\n", encoding="utf-8")
    with atomic_path(out / "results.csv") as tmp:
        Path(tmp).write_text("\n".join([",".join(cols)] + [
            ",".join(fmt(r, c) for c in cols) for r in rows]) + "\n", encoding="utf-8")
    print("\n".join(md))


def main():
    device = ("cuda" if torch.cuda.is_available() else "cpu") if DEVICE == "auto" else DEVICE
    torch.manual_seed(SEED)
    plan = [(s, episodes_for(s)) for s in settings()]
    v2l = load_tokenizer(TOKENIZER_DIR, device=device)
    llm = load_llm(LLM, dtype=LLM_DTYPE, device=device)
    paths = sorted({p for _, eps in plan for ep in eps for p, _ in ep.support + (ep.query,)})
    k_max = max(s["global_k"] for s, _ in plan)
    strings = dict(zip(paths, global_token_strings(v2l, paths, k_max, batch_size=64,
                                                   num_workers=NUM_WORKERS)))
    pad = llm.text_tokenizer.pad_token_id if llm.text_tokenizer.pad_token_id is not None else 0
    decoder = BatchedGreedy(llm.model, pad, prefix_cache=PREFIX_CACHE)
    key = {"tokenizer": str(TOKENIZER_DIR), "llm": llm.ident, "data_dir": str(DATA_DIR),
           "split": SPLIT, "episodes_csv": EPISODES_CSV, "seed": SEED, "max_new_tokens": MAX_NEW_TOKENS}
    rows = [run_setting(s, eps, strings, decoder, llm, key) for s, eps in plan]
    write_table(rows)
    inputs = finished_inputs(tokenizer=TOKENIZER_DIR)
    write_manifest(OUT_DIR, "eval_understanding", cfg, ["results.md", "results.csv"], inputs=inputs,
                   info={"settings": rows})


if __name__ == "__main__":
    run_main(main)
