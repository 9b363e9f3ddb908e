"""A LLaVA-1.5 model (vision tower, mlp2x_gelu projector, causal LM) from the files users have.

``load_llava`` accepts:
- a llava-hf directory (transformers' ``LlavaForConditionalGeneration``: ``config.json`` with
  ``vision_config`` / ``text_config``, e.g. llava-hf/llava-1.5-7b-hf);
- the original LLaVA-1.5 parts: the LLM (Vicuna, anything ``models.llm.load_llm`` reads), a CLIP
  vision tower directory (transformers' ``CLIPVisionModel``, e.g. openai/clip-vit-large-patch14-336,
  whose ``preprocessor_config.json`` gives the image preprocessing) and LLaVA's
  ``mm_projector.bin`` (keys ``model.mm_projector.{0,2}.{weight,bias}``: Linear, GELU, Linear).

Either way the result is a ``LlavaParts``: ``vision`` (pixels [B, 3, H, W] -> features
[B, n, d_vision]), ``projector`` and ``language`` (a ``models.llm.LLM`` whose ``model`` is a plain
causal LM, e.g. ``LlamaForCausalLM``; for a llava-hf directory it shares the checkpoint's weights:
its decoder is ``model.language_model`` and its head ``lm_head``), so ``models.voco.VoCo`` wraps
it unchanged. What LLaVA-1.5 does to an image, each step as its code does it:

1. ``image_aspect_ratio pad``: the RGB image is padded to a square in CLIP's mean colour
   (``tuple(int(x * 255) for x in image_mean)``), the image centred (offset ``(long - short) // 2``);
2. CLIP's preprocessing (PIL backend, as the slow ``CLIPImageProcessor`` LLaVA calls): bicubic
   resize of the short side, centre crop, rescale by 1/255, normalise by CLIP's mean and std;
3. the vision tower's hidden states of layer -2 (``mm_vision_select_layer``; a llava-hf config's
   ``vision_feature_layer``), the CLS position dropped (``mm_vision_select_feature patch``; the
   ``default`` strategy): 576 features at 336 px;
4. the projector: Linear(d_vision, hidden), GELU (exact, erf), Linear(hidden, hidden).

An image's embeddings [n, hidden] take the place of the ``<image>`` placeholder in a prompt
(``embed_prompt``). tests/test_llava.py checks the logits against transformers'
``LlavaForConditionalGeneration`` on a tiny random model, for both forms.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.llava_dirs import (architectures, is_llava_dir, is_original_llava_dir, read_config,
                               refuse_llava_as_llm)
from models.llm import LLM, load_llm, llm_fingerprint, resolve_dtype
from utils.errors import V2LError

FEATURE_LAYER = -2          # LLaVA-1.5's mm_vision_select_layer
PROJECTOR_PREFIX = "model.mm_projector."


# ----------------------------------------------------------------------------- what a path is

def _refuse_llm_as_llava(path) -> None:
    if is_llava_dir(path):
        return
    refuse_llava_as_llm(path)       # the original layout: its own line
    config = read_config(path)
    what = ", ".join(architectures(config)) or (config or {}).get("model_type") or "no config.json"
    raise V2LError(f"{path} is not a llava-hf checkpoint ({what}); give a LlavaForConditionalGeneration "
                   "directory as --llava, or a causal LM as --llm with --vision_tower and --mm_projector")


def _check_vision_dir(path) -> dict:
    config = read_config(path)
    if config is None:
        raise V2LError(f"{path}: no config.json; give a CLIP vision tower directory (e.g. "
                       "openai/clip-vit-large-patch14-336) as --vision_tower")
    if is_llava_dir(path) or is_original_llava_dir(path):
        raise V2LError(f"{path} is a LLaVA checkpoint, not a CLIP vision tower; give it as --llava "
                       "(alone), or give the CLIP directory as --vision_tower")
    if config.get("model_type") not in ("clip", "clip_vision_model"):
        what = ", ".join(architectures(config)) or config.get("model_type")
        raise V2LError(f"{path} is not a CLIP model ({what}); give a transformers CLIP directory "
                       "(CLIPModel or CLIPVisionModel) as --vision_tower")
    return config


# ----------------------------------------------------------------------------- the parts

class VisionFeatures(nn.Module):
    """A CLIP vision tower read as LLaVA reads it: the hidden states of ``layer`` (or of several
    layers, concatenated over channels), without the CLS position under the ``default``
    strategy (``full`` keeps it)."""

    def __init__(self, tower: nn.Module, layer: int | list[int] = FEATURE_LAYER,
                 strategy: str = "default"):
        super().__init__()
        if strategy not in ("default", "full"):
            raise V2LError(f"vision_feature_select_strategy {strategy!r} unknown; use 'default' "
                           "(CLS dropped, LLaVA-1.5's) or 'full'")
        self.tower, self.layer, self.strategy = tower, layer, strategy

    @property
    def width(self) -> int:
        """Channels of one feature: the tower's width times the number of layers read."""
        layers = 1 if isinstance(self.layer, int) else len(self.layer)
        return self.tower.config.hidden_size * layers

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixels.to(next(self.tower.parameters()).device, self.dtype),
                         output_hidden_states=True)
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        feats = [out.hidden_states[i] for i in layers]
        if self.strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return torch.cat(feats, -1)


class OpenClipFeatures(nn.Module):
    """An open_clip ViT (e.g. ViT-L-14-336) read as LLaVA reads transformers' CLIP: the tokens
    after the blocks that ``hidden_states[layer]`` would have run (-2: all but the last), CLS
    dropped (open_clip's ``forward_intermediates``; the embeddings alone, layer 0, are not
    offered)."""

    def __init__(self, visual: nn.Module, layer: int = FEATURE_LAYER):
        super().__init__()
        if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
            raise V2LError(f"open_clip vision tower {type(visual).__name__}: not a ViT; LLaVA-1.5 "
                           "reads a ViT's patch tokens (ViT-L-14-336)")
        n = len(visual.transformer.resblocks)
        index = (n + 1 + layer if layer < 0 else layer) - 1     # hidden_states[h]: after h blocks
        if not 0 <= index < n:
            raise V2LError(f"vision feature layer {layer}: the open_clip tower has {n} blocks; use "
                           f"-1 .. -{n} or 1 .. {n}")
        self.tower, self.layer, self.index = visual, layer, index

    @property
    def width(self) -> int:
        return self.tower.transformer.width

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.tower.forward_intermediates(
            pixels.to(next(self.tower.parameters()).device, self.dtype), indices=[self.index],
            stop_early=True, intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]


def mlp2x_gelu(vision_width: int, hidden: int) -> nn.Sequential:
    """LLaVA-1.5's projector: Linear, GELU, Linear (state-dict keys 0.* and 2.*)."""
    return nn.Sequential(nn.Linear(vision_width, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def expand2square(image, background: tuple[int, ...]):
    """LLaVA's padding to a square: the image centred on a square of ``background``, the short
    side's offset ``(long - short) // 2``; a square image is returned as is."""
    from PIL import Image
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - width) // 2, (side - height) // 2))
    return out


class ImagePreprocess:
    """PIL images -> pixel tensors [B, 3, H, W] as LLaVA-1.5 makes them: RGB, padded to a square
    in CLIP's mean colour (``pad``: the authors' ``image_aspect_ratio pad``; off: CLIP's own
    short-side resize and centre crop, what llava-hf's processor does), then the CLIP
    preprocessing of ``processor_dir``'s ``preprocessor_config.json`` (PIL backend)."""

    def __init__(self, processor_dir=None, pad: bool = True, processor=None):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        self.pad = bool(pad)
        if processor is not None:
            self.processor = processor
            self.background = tuple(int(x * 255) for x in self.processor.image_mean)
            return
        file = Path(processor_dir) / "preprocessor_config.json"
        if not file.is_file():
            raise V2LError(f"{processor_dir}: no preprocessor_config.json (CLIP's image "
                           "preprocessing); give the vision tower's own directory")
        try:
            self.processor = CLIPImageProcessorPil.from_pretrained(str(processor_dir))
        except (OSError, ValueError, TypeError) as e:
            raise V2LError(f"{file}: cannot read CLIP's image preprocessing ({e}); use the vision "
                           "tower's own preprocessor_config.json") from e
        self.background = tuple(int(x * 255) for x in self.processor.image_mean)

    @classmethod
    def clip(cls, size: int, mean, std, pad: bool = True) -> "ImagePreprocess":
        """CLIP's preprocessing at ``size`` (short side, then centre crop) with ``mean``/``std``,
        as a CLIP ``preprocessor_config.json`` describes it (an open_clip model has none)."""
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        processor = CLIPImageProcessorPil(size={"shortest_edge": int(size)},
                                          crop_size={"height": int(size), "width": int(size)},
                                          image_mean=list(mean), image_std=list(std), resample=3)
        return cls(pad=pad, processor=processor)

    def __call__(self, images) -> torch.Tensor:
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        images = [im.convert("RGB") for im in images]
        if self.pad:
            images = [expand2square(im, self.background) for im in images]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


@dataclass
class LlavaParts:
    """A LLaVA-1.5 model in parts (see the module docstring)."""
    vision: nn.Module               # VisionFeatures or OpenClipFeatures
    projector: nn.Module
    language: LLM                   # .model: the causal LM (VoCo wraps it), .text_tokenizer
    image_processor: ImagePreprocess
    image_token_id: int | None      # "<image>" in a llava-hf tokenizer; None for Vicuna's
    ident: str

    @property
    def llm(self) -> nn.Module:
        return self.language.model

    @property
    def tokenizer(self):
        return self.language.text_tokenizer

    @property
    def device(self) -> torch.device:
        return self.language.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s) -> pixels [B, 3, H, W] (float32, CPU)."""
        return self.image_processor(images)

    def image_tokens(self) -> int:
        """How many embeddings the LLaVA makes of one image (576 for CLIP-L/14-336), whatever
        the vision tower: those of one blank image."""
        from PIL import Image
        with torch.no_grad():
            return int(self.embed_images(self.preprocess([Image.new("RGB", (8, 8))])).shape[1])

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> image embeddings [B, n, hidden] in the LLM's dtype."""
        feats = self.vision(pixels)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(proj_dtype)).to(self.device, self.dtype)

    def embed_prompt(self, segments: list) -> torch.Tensor:
        """One prompt of token-id segments (lists) and image embeddings ([n, hidden] tensors)
        -> its input embeddings [T, hidden]."""
        table = self.llm.get_input_embeddings()
        out = []
        for seg in segments:
            if isinstance(seg, torch.Tensor) and seg.is_floating_point():
                out.append(seg.to(self.device, self.dtype))
            else:
                out.append(table(torch.as_tensor(list(seg), dtype=torch.long, device=self.device)))
        return torch.cat(out)


# ----------------------------------------------------------------------------- loading

@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load report lists the CLIP text tower's weights a vision tower does not
    use; nothing in it is an error here."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_llava(path=None, llm=None, vision=None, projector=None, dtype=None, device=None,
               pad: bool = True, attn: str = "sdpa", feature_layer: int = FEATURE_LAYER,
               vision_pretrained=None, vision_allow_unsafe: bool = False) -> LlavaParts:
    """A frozen LLaVA-1.5 (eval mode, no gradients) from a llava-hf directory (``path``) or from
    its original parts (``llm``: a causal LM path for ``models.llm.load_llm``; ``vision``: a CLIP
    directory; ``projector``: ``mm_projector.bin``). ``dtype``/``device`` as ``load_llm``'s
    (the vision tower and projector take the same); ``pad``: pad images to a square (LLaVA-1.5's
    ``image_aspect_ratio pad``); ``attn``: the LLM's attention (VoCo needs sdpa or eager);
    ``feature_layer``: the vision layer read for the original parts (a llava-hf config names
    its own). ``vision`` may also be open_clip's: a model directory (``open_clip_config.json``)
    or an architecture name (``ViT-L-14-336``) with its weights file as ``vision_pretrained``
    (OpenAI's TorchScript archive needs ``vision_allow_unsafe``), loaded by
    ``models.clip.load_clip``."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = resolve_dtype(dtype, device)
    if path is not None:
        if llm is not None or vision is not None or projector is not None:
            raise V2LError("give either a llava-hf directory (--llava) or the parts (--llm, "
                           "--vision_tower, --mm_projector), not both")
        parts = _load_llava_hf(Path(path), torch_dtype, device, pad, attn)
    else:
        missing = [f for f, v in (("--llm", llm), ("--vision_tower", vision),
                                  ("--mm_projector", projector)) if v is None]
        if missing:
            raise V2LError(f"LLaVA from its parts needs {', '.join(missing)} too (or a llava-hf "
                           "directory as --llava)")
        parts = _load_parts(llm, vision, projector, torch_dtype, device, pad, attn, feature_layer,
                            vision_pretrained, vision_allow_unsafe)
    _freeze(parts.vision, parts.projector, parts.llm)
    return parts


def _freeze(*modules: nn.Module) -> None:
    """Eval mode, no gradients."""
    for module in modules:
        module.eval()
        module.requires_grad_(False)


def with_language(parts: LlavaParts, llm_path, projector_path, attn: str = "sdpa") -> LlavaParts:
    """``parts`` with another language model and projector (a fine-tuned LLaVA: step 7's
    trained reader writes ``llm/`` and ``mm_projector.bin``), the vision tower shared; frozen,
    in ``parts``' dtype and device."""
    refuse_llava_as_llm(llm_path)
    state = read_projector(Path(projector_path))
    language = load_llm(str(llm_path), dtype=parts.dtype, device=parts.device)
    if attn in ("sdpa", "eager"):
        language.model.set_attn_implementation(attn)
    projector = _projector(state, projector_path, parts.vision.width, language.model.config.hidden_size,
                           parts.device, next(parts.projector.parameters()).dtype)
    _freeze(projector, language.model)
    return LlavaParts(parts.vision, projector, language, parts.image_processor, parts.image_token_id,
                      f"llava-parts:{language.ident}+{parts.ident}+{projector_path}")


def _load_llava_hf(path: Path, dtype, device, pad: bool, attn: str) -> LlavaParts:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    from models.llm import check_vocab
    from models.meta_llama import attach_sentencepiece
    if not path.is_dir():
        raise V2LError(f"{path}: LLaVA directory not found; give a llava-hf directory")
    _refuse_llm_as_llava(path)
    try:
        with _quiet_transformers():
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                                  attn_implementation=attn)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise V2LError(f"{path}: cannot load this llava-hf model ({first}); check the files are "
                       "complete") from e
    config = model.config
    # the language model as a plain causal LM sharing the checkpoint's modules: its class built
    # on the meta device (no weights allocated), then given the decoder and head
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config.text_config)
    lm.model = model.model.language_model
    lm.lm_head = model.lm_head
    lm.config = lm.model.config
    lm.generation_config = model.generation_config
    if any(t.is_meta for t in list(lm.parameters()) + list(lm.buffers())):
        raise V2LError(f"{path}: the language model of this llava-hf checkpoint has parts "
                       f"{type(lm).__name__} does not share; it is not a LLaVA-1.5 layout")
    check_vocab(lm, tokenizer, path)
    attach_sentencepiece(tokenizer, path / "tokenizer.model")
    lm = lm.to(device)
    language = LLM(lm, tokenizer, f"llava-hf:{path}", llm_fingerprint(tokenizer), "llava-hf")
    vision = VisionFeatures(model.model.vision_tower, config.vision_feature_layer,
                            config.vision_feature_select_strategy).to(device)
    if config.projector_hidden_act != "gelu":
        raise V2LError(f"{path}: projector activation {config.projector_hidden_act!r}; LLaVA-1.5's "
                       "mlp2x_gelu uses GELU")
    proj = model.model.multi_modal_projector    # shared layers, as LLaVA's Sequential
    projector = nn.Sequential(proj.linear_1, proj.act, proj.linear_2).to(device)
    return LlavaParts(vision, projector, language, ImagePreprocess(path, pad),
                      getattr(config, "image_token_id", None), f"llava-hf:{path}")


def _is_open_clip(vision, pretrained) -> bool:
    return pretrained is not None or (Path(vision) / "open_clip_config.json").is_file()


def _load_parts(llm_path, vision_path, projector_path, dtype, device, pad: bool, attn: str,
                feature_layer: int, vision_pretrained=None, allow_unsafe: bool = False) -> LlavaParts:
    refuse_llava_as_llm(llm_path)
    open_clip = _is_open_clip(vision_path, vision_pretrained)
    vision_path, projector_path = Path(vision_path), Path(projector_path)
    if not open_clip:
        if not vision_path.is_dir():
            raise V2LError(f"{vision_path}: vision tower directory not found; give a CLIP directory "
                           "(e.g. openai/clip-vit-large-patch14-336) as --vision_tower")
        _check_vision_dir(vision_path)
    state = read_projector(projector_path)
    language = load_llm(llm_path, dtype=dtype, device=device)
    if attn in ("sdpa", "eager"):
        language.model.set_attn_implementation(attn)
    if open_clip:
        vision, preprocess = _open_clip_tower(str(vision_path), vision_pretrained, allow_unsafe,
                                              feature_layer, pad)
        vision = vision.to(device, dtype)
    else:
        vision = VisionFeatures(_hf_clip_tower(vision_path, dtype), feature_layer, "default").to(device)
        preprocess = ImagePreprocess(vision_path, pad)
    projector = _projector(state, projector_path, vision.width, language.model.config.hidden_size,
                           device, dtype)
    return LlavaParts(vision, projector, language, preprocess, None,
                      f"llava-parts:{language.ident}+{vision_path}+{projector_path}")


def _projector(state: dict, path, width: int, hidden: int, device, dtype) -> nn.Module:
    """``read_projector``'s state as LLaVA's mlp2x_gelu from ``width`` to ``hidden``, checked."""
    check_projector(state, width, hidden, path)
    projector = mlp2x_gelu(width, hidden)
    projector.load_state_dict(state)
    return projector.to(device, dtype)


def _hf_clip_tower(path: Path, dtype):
    from transformers import CLIPVisionModel
    try:
        with _quiet_transformers():
            return CLIPVisionModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise V2LError(f"{path}: cannot load this CLIP vision tower ({first}); check the files "
                       "are complete") from e


def _open_clip_tower(spec: str, pretrained, allow_unsafe: bool, layer: int, pad: bool):
    """(OpenClipFeatures, ImagePreprocess) of an open_clip model: its vision tower, and LLaVA's
    preprocessing at its image size with its mean and std."""
    from models.clip import load_clip
    bundle = load_clip(spec, pretrained, device="cpu", allow_unsafe=allow_unsafe)
    return (OpenClipFeatures(bundle.model.visual, layer),
            ImagePreprocess.clip(bundle.image_size, bundle.mean, bundle.std, pad))


def read_projector(path) -> dict[str, torch.Tensor]:
    """LLaVA's mm_projector.bin -> the state dict of ``mlp2x_gelu`` (keys 0.*, 2.*). Keys with
    the ``model.mm_projector.`` prefix (LLaVA's own file) or without it are read."""
    path = Path(path)
    if not path.is_file():
        raise V2LError(f"{path}: projector file not found; give LLaVA-1.5's mm_projector.bin "
                       "as --mm_projector")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load / safetensors raise assorted types on a bad file
        raise V2LError(f"{path}: not a readable projector file ({type(e).__name__}); give "
                       "LLaVA-1.5's mm_projector.bin") from e
    if not isinstance(raw, dict):
        raise V2LError(f"{path}: holds a {type(raw).__name__}, not a state dict; give LLaVA-1.5's "
                       "mm_projector.bin")
    state = {k[len(PROJECTOR_PREFIX):] if k.startswith(PROJECTOR_PREFIX) else k: v
             for k, v in raw.items()}
    want = ["0.bias", "0.weight", "2.bias", "2.weight"]
    if sorted(state) != want:
        raise V2LError(f"{path}: keys {sorted(raw)[:6]} are not an mlp2x_gelu projector's "
                       f"(model.mm_projector.{{0,2}}.{{weight,bias}}); give LLaVA-1.5's mm_projector.bin")
    return state


def check_projector(state: dict[str, torch.Tensor], vision_width: int, hidden: int, where) -> None:
    """One line when the projector does not fit the vision tower's width or the LLM's hidden
    size."""
    w0, w2 = state["0.weight"], state["2.weight"]
    if w0.dim() != 2 or w2.dim() != 2:
        raise V2LError(f"{where}: projector weights are not matrices; give LLaVA-1.5's mm_projector.bin")
    if w0.shape[1] != vision_width:
        raise V2LError(f"{where}: the projector takes {w0.shape[1]}-wide vision features but the "
                       f"vision tower gives {vision_width}; give the projector trained with this "
                       "vision tower (LLaVA-1.5: CLIP ViT-L/14-336, 1024)")
    if w0.shape[0] != hidden or tuple(w2.shape) != (hidden, hidden):
        raise V2LError(f"{where}: the projector outputs {w2.shape[0]} channels but the LLM's hidden "
                       f"size is {hidden}; give the projector trained for this LLM (Vicuna-7B: 4096)")
    if state["0.bias"].shape != (hidden,) or state["2.bias"].shape != (hidden,):
        raise V2LError(f"{where}: projector biases do not fit its weights; the file is damaged")
