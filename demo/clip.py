"""A tiny CLIP trained in CPU minutes on the demo world: the demo's stand-in for CLIP.

No pretrained CLIP weights can be had offline, so the demo trains one with
open_clip's own classes and real BPE tokenizer, contrastively, on captions of
generated images (``demo.world``). What makes it learn colour and shape
*words* (which is what the V2L global codebook needs) in a few minutes:

- a small ModifiedResNet vision tower (a ViT this small does not learn shapes
  in time);
- about half the captions name one attribute only ("red.", "a photo of a
  star."), the rest name both;
- random vocabulary words in random CLIP prompt templates as extra text
  negatives in every batch;
- a multi-positive InfoNCE loss: every caption consistent with an image (same
  colour and shape, or the one attribute it names) counts as a positive.

Training runs for a fixed wall-clock time (the learning rate follows a
half-cosine over that time) or a fixed number of steps.
"""
from __future__ import annotations

import math
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from tqdm import tqdm

from data.classes import imagenet_templates
from demo.world import COLOURS, SHAPES, classes, render_pool
from data.transforms import clip_normalize
from models.clip import ClipBundle, encode_text_templates, encode_text_truncated, save_open_clip_dir
from utils.errors import V2LError

DEMO_CLIP_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}
DEMO_PREPROCESS = {"size": 64, "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic"}
SAVED_FILES = ["open_clip_config.json", "open_clip_model.safetensors"]
BOTH_TEMPLATES = ("a photo of a {c} {s}.", "a {c} {s}.", "{c} {s}", "a picture of a {c} {s}.",
                  "a drawing of a {c} {s}.", "a {s} that is {c}.", "the {c} {s}.")
COLOUR_TEMPLATES = ("{c}.", "something {c}.", "a photo of something {c}.", "the colour {c}.",
                    "a {c} thing.")


def caption_batch(rng: np.random.Generator, c_idx, s_idx, colours, shapes,
                  p_single: float = 0.5) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """One caption per image; with probability p_single it names only the colour or the shape.

    Returns the captions and the colour / shape index each names (-1: not named).
    """
    templates = imagenet_templates()
    texts, cap_c, cap_s = [], [], []
    for c, s in zip(c_idx.tolist(), s_idx.tolist()):
        if rng.random() >= p_single:
            t = BOTH_TEMPLATES[rng.integers(len(BOTH_TEMPLATES))]
            texts.append(t.format(c=colours[c], s=shapes[s]))
            cap_c.append(c), cap_s.append(s)
        elif rng.random() < 0.5:
            t = COLOUR_TEMPLATES[rng.integers(len(COLOUR_TEMPLATES))]
            texts.append(t.format(c=colours[c]))
            cap_c.append(c), cap_s.append(-1)
        else:
            texts.append(templates[rng.integers(len(templates))].format(shapes[s]))
            cap_c.append(-1), cap_s.append(s)
    return texts, torch.tensor(cap_c), torch.tensor(cap_s)


def negative_captions(rng: np.random.Generator, words: list[str], n: int) -> list[str]:
    """n random vocabulary words, each in a random CLIP prompt template."""
    templates = imagenet_templates()
    return [templates[rng.integers(len(templates))].format(words[rng.integers(len(words))].strip())
            for _ in range(n)]


def consistency(img_c, img_s, cap_c, cap_s, n_negatives: int) -> torch.Tensor:
    """bool [B, T]: caption j says nothing false about image i (negatives fit no image)."""
    pos = (((cap_c[None] == -1) | (cap_c[None] == img_c[:, None]))
           & ((cap_s[None] == -1) | (cap_s[None] == img_s[:, None])))
    return torch.cat([pos, torch.zeros(len(img_c), n_negatives, dtype=torch.bool)], 1)


def multi_positive_infonce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every consistent pair is a positive.

    logits [B, T] (images x captions), pos bool [B, T]. Image -> text: the
    target is uniform over the image's positive captions. Text -> image: the
    same over each caption's positive images (captions with none, the
    negatives, only act as negatives for the images).
    """
    target = pos.float()
    i2t = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    has = pos.any(0)
    t_logits, t_target = logits.t()[has], target.t()[has]
    t2i = -(t_target / t_target.sum(1, keepdim=True) * F.log_softmax(t_logits, 1)).sum(1).mean()
    return (i2t + t2i) / 2


def train_demo_clip(words: list[str], seconds: float = 240.0, max_steps: int | None = None,
                    batch_size: int = 128, n_negatives: int = 64, pool_size: int = 20000,
                    lr: float = 1e-3, weight_decay: float = 0.05, warmup_steps: int = 20,
                    p_single: float = 0.5, seed: int = 0, model_cfg: dict = DEMO_CLIP_CFG,
                    colours=None, shapes=None, progress: bool = True, style: str = "textured"):
    """Train a tiny CLIP on the demo world. Stops at ``seconds`` or ``max_steps``, whichever first.

    words: the strings that serve as text negatives (class words are dropped). Pass every
    candidate the global codebook will hold (step 1's subwords, bigrams and trigrams): a string
    the text tower never saw lands anywhere, often near every image (a "hub").
    style: the demo world's style (``demo.world.STYLES``) the images are drawn in.
    Returns (model in eval mode, history dict with per-step losses and steps/time).
    """
    colours, shapes = list(colours or COLOURS), list(shapes or SHAPES)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    size = model_cfg["vision_cfg"]["image_size"]
    own = {w.lower() for w in colours + shapes}
    negatives = [w for w in words if w.strip() and w.strip().lower() not in own]
    if not negatives:
        raise V2LError("the demo CLIP needs vocabulary words other than the class words as "
                       "text negatives; pass a larger vocabulary (e.g. --vocab_first_ids 2000)")
    mean, std = DEMO_PREPROCESS["mean"], DEMO_PREPROCESS["std"]
    pool, pool_c, pool_s = render_pool(seed, pool_size, size, colours, shapes, progress, style)
    model = open_clip.CLIP(**model_cfg)
    model.train()
    # NHWC convolutions: the ResNet tower's steps run faster on a CPU (same maths)
    model.visual.to(memory_format=torch.channels_last)
    tokenize = SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, foreach=True)
    losses, step, start = [], 0, time.perf_counter()
    bar = tqdm(total=max_steps, desc="demo CLIP", disable=not progress, mininterval=5)
    while True:
        elapsed = time.perf_counter() - start
        frac = step / max_steps if max_steps else elapsed / seconds
        if frac >= 1 or (max_steps and elapsed >= seconds):
            break
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * frac))
        pick = torch.from_numpy(rng.integers(pool_size, size=batch_size))
        img_c, img_s = pool_c[pick], pool_s[pick]
        texts, cap_c, cap_s = caption_batch(rng, img_c, img_s, colours, shapes, p_single)
        texts += negative_captions(rng, negatives, n_negatives)
        x = clip_normalize(pool[pick].float() / 255, mean, std).contiguous(
            memory_format=torch.channels_last)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(encode_text_truncated(model, tokenize(texts)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
        loss = multi_positive_infonce(logits, consistency(img_c, img_s, cap_c, cap_s, n_negatives))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.visual.to(memory_format=torch.contiguous_format)
    model.eval()
    return model, {"losses": losses, "steps": step, "seconds": time.perf_counter() - start}


def save_demo_clip(model, out_dir, model_cfg: dict = DEMO_CLIP_CFG) -> None:
    """Save as an open_clip model directory (SAVED_FILES) that ``models.clip.load_clip`` reads."""
    size = model_cfg["vision_cfg"]["image_size"]
    save_open_clip_dir(model, model_cfg, out_dir, DEMO_PREPROCESS | {"size": size})


@torch.no_grad()
def evaluate_demo_clip(clip: ClipBundle, words: list[str], n_images: int = 600, seed: int = 1,
                       n_templates: int = 80, colours=None, shapes=None,
                       style: str = "textured") -> dict:
    """How well a (loaded) CLIP names fresh demo images, with text embedded as the codebook
    step does (mean over prompt templates of normalised embeddings).

    - zero_shot_acc: the nearest class prompt ("red circle", ...) is the true class;
    - top5_both: the true colour word and shape word are both among the 5 nearest strings
      of the lookup (``words`` plus the class words, deduplicated after stripping/lowercasing);
    - top2_exact: the 2 nearest strings are exactly those two words.
    """
    colours, shapes = list(colours or COLOURS), list(shapes or SHAPES)
    templates = imagenet_templates()[:n_templates]
    images, c_idx, s_idx = render_pool(seed, n_images, clip.image_size, colours, shapes,
                                       progress=False, style=style)
    img = clip.encode_images(clip_normalize(images.float() / 255, clip.mean, clip.std))
    cls_emb = encode_text_templates(clip, [f"{c} {s}" for c, s in classes(colours, shapes)],
                                    templates)
    pred = (img @ cls_emb.t()).argmax(1)
    truth = c_idx * len(shapes) + s_idx
    lookup = list(dict.fromkeys(w.strip().lower() for w in list(words) + colours + shapes
                                if w.strip()))
    top = (img @ encode_text_templates(clip, lookup, templates).t()).topk(5, dim=1).indices
    top5_both = top2_exact = 0
    for k in range(n_images):
        want = {colours[c_idx[k]], shapes[s_idx[k]]}
        got = [lookup[j] for j in top[k].tolist()]
        top5_both += want <= set(got)
        top2_exact += want == set(got[:2])
    return {"zero_shot_acc": (pred == truth).float().mean().item(),
            "top5_both": top5_both / n_images, "top2_exact": top2_exact / n_images,
            "lookup_size": len(lookup), "n_images": n_images, "n_templates": len(templates)}
