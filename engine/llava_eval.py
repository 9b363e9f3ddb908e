"""LLaVA's benchmarks under VoCo compression: what eval_llava.py does, stage by stage.

Questions (``engine.llava_bench``'s readers) are grouped by image: a group is one image and
every question asked about it, in the question file's order (a question without an image,
ScienceQA's text-only ones, is a group of its own). Work is cut into chunks of whole groups,
so that an image is embedded (vision tower + projector) once per run and compressed once per
k, its block reused by every question on it (``engine.voco.BlockStore``).

A question is LLaVA's evaluation prompt in a layout of data/llava.py
(``ConversationEncoder.question``): ``before`` + [image] + ``between`` + [VoCo] + ``after``.
What the frozen LLM reads per condition:

- ``upper``: ``before`` + the image's embeddings, uncompressed + ``between`` + ``after``: in
  the ``system`` layout exactly LLaVA-1.5's sequence;
- ``no_image``: ``before`` + ``between`` + ``after``: the same text without the image;
- ``lower`` (at each k): the VoCo weights' untrained start (their VoCo embeddings as drawn
  from the artifact's seed or ``init_ids``, LoRA = identity), with the VoCo mask: the image
  compressed into k positions by the untrained weights, the text after them seeing the image
  only through those positions. This is the paper's lower bound ("the same model with the
  VoCo mask, no trained compression") and eval_compression.py's;
- ``voco`` (at each k): the same with the trained weights.

The reader is the VoCo weights' (``VoCo(reader=...)``): the frozen LLM (ours), or the LLM
with LoRA on while reading too (``adapted``). Every condition but ``voco`` runs with the
untrained start loaded, whose LoRA is the identity: upper, no_image and lower are read by the
LLaVA itself whatever the reader. A fully fine-tuned reader (step 7's ``--reader trained``:
``llm/`` and ``mm_projector.bin`` beside the VoCo embeddings, no LoRA) answers ``voco`` with
that LLaVA (``trained_reader_work``); upper, no_image and lower stay the given LLaVA's, which
is the paper's definition (the upper bound a model trained with the causal mask, the lower
bound that model under the VoCo mask).

The compressed prompts are those the LLaVA training loss reads (``engine.llava_voco``):
``before`` + block + ``after`` in our layout, block + ``after`` in the authors' (their mask
hides the text before the image). Text-only questions read the same prompt under every
condition.

Answers are greedy (``engine.voco.greedy``; LLaVA evaluates at temperature 0), decoded with
the special tokens skipped and stripped, as LLaVA's scripts write them.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from data.llava import ConversationEncoder, LAYOUTS, LlavaSample
from engine.llava_bench import (Score, load_questions, mmbench_questions, read_jsonl,
                                scienceqa_questions, score_exact, score_gqa, score_mmbench,
                                score_mme, score_pope, score_scienceqa, score_seed, score_textvqa,
                                score_vqav2, vqav2_questions, write_mmbench_upload,
                                write_vqav2_upload)
from engine.llava_voco import voco_text
from engine.voco import BlockStore, check_identity, greedy, synced_clock
from models.voco import READERS, VoCo, VoCoBlock, kv_bytes_per_token
from utils.artifacts import load_json, load_tensors
from utils.errors import V2LError

CONDITIONS = ("upper", "lower", "no_image", "voco")
VOCO_CONDITIONS = ("lower", "voco")


@dataclass(frozen=True)
class Benchmark:
    prompt: str | None        # the instruction a question ends with: "short", "option" or None
    max_new_tokens: int       # LLaVA's: model_vqa_loader 128, model_vqa_mmbench / _science 1024
    annotations: str          # what --annotations is (None: not needed)
    headline: str             # the metric reported first
    needs_annotations: bool = True


BENCHMARKS = {
    "gqa": Benchmark("short", 128, "GQA's testdev_balanced_questions.json", "accuracy"),
    "pope": Benchmark("short", 128, "POPE's folder of coco_pope_<category>.json", "f1"),
    "mme": Benchmark("short", 128, "MME's MME_Benchmark_release_version folder", "perception"),
    "scienceqa": Benchmark("option", 1024, "ScienceQA's folder holding problems.json and "
                           "pid_splits.json", "img_accuracy"),
    "seed": Benchmark("option", 128, "SEED-Bench.json", "accuracy"),
    "textvqa": Benchmark("short", 128, "TextVQA_0.5.1_val.json", "accuracy"),
    "vqav2": Benchmark("short", 128, "v2_mscoco_val2014_annotations.json (val, scored), or for "
                       "test-dev LLaVA's llava_vqav2_mscoco_test2015.jsonl (the upload's question "
                       "list; none: the question file's)", "accuracy", needs_annotations=False),
    "mmbench": Benchmark("option", 1024, "the MMBench dev TSV with its answer column (none: the "
                         "question TSV's, else the upload file only)", "accuracy",
                         needs_annotations=False),
    "exact": Benchmark(None, 128, "none (the question file's answer field)", "accuracy",
                       needs_annotations=False),
}


def benchmark_of(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise V2LError(f"--benchmark {name!r}: use one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


# ----------------------------------------------------------------------------- questions

def read_benchmark_questions(benchmark: str, path) -> list[dict]:
    """The benchmark's questions as LLaVA's question dicts (``question_id``, ``image`` or
    ``image_b64``, ``text`` ending with the instruction, ``prompt`` for the answers file)."""
    path = Path(path)
    if not path.is_file():
        raise V2LError(f"{path}: no such question file; give the benchmark's LLaVA question file "
                       "(--questions)")
    if benchmark == "mmbench":
        return mmbench_questions(path)
    if benchmark == "scienceqa" and path.suffix == ".json":
        return scienceqa_questions(path)
    if benchmark == "vqav2" and path.suffix == ".json":
        return vqav2_questions(path)
    return load_questions(path, prompt=benchmark_of(benchmark).prompt)


@dataclass
class Group:
    """One image and the questions on it (indices into the question list), or one question
    without an image (``image`` None)."""
    image: str | None
    questions: list[int]


def image_key(q: dict) -> str | None:
    if q.get("image_b64") is not None:
        return f"base64:{q['question_id']}"
    return str(q["image"]) if q.get("image") else None


def group_questions(questions: list[dict]) -> list[Group]:
    """Groups in order of first appearance: one per image, one per question without one."""
    groups, at = [], {}
    for i, q in enumerate(questions):
        key = image_key(q)
        if key is None:
            groups.append(Group(None, [i]))
        elif key in at:
            groups[at[key]].questions.append(i)
        else:
            at[key] = len(groups)
            groups.append(Group(key, [i]))
    return groups


def drop_missing(groups: list[Group], questions: list[dict], image_folder) -> tuple[list[Group], list[str]]:
    """(the groups whose image is there, the images that are not): a missing image's questions
    are skipped under every condition and counted."""
    folder = Path(image_folder) if image_folder else None
    files = any(g.image is not None and questions[g.questions[0]].get("image_b64") is None
                for g in groups)
    if files and (folder is None or not folder.is_dir()):
        raise V2LError(f"{image_folder or '--image_folder'}: no such image folder; give the folder "
                       "the question file's image paths are relative to (--image_folder)")
    kept, missing = [], []
    for g in groups:
        q = questions[g.questions[0]]
        if g.image is None:
            ok = True
        elif q.get("image_b64") is not None:
            ok = bool(str(q["image_b64"]).strip())
        else:
            ok = (folder / g.image).is_file()
        if ok:
            kept.append(g)
        else:
            missing.append(g.image)
    return kept, missing


def open_image(q: dict, image_folder):
    from PIL import Image
    try:
        if q.get("image_b64") is not None:
            image = Image.open(io.BytesIO(base64.b64decode(q["image_b64"])))
            where = f"question {q['question_id']}'s base64 image"
        else:
            where = str(Path(image_folder) / q["image"])
            image = Image.open(where)
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise V2LError(f"{where}: not a readable image ({e}); replace or remove it") from e


# ----------------------------------------------------------------------------- prompts

class LlavaPrompts:
    """Each question's sample in a layout, and the prompt a condition reads (module doc)."""

    def __init__(self, tokenizer, layout: str = "system"):
        if layout not in LAYOUTS:
            raise V2LError(f"--layout {layout}: must be one of {', '.join(LAYOUTS)}")
        self.encoder, self.layout = ConversationEncoder(tokenizer, layout), layout

    def sample(self, q: dict, with_image: bool) -> LlavaSample:
        return self.encoder.question(q["text"], "image" if with_image else None,
                                     str(q["question_id"]))

    def realize(self, s: LlavaSample, condition: str, embeddings: torch.Tensor | None = None,
                block: VoCoBlock | None = None) -> list:
        if s.image is None or condition == "no_image":
            return [list(s.before) + list(s.between) + list(s.after)]
        if condition == "upper":
            return ([list(s.before), embeddings] + ([list(s.between)] if s.between else [])
                    + [list(s.after)])
        head = [list(s.before)] if self.layout == "system" else []
        return head + [block, list(s.after)]


def positions(prompt: list) -> int:
    """Positions a realised prompt occupies (text tokens, embedding rows, VoCo entries)."""
    return sum(seg.k if isinstance(seg, VoCoBlock) else len(seg) for seg in prompt)


def condition_labels(conditions, ks) -> list[str]:
    """The answer sets to make: ``upper``, ``no_image``, ``lower-k<k>``, ``voco-k<k>``."""
    out = []
    for c in conditions:
        out += [f"{c}-k{k}" for k in ks] if c in VOCO_CONDITIONS else [c]
    return out


def parse_label(label: str) -> tuple[str, int | None]:
    if "-k" in label:
        c, k = label.split("-k")
        return c, int(k)
    return label, None


# ----------------------------------------------------------------------------- VoCo weights

def voco_info(voco_dir) -> dict:
    """voco.json of a VoCo artifact trained on a LLaVA, checked to hold what the evaluation
    reads (the weights file beside it included)."""
    voco_dir = Path(voco_dir)
    info_path, weights_path = voco_dir / "voco.json", voco_dir / "voco.safetensors"
    for p in (info_path, weights_path):
        if not p.is_file():
            raise V2LError(f"{p}: not found; give a VoCo directory trained on this LLaVA "
                           "(voco.safetensors + voco.json) as --voco_dir")
    try:
        info = load_json(info_path)
    except ValueError as e:
        raise V2LError(f"{info_path}: not valid JSON ({e}); retrain or restore the VoCo directory") from e
    missing = [k for k in ("k_max", "lora_rank", "lora_alpha", "lora_targets", "seed", "llm_identity")
               if k not in info]
    if missing:
        raise V2LError(f"{info_path}: no {', '.join(missing)}; not a VoCo artifact of this code")
    return info


def load_llava_voco(voco_dir, parts, layout: str = "") -> tuple[VoCo, dict, dict, str]:
    """(VoCo on the LLaVA's LLM in its untrained start, voco.json, the trained weights, the
    layout) from a VoCo artifact trained on this LLaVA (voco.safetensors + voco.json with
    ``layout`` and ``k_max``). The text an image is compressed after and before its VoCo
    tokens is the layout's (``engine.llava_voco.voco_text``); where voco.json records it, it
    must agree. The reader is voco.json's ``reader`` (frozen when absent)."""
    voco_dir = Path(voco_dir)
    info = voco_info(voco_dir)
    info_path, weights_path = voco_dir / "voco.json", voco_dir / "voco.safetensors"
    trained_layout = info.get("layout", "system")
    if layout and layout != trained_layout:
        raise V2LError(f"--layout {layout}: {voco_dir} was trained in the {trained_layout!r} "
                       f"layout; leave --layout empty or pass {trained_layout}")
    reader = info.get("reader", "frozen")
    if reader not in READERS:
        raise V2LError(f"{info_path}: reader {reader!r} unknown; expected one of {', '.join(READERS)}")
    if reader != "frozen" and not info["lora_rank"] and info.get("trained_reader") != "trained":
        raise V2LError(f"{info_path}: reader {reader!r} without LoRA and not a fully fine-tuned "
                       "reader of step 7; retrain the directory")
    check_identity(info["llm_identity"], parts.language, str(voco_dir))
    prompts = LlavaPrompts(parts.tokenizer, trained_layout)
    text = voco_text(prompts.sample({"text": "?", "question_id": "-"}, True),
                     parts.tokenizer.bos_token_id)
    for key in ("bos_id", "context_ids", "suffix_ids"):
        if key in info and info[key] != text[key]:
            raise V2LError(f"{info_path}: {key} {info[key]} differs from the {trained_layout!r} "
                           f"layout's {text[key]} with this tokenizer; evaluate with the tokenizer "
                           "and layout the weights were trained with")
    trained = load_tensors(weights_path)
    other = [k for k in trained if not (k == "voco.embeddings" or k.startswith("lora."))]
    if other or "voco.embeddings" not in trained:
        raise V2LError(f"{weights_path}: holds {(other or ['no voco.embeddings'])[0]}; expected VoCo "
                       "embeddings and LoRA weights (voco.embeddings, lora.*)")
    if trained["voco.embeddings"].shape[0] != info["k_max"]:
        raise V2LError(f"{weights_path}: {trained['voco.embeddings'].shape[0]} VoCo embeddings but "
                       f"voco.json says k_max {info['k_max']}; the directory is inconsistent")
    voco = VoCo(parts.llm, info["k_max"], info["lora_rank"], info["lora_alpha"],
                info["lora_targets"], seed=info["seed"], init_ids=info.get("init_ids") or None,
                reader=reader, **text)
    return voco, info, trained, trained_layout


def plain_reader(parts) -> VoCo:
    """A reader without VoCo weights (no LoRA: the LLM unchanged), for upper and no_image."""
    return VoCo(parts.llm, 1, lora_rank=0, bos_id=parts.tokenizer.bos_token_id)


def check_ks(ks, k_max: int, voco_dir) -> None:
    bad = [k for k in ks if not 1 <= k <= k_max]
    if bad or not ks:
        raise V2LError(f"--eval_ks {list(ks)}: {voco_dir} was trained with at most k_max={k_max} "
                       f"VoCo tokens; use k between 1 and {k_max}")


# ----------------------------------------------------------------------------- the work

@dataclass
class Work:
    """What a chunk needs: the model, the reader, the prompts and the run's settings."""
    parts: object
    voco: VoCo
    prompts: LlavaPrompts
    questions: list[dict]
    image_folder: str
    batch_size: int
    max_new_tokens: int
    device: torch.device
    cache_bytes: int | None = None
    states: dict | None = None      # "lower" / "voco" -> adapter state
    trained: "Work | None" = None   # a fully fine-tuned reader's LLaVA, which answers voco


def trained_reader_work(work: Work, voco_dir, info: dict, trained: dict, attn: str = "sdpa") -> Work:
    """The work that answers ``voco`` for a VoCo directory of a fully fine-tuned reader (step
    7's ``--reader trained``): its LLM (``llm/``) and projector (``mm_projector.bin``) on the
    given LLaVA's vision tower, its VoCo embeddings loaded, no LoRA."""
    from dataclasses import replace
    from models.llava import with_language
    voco_dir = Path(voco_dir)
    for need in (voco_dir / "llm", voco_dir / "mm_projector.bin"):
        if not need.exists():
            raise V2LError(f"{need}: not found; a fully fine-tuned reader's directory holds its LLM "
                           "(llm/) and projector (mm_projector.bin); rerun step 7 to the end")
    parts = with_language(work.parts, voco_dir / "llm", voco_dir / "mm_projector.bin", attn)
    check_identity(info["llm_identity"], parts.language, str(voco_dir / "llm"))
    base = work.voco
    voco = VoCo(parts.llm, info["k_max"], 0, seed=info["seed"], init_ids=info.get("init_ids") or None,
                reader="adapted", bos_id=base.bos_id, context_ids=base.context_ids,
                suffix_ids=base.suffix_ids)
    voco.load_adapter_state(trained)
    return replace(work, parts=parts, voco=voco, states=None, trained=None)


def embed_groups(work: Work, groups: list[Group]) -> dict[str, torch.Tensor]:
    """Each group's image embeddings [n, hidden] on the device (vision tower + projector), in
    batches of ``batch_size`` images."""
    with_image = [g for g in groups if g.image is not None]
    out = {}
    for s in range(0, len(with_image), work.batch_size):
        batch = with_image[s:s + work.batch_size]
        images = [open_image(work.questions[g.questions[0]], work.image_folder) for g in batch]
        with torch.no_grad():
            emb = work.parts.embed_images(work.parts.preprocess(images))
        out.update({g.image: e for g, e in zip(batch, emb)})
    return out


@torch.no_grad()
def compress_groups(work: Work, groups: list[Group], embeddings: dict, k: int) -> BlockStore:
    """Each image of the chunk compressed once at ``k`` into a store (CPU memory)."""
    store = BlockStore(work.device, work.cache_bytes)
    keys = [g.image for g in groups if g.image is not None]
    for s in range(0, len(keys), work.batch_size):
        batch = keys[s:s + work.batch_size]
        for key, block in zip(batch, work.voco.compress([embeddings[x] for x in batch], k)):
            store.add(key, block)
    return store


def answer(work: Work, prompts: list[list]) -> list[str]:
    tok = work.parts.tokenizer
    gen = greedy(work.voco, prompts, work.max_new_tokens, None, tok.eos_token_id)
    return [tok.decode(t, skip_special_tokens=True).strip() for t in gen]


def run_chunk(work: Work, groups: list[Group], labels: list[str]) -> dict[str, list[dict]]:
    """Answer every question of ``groups`` under each condition of ``labels``: per label the
    rows ``{"index", "text", "positions"}`` (question order within the chunk) and a last row
    ``{"meta": ...}`` with the chunk's seconds (embedding, compression, decoding), images,
    questions and image tokens. ``voco`` is answered by ``work.trained`` where there is one."""
    order = [(i, g.image) for g in groups for i in g.questions]
    samples = {i: work.prompts.sample(work.questions[i], key is not None) for i, key in order}
    embedded: dict[int, tuple[dict, float]] = {}     # per LLaVA: its image embeddings, seconds
    out = {}
    for label in labels:
        condition, k = parse_label(label)
        w = work.trained if condition == "voco" and work.trained is not None else work
        if id(w) not in embedded:
            t0 = synced_clock(w.device)
            embedded[id(w)] = (embed_groups(w, groups), synced_clock(w.device) - t0)
        embeddings, embed_s = embedded[id(w)]
        compress_s, store = 0.0, None
        if w.states is not None:   # the untrained start (LoRA = identity) but for voco: an
            #                        adapted reader then reads upper and no_image as the LLaVA
            w.voco.load_adapter_state(w.states["voco" if condition == "voco" else "lower"])
        if condition in VOCO_CONDITIONS:
            t0 = synced_clock(w.device)
            store = compress_groups(w, groups, embeddings, k)
            compress_s = synced_clock(w.device) - t0
        rows, decode_s = [], 0.0
        for s in range(0, len(order), w.batch_size):
            batch = order[s:s + w.batch_size]
            prompts = [w.prompts.realize(samples[i], condition,
                                         embeddings.get(key) if key is not None else None,
                                         store[key] if store is not None and key is not None else None)
                       for i, key in batch]
            t0 = synced_clock(w.device)
            texts = answer(w, prompts)
            decode_s += synced_clock(w.device) - t0
            rows += [{"index": i, "text": t, "positions": positions(p)}
                     for (i, _), t, p in zip(batch, texts, prompts)]
        rows.append({"meta": {"embed_s": embed_s, "compress_s": compress_s, "decode_s": decode_s,
                              "images": len(embeddings), "questions": len(order),
                              "image_tokens": next((e.shape[0] for e in embeddings.values()), 0)}})
        out[label] = rows
    return out


def split_rows(rows: list[dict]) -> tuple[list[dict], dict]:
    """(answer rows in question order, the chunks' meta summed)."""
    answers = sorted((r for r in rows if "meta" not in r), key=lambda r: r["index"])
    meta: dict = {"chunks": 0}
    for r in rows:
        if "meta" in r:
            meta["chunks"] += 1
            for key, v in r["meta"].items():
                meta[key] = max(meta.get(key, 0), v) if key == "image_tokens" else meta.get(key, 0) + v
    return answers, meta


# ----------------------------------------------------------------------------- scores

def check_annotations(benchmark: str, annotations: str) -> None:
    """Refuse, before any work, a benchmark run without the files its scorer reads."""
    b = benchmark_of(benchmark)
    if benchmark == "exact" and annotations:
        raise V2LError(f"--annotations {annotations}: --benchmark exact scores against the question "
                       "file's own answers; leave --annotations empty")
    if b.needs_annotations and not annotations:
        raise V2LError(f"--benchmark {benchmark} is scored against {b.annotations}; give it as "
                       "--annotations")
    if annotations and not Path(annotations).exists():
        raise V2LError(f"{annotations}: not found; give {b.annotations} as --annotations")
    if benchmark == "scienceqa":
        for name in ("problems.json", "pid_splits.json"):
            if not (Path(annotations) / name).is_file():
                raise V2LError(f"{annotations}: no {name}; give ScienceQA's data folder "
                               "(problems.json, pid_splits.json) as --annotations")


def _has_answer_column(tsv) -> bool:
    with open(tsv, encoding="utf-8") as f:
        return "answer" in f.readline().rstrip("\n").split("\t")


def score(benchmark: str, answers_path, questions_path, annotations: str,
          upload_path) -> tuple[Score | None, str | None]:
    """(the offline score, or None where only an upload can score; the upload file written,
    if any) of one answers file."""
    a, q = answers_path, questions_path
    if benchmark == "gqa":
        return score_gqa(a, annotations), None
    if benchmark == "pope":
        return score_pope(a, q, annotations), None
    if benchmark == "mme":
        return score_mme(a, annotations), None
    if benchmark == "scienceqa":
        d = Path(annotations)
        return score_scienceqa(a, d / "problems.json", d / "pid_splits.json"), None
    if benchmark == "seed":
        return score_seed(a, annotations), None
    if benchmark == "textvqa":
        return score_textvqa(a, annotations), None
    if benchmark == "exact":
        return score_exact(a, q), None
    if benchmark == "vqav2":
        if annotations and Path(annotations).suffix != ".jsonl":
            return score_vqav2(a, annotations), None
        # test-dev: the upload lists every question of LLaVA's llava_vqav2_mscoco_test2015.jsonl
        # (--annotations; else the question file's), "" where unanswered
        path = Path(upload_path).with_suffix(".json")
        write_vqav2_upload(a, annotations or q, path)
        return None, str(path)
    if benchmark == "mmbench":
        path, _ = write_mmbench_upload(a, q, upload_path)
        tsv = annotations or q
        return (score_mmbench(a, tsv) if _has_answer_column(tsv) else None), str(path)
    raise V2LError(f"--benchmark {benchmark}: no scorer")


def mean_interval(values: list[float], n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> list[float] | None:
    """Percentile-bootstrap interval of the mean of per-question scores in [0, 1]."""
    if not values:
        return None
    x = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (n_boot, len(x)), generator=g)].mean(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return [float(v) for v in torch.quantile(means, q)]


def read_answer_file(path) -> list[dict]:
    return read_jsonl(path, "an answers file")


# ----------------------------------------------------------------------------- cost

def costs(parts, voco: VoCo, meta: dict, mean_positions: dict, labels: list[str]) -> dict:
    """Per image and per question, for each condition: tokens and KV bytes kept per image,
    prefill FLOPs per question (``engine.voco.prefill_flops``), compression FLOPs per image,
    and measured images/s and questions/s (decoding, plus compression for the cached ones;
    the vision tower and projector, the same for all, are reported apart)."""
    from engine.voco import prefill_flops
    model = parts.llm
    per_token = kv_bytes_per_token(model)
    upper = meta.get("upper")
    n_tokens = max((m.get("image_tokens", 0) for m in meta.values()), default=0)
    span = n_tokens + len(voco.context_ids) + len(voco.suffix_ids) + (voco.bos_id is not None)
    out = {"kv_bytes_per_token": per_token, "image_tokens": n_tokens,
           "embed_s_per_image": (upper or next(iter(meta.values())))["embed_s"]
           / max(1, (upper or next(iter(meta.values())))["images"]) if meta else None}
    for label in labels:
        m = meta[label]
        condition, k = parse_label(label)
        seconds = m["decode_s"] + m["compress_s"]
        kept = {"upper": n_tokens, "no_image": 0}.get(condition, k)
        row = {"tokens_per_image": kept, "kv_bytes_per_image": kept * per_token,
               "kv_reduction": 1 - kept / n_tokens if n_tokens else None,
               "images": m["images"], "questions": m["questions"],
               "decode_s": m["decode_s"], "compress_s": m["compress_s"],
               "images_per_s": m["images"] / seconds if seconds and m["images"] else None,
               "questions_per_s": m["questions"] / seconds if seconds else None}
        if condition in VOCO_CONDITIONS:
            row["prefill_flops_per_question"] = prefill_flops(model, mean_positions[label] - k, k)
            row["compress_flops_per_image"] = prefill_flops(model, span + k)
        else:
            row["prefill_flops_per_question"] = prefill_flops(model, mean_positions[label])
        if upper is not None and row["images_per_s"] and label != "upper":
            full = upper["images"] / upper["decode_s"] if upper["decode_s"] else None
            row["speedup_vs_full"] = row["images_per_s"] / full if full else None
        out[label] = row
    return out
