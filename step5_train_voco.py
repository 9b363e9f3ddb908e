"""Step 5: train VoCo compression (VoCo embeddings + LoRA) inside the frozen LLM.

Each image of a few-shot episode is compressed on its own into k VoCo
positions' key/value cache (models/voco.py). The objective is the paper's
Eq. 1, a distillation: the frozen LLM reading the full image words (teacher)
vs the same frozen LLM reading only the VoCo caches (student), KL of the
next-token distributions over the episode text after the first image (support
answers, separators, the query's answer; KL_ON = "names": only where the next token
is a class name's, the positions that depend on the images). Episodes are the few-shot format of
eval_understanding.py, drawn from the training split's classes only: on
ImageNet the 20 mini-ImageNet test classes are excluded, elsewhere every
HOLDOUT_EVERY-th class is held out (the classes eval_compression.py uses).
Image words are the tokenizer's global token strings, made as the few-shot
prompt makes them (GLOBAL_K, WORD_SEPARATOR, GLOBAL_DEDUP, SORT_WORDS;
eval_compression.py reads the same from voco.json); with LOCAL_TOKENS the
image's local tokens come first (the tokenizer's whole output). An image is
compressed after the prompt text it follows in every episode (IMAGE_CONTEXT):
a fixed text, so a block is still made once and reused anywhere, and the
frozen LLM reads the block as it reads words in a prompt. Without it (after
BOS alone) even the words' own uncompressed keys and values, made after BOS
and placed in the prompt, leave the demo's 2-way episodes near chance
(docs/voco.md has the measurement).

One set of weights serves every k <= K_MAX: step s trains with k =
TRAIN_KS[s % len(TRAIN_KS)] (TRAIN_KS = (8,) is the paper's Table 4 setting:
trained at one k, run with fewer). Deviation: the authors fine-tune the whole
LLM with answer cross-entropy; here LoRA adapters are active only while an
image is compressed and the reading LLM is the unmodified frozen one.
Options that are not the authors' (defaults off): VOCO_INIT = "text" starts the
VoCo rows from the embeddings of the text after an image (the lower bound in
eval_compression.py starts from the same rows); IMAGE_REUSE pairs each drawn
episode with its query/support swap over the same images, so a step
compresses half as many images (the compress pass is about half of a step).

Writes OUT_DIR: voco.safetensors (VoCo embeddings + LoRA), voco.json (settings,
the LLM's identity, the class split), log.jsonl, loss.png and manifest.json
(chained to the tokenizer). checkpoint.pt is saved every SAVE_EVERY steps; a
rerun of the same command resumes from it exactly.

Under torchrun a step's BATCH_SIZE episodes are shared out over the processes
(BATCH_SIZE must be at least their number, else one line at start-up); the loss
and gradients are sums over them, so the weights and the learning rate do not
depend on how many processes there are, and a checkpoint resumes under any number.

    python step5_train_voco.py --tokenizer_dir out/tokenizer --llm models/llama-2-7b --data_dir imagenet
    torchrun --nproc_per_node 8 step5_train_voco.py ...
"""
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from data.episodes import generate_episodes, swapped
from data.images import class_folders
from engine.voco import (VoCoPrompter, distill_loss, image_context, image_followup, image_word_ids,
                         llm_identity, set_attention, split_classes)
from models.llm import llm_dtype, load_llm
from models.tokenizer_io import load_tokenizer
from models.voco import VoCo
from utils import dist
from utils.artifacts import (atomic_path, finished_inputs, read_checkpoint, run_key, save_json,
                             save_tensors, write_checkpoint, write_manifest)
from utils.cli import configure, run_main
from utils.stages import VOCO
from utils.errors import V2LError

TOKENIZER_DIR = "out/tokenizer"   # the trained V2L tokenizer (directory or tokenizer.pt)
LLM = "/models/llama-2-7b"        # the frozen LLM: Hugging Face dir, Meta LLaMA dir or .gguf
LLM_DTYPE = "bf16"                # bf16 (VoCo training as its authors), fp16 or fp32; a CPU: bf16 where native, else fp32
ATTN = "sdpa"                     # attention: sdpa or eager (flash-attention cannot take VoCo's mask)
DATA_DIR = "/data/imagenet"       # class-folder images
SPLIT = "train"                   # sub-folder of DATA_DIR to train on
HOLDOUT_EVERY = 4                 # non-ImageNet data: every n-th class (sorted) is held out for evaluation
GLOBAL_K = 21                     # global tokens per image (the image words of the few-shot prompt)
WORD_SEPARATOR = ""               # between an image's global words, as eval_understanding.py's ("": the authors')
GLOBAL_DEDUP = False              # skip a global word repeating a higher-ranked one, as eval_understanding.py's
SORT_WORDS = False                # an image's words in alphabetical order, as eval_understanding.py's
LOCAL_TOKENS = False              # an image is its local tokens (raster order) then its words: the tokenizer's whole output
IMAGE_CONTEXT = True              # compress an image after the prompt text it follows ("###\nInput: < "); False: after BOS alone
N_WAY = 2                         # classes per training episode
K_SHOT = 1                        # support images per class in a training episode
VOCO_INIT = "random"              # initial VoCo embeddings: "random" (a new token's, as the authors') or "text" (copies of the embeddings of the text that follows an image, OUT_TEXT's tokens)
K_MAX = 8                         # VoCo tokens the weights hold (the most eval can use)
IMAGE_REUSE = False               # episodes in pairs over the same images (the second swaps the query and its class's support): half the compressions per step
KL_ON = "text"                    # KL positions: "text" (every text token after the first image: Eq. 1) or "names" (class-name tokens only)
TRAIN_KS: tuple[int, ...] = (1, 2, 4, 8)  # k used at step s: TRAIN_KS[s % len]; (8,) = trained at one k only
LORA_RANK = 8                     # LoRA rank (0: train the VoCo embeddings only)
LORA_ALPHA = 16.0                 # LoRA scaling numerator
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # adapted linear layers (the last layer: k/v only)
STEPS = 2000                      # optimiser steps
BATCH_SIZE = 8                    # episodes per step, all ranks together (at least the number of processes)
LR = 1e-3                         # peak learning rate (AdamW)
WARMUP = 0.03                     # fraction of steps of linear warm-up, then cosine to 0
WEIGHT_DECAY = 0.0                # AdamW weight decay
GRAD_CLIP = 1.0                   # gradient-norm clip (0: none)
SEED = 0                          # episode sampling and initialisation seed
SAVE_EVERY = 50                   # steps between checkpoints
STOP_AFTER = 0                    # stop (checkpointed) after this many steps in this run (0: run to the end)
DEVICE = "auto"                   # auto, cpu or cuda
NUM_WORKERS = 4                   # image loading workers (image words)
OUT_DIR = "out/voco"              # where the VoCo artifact is written

settings = configure(globals())



def lr_at(step: int) -> float:
    warm = max(1, round(WARMUP * STEPS))
    if step < warm:
        return LR * (step + 1) / warm
    return LR * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, STEPS - warm)))


def check_settings() -> None:
    if not TRAIN_KS or any(not 1 <= k <= K_MAX for k in TRAIN_KS):
        raise V2LError(f"--train_ks {list(TRAIN_KS)}: every k must be between 1 and --k_max {K_MAX}")
    if VOCO_INIT not in ("random", "text"):
        raise V2LError(f"--voco_init {VOCO_INIT!r}: use random or text")
    if KL_ON not in ("text", "names"):
        raise V2LError(f"--kl_on {KL_ON!r}: use text or names")
    if IMAGE_REUSE and K_SHOT < 1:
        raise V2LError("--image_reuse true needs --k_shot 1 or more (a support image to swap with the query)")
    if STEPS < 1 or BATCH_SIZE < 1:
        raise V2LError("--steps and --batch_size must be at least 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))   # torchrun's processes
    if world > BATCH_SIZE:
        raise V2LError(f"--batch_size {BATCH_SIZE} is fewer episodes per step than the {world} "
                       f"processes (each takes a share of a step's episodes): use --batch_size "
                       f"{world} or more, a multiple of {world} to load them evenly")


def rank_of(index: int, world: int) -> int:
    """The rank that trains episode ``index``: a step's episodes are dealt out in turn, so
    every rank has one when world <= BATCH_SIZE; with IMAGE_REUSE, a pair of episodes over the
    same images goes to one rank (its images compressed once) when every rank still gets a
    pair. Which rank does an episode does not change the step's result (the loss and the
    gradients are sums over the ranks)."""
    step, at = divmod(index, BATCH_SIZE)
    if IMAGE_REUSE and world <= BATCH_SIZE // 2:
        return (index // 2 - step * BATCH_SIZE // 2) % world
    return at % world


def main():
    check_settings()
    out = Path(OUT_DIR)
    ddp = dist.init(DEVICE, OUT_DIR)
    torch.manual_seed(SEED)
    llm = load_llm(LLM, dtype=llm_dtype(LLM_DTYPE, ddp.device), device=ddp.device)
    set_attention(llm, ATTN)
    voco = VoCo(llm.model, K_MAX, LORA_RANK, LORA_ALPHA, LORA_TARGETS,
                bos_id=llm.text_tokenizer.bos_token_id, seed=SEED,
                context_ids=image_context(llm.text_tokenizer) if IMAGE_CONTEXT else None,
                init_ids=image_followup(llm.text_tokenizer) if VOCO_INIT == "text" else None)
    folders = class_folders(DATA_DIR, SPLIT)   # the images: listed once, for the episodes
    train_classes, eval_classes = split_classes(folders, HOLDOUT_EVERY)
    n_drawn = (STEPS * BATCH_SIZE + 1) // 2 if IMAGE_REUSE else STEPS * BATCH_SIZE
    episodes = generate_episodes(DATA_DIR, N_WAY, K_SHOT, n_drawn, SEED, SPLIT, classes=train_classes)
    if IMAGE_REUSE:   # each drawn episode twice, the second with query and support swapped
        episodes = [e for ep in episodes for e in (replace(ep, index=2 * ep.index),
                                                    swapped(ep, 2 * ep.index + 1))][:STEPS * BATCH_SIZE]
    mine = [ep for ep in episodes if rank_of(ep.index, ddp.world) == ddp.rank]
    if ddp.active and ddp.is_main:
        shares = [sum(rank_of(i, ddp.world) == r for i in range(BATCH_SIZE)) for r in range(ddp.world)]
        print(f"step 5: {BATCH_SIZE} episodes a step over {ddp.world} processes "
              f"({min(shares)}-{max(shares)} each); the result does not depend on the number "
              "of processes")
    tokenizer = load_tokenizer(TOKENIZER_DIR, device=ddp.device)
    paths = sorted({p for ep in mine for p, _ in ep.support + (ep.query,)})
    words = image_word_ids(tokenizer, llm.text_tokenizer, paths, GLOBAL_K, WORD_SEPARATOR,
                           GLOBAL_DEDUP, SORT_WORDS, NUM_WORKERS, progress=False,
                           local=LOCAL_TOKENS)
    del tokenizer
    prompter = VoCoPrompter(llm.text_tokenizer)
    params = voco.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    key = run_key(settings, tokenizer=TOKENIZER_DIR)   # what a checkpoint must have been made with
    start, log = 0, []
    ckpt = out / "checkpoint.pt"
    state = read_checkpoint(ckpt, key)
    if state is not None:
        voco.load_adapter_state(state["adapter"])
        opt.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
        if ddp.is_main:
            print(f"resuming at step {start}")
    by_step: dict[int, list] = {}
    for ep in mine:
        by_step.setdefault(ep.index // BATCH_SIZE, []).append(ep)
    end = STEPS if not STOP_AFTER else min(STEPS, start + STOP_AFTER)
    bar = tqdm(range(start, end), desc="voco", disable=not ddp.is_main, initial=start, total=STEPS)
    for step in bar:
        k = TRAIN_KS[step % len(TRAIN_KS)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        built = [prompter.segments(ep, answer=True, names=True) for ep in by_step.get(step, [])]
        rows = [segs for segs, _ in built]
        names = [flags for _, flags in built] if KL_ON == "names" else None
        total, count = distill_loss(voco, rows, words, k, names) if rows else (None, 0)
        stats = dist.all_reduce_sum(torch.tensor([float(total.detach()) if rows else 0.0,
                                                  float(count)], dtype=torch.float64,
                                                 device=ddp.device), ddp).cpu()
        n_global = max(1.0, float(stats[1]))
        if rows:
            (total / n_global).backward()
        dist.all_reduce_grads(params, ddp)   # the loss is a sum over ranks: gradients add up
        if GRAD_CLIP:
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(stats[0]) / n_global
        log.append({"step": step, "k": k, "kl": loss, "lr": lr_at(step), "positions": int(n_global)})
        bar.set_postfix(k=k, kl=f"{loss:.4f}")
        done = step + 1
        if ddp.is_main and (done % SAVE_EVERY == 0 or done == end) and done < STEPS:
            write_checkpoint(ckpt, key, {"step": done, "adapter": voco.adapter_state(),
                                         "optimizer": opt.state_dict(), "log": log})
    bar.close()
    if end < STEPS:
        if ddp.is_main:
            print(f"stopped after step {end} of {STEPS} (--stop_after); rerun to continue")
        dist.shutdown(ddp)
        return
    if ddp.is_main:
        finish(voco, llm, log, train_classes, eval_classes)
    dist.barrier(ddp)
    dist.shutdown(ddp)


def finish(voco: VoCo, llm, log: list[dict], train_classes: list[str], eval_classes: list[str]) -> None:
    from utils.figures import plot_curves
    out = Path(OUT_DIR)
    save_tensors(out / "voco.safetensors", {k: v.float() for k, v in voco.adapter_state().items()})
    info = {"k_max": K_MAX, "train_ks": list(TRAIN_KS), "lora_rank": LORA_RANK,
            "lora_alpha": LORA_ALPHA, "lora_targets": list(LORA_TARGETS),
            "bos_id": voco.bos_id, "context_ids": voco.context_ids, "init_ids": voco.init_ids, "seed": SEED,
            "global_k": GLOBAL_K, "word_separator": WORD_SEPARATOR, "global_dedup": GLOBAL_DEDUP,
            "sort_words": SORT_WORDS, "local_tokens": LOCAL_TOKENS, "n_way": N_WAY,
            "k_shot": K_SHOT, "llm": llm.ident, "llm_identity": llm_identity(llm),
            "tokenizer": str(TOKENIZER_DIR), "train_classes": train_classes,
            "eval_classes": eval_classes, "final_kl": log[-1]["kl"] if log else None}
    save_json(out / "voco.json", info)
    with atomic_path(out / "log.jsonl") as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in log), encoding="utf-8")
    by_k = {f"k={k}": ([r["step"] for r in log if r["k"] == k], [r["kl"] for r in log if r["k"] == k])
            for k in sorted(set(TRAIN_KS))}
    plot_curves(by_k, out / "loss.png", "step", "KL(teacher || student) per token",
                "VoCo distillation loss", log_y=True)
    write_manifest(out, VOCO, settings, ["voco.safetensors", "voco.json", "log.jsonl", "loss.png"],
                   inputs=finished_inputs(tokenizer=TOKENIZER_DIR),
                   info={k: info[k] for k in ("k_max", "train_ks", "llm", "llm_identity", "final_kl")})
    (out / "checkpoint.pt").unlink(missing_ok=True)
    print(f"VoCo weights -> {out} (final KL {info['final_kl']})")


if __name__ == "__main__":
    run_main(main, VOCO, settings)
