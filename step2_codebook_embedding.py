"""Step 2: embed every candidate string with CLIP's text tower.

Each of the 3V candidates (every subword, greedy bigram and greedy trigram of
step 1) is formatted into CLIP's 80 ImageNet prompt templates; the 80 prompt
embeddings are L2-normalised and averaged (not renormalised, as the authors).
Writes the local codebook (subword rows, row i = LLM token vocab_ids[i]) and
the global candidate codebook [subwords; bigrams; trigrams].

Identical strings are embedded once. Prompts are tokenized by splicing each plain
string's tokens into the templates (exactly CLIP's tokenizer), in --tokenize_workers
processes per rank. Work is cut into chunks of distinct
strings that are saved as they finish: a killed run resumes, and under
torchrun the chunks are shared between ranks (same result for any world size).

    python step2_codebook_embedding.py --vocab_dir out/vocab --out_dir out/codebook \
        --clip ViT-L-14 --clip_pretrained ViT-L-14.pt --clip_allow_unsafe true
    torchrun --nproc_per_node 8 step2_codebook_embedding.py ...
"""
import os

import torch
from tqdm import tqdm

from engine.candidates import build_candidates, unique_strings
from models.clip import encode_text_templates, load_clip
from data.classes import imagenet_templates
from utils import dist
from utils.artifacts import (ChunkStore, load_json, read_manifest, save_json, save_tensors,
                             write_manifest)
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.stages import CODEBOOK, VOCAB

VOCAB_DIR = "out/vocab"  # step-1 artifact (vocab.json)
OUT_DIR = "out/codebook"  # where the codebook artifact is written
CLIP = "ViT-L-14"  # open_clip model directory, or an open_clip architecture name
CLIP_PRETRAINED = None  # weights for a named CLIP: OpenAI ViT-L-14.pt or an open_clip .bin/.safetensors
CLIP_ALLOW_UNSAFE = False  # allow pickled CLIP files (OpenAI's TorchScript ViT-L-14.pt); only if trusted
BATCH_SIZE = 32  # strings per forward pass (each gives 80 template prompts)
CHUNK_SIZE = 2048  # distinct strings per resumable chunk
DEVICE = "auto"  # auto (CUDA when available), cuda or cpu
PRECISION = "auto"  # auto (fp16 autocast on CUDA, fp32 on CPU), fp32, fp16 or bf16 (also a CPU with native bf16)
TOKENIZE_WORKERS = "auto"  # processes tokenizing prompts per rank: auto (the CPUs / local ranks, at most 8) or a count (1: in-process)

settings = configure(globals())


def read_vocab(vocab_dir) -> tuple[dict, dict]:
    """(manifest, vocab.json) of a finished step-1 artifact, checked for consistent lengths."""
    manifest = read_manifest(vocab_dir, VOCAB)
    vocab = load_json(f"{vocab_dir}/vocab.json")
    lengths = {k: len(vocab.get(k, [])) for k in ("ids", "subword", "bigram", "trigram", "printable")}
    if len(set(lengths.values())) != 1 or not lengths["ids"]:
        raise V2LError(f"{vocab_dir}/vocab.json: columns of unequal length or empty ({lengths}); "
                       "rerun step1_expand_vocabulary.py")
    return manifest, vocab


def tokenize_workers(value, ddp) -> int:
    """--tokenize_workers as a count: auto = this rank's share of the CPUs, 1 to 8."""
    if str(value) == "auto":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ddp.world))
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(8, (cpus or 1) // max(1, local)))
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise V2LError(f"--tokenize_workers {value}: expected auto or a count >= 1")
    return count


def main():
    ddp = dist.init(DEVICE, OUT_DIR)
    vocab_manifest, vocab = read_vocab(VOCAB_DIR)
    cand = build_candidates(vocab)
    n_vocab = len(vocab["ids"])
    uniq, inverse = unique_strings(cand["strings"])
    clip = load_clip(CLIP, CLIP_PRETRAINED, device=ddp.device, allow_unsafe=CLIP_ALLOW_UNSAFE)
    workers = tokenize_workers(TOKENIZE_WORKERS, ddp)
    if ddp.is_main:
        print(f"{len(cand['strings'])} candidates ({n_vocab} tokens x 3), {len(uniq)} distinct; "
              f"CLIP {clip.ident}, D={clip.embed_dim}, world={ddp.world}, "
              f"{workers} tokenizing process(es) per rank")

    store = ChunkStore(OUT_DIR, len(uniq), CHUNK_SIZE, key={
        "vocab": vocab_manifest["id"], "clip": clip.ident, "precision": PRECISION,
        "templates": list(imagenet_templates()), "batch_size": BATCH_SIZE})
    for i in tqdm(store.todo(ddp.rank, ddp.world), desc=f"rank {ddp.rank} chunks", disable=not ddp.is_main):
        start, stop = store.bounds(i)
        emb = encode_text_templates(clip, uniq[start:stop], batch_size=BATCH_SIZE,
                                    precision=PRECISION, workers=workers)
        store.save(i, {"embeddings": emb})
    dist.barrier(ddp)

    if ddp.is_main:
        embeddings = store.gather()["embeddings"][inverse].float()
        llm_ids = torch.tensor(vocab["ids"], dtype=torch.long)
        save_tensors(f"{OUT_DIR}/local_codebook.safetensors",
                     {"embeddings": embeddings[:n_vocab].contiguous(), "llm_ids": llm_ids})
        save_tensors(f"{OUT_DIR}/global_candidates.safetensors", {"embeddings": embeddings})
        save_json(f"{OUT_DIR}/candidates.json", cand)
        write_manifest(OUT_DIR, CODEBOOK, settings,
                       ["local_codebook.safetensors", "global_candidates.safetensors",
                        "candidates.json"],
                       inputs={"vocab": VOCAB_DIR},
                       info={"clip": clip.ident, "embed_dim": clip.embed_dim,
                             "vocab_size": n_vocab, "distinct_strings": len(uniq),
                             "valid_candidates": sum(cand["valid"])})
        store.cleanup()
        print(f"wrote {OUT_DIR}: local [{n_vocab}, {clip.embed_dim}], "
              f"global candidates [{3 * n_vocab}, {clip.embed_dim}], "
              f"{sum(cand['valid'])} valid")
    dist.barrier(ddp)
    dist.shutdown(ddp)


if __name__ == "__main__":
    run_main(main, CODEBOOK, settings)
