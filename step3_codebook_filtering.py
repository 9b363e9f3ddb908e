"""Step 3: keep the global candidates that CLIP's image tower actually picks.

Every training image goes through CLIP's own preprocessing and image tower;
its L2-normalised embedding is scored against all 3V global candidates of step 2
(invalid ones never win), and its top-5 candidates each get one hit. A
candidate hit more than the threshold is kept: --threshold (an absolute count,
the paper's 100 for ImageNet's 1.28M images) wins when given, else
--threshold_rate x number of images read (by default the paper's 100 / 1,281,167,
as an exact fraction: on ImageNet's 1,281,167 images, exactly "more than 100").

Images are counted in chunks saved as they finish (a killed run resumes);
under torchrun the chunks are shared between ranks without padding, so every
image is counted exactly once and any world size gives the same counts.

    python step3_codebook_filtering.py --data_dir /data/imagenet --vocab_dir out/vocab \
        --codebook_dir out/codebook --out_dir out/global --clip ViT-L-14 \
        --clip_pretrained ViT-L-14.pt --clip_allow_unsafe true
"""
import hashlib

import torch
from tqdm import tqdm

from data.images import ImageFolderDataset, load_chunks
from engine.candidates import count_hits, hit_threshold, parse_rate, select_global
from models.clip import load_clip
from utils import dist
from utils.artifacts import (ChunkStore, load_json, load_tensors, read_manifest, require_input,
                             save_json, save_tensors, write_manifest)
from utils.figures import plot_hit_histogram
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.stages import CODEBOOK, GLOBAL, VOCAB

DATA_DIR = "/data/imagenet"  # image root in ImageNet layout (<data_dir>/<split>/<class>/<images>)
SPLIT: str | None = "train"  # sub-folder of DATA_DIR to count (none: DATA_DIR itself)
VOCAB_DIR = "out/vocab"  # step-1 artifact
CODEBOOK_DIR = "out/codebook"  # step-2 artifact (global candidates)
OUT_DIR = "out/global"  # where the filtered global codebook is written
CLIP = "ViT-L-14"  # the CLIP of step 2: open_clip model directory or architecture name
CLIP_PRETRAINED = None  # weights for a named CLIP: OpenAI ViT-L-14.pt or an open_clip .bin/.safetensors
CLIP_ALLOW_UNSAFE = False  # allow pickled CLIP files (OpenAI's TorchScript ViT-L-14.pt); only if trusted
TOPK = 5  # candidates hit per image
THRESHOLD: int | None = None  # keep candidates hit MORE than this many times; wins over THRESHOLD_RATE when set
THRESHOLD_RATE = "100/1281167"  # hits per image read to exceed when THRESHOLD is none, a fraction or decimal, taken exactly (paper: 100 on ImageNet's 1,281,167)
SIMILARITY = "dot"  # dot: image . template-mean embedding (the authors); cosine: renormalise candidates
MAX_IMAGES: int | None = None  # count only the first N images (none: all)
BATCH_SIZE = 256  # images per forward pass
NUM_WORKERS = 8  # image-decoding worker processes per rank
CHUNK_SIZE = 20000  # images per resumable chunk
DEVICE = "auto"  # auto (CUDA when available), cuda or cpu
PRECISION = "auto"  # auto (fp16 autocast on CUDA, fp32 on CPU), fp32, fp16 or bf16 (also a CPU with native bf16)
SHOW_TOP = 30  # most-hit candidates printed at the end

settings = configure(globals())


def check_inputs(clip_ident: str) -> tuple[dict, dict]:
    """(vocab manifest, codebook manifest), refusing a codebook made from another vocabulary
    or with another CLIP."""
    vocab_m = read_manifest(VOCAB_DIR, VOCAB)
    code_m = read_manifest(CODEBOOK_DIR, CODEBOOK)
    require_input(code_m, "vocab", vocab_m, what=f"codebook {CODEBOOK_DIR}")
    if code_m["info"].get("clip") != clip_ident:
        raise V2LError(f"codebook {CODEBOOK_DIR} was embedded with CLIP '{code_m['info'].get('clip')}'"
                       f" but --clip/--clip_pretrained give '{clip_ident}'; pass the CLIP of step 2")
    return vocab_m, code_m


def main():
    if SIMILARITY not in ("dot", "cosine"):
        raise V2LError(f"--similarity {SIMILARITY}: expected dot or cosine")
    parse_rate(THRESHOLD_RATE)  # refuse a malformed rate before counting
    ddp = dist.init(DEVICE, OUT_DIR)
    clip = load_clip(CLIP, CLIP_PRETRAINED, device=ddp.device, allow_unsafe=CLIP_ALLOW_UNSAFE)
    vocab_m, code_m = check_inputs(clip.ident)
    candidates = load_tensors(f"{CODEBOOK_DIR}/global_candidates.safetensors")["embeddings"]
    table = load_json(f"{CODEBOOK_DIR}/candidates.json")
    if SIMILARITY == "cosine":
        candidates = torch.nn.functional.normalize(candidates, dim=-1)
    valid = torch.tensor(table["valid"], dtype=torch.bool)
    if TOPK > int(valid.sum()):
        raise V2LError(f"--topk {TOPK}: only {int(valid.sum())} valid candidates in {CODEBOOK_DIR}")
    data = ImageFolderDataset(DATA_DIR, SPLIT, transform=clip.image_view(), max_images=MAX_IMAGES)
    paths_digest = hashlib.sha256("\n".join(map(str, data.paths)).encode()).hexdigest()

    store = ChunkStore(OUT_DIR, len(data), CHUNK_SIZE, key={
        "codebook": code_m["id"], "clip": clip.ident, "images": paths_digest, "topk": TOPK,
        "similarity": SIMILARITY, "precision": PRECISION})
    if ddp.is_main:
        print(f"{len(data)} images in {store.n_chunks} chunks ({store.n_done()} done), "
              f"{len(valid)} candidates ({int(valid.sum())} valid), world={ddp.world}")
    dev_candidates, dev_valid = candidates.to(ddp.device), valid.to(ddp.device)
    todo = store.todo(ddp.rank, ddp.world)
    chunks = load_chunks(data, todo, store.bounds, BATCH_SIZE, NUM_WORKERS,
                         pin_memory=ddp.device.type == "cuda")   # one set of workers for all
    for i, batches in tqdm(chunks, total=len(todo), desc=f"rank {ddp.rank} chunks",
                           disable=not ddp.is_main):
        counts, n_images, n_skipped = count_hits(clip, batches, dev_candidates, dev_valid, TOPK,
                                                 PRECISION)
        store.save(i, {"hits": counts, "stats": torch.tensor([n_images, n_skipped])})

    # every rank sums the chunks it owns; one integer all-reduce gives the totals, once every
    # rank is done (a resumed run leaves the ranks uneven work: a wait without a deadline)
    dist.barrier(ddp, "every rank's chunks")
    own = [store.load(i) for i in range(ddp.rank, store.n_chunks, ddp.world)]
    hits = sum((c["hits"] for c in own), torch.zeros(len(valid), dtype=torch.long))
    stats = sum((c["stats"] for c in own), torch.zeros(2, dtype=torch.long))
    if ddp.active:
        hits, stats = hits.to(ddp.device), stats.to(ddp.device)
        dist.all_reduce_sum(hits, ddp)
        dist.all_reduce_sum(stats, ddp)
    hits, (n_images, n_skipped) = hits.cpu(), stats.tolist()

    if n_images == 0:
        raise V2LError(f"{DATA_DIR}: none of the {len(data)} images could be read")
    min_hits = hit_threshold(n_images, THRESHOLD, THRESHOLD_RATE)
    keep = select_global(hits, min_hits)
    if keep.numel() == 0:
        raise V2LError(f"no candidate was hit more than {min_hits:g} times in {n_images} "
                       "images; lower --threshold / --threshold_rate or count more images")
    if ddp.is_main:
        save_tensors(f"{OUT_DIR}/global_codebook.safetensors", {
            "embeddings": candidates[keep].contiguous(), "candidate_index": keep,
            "hits": hits[keep]})
        save_json(f"{OUT_DIR}/global_strings.json",
                  {"strings": [table["strings"][i] for i in keep.tolist()]})
        save_tensors(f"{OUT_DIR}/hit_counts.safetensors", {"hits": hits})
        plot_hit_histogram(hits, min_hits, f"{OUT_DIR}/hit_histogram.png")
        write_manifest(OUT_DIR, GLOBAL, settings,
                       ["global_codebook.safetensors", "global_strings.json",
                        "hit_counts.safetensors"],
                       inputs={"vocab": VOCAB_DIR, "codebook": CODEBOOK_DIR},
                       info={"clip": clip.ident, "n_global": keep.numel(), "n_images": n_images,
                             "n_skipped": n_skipped, "min_hits": min_hits, "topk": TOPK,
                             "similarity": SIMILARITY})
        store.cleanup()
        order = torch.argsort(hits, descending=True, stable=True)[:SHOW_TOP].tolist()
        print(f"kept M={keep.numel()} of {len(valid)} candidates (hit > {min_hits:g}) from "
              f"{n_images} images, {n_skipped} unreadable images skipped")
        print("most hit: " + ", ".join(f"{table['strings'][i]!r} ({int(hits[i])})" for i in order))
    dist.barrier(ddp)
    dist.shutdown(ddp)


if __name__ == "__main__":
    run_main(main, GLOBAL, settings)
