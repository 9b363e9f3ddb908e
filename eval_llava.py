"""LLaVA's benchmarks with VoCo-compressed images, against their bounds, and what it costs.

On one benchmark's questions (LLaVA's question file and prompts: "Answer the question using a
single word or phrase.", the option-letter prompt), a LLaVA-1.5 (a llava-hf directory, or
Vicuna + a CLIP vision tower + mm_projector.bin) answers greedily under each condition:

- upper: the LLM reads the image's embeddings uncompressed (LLaVA-1.5 itself in the system
  layout);
- lower: the VoCo weights' untrained start (initial VoCo embeddings, LoRA = identity)
  compresses each image into k positions and the text reads only those (the paper's lower
  bound: the same model with the VoCo mask and no trained compression, at each k);
- no_image: the same prompt without the image;
- voco: the trained VoCo weights, at each k in EVAL_KS.

The reader is the VoCo weights' (voco.json's reader: the frozen LLM, or the LLM with LoRA on
while reading too); every condition but voco runs with the untrained start loaded (LoRA = the
identity), so that upper, no_image and lower are the LLaVA itself. engine/llava_eval.py
describes the prompts of each. Retention = (voco - lower) / (upper -
lower) of the mean per-question score at the same k, with a paired bootstrap 95% CI
(engine/llava_bench.py ``retention``). Cost per condition: tokens and KV bytes kept per image,
prefill FLOPs per question, compression FLOPs per image, images/s and questions/s measured
(decoding; plus compression for the compressed conditions; the vision tower and projector,
the same for all, apart). Every image is embedded once and compressed once per k, its block
reused by every question on it.

Questions are grouped by image and answered in chunks of CHUNK_IMAGES images (with all their
questions), saved per condition as they finish (utils/artifacts.py ``ChunkStore``): a killed
run resumes, and adding a k or a condition reuses every condition already answered. An image
missing from IMAGE_FOLDER is skipped with its questions under every condition and counted.
Under torchrun chunk i is answered on rank i % world; rank 0 gathers, scores and writes.

Writes OUT_DIR: answers-<condition>.jsonl (LLaVA's answers files: upper, no_image,
lower-k<k>, voco-k<k>), upload files where the benchmark is scored by a server (MMBench,
VQAv2 test-dev), results.json (scores, retention, cost), results.md and manifest.json.

    python eval_llava.py --llava llava-1.5-7b-hf --voco_dir out/llava_voco --benchmark gqa \
        --questions llava_gqa_testdev_balanced.jsonl --image_folder gqa/images \
        --annotations testdev_balanced_questions.json
    torchrun --nproc_per_node 8 eval_llava.py ...
"""
import hashlib
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from engine.llava_bench import answer_row, retention, write_answers
from engine.llava_voco import load_model
from engine.llava_eval import (CONDITIONS as KNOWN_CONDITIONS, VOCO_CONDITIONS, LlavaPrompts, Work, benchmark_of,
                               check_annotations, check_ks, condition_labels, costs, drop_missing,
                               group_questions, load_llava_voco, mean_interval, parse_label,
                               plain_reader, read_benchmark_questions, run_chunk, score,
                               split_rows, trained_reader_work, voco_info)
from models.llm import llm_dtype
from models.voco import check_context
from utils import dist
from utils.artifacts import (MANIFEST, ChunkStore, artifact_id, finished_inputs, load_json,
                             run_key, save_json, write_manifest)
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.stages import EVAL_LLAVA
from utils.tables import write_table

# the model
LLAVA = ""                        # a llava-hf directory (LlavaForConditionalGeneration, e.g. llava-1.5-7b-hf); or the three parts below
LLM = ""                          # LLaVA's language model (Vicuna-7B-v1.5), with --vision_tower and --mm_projector
VISION_TOWER = ""                 # a CLIP vision tower directory (clip-vit-large-patch14-336)
MM_PROJECTOR = ""                 # LLaVA-1.5's mm_projector.bin (or the folder demo.llava wrote: the demo LLaVA)
LLM_DTYPE = "fp16"                # fp16 (LLaVA's evaluation), bf16 or fp32; a CPU: bf16 where native, else fp32
ATTN = "sdpa"                     # attention: sdpa or eager (flash-attention cannot take VoCo's mask)
PAD = True                        # pad images to a square in CLIP's mean colour (LLaVA-1.5's image_aspect_ratio pad)
VOCO_DIR = ""                     # VoCo weights trained on this LLaVA (voco.safetensors + voco.json); empty: upper and no_image only
LAYOUT = ""                       # system (ours) or authors; empty: the VoCo weights' (system without them)
# the benchmark
BENCHMARK = "gqa"                 # gqa, pope, mme, scienceqa, seed, textvqa, vqav2, mmbench or exact (a generated set whose rows hold their answer)
QUESTIONS = ""                    # LLaVA's question file (gqa: llava_gqa_testdev_balanced.jsonl; mmbench: the TSV; scienceqa: llava_test_CQM-A.json)
IMAGE_FOLDER = ""                 # the folder the questions' image paths are relative to
ANNOTATIONS = ""                  # what the benchmark's scorer reads (gqa: testdev_balanced_questions.json; engine/llava_eval.py BENCHMARKS)
# the conditions
CONDITIONS: tuple[str, ...] = ("upper", "lower", "no_image", "voco")  # conditions to run
EVAL_KS: tuple[int, ...] = (1, 2, 4, 8)  # VoCo tokens per image for lower and voco (each <= the trained k_max)
MAX_NEW_TOKENS: int | None = None  # longest answer (none: LLaVA's for the benchmark: 128; MMBench and ScienceQA 1024)
# how it runs
BATCH_SIZE = 8                    # questions decoded together (and images embedded / compressed together)
CHUNK_IMAGES = 64                 # images (with all their questions) per saved chunk: the resume granularity
BLOCK_CACHE_GB = 4.0              # GPU memory kept for recently read VoCo blocks (all blocks stay in CPU memory)
N_BOOT = 2000                     # bootstrap resamples for the 95% intervals
SEED = 0                          # bootstrap seed
MAX_CHUNKS = 0                    # stop after this many chunks per process (0: no limit; rerun to continue)
DEVICE = "auto"                   # auto, cpu or cuda
OUT_DIR = "out/eval_llava"        # where results are written

settings = configure(globals())

# settings that do not change a condition's answers (left out of its chunks' key)
NOT_IN_ANSWERS = {"eval_ks", "conditions", "annotations", "n_boot", "seed", "max_new_tokens",
                  "layout", "voco_dir", "max_chunks"}
IS_MAIN = True


def check_options() -> list[str]:
    """The conditions to run (lower and voco need VoCo weights)."""
    bad = [c for c in CONDITIONS if c not in KNOWN_CONDITIONS]
    if bad or not CONDITIONS:
        raise V2LError(f"--conditions {list(CONDITIONS)}: use some of {', '.join(KNOWN_CONDITIONS)}")
    if BATCH_SIZE < 1 or CHUNK_IMAGES < 1:
        raise V2LError("--batch_size and --chunk_images must be at least 1")
    if MAX_NEW_TOKENS is not None and MAX_NEW_TOKENS < 1:
        raise V2LError(f"--max_new_tokens {MAX_NEW_TOKENS}: use 1 or more (none: LLaVA's)")
    if BLOCK_CACHE_GB < 0:
        raise V2LError(f"--block_cache_gb {BLOCK_CACHE_GB}: use 0 or more (GiB of GPU memory)")
    conditions = list(dict.fromkeys(CONDITIONS))
    if not VOCO_DIR and any(c in VOCO_CONDITIONS for c in conditions):
        conditions = [c for c in conditions if c not in VOCO_CONDITIONS]
        if not conditions:
            raise V2LError("--conditions lower and voco need VoCo weights: give --voco_dir")
        print("no --voco_dir: running " + ", ".join(conditions) + " only (lower and voco need "
              "VoCo weights)")
    return conditions


def input_ids() -> dict:
    """The content of the files the answers and scores come from (question file, VoCo
    weights, an annotation file), recorded in the manifest: a rerun with another file at the
    same path is not taken as up to date."""
    out = {}
    for name, path in (("questions", QUESTIONS), ("voco", VOCO_DIR), ("annotations", ANNOTATIONS)):
        if path and Path(path).exists() and (name != "annotations" or Path(path).is_file()):
            out[name] = artifact_id(path)
    return out


def forget_if_inputs_changed() -> None:
    manifest = Path(OUT_DIR) / MANIFEST
    if not manifest.is_file():
        return
    try:
        recorded = load_json(manifest).get("info", {}).get("input_ids")
    except ValueError:
        return
    if recorded is not None and recorded != input_ids():
        if os.environ.get("RANK", "0") == "0":
            print(f"{OUT_DIR}: rebuilding: an input file changed since the last run")
            manifest.unlink(missing_ok=True)


def chunk_key(label: str, layout: str, max_new: int, parts, groups) -> dict:
    """What a condition's answers depend on: the settings that change them, the question file
    (and for lower/voco the VoCo weights) by content, the model as it runs, the layout, the
    answer length and the images answered."""
    config = {k: v for k, v in settings.items() if k not in NOT_IN_ANSWERS}
    inputs = {"questions": QUESTIONS} | ({"voco": VOCO_DIR} if parse_label(label)[0] in VOCO_CONDITIONS
                                         else {})
    images = hashlib.sha256("\n".join(str(g.image) for g in groups).encode()).hexdigest()
    return run_key(config, **inputs) | {"llm": parts.ident, "dtype": str(parts.dtype),
                                        "condition": label, "layout": layout,
                                        "max_new_tokens": max_new, "images": images}


def context_fits(parts, prompts: LlavaPrompts, questions, groups, max_new: int) -> None:
    """Refuse, before any work, a question whose uncompressed prompt and answer do not fit."""
    n = parts.image_tokens()
    longest = max(len(s.before) + len(s.between) + len(s.after) + (n if s.image else 0)
                  for g in groups for s in (prompts.sample(questions[i], g.image is not None)
                                            for i in g.questions))
    check_context(parts.llm, longest + max_new, "the longest question with its image and answer",
                  "lower --max_new_tokens or use a model with a longer context")


def main():
    global IS_MAIN
    conditions = check_options()
    bench = benchmark_of(BENCHMARK)
    if not QUESTIONS:
        raise V2LError(f"give the {BENCHMARK} question file as --questions (LLaVA's layout)")
    check_annotations(BENCHMARK, ANNOTATIONS)
    if VOCO_DIR:
        check_ks(EVAL_KS, voco_info(VOCO_DIR)["k_max"], VOCO_DIR)
    questions = read_benchmark_questions(BENCHMARK, QUESTIONS)
    groups, missing = drop_missing(group_questions(questions), questions, IMAGE_FOLDER)
    ddp = dist.init(DEVICE, OUT_DIR)
    IS_MAIN = ddp.is_main
    if missing and ddp.is_main:
        print(f"{len(missing)} images missing from {IMAGE_FOLDER} (first: {missing[0]}): their "
              "questions are skipped under every condition")
    if not groups:
        raise V2LError(f"{QUESTIONS}: no question has its image in {IMAGE_FOLDER}; give the image "
                       "folder of this question file")
    parts = load_model(LLAVA or None, llm=LLM or None, vision=VISION_TOWER or None,
                       projector=MM_PROJECTOR or None, dtype=llm_dtype(LLM_DTYPE, ddp.device),
                       device=ddp.device, pad=PAD, attn=ATTN)
    info, states = None, None
    if VOCO_DIR:
        voco, info, trained, layout = load_llava_voco(VOCO_DIR, parts, LAYOUT)
        states = {"lower": {k: v.clone() for k, v in voco.adapter_state().items()}, "voco": trained}
    else:
        voco, layout = plain_reader(parts), LAYOUT or "system"
    prompts = LlavaPrompts(parts.tokenizer, layout)
    max_new = MAX_NEW_TOKENS or bench.max_new_tokens
    context_fits(parts, prompts, questions, groups, max_new)
    labels = condition_labels(conditions, EVAL_KS)
    stores = {label: ChunkStore(Path(OUT_DIR) / "chunks" / label, len(groups), CHUNK_IMAGES,
                                chunk_key(label, layout, max_new, parts, groups), rows=True)
              for label in labels}
    todo = sorted({i for s in stores.values() for i in s.todo(ddp.rank, ddp.world)})
    todo = todo[:MAX_CHUNKS] if MAX_CHUNKS > 0 else todo
    work = Work(parts, voco, prompts, questions, IMAGE_FOLDER, BATCH_SIZE, max_new, ddp.device,
                int(BLOCK_CACHE_GB * 2**30), states)
    if info is not None and info.get("trained_reader") == "trained" and "voco" in conditions:
        work.trained = trained_reader_work(work, VOCO_DIR, info, trained, ATTN)   # voco: its own LLaVA
        if ddp.is_main:
            print(f"voco: answered by the fully fine-tuned LLaVA in {VOCO_DIR} (llm/, mm_projector.bin); "
                  "upper, no_image and lower by the given one")
    error = None
    try:
        for i in tqdm(todo, desc=f"chunks (rank {ddp.rank})", disable=not todo):
            lo, hi = stores[labels[0]].bounds(i)
            got = run_chunk(work, groups[lo:hi], [lb for lb in labels if not stores[lb].done(i)])
            for label, rows in got.items():
                stores[label].save(i, rows)
    except V2LError as e:     # every rank stops, not only the one that met the problem
        error = str(e)
    dist.barrier(ddp, "every rank's answers")
    errors = [e for e in dist.all_gather_objects(error, ddp) if e]
    if errors:
        raise V2LError(errors[0])
    left = sum(s.n_chunks - s.n_done() for s in stores.values())
    if left:
        if ddp.is_main:
            print(f"stopped by --max_chunks {MAX_CHUNKS}: {left} chunks (over all conditions) "
                  "left; rerun the same command to continue")
    elif ddp.is_main:
        report(stores, labels, questions, groups, missing, parts, voco, info, layout, max_new)
    dist.shutdown(ddp)


def report(stores, labels, questions, groups, missing, parts, voco, info, layout, max_new) -> None:
    """Rank 0: the answers files, scores, retention and cost; writes OUT_DIR."""
    out = Path(OUT_DIR)
    bench = benchmark_of(BENCHMARK)
    model_id = Path(LLAVA or LLM).name
    scores, meta, files, uploads, mean_pos, n = {}, {}, [], {}, {}, {}
    for label in labels:
        answers, meta[label] = split_rows(stores[label].gather())
        condition, k = parse_label(label)
        path = out / f"answers-{label}.jsonl"
        write_answers(path, [answer_row(questions[r["index"]], r["text"], model_id,
                                        {"condition": condition, "k": k}) for r in answers])
        files.append(path.name)
        n[label] = len(answers)
        mean_pos[label] = sum(r["positions"] for r in answers) / len(answers)
        scores[label], upload = score(BENCHMARK, path, QUESTIONS, ANNOTATIONS, out / f"upload-{label}")
        if upload:
            uploads[label] = upload
            files.append(Path(upload).name)
    cost = costs(parts, voco, meta, mean_pos, labels)
    rows = []
    for label in labels:
        condition, k = parse_label(label)
        s, c = scores[label], cost[label]
        per = list(s.per_question.values()) if s is not None else []
        row = {"condition": condition, "k": k, "n": n[label],
               "metric": bench.headline, "score": s.metrics.get(bench.headline) if s else None,
               "complete": s.metrics.get("complete") if s else None,
               "mean": sum(per) / len(per) if per else None,
               "ci95": mean_interval(per, N_BOOT, SEED), "retention": None, "retention_ci95": None}
        if condition == "voco" and s is not None and "upper" in scores \
                and scores.get(f"lower-k{k}") is not None and scores["upper"] is not None:
            r = retention(scores["upper"], scores[f"lower-k{k}"], s, n_boot=N_BOOT, seed=SEED)
            row["retention"], row["retention_ci95"] = r["retention"], r["ci95"]
        rows.append(row | {key: c.get(key) for key in (
            "tokens_per_image", "kv_bytes_per_image", "kv_reduction", "prefill_flops_per_question",
            "compress_flops_per_image", "images_per_s", "questions_per_s", "speedup_vs_full")})
    results = {"benchmark": BENCHMARK, "questions": len(questions),
               "answered": n[labels[0]], "images": sum(g.image is not None for g in groups),
               "missing_images": {"count": len(missing), "questions": len(questions) - n[labels[0]],
                                  "first": missing[:20]},
               "layout": layout, "max_new_tokens": max_new, "rows": rows,
               "scores": {lb: (scores[lb].metrics if scores[lb] else None) for lb in labels},
               "cost": cost, "uploads": uploads,
               "trained": {k: info.get(k) for k in ("k_max", "train_ks", "layout", "llm", "trained_reader")}
               if info else None}
    save_json(out / "results.json", results)
    table = write_table(out, COLUMNS, [[cell(r, col) for col in COLUMNS] for r in rows],
                        note=f"{BENCHMARK}: {bench.headline} and the mean per-question score (%); "
                             f"{len(missing)} images missing, their questions skipped")
    for label in labels:      # chunks of other keys in a condition's folder can no longer be used
        for folder in stores[label].dir.parent.glob(".chunks-*"):
            if folder != stores[label].dir:
                shutil.rmtree(folder, ignore_errors=True)
    inputs = finished_inputs(voco=VOCO_DIR) if VOCO_DIR else {}
    write_manifest(out, EVAL_LLAVA, settings, ["results.json", *table, *files], inputs=inputs,
                   info={"input_ids": input_ids(), "rows": rows})


COLUMNS = ["condition", "k", "n", "score", "mean", "ci95", "retention", "retention_ci95",
           "tokens_per_image", "kv_bytes_per_image", "prefill_gflops", "images_per_s", "speedup_vs_full"]


def cell(r: dict, col: str) -> str:
    if col == "prefill_gflops":
        v = r["prefill_flops_per_question"]
        return "-" if v is None else f"{v / 1e9:.3g}"
    v = r[col]
    if v is None:
        return "-"
    if col in ("mean", "retention"):
        return f"{100 * v:.1f}"
    if col in ("ci95", "retention_ci95"):
        return f"{100 * v[0]:.1f}-{100 * v[1]:.1f}"
    if col == "score":
        return f"{v:.1f}"
    if col == "kv_bytes_per_image":
        return f"{v / 2**20:.3g} MiB"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    forget_if_inputs_changed()
    run_main(main, EVAL_LLAVA, settings)
