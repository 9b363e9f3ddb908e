"""Step 6: continue step 5's VoCo training on video question answering.

VoCo-LLaMA's video extension: each frame of a clip is compressed alone into k
VoCo positions, the frames' blocks are placed in time order, and training
continues on video QA. Here the weights are step 5's (VOCO_DIR: VoCo
embeddings + LoRA, active only while a frame is compressed) and the reader
stays the unmodified frozen LLM, so what trains is how a frame is compressed
for a reader that sees several frames in a row. The objective is the answer's
cross-entropy (OBJECTIVE = "ce", the authors' loss) or, as step 5, KL to the
frozen LLM reading every frame's full tokens at the answer positions ("kl").

Frames are decoded with PyAV and sampled uniformly (FRAMES per clip), made into
V2L tokens as step 5 made images (its voco.json's word settings; POSITION_WORDS:
the demo's word naming where a frame's shape lies), from a question file in one
of the released layouts (DATASET: msvd, msrvtt, activitynet; the demo's clips
use MSRVTT-QA's). A question whose clip is missing is skipped and counted.

Step s trains on questions [s x BATCH_SIZE, (s + 1) x BATCH_SIZE) of a seeded
order (reshuffled each pass over the file), with k = TRAIN_KS[s % len]. Under
torchrun a step's questions are dealt out over the processes (the loss and the
gradients are sums over them: the result does not depend on their number).
checkpoint.pt every SAVE_EVERY steps; a rerun of the same command resumes
exactly.

Writes OUT_DIR: voco.safetensors and voco.json (step 5's format, readable by
eval_video.py), log.jsonl, loss.png and manifest.json (chained to the
tokenizer and to step 5's weights).

    python step6_train_video.py --voco_dir out/voco --dataset msrvtt \
        --questions_file MSRVTT-QA/train_qa.json --video_dir MSRVTT/videos
"""
import json
import math
import os
import random
from pathlib import Path

import torch
from tqdm import tqdm

from data.video import SampleStats, load_questions
from engine.video import (QUESTION_TEXT, VIDEO_TEXT, VIDEO_VOCO, VideoPrompter, answer_loss,
                          clip_words, frame_key, load_video_voco)
from engine.voco import set_attention
from models.llm import llm_dtype, load_llm
from models.tokenizer_io import load_tokenizer
from utils import dist
from utils.artifacts import (atomic_path, finished_inputs, read_checkpoint, run_key, save_json,
                             save_tensors, write_checkpoint, write_manifest)
from utils.cli import configure, run_main
from utils.errors import V2LError

TOKENIZER_DIR = "out/tokenizer"   # the V2L tokenizer step 5 was trained with
LLM = "/models/llama-2-7b"        # the frozen LLM
LLM_DTYPE = "bf16"                # bf16, fp16 or fp32; a CPU: bf16 where native, else fp32
ATTN = "sdpa"                     # attention: sdpa or eager
VOCO_DIR = "out/voco"             # step 5's VoCo weights, the start
DATASET = "msrvtt"                # question file layout: msvd, msrvtt or activitynet
QUESTIONS_FILE = "/data/msrvtt_qa/train_qa.json"  # the training questions (ActivityNet-QA: train_q.json)
ANSWERS_FILE = ""                 # ActivityNet-QA's answers (empty: the questions file with _q -> _a)
MAPPING_FILE = ""                 # MSVD-QA's youtube_mapping.txt (empty: beside the questions file)
VIDEO_DIR = "/data/msrvtt/videos"  # the clips
FRAMES = 8                        # frames per clip, sampled uniformly (T)
POSITION_WORDS = False            # add a word naming where a frame's shape lies (from its local tokens; the demo's)
OBJECTIVE = "ce"                  # ce (the answer's cross-entropy, the authors') or kl (to the frozen LLM reading every frame's tokens)
TRAIN_KS: tuple[int, ...] = (2,)  # k used at step s: TRAIN_KS[s % len] (the paper's video: 2 per frame)
STEPS = 1000                      # optimiser steps
BATCH_SIZE = 8                    # questions per step, all ranks together (at least the number of processes)
LR = 5e-4                         # peak learning rate (AdamW)
WARMUP = 0.03                     # fraction of steps of linear warm-up, then cosine to 0
WEIGHT_DECAY = 0.0                # AdamW weight decay
GRAD_CLIP = 1.0                   # gradient-norm clip (0: none)
MAX_QUESTIONS = 0                 # train on a seeded sample of this many questions (0: all)
VIDEO_TEXT = "Video:"             # the prompt text before the frames (as eval_video.py's)
QUESTION_TEXT = "\nQuestion: {question}\nAnswer:"  # the prompt text after the frames
SEED = 0                          # question order seed
SAVE_EVERY = 50                   # steps between checkpoints
STOP_AFTER = 0                    # stop (checkpointed) after this many steps in this run (0: run to the end)
DEVICE = "auto"                   # auto, cpu or cuda
OUT_DIR = "out/voco_video"        # where the video VoCo artifact is written

settings = configure(globals())


def lr_at(step: int) -> float:
    warm = max(1, round(WARMUP * STEPS))
    if step < warm:
        return LR * (step + 1) / warm
    return LR * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, STEPS - warm)))


def question_order(n: int) -> list[int]:
    """Question indices for every step: passes over the file, each in its own seeded order."""
    out, p = [], 0
    while len(out) < STEPS * BATCH_SIZE:
        order = list(range(n))
        random.Random(f"{SEED}:{p}").shuffle(order)
        out += order
        p += 1
    return out[:STEPS * BATCH_SIZE]


def main():
    if STEPS < 1 or BATCH_SIZE < 1:
        raise V2LError("--steps and --batch_size must be at least 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > BATCH_SIZE:
        raise V2LError(f"--batch_size {BATCH_SIZE} is fewer questions per step than the {world} "
                       f"processes; use --batch_size {world} or more")
    ddp = dist.init(DEVICE, OUT_DIR)
    torch.manual_seed(SEED)
    llm = load_llm(LLM, dtype=llm_dtype(LLM_DTYPE, ddp.device), device=ddp.device)
    set_attention(llm, ATTN)
    voco, info, trained = load_video_voco(VOCO_DIR, llm, TOKENIZER_DIR)
    voco.load_adapter_state(trained)                 # continued training: step 5's weights
    if any(not 1 <= k <= info["k_max"] for k in TRAIN_KS) or not TRAIN_KS:
        raise V2LError(f"--train_ks {list(TRAIN_KS)}: every k must be between 1 and the k_max "
                       f"{info['k_max']} of {VOCO_DIR}")
    questions, missing = load_questions(DATASET, QUESTIONS_FILE, VIDEO_DIR, ANSWERS_FILE or None,
                                        MAPPING_FILE or None)
    if missing and ddp.is_main:
        print(f"{len(missing)} questions name a clip not in {VIDEO_DIR} (first: question "
              f"{missing[0]}): skipped")
    if not questions:
        raise V2LError(f"{QUESTIONS_FILE}: no question has its clip in {VIDEO_DIR}; check --video_dir")
    if MAX_QUESTIONS and MAX_QUESTIONS < len(questions):
        questions = sorted(random.Random(SEED).sample(questions, MAX_QUESTIONS), key=lambda q: q.qid)
    order = question_order(len(questions))
    mine = {i: questions[q] for i, q in enumerate(order) if (i % BATCH_SIZE) % ddp.world == ddp.rank}
    tokenizer = load_tokenizer(TOKENIZER_DIR, device=ddp.device)
    stats = SampleStats()
    words = clip_words(tokenizer, llm.text_tokenizer, sorted({q.video for q in mine.values()}),
                       FRAMES, info, POSITION_WORDS, stats, progress=ddp.is_main)
    del tokenizer
    if stats.note() and ddp.is_main:
        print(stats.note())
    prompter = VideoPrompter(llm.text_tokenizer, VIDEO_TEXT, QUESTION_TEXT)
    params = voco.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    key = run_key(settings, tokenizer=TOKENIZER_DIR, voco=VOCO_DIR)
    start, log = 0, []
    ckpt = Path(OUT_DIR) / "checkpoint.pt"
    state = read_checkpoint(ckpt, key)
    if state is not None:
        voco.load_adapter_state(state["adapter"])
        opt.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
        if ddp.is_main:
            print(f"resuming at step {start}")
    end = STEPS if not STOP_AFTER else min(STEPS, start + STOP_AFTER)
    bar = tqdm(range(start, end), desc="voco video", disable=not ddp.is_main, initial=start, total=STEPS)
    for step in bar:
        k = TRAIN_KS[step % len(TRAIN_KS)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = [mine[i] for i in range(step * BATCH_SIZE, (step + 1) * BATCH_SIZE) if i in mine]
        rows = [prompter.segments(q.question, [frame_key(q.video, t) for t in range(FRAMES)], q.answer)
                for q in batch]
        n_answer = [len(prompter.answer_ids(q.answer)) for q in batch]
        total, count = answer_loss(voco, rows, words, k, n_answer, OBJECTIVE) if rows else (None, 0)
        stats_t = dist.all_reduce_sum(torch.tensor([float(total.detach()) if rows else 0.0,
                                                    float(count)], dtype=torch.float64,
                                                   device=ddp.device), ddp).cpu()
        n_global = max(1.0, float(stats_t[1]))
        if rows:
            (total / n_global).backward()
        dist.all_reduce_grads(params, ddp)
        if GRAD_CLIP:
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(stats_t[0]) / n_global
        log.append({"step": step, "k": k, "loss": loss, "lr": lr_at(step), "tokens": int(n_global)})
        bar.set_postfix(k=k, loss=f"{loss:.4f}")
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
        finish(voco, info, log, len(questions), len(missing))
    dist.barrier(ddp)
    dist.shutdown(ddp)


def finish(voco, info: dict, log: list[dict], n_questions: int, n_missing: int) -> None:
    from utils.figures import plot_curves
    out = Path(OUT_DIR)
    save_tensors(out / "voco.safetensors", {k: v.float() for k, v in voco.adapter_state().items()})
    video = {"continued_from": str(VOCO_DIR), "frames": FRAMES, "position_words": POSITION_WORDS,
             "objective": OBJECTIVE, "video_train_ks": list(TRAIN_KS), "steps": STEPS,
             "questions": n_questions, "missing_clips": n_missing,
             "final_loss": log[-1]["loss"] if log else None}
    save_json(out / "voco.json", {**info, "video": video})
    with atomic_path(out / "log.jsonl") as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in log), encoding="utf-8")
    by_k = {f"k={k}": ([r["step"] for r in log if r["k"] == k], [r["loss"] for r in log if r["k"] == k])
            for k in sorted(set(TRAIN_KS))}
    ylabel = "answer cross-entropy per token" if OBJECTIVE == "ce" else "KL(teacher || student) per token"
    plot_curves(by_k, out / "loss.png", "step", ylabel, "VoCo video training loss", log_y=True)
    inputs = finished_inputs(tokenizer=TOKENIZER_DIR, voco=VOCO_DIR)
    if (Path(QUESTIONS_FILE).parent / "manifest.json").is_file():
        inputs["questions"] = str(Path(QUESTIONS_FILE).parent)
    write_manifest(out, VIDEO_VOCO, settings, ["voco.safetensors", "voco.json", "log.jsonl", "loss.png"],
                   inputs=inputs, info={"k_max": info["k_max"], **video})
    (out / "checkpoint.pt").unlink(missing_ok=True)
    print(f"VoCo video weights -> {out} (final loss {video['final_loss']})")


if __name__ == "__main__":
    run_main(main, VIDEO_VOCO, settings)
