"""Bench step 1: batched greedy next tokens vs the authors' one-prompt-at-a-time loop.

Same random Llama, same prompts ("<s> a photo of" + 1-4 tokens, as step 1's
subword and bigram prompts), same run. The batched way sorts prompts by
length, left-pads, and reuses the shared prefix's KV cache; the loop runs each
prompt alone. Reports prompts/s of each and whether the greedy tokens agree.

    python bench/bench_step1.py                                  # tiny Llama on CPU
    python bench/bench_step1.py --preset llama2-7b --device cuda # LLaMA-2-7B shape, random weights
"""
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent),
                str(Path(__file__).resolve().parent.parent / "tests")]

from tiny_llm import reference_next_tokens  # noqa: E402

from engine.greedy import greedy_next_tokens  # noqa: E402
from models.llm import resolve_dtype  # noqa: E402
from utils.cli import configure  # noqa: E402

PRESET = "tiny"  # model shape: tiny (hidden 64, 2 layers) or llama2-7b (random weights, needs a GPU)
N_PROMPTS = 384  # prompts timed with each method
BATCH_SIZE = 128  # prompts per forward pass for the batched method
DEVICE = "cpu"  # cpu or cuda
DTYPE = "auto"  # auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16
THREADS = 1  # CPU threads for torch (the machine may be shared)
SEED = 0  # seed for weights and prompts

settings = configure(globals())

SHAPES = {
    "tiny": dict(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    if PRESET not in SHAPES:
        raise SystemExit(f"--preset {PRESET!r} unknown; use one of {sorted(SHAPES)}")
    torch.manual_seed(SEED)
    dtype = resolve_dtype(DTYPE, DEVICE)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[PRESET], tie_word_embeddings=False))
    return model.to(dtype).eval()


def make_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(SEED)
    prefix = [1] + torch.randint(3, vocab, (3,), generator=g).tolist()  # like "<s> a photo of"
    lengths = torch.randint(1, 5, (N_PROMPTS,), generator=g)
    return [prefix + torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]


def timed(fn):
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main():
    torch.set_num_threads(THREADS)
    model = build_model()
    prompts = make_prompts(model.config.vocab_size)
    greedy_next_tokens(model, prompts[:8], BATCH_SIZE)  # warm-up
    ref, t_ref = timed(lambda: reference_next_tokens(model, prompts))
    rows = [("one prompt at a time (authors)", t_ref, ref)]
    for name, share in [("batched, left-padded", False), ("batched + shared-prefix KV cache", True)]:
        out, t = timed(lambda: greedy_next_tokens(model, prompts, BATCH_SIZE, share_prefix=share))
        rows.append((name, t, out))
    print(f"{'method':34s} {'seconds':>8s} {'prompts/s':>10s} {'same tokens':>12s}")
    for name, t, out in rows:
        print(f"{name:34s} {t:8.2f} {N_PROMPTS / t:10.1f} {float((out == ref).float().mean()):12.4f}")
    best = rows[-1]
    identical = all(torch.equal(out, ref) for _, _, out in rows)
    print(f"bench step1: preset={PRESET} device={DEVICE} prompts={N_PROMPTS} "
          f"loop_pps={N_PROMPTS / t_ref:.1f} batched_pps={N_PROMPTS / best[1]:.1f} "
          f"speedup={t_ref / best[1]:.1f} identical={str(identical).lower()}")


if __name__ == "__main__":
    main()
