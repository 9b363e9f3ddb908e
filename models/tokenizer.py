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

Parameter names are those of the authors' checkpoint; ``load_authors_checkpoint``
loads their released weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.clip import ClipBundle, load_clip
from models.quantizers import topk_nearest, vector_quantize
from models.vqgan import Decoder, Encoder
from utils.artifacts import load_json, load_tensors, read_manifest, require_input, save_torch
from utils.errors import V2LError
from utils.stages import CODEBOOK, GLOBAL

FORMAT = "v2l-tokenizer/1"
FILE_NAME = "tokenizer.pt"
# parts of the authors' checkpoint that are not the tokenizer itself
AUTHORS_DROPPED_PREFIXES = ("global_encoder.", "perceptual_loss.")
AUTHORS_DISCRIMINATOR_PREFIX = "discriminator."


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
    global_metric: str = "l2"         # global-token rule: "l2" (the authors') or "cosine"
    clip_spec: str = "ViT-L-14"       # CLIP to rebuild on load (models.clip.load_clip spec)
    clip_pretrained: str | None = None  # its weights file, if the spec is an architecture name

    @property
    def grid(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise V2LError(f"unknown tokenizer setting(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        if "ch_mult" in d:
            d["ch_mult"] = tuple(d["ch_mult"])
        return cls(**d)

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

    def __init__(self, cfg: TokenizerConfig, local_codebook: torch.Tensor, llm_ids: torch.Tensor,
                 global_codebook: torch.Tensor, global_strings: list[str],
                 clip: ClipBundle | None = None):
        super().__init__()
        if local_codebook.ndim != 2 or global_codebook.ndim != 2:
            raise V2LError(f"codebooks must be 2-D [rows, D]; got local {tuple(local_codebook.shape)}"
                           f", global {tuple(global_codebook.shape)}")
        (v, d), m = local_codebook.shape, global_codebook.shape[0]
        if global_codebook.shape[1] != d:
            raise V2LError(f"global codebook dim {global_codebook.shape[1]} != local codebook dim {d}; "
                           "both must come from the same CLIP")
        if tuple(llm_ids.shape) != (v,):
            raise V2LError(f"llm_ids has shape {tuple(llm_ids.shape)}, expected ({v},): one LLM id "
                           "per local codebook row")
        if len(global_strings) != m:
            raise V2LError(f"{len(global_strings)} global strings for {m} global codebook entries")
        cfg = dataclasses.replace(cfg, embed_dim=d, n_local=v, n_global=m)
        cfg.validate()
        self.config = cfg
        self.encoder = Encoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels)
        self.decoder = Decoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels,
                               context_dim=d, cross_heads=cfg.cross_heads,
                               cross_head_dim=cfg.cross_head_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, d, 1)
        self.post_quant_conv = nn.Conv2d(d, cfg.z_channels, 1)
        self.tok_embeddings = _frozen_embedding(local_codebook)
        self.codebook_projection = nn.Linear(d, d)
        nn.init.normal_(self.codebook_projection.weight, std=d ** -0.5)
        self.tok_embeddings_global = _frozen_embedding(global_codebook)
        self.register_buffer("llm_ids", llm_ids.detach().long().clone())
        self.strings = list(global_strings)
        self._codes, self._codes_key = None, None     # projected_codebook() cache (inference)
        self.clip = None
        self.attach_clip(clip)

    # ----- construction, saving, loading ---------------------------------------------------
    def attach_clip(self, clip: ClipBundle | None) -> None:
        """Use ``clip`` for the global tokens (its embedding dim must be the codebooks' D)."""
        if clip is not None and clip.embed_dim != self.config.embed_dim:
            raise V2LError(f"CLIP {clip.ident} embeds in {clip.embed_dim} dims but the codebooks "
                           f"have D={self.config.embed_dim}; use the CLIP that made the codebooks")
        self.clip = clip

    @classmethod
    def from_artifacts(cls, codebook_dir, global_dir, clip: ClipBundle | None,
                       **cfg_overrides) -> "V2LTokenizer":
        """A fresh tokenizer on the codebooks of step 2 (``codebook/``) and step 3 (``global/``)."""
        cb = read_manifest(codebook_dir, CODEBOOK)
        gl = read_manifest(global_dir, GLOBAL)
        require_input(gl, "codebook", cb, f"global codebook {global_dir}")
        local = _read_tensors(Path(codebook_dir) / "local_codebook.safetensors",
                              ("embeddings", "llm_ids"))
        glob = _read_tensors(Path(global_dir) / "global_codebook.safetensors", ("embeddings",))
        strings = load_json(Path(global_dir) / "global_strings.json").get("strings")
        if strings is None:
            raise V2LError(f"{global_dir}/global_strings.json has no 'strings' list; "
                           "rerun step3_codebook_filtering.py")
        made_with = cb.get("config", {})
        cfg_overrides.setdefault("clip_spec", made_with.get("clip", TokenizerConfig.clip_spec))
        cfg_overrides.setdefault("clip_pretrained", made_with.get("clip_pretrained"))
        if clip is not None and cb.get("info", {}).get("clip") not in (None, clip.ident):
            print(f"warning: the codebook was embedded with CLIP {cb['info']['clip']}, the "
                  f"global tokens will use {clip.ident}", file=sys.stderr)
        return cls(TokenizerConfig.from_dict(cfg_overrides), local["embeddings"], local["llm_ids"],
                   glob["embeddings"], strings, clip)

    def save(self, path) -> Path:
        """Write a self-contained tokenizer (config, weights, codebooks, strings) atomically.

        ``path`` is a ``.pt`` file or a directory (then ``<dir>/tokenizer.pt``).
        """
        path = Path(path)
        if path.suffix != ".pt":
            path = path / FILE_NAME
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        save_torch(path, {"format": FORMAT, "config": self.config.to_dict(), "state_dict": state,
                          "global_strings": self.strings})
        return path

    @classmethod
    def load(cls, path, clip: ClipBundle | None = None, device="cpu",
             allow_unsafe_clip: bool = False) -> "V2LTokenizer":
        """Load a saved tokenizer (a ``.pt`` file or a directory holding ``tokenizer.pt``).

        Without ``clip``, the CLIP named in its config is loaded (``allow_unsafe_clip``
        as in ``load_clip`` for OpenAI TorchScript files).
        """
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        if not path.is_file():
            raise V2LError(f"{path}: tokenizer not found; train one with step4_train_tokenizer.py "
                           "or give the tokenizer directory / .pt file")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise V2LError(f"{path}: not a readable tokenizer file ({str(e).splitlines()[0]})")
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise V2LError(f"{path}: not a V2L tokenizer file (format {FORMAT} expected); for the "
                           "authors' released checkpoint use V2LTokenizer.load_authors_checkpoint")
        try:
            cfg = TokenizerConfig.from_dict(payload["config"])
            sd = payload["state_dict"]
            model = cls(cfg, sd["tok_embeddings.weight"], sd["llm_ids"],
                        sd["tok_embeddings_global.weight"], payload["global_strings"])
            model.load_state_dict(sd)
        except (KeyError, RuntimeError) as e:
            raise V2LError(f"{path}: damaged tokenizer file (weights do not match its config: "
                           f"{str(e).splitlines()[0][:200]}); save it again or retrain")
        if clip is None:
            clip = load_clip(cfg.clip_spec, cfg.clip_pretrained, device=device,
                             allow_unsafe=allow_unsafe_clip)
        model.attach_clip(clip)
        return model.to(device).eval()

    def load_authors_checkpoint(self, src) -> dict[str, torch.Tensor]:
        """Load the authors' released weights into this tokenizer; return their discriminator's.

        ``src``: a checkpoint path or an already loaded dict (with a ``model`` or
        ``state_dict`` entry, or a bare state dict). Their CLIP tower and LPIPS
        net are dropped; both codebooks are taken from the checkpoint (the
        encoder was trained against them), so its shapes must match this
        tokenizer's (build it from artifacts of the same LLM and CLIP).
        """
        model_state, disc_state = split_authors_checkpoint(src)
        own = {k: v for k, v in self.state_dict().items() if k != "llm_ids"}
        missing = sorted(set(own) - set(model_state))
        unexpected = sorted(set(model_state) - set(own))
        wrong = sorted(k for k in set(own) & set(model_state)
                       if tuple(own[k].shape) != tuple(model_state[k].shape))
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            if wrong:
                k = wrong[0]
                parts.append(f"{len(wrong)} with other shapes (e.g. {k}: checkpoint "
                             f"{list(model_state[k].shape)} vs {list(own[k].shape)})")
            raise V2LError(f"{_describe(src)}: not a V2L tokenizer checkpoint of this architecture: "
                           f"{'; '.join(parts)}; check the tokenizer settings (paper defaults) and "
                           "that the codebooks come from LLaMA-2 + CLIP ViT-L/14")
        self.load_state_dict({**model_state, "llm_ids": self.llm_ids}, strict=True)
        return disc_state

    # ----- ids ----------------------------------------------------------------------------
    def rows_from_llm_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """LLM token ids -> local codebook rows (same shape); ids outside the codebook are refused."""
        ids = torch.as_tensor(ids, device=self.llm_ids.device).long()
        inverse = torch.full((int(self.llm_ids.max()) + 2,), -1, dtype=torch.long,
                             device=self.llm_ids.device)
        inverse[self.llm_ids] = torch.arange(len(self.llm_ids), device=self.llm_ids.device)
        rows = inverse[ids.clamp(-1, len(inverse) - 1)]     # -1 and too-large ids hit a -1 slot
        bad = rows < 0
        if bad.any():
            raise V2LError(f"{int(bad.sum())} token id(s) (e.g. {int(ids[bad][0])}) are not in the "
                           f"local codebook of {len(self.llm_ids)} LLM tokens; local tokens must be "
                           "ids the tokenizer can emit")
        return rows

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
        key = tuple((t.data_ptr(), t._version) for t in (weight, proj.weight, proj.bias))
        if self._codes_key != key:
            with torch.autocast(weight.device.type, enabled=False):
                self._codes = proj(weight)
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
        """Normalised features [B, D, g, g] -> (z_q straight-through, vq_loss, rows [B, g, g])."""
        with torch.no_grad():
            codes = self.projected_codebook()
        return vector_quantize(z, codes, self.config.beta, lookup=self.project_rows)

    def encode_features(self, x128: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] in [-1, 1] -> L2-normalised features [B, D, grid, grid]."""
        return F.normalize(self.quant_conv(self.encoder(x128)), dim=1)

    def global_tokens(self, x_clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-normalised images -> (global_idx [B, k] long, global_emb [B, k, D])."""
        if self.clip is None:
            raise V2LError("global tokens need the CLIP image tower: pass clip= when building or "
                           "loading the tokenizer (or attach_clip)")
        weight = self.tok_embeddings_global.weight
        emb = self.clip.encode_images(x_clip).to(weight.device)
        idx = topk_nearest(emb, weight, self.config.global_topk, self.config.global_metric)
        return idx, F.embedding(idx, weight)

    def _decode(self, z_q: torch.Tensor, global_emb: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q), global_emb.to(z_q.dtype))

    def forward(self, x128: torch.Tensor, x_clip: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass -> rec [B, 3, R, R] (unclamped), vq_loss, local_ids [B, g, g] (LLM ids),
        global_idx [B, k]."""
        global_idx, global_emb = self.global_tokens(x_clip)
        z_q, vq_loss, rows = self.quantize(self.encode_features(x128))
        return {"rec": self._decode(z_q, global_emb), "vq_loss": vq_loss,
                "local_ids": self.llm_ids[rows], "global_idx": global_idx}

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
        if global_emb is None:
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
        """Encoder, decoder, quant convs and codebook projector (codebooks and CLIP stay frozen)."""
        parts = (self.encoder, self.decoder, self.quant_conv, self.post_quant_conv,
                 self.codebook_projection)
        return [p for part in parts for p in part.parameters()]


def _read_tensors(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        tensors = load_tensors(path)
    except Exception as e:  # noqa: BLE001 - a missing or corrupt file gets the same advice
        raise V2LError(f"{path}: unreadable ({str(e).splitlines()[0]}); rerun the stage that made it")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise V2LError(f"{path}: missing tensor(s) {missing}; rerun the stage that made it")
    return tensors


def _describe(src) -> str:
    return str(src) if isinstance(src, (str, Path)) else "checkpoint"


def split_authors_checkpoint(src) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The authors' checkpoint -> (tokenizer state dict, discriminator state dict).

    Accepts a path or a loaded dict: ``{"model": sd}``, ``{"state_dict": sd}`` or
    a bare state dict; strips a DDP ``module.`` prefix, drops their CLIP tower
    (``global_encoder.*``) and LPIPS net (``perceptual_loss.*``), and returns the
    discriminator (``discriminator.*``) with its prefix removed. Our parameter
    names are theirs, so the rest maps by identity.
    """
    if isinstance(src, (str, Path)):
        if not Path(src).is_file():
            raise V2LError(f"{src}: checkpoint file not found")
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                src_dict = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unreadable for any reason: same advice
            raise V2LError(f"{src}: cannot read as a PyTorch checkpoint ({str(e).splitlines()[0]})")
    else:
        src_dict = src
    if not isinstance(src_dict, dict):
        raise V2LError(f"{_describe(src)}: expected a dict of tensors, got {type(src_dict).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(src_dict.get(key), dict):
            src_dict = src_dict[key]
            break
    model_state, disc_state = {}, {}
    for name, value in src_dict.items():
        if not isinstance(value, torch.Tensor):
            raise V2LError(f"{_describe(src)}: entry {name!r} is not a tensor; not a state dict")
        name = name.removeprefix("module.")
        if name.startswith(AUTHORS_DROPPED_PREFIXES):
            continue
        if name.startswith(AUTHORS_DISCRIMINATOR_PREFIX):
            disc_state[name.removeprefix(AUTHORS_DISCRIMINATOR_PREFIX)] = value
        else:
            model_state[name] = value
    return model_state, disc_state
