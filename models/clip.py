"""Frozen CLIP, loaded from what users have, with its own preprocessing.

``load_clip(spec)`` accepts:
- an open_clip model directory (``open_clip_config.json`` + weights), e.g. a
  Hugging Face open_clip repo downloaded to disk, or the demo's trained CLIP;
- ``NAME`` with ``pretrained=FILE``: an open_clip/HF ``.bin``/``.safetensors``
  state dict for the built-in architecture NAME (e.g. ``ViT-L-14``);
- ``NAME`` with ``pretrained=ViT-L-14.pt``: OpenAI's original TorchScript
  archive (needs ``allow_unsafe=True``: it is a pickle; QuickGELU is forced,
  as OpenAI's models use it);
- ``NAME`` alone: random weights (tests, timing), with a warning.

The preprocessing (image size, mean, std, interpolation) is read off the
loaded model, never hard-coded: 224 px for ViT-L/14, other sizes for others.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data.transforms import ClipView, TokenizerViews
from utils.errors import V2LError


@dataclass
class ClipBundle:
    model: torch.nn.Module        # open_clip CLIP (eval, requires_grad False)
    tokenizer: object             # open_clip tokenizer: list[str] -> LongTensor [N, context]
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

    def tokenizer_views(self, out_size: int = 128) -> TokenizerViews:
        return TokenizerViews(self.image_size, self.mean, self.std, self.interpolation, out_size)

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
            if _is_torchscript(p):
                if not allow_unsafe:
                    raise V2LError(f"{pretrained}: OpenAI TorchScript archive (a pickle that runs "
                                   "code on load); pass --clip_allow_unsafe true if you trust it")
                kwargs["force_quick_gelu"] = True
            kwargs["pretrained"] = str(p)
            kwargs["weights_only"] = not allow_unsafe
            ident = f"{spec}:{p.name}:{p.stat().st_size}"
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
    tokenizer = open_clip.get_tokenizer(name)
    pp = getattr(model.visual, "preprocess_cfg", {})
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = tuple(pp.get("mean", getattr(model.visual, "image_mean", None) or ()))
    std = tuple(pp.get("std", getattr(model.visual, "image_std", None) or ()))
    return ClipBundle(
        model=_freeze(model), tokenizer=tokenizer, image_size=int(size), mean=mean, std=std,
        interpolation=pp.get("interpolation", "bicubic"),
        embed_dim=int(model.text_projection.shape[-1] if hasattr(model, "text_projection")
                      and model.text_projection is not None else model.visual.output_dim),
        ident=ident)


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
