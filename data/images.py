"""Image folders in ImageNet layout, read robustly.

- ``<root>/<split>/<class>/*.JPEG``: class index = sorted folder order (for
  ImageNet that is the sorted-wnid order of the standard class index).
- A flat ``val/`` folder is read with a labels file that maps file name to
  wnid: the Kaggle ``LOC_val_solution.csv`` (``ImageId,PredictionString``) or
  a text file of ``<file name> <wnid>`` lines. Without one, labels are -1
  (fine for reconstruction).
- Any PIL mode (grayscale, CMYK, palette, 16-bit, alpha) becomes RGB. A
  corrupt or unreadable file is skipped with one warning line naming it; the
  loader's collate function drops it and counts it, so a run's summary can say
  how many were skipped.
"""
from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from utils.errors import V2LError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error, not grey pixels


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


def load_rgb(path) -> Image.Image:
    """Open any image file as 8-bit RGB (raises OSError/ValueError if unreadable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette/EXIF chatter
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return im.convert("RGB")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p))


def _read_val_labels(labels_file: Path) -> dict[str, str]:
    """File stem -> wnid from LOC_val_solution.csv or '<file> <wnid>' lines."""
    out = {}
    with open(labels_file, encoding="utf-8") as f:
        if labels_file.suffix == ".csv":
            for row in csv.DictReader(f):
                out[Path(row["ImageId"]).stem] = row["PredictionString"].split()[0]
        else:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    out[Path(parts[0]).stem] = parts[1]
    return out


def scan_split(root, split: str | None = None, labels_file=None,
               max_per_class: int | None = None) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, labels, class folder names) of ``root/split``, in a fixed order."""
    folder = Path(root) / split if split else Path(root)
    if not folder.is_dir():
        raise V2LError(f"{folder}: image folder not found; expected ImageNet layout "
                       f"<root>/{split or '.'}/<class>/<images>")
    class_dirs = sorted(sub for sub in folder.iterdir() if sub.is_dir() and not sub.name.startswith("."))
    paths, labels = [], []
    if class_dirs:
        classes = [class_dir.name for class_dir in class_dirs]
        for idx, class_dir in enumerate(class_dirs):
            files = _list_images(class_dir)[:max_per_class]
            paths += files
            labels += [idx] * len(files)
    else:
        files = _list_images(folder)
        lab = _read_val_labels(Path(labels_file)) if labels_file else {}
        classes = sorted(set(lab.values()))
        index = {c: i for i, c in enumerate(classes)}
        paths = files
        labels = [index.get(lab.get(p.stem), -1) for p in files]
    if not paths:
        raise V2LError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTS))} "
                       f"in <class>/ sub-folders or directly); point the data path at an image folder")
    return paths, labels, classes


class ImageFolderDataset(Dataset):
    """Class-folder images through ``transform`` (a PIL image -> tensor or tuple of tensors).

    An unreadable file yields None; use ``collate_skip_bad`` as the loader's collate_fn.
    """

    def __init__(self, root, split: str | None = "train", transform: Callable | None = None,
                 labels_file=None, max_per_class: int | None = None, max_images: int | None = None):
        self.paths, self.labels, self.classes = scan_split(root, split, labels_file, max_per_class)
        if max_images is not None:
            self.paths, self.labels = self.paths[:max_images], self.labels[:max_images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            image = load_rgb(path)
        except (OSError, ValueError, SyntaxError) as e:
            print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr, flush=True)
            return None
        x = self.transform(image) if self.transform else image
        return {"image": x, "label": self.labels[i], "index": i}


def collate_skip_bad(batch: list) -> dict:
    """Stack the readable samples; ``n_skipped`` counts the unreadable ones."""
    good = [b for b in batch if b is not None]
    out: dict = {"n_skipped": len(batch) - len(good)}
    if not good:
        return out | {"index": torch.empty(0, dtype=torch.long)}
    first = good[0]["image"]
    if isinstance(first, (tuple, list)):
        out["image"] = tuple(torch.stack([g["image"][j] for g in good]) for j in range(len(first)))
    else:
        out["image"] = torch.stack([g["image"] for g in good])
    out["label"] = torch.tensor([g["label"] for g in good])
    out["index"] = torch.tensor([g["index"] for g in good])
    return out
