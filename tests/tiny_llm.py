"""Tiny randomly initialised Llama models (real transformers classes, a real
sentencepiece tokenizer trained here on generated text), saved in the formats
users have, so tests exercise the same loading paths as LLaMA-2-7B.

    make_tiny_llama(dir, fmt="hf")                 # Hugging Face directory
    make_tiny_llama(dir, fmt="meta", n_shards=2)   # Meta's consolidated.NN.pth layout

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


def make_sentencepiece_model(out_dir, vocab_size: int = 400, seed: int = 0) -> str:
    """Train a LLaMA-style sentencepiece BPE model (byte fallback, split digits, ids
    0/1/2 = <unk>/<s>/</s>) on generated sentences; return the tokenizer.model path."""
    import sentencepiece as spm
    rng = random.Random(seed)
    tails = [".", "!", ",", " 42", " 2024", "", "?"]
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(tails)
             for _ in range(3000)]
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
    """Write a tiny Llama (+ its sentencepiece tokenizer) as a "hf" or "meta" directory; return it."""
    from transformers import LlamaTokenizer

    from models.llm import _sentencepiece_tokenizer, save_meta_llama
    out_dir = Path(out_dir)
    sp_file = make_sentencepiece_model(out_dir.parent / f".{out_dir.name}-spm", vocab_size, seed)
    tokenizer = _sentencepiece_tokenizer(Path(sp_file), LlamaTokenizer)
    model = tiny_llama_model(len(tokenizer), num_kv_heads, seed)
    if fmt == "hf":
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    elif fmt == "meta":
        save_meta_llama(model, sp_file, out_dir, n_shards=n_shards)
    else:
        raise ValueError(f"fmt must be 'hf' or 'meta', got {fmt!r}")
    return str(out_dir)


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
    from models.llm import encode_prompts, prompt_text, token_strings
    first, second = [], []
    for s1 in subwords:
        t1 = reference_next_tokens(model, encode_prompts(tokenizer, [prompt_text(template, s1)], add_bos))
        s2 = token_strings(tokenizer, t1, skip_special=True)[0]
        t2 = reference_next_tokens(model, encode_prompts(tokenizer, [prompt_text(template, s1 + s2)],
                                                         add_bos))
        first.append(int(t1[0]))
        second.append(int(t2[0]))
    return torch.tensor(first), torch.tensor(second)
