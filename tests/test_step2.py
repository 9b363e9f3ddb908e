"""Step 2: the codebook artifact, its exactness, resume, and refusal of missing inputs."""
import pytest
import torch

import models.clip
from data.classes import imagenet_templates
from fixtures_artifacts import make_vocab_artifact, run_script
from models.clip import load_clip
from tiny_clip import make_tiny_clip
from utils.artifacts import load_json, load_tensors, read_manifest

WORDS = ["cat", "dog", "the", "", "New York", "!!", "cat", "x.y", "tree", "car", "sky"]
PRINTABLE = [True] * 9 + [False, True]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("step2")
    clip_dir = make_tiny_clip(root / "clip")
    vocab = make_vocab_artifact(root / "vocab", WORDS, PRINTABLE)
    out = root / "codebook"
    assert run_script("step2_codebook_embedding.py", vocab_dir=vocab, out_dir=out, clip=clip_dir,
                      batch_size=3, chunk_size=7) == 0
    return root, clip_dir, vocab, out


def test_codebook_artifact(setup):
    root, clip_dir, vocab, out = setup
    manifest = read_manifest(out, "codebook")
    assert manifest["inputs"]["vocab"]["id"] == read_manifest(vocab)["id"]
    n, dim = len(WORDS), 32
    assert manifest["info"]["embed_dim"] == dim and manifest["info"]["vocab_size"] == n
    assert manifest["info"]["clip"] == load_clip(clip_dir).ident
    local = load_tensors(out / "local_codebook.safetensors")
    glob = load_tensors(out / "global_candidates.safetensors")["embeddings"]
    assert local["embeddings"].shape == (n, dim) and local["embeddings"].dtype == torch.float32
    assert torch.equal(local["llm_ids"], torch.arange(n))
    assert glob.shape == (3 * n, dim) and torch.equal(glob[:n], local["embeddings"])
    cand = load_json(out / "candidates.json")
    assert cand["kind"] == ["subword"] * n + ["bigram"] * n + ["trigram"] * n
    assert cand["llm_ids"] == list(range(n)) * 3
    assert cand["strings"][:n] == WORDS and cand["strings"][n + 1] == "dog cat"
    # blank text and non-printable tokens can never be global tokens
    assert cand["valid"][3] is False and cand["valid"][9] is False and cand["valid"][n + 9] is False
    assert cand["valid"][n + 3] is True and sum(cand["valid"]) == 3 * n - 4
    # duplicated strings get bit-identical rows
    assert torch.equal(glob[0], glob[6])
    assert not list(out.glob(".chunks-*"))


def test_embeddings_equal_naive_reference(setup):
    root, clip_dir, vocab, out = setup
    clip = load_clip(clip_dir)
    glob = load_tensors(out / "global_candidates.safetensors")["embeddings"]
    strings = load_json(out / "candidates.json")["strings"]
    pick = [0, 3, 5, 7, len(WORDS) + 4, 2 * len(WORDS) + 10]
    with torch.no_grad():
        ref = torch.stack([torch.nn.functional.normalize(clip.model.encode_text(clip.clip_tokenizer(
            [t.format(strings[i]) for t in imagenet_templates()])), dim=-1).mean(0) for i in pick])
    assert (glob[pick] - ref).abs().max() < 1e-5


def test_resume_after_interrupt(setup, monkeypatch):
    root, clip_dir, vocab, out = setup
    real, calls, interrupt = models.clip.encode_text_templates, [], True

    def flaky(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(models.clip, "encode_text_templates", flaky)
    resumed = root / "resumed"
    flags = dict(vocab_dir=vocab, out_dir=resumed, clip=clip_dir, batch_size=3, chunk_size=7)
    assert run_script("step2_codebook_embedding.py", **flags) == 130
    assert not (resumed / "manifest.json").exists()
    calls.clear()
    interrupt = False
    assert run_script("step2_codebook_embedding.py", **flags) == 0
    n_distinct = read_manifest(out)["info"]["distinct_strings"]
    assert sum(calls) == n_distinct - 7  # the first chunk was not recomputed
    for f in ("global_candidates.safetensors", "local_codebook.safetensors", "candidates.json"):
        assert (resumed / f).read_bytes() == (out / f).read_bytes()


def test_missing_vocab_names_step1(setup, tmp_path, capsys):
    root, clip_dir, vocab, out = setup
    code = run_script("step2_codebook_embedding.py", vocab_dir=tmp_path / "nope",
                      out_dir=tmp_path / "cb", clip=clip_dir)
    assert code == 2
    assert "step1_expand_vocabulary.py" in capsys.readouterr().err
    assert not (tmp_path / "cb" / "manifest.json").exists()


def test_tokenize_workers_setting(setup, tmp_path, capsys):
    root, clip_dir, vocab, out = setup
    code = run_script("step2_codebook_embedding.py", vocab_dir=vocab, out_dir=tmp_path / "cb",
                      clip=clip_dir, tokenize_workers="none")
    assert code == 2 and "--tokenize_workers" in capsys.readouterr().err
    assert run_script("step2_codebook_embedding.py", vocab_dir=vocab, out_dir=tmp_path / "cb2",
                      clip=clip_dir, batch_size=3, chunk_size=7, tokenize_workers=2) == 0
    for f in ("global_candidates.safetensors", "candidates.json"):
        assert (tmp_path / "cb2" / f).read_bytes() == (out / f).read_bytes()
