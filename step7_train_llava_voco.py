"""Step 7: train VoCo on a LLaVA-1.5 with LLaVA's conversation data (VoCo-LLaMA's own setting).

The LLaVA (a llava-hf directory, or Vicuna + a CLIP vision tower + mm_projector.bin, as
models/llava.py loads them) reads LLaVA's instruction data (llava_v1_5_mix665k.json and its
image folder; an entry whose image is missing is skipped and counted). Each image is embedded
by the frozen vision tower and the projector, compressed into k VoCo positions (k =
TRAIN_KS[step % len], one set of weights for every k <= K_MAX) and the conversation reads only
those (engine/llava_voco.py). OBJECTIVE ce is the authors' (answer cross-entropy), kl the
paper's Eq. 1 (the frozen LLaVA reading the image uncompressed as teacher), both their sum.
LAYOUT authors is VoCo-LLaMA's (BOS, image, "\\n", VoCo, "\\n", the conversation without
"\\n"), system ours (compressed after the system prompt, LLaVA-1.5's own sequence); auto
(the default) is system for a frozen or adapted reader, which reads as the LLaVA was trained
to, and authors for a trained one (their configuration); why, as measured on the demo:
docs/demo_llava.md. READER:
frozen (VoCo embeddings + LoRA while compressing only; the LLaVA itself reads: the default,
because its weights are what eval_llava.py reads and the LLM stays shared), adapted (LoRA
while reading too), trained (the authors': the LLM and the projector fully fine-tuned, no
LoRA; written as llm/ and mm_projector.bin beside the VoCo weights). engine/llava_train.py
holds the steps, the schedule and how a step is shared out. Under torchrun a trained reader's
LLM is sharded over the processes (FSDP2, engine/shard.py: whole weights during a step,
gradients and AdamW state sharded); --shard false keeps a whole copy in every process.

The authors' hyper-parameters are the defaults: 2 epochs, global batch 128 (8 per GPU), lr 2e-5
(the LLM and projector) cosine after a warm-up over 0.03 of the steps, max length 2048, bf16
with float32 copies of the weights that learn, steps of one modality (LLaVA's
group_by_modality_length) for the trained reader. Not theirs: the VoCo
embeddings and LoRA learn at ADAPTER_LR (step 5's; their VoCo row learns at 2e-5 with the
LLM), TRAIN_KS (their code: k = 2 only), and the loss of a step is the token mean over the
whole step (theirs: the mean of the per-device means).

Writes OUT_DIR: voco.safetensors + voco.json (what eval_llava.py --voco_dir reads),
log.jsonl, loss.png and manifest.json. checkpoint.pt every SAVE_EVERY steps; a rerun of the
same command resumes from it exactly. Under torchrun a step's samples are shared out over
the processes and the gradients summed: the result does not depend on the number of processes.

    python step7_train_llava_voco.py --llava llava-1.5-7b-hf --data llava_v1_5_mix665k.json \
        --image_folder playground/data
    torchrun --nproc_per_node 8 step7_train_llava_voco.py ...
"""
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from data.llava import LlavaConversations
from engine.llava_train import (GROUPINGS, READERS, MasterWeights, RunOrder, StepLoader, loader,
                                lr_scale, make_voco, named_trainables, optimizer, steps_per_epoch,
                                train_micro_batches, write_weights)
from engine.shard import Learned, Sharding, clip_grad_norm, full_state, is_sharded, load_full_state
from engine.llava_voco import KL_ON as KL_CHOICES, LAYOUTS, OBJECTIVES, load_model
from engine.voco import llm_identity
from models.llm import llm_dtype
from utils import dist
from utils.artifacts import (atomic_path, finished_inputs, read_checkpoint, run_key, save_json,
                             write_checkpoint, write_manifest)
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.stages import LLAVA_VOCO

# the model
LLAVA = ""                        # a llava-hf directory (e.g. llava-1.5-7b-hf); or the three parts below
LLM = ""                          # LLaVA's language model (Vicuna-7B-v1.5), with --vision_tower and --mm_projector
VISION_TOWER = ""                 # a CLIP vision tower directory (clip-vit-large-patch14-336)
MM_PROJECTOR = ""                 # LLaVA-1.5's stage-1 mm_projector.bin (or the folder demo.llava wrote: the demo LLaVA)
LLM_DTYPE = "bf16"                # bf16 (the authors'), fp16 or fp32; a CPU: bf16 where native, else fp32
ATTN = "sdpa"                     # attention: sdpa or eager (flash-attention cannot take VoCo's mask)
PAD = True                        # pad images to a square in CLIP's mean colour (LLaVA-1.5's)
# the data
DATA = ""                         # LLaVA's conversation JSON (llava_v1_5_mix665k.json)
IMAGE_FOLDER = ""                 # the folder its image paths are relative to
MAX_LENGTH = 2048                 # positions per sample, the image's and the VoCo tokens' counted (LLaVA's)
NUM_WORKERS = 4                   # processes preparing the next steps' samples and images (0: in this process, when read)
# what is trained
LAYOUT = "auto"                   # authors (VoCo-LLaMA's), system (compressed after the system prompt) or auto (system unless --reader trained)
READER = "frozen"                 # frozen (LoRA only while compressing), adapted (LoRA while reading too) or trained (the authors' full fine-tuning)
OBJECTIVE = "ce"                  # ce (the authors': answer cross-entropy), kl (the paper's Eq. 1) or both
KL_ON = "text"                    # kl positions: text (every position after the VoCo tokens) or answers
KL_WEIGHT = 1.0                   # weight of kl in both
K_MAX = 8                         # VoCo tokens the weights hold (the most eval can use)
TRAIN_KS: tuple[int, ...] = (1, 2, 4, 8)  # k at step s: TRAIN_KS[s % len]; (2,) with --k_max 2 is the authors' code
LORA_RANK = 8                     # LoRA rank (frozen and adapted readers; 0: VoCo embeddings only)
LORA_ALPHA = 16.0                 # LoRA scaling numerator
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # adapted linear layers
# optimisation
EPOCHS = 2                        # passes over the data (the authors')
BATCH_SIZE = 128                  # samples per step, all processes together (the authors' global batch)
MICRO_BATCH = 8                   # samples per forward pass in a process (the authors' 8 per GPU; gradient accumulation over the rest)
GROUPING = "auto"                 # a step's samples: random, modality (LLaVA's group_by_modality_length: image and text-only apart) or auto (modality for --reader trained)
LR = 2e-5                         # peak learning rate of the LLM and the projector (reader trained; the authors')
ADAPTER_LR = 1e-3                 # peak learning rate of the VoCo embeddings and LoRA
WARMUP = 0.03                     # fraction of steps of linear warm-up, then cosine to 0
WEIGHT_DECAY = 0.0                # AdamW weight decay (LLaVA's 0)
GRAD_CLIP = 1.0                   # gradient-norm clip (0: none)
SHARD = True                      # reader trained under torchrun: shard the LLM over the processes (FSDP2); False: a whole copy each
SEED = 0                          # data order and initialisation seed
SAVE_EVERY = 0                    # steps between checkpoints (0: 50, or 500 for --reader trained, whose checkpoint holds the LLM's float32 copies and AdamW's moments: 12 bytes per weight, 81 GB at 7B)
STOP_AFTER = 0                    # stop (checkpointed) after this many steps in this run (0: run to the end)
DEVICE = "auto"                   # auto, cpu or cuda
OUT_DIR = "out/llava_voco"        # where the VoCo weights are written

settings = configure(globals())


def check_settings() -> None:
    global LAYOUT, GROUPING, SAVE_EVERY
    if LAYOUT == "auto":
        LAYOUT = "authors" if READER == "trained" else "system"
        print(f"layout: {LAYOUT} (auto, for the {READER} reader)")
    if GROUPING == "auto":
        GROUPING = "modality" if READER == "trained" else "random"
    if SAVE_EVERY <= 0:
        SAVE_EVERY = 500 if READER == "trained" else 50
    for name, value, choices in (("layout", LAYOUT, LAYOUTS), ("reader", READER, READERS),
                                 ("grouping", GROUPING, GROUPINGS),
                                 ("objective", OBJECTIVE, OBJECTIVES), ("kl_on", KL_ON, KL_CHOICES)):
        if value not in choices:
            raise V2LError(f"--{name} {value}: must be one of {', '.join(choices)}")
    if not TRAIN_KS or any(not 1 <= k <= K_MAX for k in TRAIN_KS):
        raise V2LError(f"--train_ks {list(TRAIN_KS)}: every k must be between 1 and --k_max {K_MAX}")
    if READER == "trained" and OBJECTIVE != "ce":
        raise V2LError(f"--objective {OBJECTIVE}: the KL's teacher is the frozen LLaVA, which a "
                       "trained reader changes; use --objective ce or another --reader")
    if min(EPOCHS, BATCH_SIZE, MICRO_BATCH) < 1:
        raise V2LError("--epochs, --batch_size and --micro_batch must be at least 1")
    if not DATA:
        raise V2LError("give LLaVA's conversation JSON as --data (and its --image_folder)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > BATCH_SIZE:
        raise V2LError(f"--batch_size {BATCH_SIZE} is fewer samples per step than the {world} processes")


def main():
    check_settings()
    out = Path(OUT_DIR)
    ddp = dist.init(DEVICE, OUT_DIR)
    parts = load_model(LLAVA or None, llm=LLM or None, vision=VISION_TOWER or None,
                       projector=MM_PROJECTOR or None, dtype=llm_dtype(LLM_DTYPE, ddp.device),
                       device=ddp.device, pad=PAD, attn=ATTN)
    voco = make_voco(parts, LAYOUT, READER, K_MAX, LORA_RANK, LORA_ALPHA, LORA_TARGETS, SEED)
    data = LlavaConversations(DATA, parts.tokenizer, IMAGE_FOLDER or None, LAYOUT, MAX_LENGTH,
                              parts.image_tokens(), K_MAX)
    if not len(data):
        raise V2LError(f"{DATA}: no entry with its image in {IMAGE_FOLDER}; give the data's image folder")
    if ddp.is_main:
        print(f"step 7: {data.summary()}")
    sharding = None
    if READER == "trained" and ddp.active:
        if SHARD:
            sharding = Sharding(parts.llm, ddp.device, ddp.world)
        if ddp.is_main:
            print(f"step 7: reader trained: the LLM sharded over {ddp.world} processes (FSDP2)" if SHARD else
                  "step 7: reader trained: every process holds the whole LLM, its gradients and "
                  "AdamW state with float32 copies (about 20 bytes per weight); --shard true shares them out")
    steps = EPOCHS * steps_per_epoch(len(data), BATCH_SIZE)
    named = named_trainables(voco, parts, READER)
    plain = [p for p in named.values() if not is_sharded(p)]   # gradients summed over the processes here
    masters = MasterWeights(named)     # float32 copies of bf16 / fp16 weights that learn
    params = list(masters.named.values())
    opt = optimizer(masters.named, LR, ADAPTER_LR, WEIGHT_DECAY)
    learned = Learned(masters.named)   # the checkpoint: full tensors by name, sharded or not
    key = run_key(settings, data=DATA)   # what a checkpoint was made with: settings, data, model
    key["inputs"]["model"] = parts.ident
    ckpt, start, log = out / "checkpoint.pt", 0, []
    state = read_checkpoint(ckpt, key)
    if state is not None:
        load_full_state(learned, opt, state["weights"], state["optimizer"])
        masters.to_model()
        start, log = state["step"], state["log"]
        if ddp.is_main:
            print(f"resuming at step {start}")
    end = steps if not STOP_AFTER else min(steps, start + STOP_AFTER)
    # each step's samples and images, prepared ahead; a process without samples in a sharded
    # step gets a zero-weighted stand-in (the step's end reduces in every process)
    order = RunOrder(len(data), BATCH_SIZE, SEED, data.modality_lengths() if GROUPING == "modality" else None)
    inputs = loader(StepLoader(data, parts.preprocess, range(start, end), order, ddp.rank, ddp.world,
                               MICRO_BATCH, READER, KL_ON, fill=sharding is not None), NUM_WORKERS)
    bar = tqdm(inputs, desc="llava voco", disable=not ddp.is_main, initial=start, total=steps)
    for got in bar:
        if got.error:
            raise V2LError(got.error)
        step, norms = got.step, got.norms
        k = TRAIN_KS[step % len(TRAIN_KS)]
        scale = lr_scale(step, steps, WARMUP)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        with sharding.step() if sharding else nullcontext():
            part = train_micro_batches(voco, parts, got.batches, k, OBJECTIVE, LAYOUT, KL_ON, KL_WEIGHT,
                                       norms, READER == "trained", weight=0.0 if got.filler else 1.0)
        loss = float(dist.all_reduce_sum(torch.tensor([part], dtype=torch.float64, device=ddp.device), ddp))
        dist.all_reduce_grads(plain, ddp)   # each process's loss is its part of the step's mean
        masters.take_grads()
        if GRAD_CLIP:
            if sharding:
                clip_grad_norm(params, GRAD_CLIP, ddp.active)
            else:
                torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        masters.to_model()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step, "k": k, "loss": loss, "lr": ADAPTER_LR * scale,
                    "answer_tokens": int(norms[0]), "kl_positions": int(norms[1])})
        bar.set_postfix(k=k, loss=f"{loss:.4f}")
        done = step + 1
        if (done % SAVE_EVERY == 0 or done == end) and done < steps:
            weights, optim = full_state(learned, opt)   # gathered by every process when sharded
            if ddp.is_main:
                write_checkpoint(ckpt, key, {"step": done, "optimizer": optim, "log": log, "weights": weights})
    bar.close()
    if end < steps:
        if ddp.is_main:
            print(f"stopped after step {end} of {steps} (--stop_after); rerun to continue")
    else:
        llm_state = None
        if sharding:     # the fine-tuned LLM's full weights, gathered by every process
            llm_state = full_state(parts.llm)[0]
        if ddp.is_main:
            finish(voco, parts, data, log, llm_state)
    dist.barrier(ddp)
    dist.shutdown(ddp)


def finish(voco, parts, data, log: list[dict], llm_state: dict | None) -> None:
    from utils.figures import plot_curves
    out = Path(OUT_DIR)
    files = write_weights(out, voco, parts, READER, llm_state)
    info = {"k_max": K_MAX, "train_ks": list(TRAIN_KS), "lora_rank": 0 if READER == "trained" else LORA_RANK,
            "lora_alpha": LORA_ALPHA, "lora_targets": list(LORA_TARGETS), "seed": SEED, "init_ids": [],
            "layout": LAYOUT, "reader": "adapted" if READER == "trained" else READER,
            "trained_reader": READER, "objective": OBJECTIVE, "kl_on": KL_ON,
            "bos_id": voco.bos_id, "context_ids": voco.context_ids, "suffix_ids": voco.suffix_ids,
            "llm": parts.ident, "llm_identity": llm_identity(parts.language), "data": data.summary(),
            "steps": len(log), "final_loss": log[-1]["loss"] if log else None}
    save_json(out / "voco.json", info)
    with atomic_path(out / "log.jsonl") as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in log), encoding="utf-8")
    by_k = {f"k={k}": ([r["step"] for r in log if r["k"] == k], [r["loss"] for r in log if r["k"] == k])
            for k in sorted(set(TRAIN_KS))}
    plot_curves(by_k, out / "loss.png", "step", f"{OBJECTIVE} loss per token", "VoCo on LLaVA conversations")
    inputs = finished_inputs(**{n: (p if Path(p).is_dir() else Path(p).parent) for n, p in (
        ("llava", LLAVA), ("llm", LLM), ("mm_projector", MM_PROJECTOR), ("data", DATA)) if p})
    write_manifest(out, LLAVA_VOCO, settings, files + ["voco.json", "log.jsonl", "loss.png"], inputs=inputs,
                   info={k: info[k] for k in ("k_max", "train_ks", "layout", "trained_reader", "llm", "final_loss")})
    (out / "checkpoint.pt").unlink(missing_ok=True)
    print(f"VoCo weights -> {out} (final loss {info['final_loss']})")


if __name__ == "__main__":
    run_main(main, LLAVA_VOCO, settings)
