"""Restoration with the frozen LLM: masks, corruptions, noisy examples, prompts, the script."""
import csv
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF
from PIL import Image

from engine.denoise import (NOISE_RATES, TASKS, VARIANTS, DenoisePrompter, DenoiseViews,
                            blur_sigma, check_tasks, chunk_starts, codebook_vocab_mask,
                            check_blur_kernels, corrupt_batch, corrupt_image, encode_task, noise_count,
                            noisy_copies, prediction_mask, query_tokens, restore, token_hits, variant_images)
from engine.greedy import BatchedGreedy
from models.llm import encode_segment, llm_dtype
from models.tokenizer_io import save_tokenizer
from test_fewshot import image_folders, run_script
from tiny_llm import make_tiny_llama
from utils.errors import V2LError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny Llama with a 2048-token context (RoPE has no position table to grow)."""
    path = Path(make_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny", fmt="hf"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    return str(path)


@pytest.fixture(scope="module")
def llm(llm_dir):
    from models.llm import load_llm
    return load_llm(llm_dir, device="cpu")


def test_prediction_masks_cover_the_right_cells():
    inp = prediction_mask("inpainting")
    assert inp.sum() == 64 and inp[4:12, 4:12].all()
    assert not inp[:4].any() and not inp[12:].any() and not inp[:, :4].any() and not inp[:, 12:].any()
    out = prediction_mask("outpainting")
    assert out.sum() == 128 and out[8:].all() and not out[:8].any()
    for task in ("deblurring", "rotation", "shift"):
        assert prediction_mask(task).all()
    assert chunk_starts(inp, 2)[:5] == [68, 70, 72, 74, 84] and len(chunk_starts(inp, 2)) == 32
    assert chunk_starts(out, 2) == list(range(128, 256, 2))


def test_unknown_task_is_refused():
    with pytest.raises(V2LError, match="unknown denoising task.*inpainting, outpainting"):
        check_tasks(["inpainting", "denoise"])


def test_corruptions():
    x = torch.rand(3, 128, 128) * 2 - 1
    rot = corrupt_image("rotation", x, x, random.Random(0))
    assert torch.equal(rot[:, 0, :], x[:, :, -1])             # 90 degrees counter-clockwise
    blurred = corrupt_image("deblurring", x, x, random.Random(0))
    assert blurred.shape == x.shape and blurred.std() < x.std()
    assert blur_sigma(5) == pytest.approx(1.1) and blur_sigma(11) == pytest.approx(2.0)
    inp = corrupt_image("inpainting", x, x, random.Random(0))
    assert (inp[:, 32:96, 32:96] == 0).all() and torch.equal(inp[:, :32], x[:, :32])
    outp = corrupt_image("outpainting", x, x, random.Random(0))
    assert (outp[:, 64:] == 0).all() and torch.equal(outp[:, :64], x[:, :64])


def test_blur_kernels_set_the_blur_and_bad_sizes_are_refused():
    x = torch.rand(3, 64, 64) * 2 - 1
    one = lambda k: corrupt_image("deblurring", x, x, random.Random(0), blur_kernels=(k,))  # noqa: E731
    assert torch.equal(one(7), TF.gaussian_blur(x, [7, 7], [blur_sigma(7)] * 2))
    assert (one(21) - x).abs().mean() > (one(5) - x).abs().mean()      # a wider kernel blurs more
    xs = x[None].repeat(8, 1, 1, 1)
    batch = corrupt_batch("deblurring", xs, xs, list(range(8)), 3, blur_kernels=(21, 25))
    drawn = [[k for k in (21, 25) if torch.equal(b, one(k))] for b in batch]
    assert all(len(d) == 1 for d in drawn) and {d[0] for d in drawn} == {21, 25}
    for bad in ((), (4,), (1,), (5, 8)):
        with pytest.raises(V2LError, match="odd size of at least 3"):
            check_blur_kernels(bad)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from tiny_clip import make_tiny_clip
    from models.clip import load_clip
    return load_clip(make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip"))


def test_shift_view_is_the_bottom_right_crop(clip):
    views = DenoiseViews(clip, protocol="consistent")
    wide = Image.fromarray((torch.rand(64, 96, 3) * 255).byte().numpy())
    x, x_clip, shifted = views(wide)
    assert x.shape == shifted.shape == (3, 128, 128) and x_clip.shape[-1] == clip.image_size
    assert torch.allclose(x, clip.image_views(128)(wide)[0])       # the tokenizer's view
    assert not torch.allclose(x, shifted)
    square = Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy())
    x, _, shifted = views(square)
    assert torch.allclose(x, shifted, atol=1e-6)


def test_authors_views_resize_the_picture_straight_to_128(clip):
    """Shorter side to 128 (bilinear, no anti-aliasing), centre / bottom-right 128 crop."""
    from torchvision.transforms import functional as TF
    views = DenoiseViews(clip, protocol="authors")
    pixels = (torch.rand(300, 450, 3) * 255).byte().numpy()           # 300 x 450: -> 128 x 192
    picture = Image.fromarray(pixels)
    x, x_clip, shifted = views(picture)
    big = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255
    by_hand = F.interpolate(big, size=(128, 192), mode="bilinear", align_corners=False)[0] * 2 - 1
    assert torch.allclose(x, by_hand[:, :, 32:160], atol=1e-5)
    assert torch.allclose(shifted, by_hand[:, :, -128:], atol=1e-5)
    assert torch.allclose(x_clip, clip.image_view()(picture))         # CLIP's own view
    smooth = TF.resize(TF.to_tensor(picture), 128, antialias=True)[:, :, 32:160] * 2 - 1
    assert (x - smooth).abs().mean() > 0.05                            # noise aliases: no antialias
    assert not torch.allclose(x, DenoiseViews(clip, protocol="consistent")(picture)[0], atol=0.05)


def test_unknown_protocol_and_dtype_are_refused(clip):
    with pytest.raises(V2LError, match="--protocol takes authors or consistent"):
        DenoiseViews(clip, protocol="paper")
    with pytest.raises(V2LError, match="--llm_dtype 'half' unknown"):
        llm_dtype("half", "cpu")


def test_llm_precision_is_fp16_on_gpu_by_default_and_fp32_on_cpu(monkeypatch):
    import ast
    source = (Path(__file__).parents[1] / "eval_denoising.py").read_text()
    constants = {t.id: n.value.value for n in ast.parse(source).body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and isinstance(n.value, ast.Constant)}
    assert constants["LLM_DTYPE"] == "fp16" and constants["PROTOCOL"] == "authors"
    assert llm_dtype("fp16", "cuda") == "fp16" and llm_dtype("bf16", "cuda:1") == "bf16"
    import models.llm
    for native in (False, True):   # bf16 on a CPU only where it runs natively; fp16 never
        monkeypatch.setattr(models.llm, "native_bf16", lambda device, native=native: native)
        assert llm_dtype("fp16", "cpu") == llm_dtype("fp32", "cpu") == "fp32"
        assert llm_dtype("bf16", torch.device("cpu")) == ("bf16" if native else "fp32")


def test_noisy_copies_share_positions_and_ids():
    clean, query = torch.arange(256), torch.arange(256) + 1000
    ids = torch.tensor([5000, 5001, 5002])
    nc, nq = noisy_copies(clean, query, ids, torch.Generator().manual_seed(0))
    assert nc.shape == nq.shape == (10, 256)
    for r, rate in enumerate(NOISE_RATES):
        changed = nc[r] != clean
        assert changed.sum() == int(rate * 256)
        assert torch.equal(changed, nq[r] != query)
        assert torch.equal(nc[r][changed], nq[r][changed]) and torch.isin(nc[r][changed], ids).all()


@pytest.mark.parametrize("protocol, k, counts", [
    ("authors", 21, [int(r * 277) for r in NOISE_RATES]),       # 138 at rate 0.5
    ("authors", 0, [int(r * 256) for r in NOISE_RATES]),
    ("consistent", 21, [int(r * 256) for r in NOISE_RATES])])
def test_noise_count_follows_the_protocol(protocol, k, counts):
    clean, query = torch.arange(256), torch.arange(256) + 1000
    ids = torch.arange(5000, 5100)
    assert noise_count(0.5, 256, 21, "authors") == 138 and noise_count(0.5, 256, 21, "consistent") == 128
    assert noise_count(0.9, 256, 400, "authors") == 256                 # never more than N
    nc, nq = noisy_copies(clean, query, ids, torch.Generator().manual_seed(1), n_global=k,
                          protocol=protocol)
    assert (nc != clean).sum(1).tolist() == counts                      # local positions only
    assert torch.isin(nq[nq != query], ids).all()                       # codebook ids


def test_prompt_layout(llm):
    text_tokenizer = llm.text_tokenizer
    p = DenoisePrompter(text_tokenizer, step=2)
    ids = p.build(torch.tensor([[7, 8], [9, 10]]), torch.tensor([[11, 12], [13, 14]]),
                  torch.tensor([15, 16]))
    enc = lambda s: encode_segment(text_tokenizer, s)  # noqa: E731  (each segment as Meta encodes it)
    head = [text_tokenizer.bos_token_id] + enc("Learning a new language and predict the 2 tokens "
                                               "following the examples.\n")
    i, o = enc("###\nInput: < "), enc(" >\nOutput: ")
    assert ids == head + i + [7, 8] + o + [11, 12] + i + [9, 10] + o + [13, 14] + i + [15, 16] + o
    assert p.text(ids) == text_tokenizer.decode(ids)        # the log shows the ids run


def test_prompt_strings_are_the_denoising_prompts_own(llm, monkeypatch):
    import engine.fewshot
    before = DenoisePrompter(llm.text_tokenizer, step=2)
    monkeypatch.setattr(engine.fewshot, "IN_TEXT", "Q: ")
    monkeypatch.setattr(engine.fewshot, "OUT_TEXT", " A: ")
    after = DenoisePrompter(llm.text_tokenizer, step=2)
    assert (after.head, after.inp, after.out) == (before.head, before.inp, before.out)


@pytest.mark.parametrize("task", ["inpainting", "deblurring"])
def test_restore_keeps_known_cells_and_codebook_ids(llm, task):
    allowed = torch.arange(100, 140)
    vocab_mask = codebook_vocab_mask(allowed, llm.model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    clean = allowed[torch.randint(len(allowed), (1, 256), generator=g)]
    query = clean if task == "inpainting" else allowed[torch.randint(40, (1, 256), generator=g)]
    pairs = [noisy_copies(c, q, allowed, g) for c, q in zip(clean, query)]
    nc, nq = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
    prompter = DenoisePrompter(llm.text_tokenizer, 2)
    log = []
    pred = restore(BatchedGreedy(llm.model, 0), prompter, task, query, nc, nq, vocab_mask,
                   step=2, window=4, batch_size=64, prompt_log=log)
    cells = prediction_mask(task).flatten()
    assert torch.isin(pred, allowed).all()                   # only codebook ids
    assert torch.equal(pred[:, ~cells], query[:, ~cells])    # known cells untouched
    s = 68 if task == "inpainting" else 0                    # the first chunk's prompt, as run
    src = nc if task == "inpainting" else nq
    lo, hi = (s - 4, s) if task == "inpainting" else (s, s + 2)
    assert log == [prompter.build(src[0, :, lo:hi], nc[0, :, s:s + 2], query[0, lo:hi])]
    if task == "deblurring":                                 # the mask is what restricts them
        free = restore(BatchedGreedy(llm.model, 0), prompter, task, query, nc, nq,
                       torch.ones_like(vocab_mask), step=2, window=4, batch_size=64)
        assert not torch.isin(free[:, cells], allowed).all()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from fixtures_tokenizer import make_tiny_tokenizer
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), llm_ids=torch.arange(100, 164))[0]


@pytest.mark.parametrize("task", ["inpainting", "deblurring"])
def test_baseline_is_the_corrupted_image_through_the_same_tokenizer(tokenizer, task, monkeypatch):
    from fixtures_tokenizer import tiny_images
    x, x_clip = tiny_images(tokenizer.clip, batch=2, seed=1)
    shifted = x.flip(-1)
    idx = [3, 7]
    seen = []                                     # every image the tokenizer's encoder reads
    local_tokens = tokenizer.local_tokens
    monkeypatch.setattr(tokenizer, "local_tokens", lambda im: seen.append(im) or local_tokens(im))
    tokens = encode_task(tokenizer, task, x, x_clip, shifted, idx, seed=5)
    corrupted = corrupt_batch(task, x, shifted, idx, 5)
    assert len(seen) == 2 and torch.equal(seen[0], x) and torch.equal(seen[1], corrupted)
    by_hand = local_tokens(corrupted).flatten(1)
    assert torch.equal(tokens["corrupt"], by_hand)
    assert torch.equal(query_tokens(task, tokens["clean"], tokens["corrupt"]),
                       tokens["clean"] if task == "inpainting" else by_hand)
    g = tokenizer.config.grid
    cells = prediction_mask(task, g).flatten()
    wrong = cells.nonzero()[:5, 0]                # 5 predicted cells of image 0 get another id
    tokens["pred"] = tokens["clean"].clone()
    tokens["pred"][0, wrong] = (tokens["clean"][0, wrong] - 100 + 1) % 64 + 100
    images = variant_images(tokenizer, task, x, shifted, idx, 5, tokens)
    assert list(images) == list(VARIANTS)
    decode = lambda ids: tokenizer.decode(ids.view(-1, g, g), tokens["global_idx"])  # noqa: E731
    assert torch.equal(images["corrupted"], corrupted)
    assert torch.allclose(images["baseline"], decode(by_hand), atol=1e-6)
    assert torch.allclose(images["ceiling"], decode(tokens["clean"]), atol=1e-6)
    assert torch.allclose(images["restored"], decode(tokens["pred"]), atol=1e-6)
    assert not torch.allclose(images["baseline"], images["ceiling"])
    hits = token_hits(task, tokens, g)
    assert hits["restored"] == 2 * int(cells.sum()) - 5
    assert hits["baseline"] == int((by_hand == tokens["clean"])[:, cells].sum()) < 2 * int(cells.sum())


def test_eval_denoising_script_all_tasks(tmp_path, llm_dir, monkeypatch, capsys):
    from fixtures_tokenizer import make_tiny_tokenizer
    tokenizer, _, _ = make_tiny_tokenizer(tmp_path / "artifacts", llm_ids=torch.arange(100, 164))
    save_tokenizer(tokenizer, tmp_path / "tokenizer")
    data = image_folders(tmp_path / "data" / "val", {"cat": 1, "dog": 1})
    out = tmp_path / "out"
    args = ["--tokenizer_dir", str(tmp_path / "tokenizer"), "--llm", llm_dir, "--data_dir",
            str(data.parent), "--split", "val", "--metrics", "psnr", "ssim", "--device", "cpu",
            "--num_workers", "0", "--window", "4", "--step", "8", "--out_dir", str(out), "--save_strips", "1"]
    run_script("eval_denoising.py", args, monkeypatch)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["task"], r["variant"]) for r in rows] == [
        (t, v) for t in TASKS for v in ("corrupted", "baseline", "restored", "ceiling")]
    assert all(r["n_images"] == "2" and float(r["psnr"]) > 0 for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert list(results) == list(TASKS)
    for task in TASKS:
        assert list(results[task]) == list(VARIANTS)
        acc = {v: results[task][v]["token_acc"] for v in VARIANTS}
        assert acc["corrupted"] is None and acc["ceiling"] is None
        assert 0 <= acc["baseline"] <= 1 and 0 <= acc["restored"] <= 1
    assert (out / "manifest.json").is_file()
    for task in TASKS:
        strip = Image.open(out / task / "strips" / "00000.png")
        assert strip.size == (5 * 128, 128)
        assert (out / task / "prompt_example.txt").read_text().count("Input: <") == 11
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_script("eval_denoising.py", args + ["--tasks", "painting"], monkeypatch)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown denoising task(s) ['painting']" in err


def test_tokens_of_another_tokenizer_in_the_same_directory_are_never_resumed(
        tmp_path, llm_dir, monkeypatch):
    """A run killed after its first chunk, then a tokenizer retrained into the same directory:
    the rerun restores every image with the new tokenizer (the chunks are keyed by the
    tokenizer's artifact id, not by its path)."""
    import engine.denoise
    from fixtures_tokenizer import make_tiny_tokenizer
    tokenizer, _, _ = make_tiny_tokenizer(tmp_path / "a", llm_ids=torch.arange(100, 164))
    save_tokenizer(tokenizer, tmp_path / "tokenizer")
    data = image_folders(tmp_path / "data" / "val", {"cat": 1, "dog": 1})
    args = ["--tokenizer_dir", str(tmp_path / "tokenizer"), "--llm", llm_dir, "--data_dir",
            str(data.parent), "--split", "val", "--metrics", "psnr", "--device", "cpu",
            "--num_workers", "0", "--window", "4", "--step", "8", "--tasks", "inpainting",
            "--chunk_images", "1", "--save_strips", "0"]
    restore, calls = engine.denoise.restore, []

    def killed_after_one_chunk(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return restore(*a, **k)
    monkeypatch.setattr(engine.denoise, "restore", killed_after_one_chunk)
    with pytest.raises(SystemExit) as exit_:
        run_script("eval_denoising.py", args + ["--out_dir", str(tmp_path / "out")], monkeypatch)
    assert exit_.value.code == 130
    monkeypatch.setattr(engine.denoise, "restore", restore)
    run_script("eval_denoising.py", args + ["--out_dir", str(tmp_path / "first")], monkeypatch)

    retrained, _, _ = make_tiny_tokenizer(tmp_path / "b", llm_ids=torch.arange(100, 164))
    for p in retrained.decoder.parameters():                 # another training run's weights
        p.data.mul_(0.5)
    retrained.tok_embeddings_global.weight.data = retrained.tok_embeddings_global.weight.data.flip(0)
    save_tokenizer(retrained, tmp_path / "tokenizer")
    for out in ("out", "fresh"):
        run_script("eval_denoising.py", args + ["--out_dir", str(tmp_path / out)], monkeypatch)
    first, resumed, fresh = (json.loads((tmp_path / d / "results.json").read_text())
                             for d in ("first", "out", "fresh"))
    assert first != fresh and resumed == fresh


@pytest.mark.parametrize("workers", [0, 2])
def test_chunks_load_as_one_batch_each_from_workers_kept_for_all(tmp_path, workers, monkeypatch,
                                                                  capsys):
    """eval_denoising's chunk batches: each chunk's images shared between the workers (one
    loader for all chunks), merged into exactly the batch that loading the chunk as one batch
    gives, a wholly unreadable chunk included."""
    import numpy as np
    from torch.utils.data import DataLoader, Subset

    import eval_denoising
    from data.images import ImageFolderDataset, collate_skip_bad
    from data.transforms import clip_crop
    from utils.artifacts import ChunkStore
    rng = np.random.default_rng(0)
    for i in range(11):
        folder = tmp_path / "val" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        if i in (8, 10, 1, 3, 5):  # the second chunk (sorted: c0/08, c0/10, c1/01, c1/03) and one more
            (folder / f"{i:02d}.jpg").write_bytes(b"broken")
            continue
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    ds = ImageFolderDataset(tmp_path, "val", transform=lambda im: (clip_crop(8)(im), clip_crop(4)(im)))
    store = ChunkStore(tmp_path / "out", len(ds), 4, {"k": 0})
    monkeypatch.setattr(eval_denoising, "NUM_WORKERS", workers)
    got = list(eval_denoising.chunk_batches(ds, store, range(store.n_chunks), "test"))
    assert [ci for ci, _ in got] == [0, 1, 2]
    for ci, batch in got:
        lo, hi = store.bounds(ci)
        whole = next(iter(DataLoader(Subset(ds, range(lo, hi)), batch_size=hi - lo,
                                     collate_fn=collate_skip_bad)))
        assert batch.keys() == whole.keys() and batch["n_skipped"] == whole["n_skipped"]
        for key in whole:
            if key == "image":
                assert all(torch.equal(a, b) for a, b in zip(batch[key], whole[key]))
            elif key != "n_skipped":
                assert torch.equal(batch[key], whole[key]), key
    assert "image" not in got[1][1] and got[1][1]["n_skipped"] == 4
