"""Tiny randomly initialised Llama models (real transformers classes, a real
sentencepiece tokenizer trained here on generated text), saved in the formats
users have, so tests exercise the same loading paths as LLaMA-2-7B.

    make_tiny_llama(dir, fmt="hf")                 # Hugging Face directory
    make_tiny_llama(dir, fmt="meta", n_shards=2)   # Meta's consolidated.NN.pth layout
    make_tiny_llama(dir, fmt="gguf")               # dir/tiny-llama.gguf (llama.cpp layout)

Also the literal one-prompt-at-a-time greedy loop (the authors' scheme), the
reference that the batched decoding is checked against.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("a photo of the cat dog bird tree house car red blue green small big old young "
         "running sitting flying on in with and under near water sky road man woman child "
         "black white yellow wooden metal glass shiny dark bright happy sleeping eating").split()


def make_sentencepiece_model(out_dir, vocab_size: int = 400, seed: int = 0,
                             space_runs: bool = False) -> str:
    """Train a LLaMA-style sentencepiece BPE model (byte fallback, split digits, ids
    0/1/2 = <unk>/<s>/</s>) on generated sentences; return the tokenizer.model path.
    space_runs: also lines with leading and repeated spaces, so that whitespace-only
    pieces ("▁▁", as in LLaMA-2's vocabulary) are learned."""
    import sentencepiece as spm
    rng = random.Random(seed)
    tails = [".", "!", ",", " 42", " 2024", "", "?"]
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(tails)
             for _ in range(3000)]
    if space_runs:
        lines += [" " * rng.randint(1, 4) + (" " * rng.randint(1, 3)).join(
            rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(1000)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "spm"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return str(prefix) + ".model"


def tiny_llama_model(vocab_size: int, num_kv_heads: int = 2, seed: int = 0, hidden: int = 64,
                     layers: int = 2, heads: int = 4, intermediate: int = 128):
    """A random LlamaForCausalLM (fp32, eval). num_kv_heads < heads gives grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def make_tiny_llama(out_dir, fmt: str = "hf", n_shards: int = 1, num_kv_heads: int = 2,
                    seed: int = 0, vocab_size: int = 400) -> str:
    """Write a tiny Llama (+ its sentencepiece tokenizer) as a "hf" or "meta" directory, or a
    "gguf" file inside out_dir; return the path to load."""
    from models.meta_llama import sentencepiece_tokenizer
    from meta_export import save_meta_llama
    out_dir = Path(out_dir)
    sp_file = make_sentencepiece_model(out_dir.parent / f".{out_dir.name}-spm", vocab_size, seed)
    tokenizer = sentencepiece_tokenizer(sp_file)
    model = tiny_llama_model(len(tokenizer), num_kv_heads, seed)
    if fmt == "hf":
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    elif fmt == "meta":
        save_meta_llama(model, sp_file, out_dir, n_shards=n_shards)
    elif fmt == "gguf":
        return save_gguf_llama(model, sp_file, out_dir / "tiny-llama.gguf")
    else:
        raise ValueError(f"fmt must be 'hf', 'meta' or 'gguf', got {fmt!r}")
    return str(out_dir)


_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}


def save_gguf_llama(model, sp_file, path) -> str:
    """Write a Llama as an F32 GGUF file the way llama.cpp lays it out (Meta's rotary row order,
    the sentencepiece vocabulary with scores and token types); return its path."""
    import gguf
    import sentencepiece as spm

    from models.meta_llama import _meta_unpermute
    c, sp = model.config, spm.SentencePieceProcessor(model_file=str(sp_file))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    n = sp.get_piece_size()
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                       for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for key, v in model.state_dict().items():
        if key in _GGUF_TOP:
            name = _GGUF_TOP[key]
        else:
            parts = key.split(".")
            module = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{_GGUF_LAYER[module]}.weight"
            if module == "self_attn.q_proj":
                v = _meta_unpermute(v, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                v = _meta_unpermute(v, c.num_key_value_heads)
        w.add_tensor(name, v.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@torch.no_grad()
def reference_next_tokens(model, token_lists: list[list[int]]) -> torch.Tensor:
    """One prompt at a time, no padding, no cache: the greedy next token of each."""
    device = model.get_input_embeddings().weight.device
    out = [model(input_ids=torch.tensor([t], device=device)).logits[0, -1].argmax().item()
           for t in token_lists]
    return torch.tensor(out, dtype=torch.long)


def reference_expand(model, tokenizer, subwords: list[str], template: str = "a photo of {}",
                     add_bos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' scheme, literally: per subword, prompt, one greedy token, decode it,
    re-prompt with the bigram text, one more greedy token. Returns (next1, next2)."""
    from engine.vocabulary import prompt_text
    from models.llm import encode_prompts, token_strings
    first, second = [], []
    for s1 in subwords:
        t1 = reference_next_tokens(model, encode_prompts(tokenizer, [prompt_text(template, s1)], add_bos))
        s2 = token_strings(tokenizer, t1, skip_special=True)[0]
        t2 = reference_next_tokens(model, encode_prompts(tokenizer, [prompt_text(template, s1 + s2)],
                                                         add_bos))
        first.append(int(t1[0]))
        second.append(int(t2[0]))
    return torch.tensor(first), torch.tensor(second)
