"""eval_llava's two ways of answering a benchmark's questions, in one run: full (every question
reads its image's embeddings uncompressed: LLaVA-1.5) vs cached (every image compressed once
into a k-position VoCo block, the block reused by every question on it), with
engine/llava_eval.py's ``run_chunk`` as eval_llava.py runs it.

A random LLaVA (CLIP-shaped vision tower at 336 px: 576 image tokens, mlp2x_gelu projector,
a LLaMA-architecture LLM) answers N_IMAGES images x QUESTIONS questions in LLaVA's vicuna_v1
prompt, greedy, ANSWER_TOKENS tokens each. images/s counts the compression in; the vision
tower and projector (the same for both ways) are left out. maxdiff: the cached prompt's
last-token logits against tests/voco_reference.py's single masked pass, in fp32.

Default: a small LLaMA-architecture LLM (8 layers, 256 wide) on CPU, fp32; ``--preset
smollm2-135m``: SmolLM2-135M's shape (slower); ``--preset llava-7b``: Vicuna-7B's shape and
CLIP ViT-L/14-336's tower in fp16 on a GPU.

    python bench/bench_llava_eval.py
    python bench/bench_llava_eval.py --preset llava-7b --batch_size 16
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.common import VOCAB, timed  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402

PRESET = "small"         # small (CPU fp32), smollm2-135m (CPU fp32, SmolLM2-135M's shape) or llava-7b (GPU fp16)
N_IMAGES = 4             # images
QUESTIONS = 6            # questions per image (GQA has about 30, POPE 18, MME 2)
ANSWER_TOKENS = 4        # greedy tokens per answer (the decoding runs exactly this many)
BATCH_SIZE = 8           # questions decoded together
K = 1                    # VoCo tokens per image
REPEATS = 2              # each timing's best of this many runs, the two ways taken in turns
SEED = 0                 # weights, images and questions

settings = configure(globals())


def build(tmp: Path):
    """A random LlavaParts (in memory) and its question list and image folder."""
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from models.llava import ImagePreprocess, LlavaParts, VisionFeatures, mlp2x_gelu
    from models.llm import LLM, llm_fingerprint
    from models.meta_llama import sentencepiece_tokenizer
    from tiny_llava import preprocessor_config
    from tiny_llm import make_sentencepiece_model
    torch.manual_seed(SEED)
    cuda = PRESET == "llava-7b"
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    tok = sentencepiece_tokenizer(Path(make_sentencepiece_model(tmp / "spm", 384, SEED)))
    shape = {"llava-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32),
             "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3),
             "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                           num_attention_heads=4, num_key_value_heads=2)}[PRESET]
    vision = (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16) if cuda else
              dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2))
    with torch.device(device):
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096,
                                          bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, **shape)).to(dtype).eval()
        tower = CLIPVisionModel(CLIPVisionConfig(image_size=336, patch_size=14, **vision)).to(dtype).eval()
        projector = mlp2x_gelu(vision["hidden_size"], shape["hidden_size"]).to(dtype)
    lm.set_attn_implementation("sdpa")
    for m in (lm, tower, projector):
        for p in m.parameters():
            p.requires_grad_(False)
    (tmp / "clip").mkdir()
    (tmp / "clip" / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(336)))
    parts = LlavaParts(VisionFeatures(tower), projector,
                       LLM(lm, tok, "bench", llm_fingerprint(tok), "hf"),
                       ImagePreprocess(tmp / "clip"), None, "bench")
    rng = np.random.RandomState(SEED)
    (tmp / "img").mkdir()
    questions = []
    for i in range(N_IMAGES):
        Image.fromarray((rng.rand(300, 400, 3) * 255).astype("uint8")).save(tmp / "img" / f"{i}.png")
        for j in range(QUESTIONS):
            words = " ".join(rng.choice(VOCAB, 6))
            questions.append({"question_id": f"{i}-{j}", "image": f"{i}.png",
                              "text": f"Is the {words}?\nAnswer the question using a single word or phrase."})
    return parts, questions


def main():
    from engine.llava_eval import LlavaPrompts, Work, group_questions, run_chunk
    from engine.llava_voco import voco_text
    from models.voco import VoCo
    from voco_reference import Image, single_pass
    tmp = Path(tempfile.mkdtemp())
    parts, questions = build(tmp)
    prompts = LlavaPrompts(parts.tokenizer, "system")
    text = voco_text(prompts.sample(questions[0], True), parts.tokenizer.bos_token_id)
    voco = VoCo(parts.llm, K, 8, 16.0, seed=SEED, **text)
    state = voco.adapter_state()
    eos = parts.tokenizer.eos_token_id
    parts.tokenizer.eos_token_id = None      # answers of exactly ANSWER_TOKENS tokens, both ways
    work = Work(parts, voco, prompts, questions, str(tmp / "img"), BATCH_SIZE, ANSWER_TOKENS,
                parts.device, None, {"lower": state, "voco": state})
    groups = group_questions(questions)
    best = {"upper": float("inf"), f"voco-k{K}": float("inf")}
    meta = {}
    for _ in range(REPEATS):
        for label in best:
            _, rows = timed(lambda: run_chunk(work, groups, [label])[label])
            m = rows[-1]["meta"]
            seconds = m["decode_s"] + m["compress_s"]
            if seconds < best[label]:
                best[label], meta[label] = seconds, m
    parts.tokenizer.eos_token_id = eos
    # maxdiff: the cached prompt against one masked pass (fp32, the same weights)
    voco_fp32 = voco if PRESET != "llava-7b" else None
    maxdiff = float("nan")
    if voco_fp32 is not None:
        q = questions[0]
        s = prompts.sample(q, True)
        from PIL import Image as PILImage
        emb = parts.embed_images(parts.preprocess([PILImage.open(tmp / "img" / q["image"])]))[0]
        with torch.no_grad():
            block = voco.compress([emb], K)[0]
            got = voco.prefill([[list(s.before), block, list(s.after)]])[0][0]
            want = single_pass(voco, [[list(s.before), Image(emb), list(s.after)]], K)[0][0, -1]
        maxdiff = float((got - want).abs().max())
    print(f"{PRESET}: {N_IMAGES} images x {QUESTIONS} questions, {meta['upper']['image_tokens']} "
          f"image tokens, {ANSWER_TOKENS} answer tokens, batch {BATCH_SIZE}, k={K}, best of {REPEATS}")
    print("| way | seconds | images/s | questions/s |")
    print("| --- | --- | --- | --- |")
    for label, name in (("upper", "full (image embeddings uncompressed)"),
                        (f"voco-k{K}", "cached (VoCo blocks, compression included)")):
        m = meta[label]
        print(f"| {name} | {best[label]:.2f} | {m['images'] / best[label]:.2f} | "
              f"{m['questions'] / best[label]:.2f} |")
    speedup = best["upper"] / best[f"voco-k{K}"]
    print(f"bench llava_eval: preset={PRESET} images={N_IMAGES} questions_per_image={QUESTIONS} "
          f"full_images_per_s={N_IMAGES / best['upper']:.3f} "
          f"cached_images_per_s={N_IMAGES / best[f'voco-k{K}']:.3f} speedup={speedup:.2f} "
          f"maxdiff={maxdiff:.2e}")


if __name__ == "__main__":
    run_main(main)
