"""VoCo compression: the cached two-pass path equals one masked pass, the controls differ,
only VoCo weights learn, and bad settings are refused."""
import pytest
import torch

from models.voco import Image, VoCo, VoCoBlock, kv_bytes_per_token, text_logits
from tiny_llm import tiny_llama_model
from utils.errors import V2LError

pytestmark = pytest.mark.usefixtures("one_thread")

V = 300
TOL = 1e-4   # fp32: measured ~5e-6 on this model; float64 gives ~1e-15 (the paths are exact)


def make_voco(attn="sdpa", k_max=4, lora_rank=4, **kw):
    model = tiny_llama_model(V)            # initializer_range 0.2: attention is far from uniform
    model.config._attn_implementation = attn
    for p in model.parameters():
        p.requires_grad_(False)
    return VoCo(model, k_max, lora_rank=lora_rank, bos_id=1, **kw)


def ids(g, n):
    return torch.randint(3, V, (n,), generator=g).tolist()


def case(voco, k, continuous=False):
    """Two prompts of different lengths (padding), one image shared by both at different
    offsets (re-rotation), and the cached version of the same prompts."""
    g = torch.Generator().manual_seed(1)
    hidden = voco.embeddings.shape[1]
    imgs = [torch.tensor(ids(g, 7)), torch.tensor(ids(g, 11)),
            torch.randn(5, hidden, generator=g) if continuous else torch.tensor(ids(g, 5))]
    a, b, c, d, e = [1] + ids(g, 4), ids(g, 3), ids(g, 5), [1] + ids(g, 9), ids(g, 6)
    single = [[a, Image(imgs[0]), b, Image(imgs[1]), c], [d, Image(imgs[2]), b, Image(imgs[0]), e]]
    return imgs, single, lambda blocks: [[a, blocks[0], b, blocks[1], c], [d, blocks[2], b, blocks[0], e]]


def max_diff(x, y):
    assert [t.shape for t in x] == [t.shape for t in y]
    return max((s - t).abs().max().item() for s, t in zip(x, y))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("continuous", [False, True])
def test_cached_two_pass_equals_single_pass(attn, continuous):
    voco = make_voco(attn)
    k = 3
    imgs, single, cached = case(voco, k, continuous)
    with torch.no_grad():
        ref_logits, ref_index = voco.single_pass(single, k)
        blocks = voco.compress(imgs, k)      # LoRA starts as the identity (B = 0)
        logits, _, _, _, index = voco.prefill(cached(blocks), all_logits=True)
    ref, got = text_logits(ref_logits, ref_index), text_logits(logits, index)
    assert all(torch.isfinite(t).all() for t in ref + got)           # padded rows: no NaN
    assert ref[0].abs().max() > 1.0                                    # logits are not trivial
    assert max_diff(ref, got) < TOL
    assert all(b.k == k for b in blocks)


def test_controls_differ():
    """A plain causal mask, positions counted from the cache length and a boolean mask under
    eager attention must all give other logits than the correct mask."""
    k = 2
    for attn in ("sdpa", "eager"):
        voco = make_voco(attn)
        imgs, single, cached = case(voco, k)
        with torch.no_grad():
            ref = text_logits(*voco.single_pass(single, k))
            causal = text_logits(*voco.single_pass(single, k, mask="causal"))
            blocks = voco.compress(imgs, k)
            from_cache = voco.prefill(cached(blocks), all_logits=True, explicit_positions=False)
            from_cache = text_logits(from_cache[0], from_cache[4])
            assert max_diff(ref, causal) > 0.5
            assert max_diff(ref, from_cache) > 0.5
            boolean = text_logits(*voco.single_pass(single, k, mask="bool"))
            if attn == "eager":
                assert max_diff(ref, boolean) > 0.5    # added to the scores: silently wrong
            else:
                assert max_diff(ref, boolean) < TOL    # sdpa reads a boolean mask correctly


def test_gradients_reach_only_voco_weights():
    voco = make_voco()
    k = 2
    imgs, _, cached = case(voco, k)
    with torch.no_grad():   # a non-zero LoRA B so that LoRA A gets a gradient too
        for n, p in voco.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    blocks = voco.compress(imgs, k)
    logits, *_ = voco.prefill(cached(blocks), all_logits=True)
    logits.logsumexp(-1).mean().backward()
    for name, p in voco.llm.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"frozen weight {name} got a gradient"
    assert voco.embeddings.grad is not None and voco.embeddings.grad.abs().sum() > 0


def test_reading_model_is_the_frozen_llm():
    """LoRA changes the compression, never the model that reads a compressed prompt."""
    voco = make_voco()
    text = [[[1, 5, 9, 12, 40]]]   # one prompt of one text segment
    with torch.no_grad():
        before = voco.prefill(text)[0]
        block_before = voco.compress([torch.tensor([7, 8, 9])], 2)[0]
        for n, p in voco.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        after = voco.prefill(text)[0]
        block_after = voco.compress([torch.tensor([7, 8, 9])], 2)[0]
        plain = voco.llm(input_ids=torch.tensor(text[0]))  # adapters on: differs
    assert torch.equal(before, after)
    assert (block_before.values[0] - block_after.values[0]).abs().max() > 1e-3
    assert (plain.logits[:, -1] - after).abs().max() > 1e-3


def test_greedy_steps_continue_the_cache():
    """Decoding after a compressed prefill equals re-running the longer prompt."""
    voco = make_voco()
    k = 2
    imgs, _, cached = case(voco, k)
    with torch.no_grad():
        blocks = voco.compress(imgs, k)
        prompts = cached(blocks)
        logits, cache, valid, pos, _ = voco.prefill(prompts)
        nxt = logits.argmax(-1)
        step_logits, *_ = voco.step(nxt, cache, valid, pos)
        longer = [p[:-1] + [list(p[-1]) + [int(t)]] for p, t in zip(prompts, nxt)]
        ref = voco.prefill(longer)[0]
    assert (step_logits - ref).abs().max() < TOL


def test_refusals():
    model = tiny_llama_model(V)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(V2LError, match="flash_attention_2.*attn_implementation='sdpa'"):
        VoCo(model, 2)
    model = tiny_llama_model(V)
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(V2LError, match="rotary type 'linear'.*plain RoPE"):
        VoCo(model, 2)
    voco = make_voco(k_max=2)
    with pytest.raises(V2LError, match="k=4 .*at most 2"):
        voco.compress([torch.tensor([5, 6])], 4)
    with pytest.raises(V2LError, match="over the LLM context of 256"):
        voco.prefill([[list(range(3, 263))]])
    with pytest.raises(V2LError, match=r"expected \[n, 64\]"):
        voco.compress([torch.randn(3, 10)], 1)


def test_kv_bytes():
    voco = make_voco()
    block = voco.compress([torch.tensor([5, 6, 7])], 3)[0]
    assert isinstance(block, VoCoBlock)
    assert block.nbytes == 3 * kv_bytes_per_token(voco.llm) == 3 * 2 * 2 * 2 * 16 * 4
