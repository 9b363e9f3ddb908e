"""The VQGAN-style convolutional encoder and decoder of the V2L tokenizer.

Layout of taming-transformers' autoencoder, written out here with the same
parameter names as the authors' checkpoint (``encoder.down.0.block.0.norm1``,
``decoder.mid.cross_attn_1.to_q`` ...), so their weights load by name:

- encoder: conv_in -> per level ``num_res_blocks`` residual blocks and (except
  the last level) a stride-2 downsample -> middle (res, self-attention, res)
  -> GroupNorm, swish, conv_out to ``z_channels``;
- decoder: conv_in from ``z_channels`` -> middle (res, self-attention,
  cross-attention to the global token embeddings, res) -> per level
  ``num_res_blocks + 1`` residual blocks and (except the first level) a
  nearest-neighbour upsample -> GroupNorm, swish, conv_out to RGB.

Self-attention is only in the middle blocks: the authors' configuration asks
for attention at resolution 16 but declares resolution 256 while training at
128, so no level attention was ever built, and their checkpoint has none.
The cross-attention's output replaces the features (no residual), as in the
authors' decoder (``cross_residual=True`` adds it to them instead, the usual
transformer-block form: every spatial feature then reaches the upper levels,
not only its attention weights over the k global tokens); ``cross_attention=False``
builds the decoder without it (the authors' ablation: the global tokens then do
not reach the decoder).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that a CPU computes in float32 on a contiguous (NCHW) copy of its input.

    On a CPU, PyTorch's GroupNorm kernels for channels-last tensors and for bf16 inputs (under
    autocast) are several times slower than its float32 NCHW kernel, backward included: with
    them, bf16 autocast made step 4 no faster although its convolutions ran faster. The
    output is float32 (what autocast gives a GPU's GroupNorm) in the input's memory layout.
    Parameters and results are those of ``nn.GroupNorm``; on a GPU it is ``nn.GroupNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        layout = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                         and x.is_contiguous(memory_format=torch.channels_last)) \
            else torch.contiguous_format
        with torch.autocast("cpu", enabled=False):
            y = F.group_norm(x.to(torch.float32, memory_format=torch.contiguous_format),
                             self.num_groups, self.weight, self.bias, self.eps)
        return y.contiguous(memory_format=layout)


def group_norm(channels: int) -> nn.GroupNorm:
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def conv3x3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding)


def conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv, twice, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), conv3x3(c_in, c_out)
        self.norm2, self.conv2 = group_norm(c_out), conv3x3(c_out, c_out)
        self.nin_shortcut = conv1x1(c_in, c_out) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = conv1x1(channels, channels), conv1x1(channels, channels), \
            conv1x1(channels, channels)
        self.proj_out = conv1x1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)            # [B, HW, C], scale C^-1/2
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class CrossAttention(nn.Module):
    """Multi-head attention of spatial tokens (query_dim) to context vectors (context_dim).

    Bias-free q/k/v projections to heads x head_dim; ``to_out.0`` maps back to
    query_dim with a bias (the index 0 keeps the authors' parameter name).
    ``null_key`` (not in the authors' model): one more, learned key whose value is zero, so
    that a position can take (almost) nothing from a short context instead of a mix of it.
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int,
                 null_key: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.null_k = nn.Parameter(torch.zeros(inner)) if null_key else None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, N, query_dim], context [B, K, context_dim] -> [B, N, query_dim]."""
        def heads(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)   # [B, H, L, head_dim]
        k, v = self.to_k(context), self.to_v(context)
        if self.null_k is not None:
            k = torch.cat([k, self.null_k.to(k.dtype).expand(k.shape[0], 1, -1)], 1)
            v = torch.cat([v, v.new_zeros(v.shape[0], 1, v.shape[2])], 1)
        q, k, v = heads(self.to_q(x)), heads(k), heads(v)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class Encoder(nn.Module):
    """[B, 3, R, R] -> [B, z_channels, R / 2^(levels-1), R / 2^(levels-1)]."""

    def __init__(self, ch: int = 128, ch_mult=(1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, in_channels: int = 3):
        super().__init__()
        self.conv_in = conv3x3(in_channels, ch)
        self.down = nn.ModuleList()
        c = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(c, ch * mult))
                c = ch * mult
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(c)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = \
            ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
        self.norm_out = group_norm(c)
        self.conv_out = conv3x3(c, z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, r, r] and context [B, k, context_dim] -> [B, 3, r 2^(levels-1), ...]."""

    def __init__(self, ch: int = 128, ch_mult=(1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, context_dim: int = 768, cross_heads: int = 8,
                 cross_head_dim: int = 512, out_channels: int = 3, cross_attention: bool = True,
                 cross_residual: bool = False, cross_null: bool = False):
        super().__init__()
        self.cross_residual = cross_residual
        c = ch * ch_mult[-1]
        self.conv_in = conv3x3(z_channels, c)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(c, c), AttnBlock(c)
        if cross_attention:
            self.mid.cross_attn_1 = CrossAttention(c, context_dim, cross_heads, cross_head_dim,
                                                 null_key=cross_null)
        self.mid.block_2 = ResnetBlock(c, c)
        stages = []
        for level in reversed(range(len(ch_mult))):       # built deepest first, stored by level
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(c, ch * ch_mult[level]))
                c = ch * ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(c)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(c)
        self.conv_out = conv3x3(c, out_channels)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """``context`` is ignored (may be None) by a decoder built without cross-attention."""
        h = self.mid.attn_1(self.mid.block_1(self.conv_in(z)))
        if hasattr(self.mid, "cross_attn_1"):
            b, c, height, width = h.shape
            a = self.mid.cross_attn_1(h.flatten(2).transpose(1, 2), context)
            a = a.transpose(1, 2).reshape(b, c, height, width)
            h = h + a if self.cross_residual else a          # the authors': a replaces h
        h = self.mid.block_2(h)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one, 3x3 conv with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
