"""Nearest-code search and vector quantisation for the V2L tokenizer's two codebooks.

- Local tokens: every grid vector is replaced by its nearest (squared L2)
  projected code; ``vector_quantize`` adds the straight-through estimator
  and the VQ loss.
- Global tokens: the CLIP image embedding's k nearest global entries
  (``topk_nearest``).

The search expands ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2 into one matrix
product per block of tokens and codes (||z||^2 is the same for every code of a
token, so it is left out of the argmin), keeping the running best: memory is
bounded by ``block_elems`` distances whatever the number of tokens or codes
(no [tokens, V, D] tensor, not even a full [tokens, V] one when V is large).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_ELEMS = 1 << 24          # distance-matrix entries per block (64 MiB in float32)


@torch.no_grad()
def nearest_code(z: torch.Tensor, codes: torch.Tensor, block_elems: int = BLOCK_ELEMS) -> torch.Tensor:
    """Index of the nearest code (squared L2) for each row: z [N, D], codes [V, D] -> [N] long.

    Ties go to the lowest index, as with ``argmin`` over the full matrix.
    """
    z, codes = z.float(), codes.float()
    n, v = z.shape[0], codes.shape[0]
    code_block = min(v, max(1, block_elems))
    token_block = max(1, block_elems // code_block)
    code_sq = torch.linalg.vector_norm(codes, dim=1).square()   # no [V, D] temporary
    best = torch.empty(n, dtype=torch.long, device=z.device)
    for t0 in range(0, n, token_block):
        zt = z[t0:t0 + token_block]
        best_d = torch.full((zt.shape[0],), float("inf"), device=z.device)
        best_i = torch.zeros(zt.shape[0], dtype=torch.long, device=z.device)
        for c0 in range(0, v, code_block):
            c = codes[c0:c0 + code_block]
            distance = torch.addmm(code_sq[None, c0:c0 + code_block], zt, c.t(), alpha=-2.0)
            d_min, i_min = distance.min(1)
            better = d_min < best_d
            best_d = torch.where(better, d_min, best_d)
            best_i = torch.where(better, i_min + c0, best_i)
        best[t0:t0 + token_block] = best_i
    return best


def vector_quantize(z: torch.Tensor, codes: torch.Tensor, beta: float = 0.33,
                    block_elems: int = BLOCK_ELEMS, lookup=None):
    """Quantise a feature map to its nearest codes with the straight-through estimator.

    z [B, D, H, W], codes [V, D] (the projected codebook) -> (z_q [B, D, H, W]
    carrying z's gradient, vq_loss, rows [B, H, W]) where
    vq_loss = mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2): the first
    term pulls the encoder to its codes, the second (weighted by beta, as in
    the authors' code) the projected codebook to the encoder outputs.
    The codebook's gradient flows through ``lookup(rows) -> [N, D]`` (default:
    rows of ``codes``); a lookup that projects only the chosen rows gives the
    same gradient without back-propagating through all V codes.
    """
    b, dim, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, dim)
    rows = nearest_code(flat.detach(), codes.detach(), block_elems)
    zq = F.embedding(rows, codes) if lookup is None else lookup(rows)
    z32, zq32 = flat.float(), zq.float()                 # the loss in float32, also under autocast
    loss = torch.mean((zq32.detach() - z32) ** 2) + beta * torch.mean((zq32 - z32.detach()) ** 2)
    zq = flat + (zq.to(flat.dtype) - flat).detach()
    return zq.reshape(b, h, w, dim).permute(0, 3, 1, 2), loss, rows.reshape(b, h, w)


def l2_score(query: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """[N, D] x [V, D] -> [N, V]: minus the squared distance plus ||query||^2 (the same for
    every code of a row, so the ranking and any softmax over codes are the distance's)."""
    return 2 * query @ codes.t() - codes.pow(2).sum(1)


def code_entropy_loss(z: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-assignment entropy penalty against codebook collapse (not in the authors' method).

    z [N, D] (with grad), codes [V, D] (fixed). p_i = softmax(-||z_i - c||^2 / temperature):
    returns mean_i H(p_i) - H(mean_i p_i), low when each vector picks one code firmly and the
    batch spreads over many codes. [N, V] memory: meant for training batches.
    """
    logits = l2_score(z.float(), codes.float().detach()) / temperature
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    per_vector = -(p * log_p).sum(1).mean()
    mean_p = p.mean(0)
    return per_vector + (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()


@torch.no_grad()
def topk_nearest(query: torch.Tensor, codes: torch.Tensor, k: int, metric: str = "l2") -> torch.Tensor:
    """Indices of the k nearest codes per query, nearest first: query [B, D], codes [M, D] -> [B, k].

    ``l2``: squared Euclidean distance (the authors' global-token rule; their
    global entries are means of unit vectors, so their norms differ and this
    is not the cosine order). ``cosine``: cosine similarity.
    """
    query, codes = query.float(), codes.float()
    if metric == "l2":
        score = l2_score(query, codes)
    elif metric == "cosine":
        score = F.normalize(query, dim=-1) @ F.normalize(codes, dim=-1).t()
    else:
        raise ValueError(f"unknown metric {metric!r}; use 'l2' or 'cosine'")
    return score.topk(k, dim=1).indices
