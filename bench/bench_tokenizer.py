"""Tokenizer speed at the paper configuration: encode + decode images/s at 128 px (ours vs
the authors' quantiser path: all V codes projected per batch, one full distance matrix),
and the local nearest-code search (chunked matrix products) against the naive broadcast
and the authors' full distance matrix: time, peak memory, same indices.

Paper sizes: V=32000 local codes, D=768, M=11908 global entries, default architecture,
random weights (speed does not depend on them). The CLIP image tower (random ViT-L-14
unless --clip_spec none) is timed separately and added to the end-to-end figure.

    python bench/bench_tokenizer.py                       # CPU, a few minutes at most
    python bench/bench_tokenizer.py --device cuda --batch 32
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.clip import load_clip  # noqa: E402
from models.quantizers import nearest_code  # noqa: E402
from models.tokenizer import TokenizerConfig, V2LTokenizer  # noqa: E402
from utils.cli import configure, run_main  # noqa: E402
from utils.errors import V2LError  # noqa: E402

DEVICE = "cpu"          # cpu or cuda
BATCH = 2               # images per encode/decode call
REPEATS = 3             # timed calls after one warm-up (the median is reported)
CLIP_SPEC = "ViT-L-14"  # CLIP timed for the global tokens (random weights); none to skip
NN_TOKENS = 8           # tokens for the naive [tokens x V x D] search (it needs tokens*V*D*4 bytes)
SEED = 0                # random weights and inputs

settings = configure(globals())


def timed(fn, device: torch.device, repeats: int = REPEATS):
    """(median seconds over `repeats` calls after one warm-up, last result)."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def peak_memory(fn, device: torch.device) -> tuple[float, object]:
    """(peak extra memory in MiB while fn runs, fn's result): CUDA allocator, or process RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, out
    _release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:   # resets VmHWM (the RSS high-water mark)
        f.write("5")
    base = _status_kib("VmRSS")
    out = fn()
    return (_status_kib("VmHWM") - base) / 1024, out


def _release_freed_memory() -> None:
    """Make glibc serve large blocks by mmap (unmapped on free) and return free heap pages, so
    RSS tracks live tensors (otherwise freed blocks stay resident and a later peak reads 0)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 16)   # M_MMAP_THRESHOLD = 64 KiB, fixed
    libc.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise V2LError(f"/proc/self/status has no {field}; run the bench on Linux or with "
                   "--device cuda")


def naive_nearest(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The textbook search: every token minus every code, a [tokens, V, D] tensor."""
    return (z[:, None, :] - codes[None]).pow(2).sum(-1).argmin(1)


def full_matrix_nearest(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The authors' search: one [tokens, V] distance matrix, then argmin."""
    dist2 = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z @ codes.t()
    return dist2.argmin(1)


def authors_encode(tokenizer: V2LTokenizer, x128: torch.Tensor) -> torch.Tensor:
    """The authors' encode: project all V codes every batch, full [T, V] distance matrix."""
    z = tokenizer.encode_features(x128)
    codes = tokenizer.codebook_projection(tokenizer.tok_embeddings.weight)
    rows = full_matrix_nearest(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), codes)
    return tokenizer.llm_ids[rows].reshape(z.shape[0], *z.shape[2:])


def authors_decode(tokenizer: V2LTokenizer, local_ids: torch.Tensor, global_emb: torch.Tensor):
    """The authors' decode: project all V codes, then look the grid up."""
    codes = tokenizer.codebook_projection(tokenizer.tok_embeddings.weight)
    z_q = F.embedding(tokenizer.rows_from_llm_ids(local_ids), codes).permute(0, 3, 1, 2)
    return tokenizer.decoder(tokenizer.post_quant_conv(z_q), global_emb).clamp(-1, 1)


def main():
    device = torch.device(DEVICE)
    if device.type == "cpu":
        _release_freed_memory()
    torch.manual_seed(SEED)
    paper = TokenizerConfig()
    tokenizer = V2LTokenizer(paper, torch.randn(paper.n_local, paper.embed_dim),
                       torch.arange(paper.n_local), torch.randn(paper.n_global, paper.embed_dim),
                       [str(i) for i in range(paper.n_global)]).to(device).eval()
    x128 = torch.rand(BATCH, 3, paper.resolution, paper.resolution, device=device) * 2 - 1
    global_emb = tokenizer.tok_embeddings_global.weight[torch.randint(0, paper.n_global,
                                                                (BATCH, paper.global_topk))]

    rows = []                                         # (what, ours, reference)
    with torch.no_grad():
        t_enc, local_ids = timed(lambda: tokenizer.local_tokens(x128), device)
        t_dec, _ = timed(lambda: tokenizer.decode(local_ids, global_emb=global_emb), device)
        t_enc_ref, ref_ids = timed(lambda: authors_encode(tokenizer, x128), device)
        t_dec_ref, _ = timed(lambda: authors_decode(tokenizer, ref_ids, global_emb), device)
        rows += [("encode (local tokens)", f"{BATCH / t_enc:.2f} img/s",
                  f"{BATCH / t_enc_ref:.2f} img/s"),
                 ("decode", f"{BATCH / t_dec:.2f} img/s", f"{BATCH / t_dec_ref:.2f} img/s")]
        t_clip = 0.0
        if CLIP_SPEC and CLIP_SPEC.lower() != "none":
            clip = load_clip(CLIP_SPEC, device=device)
            x_clip = torch.randn(BATCH, 3, clip.image_size, clip.image_size, device=device)
            t_clip, _ = timed(lambda: clip.encode_images(x_clip), device)
            del clip
            clip_rate = f"{BATCH / t_clip:.2f} img/s"
            rows.append((f"CLIP {CLIP_SPEC} tower (global tokens)", clip_rate, clip_rate))
        images_per_s = BATCH / (t_enc + t_dec + t_clip)
        ref_per_s = BATCH / (t_enc_ref + t_dec_ref + t_clip)
        rows.append(("encode + decode" + (" + CLIP" if t_clip else ""),
                     f"{images_per_s:.2f} img/s", f"{ref_per_s:.2f} img/s"))

        codes = tokenizer.projected_codebook()
        z = tokenizer.encode_features(x128).permute(0, 2, 3, 1).reshape(-1, paper.embed_dim)
        results = []
        for label, tokens, reference, repeats in (
                (f"NN search, {NN_TOKENS} tokens (ref: naive [T,V,D])", z[:NN_TOKENS],
                 naive_nearest, 1),
                (f"NN search, {len(z)} tokens (ref: full [T,V] matrix)", z, full_matrix_nearest,
                 REPEATS)):
            t_ours, ours = timed(lambda: nearest_code(tokens, codes), device)
            m_ours, _ = peak_memory(lambda: nearest_code(tokens, codes), device)
            t_ref, ref = timed(lambda: reference(tokens, codes), device, repeats)
            m_ref, _ = peak_memory(lambda: reference(tokens, codes), device)
            rows.append((label, f"{t_ours * 1e3:.1f} ms {m_ours:.0f} MiB",
                         f"{t_ref * 1e3:.1f} ms {m_ref:.0f} MiB"))
            results.append((t_ref / t_ours, int((ours != ref).sum())))
    nn_speedup = results[0][0]
    mismatches = sum(r[1] for r in results) + int((local_ids != ref_ids).sum())

    print(f"paper configuration: V={paper.n_local} D={paper.embed_dim} M={paper.n_global}, "
          f"batch {BATCH} at {paper.resolution} px on {device}")
    print(f"{'':46} {'ours':>22} {'reference':>22}")
    for name, ours, ref in rows:
        print(f"{name:46} {ours:>22} {ref:>22}")
    print(f"index mismatches vs the references: {mismatches}")
    print(f"bench tokenizer: images_per_s={images_per_s:.3f} nn_speedup={nn_speedup:.1f} "
          f"speedup={nn_speedup:.1f} maxdiff={mismatches}")


if __name__ == "__main__":
    run_main(main)
