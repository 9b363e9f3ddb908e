"""What a model directory is, LLaVA-wise, from its config.json alone (no model code imported):
a llava-hf checkpoint (``LlavaForConditionalGeneration``) or an original LLaVA checkpoint
(``LlavaLlamaForCausalLM``). ``refuse_llava_as_llm`` is the one-line refusal for either where
a causal LM is expected (``models.llm.load_llm`` can call it: this module imports nothing of
``models``)."""
from __future__ import annotations

import json
from pathlib import Path

from utils.errors import V2LError


def read_config(path) -> dict | None:
    """A directory's config.json as a dict (None when there is none or it is not JSON)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def architectures(config: dict | None) -> list[str]:
    return list((config or {}).get("architectures") or [])


def is_llava_dir(path) -> bool:
    """True for a llava-hf directory (``LlavaForConditionalGeneration``: a config with
    ``vision_config`` and ``text_config``)."""
    config = read_config(path)
    return bool(config) and ("LlavaForConditionalGeneration" in architectures(config)
                             or (config.get("model_type") == "llava" and "text_config" in config))


def is_original_llava_dir(path) -> bool:
    """True for an original (liuhaotian) LLaVA directory: ``LlavaLlamaForCausalLM`` with
    ``mm_vision_tower`` in its config."""
    config = read_config(path)
    return bool(config) and ("LlavaLlamaForCausalLM" in architectures(config)
                             or "mm_vision_tower" in config)


def refuse_llava_as_llm(path, flag: str = "--llava") -> None:
    """Raise a one-line V2LError when ``path``, given where a causal LM is expected, is a LLaVA
    checkpoint (``models.llm.load_llm`` cannot read one: in transformers 5.x a llava-hf
    directory is not a causal LM)."""
    if path is None or not Path(path).is_dir():
        return
    if is_llava_dir(path):
        raise V2LError(f"{path} is a LLaVA checkpoint (LlavaForConditionalGeneration); give it as "
                       f"{flag}, or give its language model (a Hugging Face LLaMA/Vicuna directory) "
                       "as the LLM")
    if is_original_llava_dir(path):
        raise V2LError(f"{path} is an original LLaVA checkpoint (LlavaLlamaForCausalLM), which "
                       "transformers cannot load; give a llava-hf directory as --llava, or Vicuna "
                       "+ the CLIP vision tower + mm_projector.bin")
