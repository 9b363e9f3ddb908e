"""A tiny randomly initialised LLaVA-1.5 (real transformers classes), saved in the two forms
users have, so tests exercise the same loading paths as llava-1.5-7b:

    paths = make_tiny_llava(dir)
    paths["llava"]       # a llava-hf directory (LlavaForConditionalGeneration, its tokenizer with
                         # "<image>", a CLIPImageProcessor preprocessor_config.json)
    paths["llm"]         # the same language model as a Hugging Face LLaMA directory (Vicuna's
                         # place: the vocabulary without "<image>")
    paths["vision"]      # the same vision tower as a CLIP directory (a whole CLIPModel, as
                         # openai/clip-vit-large-patch14-336 is)
    paths["projector"]   # the same projector as LLaVA's mm_projector.bin (model.mm_projector.{0,2}.*)
    paths["open_clip"]   # the same vision tower as an open_clip model directory (QuickGELU, as
                         # OpenAI's ViT-L-14-336), its weights converted from transformers' layout

The vision tower is a CLIP ViT at 56 px with 14 px patches: 16 patches + CLS; the feature layer
is -2 and the CLS is dropped, as LLaVA-1.5's (576 patches at 336 px).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_llm import make_sentencepiece_model

IMAGE_SIZE, PATCH = 56, 14
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TEXT_VOCAB = 400          # the sentencepiece vocabulary (Vicuna's place)
ROWS = 448                # llava-hf's embedding rows: "<image>" added, padded to a multiple of 64


def preprocessor_config(size: int = IMAGE_SIZE) -> dict:
    """The preprocessor_config.json of CLIP ViT-L/14-336 (and of llava-hf), at ``size``."""
    return {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": size, "width": size},
            "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
            "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3,
            "rescale_factor": 1 / 255, "size": {"shortest_edge": size}}


def tiny_llava_model(seed: int = 0, vision_hidden: int = 32, text_hidden: int = 64):
    """A random LlavaForConditionalGeneration (fp32, eval, sdpa) of LLaVA-1.5's structure."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=3, num_attention_heads=2, image_size=IMAGE_SIZE,
                              patch_size=PATCH, projection_dim=16, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=ROWS, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2, initializer_range=0.2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=TEXT_VOCAB,
                         image_seq_length=N_PATCHES, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():   # larger projector and vision weights: features far from uniform
        for name, p in model.named_parameters():
            if ("multi_modal_projector" in name or "vision_tower" in name) and p.dim() == 2:
                p.normal_(0, 0.2)
    model.set_attn_implementation("sdpa")
    return model


def make_tiny_llava(out_dir, seed: int = 0) -> dict[str, str]:
    """Write the tiny LLaVA in both forms under ``out_dir``; return their paths (module doc)."""
    from transformers import CLIPConfig, CLIPModel, LlamaForCausalLM

    from models.meta_llama import sentencepiece_tokenizer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sp_file = make_sentencepiece_model(out_dir / ".spm", TEXT_VOCAB, seed)
    model = tiny_llava_model(seed)
    paths = {k: str(out_dir / k) for k in ("llava", "llm", "vision")}
    paths["projector"] = str(out_dir / "projector" / "mm_projector.bin")
    paths["open_clip"] = str(out_dir / "open_clip")

    tokenizer = sentencepiece_tokenizer(sp_file)     # Vicuna's: the sentencepiece vocabulary
    tokenizer.save_pretrained(paths["llm"])
    llava_tokenizer = sentencepiece_tokenizer(sp_file)
    llava_tokenizer.add_tokens(["<image>"], special_tokens=True)
    assert llava_tokenizer.convert_tokens_to_ids("<image>") == TEXT_VOCAB
    model.save_pretrained(paths["llava"])
    llava_tokenizer.save_pretrained(paths["llava"])
    (Path(paths["llava"]) / "preprocessor_config.json").write_text(json.dumps(preprocessor_config()))

    # the language model alone, without the rows llava-hf added
    lm = LlamaForCausalLM(model.config.text_config.__class__(
        **{**model.config.text_config.to_dict(), "vocab_size": TEXT_VOCAB})).eval()
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:TEXT_VOCAB]
    state["lm_head.weight"] = state["lm_head.weight"][:TEXT_VOCAB]
    lm.load_state_dict(state)
    lm.save_pretrained(paths["llm"])

    # the vision tower inside a whole CLIP model (text tower random), as OpenAI's CLIP directory
    vc = model.config.vision_config
    clip = CLIPModel(CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64,
                                             "num_hidden_layers": 1, "num_attention_heads": 2,
                                             "vocab_size": 100, "projection_dim": 16,
                                             "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                                vision_config=vc.to_dict(), projection_dim=16))
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(paths["vision"])
    (Path(paths["vision"]) / "preprocessor_config.json").write_text(json.dumps(preprocessor_config()))

    open_clip_vision(model.model.vision_tower, paths["open_clip"])

    proj = model.model.multi_modal_projector
    Path(paths["projector"]).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model.mm_projector.0.weight": proj.linear_1.weight.detach().clone(),
                "model.mm_projector.0.bias": proj.linear_1.bias.detach().clone(),
                "model.mm_projector.2.weight": proj.linear_2.weight.detach().clone(),
                "model.mm_projector.2.bias": proj.linear_2.bias.detach().clone()}, paths["projector"])
    return paths


def open_clip_vision(tower, out_dir) -> str:
    """Save transformers' ``CLIPVisionModel`` ``tower`` as an open_clip CLIP directory (a random
    text tower beside it): the same vision weights under open_clip's names (q/k/v stacked into
    ``in_proj``)."""
    import open_clip

    from models.clip import save_open_clip_dir
    c = tower.config
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": c.image_size, "patch_size": c.patch_size,
                          "layers": c.num_hidden_layers, "width": c.hidden_size,
                          "head_width": c.hidden_size // c.num_attention_heads,
                          "mlp_ratio": c.intermediate_size / c.hidden_size},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
           "quick_gelu": c.hidden_act == "quick_gelu"}
    model = open_clip.CLIP(**{k: v for k, v in cfg.items() if k != "quick_gelu"},
                           quick_gelu=cfg["quick_gelu"]).eval()
    hf = tower.state_dict()
    state = {"conv1.weight": hf["embeddings.patch_embedding.weight"],
             "class_embedding": hf["embeddings.class_embedding"],
             "positional_embedding": hf["embeddings.position_embedding.weight"],
             "ln_pre.weight": hf["pre_layrnorm.weight"], "ln_pre.bias": hf["pre_layrnorm.bias"],
             "ln_post.weight": hf["post_layernorm.weight"], "ln_post.bias": hf["post_layernorm.bias"]}
    for i in range(c.num_hidden_layers):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for x in ("weight", "bias"):
            state[b + "ln_1." + x] = hf[a + "layer_norm1." + x]
            state[b + "ln_2." + x] = hf[a + "layer_norm2." + x]
            state[b + "attn.in_proj_" + x] = torch.cat([hf[a + f"self_attn.{q}_proj.{x}"] for q in "qkv"])
            state[b + "attn.out_proj." + x] = hf[a + "self_attn.out_proj." + x]
            state[b + "mlp.c_fc." + x] = hf[a + "mlp.fc1." + x]
            state[b + "mlp.c_proj." + x] = hf[a + "mlp.fc2." + x]
    missing, unexpected = model.visual.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"proj"}, (missing, unexpected)
    save_open_clip_dir(model, cfg, out_dir, {"size": c.image_size, "mean": CLIP_MEAN, "std": CLIP_STD,
                                             "interpolation": "bicubic"})
    return str(out_dir)
