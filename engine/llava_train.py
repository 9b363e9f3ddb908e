"""Training VoCo on a LLaVA's conversation data: the pieces step7_train_llava_voco.py runs.

A run is ``EPOCHS`` passes over the data in a fresh seeded order each epoch (random, or
LLaVA's grouping by modality and length: ``RunOrder``); step s trains on the next
``batch_size`` samples of its epoch's order (the last step of an epoch may hold fewer) at
k = TRAIN_KS[s % len]. A step's samples are dealt to the processes in turn and
each process reads its share in micro-batches (gradient accumulation): the loss of a step is
the mean over the whole step (answer tokens for ``ce``, positions for ``kl``, counted from
the samples before any forward pass: ``engine.llava_voco.loss_counts``), each micro-batch's
sum divided by the step's counts, the gradients summed over micro-batches and processes. The
weights therefore do not depend on the number of processes or the micro-batch size (up to
floating-point order). LLaVA's trainer averages the per-micro-batch means instead: the same
when every micro-batch holds as many answer tokens.

Readers (what learns):

- ``frozen`` (ours): VoCo embeddings + LoRA, LoRA on only while compressing; the reading LLM
  is the LLaVA itself, untouched and shareable;
- ``adapted``: the same weights, LoRA on while reading too;
- ``trained`` (the authors'): the LLM fully fine-tuned with the VoCo embeddings and the
  projector, no LoRA. The vision tower is frozen under every reader.

The VoCo embeddings and LoRA learn at ``adapter_lr``, the LLM and projector at ``lr`` (the
authors' 2e-5); both follow one schedule: linear warm-up over ``warmup`` of the steps, then
cosine to 0 (LLaVA's).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.llava_voco import conversation_loss, loss_counts, voco_text
from models.voco import LORA_TARGETS, VoCo
from utils.errors import V2LError

READERS = ("frozen", "adapted", "trained")


def lr_scale(step: int, steps: int, warmup: float) -> float:
    """The schedule's factor at ``step`` (0-based) of ``steps``: linear warm-up over
    round(warmup x steps) steps (at least 1), then cosine to 0."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


GROUPINGS = ("random", "modality")


def modality_grouped(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """LLaVA's ``group_by_modality_length`` order of one epoch. ``lengths``: a sample's words,
    positive with an image, negative without. Each modality in a random order cut in steps of
    ``batch_size`` (one modality per step), the steps shuffled; each modality's last step
    (full or not) goes into one mixed step at the end. A step's samples are sorted longest
    first (LLaVA sorts them so to share them out in micro-batches of like lengths). With one
    modality: the random order cut in steps, each sorted."""
    def by_length(step):
        return sorted(step, key=lambda i: -abs(lengths[i]))
    groups = [g for g in ([i for i, x in enumerate(lengths) if x > 0],
                          [i for i, x in enumerate(lengths) if x <= 0]) if g]
    cut = []
    for group in groups:
        order = [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
        cut.append([order[i:i + batch_size] for i in range(0, len(order), batch_size)])
    if len(cut) == 1:
        return [i for step in cut[0] for i in by_length(step)]
    last = sorted(cut[0].pop() + cut[1].pop())
    steps = cut[0] + cut[1]
    steps = [steps[j] for j in torch.randperm(len(steps), generator=generator).tolist()] + [last]
    return [i for step in steps for i in (by_length(step) if step is not last else step)]


class RunOrder:
    """Which samples each step of a run reads: every epoch a fresh seeded order of the data
    (``random``, or LLaVA's grouping by modality and length with ``lengths``), cut in steps of
    ``batch_size`` (the last of an epoch may hold fewer)."""

    def __init__(self, n: int, batch_size: int, seed: int, lengths: list[int] | None = None):
        self.n, self.batch_size, self.seed, self.lengths = n, batch_size, seed, lengths
        self._epoch: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            order = (torch.randperm(self.n, generator=g).tolist() if self.lengths is None
                     else modality_grouped(self.lengths, self.batch_size, g))
            self._epoch = (epoch, order)
        return self._epoch[1]

    def step(self, step: int) -> list[int]:
        epoch, at = divmod(step, steps_per_epoch(self.n, self.batch_size))
        return self.order(epoch)[at * self.batch_size:(at + 1) * self.batch_size]



def my_micro_batches(indices: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """This process's share of a step (every world-th sample from ``rank``) in micro-batches."""
    mine = indices[rank::world]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def layout_text(parts, layout: str) -> dict:
    """The text an image is compressed with in ``layout`` (VoCo's bos_id, context_ids,
    suffix_ids), from the evaluation's prompt: training and evaluation compress alike."""
    from engine.llava_eval import LlavaPrompts
    sample = LlavaPrompts(parts.tokenizer, layout).sample({"text": "?", "question_id": "-"}, True)
    return voco_text(sample, parts.tokenizer.bos_token_id)


def make_voco(parts, layout: str, reader: str, k_max: int, lora_rank: int, lora_alpha: float,
              lora_targets=LORA_TARGETS, seed: int = 0) -> VoCo:
    """The VoCo on the LLaVA's LLM for a reader; with ``trained`` the LLM's weights and the
    projector are made trainable (no LoRA)."""
    if reader not in READERS:
        raise V2LError(f"--reader {reader}: must be one of {', '.join(READERS)}")
    if reader != "trained" and lora_rank < 1 and reader == "adapted":
        raise V2LError("--reader adapted needs LoRA (--lora_rank 1 or more); without LoRA use "
                       "--reader trained (full fine-tuning) or frozen")
    trained = reader == "trained"
    voco = VoCo(parts.llm, k_max, 0 if trained else lora_rank, lora_alpha, lora_targets, seed=seed,
                reader="adapted" if trained else reader, **layout_text(parts, layout))
    if trained:
        for module in (parts.llm, parts.projector):
            for p in module.parameters():
                p.requires_grad_(True)
    return voco


def named_trainables(voco: VoCo, parts, reader: str) -> dict[str, torch.nn.Parameter]:
    """Every weight that learns, by a stable name (the checkpoint's keys)."""
    out = {"voco.embeddings": voco.embeddings}
    if reader == "trained":
        out |= {f"llm.{n}": p for n, p in parts.llm.named_parameters()}
        out |= {f"projector.{n}": p for n, p in parts.projector.named_parameters()}
    else:
        out |= {f"lora.{n}": p for n, p in parts.llm.named_parameters() if "lora_" in n}
    return out


class MasterWeights:
    """float32 copies of the weights that learn in bf16 or fp16 (a trained reader's LLM and
    projector), which the optimiser updates; the model's weights are their rounding, copied
    back after each step. AdamW's steps at the authors' lr (2e-5) are mostly below half a bf16
    unit of a weight of LLaMA's size and would round away on bf16 weights; the authors'
    DeepSpeed bf16 training keeps such float32 copies too. Sharded weights get sharded copies.
    float32 weights (VoCo embeddings, LoRA, an fp32 run) are their own copies."""

    def __init__(self, named: dict[str, torch.nn.Parameter]):
        self.pairs = []
        self.named = {}
        for name, p in named.items():
            if p.dtype == torch.float32:
                self.named[name] = p
                continue
            master = torch.nn.Parameter(p.detach().float().clone())
            self.pairs.append((p, master))
            self.named[name] = master

    def take_grads(self) -> None:
        """Move the model's gradients to the copies, as float32."""
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def to_model(self) -> None:
        """The model's weights := the copies, rounded to the model's dtype."""
        for p, master in self.pairs:
            p.copy_(master)


def optimizer(named: dict, lr: float, adapter_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the VoCo embeddings + LoRA at ``adapter_lr``, the LLM and the projector at
    ``lr`` (separate groups: a sharded LLM's weights and plain ones do not mix in one group);
    each group's ``base_lr`` is what the schedule scales."""
    adapter = [p for n, p in named.items() if n == "voco.embeddings" or n.startswith("lora.")]
    groups = [{"params": adapter, "lr": adapter_lr, "base_lr": adapter_lr}]
    for prefix in ("llm.", "projector."):
        full = [p for n, p in named.items() if n.startswith(prefix)]
        if full:
            groups.append({"params": full, "lr": lr, "base_lr": lr})
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def load_image(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise V2LError(f"{path}: not a readable image ({e}); replace it or remove its entry") from e


def load_pixels(preprocess, paths: list) -> torch.Tensor | None:
    """The pixels [n, 3, H, W] of the paths that are not None (None when none is)."""
    real = [p for p in paths if p is not None]
    return preprocess([load_image(p) for p in real]) if real else None


def embed(parts, paths: list, train_projector: bool, pixels: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """Each path's image embeddings [n, hidden] (None for no path): the vision tower without
    gradients, the projector with them when it trains. ``pixels``: the images already loaded
    (``load_pixels``), else they are loaded here."""
    if pixels is None:
        pixels = load_pixels(parts.preprocess, paths)
    if pixels is None:
        return [None] * len(paths)
    with torch.no_grad():
        feats = parts.vision(pixels)
    proj_dtype = next(parts.projector.parameters()).dtype
    with torch.set_grad_enabled(train_projector):
        emb = parts.projector(feats.to(proj_dtype)).to(parts.device, parts.dtype)
    it = iter(emb)
    return [next(it) if p is not None else None for p in paths]


@dataclass
class StepInputs:
    """What one process reads in a step: the step's loss normalisers (``step_norms`` over all
    its samples), and its micro-batches as (samples, their images' pixels or None). ``filler``:
    the one micro-batch is a zero-weighted stand-in (a process without samples in a step whose
    end is collective). ``error``: a problem met while loading, raised by the reader."""
    step: int
    norms: tuple[float, float] = (1.0, 1.0)
    batches: list = field(default_factory=list)
    filler: bool = False
    error: str | None = None


class StepLoader(torch.utils.data.Dataset):
    """The inputs of steps ``steps`` for process ``rank``, item i = step steps[i]: the
    samples tokenised and the images decoded and preprocessed, in DataLoader workers ahead of
    the step that reads them (``loader``) or in the reader's process with 0 workers."""

    def __init__(self, data, preprocess, steps: range, order: RunOrder, rank: int, world: int,
                 micro: int, reader: str, kl_on: str, fill: bool):
        self.data, self.preprocess, self.steps, self.run_order = data, preprocess, steps, order
        self.rank, self.world, self.micro = rank, world, micro
        self.reader, self.kl_on, self.fill = reader, kl_on, fill

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> StepInputs:
        step = self.steps[i]
        try:
            indices = self.run_order.step(step)
            tokenised = {j: self.data[j] for j in indices}
            norms = step_norms(list(tokenised.values()), self.reader, self.kl_on)
            batches = my_micro_batches(indices, self.rank, self.world, self.micro)
            filler = self.fill and not batches
            out = []
            for batch in (batches or ([indices[:1]] if filler else [])):
                samples = [tokenised[j] for j in batch]
                out.append((samples, load_pixels(self.preprocess, [self.data.image_path(s) for s in samples])))
            return StepInputs(step, norms, out, filler)
        except V2LError as e:       # one line in the reader's process, not a worker's traceback
            return StepInputs(step, error=str(e))


def _as_is(item):
    return item


def loader(steps: StepLoader, workers: int):
    """The steps' inputs in order: ``workers`` processes prepare the next ones while a step
    runs (0: each prepared when it is read)."""
    if workers:     # the tokenizer's own threads in forked workers: off, without its warning
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=workers,
                                       collate_fn=_as_is, prefetch_factor=2 if workers else None)


def step_norms(samples: list, reader: str, kl_on: str) -> tuple[float, float]:
    """A whole step's (answer tokens, KL positions), at least 1 each."""
    counts = [loss_counts(s, reader if reader == "frozen" else "adapted", kl_on) for s in samples]
    return max(1, sum(c[0] for c in counts)), max(1, sum(c[1] for c in counts))


def train_micro_batches(voco: VoCo, parts, batches: list, k: int, objective: str,
                        layout: str, kl_on: str, kl_weight: float, norms: tuple[float, float],
                        train_projector: bool, weight: float = 1.0) -> float:
    """Forward and backward over this process's micro-batches of a step, each (samples, their
    images' pixels) (gradients of ``weight`` x the loss accumulate in the weights' ``.grad``);
    returns its part of the step's loss, times ``weight``."""
    total = 0.0
    for samples, pixels in batches:
        images = embed(parts, [s.image for s in samples], train_projector, pixels)
        loss, _ = conversation_loss(voco, samples, images, k, objective, layout, kl_on, kl_weight,
                                    ce_norm=norms[0], kl_norm=norms[1])
        if loss.requires_grad:
            (loss * weight).backward()
        total += float(loss.detach()) * weight
    return total


def save_projector(projector, path) -> None:
    """A trained projector as LLaVA's mm_projector.bin (``model.mm_projector.{0,2}.*``)."""
    from models.llava import PROJECTOR_PREFIX
    from utils.artifacts import save_torch
    save_torch(path, {PROJECTOR_PREFIX + k: v.detach().to("cpu", torch.float32).clone()
                      for k, v in projector.state_dict().items()})


def write_weights(out: Path, voco: VoCo, parts, reader: str, llm_state: dict | None = None) -> list[str]:
    """The VoCo directory's weights: voco.safetensors (VoCo embeddings + LoRA, what
    eval_llava.py reads); with a trained reader also the fine-tuned LLM (llm/; its weights
    from ``llm_state`` where given: a sharded LLM's, gathered) and projector
    (mm_projector.bin). Returns the files written."""
    from utils.artifacts import atomic_dir, save_tensors
    save_tensors(out / "voco.safetensors", {k: v.float() for k, v in voco.adapter_state().items()})
    files = ["voco.safetensors"]
    if reader == "trained":
        import shutil
        shutil.rmtree(out / "llm", ignore_errors=True)   # an unfinished run's: this run's own output
        with atomic_dir(out / "llm") as tmp:
            parts.llm.save_pretrained(tmp, state_dict=llm_state)
            parts.tokenizer.save_pretrained(tmp)
        save_projector(parts.projector, out / "mm_projector.bin")
        files += sorted(str(f.relative_to(out)) for f in (out / "llm").rglob("*") if f.is_file())
        files.append("mm_projector.bin")
    return files
