"""Step 7's inputs: each step's conversations tokenised and images decoded and preprocessed as
LLaVA-1.5 does them (padded to a square, CLIP at 336 px) in the process that runs the step,
when it reads them (the former code: `--num_workers 0`), against DataLoader workers that
prepare the next steps while one runs (engine.llava_train.StepLoader). The device's share of
a step is stood in for by a wait of --compute_s seconds, which leaves the CPU to the workers
as a GPU-bound step does; both ways read the same steps, and the bench checks that they give
the same samples and pixels.

Both ways run in each round, in alternating order, and the best round of each is kept.

    python bench/bench_llava_loader.py
    python bench/bench_llava_loader.py --compute_s 1.0 --num_workers 4 --micro_batch 16
"""
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.cli import configure, run_main  # noqa: E402

N_IMAGES = 64  # JPEGs written, one conversation each
IMAGE_SIZE = (640, 480)  # width, height: COCO's most common size (LLaVA's images are mostly COCO's)
STEPS = 8  # steps timed
MICRO_BATCH = 16  # samples per step in this one process (the authors' per-device batch)
NUM_WORKERS = 2  # preparing processes (ours)
COMPUTE_S = 0.5  # seconds of device work a step stands for (a wait)
REPEATS = 2  # timed rounds (the best of each way is kept)
SEED = 0  # image content

settings = configure(globals())
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def write_data(root: Path, tokenizer_dir: str):
    from bench_loader import photo
    from data.llava import LlavaConversations
    rng = np.random.default_rng(SEED)
    (root / "img").mkdir(parents=True)
    entries = []
    for i in range(N_IMAGES):
        photo(rng, *IMAGE_SIZE).save(root / "img" / f"{i:05d}.jpg", quality=90)
        conv = [{"from": "human", "value": "<image>\nWhat is in the picture? Describe it."},
                {"from": "gpt", "value": "A picture with shapes and smooth colours, " * 4},
                {"from": "human", "value": "What colour is the largest shape?"},
                {"from": "gpt", "value": "It is hard to say."}]
        entries.append({"id": str(i), "image": f"{i:05d}.jpg", "conversations": conv})
    (root / "data.json").write_text(json.dumps(entries))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return LlavaConversations(root / "data.json", tokenizer, root / "img", "system", 2048, 576, 8)


def run(data, preprocess, workers: int) -> tuple[float, list]:
    from engine.llava_train import RunOrder, StepLoader, loader
    steps = StepLoader(data, preprocess, range(STEPS), RunOrder(len(data), MICRO_BATCH, SEED), 0, 1,
                       MICRO_BATCH, "frozen", "text", fill=False)
    got, start = [], time.perf_counter()
    for item in loader(steps, workers):
        time.sleep(COMPUTE_S)      # the device's share of the step
        got.append(item)
    return time.perf_counter() - start, got


def main():
    from models.llava import ImagePreprocess
    from tiny_llava import make_tiny_llava
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_tiny_llava(Path(tmp) / "llava")
        data = write_data(Path(tmp) / "data", paths["llava"])
        preprocess = ImagePreprocess.clip(336, OPENAI_MEAN, OPENAI_STD, pad=True)
        best = {"old": float("inf"), "ours": float("inf")}
        outputs = {}
        for r in range(REPEATS):
            for way in (("old", "ours") if r % 2 == 0 else ("ours", "old")):
                seconds, got = run(data, preprocess, 0 if way == "old" else NUM_WORKERS)
                best[way] = min(best[way], seconds)
                outputs[way] = got
        a, b = outputs["old"], outputs["ours"]
        same_samples = all([s.id for s in x.batches[0][0]] == [s.id for s in y.batches[0][0]]
                           and x.norms == y.norms for x, y in zip(a, b))
        maxdiff = max(float((x.batches[0][1] - y.batches[0][1]).abs().max()) for x, y in zip(a, b))
    wait = STEPS * COMPUTE_S
    print(f"{STEPS} steps x {MICRO_BATCH} conversations with {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEGs "
          f"-> 336 px, padded; device work stood in for by {COMPUTE_S:g} s a step")
    print(f"{'way':<44} {'seconds':>8} {'steps/s':>8} {'beyond the device':>18}")
    for way, label in (("old", "prepared when read (--num_workers 0)"),
                       ("ours", f"prepared ahead ({NUM_WORKERS} workers)")):
        print(f"{label:<44} {best[way]:>8.2f} {STEPS / best[way]:>8.2f} {best[way] - wait:>17.2f}s")
    print(f"same samples and normalisers: {same_samples}")
    print(f"bench llava_loader: steps={STEPS} micro_batch={MICRO_BATCH} workers={NUM_WORKERS} "
          f"compute_s={COMPUTE_S:g} old_s={best['old']:.2f} ours_s={best['ours']:.2f} "
          f"speedup={best['old'] / best['ours']:.2f} maxdiff={maxdiff:.3g}")


if __name__ == "__main__":
    run_main(main)
