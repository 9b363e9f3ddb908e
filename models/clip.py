"""Frozen CLIP, loaded from what users have, with its own preprocessing.

``load_clip(spec)`` accepts:
- an open_clip model directory (``open_clip_config.json`` + weights), e.g. a
  Hugging Face open_clip repo downloaded to disk, or the demo's trained CLIP;
- ``NAME`` with ``pretrained=FILE``: an open_clip/HF ``.bin``/``.safetensors``
  state dict for the built-in architecture NAME (e.g. ``ViT-L-14``). OpenAI's
  weights in this form (open_clip's ``timm/vit_large_patch14_clip_224.openai``)
  were trained with QuickGELU while open_clip's ``ViT-L-14`` config says GELU:
  they are recognised (see ``openai_weights_hint``) and loaded with QuickGELU;
  a file that cannot be identified loads as named, with a warning giving the
  ``-quickgelu`` architecture to use if it is OpenAI's;
- ``NAME`` with ``pretrained=ViT-L-14.pt``: OpenAI's original TorchScript
  archive (needs ``allow_unsafe=True``: it is a pickle; QuickGELU is forced,
  as OpenAI's models use it);
- ``NAME`` alone: random weights (tests, timing), with a warning.

The preprocessing (image size, mean, std, interpolation) is read off the
loaded model, never hard-coded: 224 px for ViT-L/14, other sizes for others.

Text side (step 2): ``encode_text_templates`` embeds strings the way CLIP's
zero-shot classifier does (80 prompt templates, each L2-normalised, averaged).
It runs the text tower on the padded context cut to the longest prompt of the
batch (``encode_text_truncated``): exact, because the tower is causal and
pools at the end-of-text position, and much cheaper than 77 positions.
Tokenizing the prompts (open_clip's pure-Python BPE, ftfy cleaning) would cost as much
as the tower: ``tokenize_templates`` encodes a plain ASCII string once and splices it into
each template's pre-encoded words (exactly the tokenizer's ids, see ``_spliceable``), the
rest prompt by prompt, optionally in forked worker processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.classes import imagenet_templates
from data.transforms import ClipView, ImageViews
from utils.dist import native_bf16
from utils.errors import V2LError


@dataclass
class ClipBundle:
    model: torch.nn.Module        # open_clip CLIP (eval, requires_grad False)
    clip_tokenizer: object        # open_clip's text tokenizer: list[str] -> LongTensor [N, context]
    image_size: int
    mean: tuple
    std: tuple
    interpolation: str
    embed_dim: int
    ident: str                    # what was loaded (for manifests)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_view(self) -> ClipView:
        return ClipView(self.image_size, self.mean, self.std, self.interpolation)

    def image_views(self, out_size: int = 128) -> ImageViews:
        return ImageViews(self.image_size, self.mean, self.std, self.interpolation, out_size)

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised images [B, 3, S, S] -> L2-normalised float32 embeddings [B, D]."""
        x = x.to(self.device, dtype=next(self.model.parameters()).dtype)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _is_torchscript(path: Path) -> bool:
    import zipfile
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or n.endswith("code/__torch__.py") or "/code/" in n
                   for n in z.namelist())


def load_clip(spec: str, pretrained: str | None = None, device="cpu",
              allow_unsafe: bool = False) -> ClipBundle:
    """Load a frozen open_clip model and everything needed to preprocess for it."""
    import open_clip

    spec = str(spec)
    kwargs: dict = {}
    ident = spec
    if Path(spec).is_dir():
        if not (Path(spec) / "open_clip_config.json").is_file():
            raise V2LError(f"{spec}: not an open_clip model directory (open_clip_config.json "
                           "missing); pass a directory with open_clip_config.json + weights, or "
                           "a model name with --clip_pretrained FILE")
        name = f"local-dir:{spec}"
        ident = f"local-dir:{Path(spec).resolve().name}:{_dir_digest(Path(spec))}"
    else:
        name = spec
        if name not in open_clip.list_models():
            raise V2LError(f"CLIP '{spec}': neither an open_clip model directory nor a known "
                           f"architecture name (e.g. ViT-L-14, RN50); see open_clip.list_models()")
        if pretrained:
            p = Path(pretrained)
            if not p.is_file():
                raise V2LError(f"{pretrained}: CLIP checkpoint file not found; give the path of "
                               "ViT-L-14.pt (OpenAI) or an open_clip .bin/.safetensors")
            ident = f"{spec}:{p.name}:{p.stat().st_size}"
            if _is_torchscript(p):
                if not allow_unsafe:
                    raise V2LError(f"{pretrained}: OpenAI TorchScript archive (a pickle that runs "
                                   "code on load); pass --clip_allow_unsafe true if you trust it")
                kwargs["force_quick_gelu"] = True
            elif not _config_quick_gelu(name):
                hint = openai_weights_hint(name, p)
                if hint:
                    print(f"note: {pretrained}: OpenAI's CLIP weights ({hint}): loading '{name}' "
                          "with QuickGELU, the activation they were trained with", file=sys.stderr)
                    kwargs["force_quick_gelu"] = True
                    ident += ":quickgelu"
                elif f"{name}-quickgelu" in open_clip.list_models():
                    print(f"warning: {pretrained}: loaded into '{name}' with GELU; if these are "
                          f"OpenAI's weights (trained with QuickGELU) use --clip {name}-quickgelu",
                          file=sys.stderr)
            kwargs["pretrained"] = str(p)
            kwargs["weights_only"] = not allow_unsafe
        else:
            print(f"warning: CLIP '{spec}' has no weights given: random initialisation "
                  "(fine for tests and timing, meaningless for the method)", file=sys.stderr)
            ident = f"{spec}:random"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, **kwargs)
    except TypeError:
        kwargs.pop("weights_only", None)
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, **kwargs)
    except (RuntimeError, ValueError, FileNotFoundError, KeyError) as e:
        raise V2LError(f"CLIP '{spec}' (pretrained={pretrained}): could not load: "
                       f"{str(e).splitlines()[0]}")
    clip_tokenizer = open_clip.get_tokenizer(name)
    pp = getattr(model.visual, "preprocess_cfg", {})
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = tuple(pp.get("mean", getattr(model.visual, "image_mean", None) or ()))
    std = tuple(pp.get("std", getattr(model.visual, "image_std", None) or ()))
    return ClipBundle(
        model=_freeze(model), clip_tokenizer=clip_tokenizer, image_size=int(size), mean=mean, std=std,
        interpolation=pp.get("interpolation", "bicubic"),
        embed_dim=int(model.text_projection.shape[-1] if hasattr(model, "text_projection")
                      and model.text_projection is not None else model.visual.output_dim),
        ident=ident)


def _config_quick_gelu(name: str) -> bool:
    """Whether open_clip's built-in config NAME already uses QuickGELU."""
    import open_clip
    return bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))


def openai_weights_hint(name: str, path) -> str | None:
    """Why the state-dict file ``path`` holds QuickGELU-trained (OpenAI) weights for the
    open_clip architecture NAME, or None when nothing says so. Two signs:
    an ``open_clip_config.json`` beside it (as in a Hugging Face open_clip repo) with
    ``quick_gelu: true``; or a path through one of open_clip's own QuickGELU releases of
    NAME (its Hugging Face repo, e.g. ``timm/vit_large_patch14_clip_224.openai``, also as
    the hub cache's ``models--timm--vit_large_patch14_clip_224.openai``)."""
    import open_clip
    path = Path(path)
    sidecar = path.parent / "open_clip_config.json"
    if sidecar.is_file():
        try:
            model_cfg = json.loads(sidecar.read_text()).get("model_cfg", {})
        except (json.JSONDecodeError, AttributeError):
            model_cfg = {}
        if model_cfg.get("quick_gelu"):
            return f"{sidecar} sets quick_gelu"
    parts = set(path.resolve().parts) | set(path.parts)
    for tag in open_clip.list_pretrained_tags_by_model(name):
        release = open_clip.get_pretrained_cfg(name, tag)
        repo = (release.get("hf_hub") or "").strip("/")
        if release.get("quick_gelu") and repo:
            owner, _, repo_name = repo.partition("/")
            if repo_name in parts or f"models--{owner}--{repo_name}" in parts:
                return f"the path is open_clip's '{tag}' release {repo}"
    return None


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:12]


def save_open_clip_dir(model: torch.nn.Module, model_cfg: dict, out_dir, preprocess_cfg: dict) -> None:
    """Save an open_clip model as a local model directory that ``load_clip`` (and open_clip's
    ``local-dir:`` schema) reads: open_clip_config.json + open_clip_model.safetensors."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "open_clip_model.safetensors"))
    with open(out / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=1)


# ----------------------------------------------------------------------------- text tower

def autocast_context(device: torch.device, precision: str = "auto"):
    """Mixed precision for inference: "auto" = fp16 autocast on CUDA, fp32 elsewhere;
    "fp32", "fp16", "bf16" force it (fp16 only on CUDA; bf16 on CUDA, and on a CPU that computes
    it natively, ``utils.dist.native_bf16``)."""
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise V2LError(f"precision '{precision}': expected auto, fp32, fp16 or bf16")
    if device.type == "cpu" and precision == "bf16" and native_bf16(device):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _can_truncate(model) -> bool:
    """True for open_clip's built-in causal text tower with position-based pooling."""
    return (hasattr(model, "attn_mask") and model.attn_mask is not None
            and hasattr(model, "positional_embedding")
            and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos", "first"))


def _pool_positions(model, tokens: torch.Tensor) -> torch.Tensor:
    """Index of the pooled position of each row (what open_clip's text_global_pool reads)."""
    pool = getattr(model, "text_pool_type", "argmax")
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)


def encode_text_truncated(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (unnormalised) computed on the first L positions only,
    L = the last pooled position in the batch + 1. Differentiable (the demo CLIP trains
    through it); inference callers wrap it in ``torch.no_grad()``.

    Exact: the causal mask means positions < L never see positions >= L, and the pooled
    feature sits below L. Only the causal mask and positional embeddings depend on the
    length, so they are sliced; everything else is the model's own submodules. Towers
    this does not apply to (HF text encoders, 'last' pooling) use ``encode_text``."""
    if not _can_truncate(model):
        return model.encode_text(tokens)
    pos = _pool_positions(model, tokens)
    length = int(pos.max()) + 1
    t = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(t).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), pos]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


# Splicing: a prompt's tokens are CLIP's words of its cleaned text, each BPE-encoded alone.
# For a string of printable ASCII without '&', '<' or '>' the cleaning (ftfy, HTML unescaping,
# whitespace collapsing, lower case) acts on each character and run of spaces by itself, and a
# template's text before '{}' ends in a space: the prompt's words are the template's words
# before, the string's words, the template's words after, unless the text after starts with a
# non-space (the '.' of "a photo of a {}.") that would join a trailing punctuation run of the
# string ("x!" + "." reads "!." as one word). Such prompts, and every other string, go through
# the tokenizer whole.
_SPLICE_CHARS = re.compile(r"[ -%'-;=?-~]*")  # printable ASCII less '&', '<', '>'


def _template_parts(clip_tokenizer, templates) -> list[tuple[list[int], list[int], bool]] | None:
    """(token ids before '{}', after '{}', whether the text after starts with a non-space) of
    each template, or None when splicing would not be exact (another tokenizer or cleaning, a
    template that glues text to '{}' other than punctuation after it)."""
    from open_clip import tokenizer as oct
    if (type(clip_tokenizer) is not oct.SimpleTokenizer or getattr(clip_tokenizer, "reduction_fn", None)
            or getattr(clip_tokenizer, "clean_fn", None) is not oct._clean_lower):
        return None
    parts = []
    for t in templates:
        if t.count("{}") != 1:
            return None
        before, after = t.split("{}")
        if (before and not before[-1].isspace() or not _SPLICE_CHARS.fullmatch(before + after)
                or after[:1].isalnum()):
            return None
        parts.append((clip_tokenizer.encode(before), clip_tokenizer.encode(after),
                      bool(after) and not after[0].isspace()))
    return parts


def _spliceable(s: str) -> bool:
    """Whether the string's tokens can be spliced into a template (see above); ftfy is asked
    once per string whether it leaves the string alone."""
    from open_clip.tokenizer import basic_clean
    return bool(_SPLICE_CHARS.fullmatch(s)) and basic_clean(s) == s.strip()


def _glues(s: str) -> bool:
    """Whether a text after '{}' that starts with a non-space would join the string's last word."""
    tail = s.rstrip()
    return bool(tail) and not tail[-1].isalnum()


def _token_rows(clip_tokenizer, strings: list[str], templates: list[str], parts) -> np.ndarray:
    """Token ids int64 [len(strings) * len(templates), context], string-major (no torch, so
    that it runs in forked worker processes)."""
    ctx, sot, eot = clip_tokenizer.context_length, clip_tokenizer.sot_token_id, clip_tokenizer.eot_token_id
    out = np.zeros((len(strings) * len(templates), ctx), dtype=np.int64)

    def put(row, ids):
        ids = [sot] + ids + [eot]
        if len(ids) > ctx:  # truncate as open_clip does: the last kept position holds EOT
            ids = ids[:ctx]
            ids[-1] = eot
        out[row, :len(ids)] = ids

    row = 0
    for s in strings:
        if parts is not None and _spliceable(s):
            mid, glues = clip_tokenizer.encode(s), _glues(s)
            for t, (before, after, tight) in zip(templates, parts):
                put(row, clip_tokenizer.encode(t.format(s)) if tight and glues else before + mid + after)
                row += 1
        else:
            for t in templates:
                put(row, clip_tokenizer.encode(t.format(s)))
                row += 1
    return out


def _worker_rows(args):
    return _token_rows(_POOL_TOKENIZER, *args)


_POOL_TOKENIZER = None


def tokenize_templates(clip_tokenizer, strings: list[str], templates, workers: int = 1) -> torch.Tensor:
    """Token ids [len(strings) * len(templates), context] of every string in every template
    (string-major), identical to ``clip_tokenizer([t.format(s) for s in strings for t in templates])``.

    Fast path: a string of printable ASCII is BPE-encoded once and spliced between each
    template's pre-encoded parts; any other string is tokenized prompt by prompt.
    ``workers`` > 1: slices of the strings are tokenized in that many forked processes
    (where the platform forks; otherwise in this one)."""
    global _POOL_TOKENIZER
    import multiprocessing as mp
    templates, strings = list(templates), list(strings)
    parts = _template_parts(clip_tokenizer, templates)
    from open_clip.tokenizer import SimpleTokenizer
    if type(clip_tokenizer) is not SimpleTokenizer or getattr(clip_tokenizer, "reduction_fn", None):
        return clip_tokenizer([t.format(s) for s in strings for t in templates])
    workers = min(int(workers), len(strings) // 64)  # a slice worth a fork
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        return torch.from_numpy(_token_rows(clip_tokenizer, strings, templates, parts))
    step = -(-len(strings) // (4 * workers))
    jobs = [(strings[i:i + step], templates, parts) for i in range(0, len(strings), step)]
    _POOL_TOKENIZER = clip_tokenizer
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            rows = pool.map(_worker_rows, jobs)
    finally:
        _POOL_TOKENIZER = None
    return torch.from_numpy(np.concatenate(rows))


@torch.no_grad()
def encode_text_templates(bundle: ClipBundle, strings: list[str], templates=None,
                          batch_size: int = 32, precision: str = "auto",
                          workers: int = 1) -> torch.Tensor:
    """Template-averaged CLIP text embeddings, float32 [len(strings), D] on the CPU.

    Each string is formatted into every template (default: CLIP's 80 ImageNet templates),
    each prompt's embedding is L2-normalised, and the mean over templates is returned
    WITHOUT renormalisation (as the V2L authors do). A string given more than once is
    tokenized and encoded once (its rows are copies). ``batch_size`` distinct strings are
    encoded per forward pass (x templates prompts); strings are grouped by prompt length so
    each batch is cut to a similar, short context. ``workers``: processes that tokenize
    (``tokenize_templates``)."""
    templates = list(templates or imagenet_templates())
    n_t = len(templates)
    out = torch.empty(len(strings), bundle.embed_dim)
    if not strings:
        return out
    first: dict[str, int] = {}
    inverse = torch.tensor([first.setdefault(s, len(first)) for s in strings], dtype=torch.long)
    uniq = list(first)
    tokens = tokenize_templates(bundle.clip_tokenizer, uniq, templates, workers=workers)
    longest = _pool_positions(bundle.model, tokens).view(len(uniq), n_t).max(dim=1).values
    order = torch.argsort(longest, stable=True)
    device = bundle.device
    emb_u = torch.empty(len(uniq), bundle.embed_dim)
    for start in range(0, len(uniq), batch_size):
        idx = order[start:start + batch_size]
        rows = (idx[:, None] * n_t + torch.arange(n_t)).flatten()
        with autocast_context(device, precision):
            emb = encode_text_truncated(bundle.model, tokens[rows].to(device))
        emb = F.normalize(emb.float(), dim=-1).view(len(idx), n_t, -1).mean(dim=1)
        emb_u[idx] = emb.cpu()
    return emb_u if len(uniq) == len(strings) else emb_u[inverse]
