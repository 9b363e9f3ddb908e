"""Image restoration by a frozen LLM: inpainting, outpainting, deblurring, rotation, shift.

For each image the LLM reads ten noisy copies of the image's local token
sequence as in-context examples and predicts the missing / clean local tokens
two at a time (restricted to local codebook ids); the predicted grid is decoded
with the image's global tokens (engine/denoise.py describes the protocol).

Scores (FID, LPIPS, PSNR, SSIM) against the clean image at the tokenizer's
resolution (128 px in the paper), per task, four rows: ``corrupted`` (the
corrupted image itself), ``baseline`` (the corrupted image encoded and decoded
by the same tokenizer: what the tokenizer gives without the LLM), ``restored``
(the LLM's restoration) and ``ceiling`` (the clean image through the
tokenizer). ``token_acc`` (baseline, restored): the share of the cells to
predict whose local token equals the clean image's.
Writes ``results.json`` ({task: {variant: {metric: value}}}), ``results.csv``,
``results.md``, PNG strips (clean | corrupted | baseline | restored | ceiling)
for the first images, each task's first prompt as text, and a manifest. Long runs
resume from chunks; ``torchrun --nproc_per_node N`` splits the images.

    python eval_denoising.py --tokenizer_dir out/tokenizer --llm llama-2-7b-hf --data_dir imagenet
"""
import random
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from data.images import ImageFolderDataset, load_chunks, merge_batches
from engine.denoise import (NOISE_RATES, VARIANTS, DenoisePrompter, DenoiseViews, check_blur_kernels,
                            check_protocol, check_tasks, codebook_vocab_mask, encode_task, noisy_batch,
                            prediction_mask, query_tokens, restore, token_hits, variant_images)
from engine.greedy import BatchedGreedy
from models.llm import llm_dtype, load_llm
from engine.metrics import ReconstructionMetrics
from models.tokenizer_io import load_tokenizer
from utils import dist
from utils.artifacts import ChunkStore, finished_inputs, run_key, save_json, save_text, write_manifest
from utils.figures import save_image_grid
from utils.cli import configure, run_main
from utils.stages import EVAL_DENOISING
from utils.tables import write_table

TOKENIZER_DIR = "out/tokenizer"   # the trained tokenizer (directory or tokenizer.pt)
LLM = "/models/llama-2-7b"        # the frozen LLM: Hugging Face dir, Meta LLaMA dir or .gguf
LLM_DTYPE = "fp16"                # fp16 (the authors'), bf16 or fp32; a CPU runs bf16 if asked and native, else fp32
PROTOCOL = "authors"              # authors (their image views and noise count) or consistent (engine/denoise.py)
DATA_DIR = "/data/imagenet"      # image root (ImageNet layout)
SPLIT = "val"                     # sub-folder of DATA_DIR ("" for DATA_DIR itself)
TASKS = ["inpainting", "outpainting", "deblurring", "rotation", "shift"]  # tasks to run
MAX_IMAGES = 5000                 # first images of the split (the paper: ~5,000 val images)
STEP = 2                          # local tokens predicted per LLM call
WINDOW = 16                       # preceding tokens shown per example (in/outpainting)
SEED = 0                          # noise and blur seed (per image, independent of batching)
BLUR_KERNELS = [5, 7, 9, 11]      # deblurring: Gaussian kernel sizes, one drawn per image, sigma from the size as OpenCV's (the authors' 5-11)
BATCH_SIZE = 64                   # prompts per LLM forward pass
CHUNK_IMAGES = 64                 # images per resumable chunk; in/outpainting batch them in each sequential LLM call
METRICS = ["psnr", "ssim", "lpips", "fid"]  # scores to compute (FID needs the TF-Inception weights)
INCEPTION_WEIGHTS = ""            # TF-Inception weights file for FID ("" = torch hub's cache)
SAVE_STRIPS = 32                  # PNG strips written per task (first images)
DEVICE = "auto"                   # auto, cpu or cuda
NUM_WORKERS = 4                   # image loading workers
OUT_DIR = "out/eval_denoising"    # where results are written

settings = configure(globals())
SAVED = ("clean", "corrupt", "pred")   # local tokens [N] saved per image (with index, global_idx)


def chunk_batches(ds, store: ChunkStore, chunks, desc: str):
    """(chunk index, batch of the chunk's images) for each chunk, unreadable images dropped:
    every worker decodes a share of each chunk, the workers live for all the chunks and
    decode the next ones while the LLM works (one loader)."""
    chunks = list(chunks)
    share = -(-store.chunk_size // max(1, NUM_WORKERS))
    loaded = load_chunks(ds, chunks, store.bounds, share, NUM_WORKERS)
    for ci, parts in tqdm(loaded, total=len(chunks), desc=desc):
        yield ci, merge_batches(list(parts))


def tokenize_and_restore(task, ds, store, tokenizer, greedy, prompter, vocab_mask, ddp) -> None:
    """The LLM pass: each chunk's clean, corrupted and restored local tokens, saved as it finishes."""
    n, k = tokenizer.config.grid ** 2, tokenizer.config.global_topk
    for ci, batch in chunk_batches(ds, store, store.todo(ddp.rank, ddp.world), f"{task} (rank {ddp.rank})"):
        if "image" not in batch:      # every image of the chunk unreadable
            store.save(ci, {"index": torch.zeros(0, dtype=torch.long),
                            "global_idx": torch.zeros(0, k, dtype=torch.long)}
                       | {key: torch.zeros(0, n, dtype=torch.long) for key in SAVED})
            continue
        x, x_clip, x_shift = (t.to(ddp.device) for t in batch["image"])
        idx = batch["index"].tolist()
        tokens = {key: t.cpu() for key, t in encode_task(tokenizer, task, x, x_clip, x_shift,
                                                          idx, SEED, BLUR_KERNELS).items()}
        query = query_tokens(task, tokens["clean"], tokens["corrupt"])
        noisy_clean, noisy_query = noisy_batch(tokens["clean"], query, tokenizer.llm_ids.cpu(),
                                               idx, SEED, n_global=k, protocol=PROTOCOL)
        log = [] if ci == 0 else None
        tokens["pred"] = restore(greedy, prompter, task, query, noisy_clean, noisy_query,
                                 vocab_mask, step=STEP, window=WINDOW, batch_size=BATCH_SIZE,
                                 grid=tokenizer.config.grid, prompt_log=log)
        if log:                       # the first prompt, decoded from the ids the LLM read
            save_text(Path(OUT_DIR) / task / "prompt_example.txt", prompter.text(log[0]))
        store.save(ci, {"index": batch["index"]} | tokens)


@torch.no_grad()
def score(task, ds, store, tokenizer, device) -> dict:
    """Decode the saved tokens and score every variant against the clean images; write the
    strips clean | corrupted | baseline | restored | ceiling."""
    tokens = store.gather()
    row_of = {int(i): r for r, i in enumerate(tokens["index"].tolist())}
    first = ReconstructionMetrics(METRICS, device=device, inception_weights=INCEPTION_WEIGHTS or None)
    meters = {VARIANTS[0]: first} | {v: ReconstructionMetrics(
        first.metrics, device=device, inception=first.inception, lpips=first.lpips)
        for v in VARIANTS[1:]}
    hits = {"baseline": 0, "restored": 0}
    strips = Path(OUT_DIR) / task / "strips"
    for _, batch in chunk_batches(ds, store, range(store.n_chunks), f"{task} scores"):
        if "image" not in batch:
            continue
        x, _, x_shift = (t.to(device) for t in batch["image"])
        idx = batch["index"].tolist()
        rows = torch.tensor([row_of[i] for i in idx])
        part = {key: tokens[key][rows] for key in ("global_idx",) + SAVED}
        out = variant_images(tokenizer, task, x, x_shift, idx, SEED, part, BLUR_KERNELS)
        for v in VARIANTS:
            meters[v].update(x, out[v])
        for v, h in token_hits(task, part, tokenizer.config.grid).items():
            hits[v] += h
        for j, i in enumerate(idx):
            if i < SAVE_STRIPS:
                save_image_grid(torch.stack([x[j]] + [out[v][j] for v in VARIANTS]),
                                strips / f"{i:05d}.png", per_line=1 + len(VARIANTS), padding=0)
    cells = int(prediction_mask(task, tokenizer.config.grid).sum())
    n_cells = max(1, len(row_of) * cells)
    token_acc = {v: hits[v] / n_cells if v in hits else None for v in VARIANTS}
    return {v: meters[v].compute() | {"token_acc": token_acc[v]} for v in VARIANTS}


def write_results(results: dict) -> list[str]:
    cols = ["task", "variant", "n_images", "psnr", "ssim", "lpips", "fid", "token_acc"]
    fmt = lambda x: "" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))  # noqa: E731
    rows = [[task, v] + [fmt(results[task][v].get(c)) for c in cols[2:]]
            for task in results for v in VARIANTS]
    save_json(Path(OUT_DIR) / "results.json", results)
    return ["results.json"] + write_table(OUT_DIR, cols, rows, csv=True)


def main():
    tasks = check_tasks(TASKS)
    check_protocol(PROTOCOL)
    check_blur_kernels(BLUR_KERNELS)
    ddp = dist.init(DEVICE, OUT_DIR)
    dtype = llm_dtype(LLM_DTYPE, ddp.device)
    random.seed(SEED)
    torch.manual_seed(SEED)
    tokenizer = load_tokenizer(TOKENIZER_DIR, device=ddp.device)
    llm = load_llm(LLM, dtype=dtype, device=ddp.device)
    views = DenoiseViews(tokenizer.clip, tokenizer.config.resolution, protocol=PROTOCOL)
    ds = ImageFolderDataset(DATA_DIR, SPLIT or None, transform=views, max_images=MAX_IMAGES)
    pad = llm.text_tokenizer.pad_token_id if llm.text_tokenizer.pad_token_id is not None else 0
    greedy = BatchedGreedy(llm.model, pad)
    prompter = DenoisePrompter(llm.text_tokenizer, STEP)
    vocab_mask = codebook_vocab_mask(tokenizer.llm_ids, llm.model.config.vocab_size)
    results = {}
    for task in tasks:
        # the chunks hold tokens: scoring settings aside, they depend on these (the tokenizer
        # by artifact id, the LLM as it runs: its dtype after the CPU fallback)
        task_settings = {k: v for k, v in settings.items()
                         if k not in ("tasks", "metrics", "save_strips")
                         and (k != "blur_kernels" or task == "deblurring")} | {"task": task}
        key = run_key(task_settings, tokenizer=TOKENIZER_DIR) | {
            "llm": llm.ident, "llm_dtype": str(llm.model.dtype), "saved": SAVED, "n_images": len(ds)}
        store = ChunkStore(Path(OUT_DIR) / task, len(ds), CHUNK_IMAGES, key)
        tokenize_and_restore(task, ds, store, tokenizer, greedy, prompter, vocab_mask, ddp)
        # every rank's chunks on disk, then rank 0 scores them alone (minutes at full size):
        # waits without a deadline, not collectives (utils/dist.py)
        dist.barrier(ddp, f"every rank's {task} chunks")
        results[task] = dist.wait_for_main(
            ddp, partial(score, task, ds, store, tokenizer, ddp.device), f"the {task} scores")
    if ddp.is_main:
        files = write_results(results)
        inputs = finished_inputs(tokenizer=TOKENIZER_DIR)
        write_manifest(OUT_DIR, EVAL_DENOISING, settings, files, inputs=inputs,
                       info={"llm": llm.ident, "llm_dtype": dtype, "n_images": len(ds)})
    dist.shutdown(ddp)


if __name__ == "__main__":
    run_main(main, EVAL_DENOISING, settings)
