"""Image restoration by a frozen LLM: inpainting, outpainting, deblurring, rotation, shift.

For each image the LLM reads ten noisy copies of the image's local token
sequence as in-context examples and predicts the missing / clean local tokens
two at a time (restricted to local codebook ids); the predicted grid is decoded
with the image's global tokens (engine/denoise.py describes the protocol).

Scores against the clean 128 px image (FID, LPIPS, PSNR, SSIM): the corrupted
input (the baseline: what the LLM was given), the LLM's restoration, and the
tokenizer's own reconstruction of the clean image (the ceiling). Writes
``results.json`` / ``results.csv`` / ``results.md``, PNG strips
(clean | corrupted | restored) for the first images, and a manifest. Long runs
resume from chunks; ``torchrun --nproc_per_node N`` splits the images.

    python eval_denoising.py --tokenizer_dir out/tokenizer --llm llama-2-7b-hf --data_dir imagenet
"""
import random
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data.images import ImageFolderDataset, collate_skip_bad
from engine.denoise import (NOISE_RATES, WINDOW_TASKS, DenoisePrompter, DenoiseViews, check_tasks,
                            codebook_vocab_mask, corrupt_batch, noisy_batch, prediction_mask, restore)
from engine.greedy import BatchedGreedy
from models.llm import load_llm
from engine.metrics import ReconstructionMetrics
from models.tokenizer import V2LTokenizer
from utils import dist
from utils.artifacts import ChunkStore, atomic_path, save_json, write_manifest, finished_inputs
from utils.figures import save_image_grid
from utils.cli import configure, run_main

TOKENIZER_DIR = "out/tokenizer"   # the trained tokenizer (directory or tokenizer.pt)
LLM = "models/llama-2-7b"         # the frozen LLM: Hugging Face dir, Meta LLaMA dir or .gguf
LLM_DTYPE = "auto"                # auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16, bf16
DATA_DIR = "data/imagenet"       # image root (ImageNet layout)
SPLIT = "val"                     # sub-folder of DATA_DIR ("" for DATA_DIR itself)
TASKS = ["inpainting", "outpainting", "deblurring", "rotation", "shift"]  # tasks to run
MAX_IMAGES = 5000                 # first images of the split (the paper: ~5,000 val images)
STEP = 2                          # local tokens predicted per LLM call
WINDOW = 16                       # preceding tokens shown per example (in/outpainting)
SEED = 0                          # noise and blur seed (per image, independent of batching)
BATCH_SIZE = 64                   # prompts per LLM forward pass
CHUNK_IMAGES = 16                 # images per resumable chunk
METRICS = ["psnr", "ssim", "lpips", "fid"]  # scores to compute (FID needs the TF-Inception weights)
INCEPTION_WEIGHTS = ""            # TF-Inception weights file for FID ("" = torch hub's cache)
SAVE_STRIPS = 32                  # PNG strips written per task (first images)
DEVICE = "auto"                   # auto, cpu or cuda
NUM_WORKERS = 4                   # image loading workers
OUT_DIR = "out/eval_denoising"    # where results are written

settings = configure(globals())
VARIANTS = ("corrupted", "restored", "reconstruction")


def save_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def chunk_batches(ds, store: ChunkStore, chunks: list[int], desc: str):
    """(chunk index, batch) for each chunk, unreadable images dropped."""
    for ci in tqdm(chunks, desc=desc):
        lo, hi = store.bounds(ci)
        loader = DataLoader(Subset(ds, range(lo, hi)), batch_size=hi - lo,
                            num_workers=NUM_WORKERS, collate_fn=collate_skip_bad)
        yield ci, next(iter(loader))


def tokenize_and_restore(task, ds, store, tokenizer, greedy, prompter, vocab_mask, ddp) -> None:
    """The LLM pass: each chunk's clean, query and restored local tokens, saved as it finishes."""
    for ci, batch in chunk_batches(ds, store, store.todo(ddp.rank, ddp.world), f"{task} (rank {ddp.rank})"):
        if "image" not in batch:      # every image of the chunk unreadable
            n = tokenizer.config.grid ** 2
            store.save(ci, {k: torch.zeros((0,) + s, dtype=torch.long) for k, s in
                            (("index", ()), ("global_idx", (tokenizer.config.global_topk,)),
                             ("clean", (n,)), ("query", (n,)), ("pred", (n,)))})
            continue
        x, x_clip, x_shift = (t.to(ddp.device) for t in batch["image"])
        idx = batch["index"].tolist()
        global_idx, clean = tokenizer.encode(x, x_clip)
        if task in WINDOW_TASKS:      # known cells are the clean ones; the rest is predicted
            query = clean.clone()
        else:                         # global tokens from the clean CLIP view, as the authors
            query = tokenizer.encode(corrupt_batch(task, x, x_shift, idx, SEED), x_clip)[1]
        clean, query = clean.flatten(1).cpu(), query.flatten(1).cpu()
        noisy_clean, noisy_query = noisy_batch(clean, query, tokenizer.llm_ids.cpu(), idx, SEED)
        log = [] if ci == 0 else None
        pred = restore(greedy, prompter, task, query, noisy_clean, noisy_query, vocab_mask,
                       step=STEP, window=WINDOW, batch_size=BATCH_SIZE, grid=tokenizer.config.grid,
                       prompt_log=log)
        if log:                       # the first prompt, decoded from the ids the LLM read
            save_text(Path(OUT_DIR) / task / "prompt_example.txt", prompter.text(log[0]))
        store.save(ci, {"index": batch["index"], "global_idx": global_idx.cpu(), "clean": clean,
                        "query": query, "pred": pred})


@torch.no_grad()
def score(task, ds, store, tokenizer, device) -> dict:
    """Decode the saved tokens and score the three variants against the clean images."""
    tokens = store.gather()
    row_of = {int(i): r for r, i in enumerate(tokens["index"].tolist())}
    first = ReconstructionMetrics(METRICS, device=device, inception_weights=INCEPTION_WEIGHTS or None)
    meters = {"corrupted": first} | {v: ReconstructionMetrics(
        first.metrics, device=device, inception=first.inception, lpips=first.lpips)
        for v in VARIANTS[1:]}
    cells = prediction_mask(task, tokenizer.config.grid).flatten()
    hits = {"corrupted": 0, "restored": 0}
    strips = Path(OUT_DIR) / task / "strips"
    for _, batch in chunk_batches(ds, store, range(store.n_chunks), f"{task} scores"):
        if "image" not in batch:
            continue
        x, _, x_shift = (t.to(device) for t in batch["image"])
        idx = batch["index"].tolist()
        rows = torch.tensor([row_of[i] for i in idx])
        gidx = tokens["global_idx"][rows].to(device)
        grid = (len(idx), tokenizer.config.grid, tokenizer.config.grid)
        out = {"corrupted": corrupt_batch(task, x, x_shift, idx, SEED),
               "restored": tokenizer.decode(tokens["pred"][rows].view(grid).to(device), gidx),
               "reconstruction": tokenizer.decode(tokens["clean"][rows].view(grid).to(device), gidx)}
        for v in VARIANTS:
            meters[v].update(x, out[v])
        clean = tokens["clean"][rows][:, cells]
        hits["restored"] += int((tokens["pred"][rows][:, cells] == clean).sum())
        if task not in WINDOW_TASKS:
            hits["corrupted"] += int((tokens["query"][rows][:, cells] == clean).sum())
        for j, i in enumerate(idx):
            if i < SAVE_STRIPS:
                save_image_grid(torch.stack([x[j], out["corrupted"][j], out["restored"][j]]), strips / f"{i:05d}.png", per_line=3, padding=0)
    n_cells = max(1, len(row_of) * int(cells.sum()))
    token_acc = {"restored": hits["restored"] / n_cells, "reconstruction": None,
                 "corrupted": None if task in WINDOW_TASKS else hits["corrupted"] / n_cells}
    return {v: meters[v].compute() | {"token_acc": token_acc[v]} for v in VARIANTS}


def write_results(results: dict) -> list[str]:
    cols = ["task", "variant", "n_images", "psnr", "ssim", "lpips", "fid", "token_acc"]
    fmt = lambda x: "" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))  # noqa: E731
    rows = [[task, v] + [fmt(results[task][v].get(c)) for c in cols[2:]]
            for task in results for v in VARIANTS]
    out = Path(OUT_DIR)
    save_json(out / "results.json", results)
    save_text(out / "results.csv", "\n".join(",".join(r) for r in [cols] + rows) + "\n")
    md = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    save_text(out / "results.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return ["results.json", "results.csv", "results.md"]


def main():
    tasks = check_tasks(TASKS)
    ddp = dist.init(DEVICE)
    random.seed(SEED)
    torch.manual_seed(SEED)
    tokenizer = V2LTokenizer.load(TOKENIZER_DIR, device=ddp.device)
    llm = load_llm(LLM, dtype=LLM_DTYPE, device=ddp.device)
    ds = ImageFolderDataset(DATA_DIR, SPLIT or None, transform=DenoiseViews(tokenizer.clip),
                            max_images=MAX_IMAGES)
    pad = llm.text_tokenizer.pad_token_id if llm.text_tokenizer.pad_token_id is not None else 0
    greedy = BatchedGreedy(llm.model, pad)
    prompter = DenoisePrompter(llm.text_tokenizer, STEP)
    vocab_mask = codebook_vocab_mask(tokenizer.llm_ids, llm.model.config.vocab_size)
    results = {}
    for task in tasks:
        key = {"task": task, "step": STEP, "window": WINDOW, "seed": SEED, "rates": NOISE_RATES,
               "tokenizer": str(TOKENIZER_DIR), "llm": llm.ident, "data": [str(DATA_DIR), SPLIT],
               "n_images": len(ds)}
        store = ChunkStore(Path(OUT_DIR) / task, len(ds), CHUNK_IMAGES, key)
        tokenize_and_restore(task, ds, store, tokenizer, greedy, prompter, vocab_mask, ddp)
        dist.barrier(ddp)
        if ddp.is_main:
            results[task] = score(task, ds, store, tokenizer, ddp.device)
    if ddp.is_main:
        files = write_results(results)
        inputs = finished_inputs(tokenizer=TOKENIZER_DIR)
        write_manifest(OUT_DIR, "eval_denoising", settings, files, inputs=inputs,
                       info={"llm": llm.ident, "n_images": len(ds)})
    dist.shutdown(ddp)


if __name__ == "__main__":
    run_main(main)
