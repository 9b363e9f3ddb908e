"""How many sequences a decoder-only LLM (LLaMA-2, LLaVA-1.5's Vicuna) can run at once on a device.

Inference memory of greedy decoding, in bytes (docs/performance_scale.md explains each term):

    weights      n_params * dtype_bytes
    KV cache     batch * (prompt_tokens + new_tokens) * kv_bytes_per_token
                 kv_bytes_per_token = 2 (K and V) * layers * kv_heads * head_dim * kv_dtype_bytes
    activations  batch * act_bytes_per_sequence: the prefill of one decoder layer is the peak
                 (no autograd: one layer's transients live at a time):
                   prompt_tokens * (5 * hidden + 3 * intermediate) * dtype_bytes
                   (residual, q/k/v, attention output; gate, up and their product in the MLP)
                 + heads * prompt_tokens^2 * 4   (attention scores in float32 when the attention
                   kernel materialises them: eager or SDPA's math path; an upper bound otherwise)
                 + (vocab * 4) * 2   (last-position logits and their float32 copy)

``llm_batch_size`` returns the largest batch whose total stays within ``safety * free_bytes``.
Pure arithmetic on the config: no tensor is allocated, so a stage can call it before loading.
"""
from __future__ import annotations

from utils.errors import V2LError


def _get(config, name: str, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _text_config(config):
    """The language model's config: itself, or ``text_config`` of a multimodal (LLaVA) config."""
    text = _get(config, "text_config")
    return text if text is not None else config


def _shape(config) -> dict:
    c = _text_config(config)
    shape = {k: _get(c, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "vocab_size")}
    missing = [k for k, v in shape.items() if not v]
    if missing:
        raise V2LError(f"LLM config {type(c).__name__}: {', '.join(missing)} missing; pass a "
                       "transformers LlamaConfig (or its dict) of the model to be run")
    heads = shape["num_attention_heads"]
    shape["num_key_value_heads"] = _get(c, "num_key_value_heads") or heads
    shape["head_dim"] = _get(c, "head_dim") or shape["hidden_size"] // heads
    shape["tie_word_embeddings"] = bool(_get(c, "tie_word_embeddings", False))
    return shape


def llm_param_count(config) -> int:
    """Parameters of a LLaMA-architecture causal LM (embeddings, decoder layers, final norm,
    LM head unless tied to the embeddings): 6,738,415,616 for LLaMA-2-7B."""
    s = _shape(config)
    h, inter, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    q = s["num_attention_heads"] * s["head_dim"]
    kv = s["num_key_value_heads"] * s["head_dim"]
    attn = h * q + 2 * h * kv + q * h
    mlp = 3 * h * inter
    layer = attn + mlp + 2 * h
    head = 0 if s["tie_word_embeddings"] else v * h
    return v * h + s["num_hidden_layers"] * layer + h + head


def weight_bytes(config, dtype_bytes: float) -> int:
    """Bytes of the LLM's weights stored at ``dtype_bytes`` per parameter."""
    return int(llm_param_count(config) * dtype_bytes)


def kv_bytes_per_token(config, dtype_bytes: float) -> int:
    """Bytes of the key/value cache one token of one sequence holds: K and V of every layer,
    ``num_key_value_heads * head_dim`` values each (512 KiB for LLaMA-2-7B in fp16)."""
    s = _shape(config)
    return int(2 * s["num_hidden_layers"] * s["num_key_value_heads"] * s["head_dim"] * dtype_bytes)


def activation_bytes_per_sequence(config, dtype_bytes: float, prompt_tokens: int) -> int:
    """Peak transient bytes one sequence adds during the prefill of ``prompt_tokens`` tokens
    (see the module docstring): one layer's hidden states and MLP intermediates, the float32
    attention scores of one layer, the last position's logits."""
    s = _shape(config)
    p = int(prompt_tokens)
    hidden = p * (5 * s["hidden_size"] + 3 * s["intermediate_size"]) * dtype_bytes
    scores = s["num_attention_heads"] * p * p * 4
    logits = s["vocab_size"] * 4 * 2
    return int(hidden + scores + logits)


def llm_memory_bytes(config, dtype_bytes: float, prompt_tokens: int, new_tokens: int, batch: int,
                     kv_dtype_bytes: float | None = None, include_weights: bool = True) -> int:
    """Modelled peak bytes of greedy decoding ``batch`` sequences of ``prompt_tokens`` prompt and
    ``new_tokens`` generated tokens (weights counted unless ``include_weights`` is False)."""
    kv = kv_bytes_per_token(config, dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes)
    per_seq = (prompt_tokens + new_tokens) * kv + activation_bytes_per_sequence(
        config, dtype_bytes, prompt_tokens)
    return (weight_bytes(config, dtype_bytes) if include_weights else 0) + batch * per_seq


def llm_batch_size(model_config, dtype_bytes: float, prompt_tokens: int, new_tokens: int,
                   free_bytes: int, kv_dtype_bytes: float | None = None, safety: float = 0.8,
                   include_weights: bool = True, extra_bytes: int = 0,
                   max_batch: int | None = None) -> int:
    """The largest batch of sequences (``prompt_tokens`` prompt tokens, the longest prompt of a
    batch, + ``new_tokens`` generated) whose modelled memory fits in ``safety * free_bytes``.

    ``free_bytes``: device memory available to the model. With ``include_weights`` (default)
    it is measured before the weights are loaded and the weights are paid from it; a caller
    measuring after loading (``torch.cuda.mem_get_info()[0]``) passes ``include_weights=False``.
    ``extra_bytes``: other resident memory to pay first (a vision tower, a projector).
    ``kv_dtype_bytes``: bytes per cached value (default ``dtype_bytes``).
    ``max_batch`` caps the answer (e.g. the number of prompts there are).
    Raises V2LError when not even one sequence fits, naming the shortfall."""
    if not 0 < safety <= 1:
        raise V2LError(f"safety {safety}: expected a fraction in (0, 1]")
    if prompt_tokens < 1 or new_tokens < 0 or dtype_bytes <= 0:
        raise V2LError(f"prompt_tokens {prompt_tokens}, new_tokens {new_tokens}, dtype_bytes "
                       f"{dtype_bytes}: expected >= 1, >= 0 and > 0")
    budget = safety * free_bytes - extra_bytes
    fixed = llm_memory_bytes(model_config, dtype_bytes, prompt_tokens, new_tokens, 0,
                             kv_dtype_bytes, include_weights)
    per_seq = llm_memory_bytes(model_config, dtype_bytes, prompt_tokens, new_tokens, 1,
                               kv_dtype_bytes, include_weights=False)
    batch = int((budget - fixed) // per_seq)
    if batch < 1:
        gib = 2 ** 30
        raise V2LError(
            f"one sequence of {prompt_tokens}+{new_tokens} tokens needs "
            f"{(fixed + per_seq + extra_bytes) / gib:.2f} GiB (weights "
            f"{fixed / gib:.2f} GiB) but {safety:g} x {free_bytes / gib:.2f} GiB free is "
            f"{safety * free_bytes / gib:.2f} GiB; use a device with more memory, fewer "
            "tokens, or a smaller dtype")
    return min(batch, max_batch) if max_batch else batch
