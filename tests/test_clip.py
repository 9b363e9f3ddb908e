"""CLIP loading paths and the template-averaged, truncated text embedding."""
import pytest
import torch
import torch.nn.functional as F

from data.classes import imagenet_templates
from models.clip import (encode_text_templates, encode_text_truncated, load_clip, openai_weights_hint,
                         tokenize_templates)
from tiny_clip import TINY_CLIP_CFG, make_tiny_clip, make_tiny_openai_archive, register_tiny_arch
from utils.errors import V2LError

TRICKY = ["cat", "hello world", "a.b", "x!", "  dog  ", "Ünïcode", "&amp", "'s", "1 2 3", "...",
          "", "{}", "New York", "über-cool", "long " * 30]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return load_clip(make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny"))


def test_tokenize_templates_equals_tokenizer(clip):
    templates = imagenet_templates()
    assert len(templates) == 80
    fast = tokenize_templates(clip.clip_tokenizer, TRICKY, templates)
    ref = clip.clip_tokenizer([t.format(s) for s in TRICKY for t in templates])
    assert torch.equal(fast, ref)


def _adversarial_strings(n: int, seed: int = 0) -> list[str]:
    """Strings that probe every boundary of splicing: ASCII punctuation next to the template's
    '.', HTML entities, contractions, blanks, control and non-ASCII characters ftfy rewrites."""
    import random
    rng = random.Random(seed)
    chars = [chr(c) for c in range(32, 127)] + list("\u00e9\u00fc\u4e2d\u00c3\u00a9\u00a0\t\n\u2019\u201c\ufb01")
    words = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 8))) for _ in range(n)]
    words += [" " + "".join(rng.choice("abcxyz'.!?,-&;:<>") for _ in range(rng.randint(1, 6)))
              for _ in range(n)]
    return words + ["'s", "x'", "dog's", "&amp;", "a &lt; b", "\u00c3\u00a9t\u00c3\u00a9", "  ", "\u00a0cat",
                    "caf\u00e9", "<start_of_text>", "42.", "end!"]


def test_tokenize_templates_exact_on_adversarial_strings(clip):
    templates = imagenet_templates()
    strings = _adversarial_strings(60)
    ref = clip.clip_tokenizer([t.format(s) for s in strings for t in templates])
    assert torch.equal(tokenize_templates(clip.clip_tokenizer, strings, templates), ref)
    # forked workers give the same rows in the same order
    assert torch.equal(tokenize_templates(clip.clip_tokenizer, strings, templates, workers=2), ref)
    # templates with punctuation right after '{}', and no splicing at all (glued text)
    for other in (["{}!", "a {}, b", "the {}'s photo", "{}"], ["x{}", "{}y"]):
        ref = clip.clip_tokenizer([t.format(s) for s in strings for t in other])
        assert torch.equal(tokenize_templates(clip.clip_tokenizer, strings, other), ref)


def test_splicing_takes_the_plain_strings_only():
    from models.clip import _glues, _spliceable
    assert _spliceable(" cat") and _spliceable("New York 42") and _spliceable("x!")
    assert not _spliceable("caf\u00e9") and not _spliceable("&amp;") and not _spliceable("a<b")
    assert not _spliceable("tab\there")
    assert _glues("x!") and _glues("'s'") and not _glues("cat ") and not _glues("") and not _glues("42")


def test_duplicates_are_encoded_once(clip, monkeypatch):
    import models.clip as mc
    seen = []
    real = mc.tokenize_templates

    def spy(tok, strings, templates, workers=1):
        seen.append(list(strings))
        return real(tok, strings, templates, workers)

    monkeypatch.setattr(mc, "tokenize_templates", spy)
    strings = ["cat", "dog", "cat", "x!", "dog"]
    emb = mc.encode_text_templates(clip, strings, batch_size=2)
    assert seen == [["cat", "dog", "x!"]]
    assert torch.equal(emb[0], emb[2]) and torch.equal(emb[1], emb[4])
    alone = mc.encode_text_templates(clip, ["cat", "dog", "x!"], batch_size=2)
    assert torch.equal(emb[[0, 1, 3]], alone)


def test_truncated_forward_equals_padded(clip):
    tokens = clip.clip_tokenizer(["a photo of a cat.", "x", "a much longer prompt " * 5, "long " * 90])
    with torch.no_grad():
        padded = clip.model.encode_text(tokens)
        short = encode_text_truncated(clip.model, tokens)
    assert short.shape == padded.shape == (4, clip.embed_dim)
    assert (short - padded).abs().max() < 1e-5
    # the cut is real: the longest prompt here is far below 77 positions
    assert int(tokens[:3].argmax(-1).max()) < 40


def test_encode_text_templates_matches_naive(clip):
    templates = imagenet_templates()
    strings = ["cat", "x!", "", "long " * 30]  # splice path, per-prompt path, empty, truncated
    emb = encode_text_templates(clip, strings, batch_size=3)
    with torch.no_grad():
        ref = torch.stack([
            F.normalize(clip.model.encode_text(clip.clip_tokenizer([t.format(s) for t in templates])),
                        dim=-1).mean(0) for s in strings])
    assert emb.shape == (len(strings), clip.embed_dim) and emb.dtype == torch.float32
    assert (emb - ref).abs().max() < 1e-5
    # the mean of unit vectors is not renormalised (as the authors)
    assert (emb.norm(dim=-1) < 1 - 1e-4).all()


def test_openai_torchscript_archive(tmp_path):
    name = register_tiny_arch(tmp_path)
    archive = tmp_path / "tiny-openai.pt"
    eager = make_tiny_openai_archive(archive)
    with pytest.raises(V2LError, match="clip_allow_unsafe"):
        load_clip(name, str(archive))
    bundle = load_clip(name, str(archive), allow_unsafe=True)
    assert type(bundle.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    tokens = bundle.clip_tokenizer(["a photo of a dog."])
    image = torch.randn(2, 3, bundle.image_size, bundle.image_size)
    with torch.no_grad():
        assert torch.equal(bundle.model.encode_text(tokens), eager.encode_text(tokens))
        assert torch.equal(bundle.model.encode_image(image), eager.encode_image(image))


def test_state_dict_file_and_bad_specs(tmp_path, clip):
    from safetensors.torch import save_file
    name = register_tiny_arch(tmp_path)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(weights))
    bundle = load_clip(name, str(weights))
    tokens = clip.clip_tokenizer(["a dog"])
    with torch.no_grad():
        assert torch.equal(bundle.model.encode_text(tokens), clip.model.encode_text(tokens))
    with pytest.raises(V2LError, match="not an open_clip model directory"):
        load_clip(str(tmp_path))
    with pytest.raises(V2LError, match="known architecture"):
        load_clip("no-such-clip")
    with pytest.raises(V2LError, match="not found"):
        load_clip(name, str(tmp_path / "missing.pt"))


def _activation(bundle) -> str:
    return type(bundle.model.transformer.resblocks[0].mlp.gelu).__name__


def test_openai_state_dict_gets_quick_gelu(tmp_path, capsys):
    """OpenAI's weights as an open_clip state dict (a .bin beside an open_clip_config.json
    saying quick_gelu, as in open_clip's Hugging Face release) load into the GELU-configured
    architecture with QuickGELU and compute what the QuickGELU model computes; the same file
    with nothing to identify it loads with GELU, and the warning names the -quickgelu fix."""
    import json

    import open_clip
    name = register_tiny_arch(tmp_path / "configs")
    register_tiny_arch(tmp_path / "configs", quick_gelu=True)
    torch.manual_seed(1)
    eager = open_clip.CLIP(**TINY_CLIP_CFG, quick_gelu=True).eval().requires_grad_(False)
    release = tmp_path / "release"
    release.mkdir()
    torch.save(eager.state_dict(), release / "open_clip_pytorch_model.bin")
    (release / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {**TINY_CLIP_CFG, "quick_gelu": True}}))
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(eager.state_dict(), bare / "weights.bin")
    tokens = open_clip.get_tokenizer(name)(["a photo of a dog.", "x"])
    with torch.no_grad():
        want = eager.encode_text(tokens)

        found = load_clip(name, str(release / "open_clip_pytorch_model.bin"))
        assert _activation(found) == "QuickGELU" and "quick_gelu" in capsys.readouterr().err
        assert torch.equal(found.model.encode_text(tokens), want)

        unknown = load_clip(name, str(bare / "weights.bin"))
        assert _activation(unknown) == "GELU"
        assert f"--clip {name}-quickgelu" in capsys.readouterr().err
        assert (unknown.model.encode_text(tokens) - want).abs().max() > 1e-3  # GELU is wrong here
        fixed = load_clip(f"{name}-quickgelu", str(bare / "weights.bin"))
        assert torch.equal(fixed.model.encode_text(tokens), want)
    assert found.ident != unknown.ident  # an artifact made with the wrong activation is refused


def test_openai_release_recognised_by_path():
    """open_clip's own QuickGELU release of ViT-L-14 (its Hugging Face repo, also as the hub
    cache lays it out) is recognised; LAION's GELU release is not."""
    hub = "/cache/huggingface/hub/models--{}/snapshots/0123/open_clip_pytorch_model.bin"
    assert openai_weights_hint("ViT-L-14", hub.format("timm--vit_large_patch14_clip_224.openai"))
    assert openai_weights_hint("ViT-L-14", "/w/vit_large_patch14_clip_224.openai/model.bin")
    assert openai_weights_hint("ViT-L-14", hub.format("laion--CLIP-ViT-L-14-laion2B-s32B-b82K")) is None
    assert openai_weights_hint("ViT-L-14", "/w/ViT-L-14/open_clip_pytorch_model.bin") is None
