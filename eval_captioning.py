"""Image captioning by a frozen LLM reading images as words, in context.

The prompt holds K examples (image words -> caption) and then the query
image's words; the LLM writes the caption greedily and stops at the separator
(engine/open_ended.py gives the layout). Image words are the image's global
token strings and, with --local_tokens, its local tokens. Three variants run
on the same queries and examples:

- image:   the V2L tokenizer's words for every image;
- ceiling: each image's own first reference caption as its words;
- floor:   no image words (the LLM writes from the examples alone).

Scores: CIDEr-D and BLEU-4 from pycocoevalcap with PTB tokenisation
(engine/captioning.py; METEOR and SPICE need Java and are skipped).

Data: COCO Karpathy ``dataset_coco.json`` (test split; examples from train),
COCO ``captions_val2014.json`` with its images, or any ``{image path: caption(s)}``
JSON over a folder, such as the demo world's ``captions.json`` (val; examples
from train). Writes ``<variant>/answers.jsonl`` (answers are saved in chunks of
CHUNK_SIZE images as they finish, so a killed run resumes; torchrun splits the
chunks), ``results.json``, ``results.md``, ``gallery.png`` and a manifest.

    python eval_captioning.py --captions_file coco/dataset_coco.json --image_dir coco \\
        --tokenizer_dir out/tokenizer --llm llama-2-7b
    python eval_captioning.py --captions_file out/demo/data/captions.json --split val ...
"""
from pathlib import Path

from data.captions import check_images, load_captions, spread
from engine.captioning import SKIPPED, caption_scores, require_pycocoevalcap
from engine.open_ended import (ExamplePicker, answer_queries, answer_settings, bootstrap_ci,
                               check_variants, finish)
from utils import dist
from utils.artifacts import save_json
from utils.cli import configure, run_main
from utils.stages import EVAL_CAPTIONING
from utils.figures import save_text_gallery
from utils.tables import write_table

TOKENIZER_DIR = "out/tokenizer"   # the trained tokenizer (directory or tokenizer.pt)
LLM = "/models/llama-2-7b"        # the frozen LLM: Hugging Face dir, Meta LLaMA dir or .gguf
LLM_DTYPE = "fp16"                # fp16 (the authors'), bf16, fp32 or auto (fp16 on a GPU); a CPU runs bf16 if asked (bf16, auto) and native, else fp32
CAPTIONS_FILE = "/data/coco/dataset_coco.json"  # Karpathy dataset_coco.json, COCO captions_*.json, or {image path: caption(s)}
IMAGE_DIR = ""                    # image root (Karpathy: COCO root with val2014/; COCO: the val2014 folder; "": the captions file's folder)
SPLIT = "test"                    # captioned split (Karpathy: test; a mapping: first folder of its paths, e.g. val)
EXAMPLE_SPLIT = "train"           # split the in-context examples come from (Karpathy train includes restval)
MAX_IMAGES = 5000                 # images of the split, evenly spaced over it (Karpathy test: all 5,000)
K_SHOT = 2                        # in-context examples per query
FIXED_EXAMPLES = False            # the same seeded examples for every query (their prefix cache is shared)
GLOBAL_K = 21                     # global tokens per image
LOCAL_TOKENS = False              # also give each image's local tokens (grid x grid LLM ids)
VARIANTS = ["image", "ceiling", "floor"]  # image: tokenizer words; ceiling: own reference caption; floor: none
MAX_NEW_TOKENS = 30               # longest caption in tokens
SEED = 0                          # example selection seed
BATCH_SIZE = "auto"               # prompts decoded together: auto (on a GPU the most its free memory holds, a divisor of CHUNK_SIZE; 8 on a CPU) or a number
CHUNK_SIZE = 64                   # images per saved chunk (resume unit; batches are cut inside a chunk: keep it a multiple of --batch_size)
PREFIX_CACHE = True               # run a batch's shared prompt prefix once (same captions, faster)
GALLERY = 12                      # images in gallery.png, evenly spaced over the queries (0: none)
DEVICE = "auto"                   # auto, cpu or cuda
TF32 = False                      # image words on a CUDA GPU: let fp32 matmuls and convolutions use TF32 (faster on Ampere and later; not the faithful numbers); a CPU ignores it
WORDS_AMP = "fp32"                # image words on a CUDA GPU: fp32 (faithful), or fp16 / bf16 autocast over the tokenizer (faster; a near-tie between codebook entries may flip); a CPU ignores it
NUM_WORKERS = 2                   # image loading workers
OUT_DIR = "out/eval_captioning"   # where results are written

settings = configure(globals())


def score(rows: dict, queries: list) -> dict:
    refs = {q.key: q.captions for q in queries}
    preds = {q.key: rows[q.key]["answer"] for q in queries}
    s = caption_scores(preds, refs)
    per = [s["per_key_cider"][q.key] for q in queries]
    return {"n": len(queries), "CIDEr-D": s["CIDEr-D"], "CIDEr-D_ci95": list(bootstrap_ci(per, SEED)),
            "BLEU-1": s["BLEU-1"], "BLEU-4": s["BLEU-4"],
            "empty": sum(not preds[k] for k in preds),
            "mean_prompt_tokens": sum(rows[q.key]["prompt_tokens"] for q in queries) / len(queries)}


def write_results(results: dict, rows: dict, queries: list) -> list[str]:
    out = Path(OUT_DIR)
    save_json(out / "results.json", {"variants": results, "skipped": SKIPPED})
    table = [[v, r["n"], f"{r['CIDEr-D']:.3f}",
              f"{r['CIDEr-D_ci95'][0]:.3f}-{r['CIDEr-D_ci95'][1]:.3f}", f"{r['BLEU-4']:.3f}",
              r["empty"]] for v, r in results.items()]
    files = ["results.json"] + write_table(
        out, ["variant", "n", "CIDEr-D", "CIDEr-D 95% CI", "BLEU-4", "empty"], table,
        note="skipped: " + "; ".join(f"{k} ({why})" for k, why in SKIPPED.items()))
    if GALLERY:
        show = spread(queries, GALLERY)
        texts = ["\n".join(f"{v}: {rows[v][q.key]['answer'] or '(empty)'}" for v in rows)
                 + f"\nreference: {q.captions[0]}" for q in show]
        save_text_gallery([q.path for q in show], texts, out / "gallery.png")
        files.append("gallery.png")
    return files


def main():
    require_pycocoevalcap()
    variants, _ = check_variants(VARIANTS, True, CAPTIONS_FILE)
    ddp = dist.init(DEVICE, OUT_DIR)
    queries, pool, fmt = load_captions(CAPTIONS_FILE, IMAGE_DIR or None, SPLIT, EXAMPLE_SPLIT)
    queries = spread(queries, MAX_IMAGES)
    picker = ExamplePicker(pool, K_SHOT, SEED, fixed=FIXED_EXAMPLES)
    used = [pool[i] for q in queries for i in picker(q)]
    check_images(queries + used, CAPTIONS_FILE, IMAGE_DIR or str(Path(CAPTIONS_FILE).parent))
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
        files = write_results(results, answers.rows, queries) + answers.files
    finish(EVAL_CAPTIONING, settings, out_dir=OUT_DIR, tokenizer_dir=TOKENIZER_DIR,
           variants=variants, files=files,
           info={"format": fmt, "variants": results, "skipped": SKIPPED}, answers=answers, ddp=ddp)

if __name__ == "__main__":
    run_main(main, EVAL_CAPTIONING, settings)
