"""The V2L tokenizer: an image becomes LLM token ids (local tokens) and words (global tokens).

- Local branch: VQGAN encoder -> 1x1 ``quant_conv`` to the CLIP dimension D ->
  per-position L2 normalisation -> nearest code of the projected local codebook
  (frozen CLIP text embeddings of the LLM's subwords, ``tok_embeddings``,
  through the trainable Linear ``codebook_projection``). Codebook row i stands
  for LLM token ``llm_ids[i]``: the 16x16 grid of rows becomes 256 LLM ids.
- Global branch: frozen CLIP image tower -> L2-normalised embedding -> the k
  nearest entries of the filtered global codebook (``tok_embeddings_global``),
  whose strings are the image's "words" and whose embeddings the decoder
  attends to.
- Decoder: ``post_quant_conv`` D -> z, then the VQGAN decoder with
  cross-attention to the k global embeddings.

Parameter names are those of the authors' checkpoint. Saving, loading and reading
the authors' checkpoint live in ``models.tokenizer_io``; building from the step-2/3
artifacts in ``engine.tokenizer_build``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.clip import ClipBundle
from models.quantizers import code_entropy_loss, topk_nearest, vector_quantize
from models.vqgan import Decoder, Encoder
from utils.errors import V2LError

LOCAL_CODEBOOKS = ("clip", "random", "trained")
CLIP_PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class TokenizerConfig:
    """Architecture and quantiser settings (paper defaults). D, V and M are set from the codebooks."""
    resolution: int = 128             # input/output image size
    ch: int = 128                     # base channels (a multiple of 32: GroupNorm(32))
    ch_mult: tuple = (1, 2, 2, 4)     # channel multiplier per level; grid = resolution / 2^(levels-1)
    num_res_blocks: int = 2           # residual blocks per encoder level (decoder: one more)
    z_channels: int = 256             # encoder output channels
    embed_dim: int = 768              # D: CLIP embedding dimension (from the codebooks)
    n_local: int = 32000              # V: local codebook rows (from the codebook)
    n_global: int = 11908             # M: filtered global entries (from the global codebook)
    global_topk: int = 21             # k: global tokens per image
    cross_heads: int = 8              # decoder cross-attention heads
    cross_head_dim: int = 512         # decoder cross-attention head dimension
    beta: float = 0.33                # weight of the codebook term of the VQ loss
    entropy_weight: float = 0.0       # code-usage entropy penalty added to the VQ loss (0: the authors')
    entropy_temperature: float = 0.01  # its soft-assignment temperature (squared-distance units)
    global_metric: str = "l2"         # global-token rule: "l2" (the authors') or "cosine"
    # the authors' ablations (defaults: the paper's model)
    local_codebook: str = "clip"      # "clip": frozen CLIP text embeddings of the LLM's subwords;
    #                                   "random": frozen random vectors; "trained": CLIP-initialised, trained
    projector: bool = True            # the trainable Linear(D, D) on the local codebook (False: none)
    cross_attention: bool = True      # the decoder attends to the global tokens (False: it does not)
    cross_residual: bool = False      # the attention's output is added to the features (the authors': replaces them)
    cross_null: bool = False          # a learned null key (zero value) in that attention (not the authors')
    clip_spec: str = "ViT-L-14"       # CLIP to rebuild on load (models.clip.load_clip spec)
    clip_pretrained: str | None = None  # its weights file, if the spec is an architecture name
    clip_precision: str = "fp32"      # how CLIP ran in training: fp32, fp16 (fp16 weights and
    #                                   autocast: the authors') or bf16 (autocast); load_tokenizer runs it so on a GPU

    @property
    def grid(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["ch_mult"] = list(self.ch_mult)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TokenizerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise V2LError(f"unknown tokenizer setting(s) {unknown}; known: {sorted(names)}")
        values = dict(values)
        if "ch_mult" in values:
            values["ch_mult"] = tuple(values["ch_mult"])
        return cls(**values)

    def validate(self) -> None:
        if self.ch % 32:
            raise V2LError(f"tokenizer ch={self.ch}: must be a multiple of 32 "
                           "(GroupNorm with 32 groups)")
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise V2LError(f"tokenizer resolution={self.resolution} is not divisible by "
                           f"2^{len(self.ch_mult) - 1} (ch_mult={self.ch_mult})")
        if not 1 <= self.global_topk <= self.n_global:
            raise V2LError(f"global_topk={self.global_topk}: must be between 1 and the "
                           f"{self.n_global} global codebook entries")
        if self.global_metric not in ("l2", "cosine"):
            raise V2LError(f"global_metric={self.global_metric!r}: use 'l2' or 'cosine'")
        if self.local_codebook not in LOCAL_CODEBOOKS:
            raise V2LError(f"local_codebook={self.local_codebook!r}: use one of {LOCAL_CODEBOOKS}")
        if self.clip_precision not in CLIP_PRECISIONS:
            raise V2LError(f"clip_precision={self.clip_precision!r}: use one of {CLIP_PRECISIONS}")


def _frozen_embedding(weight: torch.Tensor) -> nn.Embedding:
    emb = nn.Embedding(weight.shape[0], weight.shape[1])
    emb.weight.data = weight.detach().float().clone()
    emb.weight.requires_grad_(False)
    return emb


class V2LTokenizer(nn.Module):
    """Encoder, local and global quantisers, and decoder of the V2L tokenizer.

    ``clip`` (frozen, not part of the state dict) is needed only for the global
    tokens of new images (``global_tokens``, ``encode``, ``forward``); decoding
    from token ids works without it.
    """

    def __init__(self, config: TokenizerConfig, local_codebook: torch.Tensor, llm_ids: torch.Tensor,
                 global_codebook: torch.Tensor, global_strings: list[str],
                 clip: ClipBundle | None = None):
        super().__init__()
        if local_codebook.ndim != 2 or global_codebook.ndim != 2:
            raise V2LError(f"codebooks must be 2-D [rows, D]; got local {tuple(local_codebook.shape)}"
                           f", global {tuple(global_codebook.shape)}")
        (v, dim), m = local_codebook.shape, global_codebook.shape[0]
        if global_codebook.shape[1] != dim:
            raise V2LError(f"global codebook dim {global_codebook.shape[1]} != local codebook dim "
                           f"{dim}; both must come from the same CLIP")
        if tuple(llm_ids.shape) != (v,):
            raise V2LError(f"llm_ids has shape {tuple(llm_ids.shape)}, expected ({v},): one LLM id "
                           "per local codebook row")
        if len(global_strings) != m:
            raise V2LError(f"{len(global_strings)} global strings for {m} global codebook entries")
        config = dataclasses.replace(config, embed_dim=dim, n_local=v, n_global=m)
        config.validate()
        self.config = config
        self.encoder = Encoder(config.ch, config.ch_mult, config.num_res_blocks, config.z_channels)
        self.decoder = Decoder(config.ch, config.ch_mult, config.num_res_blocks, config.z_channels,
                               context_dim=dim, cross_heads=config.cross_heads,
                               cross_head_dim=config.cross_head_dim,
                               cross_attention=config.cross_attention,
                               cross_residual=config.cross_residual,
                               cross_null=config.cross_null)
        self.quant_conv = nn.Conv2d(config.z_channels, dim, 1)
        self.post_quant_conv = nn.Conv2d(dim, config.z_channels, 1)
        self.tok_embeddings = _frozen_embedding(local_codebook)
        self.tok_embeddings.weight.requires_grad_(config.local_codebook == "trained")
        if config.projector:
            self.codebook_projection = nn.Linear(dim, dim)
            nn.init.normal_(self.codebook_projection.weight, std=dim ** -0.5)
        else:
            self.codebook_projection = nn.Identity()
        self.tok_embeddings_global = _frozen_embedding(global_codebook)
        self.register_buffer("llm_ids", llm_ids.detach().long().clone())
        self.strings = list(global_strings)
        self._codes, self._codes_key = None, None     # projected_codebook() cache (inference)
        self._inverse, self._inverse_key = None, None  # rows_from_llm_ids() table
        self.clip = None
        self.attach_clip(clip)

    # ----- CLIP ---------------------------------------------------------------------------
    def attach_clip(self, clip: ClipBundle | None) -> None:
        """Use ``clip`` for the global tokens (its embedding dim must be the codebooks' D)."""
        if clip is not None and clip.embed_dim != self.config.embed_dim:
            raise V2LError(f"CLIP {clip.ident} embeds in {clip.embed_dim} dims but the codebooks "
                           f"have D={self.config.embed_dim}; use the CLIP that made the codebooks")
        self.clip = clip

    # ----- ids ----------------------------------------------------------------------------
    def rows_from_llm_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """LLM token ids -> local codebook rows (same shape); ids outside the codebook are refused
        (a check that reads the device: training takes the rows from ``forward`` instead)."""
        ids = torch.as_tensor(ids, device=self.llm_ids.device).long()
        inverse = self._inverse_ids()
        rows = inverse[ids.clamp(-1, len(inverse) - 1)]     # -1 and too-large ids hit a -1 slot
        bad = rows < 0
        if bad.any():
            raise V2LError(f"{int(bad.sum())} token id(s) (e.g. {int(ids[bad][0])}) are not in the "
                           f"local codebook of {len(self.llm_ids)} LLM tokens; local tokens must be "
                           "ids the tokenizer can emit")
        return rows

    def _inverse_ids(self) -> torch.Tensor:
        """LLM id -> codebook row (-1: none), with a trailing -1 slot; built once per ``llm_ids``
        tensor (its size needs the largest id, read from the device)."""
        ids = self.llm_ids
        key = (ids.data_ptr(), ids._version, ids.device)
        if self._inverse_key != key:
            inverse = torch.full((int(ids.max()) + 2,), -1, dtype=torch.long, device=ids.device)
            inverse[ids] = torch.arange(len(ids), device=ids.device)
            self._inverse, self._inverse_key = inverse, key
        return self._inverse

    def llm_ids_from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.llm_ids[torch.as_tensor(rows, device=self.llm_ids.device).long()]

    def global_strings(self, global_idx: torch.Tensor) -> list[list[str]]:
        """Global token indices [B, k] -> their strings, per image."""
        return [[self.strings[i] for i in row] for row in torch.as_tensor(global_idx).tolist()]

    # ----- the model ----------------------------------------------------------------------
    def projected_codebook(self) -> torch.Tensor:
        """The local codes the encoder is quantised to: [V, D] (differentiable when grad is on).

        In eval mode without autograd the result is cached (V x D x D multiply-adds
        saved per batch) until the mode changes or the weights are loaded or moved.
        Training mode never caches (fused optimisers update weights invisibly).
        """
        weight, proj = self.tok_embeddings.weight, self.codebook_projection
        if torch.is_grad_enabled() or self.training:
            return proj(weight)
        key = tuple((t.data_ptr(), t._version) for t in (weight, *proj.parameters()))
        if self._codes_key != key:
            with torch.autocast(weight.device.type, enabled=False):
                self._codes = proj(weight).detach()   # (not a Parameter when proj is Identity)
            self._codes_key = key
        return self._codes

    def train(self, mode: bool = True) -> "V2LTokenizer":
        self._codes, self._codes_key = None, None
        return super().train(mode)

    def project_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Projected codes of some codebook rows: [...] -> [..., D] (row-wise, so exactly
        ``projected_codebook()[rows]``, at the cost of the rows used only)."""
        return self.codebook_projection(self.tok_embeddings(rows))

    def quantize(self, z: torch.Tensor):
        """Normalised features [B, D, g, g] -> (z_q straight-through, vq_loss, rows [B, g, g]).

        In float32 also under autocast: in bf16 (8 bits of mantissa) or fp16 the projected
        codes and the features lose the differences that decide the nearest code."""
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            with torch.no_grad():
                codes = self.projected_codebook()
            z_q, loss, rows = vector_quantize(z, codes, self.config.beta, lookup=self.project_rows)
            if self.config.entropy_weight and torch.is_grad_enabled():
                flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                loss = loss + self.config.entropy_weight * code_entropy_loss(
                    flat, codes, self.config.entropy_temperature)
        return z_q, loss, rows

    def encode_features(self, x128: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] in [-1, 1] -> L2-normalised features [B, D, grid, grid]."""
        return F.normalize(self.quant_conv(self.encoder(x128)).float(), dim=1)

    def global_tokens(self, x_clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-normalised images -> (global_idx [B, k] long, global_emb [B, k, D])."""
        if self.clip is None:
            raise V2LError("global tokens need the CLIP image tower: pass clip= when building or "
                           "loading the tokenizer (or attach_clip)")
        weight = self.tok_embeddings_global.weight
        emb = self.clip.encode_images(x_clip).to(weight.device)
        idx = topk_nearest(emb, weight, self.config.global_topk, self.config.global_metric)
        return idx, self.global_embeddings(idx)

    def global_embeddings(self, global_idx: torch.Tensor) -> torch.Tensor:
        """Global token indices [B, k] -> their codebook embeddings [B, k, D] (what the decoder
        attends to: a function of the indices alone, the global codebook being frozen)."""
        weight = self.tok_embeddings_global.weight
        return F.embedding(global_idx.to(weight.device).long(), weight)

    def _decode(self, z_q: torch.Tensor, global_emb: torch.Tensor) -> torch.Tensor:
        context = None if global_emb is None else global_emb.to(z_q.dtype)
        return self.decoder(self.post_quant_conv(z_q), context)

    def forward(self, x128: torch.Tensor, x_clip: torch.Tensor | None = None,
                global_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training pass -> rec [B, 3, R, R] (unclamped), vq_loss, local_ids [B, g, g] (LLM ids),
        rows [B, g, g] (their codebook rows), global_idx [B, k].

        The global tokens come from CLIP on ``x_clip``, or are given as ``global_idx`` (the
        indices CLIP gave these images before: the same decoder input without running CLIP)."""
        if global_idx is None:
            if x_clip is None:
                raise V2LError("the training pass needs CLIP's view of the images (x_clip) or "
                               "their global token indices (global_idx)")
            global_idx, global_emb = self.global_tokens(x_clip)
        else:
            global_idx = global_idx.to(self.llm_ids.device).long()
            global_emb = self.global_embeddings(global_idx)
        z_q, vq_loss, rows = self.quantize(self.encode_features(x128))
        return {"rec": self._decode(z_q, global_emb), "vq_loss": vq_loss,
                "local_ids": self.llm_ids[rows], "rows": rows, "global_idx": global_idx}

    @torch.no_grad()
    def local_tokens(self, x128: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] in [-1, 1] -> local LLM token ids [B, grid, grid] (no CLIP needed)."""
        _, _, rows = self.quantize(self.encode_features(x128))
        return self.llm_ids[rows]

    @torch.no_grad()
    def encode(self, x128: torch.Tensor, x_clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (global_idx [B, k], local_ids [B, grid, grid]); local ids ARE LLM token ids."""
        return self.global_tokens(x_clip)[0], self.local_tokens(x128)

    @torch.no_grad()
    def decode(self, local_ids: torch.Tensor, global_idx: torch.Tensor | None = None,
               global_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Local LLM ids [B, g, g] + global tokens (indices or embeddings) -> images in [-1, 1]."""
        if global_emb is None and self.config.cross_attention:
            if global_idx is None:
                raise V2LError("decode needs the global tokens: pass global_idx (from encode) "
                               "or global_emb")
            global_emb = self.tok_embeddings_global(torch.as_tensor(global_idx).to(self.llm_ids.device))
        rows = self.rows_from_llm_ids(local_ids)
        z_q = self.project_rows(rows).permute(0, 3, 1, 2)
        return self._decode(z_q, global_emb).clamp(-1, 1)

    def last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight (for the adaptive GAN loss weight)."""
        return self.decoder.conv_out.weight

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Encoder, decoder, quant convs and codebook projector; the local codebook too when
        ``local_codebook`` is "trained" (the global codebook and CLIP stay frozen)."""
        parts = (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv,
                 self.codebook_projection)
        params = [p for part in parts for p in part.parameters()]
        if self.config.local_codebook == "trained":
            params.append(self.tok_embeddings.weight)
        return params
