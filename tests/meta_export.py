"""Write a transformers Llama in Meta's original layout (the loader's inverse, for tests)."""
from __future__ import annotations

from pathlib import Path

from models.meta_llama import _LAYER_KEYS, _SHARD_DIM, _TOP_KEYS, _meta_unpermute, meta_intermediate_size
from utils.errors import V2LError


def save_meta_llama(model, tokenizer_model_path, out_dir, n_shards: int = 1) -> Path:
    """Write a transformers Llama in Meta's original layout (params.json, consolidated.NN.pth shards,
    tokenizer.model): the inverse of the loader, for tests and for exporting."""
    import shutil
    config = model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    if n_heads % n_shards or n_kv % n_shards or config.hidden_size % n_shards:
        raise V2LError(f"n_shards={n_shards} must divide the heads ({n_heads}), kv heads ({n_kv}) "
                       f"and width ({config.hidden_size})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    inverse = {v: k for k, v in _TOP_KEYS.items()}
    meta = {inverse[k]: v for k, v in sd.items() if k in inverse}
    if "output.weight" not in meta:  # tied embeddings
        meta["output.weight"] = sd["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        for key, name in _LAYER_KEYS.items():
            w = sd[f"model.layers.{i}.{name}"]
            if key == "attention.wq.weight":
                w = _meta_unpermute(w, n_heads)
            elif key == "attention.wk.weight":
                w = _meta_unpermute(w, n_kv)
            meta[f"layers.{i}.{key}"] = w
    from utils.artifacts import save_json, save_torch
    for s in range(n_shards):
        shard = {}
        for key, w in meta.items():
            dim = _SHARD_DIM[key.split(".", 2)[-1] if key.startswith("layers.") else key]
            shard[key] = w.clone() if dim is None else w.chunk(n_shards, dim=dim)[s].clone()
        save_torch(out_dir / f"consolidated.{s:02d}.pth", shard)
    dim, inter = config.hidden_size, config.intermediate_size
    params = {"dim": dim, "n_layers": config.num_hidden_layers, "n_heads": n_heads, "n_kv_heads": n_kv,
              "vocab_size": config.vocab_size, "norm_eps": config.rms_norm_eps,
              "rope_theta": float((config.rope_parameters or {}).get("rope_theta", 10000.0)),
              "multiple_of": 256}
    if meta_intermediate_size(dim, 256) != inter:  # a width Meta's rule yields with one multiple
        params["multiple_of"] = inter
        base = int(2 * (4 * dim) / 3)
        if base > inter:
            params["ffn_dim_multiplier"] = inter / base
    save_json(out_dir / "params.json", params)
    shutil.copy(tokenizer_model_path, out_dir / "tokenizer.model")
    return out_dir
