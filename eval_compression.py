"""Few-shot classification with VoCo-compressed images, against its bounds, and what it costs.

On the same seeded N-way K-shot episodes (the evaluation classes step 5 held
out), the frozen LLM answers with each image given as

- upper: its full image words (the V2L few-shot prompt);
- lower: VoCo blocks made by the untrained VoCo weights (the paper's "random
  compression" lower bound, at each k);
- none: nothing (no image at all);
- voco: VoCo blocks of the trained weights, for each k in EVAL_KS.

Retention = (voco - lower) / (upper - lower) at the same k (the paper's
definition). Every image is compressed once per run and its block reused by
every episode it appears in. Cost per image (tokens kept, KV bytes, compression
FLOPs and time) and per episode (positions, prefill FLOPs, episodes/s).

Writes OUT_DIR: results.json (every condition, retention, cost, and the rows
for the run summary), results.md, retention.png and manifest.json.

    python eval_compression.py --tokenizer_dir out/tokenizer --llm models/llama-2-7b \
        --voco_dir out/voco --data_dir imagenet
"""
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.episodes import generate_episodes
from data.images import scan_split
from engine.fewshot import wilson_interval
from engine.voco import (VoCoPrompter, greedy, image_word_ids, load_voco, prefill_flops,
                         prompt_positions, realize, retention_interval, set_attention)
from models.llm import llm_dtype, load_llm
from models.tokenizer_io import load_tokenizer
from models.voco import VoCoBlock, kv_bytes_per_token
from utils.artifacts import MANIFEST, finished_inputs, save_json, write_manifest
from utils.cli import configure, run_main
from utils.stages import EVAL_COMPRESSION
from utils.errors import V2LError
from utils.tables import write_table

TOKENIZER_DIR = "out/tokenizer"   # the trained V2L tokenizer (directory or tokenizer.pt)
LLM = "/models/llama-2-7b"        # the frozen LLM the VoCo weights were trained on
LLM_DTYPE = "bf16"                # bf16 (VoCo training as its authors), fp16 or fp32; a CPU: bf16 where native, else fp32
ATTN = "sdpa"                     # attention: sdpa or eager (flash-attention cannot take VoCo's mask)
VOCO_DIR = "out/voco"             # the step-5 artifact
DATA_DIR = "/data/imagenet"       # class-folder images
SPLIT = "train"                   # sub-folder of DATA_DIR (mini-ImageNet images are ImageNet train images)
N_WAY = 2                         # classes per episode
K_SHOT = 1                        # support images per class
N_EPISODES = 1000                 # episodes (the same for every condition)
SEED = 0                          # episode seed (the classes differ from step 5's anyway)
EVAL_KS: tuple[int, ...] = (1, 2, 4, 8)  # VoCo tokens per image to evaluate (each <= the trained k_max)
INDUCTION = True                  # induction line + decoding constrained to the class names
BATCH_SIZE = 8                    # episodes decoded together
MAX_NEW_TOKENS = 16               # longest answer
DEVICE = "auto"                   # auto, cpu or cuda
NUM_WORKERS = 4                   # image loading workers (image words)
OUT_DIR = "out/eval_compression"  # where results are written

settings = configure(globals())



def context_check(prompts: dict, context: int | None) -> None:
    """Refuse, before anything runs, a condition whose prompt does not fit the context."""
    if context is None:
        return
    for name, rows in prompts.items():
        for index, prompt in rows:
            need = prompt_positions(prompt) + MAX_NEW_TOKENS
            if need > context:
                raise V2LError(f"{name}, episode {index}: prompt of {need - MAX_NEW_TOKENS} positions "
                               f"+ {MAX_NEW_TOKENS} to generate is {need - context} over the LLM "
                               f"context of {context}; lower --k_shot or --n_way")


def decode(voco, prompter, episodes, prompts, desc: str) -> tuple[list[bool], float]:
    """Correct flags per episode and the decoding seconds."""
    eos = prompter.text_tokenizer.eos_token_id
    correct, seconds = [], 0.0
    for start in tqdm(range(0, len(episodes), BATCH_SIZE), desc=desc, leave=False):
        batch = episodes[start:start + BATCH_SIZE]
        rows = [p for _, p in prompts[start:start + BATCH_SIZE]]
        constraints = [prompter.constraint(ep) for ep in batch] if INDUCTION else None
        t0 = time.perf_counter()
        gen = greedy(voco, rows, MAX_NEW_TOKENS, constraints, eos)
        seconds += time.perf_counter() - t0
        for ep, toks in zip(batch, gen):
            pred = prompter.text_tokenizer.decode(toks, skip_special_tokens=True)
            correct.append(pred.strip().startswith(ep.target(spaces=True)))
    return correct, seconds


@torch.no_grad()
def compress_all(voco, words: dict, k: int) -> tuple[dict, float]:
    """Every image's block at k (each image once), and the seconds it took."""
    paths = sorted(words)
    blocks, t0 = {}, time.perf_counter()
    for start in range(0, len(paths), BATCH_SIZE * 4):
        chunk = paths[start:start + BATCH_SIZE * 4]
        blocks.update(zip(chunk, voco.compress([torch.tensor(words[p]) for p in chunk], k)))
    return {p: b.detach() for p, b in blocks.items()}, time.perf_counter() - t0


def row(name: str, k, correct: list[bool], seconds: float, positions: list[int]) -> dict:
    n, c = len(correct), sum(correct)
    lo, hi = wilson_interval(c, n)
    return {"condition": name, "k": k, "n": n, "correct": c, "accuracy": c / n, "ci95": [lo, hi],
            "episodes_per_s": n / seconds if seconds else None,
            "mean_positions": sum(positions) / len(positions)}


def main():
    device = ("cuda" if torch.cuda.is_available() else "cpu") if DEVICE == "auto" else DEVICE
    llm = load_llm(LLM, dtype=llm_dtype(LLM_DTYPE, device), device=device)
    set_attention(llm, ATTN)
    voco, info, trained = load_voco(VOCO_DIR, llm, TOKENIZER_DIR)
    too_big = [k for k in EVAL_KS if k > info["k_max"]]
    if too_big or not EVAL_KS:
        raise V2LError(f"--eval_ks {list(EVAL_KS)}: {VOCO_DIR} was trained with at most k_max="
                       f"{info['k_max']} VoCo tokens; use k between 1 and {info['k_max']}")
    _, _, folders = scan_split(DATA_DIR, SPLIT)
    classes = [c for c in info["eval_classes"] if c in folders]
    if not classes:
        raise V2LError(f"{Path(DATA_DIR) / SPLIT}: none of the classes step 5 held out "
                       f"({info['eval_classes'][:3]}...) is here; evaluate on the data step 5 used")
    episodes = generate_episodes(DATA_DIR, N_WAY, K_SHOT, N_EPISODES, SEED, SPLIT, classes=classes)
    prompter = VoCoPrompter(llm.text_tokenizer, induction=INDUCTION)
    segments = [prompter.segments(ep) for ep in episodes]
    # positions do not depend on the blocks' content: check every prompt before any work
    tokenizer = load_tokenizer(TOKENIZER_DIR, device=device)
    paths = sorted({p for ep in episodes for p, _ in ep.support + (ep.query,)})
    words = image_word_ids(tokenizer, llm.text_tokenizer, paths, info["global_k"],
                           info.get("word_separator", ""), info.get("global_dedup", False),
                           info.get("sort_words", False), NUM_WORKERS,
                           local=info.get("local_tokens", False))
    del tokenizer
    prompts = {c: [(ep.index, realize(s, c, words=words)) for ep, s in zip(episodes, segments)]
               for c in ("upper", "none")}
    for k in EVAL_KS:   # stand-in blocks of the right size for the length check
        dummy = VoCoBlock(torch.zeros(1, 1, k, 1), torch.zeros(1, 1, k, 1))
        prompts[f"voco k={k}"] = [(ep.index, realize(s, "voco", blocks={p: dummy for p in words}))
                                  for ep, s in zip(episodes, segments)]
    context_check(prompts, getattr(llm.model.config, "max_position_embeddings", None))

    rows, compress_s, flags = [], {}, {}
    for name in ("upper", "none"):
        correct, seconds = decode(voco, prompter, episodes, prompts[name], name)
        flags[(name, None)] = correct
        rows.append(row(name, None, correct, seconds, [prompt_positions(p) for _, p in prompts[name]]))
    for phase in ("lower", "voco"):
        if phase == "voco":
            voco.load_adapter_state(trained)
        for k in EVAL_KS:
            blocks, seconds_c = compress_all(voco, words, k)
            compress_s[(phase, k)] = seconds_c
            vprompts = [(ep.index, realize(s, "voco", blocks=blocks)) for ep, s in zip(episodes, segments)]
            correct, seconds = decode(voco, prompter, episodes, vprompts, f"{phase} k={k}")
            flags[(phase, k)] = correct
            rows.append(row(phase, k, correct, seconds, [prompt_positions(p) for _, p in vprompts]))
            print(f"{phase} k={k}: accuracy {100 * rows[-1]['accuracy']:.1f}%")

    upper = next(r for r in rows if r["condition"] == "upper")
    for r in rows:
        if r["condition"] == "voco":
            lower = next(x for x in rows if x["condition"] == "lower" and x["k"] == r["k"])
            gap = upper["accuracy"] - lower["accuracy"]
            r["retention"] = (r["accuracy"] - lower["accuracy"]) / gap if gap > 0 else None
            r["retention_ci95"] = retention_interval(
                flags[("upper", None)], flags[("lower", r["k"])], flags[("voco", r["k"])], seed=SEED)
    cost = costs(llm, words, episodes, rows, compress_s, len(voco.context_ids))
    write_results(rows, cost, info)


def costs(llm, words: dict, episodes: list, rows: list[dict], compress_s: dict,
          context: int = 0) -> dict:
    """Per image and per episode: tokens and KV bytes kept, prefill FLOPs, episodes/s;
    ``context``: the context tokens an image is compressed after."""
    model = llm.model
    per_token = kv_bytes_per_token(model)
    n_images = K_SHOT * N_WAY + 1
    full_tokens = sum(len(w) for w in words.values()) / len(words)
    upper = next(r for r in rows if r["condition"] == "upper")
    text_positions = upper["mean_positions"] - n_images * full_tokens
    out = {"kv_bytes_per_token": per_token, "images": len(words), "images_per_episode": n_images,
           "full": {"tokens_per_image": full_tokens, "kv_bytes_per_image": full_tokens * per_token,
                    "prefill_flops_per_episode": prefill_flops(model, upper["mean_positions"]),
                    "episodes_per_s": upper["episodes_per_s"]}}
    span = full_tokens + context + (1 if llm.text_tokenizer.bos_token_id is not None else 0)
    for r in rows:
        if r["condition"] != "voco":
            continue
        k = r["k"]
        out[f"voco k={k}"] = {
            "tokens_per_image": k, "kv_bytes_per_image": k * per_token,
            "kv_reduction": 1 - k / full_tokens,
            "prefill_flops_per_episode": prefill_flops(model, text_positions, n_images * k),
            "compress_flops_per_image": prefill_flops(model, span + k),
            "compress_s_per_image": compress_s[("voco", k)] / len(words),
            "episodes_per_s": r["episodes_per_s"],
            "speedup": (r["episodes_per_s"] / upper["episodes_per_s"]
                        if r["episodes_per_s"] and upper["episodes_per_s"] else None)}
    return out


def write_results(rows: list[dict], cost: dict, info: dict) -> None:
    from utils.figures import plot_curves
    out = Path(OUT_DIR)
    summary = []
    for r in rows:
        c = cost.get(f"voco k={r['k']}", {}) if r["condition"] == "voco" else (
            cost["full"] if r["condition"] == "upper" else {})
        summary.append({"condition": r["condition"], "k": r["k"], "n": r["n"],
                        "accuracy": r["accuracy"], "ci95": r["ci95"],
                        "retention": r.get("retention"), "retention_ci95": r.get("retention_ci95"),
                        "tokens_per_image": c.get("tokens_per_image"),
                        "kv_bytes_per_image": c.get("kv_bytes_per_image"),
                        "kv_reduction": c.get("kv_reduction"),
                        "episodes_per_s": r["episodes_per_s"]})
    save_json(out / "results.json", {"rows": rows, "cost": cost, "summary": summary,
                                     "trained": {k: info[k] for k in ("k_max", "train_ks", "llm")}})
    cols = ["condition", "k", "n", "accuracy", "ci95", "retention", "retention_ci95",
            "tokens_per_image", "kv_bytes_per_image", "episodes_per_s"]

    def fmt(s: dict, c: str) -> str:
        v = s[c]
        if v is None:
            return "-"
        if c in ("accuracy", "retention"):
            return f"{100 * v:.1f}"
        if c in ("ci95", "retention_ci95"):
            return f"{100 * v[0]:.1f}-{100 * v[1]:.1f}"
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    files = write_table(out, cols, [[fmt(s, c) for c in cols] for s in summary])
    voco = [s for s in summary if s["condition"] == "voco"]
    ks = [s["k"] for s in voco]
    acc = {name: ([s["k"] for s in summary if s["condition"] == name],
                  [100 * s["accuracy"] for s in summary if s["condition"] == name],
                  [100 * s["ci95"][0] for s in summary if s["condition"] == name],
                  [100 * s["ci95"][1] for s in summary if s["condition"] == name])
           for name in ("voco", "lower")}
    upper = next(s for s in summary if s["condition"] == "upper")
    acc["upper (full image words)"] = (ks, [100 * upper["accuracy"]] * len(ks))
    title = "retention " + ", ".join(
        f"k={s['k']}: " + ("-" if s["retention"] is None else f"{100 * s['retention']:.0f}%")
        for s in voco)
    plot_curves(acc, out / "retention.png", "VoCo tokens per image (k)", "accuracy %", title,
                log_x=True)
    inputs = finished_inputs(tokenizer=TOKENIZER_DIR)
    if (Path(VOCO_DIR) / MANIFEST).is_file():
        inputs["voco"] = VOCO_DIR
    write_manifest(out, EVAL_COMPRESSION, settings, ["results.json", *files, "retention.png"],
                   inputs=inputs, info={"summary": summary})


if __name__ == "__main__":
    run_main(main, EVAL_COMPRESSION, settings)
