"""Few-shot decoding speed: batched episodes with vs without the shared-prefix KV cache and
the forced name tails (once a name's first tokens single it out, its rest is appended without
forward passes), and the one-episode-at-a-time loop the authors run, on the same prompts.

Default: a tiny random Llama on CPU. ``--preset llama2-7b`` times a randomly
initialised LLaMA-2-7B-shaped model in fp16 on the GPU (no weights needed).
Prompts have the real layout (induction line, 2-way 1-shot, 5 words per
image, the same class pair in every episode so the shared prefix is the
induction line, as in one setting of the benchmark).
"""
import random
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine.fewshot import FewShotPrompter  # noqa: E402
from engine.greedy import BatchedGreedy  # noqa: E402
from bench.common import VOCAB, llama_and_tokenizer, timed  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402

PRESET = "tiny"          # tiny (CPU) or llama2-7b (GPU, fp16, random weights)
N_EPISODES = 32          # episodes timed per method
BATCH_SIZE = 8           # episodes per batch
K_SHOT = 1               # support images per class
WORDS = 5                # words per image
SEED = 0                 # prompt and weight seed

settings = configure(globals())

def episodes(text_tokenizer, n: int) -> tuple[list[list[int]], list]:
    rng = random.Random(SEED)
    prompter = FewShotPrompter(text_tokenizer, induction=True)
    names = ["golden retriever", "malamute"]
    words = lambda: "".join(rng.choice(VOCAB) for _ in range(WORDS))  # noqa: E731
    prompts = [prompter.build(names, [(words(), names[i % 2]) for i in range(2 * K_SHOT)],
                              words()).ids for _ in range(n)]
    return prompts, [prompter.constraint(names)] * n


def main():
    model, text_tokenizer = llama_and_tokenizer(PRESET, SEED)
    prompts, tries = episodes(text_tokenizer, N_EPISODES)
    eos = text_tokenizer.eos_token_id

    def batched(cache: bool, skip_forced: bool = True):
        greedy = BatchedGreedy(model, 0, prefix_cache=cache)
        out = []
        for i in range(0, len(prompts), BATCH_SIZE):
            out += greedy.generate(prompts[i:i + BATCH_SIZE], 16, tries[i:i + BATCH_SIZE],
                                   eos_id=eos, skip_forced=skip_forced)
        return out

    def one_by_one():   # the authors' loop: every step of every episode through the model
        greedy = BatchedGreedy(model, 0, prefix_cache=False)
        return [greedy.generate([p], 16, [t], eos_id=eos, skip_forced=False)[0]
                for p, t in zip(prompts, tries)]

    batched(True)                                   # warm-up
    rows = []
    for name, fn in (("one episode at a time", one_by_one),
                     ("batched", lambda: batched(False, False)),
                     ("+ prefix cache", lambda: batched(True, False)),
                     ("+ forced name tails", lambda: batched(True))):
        sec, out = timed(fn)
        rows.append((name, sec, out))
    ref = rows[0][2]
    print(f"{N_EPISODES} episodes, {len(prompts[0])}-token prompts, preset {PRESET}")
    print(f"{'method':<26}{'seconds':>10}{'episodes/s':>12}{'same answers':>14}")
    for name, sec, out in rows:
        print(f"{name:<26}{sec:>10.3f}{N_EPISODES / sec:>12.1f}{str(out == ref):>14}")
    base, nocache, cached, forced = (N_EPISODES / r[1] for r in rows)
    same = sum(a == b for a, b in zip(rows[3][2], ref)) / len(ref)
    print(f"bench fewshot: episodes_per_s={forced:.1f} prefix_cache={cached:.1f} no_cache={nocache:.1f} "
          f"one_by_one={base:.1f} same_answers={same:.2f} vs_one_by_one={forced / base:.2f} "
          f"speedup={forced / nocache:.2f}")


if __name__ == "__main__":
    run_main(main)
