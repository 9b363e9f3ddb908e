"""The demo's tiny LLaVA: the demo CLIP's feature grid, an mlp2x_gelu projector, the stand-in LLM.

LLaVA-1.5 reads an image as the patch features of its CLIP ViT's layer -2 (576 of them at
336 px) through an mlp2x_gelu projector into Vicuna. The demo CLIP (``demo.clip``) is a small
ModifiedResNet at 64 px: no patches, but feature maps (``layer3``: 256 channels on a 4 x 4
grid, ``layer4``: 512 on 2 x 2, then attention pooling into the joint space). Its vision part
here (``ClipGrid``) reads the maps of ``LAYERS`` on a ``GRID`` x ``GRID`` grid (a smaller map
repeated over the cells it covers, a larger one average-pooled), concatenated over channels
as LLaVA does for several feature layers: with the defaults 16 image tokens of 768 channels,
the 4 x 4 cell of ``layer3`` and the 2 x 2 quadrant of ``layer4`` it lies in. The image
preprocessing is LLaVA's (``models.llava.ImagePreprocess``: padded to a square in CLIP's
mean colour, then CLIP's resize, crop and normalisation at the demo CLIP's 64 px).

The projector is trained as LLaVA's stage 1 (``train_projector``): the LLM and the vision
tower frozen, only the projector learning, cross-entropy on the answer tokens of the caption
data (``demo.llava_world``'s ``pretrain.json``) in LLaVA's ``plain`` template (the image, then
the caption and "\\n"; the request is not read). ``INSTRUCT_STEPS`` more steps on the
instruction data (vicuna_v1, ``data.llava``) may follow with the LLM still frozen: the
demo's stand-in for LLaVA's stage 2 (which fine-tunes the LLM as well; see
docs/demo_llava.md for why and what each gives).

The projector is saved as LLaVA's ``mm_projector.bin`` (keys ``model.mm_projector.{0,2}.*``),
read back by ``models.llava.read_projector`` and checked by ``check_projector`` as a user's
file is; ``load_demo_llava`` assembles the ``models.llava.LlavaParts`` every LLaVA stage takes.

    python -m demo.llava --out_dir out/demo                 # data, then the projector
    python -m demo.llava --out_dir out/demo --parts bounds  # upper bound and no image, scored
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data.llava import IGNORE_INDEX, ConversationEncoder, LlavaConversations, LlavaSample
from models.llava import (ImagePreprocess, LlavaParts, check_projector, mlp2x_gelu,
                          read_projector, PROJECTOR_PREFIX)
from utils.artifacts import (atomic_dir, is_complete, read_checkpoint, read_manifest, save_json,
                             write_checkpoint, write_manifest)
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.stages import DEMO_LLAVA_DATA, DEMO_LLAVA_PROJECTOR

OUT_DIR = "out/demo"  # the demo folder: llm/ and clip/ are read from it, llava_data/ and llava_projector/ written
LLM_DIR = ""  # the stand-in LLM (empty: OUT_DIR/llm)
CLIP_DIR = ""  # the demo CLIP (empty: OUT_DIR/clip)
PARTS = "data,projector"  # what to make: data (the LLaVA-format world), projector (stage 1), bounds (upper vs no image)
SEED = 0  # seed of the data and of the projector's initialisation and batches
N_PRETRAIN = 1200  # caption images (stage 1)
N_INSTRUCT = 1200  # instruction images (2-4 question rounds each)
N_EVAL = 120  # evaluation images: one question of each of the 4 types on each
IMAGE_SIZE = 128  # side of the generated images in pixels
WORLD_STYLE = "smooth"  # backgrounds as demo/setup.py's world: "smooth" (plain or gradient) or "textured"
LAYERS = "layer3,layer4"  # the demo CLIP's feature maps read, concatenated over channels
GRID = 4  # image tokens per side: GRID x GRID tokens per image
STEPS = 150  # stage-1 steps (the projector alone, the LLM frozen) on the captions
INSTRUCT_STEPS = 100  # further projector-only steps on the instruction data (vicuna_v1), the LLM frozen: they teach the bare answers
BATCH_SIZE = 8  # conversations per step
LR = 2e-3  # AdamW peak learning rate (LLaVA's stage 1: 1e-3 at batch 256), cosine after the warm-up
WARMUP = 0.03  # warm-up fraction of the steps (LLaVA's)
WEIGHT_DECAY = 0.0  # LLaVA's stage 1: none
LLM_DTYPE = "auto"  # the frozen LLM's dtype: auto (fp32 on a CPU), fp32, bf16 (where the CPU computes it natively)
SAVE_EVERY = 50  # steps between resume checkpoints
EVAL_BATCH = 32  # questions per greedy batch (bounds)
MAX_NEW_TOKENS = 8  # greedy answer length (bounds)

settings = configure(globals())

DATA_STAGE = DEMO_LLAVA_DATA
PROJECTOR_STAGE = DEMO_LLAVA_PROJECTOR
PROJECTOR_FILE = "mm_projector.bin"
READING_FILE = "demo_llava.json"      # how the vision part reads the CLIP (layers, grid)


# ----------------------------------------------------------------------------- the vision part

class ClipGrid(nn.Module):
    """The demo CLIP's ModifiedResNet read as a ``grid`` x ``grid`` grid of features: the maps of
    ``layers`` (names of its stages), each brought to the grid (nearest when smaller, average
    pooling when larger) and concatenated over channels; [B, grid * grid, width], row-major."""

    def __init__(self, visual: nn.Module, layers=("layer3", "layer4"), grid: int = 4):
        super().__init__()
        names = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(visual, n)]
        if not names or not hasattr(visual, "stem"):
            raise V2LError(f"the demo LLaVA reads a ModifiedResNet CLIP's feature maps; this vision "
                           f"tower is a {type(visual).__name__}")
        layers = [layers] if isinstance(layers, str) else list(layers)
        bad = [n for n in layers if n not in names]
        if bad or not layers:
            raise V2LError(f"--layers {','.join(layers)}: expected names among {', '.join(names)}")
        if int(grid) < 1:
            raise V2LError(f"--grid {grid}: must be at least 1")
        self.visual, self.layers, self.grid = visual, layers, int(grid)
        self._stages = names[:max(names.index(n) for n in layers) + 1]
        self._width = sum(self._channels(visual, n) for n in layers)

    @staticmethod
    def _channels(visual, name: str) -> int:
        block = getattr(visual, name)[-1]
        last = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        return last.num_features

    @property
    def width(self) -> int:
        return self._width

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(next(self.visual.parameters()).device, self.dtype)
        x = self.visual.stem(x)
        maps = {}
        for name in self._stages:
            x = getattr(self.visual, name)(x)
            maps[name] = x
        out = []
        for name in self.layers:
            m = maps[name]
            if m.shape[-1] >= self.grid:
                m = F.adaptive_avg_pool2d(m, self.grid)
            else:
                m = F.interpolate(m, size=(self.grid, self.grid), mode="nearest")
            out.append(m.flatten(2).transpose(1, 2))
        return torch.cat(out, -1)


def preprocessor_config(clip) -> dict:
    """A CLIPImageProcessor configuration for the demo CLIP (its size, mean, std, bicubic), so
    ``models.llava.ImagePreprocess`` prepares its images as LLaVA prepares CLIP's."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "do_center_crop": True,
            "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "size": {"shortest_edge": clip.image_size},
            "crop_size": {"height": clip.image_size, "width": clip.image_size},
            "image_mean": list(clip.mean), "image_std": list(clip.std), "resample": 3,
            "rescale_factor": 1 / 255}


def load_vision(clip_dir, layers, grid: int, device="cpu") -> tuple[ClipGrid, object]:
    """The frozen demo CLIP read as a grid (``ClipGrid``) and its ``ClipBundle``."""
    from models.clip import load_clip
    clip = load_clip(str(clip_dir), device=device)
    vision = ClipGrid(clip.model.visual, layers, grid).eval()
    return vision, clip


def load_demo_llava(projector_dir, llm_dir, clip_dir, dtype=None, device="cpu",
                    attn: str = "sdpa") -> LlavaParts:
    """The demo LLaVA as ``models.llava.LlavaParts`` (frozen): the demo CLIP read as
    ``projector_dir``'s ``demo_llava.json`` says, the projector from its ``mm_projector.bin``
    (``models.llava.read_projector`` / ``check_projector``), the LLM from ``llm_dir``."""
    from models.llm import load_llm, resolve_dtype
    projector_dir = Path(projector_dir)
    reading_file = projector_dir / READING_FILE
    if not reading_file.is_file():
        raise V2LError(f"{projector_dir}: no {READING_FILE} (how the demo CLIP is read); give the "
                       "folder demo.llava wrote the projector into")
    reading = json.loads(reading_file.read_text())
    state = read_projector(projector_dir / PROJECTOR_FILE)
    vision, _ = load_vision(clip_dir, reading["layers"], reading["grid"], device)
    language = load_llm(str(llm_dir), dtype=dtype, device=device)
    language.model.set_attn_implementation(attn)
    hidden = language.model.config.hidden_size
    check_projector(state, vision.width, hidden, projector_dir / PROJECTOR_FILE)
    torch_dtype = resolve_dtype(dtype, device)
    projector = mlp2x_gelu(vision.width, hidden)
    projector.load_state_dict(state)
    projector = projector.to(device, torch_dtype)
    vision = vision.to(device, torch_dtype)
    for module in (vision, projector, language.model):
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    return LlavaParts(vision, projector, language, ImagePreprocess(projector_dir), None,
                      f"demo-llava:{language.ident}+{clip_dir}+{projector_dir}")


def save_projector(projector: nn.Module, path) -> None:
    """``projector``'s weights as LLaVA's mm_projector.bin (``model.mm_projector.{0,2}.*``)."""
    from utils.artifacts import atomic_path
    state = {PROJECTOR_PREFIX + k: v.detach().to("cpu", torch.float32).clone()
             for k, v in projector.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# ----------------------------------------------------------------------------- samples

def plain_sample(encoder: ConversationEncoder, sample_id: str, image: str, caption: str) -> LlavaSample:
    """LLaVA's ``plain`` template (stage 1): the image, then the caption and "\\n", all of the
    caption and the "\\n" labelled; BOS first as in ``data.llava``'s samples."""
    ids = encoder._fresh(caption + "\n")
    return LlavaSample(str(sample_id), image, list(encoder.bos), [IGNORE_INDEX] * len(encoder.bos),
                       [], ids, list(ids))


def caption_samples(path, tokenizer, image_folder) -> list[LlavaSample]:
    """The stage-1 caption file (LLaVA's pretrain layout) as plain-template samples; it is read
    and checked by ``data.llava.LlavaConversations`` first (images missing: skipped, counted)."""
    data = LlavaConversations(path, tokenizer, image_folder, layout="system")
    encoder = data.encoder
    out = []
    for sample_id, image, turns in data.items:
        if image is None or len(turns) < 2:
            raise V2LError(f"{path}: entry {sample_id}: a caption entry needs an image and an answer")
        out.append(plain_sample(encoder, sample_id, image, turns[1]))
    if data.missing:
        print(f"note: {path}: {len(data.missing)} entries skipped, their image is not in {image_folder}")
    return out


def image_features(vision: ClipGrid, preprocess: ImagePreprocess, folder, names: list[str],
                   batch: int = 64) -> dict[str, torch.Tensor]:
    """Each image's grid features (float32, CPU): the frozen vision part runs once per image."""
    from PIL import Image
    out = {}
    with torch.no_grad():
        for a in range(0, len(names), batch):
            chunk = names[a:a + batch]
            images = []
            for name in chunk:
                with Image.open(Path(folder) / name) as im:
                    images.append(im.convert("RGB"))
            feats = vision(preprocess(images)).float().cpu()
            out.update(zip(chunk, feats))
    return out


# ----------------------------------------------------------------------------- training

def batch_loss(llm, projector: nn.Module, samples: list[LlavaSample], feats: list[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a batch of samples (LLaVA's loss): each
    sample's text embedded, its image's projected features spliced at its slot, right-padded."""
    table = llm.get_input_embeddings()
    dtype, device = table.weight.dtype, table.weight.device
    images = projector(torch.stack(feats).to(device, next(projector.parameters()).dtype)).to(dtype)
    rows, labels = [], []
    for s, img in zip(samples, images):
        def emb(ids):
            return table(torch.as_tensor(ids, dtype=torch.long, device=device))
        rows.append(torch.cat([emb(s.before), img, emb(s.between), emb(s.after)]))
        labels.append(s.before_labels + [IGNORE_INDEX] * (len(img) + len(s.between)) + s.after_labels)
    length = max(len(r) for r in rows)
    x = torch.stack([F.pad(r, (0, 0, 0, length - len(r))) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=device)
    y = torch.tensor([lab + [IGNORE_INDEX] * (length - len(lab)) for lab in labels], device=device)
    hidden = llm.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    target = y[:, 1:]
    keep = target != IGNORE_INDEX
    logits = llm.lm_head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, target[keep])


def lr_at(step: int, steps: int, lr: float, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine to 0 (LLaVA's schedule)."""
    w = max(1, math.ceil(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    return lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def train_projector(llm, projector: nn.Module, phases: list[tuple[list[LlavaSample], int]],
                    feats: dict[str, torch.Tensor], batch_size: int, lr: float, warmup: float,
                    weight_decay: float = 0.0, seed: int = 0, checkpoint=None, key: dict | None = None,
                    save_every: int = 0, log_every: int = 25) -> dict:
    """Train ``projector`` alone (the LLM frozen) on ``phases``: (samples, steps) run one after
    the other under one warm-up + cosine schedule over all their steps; each step draws
    ``batch_size`` samples (a seeded shuffle, epoch after epoch). With ``checkpoint`` the
    state is saved every ``save_every`` steps and a run resumes from it.
    Returns {"losses": per step, "seconds"}."""
    for p in llm.parameters():
        p.requires_grad_(False)
    projector.train()
    opt = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=weight_decay)
    total = sum(n for _, n in phases)
    losses: list[float] = []
    gen = torch.Generator().manual_seed(seed)
    state = read_checkpoint(checkpoint, key or {}) if checkpoint else None
    if state is not None:
        projector.load_state_dict(state["projector"])
        opt.load_state_dict(state["optimizer"])
        losses = list(state["losses"])      # the draws before it are replayed from the seed
    start, step = time.perf_counter(), 0
    for samples, n in phases:
        if not samples and n:
            raise V2LError("a projector training phase has steps but no samples")
        order: list[int] = []
        for _ in range(n):
            if len(order) < batch_size:
                order += torch.randperm(len(samples), generator=gen).tolist()
            pick, order = order[:batch_size], order[batch_size:]
            if step < len(losses):          # done before the resume point: the same draws, skipped
                step += 1
                continue
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, lr, warmup)
            batch = [samples[i] for i in pick]
            loss = batch_loss(llm, projector, batch, [feats[s.image] for s in batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if log_every and step % log_every == 0:
                recent = losses[-log_every:]
                print(f"projector step {step}/{total}: loss {sum(recent) / len(recent):.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            if checkpoint and save_every and step % save_every == 0 and step < total:
                write_checkpoint(checkpoint, key or {}, {
                    "projector": projector.state_dict(), "optimizer": opt.state_dict(),
                    "losses": losses})
    projector.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- bounds

def answer_questions(parts: LlavaParts, questions: list[dict], feats: dict[str, torch.Tensor] | None,
                     batch_size: int = 32, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers of the frozen LLM to LLaVA questions (vicuna_v1, ``data.llava``), each
    reading its image's projected features uncompressed (``feats``) or no image (None)."""
    from engine.voco import greedy
    from models.voco import VoCo
    tok = parts.tokenizer
    encoder = ConversationEncoder(tok, "system")
    reader = VoCo(parts.llm, 1, lora_rank=0, bos_id=tok.bos_token_id)
    prompts = []
    for q in questions:
        if feats is None:
            s = encoder.question(q["text"], None, str(q["question_id"]))
            prompts.append([s.before + s.between + s.after])
        else:
            s = encoder.question(q["text"], q["image"], str(q["question_id"]))
            with torch.no_grad():
                emb = parts.projector(feats[q["image"]][None].to(
                    parts.device, next(parts.projector.parameters()).dtype))[0].to(parts.dtype)
            prompts.append([seg for seg in (s.before, emb, s.between, s.after)
                            if isinstance(seg, torch.Tensor) or seg])
    out = []
    with torch.no_grad():
        for a in range(0, len(prompts), batch_size):
            rows = greedy(reader, prompts[a:a + batch_size], max_new_tokens, None, tok.eos_token_id)
            out += [tok.decode(r, skip_special_tokens=True).strip() for r in rows]
    return out


def measure_bounds(parts: LlavaParts, data_dir, out_dir, batch_size: int = 32,
                   max_new_tokens: int = 8) -> dict:
    """Upper bound (the image's embeddings read uncompressed) and no image on ``data_dir``'s
    questions.jsonl: answers files in LLaVA's format and ``engine.llava_bench.score_exact``."""
    from engine.llava_bench import answer_row, load_questions, score_exact, write_answers
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    qfile = data_dir / "questions.jsonl"
    questions = load_questions(qfile)
    names = sorted({q["image"] for q in questions})
    feats = image_features(parts.vision, parts.image_processor, data_dir, names)
    result = {}
    for condition, f in (("upper", feats), ("no_image", None)):
        start = time.perf_counter()
        texts = answer_questions(parts, questions, f, batch_size, max_new_tokens)
        path = out_dir / f"answers_{condition}.jsonl"
        write_answers(path, [answer_row(q, t, f"demo-llava-{condition}") for q, t in zip(questions, texts)])
        score = score_exact(path, qfile)
        result[condition] = score.metrics | {"seconds": round(time.perf_counter() - start, 1)}
    return result


# ----------------------------------------------------------------------------- the script


def _dirs() -> tuple[Path, Path, Path, Path, Path]:
    root = Path(OUT_DIR)
    return (root / "llava_data", root / "llava_projector", Path(LLM_DIR or root / "llm"),
            Path(CLIP_DIR or root / "clip"), root / "llava_bounds")


def make_data(out: Path) -> None:
    from demo.llava_world import write_llava_world
    with atomic_dir(out) as tmp:
        files, info = write_llava_world(tmp, SEED, N_PRETRAIN, N_INSTRUCT, N_EVAL, IMAGE_SIZE, WORLD_STYLE)
        write_manifest(tmp, DATA_STAGE, {k: settings[k] for k in (
            "seed", "n_pretrain", "n_instruct", "n_eval", "image_size", "world_style")}, files, info=info)
    print(f"LLaVA demo data: {info['images']} images, {info['questions']} questions in "
          f"{info['seconds']:.0f} s")


def make_projector(out: Path, data: Path, llm_dir: Path, clip_dir: Path) -> None:
    from models.llm import load_llm
    read_manifest(data, DATA_STAGE, "python -m demo.llava --parts data")
    layers = [x.strip() for x in LAYERS.split(",") if x.strip()]
    t0 = time.perf_counter()
    vision, clip = load_vision(clip_dir, layers, GRID)
    language = load_llm(str(llm_dir), dtype=LLM_DTYPE, device="cpu")
    language.model.set_attn_implementation("sdpa")
    tok, llm = language.text_tokenizer, language.model
    stage1 = caption_samples(data / "pretrain.json", tok, data)
    phases = [(stage1, STEPS)]
    if INSTRUCT_STEPS:
        instruct = LlavaConversations(data / "instruct.json", tok, data, layout="system",
                                      image_tokens=GRID * GRID)
        phases.append(([instruct[i] for i in range(len(instruct))], INSTRUCT_STEPS))
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / (out.name + ".partial")
    scratch.mkdir(exist_ok=True)
    (scratch / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(clip), indent=1))
    preprocess = ImagePreprocess(scratch)
    names = sorted({s.image for samples, _ in phases for s in samples})
    feats = image_features(vision, preprocess, data, names)
    t_feats = time.perf_counter() - t0
    torch.manual_seed(SEED)
    projector = mlp2x_gelu(vision.width, llm.config.hidden_size)
    key = {k: settings[k] for k in ("seed", "layers", "grid", "steps", "instruct_steps", "batch_size",
                                    "lr", "warmup", "weight_decay", "llm_dtype")}
    key["data"] = read_manifest(data)["id"]
    hist = train_projector(llm, projector, phases, feats, BATCH_SIZE, LR, WARMUP, WEIGHT_DECAY, SEED,
                           checkpoint=scratch / "checkpoint.pt", key=key, save_every=SAVE_EVERY)
    with atomic_dir(out) as tmp:
        save_projector(projector, tmp / PROJECTOR_FILE)
        (tmp / "preprocessor_config.json").write_text((scratch / "preprocessor_config.json").read_text())
        save_json(tmp / READING_FILE, {"layers": layers, "grid": GRID, "image_tokens": GRID * GRID,
                                       "vision_width": vision.width})
        save_json(tmp / "losses.json", hist["losses"])
        n = max(1, min(25, len(hist["losses"]) // 4))
        info = {"image_tokens": GRID * GRID, "vision_width": vision.width,
                "hidden": llm.config.hidden_size, "steps": STEPS, "instruct_steps": INSTRUCT_STEPS,
                "first_loss": sum(hist["losses"][:n]) / n, "last_loss": sum(hist["losses"][-n:]) / n,
                "feature_seconds": round(t_feats, 1), "train_seconds": round(hist["seconds"], 1)}
        write_manifest(tmp, PROJECTOR_STAGE, settings, [PROJECTOR_FILE, "preprocessor_config.json",
                                                        READING_FILE, "losses.json"],
                       inputs={"data": data, "llm": llm_dir, "clip": clip_dir}, info=info)
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    print(f"LLaVA demo projector: loss {info['first_loss']:.3f} -> {info['last_loss']:.3f}; features "
          f"{t_feats:.0f} s, training {hist['seconds']:.0f} s")


def make_bounds(out: Path, data: Path, projector: Path, llm_dir: Path, clip_dir: Path) -> None:
    read_manifest(projector, PROJECTOR_STAGE, "python -m demo.llava --parts projector")
    parts = load_demo_llava(projector, llm_dir, clip_dir, dtype=LLM_DTYPE)
    with atomic_dir(out) as tmp:
        result = measure_bounds(parts, data, tmp, EVAL_BATCH, MAX_NEW_TOKENS)
        save_json(tmp / "scores.json", result)
        write_manifest(tmp, "demo_llava_bounds", settings,
                       ["answers_upper.jsonl", "answers_no_image.jsonl", "scores.json"],
                       inputs={"data": data, "projector": projector}, info=result)
    for condition, m in result.items():
        cats = ", ".join(f"{k} {v:.1f}" for k, v in m["categories"].items())
        print(f"{condition}: {m['accuracy']:.1f}% ({cats}) over {m['n']} questions, {m['seconds']:.0f} s")


def main():
    data, projector, llm_dir, clip_dir, bounds = _dirs()
    wanted = [p.strip() for p in PARTS.split(",") if p.strip()]
    unknown = set(wanted) - {"data", "projector", "bounds"}
    if unknown:
        raise V2LError(f"--parts {PARTS}: unknown part(s) {', '.join(sorted(unknown))}; expected "
                       "data, projector, bounds")
    jobs = [("data", data, DATA_STAGE, lambda: make_data(data)),
            ("projector", projector, PROJECTOR_STAGE,
             lambda: make_projector(projector, data, llm_dir, clip_dir)),
            ("bounds", bounds, "demo_llava_bounds",
             lambda: make_bounds(bounds, data, projector, llm_dir, clip_dir))]
    for name, out, stage, make in jobs:
        if name not in wanted:
            continue
        if is_complete(out, stage):
            print(f"LLaVA demo {name}: complete in {out}, skipped (delete it to rebuild)")
            continue
        start = time.perf_counter()
        make()
        print(f"LLaVA demo {name}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
