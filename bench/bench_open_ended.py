"""Captioning / VQA decoding speed: where the shared-prefix KV cache pays.

With examples drawn per query (the default) a batch shares only "<bos>###\\nInput: < ",
so the prefix cache cannot help; with --fixed_examples every query of a batch
(of a question type) has the same K examples, and the whole example block is
computed once and reused by every batch. Timed here on the same prompts:
one query at a time, batched without and with the prefix cache, for both
example schemes; every method must give the same captions.

Default: a tiny random Llama on CPU. ``--preset llama2-7b`` times a randomly
initialised LLaMA-2-7B-shaped model in fp16 on the GPU (no weights needed).
"""
import random
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine.greedy import BatchedGreedy  # noqa: E402
from engine.open_ended import ImageWords, OpenEndedPrompter, Shot, generate  # noqa: E402
from bench.common import VOCAB, llama_and_tokenizer, timed  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402

PRESET = "tiny"          # tiny (CPU) or llama2-7b (GPU, fp16, random weights)
N_QUERIES = 32           # captions timed per method
BATCH_SIZE = 8           # queries per batch
K_SHOT = 4               # in-context examples per query
WORDS = 21               # global words per image
MAX_NEW_TOKENS = 20      # caption length cap
SEED = 0                 # prompt and weight seed

settings = configure(globals())

def prompts(prompter: OpenEndedPrompter, fixed: bool) -> list:
    rng = random.Random(SEED)
    words = lambda: ImageWords(" ".join(rng.choice(VOCAB) for _ in range(WORDS)))  # noqa: E731
    caption = lambda: "a " + " ".join(rng.choice(VOCAB) for _ in range(8)) + "."  # noqa: E731
    shared = [Shot(words(), None, caption()) for _ in range(K_SHOT)]
    jobs = []
    for i in range(N_QUERIES):
        shots = shared if fixed else [Shot(words(), None, caption()) for _ in range(K_SHOT)]
        jobs.append((str(i), prompter.build(shots + [Shot(words(), None, None)])))
    return jobs


def main():
    model, text_tokenizer = llama_and_tokenizer(PRESET, SEED)
    prompter = OpenEndedPrompter(text_tokenizer)

    def run(jobs, cache: bool, batch: int):
        greedy = BatchedGreedy(model, 0, prefix_cache=cache)
        return [a for _, _, a in generate(greedy, prompter, jobs, MAX_NEW_TOKENS, batch, "")]

    results = {}
    for fixed in (False, True):
        jobs = prompts(prompter, fixed)
        run(jobs[:BATCH_SIZE], True, BATCH_SIZE)                                   # warm-up
        for name, cache, batch in (("one at a time", False, 1), ("batched", False, BATCH_SIZE),
                                   ("batched + prefix cache", True, BATCH_SIZE)):
            results[(fixed, name)] = timed(lambda j=jobs, c=cache, b=batch: run(j, c, b))
        print(f"{'fixed' if fixed else 'per-query'} examples: {len(jobs[0][1].ids)}-token prompts")
    print(f"{'examples':<11}{'method':<26}{'seconds':>9}{'queries/s':>11}{'same captions':>15}")
    for (fixed, name), (sec, out) in results.items():
        same = out == results[(fixed, "one at a time")][1]
        print(f"{'fixed' if fixed else 'per-query':<11}{name:<26}{sec:>9.3f}{N_QUERIES / sec:>11.1f}"
              f"{str(same):>15}")
    qps = {k: N_QUERIES / v[0] for k, v in results.items()}
    same = all(results[(f, n)][1] == results[(f, "one at a time")][1] for f, n in results)
    print(f"bench open_ended: preset={PRESET} per_query_cache={qps[(False, 'batched + prefix cache')]:.1f}/s "
          f"per_query_no_cache={qps[(False, 'batched')]:.1f}/s "
          f"fixed_cache={qps[(True, 'batched + prefix cache')]:.1f}/s "
          f"fixed_no_cache={qps[(True, 'batched')]:.1f}/s one_by_one={qps[(True, 'one at a time')]:.1f}/s "
          f"same_captions={same} "
          f"speedup={qps[(True, 'batched + prefix cache')] / qps[(True, 'batched')]:.2f}")


if __name__ == "__main__":
    run_main(main)
