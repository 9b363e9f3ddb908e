"""The V2L tokenizer: architecture vs the authors' checkpoint, quantisers vs brute force,
the public API end to end on a tiny model, and one-line refusals of bad input."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures_tokenizer import (TINY_TOKENIZER, make_codebook_artifacts, make_tiny_tokenizer,
                                tiny_images)

from engine.tokenizer_build import tokenizer_from_artifacts
from models.clip import load_clip
from models.losses import PatchDiscriminator
from models.quantizers import nearest_code, topk_nearest, vector_quantize
from models.tokenizer import TokenizerConfig, V2LTokenizer
from models.tokenizer_io import (load_authors_checkpoint, load_tokenizer, save_tokenizer,
                                 split_authors_checkpoint)
from utils.artifacts import save_tensors, write_manifest
from utils.errors import V2LError

AUTHORS_KEYS = Path(__file__).parent / "fixtures" / "v2l_authors_checkpoint_keys.json"
LLM_IDS = torch.arange(64) * 7 + 3          # codebook rows are NOT LLM ids: the mapping is exercised


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer, clip, dirs = make_tiny_tokenizer(tmp_path_factory.mktemp("tiny"), llm_ids=LLM_IDS)
    return tokenizer.eval(), clip, dirs


@pytest.fixture(scope="module")
def authors_shapes():
    return {k: tuple(v) for k, v in json.loads(AUTHORS_KEYS.read_text()).items()}


@pytest.fixture(scope="module")
def paper_tokenizer():
    """Paper configuration: V=32000, D=768, M=11908, default architecture."""
    torch.manual_seed(0)
    return V2LTokenizer(TokenizerConfig(), torch.randn(32000, 768), torch.arange(32000),
                        torch.randn(11908, 768), [f"g{i}" for i in range(11908)])


# ----- architecture ----------------------------------------------------------------------
def test_paper_architecture_is_the_authors(paper_tokenizer, authors_shapes):
    ours = {k: tuple(v.shape) for k, v in paper_tokenizer.state_dict().items() if k != "llm_ids"}
    theirs = {k: v for k, v in authors_shapes.items() if not k.startswith("discriminator.")}
    assert ours == theirs
    enc_dec = sum(p.numel() for m in (paper_tokenizer.encoder, paper_tokenizer.decoder)
                  for p in m.parameters())
    assert enc_dec == sum(math.prod(v) for k, v in theirs.items()
                          if k.startswith(("encoder.", "decoder.")))
    assert round(enc_dec / 1e6, 1) == 75.2
    trainable = {id(p) for p in paper_tokenizer.trainable_parameters()}
    assert id(paper_tokenizer.codebook_projection.weight) in trainable
    assert id(paper_tokenizer.tok_embeddings.weight) not in trainable
    assert not paper_tokenizer.tok_embeddings_global.weight.requires_grad
    assert paper_tokenizer.last_layer() is paper_tokenizer.decoder.conv_out.weight


def _authors_state(shapes):
    """A checkpoint in the authors' layout; tensor i is constant i (expanded: no memory)."""
    sd = {k: torch.tensor(float(i)).expand(v) for i, (k, v) in enumerate(shapes.items())}
    sd["global_encoder.conv1.weight"] = torch.zeros(1024, 3, 14, 14)
    sd["perceptual_loss.net.slice1.0.weight"] = torch.zeros(64, 3, 3, 3)
    return sd


def test_authors_checkpoint_loads(paper_tokenizer, authors_shapes, tmp_path):
    sd = _authors_state(authors_shapes)
    path = tmp_path / "v2l.pth"
    torch.save({"model": sd, "epoch": 99}, path)
    disc = load_authors_checkpoint(paper_tokenizer, path)
    assert set(disc) == {k.removeprefix("discriminator.") for k in authors_shapes
                         if k.startswith("discriminator.")}
    PatchDiscriminator().load_state_dict(disc)      # their discriminator part fits ours as is
    loaded = paper_tokenizer.state_dict()
    for i, k in enumerate(authors_shapes):
        if not k.startswith("discriminator."):
            assert float(loaded[k].flatten()[0]) == i and float(loaded[k].flatten()[-1]) == i, k
    assert torch.equal(paper_tokenizer.llm_ids, torch.arange(32000))
    # DDP prefixes and a "state_dict" wrapper are understood too
    model_state, _ = split_authors_checkpoint({"state_dict": {"module." + k: v for k, v in sd.items()}})
    assert set(model_state) == set(loaded) - {"llm_ids"}


def test_other_architecture_is_refused(paper_tokenizer, authors_shapes):
    sd = _authors_state(authors_shapes)
    sd["encoder.conv_out.weight"] = torch.zeros(512, 512, 3, 3)        # taming's double_z
    sd["encoder.down.3.attn.0.q.weight"] = torch.zeros(512, 512, 1, 1)  # level attention
    del sd["decoder.mid.cross_attn_1.to_q.weight"]                      # no cross-attention
    before = paper_tokenizer.decoder.conv_out.weight.clone()
    with pytest.raises(V2LError, match="not a V2L tokenizer checkpoint.*1 missing.*1 unexpected"
                                       ".*encoder.conv_out.weight"):
        load_authors_checkpoint(paper_tokenizer, sd)
    assert torch.equal(before, paper_tokenizer.decoder.conv_out.weight)    # nothing half-loaded
    with pytest.raises(V2LError, match="not a tensor"):
        load_authors_checkpoint(paper_tokenizer, {"model": {"a": 1}})
    with pytest.raises(V2LError, match="not found"):
        load_authors_checkpoint(paper_tokenizer, "no/such/file.pth")


# ----- quantisers vs brute force ---------------------------------------------------------
@pytest.mark.parametrize("block_elems", [1 << 24, 100, 7])
def test_nearest_code_equals_brute_force(block_elems):
    z, codes = torch.randn(300, 16), torch.randn(50, 16)
    expected = torch.cdist(z, codes).argmin(1)
    assert torch.equal(nearest_code(z, codes, block_elems=block_elems), expected)


def test_vector_quantize_straight_through_and_loss():
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    codes = torch.randn(20, 8, requires_grad=True)
    zq, loss, rows = vector_quantize(z, codes, beta=0.33)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.equal(rows.flatten(), torch.cdist(flat, codes.detach()).argmin(1))
    assert torch.allclose(zq.detach().permute(0, 2, 3, 1).reshape(-1, 8),
                          codes.detach()[rows.flatten()], atol=1e-6)
    sq = ((codes.detach()[rows.flatten()] - flat) ** 2).mean()
    assert torch.allclose(loss, 1.33 * sq)
    w = torch.randn_like(zq)
    (zq * w).sum().backward(retain_graph=True)
    assert torch.allclose(z.grad, w)              # straight-through: identity gradient
    assert codes.grad is None or not codes.grad.any()
    z.grad = None
    loss.backward()
    # d loss / d codes comes only from the beta term; d loss / d z only from the commitment term
    grad_codes = torch.zeros_like(codes).index_add_(
        0, rows.flatten(), 2 * 0.33 * (codes.detach()[rows.flatten()] - flat) / flat.numel())
    assert torch.allclose(codes.grad, grad_codes, atol=1e-7)
    assert torch.allclose(z.grad.permute(0, 2, 3, 1).reshape(-1, 8),
                          2 * (flat - codes.detach()[rows.flatten()]) / flat.numel(), atol=1e-7)


def test_topk_nearest_equals_brute_force():
    q, codes = F.normalize(torch.randn(5, 16), dim=-1), torch.randn(40, 16) * torch.rand(40, 1)
    expected_l2 = torch.cdist(q, codes).topk(7, largest=False).indices
    assert torch.equal(topk_nearest(q, codes, 7, "l2"), expected_l2)
    cos = F.cosine_similarity(q[:, None], codes[None], dim=-1)
    assert torch.equal(topk_nearest(q, codes, 7, "cosine"), cos.topk(7).indices)
    assert not torch.equal(expected_l2, cos.topk(7).indices)   # the two rules really differ here


def test_row_lookup_gradients_and_codebook_cache(tmp_path):
    tokenizer = make_tiny_tokenizer(tmp_path)[0]
    z = F.normalize(torch.randn(2, 32, 4, 4), dim=1)
    # gradients through the projected rows only == through the whole projected codebook
    grads = []
    for quantize in (lambda: vector_quantize(z, tokenizer.projected_codebook(), tokenizer.config.beta),
                     lambda: tokenizer.quantize(z)):
        tokenizer.zero_grad()
        zq, loss, rows = quantize()
        loss.backward()
        grads.append((rows, zq, tokenizer.codebook_projection.weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    assert torch.allclose(grads[0][2], grads[1][2], atol=1e-6) and grads[0][2].abs().sum() > 0
    # the inference cache follows the weights and the mode
    tokenizer.eval()
    with torch.no_grad():
        first = tokenizer.projected_codebook()
        assert tokenizer.projected_codebook() is first
        tokenizer.codebook_projection.weight.mul_(2)
        changed = tokenizer.projected_codebook()
        assert changed is not first
        assert torch.allclose(changed, tokenizer.codebook_projection(tokenizer.tok_embeddings.weight))
        tokenizer.train()
        assert tokenizer.projected_codebook() is not changed


@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (3, 32, 5, 7)])
def test_group_norm_is_torch_group_norm_in_either_layout_and_float32_under_autocast(shape):
    """The CPU path runs torch's float32 NCHW kernel on a contiguous copy: the very numbers of
    nn.GroupNorm on that copy (gradients too), in the input's layout; bf16 inputs under
    autocast give float32 outputs."""
    from models.vqgan import GroupNorm
    torch.manual_seed(0)
    ours, ref = GroupNorm(32, shape[1], eps=1e-6), torch.nn.GroupNorm(32, shape[1], eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape) * 3 + 1
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.clone(memory_format=layout).requires_grad_()
        xr = x.clone().requires_grad_()
        y, y_ref = ours(xl), ref(xr)
        assert torch.equal(y, y_ref) and y.is_contiguous(memory_format=layout)
        g = torch.randn(shape)
        y.backward(g.contiguous(memory_format=layout)), y_ref.backward(g)
        assert torch.equal(xl.grad, xr.grad)
        for name in ("weight", "bias"):
            assert torch.equal(getattr(ours, name).grad, getattr(ref, name).grad)
            getattr(ours, name).grad = getattr(ref, name).grad = None
    # torch's own channels-last kernel agrees up to float32 summation order (O(1) outputs)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x_cl), ref(x_cl), rtol=0, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        yb = ours(xb)
    assert yb.dtype == torch.float32 and yb.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(yb, ref(xb.float().contiguous()).detach())


def test_quantiser_runs_in_float32_under_autocast(tiny):
    """Under bf16 autocast the nearest codes, z_q and the VQ loss are those of float32."""
    tokenizer, clip, _ = tiny
    x128, _ = tiny_images(clip, batch=2, seed=3)
    tokenizer.train()
    try:
        with torch.no_grad():
            z = tokenizer.encode_features(x128)
            zq, loss, rows = tokenizer.quantize(z)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z_amp = tokenizer.encode_features(x128)
                zq_amp, loss_amp, rows_amp = tokenizer.quantize(z)
    finally:
        tokenizer.eval()
    assert z_amp.dtype == torch.float32 and zq_amp.dtype == torch.float32
    assert torch.equal(rows_amp, rows) and torch.equal(zq_amp, zq) and torch.equal(loss_amp, loss)


# ----- the tiny tokenizer end to end ------------------------------------------------------
def test_forward_shapes_ids_and_gradients(tiny):
    tokenizer, clip, _ = tiny
    x128, x_clip = tiny_images(clip, batch=2)
    tokenizer.zero_grad()
    out = tokenizer(x128, x_clip)
    assert out["rec"].shape == (2, 3, 128, 128)
    assert out["local_ids"].shape == (2, 16, 16) and out["global_idx"].shape == (2, 5)
    assert set(out["local_ids"].unique().tolist()) <= set(LLM_IDS.tolist())
    (out["rec"].abs().mean() + out["vq_loss"]).backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "codebook_projection.weight",
                 "post_quant_conv.weight", "decoder.mid.cross_attn_1.to_k.weight"):
        grad = tokenizer.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert tokenizer.tok_embeddings.weight.grad is None
    assert all(p.grad is None for p in clip.model.parameters())
    # the global branch equals brute force on CLIP's embeddings
    emb = clip.encode_images(x_clip)
    expected = torch.cdist(emb, tokenizer.tok_embeddings_global.weight).topk(5, largest=False).indices
    assert torch.equal(out["global_idx"], expected)


def test_encode_decode_save_load(tiny, tmp_path):
    tokenizer, clip, _ = tiny
    x128, x_clip = tiny_images(clip, batch=1, seed=1)
    with torch.no_grad():
        out = tokenizer(x128, x_clip)
    global_idx, local_ids = tokenizer.encode(x128, x_clip)
    assert torch.equal(global_idx, out["global_idx"]) and torch.equal(local_ids, out["local_ids"])
    rec = tokenizer.decode(local_ids, global_idx)
    assert rec.shape == (1, 3, 128, 128) and rec.abs().max() <= 1
    assert torch.allclose(rec, out["rec"].clamp(-1, 1), atol=1e-4)
    words = tokenizer.global_strings(global_idx)
    assert len(words) == 1 and len(words[0]) == 5 and all(isinstance(w, str) for w in words[0])

    path = save_tokenizer(tokenizer, tmp_path / "tokenizer")
    assert path == tmp_path / "tokenizer" / "tokenizer.pt"
    loaded = load_tokenizer(tmp_path / "tokenizer")     # rebuilds CLIP from the codebook's spec
    assert loaded.config == tokenizer.config and loaded.config.n_local == 64 and loaded.config.embed_dim == 32
    idx2, emb2 = loaded.global_tokens(x_clip)
    assert torch.equal(idx2, global_idx)
    assert torch.equal(loaded.decode(local_ids, global_emb=emb2), rec)
    assert loaded.global_strings(global_idx) == words


def test_clip_runs_in_the_recorded_precision_on_a_gpu(tmp_path, monkeypatch):
    """load_tokenizer runs CLIP as step 4 did (config.clip_precision) when CLIP is on a GPU:
    fp16 weights under fp16 autocast, or bf16 autocast; on a CPU it stays fp32 (fp16 is not
    usable there). The GPU is faked: only the choice is checked, nothing runs on it."""
    from models.clip import ClipBundle
    from models.tokenizer_io import AutocastClip, clip_in_precision
    tokenizer, clip, dirs = make_tiny_tokenizer(tmp_path)
    with pytest.raises(V2LError, match="clip_precision='fp8'"):
        dataclasses.replace(tokenizer.config, clip_precision="fp8").validate()
    assert TokenizerConfig.from_dict({"resolution": 128}).clip_precision == "fp32"   # older files
    for precision in ("fp32", "fp16", "bf16"):                 # CPU: fp32 whatever was recorded
        tokenizer.config = dataclasses.replace(tokenizer.config, clip_precision=precision)
        loaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / f"{precision}.pt"))
        assert loaded.config.clip_precision == precision
        assert type(loaded.clip) is ClipBundle
        assert next(loaded.clip.model.parameters()).dtype == torch.float32
    monkeypatch.setattr(ClipBundle, "device", property(lambda self: torch.device("cuda", 0)))
    fresh = load_clip(dirs["clip"])
    assert clip_in_precision(fresh, "fp32") is fresh
    bf16 = clip_in_precision(fresh, "bf16")
    assert isinstance(bf16, AutocastClip) and bf16.dtype == torch.bfloat16
    assert next(bf16.model.parameters()).dtype == torch.float32
    loaded = load_tokenizer(tmp_path / "fp16.pt", clip=load_clip(dirs["clip"]))
    assert isinstance(loaded.clip, AutocastClip) and loaded.clip.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in loaded.clip.model.parameters())
    assert loaded.clip.embed_dim == clip.embed_dim and loaded.clip.ident == clip.ident


def test_forward_from_given_global_indices_is_the_forward_from_clip(tiny):
    """The training pass from the global indices CLIP gave before is the pass that runs CLIP,
    bit for bit (the decoder's input is a function of the indices); its rows are the local
    ids' codebook rows."""
    tokenizer, clip, _ = tiny
    x128, x_clip = tiny_images(clip, batch=2, seed=2)
    with torch.no_grad():
        out = tokenizer(x128, x_clip)
        given = tokenizer(x128, global_idx=out["global_idx"].to(torch.int16))
    assert set(given) == set(out)
    for k in out:
        assert torch.equal(given[k], out[k]), k
    assert torch.equal(tokenizer.llm_ids[out["rows"]], out["local_ids"])
    with pytest.raises(V2LError, match="x_clip.*or their global token indices"):
        tokenizer(x128)


def test_id_mapping(tiny, tmp_path):
    tokenizer = tiny[0]
    rows = torch.tensor([[0, 5], [63, 1]])
    assert torch.equal(tokenizer.llm_ids_from_rows(rows), LLM_IDS[rows])
    assert torch.equal(tokenizer.rows_from_llm_ids(LLM_IDS[rows]), rows)
    for bad in (4, -1, 10_000):                 # between ids, negative, beyond the vocabulary
        with pytest.raises(V2LError, match="not in the local codebook"):
            tokenizer.rows_from_llm_ids(torch.tensor([3, bad]))
    # the inverse table follows the ids when weights with other ids are loaded
    other = make_tiny_tokenizer(tmp_path, llm_ids=LLM_IDS + 1)[0]
    other.rows_from_llm_ids(LLM_IDS[rows] + 1)                # builds its table
    other.load_state_dict(tokenizer.state_dict())
    assert torch.equal(other.rows_from_llm_ids(LLM_IDS[rows]), rows)
    with pytest.raises(V2LError, match="not in the local codebook"):
        other.rows_from_llm_ids(LLM_IDS[rows] + 1)


# ----- bad input: one clear line ---------------------------------------------------------
def test_bad_inputs_are_refused(tiny, tmp_path):
    tokenizer, clip, dirs = tiny
    with pytest.raises(V2LError, match="step2_codebook_embedding.py"):
        tokenizer_from_artifacts(tmp_path / "nowhere", dirs["global"], clip)
    with pytest.raises(V2LError, match="expected 'codebook'"):
        tokenizer_from_artifacts(dirs["global"], dirs["global"], clip)
    other = make_codebook_artifacts(tmp_path / "other", dirs["clip"], seed=1, clip=clip)
    with pytest.raises(V2LError, match="different codebook artifact"):
        tokenizer_from_artifacts(dirs["codebook"], other["global"], clip)
    with pytest.raises(V2LError, match="embeds in 48 dims but the codebooks have D=32"):
        tokenizer_from_artifacts(dirs["codebook"], dirs["global"],
                                    dataclasses.replace(clip, embed_dim=48), **TINY_TOKENIZER)
    with pytest.raises(V2LError, match="unknown tokenizer setting"):
        tokenizer_from_artifacts(dirs["codebook"], dirs["global"], clip, **TINY_TOKENIZER,
                                    chanels=64)
    with pytest.raises(V2LError, match="global_topk=99"):
        tokenizer_from_artifacts(dirs["codebook"], dirs["global"], clip,
                                    **{**TINY_TOKENIZER, "global_topk": 99})
    # a codebook file without its llm_ids (with a consistent manifest)
    broken = other["codebook"]
    save_tensors(broken / "local_codebook.safetensors", {"embeddings": torch.randn(64, 32)})
    write_manifest(broken, "codebook", {}, ["local_codebook.safetensors"],
                   inputs={"vocab": other["vocab"]})
    write_manifest(other["global"], "global", {},
                   ["global_codebook.safetensors", "global_strings.json"], inputs={"codebook": broken})
    with pytest.raises(V2LError, match=r"missing tensor\(s\) \['llm_ids'\]"):
        tokenizer_from_artifacts(broken, other["global"], clip, **TINY_TOKENIZER)
    with pytest.raises(V2LError, match="global codebook dim 16 != local codebook dim 32"):
        V2LTokenizer(tokenizer.config, torch.randn(64, 32), torch.arange(64), torch.randn(16, 16), ["w"] * 16)
    with pytest.raises(V2LError, match="3 global strings for 16"):
        V2LTokenizer(tokenizer.config, torch.randn(64, 32), torch.arange(64), torch.randn(16, 32), ["w"] * 3)
    with pytest.raises(V2LError, match="decode needs the global tokens"):
        tokenizer.decode(torch.zeros(1, 16, 16, dtype=torch.long) + 3)
    bare = V2LTokenizer(tokenizer.config, torch.randn(64, 32), torch.arange(64), torch.randn(16, 32), ["w"] * 16)
    with pytest.raises(V2LError, match="need the CLIP image tower"):
        bare.global_tokens(torch.zeros(1, 3, 64, 64))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(V2LError, match="not a readable tokenizer file"):
        load_tokenizer(tmp_path / "junk.pt", clip=clip)
    payload = torch.load(save_tokenizer(tokenizer, tmp_path / "t.pt"), weights_only=True)
    payload["config"]["ch"] = 64
    torch.save(payload, tmp_path / "t.pt")
    with pytest.raises(V2LError, match="damaged tokenizer file"):
        load_tokenizer(tmp_path / "t.pt", clip=clip)
    with pytest.raises(V2LError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing", clip=clip)


# ----- the authors' ablations ------------------------------------------------------------
def test_local_codebook_ablations(tiny, tmp_path):
    _, clip, dirs = tiny
    clip_rows = make_tiny_tokenizer(tmp_path / "a", llm_ids=LLM_IDS)[0].tok_embeddings.weight
    built = {kind: tokenizer_from_artifacts(dirs["codebook"], dirs["global"], clip,
                                            **TINY_TOKENIZER, local_codebook=kind)
             for kind in ("clip", "random", "trained")}
    codebooks = {kind: t.tok_embeddings.weight for kind, t in built.items()}
    assert torch.equal(codebooks["clip"], codebooks["trained"])
    assert torch.equal(codebooks["clip"], clip_rows)
    assert not torch.allclose(codebooks["random"], codebooks["clip"], atol=0.1)
    torch.testing.assert_close(codebooks["random"].norm(dim=1), codebooks["clip"].norm(dim=1))
    for kind, tokenizer in built.items():
        trained = kind == "trained"
        assert tokenizer.tok_embeddings.weight.requires_grad == trained
        assert any(p is tokenizer.tok_embeddings.weight
                   for p in tokenizer.trainable_parameters()) == trained
    # the trained codebook gets gradients through the chosen rows
    tokenizer = built["trained"]
    x128, x_clip = tiny_images(clip, batch=1)
    out = tokenizer(x128, x_clip)
    (out["rec"].abs().mean() + out["vq_loss"]).backward()
    assert tokenizer.tok_embeddings.weight.grad.abs().sum() > 0
    with pytest.raises(V2LError, match="local_codebook='learned'"):
        tokenizer_from_artifacts(dirs["codebook"], dirs["global"], clip, **TINY_TOKENIZER,
                                 local_codebook="learned")


def test_no_projector_and_no_cross_attention(tiny, tmp_path):
    _, clip, dirs = tiny
    tokenizer = tokenizer_from_artifacts(dirs["codebook"], dirs["global"], clip, **TINY_TOKENIZER,
                                         projector=False, cross_attention=False).eval()
    keys = set(tokenizer.state_dict())
    assert not any(k.startswith("codebook_projection.") for k in keys)
    assert not any("cross_attn" in k for k in keys)
    assert torch.equal(tokenizer.projected_codebook(), tokenizer.tok_embeddings.weight)
    x128, x_clip = tiny_images(clip, batch=1)
    global_idx, local_ids = tokenizer.encode(x128, x_clip)
    rec = tokenizer.decode(local_ids, global_idx)
    # without cross-attention the global tokens do not reach the decoder
    assert torch.equal(tokenizer.decode(local_ids, (global_idx + 1) % 16), rec)
    assert torch.equal(tokenizer.decode(local_ids), rec)
    loaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "t.pt"), clip=clip)
    assert loaded.config == tokenizer.config
    assert torch.equal(loaded.decode(local_ids, global_idx), rec)
    # the paper model's decoder does depend on them
    paper = tiny[0]
    paper_ids = paper.encode(x128, x_clip)
    assert not torch.equal(paper.decode(paper_ids[1], paper_ids[0]),
                           paper.decode(paper_ids[1], (paper_ids[0] + 1) % 16))


def test_residual_cross_attention_adds_to_the_features(tiny, tmp_path):
    """--cross_residual: features + attention (with a zero attention output: exactly the decoder
    without cross-attention); the authors' decoder replaces the features (then a constant)."""
    _, clip, dirs = tiny
    build = lambda **kw: tokenizer_from_artifacts(dirs["codebook"], dirs["global"], clip,  # noqa: E731
                                                  **TINY_TOKENIZER, **kw).eval()
    torch.manual_seed(1)
    residual = build(cross_residual=True)
    plain = build(cross_attention=False)
    plain.load_state_dict({k: v for k, v in residual.state_dict().items() if "cross_attn" not in k})
    x128, x_clip = tiny_images(clip, batch=2)
    global_idx, local_ids = residual.encode(x128, x_clip)
    assert not torch.allclose(residual.decode(local_ids, global_idx), plain.decode(local_ids))
    with torch.no_grad():
        residual.decoder.mid.cross_attn_1.to_out[0].weight.zero_()
        residual.decoder.mid.cross_attn_1.to_out[0].bias.zero_()
    torch.testing.assert_close(residual.decode(local_ids, global_idx), plain.decode(local_ids))
    authors = build()
    authors.load_state_dict(residual.state_dict())      # same parameters, same checkpoint layout
    # zero attention output: the local tokens no longer reach the pixels
    torch.testing.assert_close(authors.decode(local_ids, global_idx),
                               authors.decode(local_ids.roll(1, dims=-1), global_idx))
    loaded = load_tokenizer(save_tokenizer(residual, tmp_path / "r.pt"), clip=clip)
    assert loaded.config.cross_residual and not authors.config.cross_residual


def test_null_key_lets_a_position_take_nothing(tiny, tmp_path):
    """--cross_null: one more key with a zero value. At its initial (zero) key it is one more
    softmax slot; a dominating null key makes the attention output the projection's bias."""
    from models.vqgan import CrossAttention
    torch.manual_seed(0)
    plain, null = CrossAttention(16, 8, 2, 4), CrossAttention(16, 8, 2, 4, null_key=True)
    null.load_state_dict(plain.state_dict() | {"null_k": null.null_k.detach()})
    x, context = torch.randn(3, 5, 16), torch.randn(3, 2, 8)
    # by hand: scores against the context keys plus a 0 score, values plus a zero vector
    q = null.to_q(x).unflatten(-1, (2, 4)).transpose(1, 2)
    k = null.to_k(context).unflatten(-1, (2, 4)).transpose(1, 2)
    v = null.to_v(context).unflatten(-1, (2, 4)).transpose(1, 2)
    scores = torch.cat([q @ k.transpose(-1, -2) / 2, q.new_zeros(3, 2, 5, 1)], -1)
    by_hand = (scores.softmax(-1)[..., :2] @ v).transpose(1, 2).flatten(2)
    torch.testing.assert_close(null(x, context), null.to_out(by_hand))
    assert not torch.allclose(null(x, context), plain(x, context))
    with torch.no_grad():        # a null key that every query prefers: (almost) nothing is read
        null.null_k.copy_(torch.ones(8) * 1e4)
        null.to_q.weight.copy_(null.to_q.weight.abs() + 1)
    x = x.abs() + 1
    torch.testing.assert_close(null(x, context), null.to_out[0].bias.expand(3, 5, 16))
    # the option is recorded and reloads; the authors' layout has no such parameter
    _, clip, dirs = tiny
    tokenizer = tokenizer_from_artifacts(dirs["codebook"], dirs["global"], clip, **TINY_TOKENIZER,
                                         cross_residual=True, cross_null=True).eval()
    assert "decoder.mid.cross_attn_1.null_k" in tokenizer.state_dict()
    assert not any(k.endswith("null_k") for k in tiny[0].state_dict())
    loaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "n.pt"), clip=clip)
    assert loaded.config.cross_null
    x128, x_clip = tiny_images(clip, batch=1)
    global_idx, local_ids = tokenizer.encode(x128, x_clip)
    torch.testing.assert_close(loaded.decode(local_ids, global_idx),
                               tokenizer.decode(local_ids, global_idx))


def test_code_entropy_loss():
    """Per-vector entropy minus the batch's entropy: lowest for firm, spread assignments;
    the gradient reaches the features only; off by default and in inference."""
    from models.quantizers import code_entropy_loss
    codes = torch.eye(4)
    spread = torch.eye(4) * 3            # each vector far closer to its own code
    same = torch.eye(4)[[0, 0, 0, 0]] * 3
    low, high = code_entropy_loss(spread, codes, 0.1), code_entropy_loss(same, codes, 0.1)
    assert low.item() == pytest.approx(-math.log(4), abs=1e-4)   # H(p_i) ~ 0, H(mean) = log 4
    assert high.item() == pytest.approx(0.0, abs=1e-4)           # everything on one code
    z = torch.randn(6, 4, requires_grad=True)
    c = torch.randn(4, 4, requires_grad=True)
    code_entropy_loss(z, c, 0.5).backward()
    assert z.grad.abs().sum() > 0 and c.grad is None
    p = F.softmax(-torch.cdist(z, c).pow(2) / 0.5, 1)
    by_hand = -(p * p.log()).sum(1).mean() + (p.mean(0) * p.mean(0).log()).sum()
    torch.testing.assert_close(code_entropy_loss(z, c, 0.5), by_hand)


def test_entropy_weight_enters_the_vq_loss_in_training_only(tiny):
    _, clip, dirs = tiny
    build = lambda **kw: tokenizer_from_artifacts(dirs["codebook"], dirs["global"], clip,  # noqa: E731
                                                  **TINY_TOKENIZER, **kw)
    torch.manual_seed(2)
    plain = build()
    ent = build(entropy_weight=0.5)
    ent.load_state_dict(plain.state_dict())
    x128, x_clip = tiny_images(clip, batch=2)
    a, b = plain(x128, x_clip), ent(x128, x_clip)
    assert torch.equal(a["local_ids"], b["local_ids"])
    assert b["vq_loss"].item() < a["vq_loss"].item()     # the entropy term is negative here
    with torch.no_grad():
        assert torch.equal(plain.quantize(plain.encode_features(x128))[1],
                           ent.quantize(ent.encode_features(x128))[1])
