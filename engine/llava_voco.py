"""VoCo training loss on LLaVA conversations with continuous images (projected CLIP features).

A sample (``data.llava.LlavaSample``) is ``before`` + [image] + ``between`` + [VoCo] +
``after``: ``before`` is BOS + the text an image follows (the system prompt and ``USER: `` in
our layout, BOS alone in the authors'), ``between`` the text between the image and its VoCo
tokens (the authors' "\\n"; empty in ours), ``after`` the conversation with its answer labels.
The VoCo weights compress the image in isolation: the compression span is ``before`` + the
image's embeddings + ``between`` (``VoCo(bos_id, context_ids, suffix_ids)`` must hold that
text: ``voco_text``), then k VoCo tokens, LoRA on. The reader is ``VoCo.reading()``: the frozen
LLM (reader ``frozen``, LoRA off: ours), or the LLM with LoRA on (``adapted``; with no LoRA and
LLM weights the caller trains, the authors' full fine-tuning):

- student: ``before`` (ours; the authors' mask hides it, so their layout reads without it),
  the VoCo block, ``after``;
- teacher (Eq. 1's): the frozen LLM (LoRA off) reading ``before`` + the image's embeddings
  uncompressed + ``between`` + ``after``; with LLM weights in training there is no frozen
  LLM, and ``kl`` is refused.

Objectives: ``ce`` (the authors' code: cross-entropy of the answer tokens, labels of
``after``), ``kl`` (the paper's Eq. 1: KL(teacher || student) of the next-token distributions
at every position of ``after`` that predicts a token of ``after``, or only the answer tokens
with ``kl_on="answers"``), or ``both`` (their sum). The first token of ``after`` is predicted
from the last VoCo entry, made while compressing; it is never an answer (the layouts start
``after`` with "\\n") and is left out. Text-only samples are skipped when the reader is
frozen (they reach no trainable weight); with a trained reader their answers count in ``ce``
(the authors' mixed data) and they add nothing to ``kl`` (teacher and student read the same).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data.llava import IGNORE_INDEX
from models.voco import VoCo
from utils.errors import V2LError

def load_model(llava=None, llm=None, vision=None, projector=None, **kw):
    """The frozen LLaVA a LLaVA stage reads: ``models.llava.load_llava`` (a llava-hf directory, or
    its three parts), or the demo's tiny LLaVA where ``projector`` is the folder ``demo.llava``
    wrote (``mm_projector.bin`` beside ``demo_llava.json``; ``vision`` the demo CLIP). ``kw``:
    load_llava's dtype, device, pad and attn."""
    from pathlib import Path

    from models.llava import load_llava
    if llava is None and projector is not None and (Path(projector) / "demo_llava.json").is_file():
        from demo.llava import load_demo_llava
        if llm is None or vision is None:
            raise V2LError(f"{projector}: the demo LLaVA needs --llm (the stand-in LLM) and "
                           "--vision_tower (the demo CLIP) too")
        return load_demo_llava(projector, llm, vision, dtype=kw.get("dtype"),
                               device=kw.get("device") or "cpu", attn=kw.get("attn", "sdpa"))
    return load_llava(llava, llm=llm, vision=vision, projector=projector, **kw)


OBJECTIVES = ("ce", "kl", "both")
KL_ON = ("text", "answers")
LAYOUTS = ("system", "authors")


def voco_text(sample, bos_id: int | None) -> dict:
    """The VoCo constructor's text arguments for a layout, from one image sample: ``bos_id``,
    ``context_ids`` (``before`` after its BOS) and ``suffix_ids`` (``between``)."""
    before = list(sample.before)
    if bos_id is not None and before[:1] == [bos_id]:
        return {"bos_id": bos_id, "context_ids": before[1:], "suffix_ids": list(sample.between)}
    return {"bos_id": None, "context_ids": before, "suffix_ids": list(sample.between)}


def _check_span(voco: VoCo, sample) -> None:
    span = ([voco.bos_id] if voco.bos_id is not None else []) + voco.context_ids
    if list(sample.before) != span or list(sample.between) != voco.suffix_ids:
        raise V2LError(f"entry {sample.id}: the text around its image differs from the text the VoCo "
                       "weights compress an image with (context and suffix); build the VoCo with "
                       "engine.llava_voco.voco_text of this layout's samples")
    if sample.after_labels[:1] != [IGNORE_INDEX] and sample.after_labels:
        raise V2LError(f"entry {sample.id}: the text after its VoCo tokens starts with an answer "
                       "token, which only the compression could predict; start it with the text "
                       "the layout puts there")
    if any(x != IGNORE_INDEX for x in sample.before_labels):
        raise V2LError(f"entry {sample.id}: answer tokens before the image; LLaVA data has the image "
                       "in the first user message")


def conversation_loss(voco: VoCo, samples: list, images: list, k: int, objective: str = "ce",
                      layout: str = "system", kl_on: str = "text",
                      kl_weight: float = 1.0, ce_norm: float | None = None,
                      kl_norm: float | None = None) -> tuple[torch.Tensor, dict]:
    """(loss, counts) for a batch of samples and their images' embeddings ([n, hidden] tensors,
    None for text-only samples), the images compressed here with gradients. The loss is the
    mean answer cross-entropy (``ce``), the mean KL per position (``kl``), or ``ce`` +
    ``kl_weight`` x ``kl`` (``both``). counts: ``answer_tokens``, ``kl_positions``,
    ``samples`` (those read), ``text_only`` (among them, or skipped with a frozen reader).
    ``ce_norm`` / ``kl_norm``
    divide the sums instead of this batch's counts: a training step over several batches
    (gradient accumulation, processes) passes the whole step's counts (``loss_counts``), so
    that its loss is the mean over the step whatever the split."""
    if objective not in OBJECTIVES:
        raise V2LError(f"--objective {objective}: must be one of {', '.join(OBJECTIVES)}")
    if kl_on not in KL_ON:
        raise V2LError(f"--kl_on {kl_on}: must be one of {', '.join(KL_ON)}")
    if layout not in LAYOUTS:
        raise V2LError(f"--layout {layout}: must be one of {', '.join(LAYOUTS)}")
    if len(samples) != len(images):
        raise V2LError(f"{len(samples)} samples but {len(images)} images")
    want_kl = objective in ("kl", "both")
    if want_kl and any(p.requires_grad for n, p in voco.llm.named_parameters() if "lora_" not in n):
        raise V2LError(f"--objective {objective}: the KL's teacher is the frozen LLM, but LLM weights "
                       "are being trained (a fully fine-tuned reader); use --objective ce, or LoRA")
    trained_reader = voco.reader != "frozen"
    rows = [(s, im if s.image is not None else None) for s, im in zip(samples, images)
            if trained_reader or s.image is not None]
    text_only = sum(s.image is None for s in samples)
    counts = {"samples": len(rows), "text_only": text_only, "answer_tokens": 0, "kl_positions": 0}
    zero = voco.embeddings.sum() * 0
    if not rows:
        return zero, counts
    for s, im in rows:
        if s.image is not None and im is None:
            raise V2LError(f"entry {s.id}: has an image but no embeddings were given for it")
        if im is not None:
            _check_span(voco, s)
    with_image = [i for i, (_, im) in enumerate(rows) if im is not None]
    blocks = dict(zip(with_image, voco.compress([rows[i][1] for i in with_image], k))) if with_image else {}
    student = []
    for i, (s, im) in enumerate(rows):
        if im is None:
            student.append([list(s.before) + list(s.between) + list(s.after)])
        else:
            head = [list(s.before)] if layout == "system" else []
            student.append(head + [blocks[i], list(s.after)])
    s_hidden, _, _, _, s_index = voco.prefill(student, hidden=True)
    if want_kl and with_image:
        with torch.no_grad():
            teacher = [[list(s.before), im] + ([list(s.between)] if s.between else []) + [list(s.after)]
                       for s, im in (rows[i] for i in with_image)]
            t_hidden, _, _, _, t_index = voco.prefill(teacher, hidden=True, teacher=True)
            t_of = {i: j for j, i in enumerate(with_image)}
    ce_hidden, targets, kl_hidden, t_rows = [], [], [], []
    for i, (s, im) in enumerate(rows):
        n = len(s.after)
        labels = torch.tensor(list(s.after_labels[1:]) + [IGNORE_INDEX], device=s_hidden.device)
        read = s_hidden[i][s_index[i] >= 0][-n:]              # the positions of ``after``
        answer = labels != IGNORE_INDEX
        ce_hidden.append(read[answer])
        targets.append(labels[answer])
        if want_kl and im is not None:     # a text-only sample: teacher and student are one
            use = answer if kl_on == "answers" else torch.arange(n, device=answer.device) < n - 1
            kl_hidden.append(read[use])
            j = t_of[i]
            t_rows.append(t_hidden[j][t_index[j] >= 0][-n:][use])
    # joined to the reading even where the batch holds no answer token: every process's
    # backward then reaches every layer (a sharded LLM reduces its gradients collectively)
    loss = zero + s_hidden.flatten()[:1].sum() * 0
    if objective in ("ce", "both"):
        hidden = torch.cat(ce_hidden)
        counts["answer_tokens"] = int(hidden.shape[0])
        if hidden.shape[0]:
            ce = F.cross_entropy(voco.logits_of(hidden), torch.cat(targets), reduction="sum")
            loss = loss + ce / (ce_norm if ce_norm is not None else hidden.shape[0])
    if want_kl and kl_hidden:
        hidden = torch.cat(kl_hidden)
        counts["kl_positions"] = int(hidden.shape[0])
        if hidden.shape[0]:
            with torch.no_grad():
                t_log = F.log_softmax(voco.logits_of(torch.cat(t_rows)), -1)
            s_log = F.log_softmax(voco.logits_of(hidden), -1)
            kl = (t_log.exp() * (t_log - s_log)).sum()
            kl = kl / (kl_norm if kl_norm is not None else hidden.shape[0])
            loss = loss + (kl_weight if objective == "both" else 1.0) * kl
    return loss, counts


def loss_counts(sample, reader: str = "frozen", kl_on: str = "text") -> tuple[int, int]:
    """(answer tokens in ``ce``, positions in ``kl``) that ``conversation_loss`` counts for one
    sample, from its ids alone (no model): what a training step divides its sums by."""
    if sample.image is None and reader == "frozen":
        return 0, 0
    answers = sum(x != IGNORE_INDEX for x in sample.after_labels[1:])
    if sample.image is None:
        return answers, 0
    return answers, (answers if kl_on == "answers" else max(0, len(sample.after) - 1))
