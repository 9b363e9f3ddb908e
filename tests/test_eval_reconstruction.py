"""eval_reconstruction.py end to end on a tiny tokenizer: numbers, outputs, resume, torchrun, bad input."""
import csv
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.images import ImageFolderDataset, collate_skip_bad
from engine.metrics import ReconstructionMetrics
from models.tokenizer import V2LTokenizer
from models.tokenizer_io import load_tokenizer, save_tokenizer
from fixtures_tokenizer import make_tiny_tokenizer
from utils.artifacts import load_json, load_tensors, write_manifest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "eval_reconstruction.py")
N_IMAGES = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny tokenizer with its manifest chain, and a val folder of small images."""
    tmp = tmp_path_factory.mktemp("evalrec")
    tokenizer, clip, dirs = make_tiny_tokenizer(tmp)
    save_tokenizer(tokenizer, tmp / "tokenizer")
    write_manifest(tmp / "tokenizer", "tokenizer", {}, ["tokenizer.pt"],
                   inputs={"codebook": dirs["codebook"], "global": dirs["global"]})
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        folder = tmp / "data" / "val" / f"n0{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (50 + i, 60, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp / "data" / "val" / "n00" / "broken.png").write_bytes(b"not an image")
    return tmp


def _args(tmp, out, **extra):
    args = {"tokenizer_dir": tmp / "tokenizer", "data_dir": tmp / "data", "out_dir": out,
            "results_csv": tmp / f"{Path(out).name}.csv", "device": "cpu", "batch_size": 3,
            "num_workers": 0, "chunk_size": 2, "grid_images": 2, "protocol": "standard", **extra}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def _run_in_process(monkeypatch, tmp, out, **extra):
    monkeypatch.setattr(sys, "argv", ["eval_reconstruction.py", *_args(tmp, out, **extra)])
    runpy.run_path(SCRIPT, run_name="__main__")


@pytest.fixture(scope="module")
def full_run(setup):
    """A run killed inside its second chunk, then rerun to the end -> (out dir, decode calls).

    No weights on disk: FID, IS and LPIPS are skipped by name."""
    out, calls = setup / "full", {"n": 0}
    decode = V2LTokenizer.decode

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # die inside the second chunk
            raise KeyboardInterrupt
        return decode(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "get_dir", lambda: str(setup / "hub"))
        mp.setattr(V2LTokenizer, "decode", flaky)
        with pytest.raises(SystemExit) as e:
            _run_in_process(mp, setup, out, grid_images=0)
        killed = {"code": e.value.code, "manifest": (out / "manifest.json").exists(),
                  "csv": (setup / "full.csv").exists()}
        calls["n"] = 10  # no more failures; count the batches the rerun decodes
        _run_in_process(mp, setup, out)
    return out, killed, calls["n"] - 10


def test_killed_run_resumes_from_chunks(full_run):
    out, killed, rerun_decodes = full_run
    assert killed == {"code": 130, "manifest": False, "csv": False}  # nothing half-written
    # 3 readable + 1 broken image in chunks of 2 (batches of 3): chunk 0 was kept, so the
    # rerun decodes one chunk, plus the grid
    assert rerun_decodes == 1 + 1
    assert not list(out.glob(".chunks-*"))  # cleaned up after success


def test_results_match_direct_computation(setup, full_run):
    out = full_run[0]
    res = load_json(out / "results.json")
    assert res["protocol"] == "standard"
    assert res["n_images"] == N_IMAGES and res["unreadable_images"] == 1
    assert set(res["skipped"]) == {"fid", "is", "lpips"}
    assert "weights-inception-2015-12-05-6726825d.pth" in res["skipped"]["fid"]

    # the same numbers straight from the public API
    tokenizer = load_tokenizer(setup / "tokenizer")
    data = ImageFolderDataset(setup / "data", "val", tokenizer.clip.image_views(128))
    batch = collate_skip_bad([data[i] for i in range(len(data))])
    x128, x_clip = batch["image"]
    gidx, ids = tokenizer.encode(x128, x_clip)
    acc = ReconstructionMetrics(("psnr", "ssim", "codebook"), n_codes=len(tokenizer.llm_ids))
    acc.update(x128, tokenizer.decode(ids, global_idx=gidx), codes=tokenizer.rows_from_llm_ids(ids))
    ref = acc.compute()
    for k in ("psnr", "ssim", "codebook_used", "codebook_perplexity"):
        assert abs(res[k] - ref[k]) < 1e-4 * max(1, abs(ref[k])), k
    assert 5 < res["psnr"] < 60 and -1 < res["ssim"] < 1

    manifest = load_json(out / "manifest.json")
    assert manifest["stage"] == "eval_reconstruction"
    assert set(manifest["files"]) == {"results.json", "token_counts.safetensors",
                                      "token_usage.png", "reconstructions.png"}
    counts = load_tensors(out / "token_counts.safetensors")["counts"]
    assert counts.sum() == N_IMAGES * 16 * 16
    assert Image.open(out / "reconstructions.png").size[1] > 2 * 128
    # the grid's originals are spread over the set: with 2 shown, the first and the last image
    grid = np.asarray(Image.open(out / "reconstructions.png").convert("RGB")).astype(int)
    shown = [data[i] for i in (0, len(data) - 1)]
    assert all(item is not None for item in shown)
    for col, item in enumerate(shown):
        expected = ((item["image"][0].permute(1, 2, 0) * 0.5 + 0.5) * 255 + 0.5).floor().clamp(0, 255)
        tile = grid[2:130, 2 + 130 * col:130 + 130 * col]
        assert np.abs(tile - expected.numpy()).max() <= 1, col
    rows = list(csv.DictReader(open(setup / "full.csv")))
    assert len(rows) == 1 and int(rows[0]["n_images"]) == N_IMAGES
    assert abs(float(rows[0]["psnr"]) - res["psnr"]) < 1e-9


def test_authors_protocol_at_256_with_png_dumps(setup, monkeypatch, tmp_path):
    """--protocol authors: 256 px centre crops (a 32 x 32 token grid from the 128 px-trained
    tokenizer), the authors' metric code, the protocol named in results and CSV, PNG dumps."""
    import pyiqa.utils.download_util as pyiqa_download
    from engine.metrics import psnr_y
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(pyiqa_download, "DEFAULT_CACHE_DIR", str(tmp_path / "hub" / "pyiqa"))
    out = tmp_path / "authors"
    _run_in_process(monkeypatch, setup, out, protocol="authors", dump_png="true", grid_images=0)
    res = load_json(out / "results.json")
    assert res["protocol"] == "authors" and res["n_images"] == N_IMAGES
    assert set(res["skipped"]) == {"fid", "is", "lpips"}
    assert "inception_v3_google-0cc3c7bd.pth" in res["skipped"]["is"]
    counts = load_tensors(out / "token_counts.safetensors")["counts"]
    assert counts.sum() == N_IMAGES * 32 * 32
    sources = sorted((out / "png" / "source").glob("*.png"))
    recs = sorted((out / "png" / "reconstruction").glob("*.png"))
    assert len(sources) == len(recs) == N_IMAGES
    assert Image.open(sources[0]).size == (256, 256)
    # The PNGs are the 8-bit images, and the authors' PSNR is on the float ones: rounding both
    # moves Y by at most 2 x 0.5 x 219/255 per pixel, so the RMSE by at most that (delta)
    # and the PSNR by at most 20/ln(10) x delta / (rmse - delta) dB.
    read = lambda p: torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)[None]  # noqa: E731
    per_image = torch.cat([psnr_y(read(a), read(b)) for a, b in zip(sources, recs)])
    delta = 219 / 255
    rmse = 255 / 10 ** (per_image / 20)
    bound = (20 / np.log(10) * delta / (rmse - delta)).mean().item()
    rounded = per_image.mean().item()
    assert 0 < abs(rounded - res["psnr"]) <= bound
    rows = list(csv.DictReader(open(setup / "authors.csv")))
    assert rows[-1]["protocol"] == "authors"


def test_one_loader_with_workers_for_all_chunks_gives_the_same_numbers(setup, full_run,
                                                                       monkeypatch, tmp_path):
    """Two workers kept for the two chunks: one DataLoader for the run, and the numbers of the
    run that loaded in the main process, up to rounding: a worker runs one thread, whose
    bilinear resize can round the last float32 bit of a pixel otherwise, and the 8-bit
    metrics may then see a pixel move by 1/255 (the batches themselves are identical to one
    loader per chunk: tests/test_images.py)."""
    import data.images
    made = []

    class Counted(data.images.DataLoader):
        def __init__(self, *a, **k):
            made.append(k.get("num_workers"))
            super().__init__(*a, **k)

    monkeypatch.setattr(data.images, "DataLoader", Counted)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(setup / "hub"))
    out = tmp_path / "workers"
    _run_in_process(monkeypatch, setup, out, num_workers=2, grid_images=0)
    assert made == [2]
    a, b = load_json(out / "results.json"), load_json(full_run[0] / "results.json")
    assert a["n_images"] == b["n_images"] and a["unreadable_images"] == b["unreadable_images"]
    for k in ("psnr", "ssim", "codebook_used", "codebook_perplexity"):
        assert abs(a[k] - b[k]) <= 1e-3 * abs(b[k]), k


def test_gpu_precision_options_leave_a_cpu_run_unchanged(setup, full_run, monkeypatch, tmp_path):
    """--precision fp16 and --tf32 act on CUDA only: on the CPU the very numbers of the fp32
    run (in chunks of their own: the precision is part of the chunk key)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(setup / "hub"))
    out = tmp_path / "fp16"
    _run_in_process(monkeypatch, setup, out, precision="fp16", tf32="true", grid_images=0)
    a, b = load_json(out / "results.json"), load_json(full_run[0] / "results.json")
    for k in ("n_images", "psnr", "ssim", "codebook_used", "codebook_perplexity"):
        assert a[k] == b[k], k
    assert load_json(out / "manifest.json")["config"]["precision"] == "fp16"


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one(setup, full_run, tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "PYTHONPATH": str(REPO)}
    out = tmp_path / "w2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29613", SCRIPT, *_args(setup, out, grid_images=0)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_json(out / "results.json"), load_json(full_run[0] / "results.json")
    assert a["n_images"] == b["n_images"] and a["unreadable_images"] == b["unreadable_images"]
    # other thread counts round float32 convolutions differently: a pixel may move by 1/255
    for k in ("psnr", "ssim", "codebook_used", "codebook_perplexity"):
        assert abs(a[k] - b[k]) <= 1e-3 * abs(b[k]), k


def test_bad_inputs_one_line_errors(setup, tmp_path, monkeypatch, capsys):
    def run(**extra):
        with pytest.raises(SystemExit) as e:
            _run_in_process(monkeypatch, setup, tmp_path / "o", **extra)
        err = capsys.readouterr().err.strip().splitlines()
        return e.value.code, err

    # a tokenizer directory without a finished manifest
    (tmp_path / "half").mkdir()
    code, err = run(tokenizer_dir=tmp_path / "half")
    assert code == 2 and len(err) == 1 and "step4_train_tokenizer.py" in err[0]
    # an artifact of another stage
    code, err = run(tokenizer_dir=setup / "global")
    assert code == 2 and len(err) == 1 and "expected 'tokenizer'" in err[0]
    code, err = run(metrics="bleu")
    assert code == 2 and len(err) == 1 and "bleu" in err[0]
    code, err = run(precision="fp8")
    assert code == 2 and len(err) == 1 and "fp8" in err[0]
    # a results CSV that is not ours is refused before any work
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    code, err = run(results_csv=tmp_path / "other.csv")
    assert code == 2 and len(err) == 1 and "other.csv" in err[0]
    assert not (tmp_path / "o").exists()
