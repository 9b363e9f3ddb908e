"""The LLM memory model: parameter count and KV cache against real transformers models, and
the batch size it picks against its own arithmetic."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig

from utils.errors import V2LError
from utils.memory import (kv_bytes_per_token, llm_batch_size, llm_memory_bytes, llm_param_count,
                          weight_bytes)

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)


def _meta_params(config) -> int:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", [
    LLAMA2_7B,
    dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
         num_key_value_heads=2, vocab_size=300),
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
         num_key_value_heads=8, vocab_size=500, tie_word_embeddings=True, head_dim=16),
])
def test_param_count_matches_transformers(shape):
    config = LlamaConfig(**shape)
    assert llm_param_count(config) == _meta_params(config)
    assert llm_param_count(config.to_dict()) == _meta_params(config)
    assert weight_bytes(config, 2) == 2 * _meta_params(config)


def test_llama2_7b_sizes():
    config = LlamaConfig(**LLAMA2_7B)
    assert llm_param_count(config) == 6_738_415_616
    assert kv_bytes_per_token(config, 2) == 2 * 32 * 4096 * 2  # 512 KiB


@torch.no_grad()
def test_kv_bytes_match_a_real_cache():
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    batch, tokens = 3, 11
    out = model(input_ids=torch.randint(0, 100, (batch, tokens)), use_cache=True)
    cache = out.past_key_values
    held = sum(layer.keys.numel() * layer.keys.element_size()
               + layer.values.numel() * layer.values.element_size() for layer in cache.layers)
    assert held == batch * tokens * kv_bytes_per_token(config, 4)


def test_batch_size_is_the_largest_that_fits():
    config = LlamaConfig(**LLAMA2_7B)
    free = 80 * 2 ** 30
    b = llm_batch_size(config, 2, prompt_tokens=600, new_tokens=20, free_bytes=free)
    assert b >= 1
    assert llm_memory_bytes(config, 2, 600, 20, b) <= 0.8 * free
    assert llm_memory_bytes(config, 2, 600, 20, b + 1) > 0.8 * free
    # an 8-bit KV cache holds more sequences; a longer prompt fewer; a cap is obeyed
    assert llm_batch_size(config, 2, 600, 20, free, kv_dtype_bytes=1) > b
    assert llm_batch_size(config, 2, 1200, 20, free) < b
    assert llm_batch_size(config, 2, 600, 20, free, max_batch=3) == 3
    # measured after loading: the weights are not paid again
    after = free - weight_bytes(config, 2)
    assert llm_batch_size(config, 2, 600, 20, after, include_weights=False, safety=1.0) == \
        llm_batch_size(config, 2, 600, 20, free, safety=1.0)


def test_llava_config_uses_its_language_model():
    text = LlamaConfig(**LLAMA2_7B)
    llava = LlavaConfig(text_config=text.to_dict())
    assert kv_bytes_per_token(llava, 2) == kv_bytes_per_token(text, 2)
    assert llm_param_count(llava) == llm_param_count(text)


def test_too_little_memory_is_one_clear_error():
    config = LlamaConfig(**LLAMA2_7B)
    with pytest.raises(V2LError, match="GiB"):
        llm_batch_size(config, 2, 600, 20, free_bytes=12 * 2 ** 30)
    with pytest.raises(V2LError, match="missing"):
        llm_batch_size({"hidden_size": 8}, 2, 600, 20, free_bytes=2 ** 40)
