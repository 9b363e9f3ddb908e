"""Step 3: hit counting, threshold, the global artifact, chain refusal, and 2-process parity."""
import os
import subprocess
import sys

import pytest
import torch

from data.images import ImageFolderDataset
from fixtures_artifacts import REPO, make_image_folder, make_vocab_artifact, run_script
from engine.candidates import count_topk_hits, hit_threshold, select_global
from models.clip import load_clip
from tiny_clip import make_tiny_clip
from utils.artifacts import load_json, load_tensors, read_manifest
from utils.errors import V2LError

WORDS = ["cat", "dog", "", "tree", "car", "sky", "red", "blue", "house", "bird"]


def test_bincount_equals_one_hot_reference():
    emb = torch.nn.functional.normalize(torch.randn(37, 16), dim=-1)
    cand = torch.randn(50, 16)
    valid = torch.rand(50) > 0.2
    counts = count_topk_hits(emb, cand, valid, 5, torch.zeros(50, dtype=torch.long))
    scores = (emb @ cand.T).masked_fill(~valid, float("-inf"))
    one_hot = torch.nn.functional.one_hot(scores.topk(5).indices.flatten(), 50).sum(0)
    assert torch.equal(counts, one_hot)
    assert counts[~valid].sum() == 0 and counts.sum() == 37 * 5


def test_threshold_logic():
    assert hit_threshold(1000, 3, "1/2") == 3  # an absolute threshold wins
    assert hit_threshold(1000, None, "0.01") == 10
    assert hit_threshold(999, None, "0.01") == 9   # more than 9.99 hits: 10 or more
    with pytest.raises(V2LError, match="threshold_rate"):
        hit_threshold(1000, None, "1/0")
    hits = torch.tensor([0, 10, 11, 3, 100])
    assert select_global(hits, 10).tolist() == [2, 4]
    assert select_global(hits, 10.0).tolist() == [2, 4]  # strictly more than the threshold


def test_default_rate_on_full_imagenet_keeps_more_than_100():
    """The paper keeps candidates hit more than 100 times in ImageNet's 1,281,167 train
    images: with the script's default rate, 100 hits are dropped and 101 kept."""
    from utils.cli import settings_of
    source = (REPO / "step3_codebook_filtering.py").read_text(encoding="utf-8")
    rate = {s.name: s.default for s in settings_of(source)}["THRESHOLD_RATE"]
    min_hits = hit_threshold(1_281_167, None, rate)
    assert min_hits == 100
    assert select_global(torch.tensor([99, 100, 101, 5000]), min_hits).tolist() == [2, 3]
    # one image fewer and the scaled threshold drops just below 100: 100 hits are kept
    assert hit_threshold(1_281_166, None, rate) == 99


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("step3")
    clip_dir = make_tiny_clip(root / "clip")
    vocab = make_vocab_artifact(root / "vocab", WORDS)
    data = make_image_folder(root / "images")
    codebook = root / "codebook"
    assert run_script("step2_codebook_embedding.py", vocab_dir=vocab, out_dir=codebook,
                      clip=clip_dir) == 0
    return root, clip_dir, vocab, data, codebook


def step3(setup, out, **flags):
    root, clip_dir, vocab, data, codebook = setup
    args = dict(data_dir=data, vocab_dir=vocab, codebook_dir=codebook, out_dir=out, clip=clip_dir,
                batch_size=3, num_workers=0, chunk_size=4)
    return run_script("step3_codebook_filtering.py", **(args | flags))


def test_global_artifact_counts_every_readable_image(setup, capsys):
    root, clip_dir, vocab, data, codebook = setup
    out = root / "global"
    assert step3(setup, out, threshold=1, num_workers=1) == 0
    assert "1 unreadable images skipped" in capsys.readouterr().out
    m = read_manifest(out, "global")
    assert m["info"]["n_images"] == 11 and m["info"]["n_skipped"] == 1
    assert set(m["inputs"]) == {"vocab", "codebook"}
    hits = load_tensors(out / "hit_counts.safetensors")["hits"]
    # brute-force reference: every readable image, one at a time, one-hot top-5
    clip = load_clip(clip_dir)
    cand = load_tensors(codebook / "global_candidates.safetensors")["embeddings"]
    valid = torch.tensor(load_json(codebook / "candidates.json")["valid"])
    ds = ImageFolderDataset(data, "train", transform=clip.image_view())
    ref = torch.zeros(len(valid), dtype=torch.long)
    for i in range(len(ds)):
        item = ds[i]
        if item is None:
            continue
        s = (clip.encode_images(item["image"][None]) @ cand.T)[0]
        s[~valid] = float("-inf")
        ref[s.topk(5).indices] += 1
    assert torch.equal(hits, ref) and hits.sum() == 11 * 5
    g = load_tensors(out / "global_codebook.safetensors")
    keep = torch.nonzero(ref > 1).flatten()
    assert torch.equal(g["candidate_index"], keep) and torch.equal(g["hits"], ref[keep])
    assert torch.equal(g["embeddings"], cand[keep])
    strings = load_json(codebook / "candidates.json")["strings"]
    assert load_json(out / "global_strings.json")["strings"] == [strings[i] for i in keep]
    assert (out / "hit_histogram.png").stat().st_size > 1000


def test_a_killed_run_resumes_with_one_loader_and_the_same_counts(setup, tmp_path, monkeypatch):
    """Killed while counting its second chunk, the rerun counts only the chunks not saved, all
    of them from one DataLoader (workers kept across chunks), and the hits are those of an
    uninterrupted run."""
    import data.images
    import engine.candidates
    made, calls, count_hits = [], {"n": 0}, engine.candidates.count_hits

    class Counted(data.images.DataLoader):
        def __init__(self, *a, **k):
            made.append(len(k["batch_sampler"]))
            super().__init__(*a, **k)

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return count_hits(*a, **k)

    monkeypatch.setattr(data.images, "DataLoader", Counted)
    monkeypatch.setattr(engine.candidates, "count_hits", flaky)
    out = tmp_path / "global"
    assert step3(setup, out, threshold=1, num_workers=2) == 130
    assert not (out / "manifest.json").exists()
    assert step3(setup, out, threshold=1, num_workers=2) == 0
    assert made == [6, 4]   # batches of 3 from chunks of 4 of the 12 files: 3 chunks, then 2
    assert calls["n"] == 1 + 1 + 2
    assert step3(setup, tmp_path / "whole", threshold=1) == 0
    a, b = (load_tensors(d / "hit_counts.safetensors")["hits"] for d in (out, tmp_path / "whole"))
    assert torch.equal(a, b) and a.sum() == 11 * 5


def test_split_none_reads_data_dir_itself(setup, tmp_path):
    """The documented --split none counts DATA_DIR's own class folders (it used to look for
    DATA_DIR/none)."""
    root, _, _, data, _ = setup
    assert step3(setup, tmp_path / "global", data_dir=f"{data}/train", split="none", threshold=1) == 0
    assert read_manifest(tmp_path / "global", "global")["info"]["n_images"] == 11


def test_refuses_broken_chains(setup, tmp_path, capsys):
    root, clip_dir, vocab, data, codebook = setup
    other_vocab = make_vocab_artifact(tmp_path / "vocab2", WORDS[:5])
    assert step3(setup, tmp_path / "g1", vocab_dir=other_vocab) == 2
    assert "different vocab" in capsys.readouterr().err
    other_clip = make_tiny_clip(tmp_path / "clip_b", seed=1)
    assert step3(setup, tmp_path / "g2", clip=other_clip) == 2
    assert "pass the CLIP of step 2" in capsys.readouterr().err
    assert step3(setup, tmp_path / "g3", codebook_dir=tmp_path / "none") == 2
    assert "step2_codebook_embedding.py" in capsys.readouterr().err
    (tmp_path / "empty" / "train" / "c").mkdir(parents=True)
    assert step3(setup, tmp_path / "g4", data_dir=tmp_path / "empty") == 2
    assert "no images found" in capsys.readouterr().err
    assert not any((tmp_path / g / "manifest.json").exists() for g in ("g1", "g2", "g3", "g4"))


def _run(cmd, env):
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_two_processes_write_the_one_process_artifacts(setup, tmp_path):
    root, clip_dir, vocab, data, codebook = setup
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    outs = {}
    for launcher in ("single", "torchrun"):
        pre = ([sys.executable] if launcher == "single" else
               [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(29500 + os.getpid() % 1000)])
        cb, gl = tmp_path / f"cb_{launcher}", tmp_path / f"gl_{launcher}"
        _run(pre + ["step2_codebook_embedding.py", "--vocab_dir", vocab, "--out_dir", str(cb),
                    "--clip", clip_dir, "--chunk_size", "5", "--device", "cpu"], env)
        _run(pre + ["step3_codebook_filtering.py", "--data_dir", data, "--vocab_dir", vocab,
                    "--codebook_dir", str(cb), "--out_dir", str(gl), "--clip", clip_dir,
                    "--chunk_size", "3", "--num_workers", "0", "--threshold", "0",
                    "--device", "cpu"], env)
        outs[launcher] = (cb, gl)
    for name in ("local_codebook.safetensors", "global_candidates.safetensors"):
        a, b = (load_tensors(outs[k][0] / name) for k in outs)
        assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("global_codebook.safetensors", "hit_counts.safetensors"):
        a, b = (load_tensors(outs[k][1] / name) for k in outs)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_manifest(outs["single"][1])["id"] == read_manifest(outs["torchrun"][1])["id"]


def test_candidates_with_control_characters_are_never_global_words():
    from engine.candidates import build_candidates
    vocab = {"ids": [0, 1, 2], "printable": [True, True, False],
             "subword": ["()", " red", "x"], "bigram": ["()\n", " red star", "x y"],
             "trigram": ["()\n\n", " red\tstar", "x y z"]}
    valid = build_candidates(vocab)["valid"]
    # subword, bigram, trigram of each id: line breaks and tabs are refused, as is a
    # non-printable source token; ordinary text stays valid
    assert valid == [True, True, False, False, True, False, False, False, False]
