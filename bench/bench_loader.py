"""Step 3's data path: one loader per chunk (the former code) against one loader for all
chunks (data.images.load_chunks, workers kept), on ImageNet-sized JPEGs written on the spot
(gradients, shapes and noise, so decoding costs what a photo costs), at the same worker count
and batch size, the same tensors; plus what one worker pays per image (decode, CLIP's
resize and crop), eval_denoising's chunks (each loaded as one batch by one worker, against
shared between the workers of one loader) and the listing of a tree of empty files, the former stat-per-file listing
against os.scandir (cold, then reused as a --sweep would).

Both ways run in each round, in alternating order, and the best round of each is kept, so a
busy machine slows both alike.

    python bench/bench_loader.py
    python bench/bench_loader.py --n_images 512 --num_workers 8 --batch_size 64
"""
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from data import images  # noqa: E402
from data.images import (ImageFolderDataset, collate_skip_bad, load_chunks, load_rgb,  # noqa: E402
                         merge_batches)
from data.transforms import ClipView  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402
from utils.errors import V2LError  # noqa: E402

N_IMAGES = 256  # JPEGs written (split evenly over N_CHUNKS chunks)
IMAGE_SIZE = (500, 375)  # width, height: ImageNet's most common size
QUALITY = 90  # JPEG quality of the written files
N_CLASSES = 4  # class folders the images are spread over
N_CHUNKS = 8  # chunks of the run (step 3: CHUNK_SIZE images each)
BATCH_SIZE = 8  # images per loader batch
NUM_WORKERS = 2  # decoding processes, both ways
CLIP_SIZE = 224  # CLIP's input (ViT-L/14: 224, bicubic)
DENOISE_CHUNK = 64  # eval_denoising's chunk (CHUNK_IMAGES); 0 skips its rows
REPEATS = 3  # timed rounds (the best of each way is kept)
LIST_FILES = 20000  # empty files of the listing tree
LIST_FOLDERS = 100  # class folders they are spread over
SEED = 0  # image content

settings = configure(globals())
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A picture with a photo's mix of smooth areas, edges and texture."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
        img[..., c] = 128 + 80 * np.sin(fx * x + phase) * np.cos(fy * y)
    for _ in range(6):   # flat shapes with sharp edges
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(15, 90)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r ** 2] = rng.uniform(0, 255, 3)
    coarse = rng.normal(0, 25, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)
    img += coarse[:height, :width] + rng.normal(0, 10, img.shape)   # texture and sensor noise
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def write_jpegs(root: Path) -> None:
    rng = np.random.default_rng(SEED)
    for i in range(N_IMAGES):
        folder = root / "train" / f"n{i % N_CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(rng, *IMAGE_SIZE).save(folder / f"img_{i:05d}.JPEG", quality=QUALITY)


def old_listing(root: Path, split: str) -> list[Path]:
    """The former listing: Path.iterdir, a stat per file (is_file), sorted."""
    folder = root / split
    class_dirs = sorted(s for s in folder.iterdir() if s.is_dir() and not s.name.startswith("."))
    return [p for d in class_dirs
            for p in sorted(p for p in d.iterdir() if p.is_file() and images.is_image(p))]


def best_of(fns: dict) -> tuple[dict, dict]:
    """(best seconds, last result) per function; the order alternates each round."""
    times, out = {name: [] for name in fns}, {}
    names = list(fns)
    for r in range(REPEATS):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            out[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}, out


def main():
    if N_IMAGES < N_CHUNKS or min(N_CHUNKS, BATCH_SIZE, REPEATS, N_CLASSES) < 1:
        raise V2LError("--n_images must be at least --n_chunks, and the counts at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path) -> None:
    torch.set_num_threads(1)       # as in a loader worker
    write_jpegs(tmp / "jpeg")
    view = ClipView(CLIP_SIZE, OPENAI_MEAN, OPENAI_STD, "bicubic")
    ds = ImageFolderDataset(tmp / "jpeg", "train", transform=view)
    per_chunk = -(-len(ds) // N_CHUNKS)
    bounds = lambda c: (c * per_chunk, min(len(ds), (c + 1) * per_chunk))   # noqa: E731
    kb = sum(p.stat().st_size for p in ds.paths) / len(ds) / 1024

    def chunk_loaders():      # the former step 3: a DataLoader (new workers) per chunk
        out = []
        for c in range(N_CHUNKS):
            loader = DataLoader(Subset(ds, range(*bounds(c))), batch_size=BATCH_SIZE,
                                num_workers=NUM_WORKERS, collate_fn=collate_skip_bad)
            out += [b["image"] for b in loader]
        return out

    def one_loader():         # ours: one DataLoader for every chunk
        return [b["image"] for _, batches in load_chunks(ds, range(N_CHUNKS), bounds, BATCH_SIZE,
                                                          NUM_WORKERS) for b in batches]

    t, out = best_of({"per-chunk loaders": chunk_loaders, "one loader": one_loader})
    a, b = torch.cat(out["per-chunk loaders"]), torch.cat(out["one loader"])
    if a.shape != b.shape:
        raise V2LError(f"the two ways gave {tuple(a.shape)} and {tuple(b.shape)}")
    maxdiff = (a - b).abs().max().item()
    del out, a, b

    td = {}
    if DENOISE_CHUNK:         # eval_denoising: a chunk is one batch for the LLM
        n_den = -(-len(ds) // DENOISE_CHUNK)
        den = lambda c: (c * DENOISE_CHUNK, min(len(ds), (c + 1) * DENOISE_CHUNK))   # noqa: E731
        share = -(-DENOISE_CHUNK // NUM_WORKERS)

        def one_batch_per_chunk():   # the former eval_denoising.chunk_batches
            out = []
            for c in range(n_den):
                lo, hi = den(c)
                loader = DataLoader(Subset(ds, range(lo, hi)), batch_size=hi - lo,
                                    num_workers=NUM_WORKERS, collate_fn=collate_skip_bad)
                out.append(next(iter(loader))["image"])
            return out

        def shared_chunks():         # eval_denoising.chunk_batches now
            return [merge_batches(list(parts))["image"]
                    for _, parts in load_chunks(ds, range(n_den), den, share, NUM_WORKERS)]

        td, out = best_of({"one batch per chunk": one_batch_per_chunk,
                           "shared, one loader": shared_chunks})
        maxdiff = max(maxdiff, max((a - b).abs().max().item() for a, b in
                                   zip(out["one batch per chunk"], out["shared, one loader"])))
        del out

    # what one worker pays per image: decode, then CLIP's resize + crop + normalise
    paths = ds.paths[:min(len(ds), 64)]
    t0 = time.perf_counter()
    decoded = [load_rgb(p) for p in paths]
    t_decode = (time.perf_counter() - t0) / len(paths)
    t0 = time.perf_counter()
    for im in decoded:
        view(im)
    t_view = (time.perf_counter() - t0) / len(paths)

    n = len(ds)
    print(f"{n} JPEGs {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} (quality {QUALITY}, {kb:.0f} KiB each), "
          f"{N_CHUNKS} chunks of {per_chunk}, batches of {BATCH_SIZE}, {NUM_WORKERS} workers, "
          f"CLIP view {CLIP_SIZE} px bicubic, best of {REPEATS}")
    print(f"{'data path':<34}{'seconds':>10}{'images/s':>11}")
    for name, sec in t.items():
        print(f"{name:<34}{sec:>10.3f}{n / sec:>11.1f}")
    if td:
        print(f"eval_denoising's chunks of {DENOISE_CHUNK}, {NUM_WORKERS} workers:")
        for name, sec in td.items():
            print(f"{name:<34}{sec:>10.3f}{n / sec:>11.1f}")
    print(f"{'one worker: decode':<34}{t_decode * 1e3:>9.2f}ms{1 / t_decode:>11.1f}")
    print(f"{'one worker: resize+crop+normalise':<34}{t_view * 1e3:>9.2f}ms{1 / t_view:>11.1f}")
    print(f"{'one worker: both':<34}{(t_decode + t_view) * 1e3:>9.2f}ms"
          f"{1 / (t_decode + t_view):>11.1f}")

    # listing: LIST_FILES empty files in LIST_FOLDERS class folders
    root = tmp / "list"
    for i in range(LIST_FILES):
        folder = root / "train" / f"n{i % LIST_FOLDERS:08d}"
        if i < LIST_FOLDERS:
            folder.mkdir(parents=True)
        (folder / f"x_{i:08d}.JPEG").touch()

    def scandir_cold():
        images.clear_listings()
        return images.scan_split(root, "train")[0]

    tl, lists = best_of({"old": lambda: old_listing(root, "train"), "new": scandir_cold})
    if lists["old"] != lists["new"]:
        raise V2LError("the two listings differ")
    time.sleep(images.RECENT_S + 0.5)      # a folder changed just now is never reused
    images.clear_listings()
    images.scan_split(root, "train")
    t0 = time.perf_counter()
    images.scan_split(root, "train")
    t_again = time.perf_counter() - t0
    print(f"{'listing ' + str(LIST_FILES) + ' files':<34}{'seconds':>10}")
    print(f"{'Path.iterdir + is_file (former)':<34}{tl['old']:>10.4f}")
    print(f"{'os.scandir':<34}{tl['new']:>10.4f}")
    print(f"{'os.scandir, kept (2nd listing)':<34}{t_again:>10.4f}")

    speedup = t["per-chunk loaders"] / t["one loader"]
    print(f"bench loader: images={n} chunks={N_CHUNKS} workers={NUM_WORKERS} "
          f"per_chunk_img_s={n / t['per-chunk loaders']:.1f} one_loader_img_s={n / t['one loader']:.1f} "
          f"worker_ms_per_img={(t_decode + t_view) * 1e3:.2f} list_old_s={tl['old']:.4f} "
          f"list_new_s={tl['new']:.4f} list_kept_s={t_again:.4f} "
          f"list_speedup={tl['old'] / tl['new']:.2f} "
          + (f"denoise_speedup={td['one batch per chunk'] / td['shared, one loader']:.2f} "
             if td else "") + f"speedup={speedup:.2f} maxdiff={maxdiff:g}")


if __name__ == "__main__":
    run_main(main)
