"""Evaluation 1: how well the tokenizer reconstructs ImageNet val images.

Each image goes through the tokenizer's public API (encode -> local LLM token
ids + global tokens -> decode) and is compared with its input. Two protocols
(--protocol), named in every result:

- authors (default, to compare with the paper's table): as the authors'
  evaluation script, NOT at the training resolution: the shorter side resized
  to 256 (torchvision's bilinear, antialiased), centre crop 256 x 256, so the
  encoder makes a 32 x 32 grid of 1,024 local tokens; their metric code: LPIPS
  from pyiqa (AlexNet) fed [-1, 1], SSIM from piq on RGB, IS from torchvision's
  inception_v3 with 10 contiguous splits, float PSNR-Y; FID as standard;
- standard: at the tokenizer's resolution (128 px, the CLIP crop resized, as
  in training), FID and IS (TF-Inception), LPIPS (VGG, inputs in [-1, 1]), PSNR
  and SSIM on the BT.601 Y channel, all on 8-bit images.

Both add codebook usage (distinct local tokens, perplexity). Conventions:
engine/metrics.py. A metric whose network weights are not on disk is skipped
by name, with where to put the file. --dump_png writes every source and
reconstruction as PNG files, for external FID tools.

The images are cut into fixed chunks whose metric sums are saved as they
finish, so a killed run resumes, and under torchrun the chunks are shared
between ranks (the same numbers for any number of processes).

Writes OUT_DIR/results.json, a comparison grid (originals over
reconstructions), a token-usage plot, the token histogram and a manifest, and
appends one row to RESULTS_CSV.

    python eval_reconstruction.py --tokenizer_dir out/tokenizer --data_dir /data/imagenet
    torchrun --nproc_per_node 8 eval_reconstruction.py --tokenizer_dir out/tokenizer ...
"""
import csv
import datetime
import io
import json
from pathlib import Path

import torch
from tqdm import tqdm

from data.images import ImageFolderDataset, collate_skip_bad, load_chunks
from data.transforms import clip_crop
from engine.metrics import (ALL_METRICS, PROTOCOLS, MetricsAccumulator, ReconstructionMetrics,
                            codebook_usage)
from models.clip import autocast_context
from models.tokenizer import V2LTokenizer
from models.tokenizer_io import load_tokenizer
from utils import dist
from utils.artifacts import (ChunkStore, atomic_path, read_manifest, save_json, save_tensors,
                             write_manifest)
from utils.figures import plot_code_histogram, save_comparison_grid
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.stages import EVAL_RECONSTRUCTION, TOKENIZER

TOKENIZER_DIR = "out/tokenizer"  # step-4 artifact (tokenizer.pt + manifest)
PROTOCOL = "authors"  # authors: the paper script's 256 px crop and metric code; standard: 128 px, ours
DATA_DIR = "/data/imagenet"  # ImageNet root holding <split>/<class>/*.JPEG (or a flat <split>/)
SPLIT = "val"  # sub-folder of DATA_DIR to evaluate
VAL_LABELS = None  # labels file for a flat val folder (not needed for reconstruction)
MAX_IMAGES: int | None = None  # evaluate only the first N images in sorted order (None = all, 50,000 for val)
BATCH_SIZE = 64  # images per forward pass
NUM_WORKERS = 8  # image-loading processes per rank
CHUNK_SIZE = 2000  # images per resumable chunk (its metric sums are saved when done)
METRICS = ["psnr", "ssim", "lpips", "fid", "is", "codebook"]  # metrics to compute
INCEPTION_WEIGHTS = None  # TF-Inception weights file (None = look in torch hub's checkpoints/)
LPIPS_VGG = None  # torchvision VGG16 weights for LPIPS (None = look in torch hub's checkpoints/)
IS_SPLITS = 10  # Inception Score splits (standard: image i goes to split i % IS_SPLITS; authors: the N images in dataset order cut into IS_SPLITS contiguous splits of N // IS_SPLITS, the last N mod IS_SPLITS dropped)
GRID_IMAGES = 16  # images shown in the originals-vs-reconstructions grid, evenly spaced over the evaluated (sorted) set, so classes differ (0 = none)
DUMP_PNG = False  # also write every source and reconstruction to OUT_DIR/png/{source,reconstruction}/
CLIP_ALLOW_UNSAFE = False  # allow the tokenizer's CLIP to be a pickled OpenAI file; only if trusted
DEVICE = "auto"  # auto (CUDA when available), cuda or cpu
PRECISION = "fp32"  # the tokenizer's encoder and decoder: fp32 (faithful), fp16 or bf16 autocast on CUDA (bf16 also on a CPU computing it natively); CLIP runs as in training either way
TF32 = False  # also let CUDA matmuls use TF32 (PyTorch's default: convolutions only); faster on Ampere and later, not the faithful numbers
OUT_DIR = "out/eval_reconstruction"  # where results, pictures and the manifest are written
RESULTS_CSV = "out/results_reconstruction.csv"  # one row per run is appended here

settings = configure(globals())

AUTHORS_SIZE = 256  # the authors' evaluation crop

CSV_COLUMNS = ["time", "tokenizer_dir", "tokenizer_id", "protocol", "split", "n_images", "psnr", "ssim",
               "lpips", "fid", "is", "is_std", "codebook_used", "codebook_usage",
               "codebook_perplexity", "skipped", "config"]


def check_csv(path: Path) -> None:
    """Refuse, before any work, a results CSV whose header is not ours."""
    if path.is_file() and path.stat().st_size:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header != CSV_COLUMNS:
            raise V2LError(f"{path}: a CSV with other columns; pass another --results_csv "
                           "(or move that file away)")


def append_csv_row(path: Path, row: dict) -> None:
    """Add one row (atomically: the old rows plus the new one replace the file)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    if not old:
        writer.writeheader()
    writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write(old + buf.getvalue())


class AuthorsViews:
    """PIL -> (shorter side to 256, centre crop 256, in [-1, 1]; CLIP's own view), as the
    authors' evaluation script feeds the tokenizer (not the 128 px training view)."""

    def __init__(self, clip, size: int = AUTHORS_SIZE):
        self.crop, self.clip_view = clip_crop(size, "bilinear"), clip.image_view()

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.crop(image) * 2 - 1, self.clip_view(image)


def image_views(tokenizer: V2LTokenizer):
    """The dataset transform of the chosen protocol."""
    if PROTOCOL == "authors":
        return AuthorsViews(tokenizer.clip)
    return tokenizer.clip.image_views(tokenizer.config.resolution)


@torch.no_grad()
def reconstruct(tokenizer: V2LTokenizer, batch: dict, device) -> tuple[torch.Tensor, ...]:
    """(originals, reconstructions, local codebook rows) of a loader batch."""
    x_in, x_clip = (t.to(device, non_blocking=True) for t in batch["image"])
    with autocast_context(device, PRECISION):
        global_idx, local_ids = tokenizer.encode(x_in, x_clip)
        rec = tokenizer.decode(local_ids, global_idx=global_idx)
    return x_in, rec.float(), tokenizer.rows_from_llm_ids(local_ids)


def dump_png(folder: Path, index: torch.Tensor, x_in: torch.Tensor, rec: torch.Tensor) -> None:
    """Each source and reconstruction as an 8-bit PNG named by its dataset index."""
    from PIL import Image

    from engine.metrics import to_uint8
    for sub, images in (("source", x_in), ("reconstruction", rec)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for i, image in zip(index.tolist(), to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()):
            Image.fromarray(image).save(folder / sub / f"{i:08d}.png")


def main():
    if PROTOCOL not in PROTOCOLS:
        raise V2LError(f"--protocol {PROTOCOL}: choose from {', '.join(PROTOCOLS)}")
    autocast_context(torch.device("cpu"), PRECISION)   # refuses an unknown precision
    ddp = dist.init(DEVICE, OUT_DIR)
    if TF32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    unknown = set(METRICS) - set(ALL_METRICS)
    if unknown:
        raise V2LError(f"--metrics: unknown {sorted(unknown)}; choose from {', '.join(ALL_METRICS)}")
    check_csv(Path(RESULTS_CSV))
    manifest = read_manifest(TOKENIZER_DIR, TOKENIZER)
    tokenizer = load_tokenizer(TOKENIZER_DIR, device=ddp.device, allow_unsafe_clip=CLIP_ALLOW_UNSAFE)
    data = ImageFolderDataset(DATA_DIR, SPLIT, image_views(tokenizer),
                              labels_file=VAL_LABELS, max_images=MAX_IMAGES)
    acc = ReconstructionMetrics(METRICS, device=ddp.device, n_codes=len(tokenizer.llm_ids),
                                inception_weights=INCEPTION_WEIGHTS, lpips_vgg=LPIPS_VGG,
                                is_splits=IS_SPLITS, protocol=PROTOCOL, n_total=len(data))
    if ddp.is_main:
        print(f"{len(data)} images from {DATA_DIR}/{SPLIT}; tokenizer {TOKENIZER_DIR} "
              f"({manifest['id'][:12]}); protocol {PROTOCOL}; metrics {', '.join(acc.metrics)}; "
              f"world={ddp.world}")

    store = ChunkStore(OUT_DIR, len(data), CHUNK_SIZE, key={
        "protocol": PROTOCOL,
        "tokenizer": manifest["id"], "data": str(Path(DATA_DIR).resolve()), "split": SPLIT,
        "images": len(data), "metrics": acc.metrics, "is_splits": IS_SPLITS,
        "inception": INCEPTION_WEIGHTS, "lpips_vgg": LPIPS_VGG, "precision": PRECISION,
        "tf32": TF32})
    todo = store.todo(ddp.rank, ddp.world)
    bar = tqdm(total=sum(b - a for a, b in map(store.bounds, todo)), unit="img",
               desc=f"rank {ddp.rank}", disable=not ddp.is_main)
    for i, batches in load_chunks(data, todo, store.bounds, BATCH_SIZE, NUM_WORKERS,
                                  pin_memory=ddp.device.type == "cuda"):
        acc.reset()
        unreadable = 0
        for batch in batches:
            unreadable += batch["n_skipped"]
            if "image" in batch:
                x_in, rec, rows = reconstruct(tokenizer, batch, ddp.device)
                acc.update(x_in, rec, codes=rows, index=batch["index"])
                if DUMP_PNG:
                    dump_png(Path(OUT_DIR) / "png", batch["index"], x_in, rec)
            bar.update(len(batch["index"]) + batch["n_skipped"])
        store.save(i, {**acc.state_dict(), "unreadable": torch.tensor(unreadable)})
    bar.close()
    dist.barrier(ddp)
    if ddp.is_main:
        finish(tokenizer, data, acc, store, manifest)
    dist.shutdown(ddp)


def finish(tokenizer, data, acc: MetricsAccumulator, store: ChunkStore, manifest: dict) -> None:
    """Sum the chunks, write results, pictures, the CSV row and the manifest."""
    acc.reset()
    unreadable = 0
    for i in range(store.n_chunks):
        part = store.load(i)
        unreadable += int(part.pop("unreadable"))
        acc.merge(part)
    results = acc.compute()
    results["unreadable_images"] = unreadable
    results["image_size"] = AUTHORS_SIZE if PROTOCOL == "authors" else tokenizer.config.resolution
    out = Path(OUT_DIR)
    save_json(out / "results.json", results)
    files = ["results.json"]
    counts = acc.codebook_counts()
    if counts is not None:
        save_tensors(out / "token_counts.safetensors", {"counts": counts, "llm_ids": tokenizer.llm_ids})
        plot_code_histogram(counts, codebook_usage(counts), out / "token_usage.png")
        files += ["token_counts.safetensors", "token_usage.png"]
    if GRID_IMAGES:
        shown_n = min(GRID_IMAGES, len(data))
        picks = [i * (len(data) - 1) // max(1, shown_n - 1) for i in range(shown_n)]
        batch = collate_skip_bad([data[i] for i in picks])
        if "image" in batch:
            x_in, rec, _ = reconstruct(tokenizer, batch, acc.device)
            save_comparison_grid([x_in, rec], out / "reconstructions.png")
            files.append("reconstructions.png")
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()
             if k != "skipped"}
    print(json.dumps(shown))
    for name, reason in results["skipped"].items():
        print(f"skipped {name}: {reason}")
    append_csv_row(Path(RESULTS_CSV), {
        **results, "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "tokenizer_dir": TOKENIZER_DIR, "tokenizer_id": manifest["id"][:12], "split": SPLIT,
        "skipped": ";".join(results["skipped"]), "config": json.dumps(settings, sort_keys=True)})
    write_manifest(out, EVAL_RECONSTRUCTION, settings, files, inputs={"tokenizer": TOKENIZER_DIR},
                   info=results)
    store.cleanup()
    print(f"wrote {out}/results.json and a row of {RESULTS_CSV}")


if __name__ == "__main__":
    run_main(main, EVAL_RECONSTRUCTION, settings)
