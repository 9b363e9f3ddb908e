"""Visual question answering by a frozen LLM reading images as words, in context.

The prompt holds K examples (image words, question -> answer) and then the
query image's words and question; the LLM answers greedily and stops at the
separator (engine/open_ended.py gives the layout). Three variants run on the
same questions and examples:

- image:   the V2L tokenizer's words for every image;
- ceiling: each image's own labels as its words (the demo: "<colour> <shape>";
           VQAv2: its first COCO caption, from --labels_file);
- floor:   no image words (the LLM answers from the examples alone).

Score: VQAv2's accuracy, min(#annotators who gave the answer / 3, 1) with its
answer normalisation (engine/vqa.py), overall and per answer type, with 95%
intervals. Examples have the query's question type by default (VQAv2's
``question_type``, e.g. "what color is the"; the demo's colour / shape / yes-no).

Data: VQAv2 val questions + annotations JSON with COCO val2014 images; or the
demo world, whose questions are generated from its labels ("What colour is the
shape?", "What shape is it?", "Is the shape red?") on held-out val images with
examples from train. Writes ``<variant>/answers.jsonl`` (answers are saved in
chunks of CHUNK_SIZE questions as they finish, so a killed run resumes; torchrun
splits the chunks), ``results.json``, ``results.md``, ``gallery.png`` and a manifest.

    python eval_vqa.py --questions_file vqa/v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations_file vqa/v2_mscoco_val2014_annotations.json --image_dir coco/val2014 ...
    python eval_vqa.py --questions_file "" --data_dir out/demo/data ...
"""
from pathlib import Path

from data.captions import check_images, demo_questions, load_vqav2, spread_images
from engine.fewshot import wilson_interval
from engine.open_ended import (ExamplePicker, answer_queries, answer_settings, bootstrap_ci,
                               check_variants, finish)
from engine.vqa import vqa_accuracy
from utils import dist
from utils.artifacts import save_json
from utils.cli import configure, run_main
from utils.stages import EVAL_VQA
from utils.figures import save_text_gallery
from utils.tables import write_table

TOKENIZER_DIR = "out/tokenizer"   # the trained tokenizer (directory or tokenizer.pt)
LLM = "/models/llama-2-7b"        # the frozen LLM: Hugging Face dir, Meta LLaMA dir or .gguf
LLM_DTYPE = "fp16"                # fp16 (the authors'), bf16, fp32 or auto (fp16 on a GPU); a CPU runs bf16 if asked (bf16, auto) and native, else fp32
QUESTIONS_FILE = "/data/vqa/v2_OpenEnded_mscoco_val2014_questions.json"  # VQAv2 questions ("": the demo world's generated questions)
ANNOTATIONS_FILE = "/data/vqa/v2_mscoco_val2014_annotations.json"  # VQAv2 annotations (ten answers per question)
IMAGE_DIR = "/data/coco/val2014"   # COCO images of the questions (COCO_val2014_<id>.jpg)
LABELS_FILE = ""                  # COCO captions_val2014.json: each image's first caption is the ceiling's words
DATA_DIR = "out/demo/data"        # the demo world (class folders <colour>_<shape>), when QUESTIONS_FILE is ""
SPLIT = "val"                     # demo: split the questions are asked about
EXAMPLE_SPLIT = "train"           # demo: split the examples come from
MAX_IMAGES = 1000                 # images asked about, evenly spaced, with all their questions (VQAv2: ~5.4 each)
K_SHOT = 2                        # in-context examples per question
SAME_TYPE = True                  # examples of the query's question type only
FIXED_EXAMPLES = False            # the same seeded examples for every question of a type (shared prefix cache)
GLOBAL_K = 21                     # global tokens per image
LOCAL_TOKENS = False              # also give each image's local tokens (grid x grid LLM ids)
VARIANTS = ["image", "ceiling", "floor"]  # image: tokenizer words; ceiling: own labels; floor: none
MAX_NEW_TOKENS = 10               # longest answer in tokens
SEED = 0                          # example selection and demo question seed
BATCH_SIZE = "auto"               # prompts decoded together: auto (on a GPU the most its free memory holds, a divisor of CHUNK_SIZE; 8 on a CPU) or a number
CHUNK_SIZE = 64                   # questions per saved chunk (resume unit; batches are cut inside a chunk: keep it a multiple of --batch_size)
PREFIX_CACHE = True               # run a batch's shared prompt prefix once (same answers, faster)
GALLERY = 12                      # images in gallery.png, evenly spaced over the queries (0: none)
DEVICE = "auto"                   # auto, cpu or cuda
TF32 = False                      # image words on a CUDA GPU: let fp32 matmuls and convolutions use TF32 (faster on Ampere and later; not the faithful numbers); a CPU ignores it
WORDS_AMP = "fp32"                # image words on a CUDA GPU: fp32 (faithful), or fp16 / bf16 autocast over the tokenizer (faster; a near-tie between codebook entries may flip); a CPU ignores it
NUM_WORKERS = 2                   # image loading workers
OUT_DIR = "out/eval_vqa"          # where results are written

settings = configure(globals())


def load_data() -> tuple[list, list, str]:
    if QUESTIONS_FILE:
        queries, pool = load_vqav2(QUESTIONS_FILE, ANNOTATIONS_FILE, IMAGE_DIR, LABELS_FILE or None)
        return queries, pool, "vqav2"
    return demo_questions(DATA_DIR, SPLIT, SEED), demo_questions(DATA_DIR, EXAMPLE_SPLIT, SEED), "demo"


def accuracy(scores: list[float]) -> dict:
    n = len(scores)
    binary = all(s in (0.0, 1.0) for s in scores)
    lo, hi = wilson_interval(int(sum(scores)), n) if binary else bootstrap_ci(scores, SEED)
    return {"n": n, "accuracy": sum(scores) / max(n, 1), "ci95": [lo, hi],
            "interval": "wilson" if binary else "bootstrap"}


def answer_type(q) -> str:
    return q.extra.get("answer_type") or q.qtype


def score(rows: dict, queries: list) -> dict:
    scores = {q.key: vqa_accuracy(rows[q.key]["answer"], q.answers) for q in queries}
    out = {"all": accuracy(list(scores.values()))}
    for t in sorted({answer_type(q) for q in queries}):
        out[t] = accuracy([scores[q.key] for q in queries if answer_type(q) == t])
    return out


def write_results(results: dict, rows: dict, queries: list, skipped: dict) -> list[str]:
    out = Path(OUT_DIR)
    save_json(out / "results.json", {"variants": results, "skipped": skipped})
    table = [[v, t, r["n"], f"{100 * r['accuracy']:.1f}",
              f"{100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f}"]
             for v, per in results.items() for t, r in per.items()]
    note = "skipped: " + "; ".join(f"{k} ({why})" for k, why in skipped.items()) if skipped else ""
    files = ["results.json"] + write_table(
        out, ["variant", "answer type", "n", "accuracy %", "95% CI"], table, note=note)
    if GALLERY:
        groups: dict[str, list] = {}
        for q in spread_images(queries, GALLERY):
            groups.setdefault(q.image_id, []).append(q)
        show = [qs[i % len(qs)] for i, qs in enumerate(groups.values())]   # question types rotate
        texts = [f"Q: {q.question}\n" + "\n".join(f"{v}: {rows[v][q.key]['answer'] or '(empty)'}"
                                                   for v in rows)
                 + f"\nhuman: {max(q.answers, key=q.answers.count)}" for q in show]
        save_text_gallery([q.path for q in show], texts, out / "gallery.png")
        files.append("gallery.png")
    return files


def main():
    queries, pool, fmt = load_data()
    variants, skipped = check_variants(VARIANTS, all(q.labels for q in queries),
                                       QUESTIONS_FILE or DATA_DIR)
    ddp = dist.init(DEVICE, OUT_DIR)
    queries = spread_images(queries, MAX_IMAGES)
    picker = ExamplePicker(pool, K_SHOT, SEED, fixed=FIXED_EXAMPLES, same_type=SAME_TYPE)
    used = [pool[i] for q in queries for i in picker(q)]
    check_images(queries + used,
                 QUESTIONS_FILE or DATA_DIR, IMAGE_DIR if QUESTIONS_FILE else DATA_DIR)
    key_settings = answer_settings(settings)
    answers = answer_queries(queries, pool, picker, variants, out_dir=OUT_DIR,
                             key_settings=key_settings, tokenizer_dir=TOKENIZER_DIR, llm=LLM,
                             llm_dtype=LLM_DTYPE, global_k=GLOBAL_K, local_tokens=LOCAL_TOKENS,
                             batch_size=BATCH_SIZE, chunk_size=CHUNK_SIZE,
                             max_new_tokens=MAX_NEW_TOKENS, prefix_cache=PREFIX_CACHE,
                             num_workers=NUM_WORKERS, words_tf32=TF32, words_amp=WORDS_AMP,
                             ddp=ddp)
    files = results = None
    if ddp.is_main:
        results = {v: score(answers.rows[v], queries) for v in variants}
        files = write_results(results, answers.rows, queries, skipped) + answers.files
    finish(EVAL_VQA, settings, out_dir=OUT_DIR, tokenizer_dir=TOKENIZER_DIR, variants=variants,
           files=files, info={"format": fmt, "variants": results, "skipped": skipped},
           answers=answers, ddp=ddp)

if __name__ == "__main__":
    run_main(main, EVAL_VQA, settings)
