"""VoCo compression: the cached two-pass path equals one masked pass, the controls differ,
only VoCo weights learn, and bad settings are refused."""
from pathlib import Path

import pytest
import torch

from models.voco import LORA_TARGETS, VoCo, VoCoBlock, kv_bytes_per_token
from tiny_llm import tiny_llama_model
from utils.errors import V2LError
from voco_reference import (Image, prefill_logits, prefill_positions_from_cache, single_pass,
                            text_logits)

pytestmark = pytest.mark.usefixtures("one_thread")

V = 300
TOL = 1e-4   # fp32 rounding only: the two paths compute the same thing


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
@pytest.mark.parametrize("continuous,context", [(False, False), (True, False), (False, True)])
def test_cached_two_pass_equals_single_pass(attn, continuous, context):
    voco = make_voco(attn, context_ids=[7, 8, 9] if context else None)
    k = 3
    imgs, single, cached = case(voco, k, continuous)
    with torch.no_grad():
        ref_logits, ref_index = single_pass(voco, single, k)
        blocks = voco.compress(imgs, k)      # LoRA starts as the identity (B = 0)
        logits, index = prefill_logits(voco, cached(blocks))
    ref, got = text_logits(ref_logits, ref_index), text_logits(logits, index)
    assert all(torch.isfinite(t).all() for t in ref + got)           # padded rows: no NaN
    assert ref[0].abs().max() > 1.0                                    # logits are not trivial
    assert max_diff(ref, got) < TOL
    assert all(b.k == k for b in blocks)


def test_context_is_compressed_before_the_image():
    """An image compressed after a context is the context + image compressed without one; the
    context changes the block (the isolated block is what an LLM reads poorly)."""
    plain, ctx = make_voco(), make_voco(context_ids=[7, 8, 9])
    ctx.load_adapter_state(plain.adapter_state())
    image = torch.tensor([11, 12, 13, 14])
    with torch.no_grad():
        got = ctx.compress([image], 2)[0]
        same = plain.compress([torch.tensor([7, 8, 9, 11, 12, 13, 14])], 2)[0]
        isolated = plain.compress([image], 2)[0]
    assert torch.equal(got.keys, same.keys) and torch.equal(got.values, same.values)
    assert (got.values - isolated.values).abs().max() > 1e-3


def test_retention_interval_is_paired_over_episodes():
    from engine.voco import retention_interval
    g = torch.Generator().manual_seed(0)
    upper = (torch.rand(60, generator=g) < 0.9).tolist()
    lower = (torch.rand(60, generator=g) < 0.5).tolist()
    assert retention_interval(upper, lower, upper) == [1.0, 1.0]    # voco answers as upper
    assert retention_interval(upper, lower, lower) == [0.0, 0.0]    # voco answers as lower
    voco = [u if i % 3 else lo for i, (u, lo) in enumerate(zip(upper, lower))]
    lo_, hi_ = retention_interval(upper, lower, voco)
    point = (sum(voco) - sum(lower)) / (sum(upper) - sum(lower))
    assert lo_ < point < hi_ < 1.5
    lo4, hi4 = retention_interval(upper * 4, lower * 4, voco * 4)   # 4x the episodes: narrower
    assert hi4 - lo4 < 0.7 * (hi_ - lo_)
    assert retention_interval(upper, upper, upper) is None          # no gap to retain
    with pytest.raises(V2LError, match="same, non-empty episodes"):
        retention_interval(upper, lower[:-1], voco)


def test_controls_differ():
    """A plain causal mask, positions counted from the cache length and a boolean mask under
    eager attention must all give other logits than the correct mask."""
    k = 2
    for attn in ("sdpa", "eager"):
        voco = make_voco(attn)
        imgs, single, cached = case(voco, k)
        with torch.no_grad():
            ref = text_logits(*single_pass(voco, single, k))
            causal = text_logits(*single_pass(voco, single, k, mask="causal"))
            blocks = voco.compress(imgs, k)
            from_cache = text_logits(*prefill_positions_from_cache(voco, cached(blocks)))
            assert max_diff(ref, causal) > 0.5
            assert max_diff(ref, from_cache) > 0.5
            boolean = text_logits(*single_pass(voco, single, k, mask="bool"))
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
    logits, _ = prefill_logits(voco, cached(blocks))
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
    assert (block_before.values - block_after.values).abs().max() > 1e-3
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


def test_construction_leaves_the_global_random_state_alone():
    """VoCo draws its initial weights from generators of its own: building one (random or
    text-initialised rows, with or without LoRA) changes nothing another draw would see."""
    for kw in ({}, {"init_ids": [5, 6]}, {"lora_rank": 0}, {"seed": 7}):
        model = tiny_llama_model(V)
        model.config._attn_implementation = "sdpa"
        torch.manual_seed(123)
        state = torch.get_rng_state()
        VoCo(model, 3, bos_id=1, **kw)
        assert torch.equal(torch.get_rng_state(), state), kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_initial_weights_are_those_of_the_seed(dtype):
    """The initial LoRA weights are exactly those peft draws after torch.manual_seed(seed) (what
    earlier versions drew, so a seed gives the same start as before), the VoCo rows those of a
    generator seeded with it."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from models.voco import _lora_modules
    voco = VoCo(tiny_llama_model(V).to(dtype), 3, lora_rank=4, seed=5)
    model = tiny_llama_model(V).to(dtype)
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=16.0, target_modules=_lora_modules(model, LORA_TARGETS),
                        lora_dropout=0.0, bias="none")
    expected = get_peft_model_state_dict(get_peft_model(model, config))
    got = {k[len("lora."):]: v for k, v in voco.adapter_state().items() if k.startswith("lora.")}
    assert got.keys() == expected.keys() and any("lora_A" in k for k in got)
    assert all(got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]) for k in got)
    vocab = model.get_input_embeddings().weight.detach().float()
    rows = torch.randn(3, vocab.shape[1], generator=torch.Generator().manual_seed(5))
    assert torch.equal(voco.embeddings.detach(), vocab.mean(0) + vocab.std() * rows)


def test_remove_restores_the_llm():
    """The constructor attaches LoRA layers to the caller's model; remove() takes them out and
    restores the requires_grad flags: the same modules, weights and outputs as before."""
    model, reference = tiny_llama_model(V), tiny_llama_model(V)
    model.config._attn_implementation = "sdpa"
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    voco = VoCo(model, 2, lora_rank=4)
    assert any("lora_" in n for n, _ in model.named_parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert voco.remove() is model
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "peft_config")
    a, b = model.state_dict(), reference.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)


def test_kv_bytes():
    voco = make_voco()
    block = voco.compress([torch.tensor([5, 6, 7])], 3)[0]
    assert isinstance(block, VoCoBlock)
    assert block.nbytes == 3 * kv_bytes_per_token(voco.llm) == 3 * 2 * 2 * 2 * 16 * 4


def test_block_store_bounds_its_cache_and_changes_no_bit():
    """Blocks read through a BlockStore, its cache bounded to two blocks or unbounded, give the
    logits of the blocks as compressed, bit for bit; the bounded cache evicts the oldest."""
    from engine.voco import BlockStore
    voco = make_voco()
    k = 2
    imgs, _, cached = case(voco, k)
    with torch.no_grad():
        blocks = voco.compress(imgs, k)
        ref = prefill_logits(voco, cached(blocks))[0]
        size = blocks[0].nbytes
        for budget in (None, 2 * size, 0):
            store = BlockStore("cpu", budget)
            for i, b in enumerate(blocks):
                store.add(f"img{i}", b)
            assert len(store) == 3 and "img2" in store and store.host_bytes == 3 * size
            assert store.host("img0").keys.data_ptr() != blocks[0].keys.data_ptr()   # its own copy
            for _ in range(2):
                got = prefill_logits(voco, cached([store[f"img{i}"] for i in range(3)]))[0]
                assert torch.equal(got, ref), budget
            assert store.reads == 6
            if budget is None:
                assert store.hits == 3 and store._cached == 3 * size
            else:   # img0, img1, img2 in turn through a cache of 2 (or 0): no read is a hit
                assert store.hits == 0 and store._cached <= budget
                assert list(store._cache) == (["img1", "img2"] if budget else [])


def test_synced_clock_waits_for_the_gpu(monkeypatch):
    from engine.voco import synced_clock
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    before = synced_clock("cpu")
    assert calls == []
    assert synced_clock("cuda:1") >= before and calls == [torch.device("cuda:1")]


def test_distillation_positions_align_teacher_and_student():
    """The KL is taken at prompt-text tokens after the first image whose next token is text;
    the teacher's prompt-text tokens are found among its image words."""
    from engine.voco import Slot, _teacher_text_mask, kl_positions, realize
    segs = [[1, 2], Slot("a"), [3, 4], Slot("b"), [5, 6]]
    words = {"a": [7, 8], "b": [9]}
    assert kl_positions(segs) == [False, False, True, False, True, False]
    teacher = realize(segs, "upper", words=words)
    assert teacher == [[1, 2, 7, 8, 3, 4, 9, 5, 6]]
    mask = _teacher_text_mask(segs, words)
    assert torch.tensor(teacher[0])[mask].tolist() == [1, 2, 3, 4, 5, 6]
    assert realize(segs, "none") == [[1, 2, 3, 4, 5, 6]]


def test_distill_loss_is_the_kl_of_the_full_logits():
    """distill_loss (batched and padded, logits only at the KL positions) equals the KL of each
    prompt's full logits, teacher vs student, computed one prompt at a time."""
    import torch.nn.functional as F
    from engine.voco import Slot, _teacher_text_mask, distill_loss, kl_positions, realize
    voco = make_voco(k_max=2, lora_rank=2)
    with torch.no_grad():        # LoRA away from its zero start, so the adapters count
        for n, p in voco.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(3)
    words = {"a": ids(g, 6), "b": ids(g, 4), "c": ids(g, 9)}
    rows = [[[1] + ids(g, 3), Slot("a"), ids(g, 2), Slot("b"), ids(g, 4)],
            [[1] + ids(g, 6), Slot("c"), ids(g, 5), Slot("a"), ids(g, 2)]]
    flags = [[bool(x) for x in torch.randint(0, 2, (sum(len(s) for s in r if not isinstance(s, Slot)),),
                                              generator=g)] for r in rows]
    for name_rows in (None, flags):
        torch.manual_seed(0)
        total, count = distill_loss(voco, rows, words, 2, name_rows)
        blocks = dict(zip(sorted(words), voco.compress([torch.tensor(words[p]) for p in sorted(words)], 2)))
        by_hand, n = 0.0, 0
        for i, row in enumerate(rows):
            t = prefill_logits(voco, [realize(row, "upper", words=words)])[0][0]
            s = prefill_logits(voco, [realize(row, "voco", blocks=blocks)])[0][0]
            use = kl_positions(row)
            if name_rows is not None:
                use = [u and f for u, f in zip(use, name_rows[i][1:] + [False])]
            use = torch.tensor(use)
            t_log = F.log_softmax(t[_teacher_text_mask(row, words)][use], -1)
            s_log = F.log_softmax(s[use], -1)
            by_hand += (t_log.exp() * (t_log - s_log)).sum()
            n += int(use.sum())
        assert count == n > 0
        torch.testing.assert_close(total, by_hand, rtol=1e-4, atol=TOL)


# ----------------------------------------------------------------------------- the scripts

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny tokenizer (with manifest), a tiny LLM and five classes of images; step 5 held
    out every 2nd class (bird, cat, tree) and trained on car and dog."""
    from fixtures_artifacts import make_image_folder
    from fixtures_tokenizer import make_tiny_tokenizer
    from tiny_llm import make_tiny_llama
    from models.tokenizer_io import save_tokenizer
    from utils.artifacts import write_manifest
    tmp = tmp_path_factory.mktemp("voco")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # module fixtures run before the per-test one_thread fixture
    tokenizer, _, dirs = make_tiny_tokenizer(tmp)
    save_tokenizer(tokenizer, tmp / "tokenizer")
    write_manifest(tmp / "tokenizer", "tokenizer", {}, ["tokenizer.pt"],
                   inputs={"codebook": dirs["codebook"], "global": dirs["global"]})
    make_image_folder(tmp / "data", n_per_class=3, classes=("cat", "dog", "bird", "tree", "car"),
                      odd=False)
    make_tiny_llama(tmp / "llm", fmt="hf")
    yield tmp
    torch.set_num_threads(threads)


def step5_flags(world, out, **extra):
    return {"tokenizer_dir": world / "tokenizer", "llm": world / "llm", "data_dir": world / "data",
            "holdout_every": 2, "global_k": 5, "k_max": 4, "train_ks": "2", "steps": 4,
            "batch_size": 2, "save_every": 1, "device": "cpu", "num_workers": 0, "out_dir": out,
            "llm_dtype": "fp32", **extra}   # fp32 on any CPU: the equality checks are fp32's


def eval_flags(world, voco_dir, out, **extra):
    return {"tokenizer_dir": world / "tokenizer", "llm": world / "llm", "voco_dir": voco_dir,
            "data_dir": world / "data", "eval_ks": "2", "n_episodes": 4, "batch_size": 4,
            "device": "cpu", "num_workers": 0, "out_dir": out, "llm_dtype": "fp32", **extra}


@pytest.fixture(scope="module")
def trained(world):
    from fixtures_artifacts import run_script
    out = world / "voco_full"
    assert run_script("step5_train_voco.py", **step5_flags(world, out)) == 0
    return out


def test_step5_resume_equals_uninterrupted(world, trained, capsys):
    from fixtures_artifacts import run_script
    from utils.artifacts import load_json, load_tensors
    out = world / "voco_resumed"
    assert run_script("step5_train_voco.py", **step5_flags(world, out, stop_after=2)) == 0
    assert (out / "checkpoint.pt").is_file() and not (out / "manifest.json").exists()
    capsys.readouterr()     # a checkpoint of other settings is refused, naming them
    assert run_script("step5_train_voco.py", **step5_flags(world, out, lr=5e-4)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "other settings (--lr 0.001 there, 0.0005 now)" in err[0]
    assert run_script("step5_train_voco.py", **step5_flags(world, out)) == 0
    a, b = load_tensors(trained / "voco.safetensors"), load_tensors(out / "voco.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("lora.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = load_json(out / "voco.json")
    assert info["eval_classes"] == ["bird", "cat", "tree"] and info["train_classes"] == ["car", "dog"]
    assert (out / "loss.png").is_file() and not (out / "checkpoint.pt").exists()
    capsys.readouterr()
    assert run_script("step5_train_voco.py", **step5_flags(world, out)) == 0
    assert "up to date" in capsys.readouterr().out


def test_name_flags_restrict_the_kl_to_class_names(world):
    """segments(names=True) flags exactly the class-name tokens after each image (and the
    answer's EOS); distill_loss with them takes the KL where those tokens are next."""
    from data.classes import class_name
    from data.episodes import generate_episodes
    from engine.voco import Slot, VoCoPrompter, distill_loss, kl_positions
    from models.llm import load_llm
    llm = load_llm(world / "llm", dtype=torch.float32)
    tok = llm.text_tokenizer
    ep = generate_episodes(world / "data", 2, 1, 1, 0, "train")[0]
    prompter = VoCoPrompter(tok)
    segs, flags = prompter.segments(ep, answer=True, names=True)
    assert segs == prompter.segments(ep, answer=True)
    text = [t for seg in segs if not isinstance(seg, Slot) for t in seg]
    assert len(flags) == len(text)
    supports = [prompter.name_ids(class_name(folder)) for _, folder in ep.support]
    flagged = [t for t, f in zip(text, flags) if f]
    answer = prompter.name_ids(ep.target(spaces=True))
    assert flagged == supports[0] + supports[1] + answer + [tok.eos_token_id]
    use = kl_positions(segs)
    nxt = [u and f for u, f in zip(use, flags[1:] + [False])]
    assert 0 < sum(nxt) == len(flagged) < sum(use)
    voco = VoCo(llm.model, 2, lora_rank=2, bos_id=tok.bos_token_id)
    words = {p: [5, 6, 7] for p, _ in ep.support + (ep.query,)}
    _, n_all = distill_loss(voco, [segs], words, 1)
    total, n_names = distill_loss(voco, [segs], words, 1, [flags])
    assert (n_all, n_names) == (sum(use), sum(nxt)) and torch.isfinite(total)


def test_image_reuse_pairs_episodes_over_the_same_images(world):
    """--image_reuse: episode 2i+1 is episode 2i over the same images with the query and its
    class's support swapped, so a step of 4 episodes compresses 6 images instead of 12."""
    from data.episodes import generate_episodes, swapped
    from fixtures_artifacts import run_script
    from utils.artifacts import load_json
    for ep in generate_episodes(world / "data", 2, 1, 6, 0, "train"):
        other = swapped(ep, 7)
        assert other.index == 7 and other.names() == ep.names() and other.target() == ep.target()
        assert other.query != ep.query and other.query in ep.support and ep.query in other.support
        assert sorted(other.support + (other.query,)) == sorted(ep.support + (ep.query,))
        assert [c for _, c in other.support] == [c for _, c in ep.support]
    out = world / "voco_reuse"
    assert run_script("step5_train_voco.py", **step5_flags(world, out, steps=2, image_reuse=True)) == 0
    assert load_json(out / "manifest.json")["config"]["image_reuse"] is True


def test_eval_compression_runs(world, trained):
    from fixtures_artifacts import run_script
    from utils.artifacts import load_json
    out = world / "eval"
    assert run_script("eval_compression.py", **eval_flags(world, trained, out)) == 0
    res = load_json(out / "results.json")
    conditions = [(r["condition"], r["k"]) for r in res["rows"]]
    assert conditions == [("upper", None), ("none", None), ("lower", 2), ("voco", 2)]
    assert all(r["n"] == 4 for r in res["rows"])
    assert res["cost"]["voco k=2"]["kv_bytes_per_image"] == 2 * res["cost"]["kv_bytes_per_token"]
    assert "retention_ci95" in res["summary"][-1] and "retention_ci95" in res["rows"][-1]
    assert (out / "retention.png").is_file() and (out / "manifest.json").is_file()


def test_eval_compression_block_cache_changes_no_bit(world, trained, monkeypatch):
    """The same logits, bit for bit, and the same answers with the GPU block cache bounded to a
    few blocks as with the default budget; the bounded cache serves fewer reads."""
    from fixtures_artifacts import run_script
    from models.voco import VoCo
    from utils.artifacts import load_json
    seen, prefill = [], VoCo.prefill

    def recording(self, prompts, hidden=False):
        out = prefill(self, prompts, hidden)
        seen.append(out[0].clone())
        return out
    monkeypatch.setattr(VoCo, "prefill", recording)
    runs = {}
    for budget in ("4", "3e-6"):     # GiB; a block is 1 KiB here (k = 2): 3e-6 GiB holds 3
        seen.clear()
        out = world / f"eval_cache_{budget}"
        assert run_script("eval_compression.py", **eval_flags(world, trained, out, n_episodes=6,
                                                              block_cache_gb=budget)) == 0
        runs[budget] = list(seen), load_json(out / "results.json")
    (big, a), (small, b) = runs["4"], runs["3e-6"]
    assert len(big) == len(small) > 0 and all(torch.equal(x, y) for x, y in zip(big, small))
    assert a["answers"] == b["answers"] and strip_times(a["rows"]) == strip_times(b["rows"])
    assert 0 < b["cost"]["blocks"]["cache_hits"] < a["cost"]["blocks"]["cache_hits"]
    assert a["cost"]["blocks"]["reads"] == b["cost"]["blocks"]["reads"] == 2 * 6 * 3


def strip_times(x):
    """A results.json part less what is timed."""
    if isinstance(x, dict):
        return {k: strip_times(v) for k, v in x.items()
                if k not in ("episodes_per_s", "compress_s_per_image", "speedup")}
    return [strip_times(v) for v in x] if isinstance(x, list) else x


def test_local_tokens_and_context_reach_eval(world, trained):
    """--local_tokens: an image is its local tokens then its words, in step 5 and in
    eval_compression (read from voco.json), and images are compressed after the prompt text."""
    from fixtures_artifacts import run_script
    from engine.fewshot import IN_TEXT, OUT_TEXT
    from engine.voco import load_voco
    from models.llm import encode_segment, load_llm
    from utils.artifacts import load_json
    import json
    import shutil
    llm = world / "llm_long"            # 3 images of 256 local tokens need a longer context
    if not llm.exists():
        shutil.copytree(world / "llm", llm)
        config = json.loads((llm / "config.json").read_text())
        (llm / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    out = world / "voco_local"
    assert run_script("step5_train_voco.py", **step5_flags(world, out, steps=2, local_tokens=True,
                                                           llm=llm, voco_init="text")) == 0
    info = load_json(out / "voco.json")
    reader = load_llm(str(world / "llm"), dtype=torch.float32)
    text_tokenizer = reader.text_tokenizer
    assert info["local_tokens"] is True
    assert info["context_ids"] == encode_segment(text_tokenizer, IN_TEXT) != []
    # --voco_init text: the VoCo rows start as the embeddings of the text after an image, and
    # eval_compression's lower bound starts from the same rows
    followup = encode_segment(text_tokenizer, OUT_TEXT)
    assert info["init_ids"] == followup != []
    start = load_voco(out, reader, world / "tokenizer")[0].embeddings.detach()
    rows = [followup[i % len(followup)] for i in range(info["k_max"])]
    torch.testing.assert_close(start, reader.model.get_input_embeddings().weight[rows].float())
    ev = world / "eval_local"
    assert run_script("eval_compression.py", **eval_flags(world, out, ev, llm=llm)) == 0
    if not (world / "eval" / "manifest.json").is_file():     # test_eval_compression_runs' run
        assert run_script("eval_compression.py", **eval_flags(world, trained, world / "eval")) == 0
    plain = load_json(world / "eval" / "results.json")["cost"]["full"]["tokens_per_image"]
    with_local = load_json(ev / "results.json")["cost"]["full"]["tokens_per_image"]
    assert with_local == plain + 16 ** 2           # the tiny tokenizer's 16 x 16 local grid


def test_bad_inputs_one_line(world, trained, capsys):
    import shutil
    from fixtures_artifacts import run_script
    from tiny_llm import make_tiny_llama
    from utils.artifacts import write_manifest
    other_llm = make_tiny_llama(world / "llm_other", fmt="hf", vocab_size=320)
    other_tok = world / "tokenizer_other"
    shutil.copytree(world / "tokenizer", other_tok)
    write_manifest(other_tok, "tokenizer", {"other": True}, ["tokenizer.pt"])
    cases = [
        (eval_flags(world, trained, world / "e1", llm=other_llm), "made for another LLM"),
        (eval_flags(world, trained, world / "e2", tokenizer_dir=other_tok),
         "different tokenizer artifact"),
        (eval_flags(world, trained, world / "e3", eval_ks="8"), "at most k_max=4"),
        (eval_flags(world, trained, world / "e4", max_new_tokens=250), "over the LLM context of 256"),
        (eval_flags(world, trained, world / "e5", attn="flash_attention_2"), "cannot take VoCo"),
    ]
    for flags, message in cases:
        capsys.readouterr()
        assert run_script("eval_compression.py", **flags) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], err
        assert not (flags["out_dir"] / "manifest.json").exists()
    assert run_script("step5_train_voco.py",
                      **step5_flags(world, world / "v2", attn="flash_attention_2")) == 2
    assert "attn_implementation='sdpa'" in capsys.readouterr().err
    assert not (world / "v2").exists()
    assert run_script("step5_train_voco.py", **step5_flags(world, world / "v3", kl_on="answers")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--kl_on 'answers': use text or names" in err[0], err
    assert not (world / "v3").exists()
    assert run_script("step5_train_voco.py", **step5_flags(world, world / "v4", voco_init="words")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--voco_init 'words': use random or text" in err[0], err
    assert not (world / "v4").exists()


def test_step5_refuses_more_processes_than_episodes_per_step(world, monkeypatch, capsys):
    """Every process needs a share of each step: more processes than --batch_size episodes is
    refused at start-up with one line (before any process group or model)."""
    from fixtures_artifacts import run_script
    monkeypatch.setenv("WORLD_SIZE", "3")
    out = world / "voco_three"
    capsys.readouterr()
    assert run_script("step5_train_voco.py", **step5_flags(world, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--batch_size 2 is fewer episodes per step than the 3 processes" in err[0]
    assert not out.exists()


def test_step5_deals_every_rank_a_share_and_keeps_pairs_together(monkeypatch):
    """rank_of: a step's episodes go round the ranks; with --image_reuse, whole pairs do while
    there are at least as many pairs in a step as ranks (an odd batch included)."""
    import runpy
    import sys
    repo = Path(__file__).resolve().parent.parent
    monkeypatch.setattr(sys, "argv", [str(repo / "step5_train_voco.py")])
    script = runpy.run_path(str(repo / "step5_train_voco.py"), run_name="step5")
    rank_of = script["rank_of"]

    def deal(batch, world, reuse, steps=3):
        rank_of.__globals__.update(BATCH_SIZE=batch, IMAGE_REUSE=reuse)
        return [[rank_of(s * batch + j, world) for j in range(batch)] for s in range(steps)]
    assert deal(8, 3, False)[0] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert deal(4, 2, True) == [[0, 0, 1, 1]] * 3
    assert deal(8, 5, True)[0] == [0, 1, 2, 3, 4, 0, 1, 2]   # 4 pairs, 5 ranks: by episode
    for batch, world in [(5, 2), (7, 3), (6, 3), (9, 4)]:
        for s, ranks in enumerate(deal(batch, world, True)):
            assert set(ranks) == set(range(world)), (batch, world, ranks)
            for j in range(batch):   # an episode and its twin in the same step: the same rank
                twin = (s * batch + j) ^ 1
                if twin // batch == s:
                    assert ranks[j] == ranks[twin - s * batch], (batch, world, ranks)


def torchrun(script: str, flags: dict, port: int) -> None:
    import os
    import subprocess
    import sys
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(repo / script),
                           *[f"--{k}={v}" for k, v in flags.items()]],
                          env=env, cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_eval_compression_two_process_gloo_equals_one(world, trained):
    """Under torchrun each rank makes a share of the words, the blocks (chunks broadcast to the
    ranks that need them) and the answers; rank 0 writes what one process writes."""
    from fixtures_artifacts import run_script
    from utils.artifacts import load_json
    # batch 1: 5 batches (ranks 0 1 0 1 0), chunks of 4 of the 9 images (ranks 0 1 0)
    flags = dict(n_episodes=5, batch_size=1)
    one, two = world / "eval_one", world / "eval_two"
    assert run_script("eval_compression.py", **eval_flags(world, trained, one, **flags)) == 0
    torchrun("eval_compression.py", eval_flags(world, trained, two, **flags), 29534)
    a, b = load_json(one / "results.json"), load_json(two / "results.json")
    assert a["answers"] == b["answers"] and len(a["answers"]["voco k=2"]) == 5
    assert strip_times(a["rows"]) == strip_times(b["rows"])
    blocks_a, blocks_b = a["cost"].pop("blocks"), b["cost"].pop("blocks")
    assert strip_times(a["cost"]) == strip_times(b["cost"])
    assert blocks_a["episodes_per_process"] == [5] and blocks_b["episodes_per_process"] == [3, 2]
    assert blocks_b["reads"] == blocks_a["reads"]
    assert (two / "manifest.json").is_file()


@pytest.mark.slow
def test_step5_two_process_gloo_equals_one(world, trained):
    import os
    import subprocess
    import sys
    from utils.artifacts import load_tensors
    repo = Path(__file__).resolve().parent.parent
    out = world / "voco_ddp"
    flags = [f"--{k}={v}" for k, v in step5_flags(world, out).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29533", str(repo / "step5_train_voco.py"), *flags],
                   check=True, env=env, cwd=repo, capture_output=True)
    a, b = load_tensors(trained / "voco.safetensors"), load_tensors(out / "voco.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5   # summation order only


@pytest.mark.slow
def test_step5_two_process_image_reuse_equals_one(world):
    """--image_reuse under torchrun (each rank trains whole pairs): the weights of one process."""
    from fixtures_artifacts import run_script
    from utils.artifacts import load_tensors
    flags = dict(steps=2, batch_size=4, image_reuse=True)
    one, two = world / "voco_reuse_one", world / "voco_reuse_two"
    assert run_script("step5_train_voco.py", **step5_flags(world, one, **flags)) == 0
    torchrun("step5_train_voco.py", step5_flags(world, two, **flags), 29535)
    a, b = load_tensors(one / "voco.safetensors"), load_tensors(two / "voco.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5   # summation order only


# ----------------------------------------------------------------------------- continuous images

def reference_one_prompt(voco, prompt, k, adapters=False):
    """One prompt, no padding, in one forward with its mask written out position by position:
    text and embedding segments are read by everything after them; an ``Image`` is [BOS] +
    context + its embeddings + suffix, then k VoCo tokens, seen only by its own positions
    (VoCo entries stay visible later). Returns the logits at the positions read [T, V]. The
    frozen LLM runs it; with ``adapters``, the LLM with LoRA on (an adapted reader's)."""
    emb = voco.llm.get_input_embeddings()
    dtype = voco.dtype

    def ids_embed(ids):
        return emb(torch.as_tensor(ids, dtype=torch.long)).to(dtype)

    head = ([voco.bos_id] if voco.bos_id is not None else []) + voco.context_ids
    xs, pos, owner, kind, p, g = [], [], [], [], 0, 0
    for seg in prompt:
        if isinstance(seg, Image):
            g += 1
            span = [ids_embed(head)] if head else []
            span.append(seg.tokens.to(dtype) if seg.tokens.is_floating_point() else ids_embed(seg.tokens))
            if voco.suffix_ids:
                span.append(ids_embed(voco.suffix_ids))
            span = torch.cat(span)
            n = span.shape[0]
            xs += [span, voco.embeddings[:k].to(dtype)]
            pos += range(p - n, p + k)
            owner += [g] * (n + k)
            kind += ["span"] * n + ["voco"] * k
            p += k
        else:
            x = seg.to(dtype) if isinstance(seg, torch.Tensor) and seg.is_floating_point() else ids_embed(seg)
            xs.append(x)
            pos += range(p, p + x.shape[0])
            owner += [0] * x.shape[0]
            kind += ["read"] * x.shape[0]
            p += x.shape[0]
    t = len(pos)
    allowed = torch.zeros(t, t, dtype=torch.bool)
    for q in range(t):
        for key in range(q + 1):
            allowed[q, key] = owner[q] == owner[key] if owner[q] else kind[key] != "span"
    import contextlib

    from models.voco import additive
    with contextlib.nullcontext() if adapters else voco.frozen():
        out = voco.llm(inputs_embeds=torch.cat(xs)[None], attention_mask=additive(allowed[None], dtype),
                       position_ids=torch.tensor([pos]))
    return out.logits[0].float()[torch.tensor([c == "read" for c in kind])]


def continuous_case(voco, g=None):
    """Two prompts of different lengths over continuous images: uncompressed embedding segments
    (read as they are), a compressed image shared at two offsets, an id image, text."""
    g = g or torch.Generator().manual_seed(3)
    hidden = voco.embeddings.shape[1]
    e1, e2, e3 = (torch.randn(n, hidden, generator=g) for n in (6, 9, 4))
    word_image = torch.tensor(ids(g, 5))
    a, b, c, d, e = [1] + ids(g, 3), ids(g, 2), ids(g, 4), [1] + ids(g, 5), ids(g, 3)
    single = [[a, e1, b, Image(e2), c], [d, Image(e2), b, e3, c, Image(word_image), e]]
    return [e2, word_image], single, lambda blocks: [[a, e1, b, blocks[0], c],
                                                     [d, blocks[0], b, e3, c, blocks[1], e]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("suffix", [False, True])
def test_embedding_segments_and_blocks_equal_one_masked_pass(attn, suffix):
    """Prompts mixing uncompressed embeddings, compressed continuous images (with the context
    and the authors' text between image and VoCo) and text: the cached path equals one masked
    pass over each whole prompt, written out without padding."""
    voco = make_voco(attn, context_ids=[7, 8], suffix_ids=[13] if suffix else None)
    k = 2
    imgs, single, cached = continuous_case(voco)
    with torch.no_grad():
        want = [reference_one_prompt(voco, prompt, k) for prompt in single]
        blocks = voco.compress(imgs, k)
        got = text_logits(*prefill_logits(voco, cached(blocks)))
        ref_pass = text_logits(*single_pass(voco, [[s for s in p if not isinstance(s, torch.Tensor)]
                                                   for p in single], k))
    assert want[0].abs().max() > 1.0
    assert max_diff(want, got) < TOL
    # the reference itself agrees with tests/voco_reference.py where both apply (no embeddings)
    with torch.no_grad():
        plain = [reference_one_prompt(voco, [s for s in p if not isinstance(s, torch.Tensor)], k)
                 for p in single]
    assert max_diff(plain, ref_pass) < TOL
    # the controls: another mask or an image's suffix left out change the logits
    with torch.no_grad():
        other = make_voco(attn, context_ids=[7, 8], suffix_ids=None if suffix else [13])
        other.load_adapter_state(voco.adapter_state())
        changed = text_logits(*prefill_logits(voco, cached(other.compress(imgs, k))))
    assert max_diff(want, changed) > 1e-2


def test_embedding_segments_read_as_the_plain_llm_reads_them():
    """The upper bound: a prompt of text and embeddings (no blocks) is the frozen LLM reading
    the embeddings under a causal mask; text given as its embedding rows reads as the ids."""
    voco = make_voco()
    g = torch.Generator().manual_seed(5)
    hidden = voco.embeddings.shape[1]
    image = torch.randn(7, hidden, generator=g)
    a, b = [1] + ids(g, 4), ids(g, 3)
    emb = voco.llm.get_input_embeddings()
    with torch.no_grad():
        got = text_logits(*prefill_logits(voco, [[a, image, b], [ids(g, 9) + [5]]]))
        with voco.frozen():
            x = torch.cat([emb(torch.tensor(a)), image, emb(torch.tensor(b))])
            want = voco.llm(inputs_embeds=x[None]).logits[0]
        as_rows = text_logits(*prefill_logits(voco, [[a, emb(torch.tensor(b)).clone()]]))
        as_ids = text_logits(*prefill_logits(voco, [[a, b]]))
    assert got[0].shape == want.shape
    assert (got[0] - want).abs().max() < TOL
    assert max_diff(as_rows, as_ids) < TOL
    with pytest.raises(V2LError, match=r"expected \[n, 64\]"):
        voco.prefill([[a, torch.randn(3, 10), b]])


def test_suffix_is_compressed_after_the_image():
    plain, ctx = make_voco(), make_voco(suffix_ids=[13, 14])
    ctx.load_adapter_state(plain.adapter_state())
    g = torch.Generator().manual_seed(2)
    image = torch.randn(5, plain.embeddings.shape[1], generator=g)
    with torch.no_grad():
        got = ctx.compress([image], 2)[0]
        emb = plain.llm.get_input_embeddings()(torch.tensor([13, 14]))
        same = plain.compress([torch.cat([image, emb])], 2)[0]
        without = plain.compress([image], 2)[0]
    assert torch.equal(got.keys, same.keys) and torch.equal(got.values, same.values)
    assert (got.values - without.values).abs().max() > 1e-3


def test_gradients_reach_uncompressed_embeddings_and_voco_weights():
    """An embedding segment that requires grad (a trained projector's output) gets a gradient
    through the reader; so do the VoCo weights through a compressed continuous image."""
    voco = make_voco()
    g = torch.Generator().manual_seed(4)
    hidden = voco.embeddings.shape[1]
    seen = torch.randn(5, hidden, generator=g, requires_grad=True)
    packed = torch.randn(6, hidden, generator=g, requires_grad=True)
    with torch.no_grad():
        for n, p in voco.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    block = voco.compress([packed], 2)[0]
    logits, _ = prefill_logits(voco, [[[1, 5], seen, [6, 7], block, [8, 9]]])
    logits.logsumexp(-1).mean().backward()
    assert seen.grad is not None and seen.grad.abs().sum() > 0
    assert packed.grad is not None and packed.grad.abs().sum() > 0
    assert voco.embeddings.grad.abs().sum() > 0
    for name, p in voco.llm.named_parameters():
        assert ("lora_" in name) == (p.grad is not None), name


def test_adapted_reader_reads_with_lora():
    """reader="adapted": compression and reading both with LoRA on, equal to one masked pass of
    the adapted LLM; ``teacher`` reads with the frozen LLM; the default reader is unchanged."""
    voco = make_voco(context_ids=[7, 8], suffix_ids=[13], reader="adapted")
    frozen = make_voco(context_ids=[7, 8], suffix_ids=[13])
    with torch.no_grad():
        for n, p in voco.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    frozen.load_adapter_state(voco.adapter_state())
    k = 2
    imgs, single, cached = continuous_case(voco)
    with torch.no_grad():
        want = [reference_one_prompt(voco, prompt, k, adapters=True) for prompt in single]
        got = text_logits(*prefill_logits(voco, cached(voco.compress(imgs, k))))
        plain = [[s for s in p if not isinstance(s, Image)] for p in single]
        hidden, *_, index = voco.prefill(plain, hidden=True, teacher=True)
        as_teacher = text_logits(voco.logits_of(hidden), index)
        by_frozen = text_logits(*prefill_logits(frozen, plain))
        adapted = text_logits(*prefill_logits(voco, plain))
    assert max_diff(want, got) < TOL
    assert max_diff(as_teacher, by_frozen) == 0
    assert max_diff(adapted, by_frozen) > 1e-3
    with pytest.raises(V2LError, match="--reader trained: must be one of frozen, adapted"):
        make_voco(reader="trained")


def test_authors_layout_single_pass_equals_cached_block():
    """VoCo-LLaMA's layout as their single pass runs it: BOS, image, "\\n", VoCo, then text, at
    positions 0, 1, 2, ... and their mask (the text after the VoCo tokens sees no key before the
    first VoCo token). Our block (span BOS + image + "\\n", read at compact positions) gives the
    same logits: rotary attention depends on position differences only."""
    voco = make_voco(suffix_ids=[13])
    g = torch.Generator().manual_seed(6)
    image = torch.randn(8, voco.embeddings.shape[1], generator=g)
    after = [13] + ids(g, 6)
    k = 2
    emb = voco.llm.get_input_embeddings()
    x = torch.cat([emb(torch.tensor([1])), image, emb(torch.tensor([13])), voco.embeddings[:k],
                   emb(torch.tensor(after))])
    t, first_voco = x.shape[0], 1 + image.shape[0] + 1
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    allowed[first_voco + k:, :first_voco] = False
    from models.voco import additive
    with torch.no_grad():
        with voco.frozen():
            theirs = voco.llm(inputs_embeds=x[None], attention_mask=additive(allowed[None], voco.dtype),
                              position_ids=torch.arange(t)[None]).logits[0, -len(after):]
        block = voco.compress([image], k)[0]
        ours = text_logits(*prefill_logits(voco, [[block, after]]))[0]
    assert theirs.abs().max() > 1.0
    assert (theirs - ours).abs().max() < TOL
