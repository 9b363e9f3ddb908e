"""Meta's original LLaMA layout -> transformers' LlamaForCausalLM, and its sentencepiece tokenizer.

``attach_sentencepiece`` gives a text tokenizer the sentencepiece processor of a
``tokenizer.model`` (Meta directories; Hugging Face directories that ship one), so
``models.llm.encode_segment`` encodes prompt segments as Meta's ``Tokenizer.encode``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from utils.errors import V2LError

SENTENCEPIECE_ATTR = "sentencepiece"  # a tokenizer's attached SentencePieceProcessor, when known

# Meta name -> transformers name, per decoder layer.
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# Dimension along which Meta's model-parallel shards split each weight (None: replicated).
# Column-parallel linears split their output rows, row-parallel ones their input
# columns; LLaMA-1/2's ParallelEmbedding splits the embedding dimension.
_SHARD_DIM = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
              "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1,
              "feed_forward.w3.weight": 0, "attention_norm.weight": None, "ffn_norm.weight": None,
              "tok_embeddings.weight": 1, "norm.weight": None, "output.weight": 0}
def _meta_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's rotary layout (interleaved pairs per head) -> transformers' (two halves per head)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _meta_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of _meta_permute: transformers' layout -> Meta's."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier=None) -> int:
    """The feed-forward width Meta's LLaMA code derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_files(path: Path) -> tuple[dict, Path, list[Path]]:
    """params, tokenizer.model and the shard list of a Meta directory, checked for completeness."""
    params_file = path / "params.json"
    if not params_file.is_file():
        raise V2LError(f"{path}: incomplete Meta LLaMA directory, params.json missing; "
                       "copy it from the original download")
    try:
        params = json.loads(params_file.read_text())
    except json.JSONDecodeError as e:
        raise V2LError(f"{params_file}: not valid JSON ({e}); restore it from the original download")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise V2LError(f"{params_file}: lacks {', '.join(missing)}; not a LLaMA params.json, "
                       "restore it from the original download")
    tok_file = next((p for p in (path / "tokenizer.model", path.parent / "tokenizer.model")
                if p.is_file()), None)
    if tok_file is None:
        raise V2LError(f"{path}: tokenizer.model not found here or in the parent directory; "
                       "copy Meta's tokenizer.model next to params.json")
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise V2LError(f"{path}: no consolidated.*.pth weight shards; the download is incomplete")
    numbers = [int(p.name.split(".")[1]) if p.name.split(".")[1].isdigit() else -1 for p in shards]
    if numbers != list(range(len(shards))):
        raise V2LError(f"{path}: weight shards are numbered {numbers}, expected 0..{len(shards) - 1}; "
                       "a shard is missing, download it again")
    return params, tok_file, shards


def meta_config(params: dict, vocab_size: int, intermediate_size: int):
    """transformers LlamaConfig from Meta's params.json (the weights fix vocab and FFN width)."""
    from transformers import LlamaConfig
    dim, n_heads = params["dim"], params["n_heads"]
    expected = meta_intermediate_size(dim, params.get("multiple_of", 256),
                                      params.get("ffn_dim_multiplier"))
    if expected != intermediate_size:
        raise V2LError(f"params.json implies a feed-forward width of {expected} (dim, multiple_of, "
                       f"ffn_dim_multiplier) but the weights have {intermediate_size}; "
                       "params.json belongs to another model")
    if params.get("vocab_size", -1) not in (-1, vocab_size):
        raise V2LError(f"params.json says vocab_size {params['vocab_size']} but the weights have "
                       f"{vocab_size} rows; params.json belongs to another model")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=intermediate_size,
        num_hidden_layers=params["n_layers"], num_attention_heads=n_heads,
        num_key_value_heads=params.get("n_kv_heads") or n_heads,
        rms_norm_eps=params.get("norm_eps", 1e-5), max_position_embeddings=params.get("max_seq_len", 4096),
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def meta_to_hf_state_dict(shards: list[dict], params: dict, convert=None) -> dict[str, torch.Tensor]:
    """Merge Meta's model-parallel shards and rename/permute them into a transformers state dict.

    ``convert`` (tensor -> tensor, e.g. to the device and dtype) is applied to each shard's piece
    before it is merged or permuted, one weight at a time, so that with memory-mapped shards no
    whole-model copy is made where the pieces are read (both are exact: a dtype cast per
    element, then concatenation and row reordering)."""
    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    convert = convert or (lambda t: t)
    out = {}

    def merged(key: str) -> torch.Tensor:
        dim = _SHARD_DIM[key.split(".", 2)[-1] if key.startswith("layers.") else key]
        if dim is None or len(shards) == 1:
            return convert(shards[0][key])
        return torch.cat([convert(s[key]) for s in shards], dim=dim)

    for key, name in _TOP_KEYS.items():
        out[name] = merged(key)
    for i in range(params["n_layers"]):
        for key, name in _LAYER_KEYS.items():
            w = merged(f"layers.{i}.{key}")
            if key == "attention.wq.weight":
                w = _meta_permute(w, n_heads)
            elif key == "attention.wk.weight":
                w = _meta_permute(w, n_kv)
            out[f"model.layers.{i}.{name}"] = w
    return out


def to_device(device, dtype: torch.dtype):
    """One weight to ``device`` then ``dtype`` (the cast where the weight lands: on a GPU,
    Meta's bf16 becomes fp16 there, with no converted copy in host memory)."""
    device = torch.device(device)

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device).to(dtype)
    return convert


def load_meta(path: Path, dtype: torch.dtype, device="cpu"):
    """(transformers LlamaForCausalLM on ``device`` in ``dtype``, text tokenizer) from a Meta
    directory. The shards are memory-mapped (the operating system's page cache, which the
    processes of one machine share, holds them) and each weight goes to the device and dtype
    on its own: no whole-model copy in host memory per process."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    params, tok_file, shard_files = _meta_files(path)
    shards = []
    for f in shard_files:
        try:
            shards.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # torch raises many types for a damaged archive
            raise V2LError(f"{f}: unreadable weight shard ({type(e).__name__}); download it again") from e
    emb = shards[0].get("tok_embeddings.weight")
    if emb is None:
        raise V2LError(f"{shard_files[0]}: not a LLaMA checkpoint (no tok_embeddings.weight)")
    if emb.shape[1] * len(shards) != params["dim"]:
        raise V2LError(f"{path}: {len(shards)} shard(s) hold {emb.shape[1] * len(shards)} of "
                       f"{params['dim']} embedding dims; shards are missing, download them again")
    intermediate = sum(s["layers.0.feed_forward.w1.weight"].shape[0] for s in shards)
    config = meta_config(params, emb.shape[0], intermediate)
    try:
        state = meta_to_hf_state_dict(shards, params, to_device(device, dtype))
    except KeyError as e:
        raise V2LError(f"{path}: weight {e} missing from the shards; the checkpoint is incomplete") from e
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, assign=True, strict=True)
    # its buffers are not in checkpoints: made on the CPU, as transformers' own loading does
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    return model, sentencepiece_tokenizer(tok_file)


def sentencepiece_tokenizer(tok_file):
    """transformers' LlamaTokenizer built from a sentencepiece tokenizer.model (Meta's)."""
    import shutil
    import tempfile

    from transformers import LlamaTokenizer
    tok_file = Path(tok_file)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(tok_file, Path(tmp) / "tokenizer.model")
        try:
            tokenizer = LlamaTokenizer.from_pretrained(tmp)
        except Exception as e:  # sentencepiece/protobuf raise assorted types on a bad file
            raise V2LError(f"{tok_file}: not a sentencepiece tokenizer model ({type(e).__name__}); "
                           "LLaMA-3 style tiktoken files are not supported, convert to Hugging Face "
                           "format instead") from e
    attach_sentencepiece(tokenizer, tok_file)  # prompt segments encode as Meta's Tokenizer
    return tokenizer


def attach_sentencepiece(text_tokenizer, model_file) -> bool:
    """Attach the sentencepiece processor of ``model_file`` to a LLaMA-style text tokenizer so
    ``models.llm.encode_segment`` calls sentencepiece itself; only when the file exists and its
    pieces are the tokenizer's own (checked on every id). Returns whether it was attached."""
    model_file = Path(model_file)
    if not model_file.is_file():
        return False
    try:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except Exception:  # sentencepiece missing, or not a sentencepiece file: keep transformers'
        return False
    n = sp.get_piece_size()
    if n > len(text_tokenizer) or \
            text_tokenizer.convert_ids_to_tokens(list(range(n))) != [sp.id_to_piece(i) for i in range(n)]:
        return False
    setattr(text_tokenizer, SENTENCEPIECE_ATTR, sp)
    return True
