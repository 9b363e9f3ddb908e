"""Step-2 speed, two tables in one run.

Tokenizing: every prompt of every candidate string (80 templates each) through open_clip's
tokenizer (the old way) against ours (duplicates dropped, plain strings BPE-encoded once and
spliced into the templates, the rest prompt by prompt, in --workers processes), on a mix of
candidate-like strings with --dup_share duplicates and --non_ascii_share non-ASCII strings;
the token ids must be identical.

Embedding: batched prompts on a context cut to the batch's longest prompt (ours) against one
string at a time on the padded 77-token context (the straightforward way), same strings, same
weights; both average the 80 template embeddings.

The default CPU preset is a small random text tower (minutes at most); ``--preset vit-l-14``
builds a random ViT-L-14 (the paper's CLIP; speed does not depend on the weights) for GPU timing.

    python bench/bench_step2.py
    python bench/bench_step2.py --preset vit-l-14 --device cuda --n_strings 512 --batch_size 32
"""
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data.classes import imagenet_templates  # noqa: E402
from bench.common import VOCAB  # noqa: E402
from models.clip import (ClipBundle, autocast_context, encode_text_templates,  # noqa: E402
                         tokenize_templates)
from utils.cli import configure, run_main  # noqa: E402
from utils.errors import V2LError  # noqa: E402

PRESET = "small"  # small (CPU: width 256, 4 layers) or vit-l-14 (random ViT-L-14)
DEVICE = "cpu"  # cpu or cuda
N_STRINGS = 48  # candidate strings embedded by our batched path
N_NAIVE = 12  # of those, embedded one at a time by the naive path (its rate is per string)
BATCH_SIZE = 16  # strings per forward pass in our path
PRECISION = "fp32"  # fp32, fp16, bf16 or auto (mixed precision applies on CUDA only)
SEED = 0  # random weights
N_TOKENIZE = 1000  # candidate strings tokenized by both ways (x 80 templates)
DUP_SHARE = 0.11  # share of those strings that repeat an earlier one (step 2 on LLaMA-2's candidates)
NON_ASCII_SHARE = 0.25  # share that hold non-ASCII text (these go through the tokenizer whole)
WORKERS = 2  # tokenizing processes of ours
REPEATS = 2  # timings of each tokenizing way, interleaved; the best is reported

settings = configure(globals())

SMALL = {"embed_dim": 256,
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4,
                      "layers": 4}}
WORDS = ["cat", "golden retriever", "the", "ing", "New York", "sky", "a", "red car", "tree",
         "Ġhello", "photo of", "mountain bike", "x", "ocean wave", "pizza", "guitar"]


def candidate_strings(n: int, seed: int) -> list[str]:
    """Candidate-like strings: subwords (some word-initial, with their space), bigrams and
    trigrams of them, some non-ASCII, some repeated."""
    rng = random.Random(seed)
    pieces = VOCAB + ["ing", "ed", "s", "tion", "(", ").", "://", "'s", "42", "-", "un", "ly"]
    foreign = ["\u00e9t\u00e9", "\u4e2d\u6587", "\u0434\u043e\u043c", "\u00fcber", "caf\u00e9", "\u65e5"]
    out = []
    while len(out) < n:
        if out and rng.random() < DUP_SHARE:
            out.append(rng.choice(out))
            continue
        pool = foreign if rng.random() < NON_ASCII_SHARE else pieces
        words = [rng.choice(pool) for _ in range(rng.randint(1, 3))]
        out.append("".join((" " if rng.random() < 0.6 else "") + w for w in words))
    return out


def tokenize_table(tokenizer) -> tuple[float, float, float, bool]:
    """(old seconds, ours in one process, ours in WORKERS processes, identical) over N_TOKENIZE
    strings, the best of REPEATS each, the three ways taken in turns."""
    strings, templates = candidate_strings(N_TOKENIZE, SEED), list(imagenet_templates())
    n_t = len(templates)

    def ours(workers):
        first: dict[str, int] = {}
        inverse = torch.tensor([first.setdefault(s, len(first)) for s in strings])
        rows = (inverse[:, None] * n_t + torch.arange(n_t)).flatten()
        return tokenize_templates(tokenizer, list(first), templates, workers=workers)[rows]

    t_old = t_one = t_ours = float("inf")
    same = True
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        old = tokenizer([t.format(s) for s in strings for t in templates])
        t1 = time.perf_counter()
        one = ours(1)
        t2 = time.perf_counter()
        many = ours(WORKERS)
        t3 = time.perf_counter()
        t_old, t_one, t_ours = min(t_old, t1 - t0), min(t_one, t2 - t1), min(t_ours, t3 - t2)
        same = same and torch.equal(old, one) and torch.equal(old, many)
    return t_old, t_one, t_ours, same


def build(device: torch.device) -> ClipBundle:
    torch.manual_seed(SEED)
    if PRESET == "vit-l-14":
        model = open_clip.create_model("ViT-L-14", device=device)
        tokenizer = open_clip.get_tokenizer("ViT-L-14")
    elif PRESET == "small":
        model = open_clip.CLIP(**SMALL).to(device)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
    else:
        raise V2LError(f"--preset {PRESET}: expected small or vit-l-14")
    model.eval().requires_grad_(False)
    dim = model.text_projection.shape[-1]
    return ClipBundle(model, tokenizer, 224, (), (), "bicubic", dim, f"random:{PRESET}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def naive(bundle: ClipBundle, strings: list[str]) -> torch.Tensor:
    """One string per forward pass: its 80 prompts on the full padded context."""
    out = []
    for s in strings:
        tokens = bundle.clip_tokenizer([t.format(s) for t in imagenet_templates()]).to(bundle.device)
        with autocast_context(bundle.device, PRECISION):
            emb = bundle.model.encode_text(tokens)
        out.append(F.normalize(emb.float(), dim=-1).mean(0).cpu())
    return torch.stack(out)


def main():
    device = torch.device(DEVICE)
    bundle = build(device)
    t_old, t_one, t_tok, same = tokenize_table(bundle.clip_tokenizer)
    if not same:
        raise V2LError("bench step2: spliced token ids differ from the tokenizer's")
    strings = [WORDS[i % len(WORDS)] + ("" if i < len(WORDS) else f" {i}") for i in range(N_STRINGS)]
    encode_text_templates(bundle, strings[:BATCH_SIZE], batch_size=BATCH_SIZE, precision=PRECISION)
    sync(device)
    t0 = time.perf_counter()
    ours = encode_text_templates(bundle, strings, batch_size=BATCH_SIZE, precision=PRECISION)
    sync(device)
    t_ours = time.perf_counter() - t0
    naive(bundle, strings[:1])
    sync(device)
    t0 = time.perf_counter()
    ref = naive(bundle, strings[:N_NAIVE])
    sync(device)
    t_naive = time.perf_counter() - t0
    rate_ours, rate_naive = N_STRINGS / t_ours, N_NAIVE / t_naive
    maxdiff = (ours[:N_NAIVE] - ref).abs().max().item()
    n_prompts = N_TOKENIZE * len(imagenet_templates())
    print(f"tokenizing {N_TOKENIZE} strings x {len(imagenet_templates())} templates "
          f"({DUP_SHARE:.0%} repeated, {NON_ASCII_SHARE:.0%} non-ASCII), token ids identical: {same}")
    print(f"{'method':<52}{'seconds':>10}{'prompts/s':>12}")
    print(f"{'old: open_clip tokenizer, every prompt':<52}{t_old:>10.2f}{n_prompts / t_old:>12.0f}")
    print(f"{'ours: distinct, spliced, 1 process':<52}{t_one:>10.2f}{n_prompts / t_one:>12.0f}")
    print(f"{f'ours: distinct, spliced, {WORKERS} processes':<52}{t_tok:>10.2f}{n_prompts / t_tok:>12.0f}")
    print()
    print(f"preset {PRESET} on {device}, {len(imagenet_templates())} templates, {PRECISION}")
    print(f"{'method':<42}{'strings':>9}{'seconds':>10}{'strings/s':>12}")
    print(f"{'naive: 1 string/pass, padded to 77':<42}{N_NAIVE:>9}{t_naive:>10.2f}{rate_naive:>12.2f}")
    print(f"{f'ours: {BATCH_SIZE} strings/pass, cut to longest':<42}{N_STRINGS:>9}{t_ours:>10.2f}"
          f"{rate_ours:>12.2f}")
    print(f"bench step2: preset={PRESET} device={device.type} ours_strings_per_s={rate_ours:.2f} "
          f"naive_strings_per_s={rate_naive:.2f} tokenize_speedup_1proc={t_old / t_one:.2f} "
          f"tokenize_speedup={t_old / t_tok:.2f} "
          f"speedup={rate_ours / rate_naive:.2f} maxdiff={maxdiff:.2e}")


if __name__ == "__main__":
    run_main(main)
