"""models/llm.py: loading HF and Meta-format Llamas (sharded, GQA), token text, errors."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from utils import dist
from tiny_llm import make_sentencepiece_model, make_tiny_llama, tiny_llama_model

from models.llm import (SENTENCEPIECE_ATTR, attach_sentencepiece, encode_prompts, encode_segment,
                        load_llm, printable_mask, resolve_dtype, token_strings)
from models.meta_llama import _meta_permute, meta_intermediate_size
from meta_export import save_meta_llama
from utils.errors import V2LError

PROMPT = "a photo of a small red cat sitting on the tree 42"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    return {"hf": make_tiny_llama(root / "hf"), "meta": make_tiny_llama(root / "meta", "meta")}


def _logits(llm, text=PROMPT):
    ids = torch.tensor(encode_prompts(llm.text_tokenizer, [text])).to(llm.device)
    return llm.model(input_ids=ids).logits


@pytest.mark.parametrize("kv_heads,n_shards", [(2, 1), (2, 2), (1, 1), (4, 2)])
def test_meta_format_roundtrip_gives_identical_logits(tmp_path, kv_heads, n_shards):
    hf = load_llm(make_tiny_llama(tmp_path / "hf", "hf", num_kv_heads=kv_heads))
    meta = load_llm(make_tiny_llama(tmp_path / "meta", "meta", n_shards=n_shards,
                                    num_kv_heads=kv_heads))
    assert meta.fmt == "meta" and hf.fmt == "hf"
    assert len(list((tmp_path / "meta").glob("consolidated.*.pth"))) == n_shards
    assert meta.model.config.num_key_value_heads == kv_heads
    assert meta.fingerprint == hf.fingerprint
    assert torch.equal(_logits(hf), _logits(meta))
    assert not any(p.requires_grad for p in meta.model.parameters()) and not meta.model.training


def test_gguf_file_gives_identical_logits(tmp_path, tiny_dirs):
    gguf_path = make_tiny_llama(tmp_path / "g", "gguf")
    llm = load_llm(gguf_path)
    hf = load_llm(tiny_dirs["hf"])
    assert llm.fmt == "gguf" and load_llm(tmp_path / "g").fmt == "gguf"   # the file or its dir
    assert encode_prompts(llm.text_tokenizer, [PROMPT]) == encode_prompts(hf.text_tokenizer, [PROMPT])
    assert torch.equal(_logits(llm), _logits(hf))
    ids = range(len(hf.text_tokenizer))
    assert token_strings(llm.text_tokenizer, ids) == token_strings(hf.text_tokenizer, ids)


def test_meta_shards_split_like_model_parallel(tmp_path):
    model = tiny_llama_model(vocab_size=300, num_kv_heads=2)
    sp = make_sentencepiece_model(tmp_path / "sp", 300)
    save_meta_llama(model, sp, tmp_path / "m", n_shards=2)
    s0 = torch.load(tmp_path / "m" / "consolidated.00.pth", weights_only=True)
    full = torch.load(tmp_path / "m" / "consolidated.01.pth", weights_only=True)
    assert s0["tok_embeddings.weight"].shape == (300, 32)          # embedding dim split
    assert s0["layers.0.attention.wq.weight"].shape == (32, 64)    # column parallel: rows
    assert s0["layers.0.attention.wk.weight"].shape == (16, 64)    # one of two kv heads
    assert s0["layers.0.attention.wo.weight"].shape == (64, 32)    # row parallel: columns
    assert s0["layers.0.feed_forward.w2.weight"].shape == (64, 64)
    assert s0["output.weight"].shape == (150, 64)
    assert torch.equal(s0["norm.weight"], full["norm.weight"])    # replicated
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert meta_intermediate_size(params["dim"], params["multiple_of"],
                                  params.get("ffn_dim_multiplier")) == 128


def _meta_rotary(x, theta=10000.0):
    """Meta's rotary embedding: consecutive pairs (2j, 2j+1) of each head as complex numbers."""
    t, h, d = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    angles = torch.outer(torch.arange(t).float(), freqs)
    xc = torch.view_as_complex(x.float().reshape(t, h, d // 2, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[:, None]).reshape(t, h, d)


def test_permutation_matches_meta_rotary_convention():
    """Attention scores from Meta's weights with Meta's rotary equal those of the converted
    weights with transformers' rotary (independent of save_meta_llama)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    model = tiny_llama_model(vocab_size=50, num_kv_heads=4)
    heads, dim, hd = 4, 64, 16
    wq_meta = torch.randn(dim, dim)
    wk_meta = torch.randn(dim, dim)
    x = torch.randn(7, dim)
    qm = _meta_rotary((x @ wq_meta.T).view(7, heads, hd))
    km = _meta_rotary((x @ wk_meta.T).view(7, heads, hd))
    scores_meta = torch.einsum("qhd,khd->hqk", qm, km)
    rot = LlamaRotaryEmbedding(model.config)
    cos, sin = rot(x[None], torch.arange(7)[None])
    qh = (x @ _meta_permute(wq_meta, heads).T).view(1, 7, heads, hd).transpose(1, 2)
    kh = (x @ _meta_permute(wk_meta, heads).T).view(1, 7, heads, hd).transpose(1, 2)
    qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
    scores_hf = torch.einsum("hqd,hkd->hqk", qh[0], kh[0])
    assert torch.allclose(scores_meta, scores_hf, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(scores_meta, torch.einsum("qhd,khd->hqk", *[
        _meta_rotary(v) for v in ((x @ wq_meta.T).view(7, heads, hd),
                                   (x @ _meta_permute(wk_meta, heads).T).view(7, heads, hd))]),
        atol=1e-2)


def test_meta_tokenizer_matches_sentencepiece(tiny_dirs):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(Path(tiny_dirs["meta"]) / "tokenizer.model"))
    text_tokenizer = load_llm(tiny_dirs["meta"]).text_tokenizer
    for text in [PROMPT, "a photo of  dog\nsitting é 2024", "a photo of ing"]:
        assert encode_prompts(text_tokenizer, [text]) == [[1] + sp.encode(text)]   # BOS like encode(bos=True)


def test_token_strings_sentencepiece(tiny_dirs):
    text_tokenizer = load_llm(tiny_dirs["hf"]).text_tokenizer
    ids = list(range(len(text_tokenizer)))
    strings = token_strings(text_tokenizer, ids)
    pieces = text_tokenizer.convert_ids_to_tokens(ids)
    printable = printable_mask(text_tokenizer, ids, strings)
    for piece, s, ok in zip(pieces, strings, printable):
        if piece.startswith("<0x"):
            assert not ok
        elif piece.startswith("▁") and piece != "▁":
            assert s == " " + piece[1:] and ok
    assert strings[1] == "<s>" and not printable[1] and not printable[0]
    assert token_strings(text_tokenizer, [2, 1], skip_special=True) == ["", ""]
    assert sum(p.startswith("▁") and len(p) > 2 for p in pieces) > 20   # word pieces were checked


def _byte_level_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(["a photo of the cat sitting on a tree", "héllo wörld 日本"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


def test_token_strings_byte_level_bpe(tmp_path):
    text_tokenizer = _byte_level_tokenizer(tmp_path)
    ids = list(range(len(text_tokenizer)))
    strings = token_strings(text_tokenizer, ids)
    printable = printable_mask(text_tokenizer, ids, strings)
    cat = text_tokenizer.convert_tokens_to_ids("Ġcat")
    assert strings[cat] == " cat" and printable[cat]
    assert not printable[text_tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    partial = text_tokenizer.convert_tokens_to_ids("Ã")           # first byte of a 2-byte UTF-8 char
    assert strings[partial] == "\ufffd" and not printable[partial]
    newline = text_tokenizer.convert_tokens_to_ids("Ċ")
    assert strings[newline] == "\n" and not printable[newline]


# Prompt segments as the authors' few-shot/denoising prompts have them: leading, repeated
# and trailing spaces, newlines, empty.
SEGMENTS = [" >\nOutput: ", "Input: ", "Output: ", "a photo of the cat", " cat", "  cat",
            "   dog  ", "cat ", "cat  ", " ", "  ", "   ", "", "\n", " \n dog", "\n  red", "é 42 "]


def test_encode_segment_equals_sentencepiece(tmp_path):
    """Meta's tokenizer (sentencepiece attached) and a transformers LLaMA tokenizer saved as a
    Hugging Face directory without tokenizer.model (the leading-space fix) both give exactly
    sentencepiece's encode of every segment; the plain transformers encode does not."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from models.meta_llama import sentencepiece_tokenizer
    sp_file = make_sentencepiece_model(tmp_path / "spm", space_runs=True)
    sp = spm.SentencePieceProcessor(model_file=sp_file)
    assert sp.piece_to_id("\u2581\u2581") != sp.unk_id()  # repeated spaces are real pieces
    meta = sentencepiece_tokenizer(sp_file)
    assert getattr(meta, SENTENCEPIECE_ATTR, None) is not None
    meta.save_pretrained(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert getattr(hf, SENTENCEPIECE_ATTR, None) is None
    for text in SEGMENTS:
        want = sp.encode(text)
        assert encode_segment(meta, text) == want, text
        assert encode_segment(hf, text) == want, text
    plain = [hf.encode(t, add_special_tokens=False) for t in SEGMENTS]
    differ = [t for t, ids in zip(SEGMENTS, plain) if ids != sp.encode(t)]
    assert SEGMENTS[0] in differ and all(t.startswith(" ") for t in differ)  # what is fixed
    assert encode_prompts(hf, SEGMENTS[:2]) == [[1] + sp.encode(t) for t in SEGMENTS[:2]]


def test_hf_directory_with_tokenizer_model_uses_sentencepiece(tmp_path, tiny_dirs):
    """load_llm attaches the HF directory's tokenizer.model only when it is the tokenizer's own."""
    own = Path(tiny_dirs["hf"]).parent / ".hf-spm" / "spm.model"
    with_model = tmp_path / "with"
    shutil.copytree(tiny_dirs["hf"], with_model)
    shutil.copy(own, with_model / "tokenizer.model")
    text_tokenizer = load_llm(with_model).text_tokenizer
    assert getattr(text_tokenizer, SENTENCEPIECE_ATTR, None) is not None
    other = make_sentencepiece_model(tmp_path / "other", seed=1, space_runs=True)
    assert not attach_sentencepiece(load_llm(tiny_dirs["hf"]).text_tokenizer, other)
    assert not attach_sentencepiece(text_tokenizer, tmp_path / "missing.model")


def test_encode_segment_byte_level_bpe_unchanged(tmp_path):
    text_tokenizer = _byte_level_tokenizer(tmp_path)
    for text in SEGMENTS:
        assert encode_segment(text_tokenizer, text) == text_tokenizer.encode(
            text, add_special_tokens=False), text


def test_device_map_auto_loads_both_formats(tiny_dirs):
    """device_map="auto" (on this machine: everything on the CPU) gives the same model."""
    want = _logits(load_llm(tiny_dirs["hf"]))
    for fmt in ("hf", "meta"):
        llm = load_llm(tiny_dirs[fmt], device_map="auto")
        assert torch.equal(_logits(llm), want)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_weights_go_to_the_device_one_by_one_unchanged(tmp_path, n_shards):
    """Meta's bf16 shards, memory-mapped and cast weight by weight where they land, give the
    weights of the former way (every shard read whole, merged and permuted on the CPU, then
    the whole state cast), in fp16 (the paper's), bf16 and fp32."""
    from models.meta_llama import _meta_files, meta_to_hf_state_dict
    model = tiny_llama_model(vocab_size=300, num_kv_heads=2).to(torch.bfloat16)
    sp = make_sentencepiece_model(tmp_path / "sp", 300)
    path = save_meta_llama(model, sp, tmp_path / "m", n_shards=n_shards)
    params, _, files = _meta_files(path)
    shards = [torch.load(f, weights_only=True) for f in files]
    assert shards[0]["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        old = {k: v.to(dtype) for k, v in meta_to_hf_state_dict(shards, params).items()}
        got = load_llm(path, dtype=dtype, device="cpu").model.state_dict()
        assert set(old) <= set(got)
        for k, v in old.items():
            assert got[k].dtype == dtype and torch.equal(got[k], v), k
        assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           model.model.layers[0].self_attn.q_proj.weight.to(dtype))


def test_hf_weights_load_onto_the_device_unchanged(tiny_dirs):
    """transformers' loader with the device as its device map gives the weights of a plain load."""
    from transformers import AutoModelForCausalLM
    for dtype in (torch.float16, torch.float32):
        want = AutoModelForCausalLM.from_pretrained(tiny_dirs["hf"], dtype=dtype).state_dict()
        got = load_llm(tiny_dirs["hf"], dtype=dtype, device="cpu").model.state_dict()
        assert set(got) == set(want)
        assert all(got[k].dtype == dtype and torch.equal(got[k], v) for k, v in want.items())


def test_llm_dtype_auto_takes_bf16_only_where_native(monkeypatch):
    """auto: fp16 on a GPU (the paper's); on a CPU bf16 where the hardware has it and ATen runs
    its AVX-512 kernels (not under ATEN_CPU_CAPABILITY=avx2) and oneDNN is not capped below bf16
    (ONEDNN_MAX_CPU_ISA), otherwise fp32; the rule is utils.dist.native_bf16, the one every stage
    asks. bf16 on a CPU follows the same rule; fp16 on a CPU is fp32."""
    import models.llm as m
    assert m.llm_dtype("auto", "cuda") == "fp16" and m.llm_dtype("bf16", "cuda") == "bf16"
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for hardware, capability, want in ((True, "AVX512", "bf16"), (True, "AVX2", "fp32"),
                                       (False, "AVX512", "fp32"), (False, "DEFAULT", "fp32")):
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
            monkeypatch.setattr(torch.cpu, probe, lambda h=hardware: h, raising=False)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert m.cpu_native_bf16() == dist.native_bf16("cpu") == (want == "bf16")
        assert m.llm_dtype("auto", "cpu") == m.llm_dtype("bf16", "cpu") == want
        assert m.llm_dtype("fp16", "cpu") == m.llm_dtype("fp32", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    for isa, want in (("AVX2", "fp32"), ("avx512_core", "fp32"), ("AVX512_CORE_AMX", "bf16"),
                      ("ALL", "bf16")):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert m.llm_dtype("auto", "cpu") == want, isa
        assert dist.native_bf16("cpu") == (want == "bf16"), isa   # steps 2 and 4 ask the same
    with pytest.raises(V2LError, match="llm_dtype"):
        m.llm_dtype("int8", "cpu")


def test_resolve_dtype():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(V2LError, match="dtype"):
        resolve_dtype("int3", "cpu")


def test_bad_inputs_give_one_clear_error(tmp_path, tiny_dirs):
    with pytest.raises(V2LError, match="not found"):
        load_llm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(V2LError, match="unknown model format"):
        load_llm(tmp_path / "empty")
    meta = Path(tiny_dirs["meta"])
    for missing, message in [("params.json", "params.json missing"),
                             ("tokenizer.model", "tokenizer.model not found")]:
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(meta, broken)
        (broken / missing).unlink()
        with pytest.raises(V2LError, match=message):
            load_llm(broken)
    wrong_params = tmp_path / "wrong-params"
    shutil.copytree(meta, wrong_params)
    (wrong_params / "params.json").write_text('{"dim": 64}')
    with pytest.raises(V2LError, match="lacks n_layers, n_heads"):
        load_llm(wrong_params)
    garbage = tmp_path / "garbage-tokenizer"
    shutil.copytree(meta, garbage)
    (garbage / "tokenizer.model").write_text("not a sentencepiece model")
    with pytest.raises(V2LError, match="not a sentencepiece tokenizer model"):
        load_llm(garbage)
    sharded = Path(make_tiny_llama(tmp_path / "two", "meta", n_shards=2))
    (sharded / "consolidated.01.pth").unlink()
    with pytest.raises(V2LError, match="shards are missing"):
        load_llm(sharded)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(V2LError, match="cannot load this gguf model"):
        load_llm(tmp_path / "bad.gguf")


def test_tokenizer_of_another_model_is_refused(tmp_path, tiny_dirs):
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_dirs["hf"], mixed)
    other = make_tiny_llama(tmp_path / "other", "hf", vocab_size=300)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(other) / f, mixed / f)
    with pytest.raises(V2LError, match="tokenizer does not belong"):
        load_llm(mixed)
    meta = tmp_path / "meta-mixed"
    shutil.copytree(tiny_dirs["meta"], meta)
    shutil.copy(Path(tmp_path / ".other-spm" / "spm.model"), meta / "tokenizer.model")
    with pytest.raises(V2LError, match="tokenizer does not belong"):
        load_llm(meta)
