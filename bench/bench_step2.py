"""Step-2 text embedding speed: batched prompts on a context cut to the batch's longest prompt
(ours) against one string at a time on the padded 77-token context (the straightforward way),
same strings, same weights; both average the 80 template embeddings.

The default CPU preset is a small random text tower (minutes at most); ``--preset vit-l-14``
builds a random ViT-L-14 (the paper's CLIP; speed does not depend on the weights) for GPU timing.

    python bench/bench_step2.py
    python bench/bench_step2.py --preset vit-l-14 --device cuda --n_strings 512 --batch_size 32
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data.classes import imagenet_templates  # noqa: E402
from models.clip import ClipBundle, autocast_context, encode_text_templates  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402
from utils.errors import V2LError  # noqa: E402

PRESET = "small"  # small (CPU: width 256, 4 layers) or vit-l-14 (random ViT-L-14)
DEVICE = "cpu"  # cpu or cuda
N_STRINGS = 48  # candidate strings embedded by our batched path
N_NAIVE = 12  # of those, embedded one at a time by the naive path (its rate is per string)
BATCH_SIZE = 16  # strings per forward pass in our path
PRECISION = "fp32"  # fp32, fp16, bf16 or auto (mixed precision applies on CUDA only)
SEED = 0  # random weights

settings = configure(globals())

SMALL = {"embed_dim": 256,
         "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4,
                      "layers": 4}}
WORDS = ["cat", "golden retriever", "the", "ing", "New York", "sky", "a", "red car", "tree",
         "Ġhello", "photo of", "mountain bike", "x", "ocean wave", "pizza", "guitar"]


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
    print(f"preset {PRESET} on {device}, {len(imagenet_templates())} templates, {PRECISION}")
    print(f"{'method':<42}{'strings':>9}{'seconds':>10}{'strings/s':>12}")
    print(f"{'naive: 1 string/pass, padded to 77':<42}{N_NAIVE:>9}{t_naive:>10.2f}{rate_naive:>12.2f}")
    print(f"{f'ours: {BATCH_SIZE} strings/pass, cut to longest':<42}{N_STRINGS:>9}{t_ours:>10.2f}"
          f"{rate_ours:>12.2f}")
    print(f"bench step2: preset={PRESET} device={device.type} ours_strings_per_s={rate_ours:.2f} "
          f"naive_strings_per_s={rate_naive:.2f} speedup={rate_ours / rate_naive:.2f} "
          f"maxdiff={maxdiff:.2e}")


if __name__ == "__main__":
    run_main(main)
