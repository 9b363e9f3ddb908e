"""Image views: CLIP's own preprocessing, and the 128 px view the tokenizer reconstructs.

The CLIP view uses the loaded model's own settings (image size, mean, std,
interpolation), never constants: resize the shortest side (bicubic), centre
crop, normalise. The tokenizer view follows the authors: the CLIP centre crop
(before normalisation), bilinearly resized to 128 px, scaled to [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision import transforms as T

_INTERP = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


def clip_crop(size: int, interpolation: str = "bicubic") -> T.Compose:
    """PIL -> [0, 1] tensor of CLIP's centre crop (no normalisation)."""
    return T.Compose([T.Resize(size, interpolation=_INTERP[interpolation], antialias=True),
                      T.CenterCrop(size), T.ToTensor()])


def clip_normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


class ClipView:
    """PIL -> CLIP-normalised tensor, exactly CLIP's preprocessing."""

    def __init__(self, size: int, mean, std, interpolation: str = "bicubic"):
        self.crop, self.mean, self.std = clip_crop(size, interpolation), mean, std

    def __call__(self, image) -> torch.Tensor:
        return clip_normalize(self.crop(image), self.mean, self.std)


class ImageViews:
    """PIL -> (128 px image in [-1, 1], CLIP-normalised view) as the authors make them."""

    def __init__(self, clip_size: int, mean, std, interpolation: str = "bicubic",
                 out_size: int = 128):
        self.crop, self.mean, self.std = clip_crop(clip_size, interpolation), mean, std
        self.out_size = out_size

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        crop = self.crop(image)
        small = F.interpolate(crop[None], size=(self.out_size, self.out_size), mode="bilinear",
                              align_corners=False, antialias=False)[0]
        return small.clamp(0, 1) * 2 - 1, clip_normalize(crop, self.mean, self.std)
