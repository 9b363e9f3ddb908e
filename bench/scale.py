"""Every stage's inner step at the paper's shapes (random weights), and the whole stage's
projected time on this device.

Shapes: LLaMA-2-7B (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000) for the LLM
stages, open_clip's ViT-L-14 (random init) for CLIP, the paper's 75.2M tokenizer at 128 px
with LPIPS (random VGG16 trunk: same cost), the PatchGAN discriminator and CLIP for step 4,
and VoCo (models/voco.py, LoRA rank 8) on the LLaMA shape for step 5 and eval_compression;
LLaVA-1.5-7B (CLIP ViT-L/14-336 tower read at layer -2, the mlp2x_gelu projector, the LLaMA
shape as Vicuna-7B) for step 7 (frozen reader and the authors' fully trained one) and
eval_llava (full image tokens against cached VoCo blocks).
Each row runs the stage's own code (engine.greedy.BatchedGreedy, models.clip,
engine.train.train_step, engine.voco) for --iters iterations (fewer when --budget_s runs
out) and prints the shape, the rate, the peak memory and the projected time of the whole
stage at paper scale (the counts below, each with its source) on this device, one process.

On a GPU: full depth, the stage's precision (fp16 for steps 1-4 and the V2L evaluations,
bf16 for VoCo). On a CPU: the same code at --layers decoder/transformer layers (default 2)
and batch 1, in fp32; the projection is scaled to full depth, linearly in the layers (step 4:
only its CLIP part, timed apart), to the stage's batch size linearly, and marked so.
LLM prompt lengths are modelled from the prompt layouts (TOKENS_PER_WORD and the format
tokens below are estimates, not measured). See docs/performance_scale.md.

    python bench/scale.py                          # CPU: 2 layers, batch 1 (minutes)
    python bench/scale.py --device cuda            # one GPU: full depth (one 8-minute command)
    python bench/scale.py --tiny true --layers 1 --iters 1   # the test's setting
"""
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from utils.cli import configure, run_main  # noqa: E402
from utils.errors import V2LError  # noqa: E402
from utils.memory import llm_memory_bytes  # noqa: E402

DEVICE = "auto"  # auto (CUDA when available), cuda or cpu
LAYERS = 0  # decoder/transformer layers built (0: full depth on a GPU, 2 on a CPU); the projection scales to full depth
ITERS = 0  # timed iterations per stage, after one warm-up on a GPU (0: 10 on a GPU, 1 on a CPU)
BUDGET_S = 30.0  # a stage stops timing new iterations after this many seconds (at least one is timed)
STAGES: tuple[str, ...] = ("step1", "step2", "step3", "step4", "fewshot", "denoising", "captioning", "vqa", "step5", "eval_compression", "step7", "step7_trained", "eval_llava")  # rows to run
TINY = False  # tiny widths instead of the paper's (for the test; the projections then mean nothing)
CPU_BATCH = 1  # sequences (images, episodes) per iteration on a CPU; a GPU uses each stage's own batch
CPU_NEW_TOKENS = 4  # on a CPU, LLM rows time at most this many new tokens (the projection uses the time per step)
SEED = 0  # weights and inputs

settings = configure(globals())

# ----------------------------------------------------------------------------- paper scale
# Each count once, with its source.
IMAGENET_TRAIN = 1_281_167    # ImageNet-1k train images (V2L_SPEC; step 3's threshold 100/1281167)
IMAGENET_VAL = 50_000         # ImageNet-1k val images (docs/reproducing.md, evaluations)
LLAMA2_VOCAB = 32_000         # LLaMA-2's vocabulary: step 1 expands every id (V2L_SPEC, step 1)
STEP1_PROMPTS = 2 * LLAMA2_VOCAB   # two greedy passes, "a photo of {s1}" then "{s1 + s2}" (V2L_SPEC)
STEP1_BATCH = 128             # step1_expand_vocabulary.py BATCH_SIZE
STEP2_DISTINCT = 85_440       # distinct strings among the 3 x 32,000 candidates (docs/performance_scale.md)
STEP2_TEMPLATES = 80          # CLIP's ImageNet prompt templates (V2L_SPEC, step 2)
STEP2_BATCH = 32              # step2_codebook_embedding.py BATCH_SIZE (strings x 80 prompts)
STEP3_BATCH = 256             # step3_codebook_filtering.py BATCH_SIZE
STEP4_EPOCHS = 100            # V2L_SPEC: 100 epochs
STEP4_BATCH = 8               # V2L_SPEC: batch 8 per GPU (the authors' script)
FEWSHOT_EPISODES = 1000       # eval_understanding.py N_EPISODES per setting
FEWSHOT_GRID = [(n, k_shot, k) for n in (2, 5) for k_shot in (1, 3, 5) for k in (5, 21)]  # --sweep (V2L_SPEC)
FEWSHOT_CONDITIONS = 3        # image words, ceiling (names), floor (empty): REFERENCES true
FEWSHOT_NEW = 16              # eval_understanding.py MAX_NEW_TOKENS (an upper bound: names end sooner)
FEWSHOT_BATCH = 8             # eval_understanding.py BATCH_SIZE
DENOISE_IMAGES = 5000         # eval_denoising.py MAX_IMAGES (V2L_SPEC: first ~5,000 val images)
DENOISE_CALLS = {"window": 32 + 64, "cell": 3 * 128}  # LLM calls per image: in/outpainting (8x8 / 128 cells, 2 per call), the three others (256 cells, 2 per call)
DENOISE_BATCH = 64            # eval_denoising.py BATCH_SIZE
CAPTION_IMAGES = 5000         # eval_captioning.py MAX_IMAGES (Karpathy test)
CAPTION_NEW = 30              # eval_captioning.py MAX_NEW_TOKENS
VQA_QUESTIONS = 5400          # eval_vqa.py MAX_IMAGES 1000 x ~5.4 questions each
VQA_NEW = 10                  # eval_vqa.py MAX_NEW_TOKENS
OPEN_ENDED_VARIANTS = 3       # image, ceiling, floor (captioning and VQA VARIANTS)
OPEN_ENDED_BATCH = 8          # eval_captioning.py / eval_vqa.py BATCH_SIZE
VOCO_STEPS = 2000             # step5_train_voco.py STEPS
VOCO_BATCH = 8                # step5_train_voco.py BATCH_SIZE (episodes per step)
COMPRESSION_EPISODES = 1000   # eval_compression.py N_EPISODES
COMPRESSION_KS = 4            # eval_compression.py EVAL_KS (1, 2, 4, 8)
LLAVA_SAMPLES = 665_000       # LLaVA-1.5's instruction mix (llava_v1_5_mix665k.json, "665K")
LLAVA_EPOCHS = 2              # step7_train_llava_voco.py EPOCHS (the authors')
LLAVA_MICRO = 8               # step7_train_llava_voco.py MICRO_BATCH (the authors' per-device batch)
LLAVA_TRAINED_MICRO = 4       # the fully trained reader's micro-batch in this bench on a GPU (no activation checkpointing)
LLAVA_TRAIN_K = 2             # VoCo tokens while timing step 7 (the authors' k)
LLAVA_IMAGE_TOKENS = 576      # CLIP ViT-L/14-336: 24 x 24 patches, CLS dropped
LLAVA_GQA_QUESTIONS = 12_578  # GQA testdev-balanced, LLaVA's GQA file (docs/Evaluation.md)
LLAVA_EVAL_KS = 4             # eval_llava.py EVAL_KS (1, 2, 4, 8): lower and voco at each
LLAVA_EVAL_BATCH = 8          # eval_llava.py BATCH_SIZE
# estimates, not measured: tokens of a conversation after the image (system prompt included),
# of a benchmark prompt around the image, and of a short answer
LLAVA_TEXT_TOKENS = 256
LLAVA_PROMPT_TOKENS = 64
LLAVA_ANSWER_TOKENS = 3
# prompt-length model (estimates): LLM tokens per global word (a subword, bigram or trigram)
TOKENS_PER_WORD = 2.0
FORMAT_TOKENS = 8             # "###\nInput: < ... >\nOutput: " around one image
NAME_TOKENS = 4               # a class name
CAPTION_TOKENS = 14           # a reference caption
QUESTION_TOKENS = 12          # a VQA question and its answer
GLOBAL_K = 21                 # global words per image (the default k)

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=LLAMA2_VOCAB)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=LLAMA2_VOCAB)
CLIP_LAYERS = {"text": 12, "visual": 24}   # ViT-L/14's towers
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
CLIP_VISION_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)
TOKENIZER_TINY = dict(ch=32, num_res_blocks=1, z_channels=32, cross_heads=2, cross_head_dim=32,
                      global_topk=5)


@dataclass
class Row:
    stage: str
    shape: str
    rate: float
    unit: str
    peak_gib: float
    projected_s: float
    note: str


class Bench:
    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.layers = LAYERS or (32 if self.cuda else 2)
        self.iters = ITERS or (10 if self.cuda else 1)
        self.rng = random.Random(SEED)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2 ** 30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # the process so far (KiB on Linux)

    def timed(self, fn, iters: int = 0) -> tuple[float, int]:
        """(seconds per iteration, iterations) of fn(), after a warm-up call on a GPU, stopping
        early once BUDGET_S is spent."""
        if self.cuda:
            fn()
        self.sync()
        start, n = time.perf_counter(), 0
        while n < (iters or self.iters):
            fn()
            n += 1
            if time.perf_counter() - start > BUDGET_S:
                break
        self.sync()
        return (time.perf_counter() - start) / n, n

    def batch(self, stage_batch: int) -> int:
        return stage_batch if self.cuda else CPU_BATCH

    def depth_note(self, full: int, built: int) -> tuple[float, str]:
        if built >= full:
            return 1.0, "measured, full depth"
        return full / built, f"projected, {built} of {full} layers"


# ----------------------------------------------------------------------------- models

def build_llm(b: Bench, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = dict(LLAMA_TINY if TINY else LLAMA2_7B)
    full = shape["num_hidden_layers"]
    shape["num_hidden_layers"] = min(b.layers, full)
    config = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    with torch.device(b.device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, full


def build_clip(b: Bench):
    """(ClipBundle of a random ViT-L-14 with its towers cut to --layers, full depths)."""
    import open_clip
    from models.clip import ClipBundle
    from tiny_clip import TINY_CLIP_CFG
    torch.manual_seed(SEED)
    if TINY:
        model, full = open_clip.CLIP(**TINY_CLIP_CFG), {"text": 2, "visual": 4}
        size = TINY_CLIP_CFG["vision_cfg"]["image_size"]
    elif b.layers >= max(CLIP_LAYERS.values()):
        model, full = open_clip.create_model("ViT-L-14", pretrained=None), dict(CLIP_LAYERS)
        size = 224
    else:   # ViT-L-14's own config with fewer layers: the same model, cut before it is built
        cfg = open_clip.get_model_config("ViT-L-14")
        cfg["vision_cfg"]["layers"] = min(b.layers, CLIP_LAYERS["visual"])
        cfg["text_cfg"]["layers"] = min(b.layers, CLIP_LAYERS["text"])
        model, full, size = open_clip.CLIP(**cfg), dict(CLIP_LAYERS), cfg["vision_cfg"]["image_size"]
    built = {}
    for tower, blocks in (("text", model.transformer), ("visual", getattr(model.visual, "transformer", None))):
        if blocks is not None and hasattr(blocks, "resblocks"):
            keep = min(b.layers, len(blocks.resblocks))
            blocks.resblocks = blocks.resblocks[:keep]
            built[tower] = keep
        else:
            built[tower] = full[tower]
    model = model.to(b.device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-L-14")
    dim = model.text_projection.shape[-1]
    bundle = ClipBundle(model, tokenizer, size, open_clip.OPENAI_DATASET_MEAN,
                        open_clip.OPENAI_DATASET_STD, "bicubic", dim, "random:ViT-L-14")
    return bundle, full, built


def random_prompts(b: Bench, n: int, length: int, vocab: int, shared: int = 0) -> list[list[int]]:
    head = [1] + [b.rng.randrange(3, vocab) for _ in range(max(0, shared - 1))]
    return [(head + [b.rng.randrange(3, vocab) for _ in range(length - len(head))])[:length]
            for _ in range(n)]


# ----------------------------------------------------------------------------- LLM stages

def llm_workload(stage: str) -> tuple[list[tuple[int, int, int]], int, str]:
    """([(sequences, prompt tokens, new tokens)], the stage's batch, what it is)."""
    if stage == "step1":
        return [(STEP1_PROMPTS, 7, 1)], STEP1_BATCH, f"{STEP1_PROMPTS:,} prompts of ~7 tokens, 1 new"
    if stage == "fewshot":
        work = []
        for n_way, k_shot, k in FEWSHOT_GRID:
            images = n_way * k_shot + 1
            base = 12 + n_way * NAME_TOKENS + images * FORMAT_TOKENS + n_way * k_shot * NAME_TOKENS
            for words in (k * TOKENS_PER_WORD, NAME_TOKENS, 0):          # image, ceiling, floor
                work.append((FEWSHOT_EPISODES, int(base + images * words), FEWSHOT_NEW))
        return work, FEWSHOT_BATCH, (f"{len(FEWSHOT_GRID)} settings x {FEWSHOT_EPISODES} episodes x "
                                     f"{FEWSHOT_CONDITIONS} conditions")
    if stage == "denoising":
        header = 15
        window = header + 11 * (16 + 2 + FORMAT_TOKENS)
        cell = header + 11 * (2 + 2 + FORMAT_TOKENS)
        return ([(DENOISE_IMAGES * DENOISE_CALLS["window"], window, 2),
                 (DENOISE_IMAGES * DENOISE_CALLS["cell"], cell, 2)], DENOISE_BATCH,
                f"{DENOISE_IMAGES:,} images x 5 tasks, 2 tokens per call")
    image = GLOBAL_K * TOKENS_PER_WORD + FORMAT_TOKENS
    if stage == "captioning":
        p = int(10 + 3 * image + 2 * CAPTION_TOKENS)
        return ([(CAPTION_IMAGES * OPEN_ENDED_VARIANTS, p, CAPTION_NEW)], OPEN_ENDED_BATCH,
                f"{CAPTION_IMAGES:,} images x {OPEN_ENDED_VARIANTS} variants, 2-shot")
    if stage == "vqa":
        p = int(10 + 3 * (image + QUESTION_TOKENS))
        return ([(VQA_QUESTIONS * OPEN_ENDED_VARIANTS, p, VQA_NEW)], OPEN_ENDED_BATCH,
                f"{VQA_QUESTIONS:,} questions x {OPEN_ENDED_VARIANTS} variants, 2-shot")
    raise V2LError(f"--stages: unknown LLM stage {stage}")


class ForwardClock:
    """Times every forward pass of a model (synchronised). Greedy decoding without EOS runs
    its prefill passes (a shared prefix, the rest) and then exactly new - 1 decoding steps: the
    last new - 1 passes of a generate call are its steps."""

    def __init__(self, b: Bench, model):
        self.b, self.calls, self._start = b, [], 0.0
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        self.b.sync()
        self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        self.b.sync()
        self.calls.append(time.perf_counter() - self._start)

    def remove(self):
        for h in self.handles:
            h.remove()


def llm_row(b: Bench, stage: str, model, full_layers: int) -> Row:
    from engine.greedy import BatchedGreedy
    work, stage_batch, what = llm_workload(stage)
    n_seq = sum(c for c, _, _ in work)
    p = max(2, round(sum(c * pp for c, pp, _ in work) / n_seq))
    new = max(1, round(sum(c * nw for c, _, nw in work) / n_seq))
    batch = b.batch(stage_batch)
    timed_new = new if b.cuda else min(new, CPU_NEW_TOKENS)   # a step's time is a step's time
    vocab = model.config.vocab_size
    greedy = BatchedGreedy(model, pad_id=0, prefix_cache=True)
    prompts = random_prompts(b, batch, p, vocab)
    if b.cuda:
        greedy.generate(prompts, timed_new, eos_id=None)      # warm-up
    b.reset_peak()
    clock = ForwardClock(b, model)
    start, n = time.perf_counter(), 0
    steps: list[float] = []
    while n < b.iters:
        clock.calls.clear()
        greedy.generate(prompts, timed_new, eos_id=None)
        steps += clock.calls[len(clock.calls) - (timed_new - 1):] if timed_new > 1 else []
        n += 1
        if time.perf_counter() - start > BUDGET_S:
            break
    t_gen = (time.perf_counter() - start) / n
    clock.remove()
    peak = b.peak_gib()
    t_step = sum(steps) / len(steps) if steps else 0.0
    t_prefill = max(t_gen - t_step * len(steps) / n, 1e-9)
    prefill_tok_s = batch * p / t_prefill
    # the whole stage: every sequence's prompt at the measured prefill rate, its new tokens at
    # the measured time of a decoding step of a batch
    depth, note = b.depth_note(full_layers, model.config.num_hidden_layers)
    total_prompt = sum(c * pp for c, pp, _ in work)
    total_steps = sum(c * max(0, nw - 1) for c, _, nw in work) / batch
    projected = depth * (total_prompt / prefill_tok_s + total_steps * t_step)
    if batch != stage_batch:
        note += f"; batch {batch} (stage: {stage_batch})"
    if timed_new < new:
        note += f"; decoding timed over {timed_new} of {new} tokens"
    tok_s = batch * (p + timed_new) / t_gen
    dtype_bytes = next(model.parameters()).element_size()
    modelled = llm_memory_bytes(model.config, dtype_bytes, p, timed_new, batch) / 2 ** 30
    return Row(stage, f"{'tiny LLaMA' if TINY else 'LLaMA-2-7B'}, batch {batch} x {p} prompt + "
               f"{new} new tokens ({what}); prefill {prefill_tok_s:.0f} tok/s, step "
               f"{t_step * 1e3:.1f} ms; memory model {modelled:.2f} GiB", tok_s, "tok/s", peak,
               projected, note + f"; {n} iters")


# ----------------------------------------------------------------------------- CLIP stages

def step2_row(b: Bench, clip, full, built) -> Row:
    from models.clip import encode_text_templates
    batch = b.batch(STEP2_BATCH)
    words = ["cat", " dog", "ing", " golden retriever", " New York", "tion", " sky", " red car"]
    strings = iter(f"{words[i % len(words)]}{i}" for i in range(10 ** 6))
    b.reset_peak()
    t, n = b.timed(lambda: encode_text_templates(clip, [next(strings) for _ in range(batch)],
                                                 batch_size=batch, precision="auto"))
    rate = batch / t
    depth, note = b.depth_note(full["text"], built["text"])
    return Row("step2", f"ViT-L/14 text tower, {batch} strings x {STEP2_TEMPLATES} templates "
               f"(tokenizing included)", rate, "strings/s", b.peak_gib(),
               depth * STEP2_DISTINCT / rate, f"{note}; {n} iters")


def step3_row(b: Bench, clip, full, built) -> Row:
    from models.clip import autocast_context
    batch = b.batch(STEP3_BATCH)
    x = torch.randn(batch, 3, clip.image_size, clip.image_size, device=b.device)
    b.reset_peak()

    def step():
        with torch.no_grad(), autocast_context(b.device, "auto"):
            return clip.encode_images(x)
    t, n = b.timed(step)
    rate = batch / t
    depth, note = b.depth_note(full["visual"], built["visual"])
    return Row("step3", f"ViT-L/14 image tower at {clip.image_size} px, batch {batch} "
               "(decoding not included)", rate, "img/s", b.peak_gib(),
               depth * IMAGENET_TRAIN / rate, f"{note}; {n} iters")


def step4_row(b: Bench, clip, full, built) -> Row:
    from engine.train import TrainConfig, build_training, train_step
    from models import losses
    from models.tokenizer import TokenizerConfig, V2LTokenizer
    from utils import dist
    torch.manual_seed(SEED)
    v, m, arch = (64, 16, TOKENIZER_TINY) if TINY else (LLAMA2_VOCAB, 11908, {})
    dim = clip.embed_dim
    tokenizer = V2LTokenizer(TokenizerConfig(**arch), F.normalize(torch.randn(v, dim), dim=-1),
                             torch.arange(v), F.normalize(torch.randn(m, dim), dim=-1),
                             [f"w{i}" for i in range(m)], clip)
    n_params = sum(p.numel() for p in tokenizer.trainable_parameters())
    perceptual = None if TINY else losses.freeze(losses.lpips_random_trunk()).to(b.device)
    weights = losses.LossWeights(perceptual_weight=0.0 if TINY else 0.1, disc_start=0)
    ddp = dist.Dist(device=b.device)     # one process
    state = build_training(tokenizer, losses.GeneratorLoss(weights, perceptual),
                           losses.DiscriminatorLoss(), TrainConfig(amp="fp16"), ddp)
    batch = b.batch(STEP4_BATCH)
    g = torch.Generator().manual_seed(SEED)
    x128 = (torch.rand(batch, 3, 128, 128, generator=g) * 2 - 1).to(b.device)
    x_clip = torch.randn(batch, 3, clip.image_size, clip.image_size, generator=g).to(b.device)
    calls = []
    hook = clip.model.visual.register_forward_hook(lambda *a: calls.append(1))
    b.reset_peak()
    t, n = b.timed(lambda: train_step(state, x128, x_clip, lr=1e-5))
    hook.remove()
    clip_calls = len(calls) / (n + (1 if b.cuda else 0))
    peak = b.peak_gib()
    iterations = STEP4_EPOCHS * math.ceil(IMAGENET_TRAIN / STEP4_BATCH)
    if built["visual"] < full["visual"]:
        with torch.no_grad():
            t_clip, _ = b.timed(lambda: clip.encode_images(x_clip), iters=1)
        t_full = t + clip_calls * t_clip * (full["visual"] - built["visual"]) / built["visual"]
        note = f"projected, CLIP {built['visual']} of {full['visual']} layers"
    else:
        t_full, note = t, "measured, full depth"
    projected = iterations * t_full * STEP4_BATCH / batch
    if batch != STEP4_BATCH:
        note += f"; batch {batch} (stage: {STEP4_BATCH})"
    return Row("step4", f"tokenizer {n_params / 1e6:.1f}M at 128 px + LPIPS + GAN + CLIP, batch "
               f"{batch}, {clip_calls:.0f} CLIP forward(s)/it", 1 / t, "it/s", peak, projected,
               f"{note}; {n} iters")


# ----------------------------------------------------------------------------- VoCo stages

def voco_episodes(b: Bench, n: int, vocab: int):
    """(answered segment rows, prompts' rows, each image's word ids): 2-way 1-shot episodes."""
    from engine.voco import Slot
    ids = lambda k: [b.rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    image_tokens = int(GLOBAL_K * TOKENS_PER_WORD)
    images = {f"img{i}": ids(image_tokens) for i in range(3 * n)}
    names = [ids(NAME_TOKENS) for _ in range(2)]
    induction, before, after = ids(12 + 2 * NAME_TOKENS), ids(6), ids(4)
    rows, answered = [], []
    paths = sorted(images)
    for e in range(n):
        picks = paths[3 * e:3 * e + 3]
        segs, text = [], [1] + induction
        for j, path in enumerate(picks):
            segs += [text + before, Slot(path)]
            text = list(after) + (names[j % 2] if j < 2 else [])
        rows.append(segs + [text])
        answered.append(segs + [text + names[0] + [2]])
    return answered, rows, images


def step5_row(b: Bench, voco, full_layers: int) -> Row:
    from engine.voco import distill_loss
    batch = b.batch(VOCO_BATCH)
    answered, _, images = voco_episodes(b, batch, voco.llm.config.vocab_size)
    opt = torch.optim.AdamW(voco.trainable_parameters(), lr=1e-4)

    def step():
        total, count = distill_loss(voco, answered, images, 1)
        (total / max(count, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    b.reset_peak()
    t, n = b.timed(step)
    depth, note = b.depth_note(full_layers, voco.llm.config.num_hidden_layers)
    if batch != VOCO_BATCH:
        note += f"; batch {batch} (stage: {VOCO_BATCH})"
    return Row("step5", f"VoCo distillation step, {batch} 2-way 1-shot episodes, "
               f"{int(GLOBAL_K * TOKENS_PER_WORD)} tokens/image -> k=1", 1 / t, "steps/s",
               b.peak_gib(), depth * VOCO_STEPS * t * VOCO_BATCH / batch, f"{note}; {n} iters")


def compression_row(b: Bench, voco, full_layers: int) -> Row:
    from engine.voco import greedy, realize
    batch = b.batch(FEWSHOT_BATCH)
    _, rows, images = voco_episodes(b, batch, voco.llm.config.vocab_size)
    paths = sorted(images)

    def episode_batch():
        with torch.no_grad():
            blocks = dict(zip(paths, voco.compress([torch.tensor(images[p]) for p in paths], 1)))
            greedy(voco, [realize(r, "voco", blocks=blocks) for r in rows], FEWSHOT_NEW, None, None)
    b.reset_peak()
    t, n = b.timed(episode_batch)
    depth, note = b.depth_note(full_layers, voco.llm.config.num_hidden_layers)
    if batch != FEWSHOT_BATCH:
        note += f"; batch {batch} (stage: {FEWSHOT_BATCH})"
    projected = depth * COMPRESSION_KS * COMPRESSION_EPISODES / batch * t
    return Row("eval_compression", f"{batch} episodes: 3 images each compressed (k=1) + cached "
               f"reading, {FEWSHOT_NEW} new tokens", batch / t, "episodes/s", b.peak_gib(),
               projected, f"{note}; VoCo conditions only, {COMPRESSION_KS} k values; {n} iters")


# ----------------------------------------------------------------------------- LLaVA stages

def build_llava_vision(b: Bench):
    """(LLaVA's image path on a random CLIP ViT-L/14-336 cut to --layers + the mlp2x_gelu
    projector into the LLM's width, the tower's full depth)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from models.llava import VisionFeatures
    shape = dict(CLIP_VISION_TINY if TINY else CLIP_L_336)
    full = shape["num_hidden_layers"]
    shape["num_hidden_layers"] = min(b.layers, full) + 1      # layer -2 is read: one more is run
    torch.manual_seed(SEED)
    tower = CLIPVisionModel(CLIPVisionConfig(**shape)).to(b.device, torch.float16 if b.cuda else torch.float32)
    return VisionFeatures(tower.eval().requires_grad_(False)), full, shape["image_size"]


def llava_samples(b: Bench, voco, n: int, text: int) -> list:
    """n conversations in LLaVA's form around one image each: the VoCo's compression text,
    then ``text`` tokens of which every other one after the first is an answer token."""
    from data.llava import IGNORE_INDEX, LlavaSample
    vocab = voco.llm.config.vocab_size
    before = [voco.bos_id] + voco.context_ids
    out = []
    for i in range(n):
        after = [b.rng.randrange(3, vocab) for _ in range(text)]
        labels = [IGNORE_INDEX] + [t if j % 2 else IGNORE_INDEX for j, t in enumerate(after[1:])]
        out.append(LlavaSample(f"s{i}", "x.png", before, [IGNORE_INDEX] * len(before),
                               list(voco.suffix_ids), after, labels))
    return out


def step7_row(b: Bench, stage: str, voco, vision, projector, size: int, full: dict, built: dict) -> Row:
    """One optimiser step of step 7 on a micro-batch: the frozen tower, the projector (trained
    with the reader), VoCo's compression and the conversation's answer cross-entropy."""
    from engine.llava_voco import conversation_loss
    trained = stage == "step7_trained"
    micro = LLAVA_TRAINED_MICRO if trained else LLAVA_MICRO
    batch = b.batch(micro)
    samples = llava_samples(b, voco, batch, LLAVA_TEXT_TOKENS)
    pixels = torch.randn(batch, 3, size, size, device=b.device)
    from engine.llava_train import MasterWeights
    named = {"voco.embeddings": voco.embeddings}
    named |= {f"llm.{n}": p for n, p in voco.llm.named_parameters() if p.requires_grad}
    if trained:
        named |= {f"projector.{n}": p for n, p in projector.named_parameters()}
    masters = MasterWeights(named)     # float32 copies of bf16 weights that learn, as step 7 keeps
    opt = torch.optim.AdamW(list(masters.named.values()), lr=1e-5)

    def step():
        with torch.no_grad():
            feats = vision(pixels)
        with torch.set_grad_enabled(trained):
            emb = projector(feats.to(next(projector.parameters()).dtype)).to(voco.embeddings.device,
                                                                              voco.llm.dtype)
        loss, _ = conversation_loss(voco, samples, list(emb), LLAVA_TRAIN_K, "ce",
                                    "authors" if trained else "system")
        loss.backward()
        masters.take_grads()
        opt.step()
        masters.to_model()
        opt.zero_grad(set_to_none=True)
    b.reset_peak()
    t, n = b.timed(step)
    del opt, masters
    llm_depth, note = b.depth_note(full["llm"], built["llm"])
    # the tower runs without gradients: a small share, projected with the LLM's depth factor
    note += f"; tower {built['vision']} of {full['vision']} layers" if built["vision"] < full["vision"] else ""
    if batch != micro:
        note += f"; batch {batch} ({'on a GPU' if trained else 'stage'}: {micro})"
    projected = llm_depth * LLAVA_EPOCHS * LLAVA_SAMPLES / batch * t
    reader = "LLM + projector fully trained, authors' layout" if trained else "frozen reader (VoCo + LoRA), system layout"
    return Row(stage, f"{'tiny LLaVA' if TINY else 'LLaVA-1.5-7B'}, {batch} samples x ({LLAVA_IMAGE_TOKENS} image -> k={LLAVA_TRAIN_K} "
               f"+ {LLAVA_TEXT_TOKENS} text tokens), {reader}", batch / t, "samples/s", b.peak_gib(),
               projected, f"{note}; {LLAVA_EPOCHS} epochs of {LLAVA_SAMPLES:,}, one process; {n} iters")


def eval_llava_row(b: Bench, voco, vision, projector, size: int, full: dict, built: dict) -> Row:
    """A batch of questions answered reading the image's embeddings (the upper bound) and
    reading its cached VoCo block (k=1; the block made once per image, as eval_llava does)."""
    from engine.voco import greedy
    batch = b.batch(LLAVA_EVAL_BATCH)
    vocab = voco.llm.config.vocab_size
    before, between = [voco.bos_id] + voco.context_ids, list(voco.suffix_ids)
    questions = [[b.rng.randrange(3, vocab) for _ in range(LLAVA_PROMPT_TOKENS)] for _ in range(batch)]
    pixels = torch.randn(batch, 3, size, size, device=b.device)
    with torch.no_grad():
        emb = projector(vision(pixels).to(next(projector.parameters()).dtype)).to(voco.llm.dtype)

    def full_reading():
        with torch.no_grad():
            greedy(voco, [[before, e, between + q] for e, q in zip(emb, questions)],
                   LLAVA_ANSWER_TOKENS, None, None)

    def cached_reading():
        with torch.no_grad():
            blocks = voco.compress(list(emb), 1)
            greedy(voco, [[block, q] for block, q in zip(blocks, questions)], LLAVA_ANSWER_TOKENS, None, None)
    b.reset_peak()
    t_full, n = b.timed(full_reading)
    t_voco, _ = b.timed(cached_reading)
    depth, note = b.depth_note(full["llm"], built["llm"])
    if batch != LLAVA_EVAL_BATCH:
        note += f"; batch {batch} (stage: {LLAVA_EVAL_BATCH})"
    # GQA under eval_llava's conditions: upper and no image (taken as a full reading), lower and
    # voco at each k (a compression and a cached reading; no compression cache across k)
    per_batch = 2 * t_full + 2 * LLAVA_EVAL_KS * t_voco
    projected = depth * LLAVA_GQA_QUESTIONS / batch * per_batch
    return Row("eval_llava", f"{'tiny LLaVA' if TINY else 'LLaVA-1.5-7B'}, {batch} questions x ({LLAVA_IMAGE_TOKENS} image + "
               f"{LLAVA_PROMPT_TOKENS} prompt tokens), {LLAVA_ANSWER_TOKENS} new; full reading "
               f"{t_full * 1e3:.0f} ms, compressed + cached reading {t_voco * 1e3:.0f} ms per batch "
               f"({t_full / t_voco:.2f}x); rate: cached", batch / t_voco, "q/s", b.peak_gib(), projected,
               f"{note}; GQA testdev x (upper, no image, lower and voco at {LLAVA_EVAL_KS} k); {n} iters")


def llava_rows(b: Bench, model, full_layers: int, rows: dict) -> None:
    """step 7 (frozen reader, then the trained one) and eval_llava on one LLaVA-1.5 shape."""
    from models.llava import mlp2x_gelu
    from models.voco import VoCo
    vision, vision_full, size = build_llava_vision(b)
    torch.manual_seed(SEED)
    hidden = model.config.hidden_size
    projector = mlp2x_gelu(vision.width, hidden).to(b.device, model.dtype)
    full = {"llm": full_layers, "vision": vision_full}
    built = {"llm": model.config.num_hidden_layers, "vision": vision.tower.config.num_hidden_layers - 1}
    context = [b.rng.randrange(3, model.config.vocab_size) for _ in range(40)]  # system prompt + "USER:"
    stages = [s for s in ("step7", "eval_llava", "step7_trained") if s in STAGES]
    for stage in stages:
        trained = stage == "step7_trained"
        voco = VoCo(model, 8, lora_rank=0 if trained else 8, bos_id=1, seed=SEED, context_ids=context,
                    suffix_ids=[13], reader="adapted" if trained else "frozen")
        for p in (list(model.parameters()) + list(projector.parameters())) if trained else []:
            p.requires_grad_(True)
        rows[stage] = (eval_llava_row(b, voco, vision, projector, size, full, built) if stage == "eval_llava"
                       else step7_row(b, stage, voco, vision, projector, size, full, built))
        print_row(rows[stage])
        voco.remove()
        model.requires_grad_(False)
        projector.requires_grad_(False)


# ----------------------------------------------------------------------------- main

def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "nan"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def print_row(r: Row) -> None:
    print(f"{r.stage:<17} {r.rate:>11.4g} {r.unit:<10} {r.peak_gib:>8.2f} {hms(r.projected_s):>10}"
          f"  {r.shape} [{r.note}]", flush=True)


def main():
    from utils.dist import native_bf16  # noqa: F401  (the CPU precision rule, see docstring)
    device = torch.device("cuda" if DEVICE == "auto" and torch.cuda.is_available()
                          else ("cpu" if DEVICE == "auto" else DEVICE))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise V2LError("--device cuda: no CUDA device here; use --device cpu")
    unknown = set(STAGES) - {"step1", "step2", "step3", "step4", "fewshot", "denoising",
                             "captioning", "vqa", "step5", "eval_compression", "step7",
                             "step7_trained", "eval_llava"}
    if unknown:
        raise V2LError(f"--stages {' '.join(sorted(unknown))}: unknown stage(s)")
    b = Bench(device)
    if device.type == "cuda":     # TF32 as the stages leave it (off)
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu x{torch.get_num_threads()} threads"
    print(f"device {name}; layers built {b.layers}{' (tiny widths)' if TINY else ''}; "
          f"{b.iters} iters/stage, budget {BUDGET_S:g} s/stage")
    print(f"{'stage':<17} {'rate':>11} {'unit':<10} {'peak GiB':>8} {'whole stage':>10}  shape [how]")
    rows: dict[str, Row] = {}
    if {"step2", "step3", "step4"} & set(STAGES):
        clip, full, built = build_clip(b)
        for stage, fn in (("step2", step2_row), ("step3", step3_row), ("step4", step4_row)):
            if stage in STAGES:
                rows[stage] = fn(b, clip, full, built)
                print_row(rows[stage])
        del clip
    llm_stages = [s for s in ("step1", "fewshot", "denoising", "captioning", "vqa") if s in STAGES]
    voco_stages = [s for s in ("step5", "eval_compression") if s in STAGES]
    llava_stages = [s for s in ("step7", "step7_trained", "eval_llava") if s in STAGES]
    if llm_stages or voco_stages or llava_stages:
        half = torch.float16 if b.cuda else torch.float32
        model, full_layers = build_llm(b, half)
        from engine.greedy import BatchedGreedy       # one-time set-up costs out of the rows
        BatchedGreedy(model, pad_id=0).generate(random_prompts(b, 1, 4, 100), 2, eos_id=None)
        for stage in llm_stages:
            rows[stage] = llm_row(b, stage, model, full_layers)
            print_row(rows[stage])
        if voco_stages or llava_stages:
            from models.voco import VoCo
            if b.cuda:
                model.to(torch.bfloat16)     # VoCo's stages run bf16 (step5_train_voco.py LLM_DTYPE)
        if voco_stages:
            voco = VoCo(model, 8, lora_rank=8, bos_id=1, seed=SEED)
            for stage, fn in (("step5", step5_row), ("eval_compression", compression_row)):
                if stage in voco_stages:
                    rows[stage] = fn(b, voco, full_layers)
                    print_row(rows[stage])
            voco.remove()
        if llava_stages:
            llava_rows(b, model, full_layers, rows)
    keys = {"step4": "step4_it_s", "step3": "step3_img_s", "fewshot": "fewshot_tok_s",
            "step1": "step1_tok_s", "step2": "step2_str_s", "denoising": "denoising_tok_s",
            "captioning": "captioning_tok_s", "vqa": "vqa_tok_s", "step5": "step5_steps_s",
            "eval_compression": "compression_eps_s", "step7": "step7_samples_s",
            "step7_trained": "step7_trained_samples_s", "eval_llava": "llava_q_s"}
    parts = [f"device={device.type}", f"layers={b.layers}"]
    parts += [f"{keys[s]}={rows[s].rate:.4g}" for s in keys if s in rows]
    parts += [f"{s}_projected_h={rows[s].projected_s / 3600:.3g}" for s in keys if s in rows]
    print("bench scale: " + " ".join(parts))


if __name__ == "__main__":
    run_main(main)
