"""What several benches share: a timer that waits for the GPU, and a LLaMA-architecture model
with a sentencepiece tokenizer trained on the spot (tiny on CPU, LLaMA-2-7B's shape on a GPU)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

# words for made-up image words and captions
VOCAB = ("dog cat bird tree grass sky water red blue green small big old young wooden metal "
         "glass shiny dark bright running sitting flying").split()


def timed(fn) -> tuple[float, object]:
    """(seconds, fn()) with CUDA work finished before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def llama_and_tokenizer(preset: str, seed: int):
    """(random-init LlamaForCausalLM in eval mode, its text tokenizer). preset "llama2-7b":
    LLaMA-2-7B's shape in fp16 on the GPU; anything else: a 4-layer model on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.meta_llama import sentencepiece_tokenizer
    from tiny_llm import make_sentencepiece_model
    sp = make_sentencepiece_model(Path(tempfile.mkdtemp()) / "spm", 384, seed)
    text_tokenizer = sentencepiece_tokenizer(Path(sp))
    torch.manual_seed(seed)
    shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32) if preset == "llama2-7b" else \
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
    config = LlamaConfig(vocab_size=len(text_tokenizer), max_position_embeddings=4096, **shape)
    if preset == "llama2-7b":
        with torch.device("cuda"):
            return LlamaForCausalLM(config).half().eval(), text_tokenizer
    return LlamaForCausalLM(config).eval(), text_tokenizer
