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
FLOPs and time) and per episode (positions, prefill FLOPs, episodes/s). Times
are taken with the GPU synchronised; with several processes they are summed
over the ranks, so seconds and episodes/s are those of one device.

Memory: the blocks of a condition (k positions' keys and values over all
layers, per image) are kept in CPU memory, pinned when on a GPU; a batch moves
the blocks its episodes need to the GPU, and up to BLOCK_CACHE_GB of recently
read blocks stay there (a block is the same bits wherever it is: the results
do not depend on the budget). The decoding seconds include those transfers.

Under torchrun every rank does a share, and the results are those of one
process: the image words are made in pieces of WORD_PIECE images (piece i on
rank i % world, the batches one process runs) and gathered; the images are
compressed in the chunks one process uses (chunk i on rank i % world), each
chunk then broadcast from its rank and kept by the ranks whose episodes need
it; the episodes are decoded in the batches one process uses (batch i on rank
i % world). Rank 0 gathers the answers and writes.

Writes OUT_DIR: results.json (every condition, retention, cost, each
condition's answers, and the rows for the run summary), results.md,
retention.png and manifest.json.

    python eval_compression.py --tokenizer_dir out/tokenizer --llm models/llama-2-7b \
        --voco_dir out/voco --data_dir imagenet
    torchrun --nproc_per_node 8 eval_compression.py ...
"""
from pathlib import Path

import torch
import torch.distributed as tdist
from tqdm import tqdm

from data.episodes import generate_episodes
from data.images import class_folders
from engine.fewshot import wilson_interval
from engine.voco import (BlockStore, VoCoPrompter, greedy, image_word_ids, load_voco,
                         prefill_flops, prompt_positions, realize, retention_interval,
                         set_attention, synced_clock)
from models.llm import llm_dtype, load_llm
from models.tokenizer_io import load_tokenizer
from models.voco import VoCoBlock, block_shape, check_context, kv_bytes_per_token
from utils import dist
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
BATCH_SIZE = 8                    # episodes decoded together (images compressed: 4 x this)
BLOCK_CACHE_GB = 4.0              # GPU memory kept for recently read VoCo blocks (all blocks stay in CPU memory; 0: a batch's own only)
MAX_NEW_TOKENS = 16               # longest answer
DEVICE = "auto"                   # auto, cpu or cuda
NUM_WORKERS = 4                   # image loading workers (image words)
OUT_DIR = "out/eval_compression"  # where results are written

settings = configure(globals())

# images per piece of image words: a multiple of the batches image_word_ids runs (64 global,
# 16 local), so that an image's words come from the batch they come from in one process
WORD_PIECE = 64
IS_MAIN = True   # rank 0 (progress bars)



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


def decode(voco, prompter, episodes, prompt_of, batches, desc: str, device) -> tuple[dict, float]:
    """{batch number: (correct flags, answers)} for ``batches`` (number, episode indices) and
    the decoding seconds; ``prompt_of(i)``: episode i's realised prompt."""
    eos = prompter.text_tokenizer.eos_token_id
    out, seconds = {}, 0.0
    for b, idx in tqdm(batches, desc=desc, leave=False, disable=not IS_MAIN):
        batch = [episodes[i] for i in idx]
        constraints = [prompter.constraint(ep) for ep in batch] if INDUCTION else None
        t0 = synced_clock(device)
        gen = greedy(voco, [prompt_of(i) for i in idx], MAX_NEW_TOKENS, constraints, eos)
        seconds += synced_clock(device) - t0
        answers = [prompter.text_tokenizer.decode(toks, skip_special_tokens=True) for toks in gen]
        out[b] = ([a.strip().startswith(ep.target(spaces=True)) for ep, a in zip(batch, answers)],
                  answers)
    return out, seconds


@torch.no_grad()
def compress_chunks(voco, words: dict, chunks: list[list[str]], k: int, store: BlockStore,
                    device) -> float:
    """Compress each chunk of images in one batch into ``store``; the seconds it took."""
    t0 = synced_clock(device)
    for chunk in chunks:
        for p, block in zip(chunk, voco.compress([torch.tensor(words[p]) for p in chunk], k)):
            store.add(p, block)
    return synced_clock(device) - t0


def share_blocks(made: BlockStore, chunks: list[list[str]], needed: set, shape: tuple,
                 dtype: torch.dtype, ddp) -> BlockStore:
    """This rank's store of the blocks its episodes need: chunk i, made on rank i % world, is
    broadcast from there (one chunk at a time through the device) and kept where needed."""
    if not ddp.active:
        return made
    store = BlockStore(ddp.device, made.cache_bytes)
    for c, chunk in enumerate(chunks):
        src = c % ddp.world
        if ddp.rank == src:   # through the device: stream-ordered after the copies into ``made``
            buf = torch.stack([torch.stack([made.host(p).keys.to(ddp.device),
                                            made.host(p).values.to(ddp.device)]) for p in chunk])
            if tuple(buf.shape[2:]) != tuple(shape) or buf.dtype != dtype:
                raise RuntimeError(f"VoCo block of shape {tuple(buf.shape[2:])} {buf.dtype}, "
                                   f"expected {tuple(shape)} {dtype}")
        else:
            buf = torch.empty(len(chunk), 2, *shape, dtype=dtype, device=ddp.device)
        tdist.broadcast(buf, src=src)
        for i, p in enumerate(chunk):
            if p in needed:
                store.add(p, VoCoBlock(buf[i, 0], buf[i, 1]))
    return store


def make_words(tokenizer, text_tokenizer, paths: list[str], info: dict, ddp) -> dict:
    """Every image's words on every rank: piece i of WORD_PIECE images made on rank
    i % world, then gathered."""
    pieces = [paths[s:s + WORD_PIECE] for s in range(0, len(paths), WORD_PIECE)]
    mine = [p for piece in pieces[ddp.rank::ddp.world] for p in piece]
    error, words = None, {}
    try:
        words = image_word_ids(tokenizer, text_tokenizer, mine, info["global_k"],
                               info.get("word_separator", ""), info.get("global_dedup", False),
                               info.get("sort_words", False), NUM_WORKERS, progress=ddp.is_main,
                               local=info.get("local_tokens", False)) if mine else {}
    except V2LError as e:     # every rank stops, not only the one that met the problem
        error = str(e)
    if not ddp.active:
        if error:
            raise V2LError(error)
        return words
    dist.barrier(ddp)
    gathered = dist.all_gather_objects((error, words), ddp)
    errors = [e for e, _ in gathered if e]
    if errors:
        raise V2LError(errors[0])
    return {p: w for _, part in gathered for p, w in part.items()}


def row(name: str, k, correct: list[bool], seconds: float, positions: list[int]) -> dict:
    n, c = len(correct), sum(correct)
    lo, hi = wilson_interval(c, n)
    return {"condition": name, "k": k, "n": n, "correct": c, "accuracy": c / n, "ci95": [lo, hi],
            "episodes_per_s": n / seconds if seconds else None,
            "mean_positions": sum(positions) / len(positions)}


def main():
    global IS_MAIN
    ddp = dist.init(DEVICE, OUT_DIR)
    IS_MAIN = ddp.is_main
    device = ddp.device
    llm = load_llm(LLM, dtype=llm_dtype(LLM_DTYPE, device), device=device)
    set_attention(llm, ATTN)
    voco, info, trained = load_voco(VOCO_DIR, llm, TOKENIZER_DIR)
    too_big = [k for k in EVAL_KS if k > info["k_max"]]
    if too_big or not EVAL_KS:
        raise V2LError(f"--eval_ks {list(EVAL_KS)}: {VOCO_DIR} was trained with at most k_max="
                       f"{info['k_max']} VoCo tokens; use k between 1 and {info['k_max']}")
    if BLOCK_CACHE_GB < 0:
        raise V2LError(f"--block_cache_gb {BLOCK_CACHE_GB}: use 0 or more (GiB of GPU memory)")
    folders = class_folders(DATA_DIR, SPLIT)   # the images: listed once, for the episodes
    classes = [c for c in info["eval_classes"] if c in folders]
    if not classes:
        raise V2LError(f"{Path(DATA_DIR) / SPLIT}: none of the classes step 5 held out "
                       f"({info['eval_classes'][:3]}...) is here; evaluate on the data step 5 used")
    episodes = generate_episodes(DATA_DIR, N_WAY, K_SHOT, N_EPISODES, SEED, SPLIT, classes=classes)
    prompter = VoCoPrompter(llm.text_tokenizer, induction=INDUCTION)
    segments = [prompter.segments(ep) for ep in episodes]
    # the work of one process, cut the same way whatever the number of ranks
    batches = [(b, list(range(s, min(s + BATCH_SIZE, len(episodes)))))
               for b, s in enumerate(range(0, len(episodes), BATCH_SIZE))]
    my_batches = batches[ddp.rank::ddp.world]
    paths = sorted({p for ep in episodes for p, _ in ep.support + (ep.query,)})
    chunks = [paths[s:s + BATCH_SIZE * 4] for s in range(0, len(paths), BATCH_SIZE * 4)]
    needed = {p for _, idx in my_batches for i in idx
              for p, _ in episodes[i].support + (episodes[i].query,)}
    # positions do not depend on the blocks' content: check every prompt before any work
    tokenizer = load_tokenizer(TOKENIZER_DIR, device=device)
    words = make_words(tokenizer, llm.text_tokenizer, paths, info, ddp)
    del tokenizer
    prompts = {c: [(ep.index, realize(s, c, words=words)) for ep, s in zip(episodes, segments)]
               for c in ("upper", "none")}
    for k in EVAL_KS:   # stand-in blocks of the right size for the length check
        dummy = VoCoBlock(torch.zeros(1, 1, k, 1), torch.zeros(1, 1, k, 1))
        prompts[f"voco k={k}"] = [(ep.index, realize(s, "voco", blocks={p: dummy for p in words}))
                                  for ep, s in zip(episodes, segments)]
    context_check(prompts, getattr(llm.model.config, "max_position_embeddings", None))
    span = max(len(w) for w in words.values()) + len(voco.context_ids) + max(EVAL_KS) + (
        voco.bos_id is not None)
    check_context(llm.model, span, "an image to compress", "use fewer image tokens")

    answers, seconds, compress_s, host_bytes, reads = {}, {}, {}, {}, [0, 0]
    for name in ("upper", "none"):
        rows_of = [prompt for _, prompt in prompts[name]]
        answers[name], seconds[name] = decode(voco, prompter, episodes, lambda i: rows_of[i],
                                              my_batches, name, device)
    cache_bytes = int(BLOCK_CACHE_GB * 2**30)
    for phase in ("lower", "voco"):
        if phase == "voco":
            voco.load_adapter_state(trained)
        for k in EVAL_KS:
            made = BlockStore(device, cache_bytes)
            compress_s[(phase, k)] = compress_chunks(voco, words, chunks[ddp.rank::ddp.world], k,
                                                     made, device)
            dist.barrier(ddp)
            store = share_blocks(made, chunks, needed, block_shape(llm.model, k), voco.dtype, ddp)
            del made
            host_bytes[(phase, k)] = store.host_bytes
            label = f"{phase} k={k}"
            answers[label], seconds[label] = decode(
                voco, prompter, episodes, lambda i: realize(segments[i], "voco", blocks=store),
                my_batches, label, device)
            reads = [reads[0] + store.hits, reads[1] + store.reads]
            del store
    mine = {"answers": answers, "seconds": seconds, "compress_s": compress_s,
            "host_bytes": host_bytes, "reads": reads, "episodes": sum(len(i) for _, i in my_batches)}
    if ddp.active:
        dist.barrier(ddp)
    parts = dist.all_gather_objects(mine, ddp)
    if ddp.is_main:
        report(parts, llm, voco, info, episodes, prompts, words)
    dist.shutdown(ddp)


def report(parts: list[dict], llm, voco, info: dict, episodes, prompts: dict,
           words: dict) -> None:
    """Rank 0: the rows, retention and costs from every rank's answers; writes OUT_DIR."""
    def merged(label: str) -> list:
        by_batch = {b: got for part in parts for b, got in part["answers"][label].items()}
        return [x for b in sorted(by_batch) for x in zip(*by_batch[b])]

    def total(key: str, label) -> float:
        return sum(part[key][label] for part in parts)

    rows, flags, compress_s, predictions = [], {}, {}, {}
    for name in ("upper", "none"):
        got = merged(name)
        flags[(name, None)] = [c for c, _ in got]
        predictions[name] = [a for _, a in got]
        rows.append(row(name, None, flags[(name, None)], total("seconds", name),
                        [prompt_positions(p) for _, p in prompts[name]]))
    for phase in ("lower", "voco"):
        for k in EVAL_KS:
            label = f"{phase} k={k}"
            got = merged(label)
            flags[(phase, k)] = [c for c, _ in got]
            predictions[label] = [a for _, a in got]
            compress_s[(phase, k)] = total("compress_s", (phase, k))
            rows.append(row(phase, k, flags[(phase, k)], total("seconds", label),
                            [prompt_positions(p) for _, p in prompts[f"voco k={k}"]]))
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
    hits, reads = (sum(part["reads"][i] for part in parts) for i in (0, 1))
    cost["blocks"] = {"processes": len(parts), "episodes_per_process": [p["episodes"] for p in parts],
                      "cache_gb": BLOCK_CACHE_GB, "cache_hits": hits, "reads": reads,
                      "host_bytes_per_process": {f"{phase} k={k}": max(p["host_bytes"][(phase, k)]
                                                                       for p in parts)
                                                 for phase in ("lower", "voco") for k in EVAL_KS}}
    write_results(rows, cost, info, predictions)


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


def write_results(rows: list[dict], cost: dict, info: dict, predictions: dict) -> None:
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
                                     "trained": {k: info[k] for k in ("k_max", "train_ks", "llm")},
                                     "answers": predictions})
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
