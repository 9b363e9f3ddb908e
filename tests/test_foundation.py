"""The shared plumbing: the stage registry, atomic artifacts (and their file modes), manifests,
the run summary, robust images. Flags from constants: tests/test_cli.py."""
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.images import ImageFolderDataset, collate_skip_bad, load_rgb, scan_split
from data.transforms import ImageViews, clip_crop
from fixtures_artifacts import make_eval_artifacts
from utils import pipeline, stages
from utils.artifacts import (ChunkStore, atomic_dir, atomic_path, is_complete, read_checkpoint,
                             read_manifest, require_input, run_key, save_json, save_tensors,
                             save_torch, stale_reason, write_checkpoint, write_manifest)
from utils.cli import parse_settings
from utils.summary import parse_seconds, summary
from utils.errors import V2LError

REPO = Path(__file__).resolve().parent.parent

def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_manifest_chain(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_tensors(a / "x.safetensors", {"x": torch.arange(4)})
    ma = write_manifest(a, "vocab", {"k": 1}, ["x.safetensors"])
    save_json(b / "y.json", [1, 2])
    mb = write_manifest(b, "codebook", {}, ["y.json"], inputs={"vocab": a})
    assert read_manifest(b, "codebook")["inputs"]["vocab"]["id"] == ma["id"]
    require_input(mb, "vocab", ma, "codebook")
    with pytest.raises(V2LError, match="different vocab"):
        require_input(mb, "vocab", {"id": "0" * 64}, "codebook")
    with pytest.raises(V2LError, match="expected 'global'"):
        read_manifest(b, "global")
    with pytest.raises(V2LError, match="run step1.py first"):
        read_manifest(tmp_path / "missing", "vocab", made_by="step1.py")
    # same content -> same id, whatever else differs
    c = tmp_path / "c"
    save_json(c / "y.json", [1, 2])
    assert write_manifest(c, "codebook", {"other": 2}, ["y.json"], inputs={"vocab": a})["id"] == mb["id"]
    # a truncated data file is noticed
    (a / "x.safetensors").write_bytes(b"12")
    assert not is_complete(a, "vocab")


def test_registry_names_each_stage_once_and_its_producer(tmp_path):
    ids = [s.id for s in stages.ALL]
    assert len(set(ids)) == len(ids) and stages.PIPELINE[0] is stages.VOCAB
    scripts = [s.script for s in stages.PIPELINE]
    repo = Path(stages.__file__).resolve().parent.parent
    assert len(set(scripts)) == len(scripts) and all((repo / p).is_file() for p in scripts)
    a = tmp_path / stages.VOCAB.out_dir
    save_json(a / "y.json", [1])
    assert write_manifest(a, stages.VOCAB, {}, ["y.json"])["stage"] == "vocab"
    assert is_complete(a, stages.VOCAB) and not is_complete(a, stages.CODEBOOK)
    # the error names the script that makes the missing stage, from the registry
    with pytest.raises(V2LError, match="run step2_codebook_embedding.py first"):
        read_manifest(tmp_path / "nothing", stages.CODEBOOK)
    with pytest.raises(V2LError, match="expected 'codebook'; run step2_codebook_embedding.py"):
        read_manifest(a, stages.CODEBOOK)
    assert pipeline.main(["check", "no_such_stage"]) == 2
    shell = pipeline.shell()
    assert "STAGE_IDS=(vocab codebook global tokenizer eval_reconstruction" in shell
    assert "[global]=step3_codebook_filtering.py" in shell


def _stage(directory, stage, config, inputs=None):
    save_json(Path(directory) / "data.json", [str(config)])
    return write_manifest(directory, stage, config, ["data.json"], inputs=inputs)


def test_a_stage_is_current_only_for_its_settings_and_current_inputs(tmp_path):
    """The make/DVC rule: same settings (less the run-only ones) and the same upstream
    artifacts, by id, all the way up; anything else reruns."""
    vocab, codebook, tok = tmp_path / "vocab", tmp_path / "codebook", tmp_path / "tokenizer"
    _stage(vocab, stages.VOCAB, {"prompt": "a"})
    code_cfg = {"vocab_dir": str(vocab), "batch_size": 4, "num_workers": 2, "out_dir": str(codebook)}
    _stage(codebook, stages.CODEBOOK, code_cfg, inputs={"vocab": vocab})
    _stage(tok, stages.TOKENIZER, {"codebook_dir": str(codebook), "lr": 1e-3},
           inputs={"codebook": codebook})
    assert stale_reason(codebook, stages.CODEBOOK, code_cfg) is None
    # run-only settings never rerun a stage; a result setting does, and is named
    assert stale_reason(codebook, stages.CODEBOOK, code_cfg | {"num_workers": 8, "device": "cpu"}) is None
    assert "--batch_size 4 there, 8 now" in stale_reason(codebook, stages.CODEBOOK,
                                                          code_cfg | {"batch_size": 8})
    assert "directory not found" in stale_reason(tmp_path / "none", stages.CODEBOOK, code_cfg)
    # the same inputs under another path are the same artifact; another artifact is not
    moved = tmp_path / "vocab_copy"
    shutil.copytree(vocab, moved)
    assert stale_reason(codebook, stages.CODEBOOK, code_cfg | {"vocab_dir": str(moved)}) is None
    _stage(moved, stages.VOCAB, {"prompt": "b"})
    assert "holds another artifact" in stale_reason(codebook, stages.CODEBOOK,
                                                    code_cfg | {"vocab_dir": str(moved)})
    # rebuilding an upstream artifact makes everything downstream stale, two levels down too
    _stage(vocab, stages.VOCAB, {"prompt": "c"})
    assert "holds another artifact" in stale_reason(codebook, stages.CODEBOOK, code_cfg)
    why = stale_reason(tok, stages.TOKENIZER, {"codebook_dir": str(codebook), "lr": 1e-3})
    assert "input 'codebook' is out of date: its input 'vocab'" in why and "was rebuilt" in why


def test_run_key_names_inputs_by_id_not_path(tmp_path):
    tok = tmp_path / "tokenizer"
    _stage(tok, stages.TOKENIZER, {"lr": 1})
    copy = tmp_path / "elsewhere"
    shutil.copytree(tok, copy)
    settings = {"tokenizer_dir": str(tok), "k": 5, "num_workers": 0}
    key = run_key(settings, tokenizer=tok)
    assert key == run_key(settings | {"tokenizer_dir": str(copy), "num_workers": 3}, tokenizer=copy)
    assert key["settings"] == {"k": 5}
    _stage(tok, stages.TOKENIZER, {"lr": 2})   # retrained into the same directory
    assert run_key(settings, tokenizer=tok) != key
    # a bare file (no manifest beside it) is named by its content
    (tmp_path / "w.pt").write_bytes(b"1")
    assert run_key({}, w=tmp_path / "w.pt")["inputs"]["w"].startswith("sha256:")


def test_pipeline_check_parses_the_script_without_running_it(tmp_path, capsys):
    """run.sh's question, answered from the script's own settings block and the manifests."""
    vocab = tmp_path / "vocab"
    args = ["--llm", "some/llm", "--out_dir", str(vocab), "--batch_size", "16"]
    assert pipeline.main(["check", "vocab", *args]) == 1
    assert "directory not found" in capsys.readouterr().out
    settings = {n.lower(): v for n, v in parse_settings(REPO / "step1_expand_vocabulary.py", args).items()}
    _stage(vocab, stages.VOCAB, settings)
    assert pipeline.main(["check", "vocab", *args]) == 0
    with pytest.raises(SystemExit):                  # step 1 has no such flag: argparse's error
        pipeline.main(["check", "vocab", *args, "--no_such_flag", "3"])
    capsys.readouterr()
    assert pipeline.main(["check", "vocab", *args[:-1], "32"]) == 1
    assert "--batch_size 16 there, 32 now" in capsys.readouterr().out


def test_a_training_checkpoint_of_other_settings_is_refused_with_one_line(tmp_path):
    key = {"settings": {"lr": 1e-3, "epochs": 4}, "inputs": {"codebook": "abc"}}
    write_checkpoint(tmp_path / "last.pt", key, {"step": 3})
    assert read_checkpoint(tmp_path / "last.pt", key) == {"step": 3}
    assert read_checkpoint(tmp_path / "none.pt", key) is None
    with pytest.raises(V2LError, match=r"other settings \(--lr 0.001 there, 0.002 now\); rerun "
                                       r"with those to resume it, or delete"):
        read_checkpoint(tmp_path / "last.pt", key | {"settings": {"lr": 2e-3, "epochs": 4}})
    with pytest.raises(V2LError, match=r"other input artifacts \(codebook\)"):
        read_checkpoint(tmp_path / "last.pt", key | {"inputs": {"codebook": "def"}})


def test_row_chunks_resume_a_longer_list(tmp_path):
    store = ChunkStore(tmp_path, total=5, chunk_size=2, key={"a": 1}, rows=True)
    for i in store.todo():
        lo, hi = store.bounds(i)
        store.save(i, [{"index": j} for j in range(lo, hi)])
    assert [r["index"] for r in store.gather()] == [0, 1, 2, 3, 4]
    longer = ChunkStore(tmp_path, total=7, chunk_size=2, key={"a": 1}, rows=True)
    assert longer.todo() == [2, 3]          # the full chunks are kept, the short last one is not
    assert ChunkStore(tmp_path, total=5, chunk_size=2, key={"a": 2}, rows=True).todo() == [0, 1, 2]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_artifacts_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
        save_json(tmp_path / "b.json", [1])
        save_torch(tmp_path / "c.pt", {"x": 1})
        with atomic_dir(tmp_path / "d") as d:
            save_json(d / "e.json", [1])
        store = ChunkStore(tmp_path / "f", total=2, chunk_size=1, key={})
        store.save(0, {"x": torch.zeros(1)})
    finally:
        os.umask(old)
    for p in ["a.safetensors", "b.json", "c.pt", "d/e.json", store._path(0).relative_to(tmp_path)]:
        assert stat.S_IMODE((tmp_path / p).stat().st_mode) == 0o666 & ~umask, p
    for p in ["d", "f", f"f/{store.dir.name}"]:
        assert stat.S_IMODE((tmp_path / p).stat().st_mode) == 0o777 & ~umask, p


def test_summary_json_holds_every_number(tmp_path, capsys):
    made = make_eval_artifacts(tmp_path)
    seconds = parse_seconds(["demo_setup=3.5", "vocab=12.250", "codebook=skipped"])
    text = summary(tmp_path, seconds)
    data = json.loads((tmp_path / "summary.json").read_text())   # strict JSON: no NaN
    assert data["stage_seconds"] == {"demo_setup": 3.5, "vocab": 12.25, "codebook": None}
    rec = data["reconstruction"]
    for k in ["n_images", "psnr", "ssim", "fid", "is", "codebook_used", "codebook_perplexity"]:
        assert rec[k] == made["reconstruction"][k], k
    assert rec["lpips"] is None and rec["skipped"] == {"lpips": "no VGG weights"}
    rows = data["understanding"]
    assert len(rows) == len(made["understanding"])
    for row, want in zip(rows, made["understanding"]):
        for k in ["n_way", "k_shot", "global_k", "accuracy", "ci95", "chance", "ceiling", "floor"]:
            assert row[k] == want[k], k
    pairs = [(r["task"], r["variant"]) for r in data["denoising"]]
    assert pairs == [(t, v) for t in made["denoising"] for v in made["denoising"][t]]
    for r in data["denoising"]:
        want = made["denoising"][r["task"]][r["variant"]]
        assert {k: r[k] for k in ["psnr", "ssim", "token_acc"]} == {
            k: want[k] for k in ["psnr", "ssim", "token_acc"]}
    caption_rows = {r["variant"]: r for r in data["captioning"]}
    for v, want in made["captioning"]["variants"].items():
        assert (caption_rows[v]["cider_d"], caption_rows[v]["cider_d_ci95"], caption_rows[v]["bleu4"]) \
            == (want["CIDEr-D"], want["CIDEr-D_ci95"], want["BLEU-4"])
    vqa = {(r["variant"], r["answer_type"]): r for r in data["vqa"]}
    assert len(vqa) == 6 and vqa[("floor", "shape")]["accuracy"] == 0.1
    assert vqa[("image", "colour")]["ci95"] == made["vqa"]["variants"]["image"]["colour"]["ci95"]
    comp = {(r["condition"], r["k"]): r for r in data["compression"]}
    assert list(comp) == [("upper", None), ("none", None), ("lower", 2), ("voco", 2)]
    assert comp[("voco", 2)]["retention"] == 0.75 and comp[("voco", 2)]["accuracy"] == 0.8
    assert comp[("voco", 2)]["retention_ci95"] == [0.55, 0.85]
    assert comp[("lower", 2)]["retention_ci95"] is None
    assert comp[("voco", 2)]["kv_reduction"] == pytest.approx(1 - 2 / 40)
    assert comp[("upper", None)]["kv_reduction"] is None
    assert "retention = (voco - lower) / (upper - lower)" in text
    # the table shows the reference points beside the accuracy
    lines = text[text.index("few-shot understanding"):].splitlines()
    assert re.search(r"\bacc +95% CI +chance +floor +ceiling$", lines[1]), lines[1]
    assert lines[2].split()[-5:] == ["62.5", "50.0-75.0", "50.0", "50.0", "95.0"]
    assert "not run" not in text


def test_summary_of_an_old_or_partial_run(tmp_path):
    make_eval_artifacts(tmp_path, ceiling=False)
    (tmp_path / "eval_denoising" / "manifest.json").unlink()   # unfinished
    (tmp_path / "eval_compression" / "manifest.json").unlink()
    text = summary(tmp_path)
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["stage_seconds"] == {} and data["denoising"] is None
    assert all(r["ceiling"] is None and r["floor"] is None for r in data["understanding"])
    assert "denoising: not run" in text and "VoCo compression: not run" in text
    assert data["compression"] is None
    with pytest.raises(V2LError, match="STAGE_ID=SECONDS"):
        parse_seconds(["vocab=fast"])


def test_chunkstore_resume_and_sharding(tmp_path):
    key = {"model": "m"}
    store = ChunkStore(tmp_path, total=10, chunk_size=3, key=key)
    assert store.n_chunks == 4 and store.bounds(3) == (9, 10)
    assert store.todo(0, 2) == [0, 2] and store.todo(1, 2) == [1, 3]
    for i in store.todo(0, 2):
        lo, hi = store.bounds(i)
        store.save(i, {"v": torch.arange(lo, hi)})
    with pytest.raises(V2LError, match="2 of 4 chunks missing"):
        store.gather()
    again = ChunkStore(tmp_path, total=10, chunk_size=3, key=key)
    assert again.todo() == [1, 3]
    for i in again.todo():
        lo, hi = again.bounds(i)
        again.save(i, {"v": torch.arange(lo, hi)})
    assert torch.equal(again.gather()["v"], torch.arange(10))
    assert ChunkStore(tmp_path, 10, 3, {"model": "other"}).todo() == [0, 1, 2, 3]


def _write_odd_images(root: Path):
    rng = np.random.default_rng(0)
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "cat/rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(root / "cat/gray.png")
    Image.new("CMYK", (30, 30), (10, 200, 30, 0)).save(root / "dog/cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).save(root / "dog/tiny.png")
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    rgba.save(root / "dog/alpha.png")
    (root / "dog/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "dog/notes.txt").write_text("ignored")


def test_odd_images_become_rgb_and_corrupt_ones_are_skipped(tmp_path, capsys):
    _write_odd_images(tmp_path / "train")
    paths, labels, classes = scan_split(tmp_path, "train")
    assert classes == ["cat", "dog"] and len(paths) == 6 and labels.count(1) == 4
    assert load_rgb(tmp_path / "train/dog/cmyk.jpg").mode == "RGB"
    assert load_rgb(tmp_path / "train/dog/alpha.png").getpixel((0, 0)) == (255, 255, 255)
    ds = ImageFolderDataset(tmp_path, "train", transform=clip_crop(16))
    batch = collate_skip_bad([ds[i] for i in range(len(ds))])
    assert batch["n_skipped"] == 1 and batch["image"].shape == (5, 3, 16, 16)
    assert "corrupt.jpg" in capsys.readouterr().err


def test_empty_folder_is_one_clear_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(V2LError, match="no images found"):
        scan_split(tmp_path, "train")
    with pytest.raises(V2LError, match="not found"):
        scan_split(tmp_path, "val")


def test_flat_val_with_labels_file(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "labels.txt").write_text(
        "ILSVRC2012_val_00000000.JPEG n02\nILSVRC2012_val_00000001.JPEG n01\n")
    paths, labels, classes = scan_split(tmp_path, "val", labels_file=tmp_path / "labels.txt")
    assert classes == ["n01", "n02"] and labels == [1, 0, -1]


def test_tokenizer_views_follow_the_clip_crop():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    small, clip = ImageViews(224, (0.5,) * 3, (0.25,) * 3)(image)
    assert small.shape == (3, 128, 128) and clip.shape == (3, 224, 224)
    assert -1 <= small.min() and small.max() <= 1
    crop = clip * 0.25 + 0.5
    ref = torch.nn.functional.interpolate(crop[None], size=128, mode="bilinear", align_corners=False)[0]
    assert torch.allclose(small, ref.clamp(0, 1) * 2 - 1, atol=1e-5)


def test_summary_never_reports_results_of_a_rebuilt_input(tmp_path, capsys):
    """Results made from a tokenizer that has since been retrained are not this run's numbers."""
    make_eval_artifacts(tmp_path)
    tok, rec = tmp_path / "tokenizer", tmp_path / stages.EVAL_RECONSTRUCTION.out_dir
    _stage(tok, stages.TOKENIZER, {"lr": 1})
    write_manifest(rec, stages.EVAL_RECONSTRUCTION, {}, ["results.json"], inputs={"tokenizer": tok})
    summary(tmp_path, {})
    assert json.loads((tmp_path / "summary.json").read_text())["reconstruction"] is not None
    _stage(tok, stages.TOKENIZER, {"lr": 2})
    capsys.readouterr()
    summary(tmp_path, {})
    assert json.loads((tmp_path / "summary.json").read_text())["reconstruction"] is None
    assert "not shown: its input 'tokenizer'" in capsys.readouterr().err
