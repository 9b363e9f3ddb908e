"""The LLM stages per batch on a real LLM (the demo's stand-in by default), per precision.

Times, on the same prompts, with the LLM loaded in each of ``--dtypes`` (as loaded: a bf16
that the CPU does not compute natively is timed as such, to show what it costs):

- few-shot (the demo's layout: 2-way and 5-way 1-shot, two words per image, class names
  with spaces, the ceiling and floor references on): a batch's image, ceiling and floor
  prompts as three batches (the old way) and in one pass with each episode's induction
  line read once (``evaluate_episodes(merge_variants=True)``, what the stage runs);
- captioning and VQA (the demo's layout: 4 examples, 10 words per image, 30 / 10 new
  tokens): a batch of ``--batch_size`` prompts against ``--big_batch``.

Rows are interleaved and repeated ``--repeats`` times (the best time kept), so that other
load on the machine affects both ways; each row says whether its answers equal the old
way's. Per-batch seconds are for ``--batch_size`` episodes or queries.

    python bench/bench_llm_stages.py --llm out/demo/llm
    ATEN_CPU_CAPABILITY=avx2 python bench/bench_llm_stages.py --llm out/demo/llm   # no native bf16
"""
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from data.episodes import Episode  # noqa: E402
from engine.fewshot import FewShotPrompter, evaluate_episodes  # noqa: E402
from engine.greedy import BatchedGreedy  # noqa: E402
from engine.open_ended import ImageWords, OpenEndedPrompter, Shot, generate  # noqa: E402
from models.llm import cpu_native_bf16, load_llm  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402

LLM = "out/demo/llm"                  # the LLM directory (the demo's SmolLM2-135M stand-in)
DTYPES = ["fp32", "bf16"]             # precisions to load and time the LLM in
BATCH_SIZE = 16                       # episodes / queries per batch (the demo's few-shot batch)
BIG_BATCH = 32                        # captioning / VQA: the larger batch timed against BATCH_SIZE
N_BATCHES = 2                         # batches timed per row
REPEATS = 2                           # each row timed this many times, interleaved; the best kept
SEED = 0                              # prompt seed
STAGES = ["fewshot", "captioning", "vqa"]   # which stages to time
DEVICE = "cpu"                        # cpu or cuda

settings = configure(globals())

COLOURS = "red orange yellow green blue purple".split()
SHAPES = "circle square triangle star cross".split()


def fewshot_batches(n_way: int, rng: random.Random):
    """(episodes, words by image path) in the demo's layout: 1-shot, two words per image."""
    classes = [f"{c}_{s}" for c in COLOURS for s in SHAPES]
    episodes, words = [], {}
    for i in range(N_BATCHES * BATCH_SIZE):
        folders = rng.sample(classes, n_way)
        support = tuple((f"{i}/s{j}.png", f) for j, f in enumerate(folders))
        query = (f"{i}/q.png", rng.choice(folders))
        episodes.append(Episode(i, support, query))
        for path, f in support + (query,):
            pair = f.split("_") if rng.random() < 0.8 else [rng.choice(COLOURS), rng.choice(SHAPES)]
            words[path] = " ".join(" " + w for w in sorted(pair))
    return episodes, words


def open_ended_jobs(prompter: OpenEndedPrompter, vqa: bool, rng: random.Random):
    def words():
        return ImageWords("".join(" " + rng.choice(COLOURS + SHAPES) for _ in range(10)))

    def answer():
        return rng.choice(COLOURS) if vqa else f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)}."
    question = "What colour is the shape?" if vqa else None
    jobs = []
    for i in range(N_BATCHES * BIG_BATCH):
        shots = [Shot(words(), question, answer()) for _ in range(4)]
        jobs.append((str(i), prompter.build(shots + [Shot(words(), question, None)])))
    return jobs


def best(fn, runs: dict, name: str):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    sec = time.perf_counter() - start
    if name not in runs or sec < runs[name][0]:
        runs[name] = (sec, out)


def main():
    rng = random.Random(SEED)
    print(f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{cpu_native_bf16()}, {torch.get_num_threads()} threads, LLM {LLM}")
    rows, keys = [], {}
    for dtype in DTYPES:
        llm = load_llm(LLM, dtype=dtype, device=DEVICE)
        tok = llm.text_tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        greedy = BatchedGreedy(llm.model, pad)
        fs = FewShotPrompter(tok, induction=True)
        oe = OpenEndedPrompter(tok)
        cases = {}
        for way in (2, 5) if "fewshot" in STAGES else ():
            episodes, words = fewshot_batches(way, rng)
            for merged in (False, True):
                cases[(f"few-shot {way}-way", "3 batches" if not merged else "1 pass, groups")] = (
                    lambda e=episodes, w=words, m=merged: [
                        (r.prediction, r.references) for r in evaluate_episodes(
                            greedy, fs, e, w, 16, BATCH_SIZE, spaces=True, references=True,
                            merge_variants=m)])
        for stage, vqa, new in (("captioning", False, 30), ("VQA", True, 10)):
            if stage.lower() not in STAGES:
                continue
            jobs = open_ended_jobs(oe, vqa, rng)
            for b in (BATCH_SIZE, BIG_BATCH):
                cases[(stage, f"batch {b}")] = (
                    lambda j=jobs, b=b, n=new: [a for _, _, a in generate(greedy, oe, j, n, b)])
        evaluate_episodes(greedy, fs, *fewshot_batches(2, rng), 16, 2, spaces=True)  # warm-up
        runs: dict = {}
        for _ in range(REPEATS):
            for name, fn in cases.items():
                best(fn, runs, name)
                print(f"  {dtype} {name[0]}, {name[1]}: best {runs[name][0]:.2f} s so far",
                      flush=True)
        for (stage, way), (sec, out) in runs.items():
            first = next(v for k, v in runs.items() if k[0] == stage)
            n_items = len(out)
            per_batch = sec / n_items * BATCH_SIZE
            rows.append((dtype, stage, way, per_batch, out == first[1]))
            keys[(dtype, stage, way)] = per_batch
        del llm, greedy
    print(f"\n{'dtype':<6}{'stage':<16}{'way':<16}{'s per batch of ' + str(BATCH_SIZE):>20}"
          f"{'same answers':>14}")
    for dtype, stage, way, sec, same in rows:
        print(f"{dtype:<6}{stage:<16}{way:<16}{sec:>20.3f}{str(same):>14}")
    d = DTYPES[0]

    def ratio(stage, old, new):
        return f"{keys[(d, stage, old)] / keys[(d, stage, new)]:.2f}" if (d, stage, old) in keys \
            else "-"
    small, big = f"batch {BATCH_SIZE}", f"batch {BIG_BATCH}"
    same = all(r[4] for r in rows)
    extra = " ".join(f"{dt}_{st.split()[0].replace('-', '')}_s={sec:.2f}"
                     for (dt, st, way), sec in keys.items()
                     if way in ("1 pass, groups", small) and not st.endswith("5-way"))
    print(f"bench llm_stages: capability={torch.backends.cpu.get_cpu_capability()} dtype={d} "
          f"{extra} fewshot5_speedup={ratio('few-shot 5-way', '3 batches', '1 pass, groups')} "
          f"captioning_big_batch={ratio('captioning', small, big)} "
          f"vqa_big_batch={ratio('VQA', small, big)} same_answers={same} "
          f"speedup={ratio('few-shot 2-way', '3 batches', '1 pass, groups')}")


if __name__ == "__main__":
    run_main(main)
