"""Saving and loading a V2L tokenizer, and reading the authors' released checkpoint.

- ``save_tokenizer`` / ``load_tokenizer``: our self-contained ``tokenizer.pt``
  (config, weights, codebooks, global strings).
- ``load_authors_checkpoint``: the authors' weights into a tokenizer of the paper
  architecture (their layout is checked name by name and shape by shape first).

A fresh tokenizer on the step-2/3 artifacts is built by ``engine.tokenizer_build``.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from models.clip import ClipBundle, load_clip
from models.tokenizer import TokenizerConfig, V2LTokenizer
from utils.artifacts import save_torch
from utils.errors import V2LError

FORMAT = "v2l-tokenizer/1"
FILE_NAME = "tokenizer.pt"
# parts of the authors' checkpoint that are not the tokenizer itself
AUTHORS_DROPPED_PREFIXES = ("global_encoder.", "perceptual_loss.")
AUTHORS_DISCRIMINATOR_PREFIX = "discriminator."


def save_tokenizer(tokenizer: V2LTokenizer, path) -> Path:
    """Write a self-contained tokenizer (config, weights, codebooks, strings) atomically.

    ``path`` is a ``.pt`` file or a directory (then ``<dir>/tokenizer.pt``).
    """
    path = Path(path)
    if path.suffix != ".pt":
        path = path / FILE_NAME
    state = {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()}
    save_torch(path, {"format": FORMAT, "config": tokenizer.config.to_dict(), "state_dict": state,
                      "global_strings": tokenizer.strings})
    return path


def load_tokenizer(path, clip: ClipBundle | None = None, device="cpu",
                   allow_unsafe_clip: bool = False) -> V2LTokenizer:
    """Load a saved tokenizer (a ``.pt`` file or a directory holding ``tokenizer.pt``), in eval mode.

    Without ``clip``, the CLIP named in its config is loaded (``allow_unsafe_clip``
    as in ``load_clip`` for OpenAI TorchScript files). CLIP runs in the precision the
    tokenizer was trained with (``config.clip_precision``, see ``clip_in_precision``), so
    the global words are the ones its decoder learned from; a ``clip`` passed in is
    converted in place.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise V2LError(f"{path}: tokenizer not found; train one with step4_train_tokenizer.py "
                       "or give the tokenizer directory / .pt file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise V2LError(f"{path}: not a readable tokenizer file ({str(e).splitlines()[0]})")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise V2LError(f"{path}: not a V2L tokenizer file (format {FORMAT} expected); for the "
                       "authors' released checkpoint use models.tokenizer_io.load_authors_checkpoint")
    try:
        config = TokenizerConfig.from_dict(payload["config"])
        state = payload["state_dict"]
        tokenizer = V2LTokenizer(config, state["tok_embeddings.weight"], state["llm_ids"],
                                 state["tok_embeddings_global.weight"], payload["global_strings"])
        tokenizer.load_state_dict(state)
    except (KeyError, RuntimeError) as e:
        raise V2LError(f"{path}: damaged tokenizer file (weights do not match its config: "
                       f"{str(e).splitlines()[0][:200]}); save it again or retrain")
    if clip is None:
        clip = load_clip(config.clip_spec, config.clip_pretrained, device=device,
                         allow_unsafe=allow_unsafe_clip)
    tokenizer.attach_clip(clip_in_precision(clip, config.clip_precision))
    return tokenizer.to(device).eval()


@dataclasses.dataclass
class AutocastClip(ClipBundle):
    """A CLIP bundle whose image tower runs under autocast to ``dtype``."""
    dtype: torch.dtype = torch.float16

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype):
            return super().encode_images(x)


def clip_in_precision(clip: ClipBundle, precision: str) -> ClipBundle:
    """CLIP set up as step 4 ran it (engine/train.py): "fp16": fp16 weights under fp16
    autocast; "bf16": bf16 autocast; "fp32": as loaded. On a GPU only: a CPU runs CLIP in
    fp32 whatever was recorded (fp16 is not usable there, and CPU runs stay as they were),
    so a tokenizer trained in fp16 or bf16 and evaluated on a CPU may see a global word near
    rank k change."""
    if precision == "fp32" or clip.device.type != "cuda":
        return clip
    fields = {f.name: getattr(clip, f.name) for f in dataclasses.fields(ClipBundle)}
    if precision == "fp16":
        clip.model.half()
        return AutocastClip(**fields, dtype=torch.float16)
    return AutocastClip(**fields, dtype=torch.bfloat16)


def load_authors_checkpoint(tokenizer: V2LTokenizer, src) -> dict[str, torch.Tensor]:
    """Load the authors' released weights into ``tokenizer``; return their discriminator's.

    ``src``: a checkpoint path or an already loaded dict (with a ``model`` or
    ``state_dict`` entry, or a bare state dict). Their CLIP tower and LPIPS
    net are dropped; both codebooks are taken from the checkpoint (the
    encoder was trained against them), so its shapes must match the
    tokenizer's (build it from artifacts of the same LLM and CLIP). Nothing is
    loaded unless every name and shape fits.
    """
    model_state, disc_state = split_authors_checkpoint(src)
    own = {k: v for k, v in tokenizer.state_dict().items() if k != "llm_ids"}
    missing = sorted(set(own) - set(model_state))
    unexpected = sorted(set(model_state) - set(own))
    wrong = sorted(k for k in set(own) & set(model_state)
                   if tuple(own[k].shape) != tuple(model_state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: checkpoint "
                         f"{list(model_state[k].shape)} vs {list(own[k].shape)})")
        raise V2LError(f"{_describe(src)}: not a V2L tokenizer checkpoint of this architecture: "
                       f"{'; '.join(parts)}; check the tokenizer settings (paper defaults) and "
                       "that the codebooks come from LLaMA-2 + CLIP ViT-L/14")
    tokenizer.load_state_dict({**model_state, "llm_ids": tokenizer.llm_ids}, strict=True)
    return disc_state


def split_authors_checkpoint(src) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The authors' checkpoint -> (tokenizer state dict, discriminator state dict).

    Accepts a path or a loaded dict: ``{"model": sd}``, ``{"state_dict": sd}`` or
    a bare state dict; strips a DDP ``module.`` prefix, drops their CLIP tower
    (``global_encoder.*``) and LPIPS net (``perceptual_loss.*``), and returns the
    discriminator (``discriminator.*``) with its prefix removed. Our parameter
    names are theirs, so the rest maps by identity.
    """
    if isinstance(src, (str, Path)):
        if not Path(src).is_file():
            raise V2LError(f"{src}: checkpoint file not found")
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                src_dict = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unreadable for any reason: same advice
            raise V2LError(f"{src}: cannot read as a PyTorch checkpoint ({str(e).splitlines()[0]})")
    else:
        src_dict = src
    if not isinstance(src_dict, dict):
        raise V2LError(f"{_describe(src)}: expected a dict of tensors, got {type(src_dict).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(src_dict.get(key), dict):
            src_dict = src_dict[key]
            break
    model_state, disc_state = {}, {}
    for name, value in src_dict.items():
        if not isinstance(value, torch.Tensor):
            raise V2LError(f"{_describe(src)}: entry {name!r} is not a tensor; not a state dict")
        name = name.removeprefix("module.")
        if name.startswith(AUTHORS_DROPPED_PREFIXES):
            continue
        if name.startswith(AUTHORS_DISCRIMINATOR_PREFIX):
            disc_state[name.removeprefix(AUTHORS_DISCRIMINATOR_PREFIX)] = value
        else:
            model_state[name] = value
    return model_state, disc_state


def _describe(src) -> str:
    return str(src) if isinstance(src, (str, Path)) else "checkpoint"
