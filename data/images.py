"""Image folders in ImageNet layout, read robustly.

- ``<root>/<split>/<class>/*.JPEG``: class index = sorted folder order (for
  ImageNet that is the sorted-wnid order of the standard class index).
- A flat ``val/`` folder is read with a labels file that maps file name to
  wnid: the Kaggle ``LOC_val_solution.csv`` (``ImageId,PredictionString``) or
  a text file of ``<file name> <wnid>`` lines. Without one, labels are -1
  (fine for reconstruction).
- Listing: one ``os.scandir`` pass per folder (the file type comes with the
  directory entry: no per-file ``stat``), in sorted name order. A process keeps
  its last listings and reuses one only while the split folder and every class
  folder keep their identity, mtime and ctime (and none of them changed in the
  last seconds, nor holds symlinked files): a ``--sweep`` or a stage that reads
  the split twice lists it once, and a changed folder is always listed afresh.
- Loading: ``load_chunks`` serves a ChunkStore's chunks from one DataLoader
  whose workers live for the whole run, in exactly the batches that one loader
  per chunk would give.
- Any PIL mode (grayscale, CMYK, palette, 16-bit, alpha) becomes RGB. A
  corrupt or unreadable file is skipped with one warning line naming it; the
  loader's collate function drops it and counts it, so a run's summary can say
  how many were skipped.
"""
from __future__ import annotations

import csv
import itertools
import os
import sys
import time
import warnings
from collections import OrderedDict, deque
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, Sampler

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


def _is_image_name(name: str) -> bool:
    """``is_image`` on a bare name (pathlib's suffix rule: a leading dot is no suffix)."""
    i = name.rfind(".")
    return 0 < i < len(name) - 1 and name[i:].lower() in IMAGE_EXTS


def _image_names(folder: str) -> tuple[list[str], bool]:
    """(sorted names of the image files in ``folder``, whether one of them is a symlink).
    ``is_file`` follows symlinks as ``Path.is_file`` does; it costs a ``stat`` only for a
    symlink or where the file system gives no entry type."""
    names, linked = [], False
    with os.scandir(folder) as entries:
        for e in entries:
            if _is_image_name(e.name) and e.is_file():
                names.append(e.name)
                linked = linked or e.is_symlink()
    names.sort()
    return names, linked


def _children(folder: Path, names: list[str]) -> list[Path]:
    """``[folder / name for name in names]`` for entry names (one component each), built
    without parsing each name again where pathlib allows it (several times faster)."""
    child = getattr(folder, "_make_child_relpath", None)
    if child is None:
        return [folder / name for name in names]
    return [child(name) for name in names]


def _stamp(folder: str) -> tuple[int, ...]:
    st = os.stat(folder)
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns


RECENT_S = 5.0  # a folder changed less than this long before it was listed is not reused
_LISTINGS: OrderedDict = OrderedDict()  # folder -> (stamps, class names, paths per class)
_KEEP = 4  # listings a process keeps


def _class_names(folder: str) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _fresh_listing(folder: str) -> tuple[list[str], list[list[str]], list | None]:
    """(class folder names, image names per class folder or [flat image names] when there is
    none, the stamps to reuse it by or None when it must not be reused)."""
    start = time.time_ns()
    stamps = [(folder, _stamp(folder))]
    classes = _class_names(folder)
    linked = False
    per_class = []
    for name in classes or [None]:
        sub = folder if name is None else os.path.join(folder, name)
        if name is not None:
            stamps.append((sub, _stamp(sub)))
        names, link = _image_names(sub)
        per_class.append(names)
        linked = linked or link
    recent = start - int(RECENT_S * 1e9)
    reusable = not linked and all(s[2] < recent and s[3] < recent for _, s in stamps)
    return classes, per_class, stamps if reusable else None


def _listing(folder: Path) -> tuple[list[str], list[list[Path]]]:
    """The folder's listing, reused from this process while the folder and its class folders
    are unchanged (identity, mtime, ctime: adding, removing or renaming an entry changes its
    folder's mtime and ctime); symlinked files or folders changed within RECENT_S of the
    listing (a change in the same clock tick would keep the stamps) are listed every time."""
    key = str(folder)
    hit = _LISTINGS.get(key)
    if hit is not None:
        stamps, classes, per_class = hit
        try:
            if all(_stamp(path) == stamp for path, stamp in stamps):
                _LISTINGS.move_to_end(key)
                return classes, per_class
        except OSError:
            pass
        del _LISTINGS[key]
    classes, per_class, stamps = _fresh_listing(key)
    per_class = [_children(folder / name, names) for name, names in zip(classes, per_class)] \
        if classes else [_children(folder, per_class[0])]
    if stamps is not None:
        _LISTINGS[key] = (stamps, classes, per_class)
        while len(_LISTINGS) > _KEEP:
            _LISTINGS.popitem(last=False)
    return classes, per_class


def clear_listings() -> None:
    """Forget the listings this process keeps."""
    _LISTINGS.clear()


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


def _split_folder(root, split: str | None) -> Path:
    folder = Path(root) / split if split else Path(root)
    if not folder.is_dir():
        raise V2LError(f"{folder}: image folder not found; expected ImageNet layout "
                       f"<root>/{split or '.'}/<class>/<images>")
    return folder


def class_folders(root, split: str | None = None) -> list[str]:
    """The class folder names of ``root/split`` (``scan_split``'s third answer for a folder
    of class folders; [] for a flat one) from that folder's entries alone: no image is
    listed."""
    return _class_names(str(_split_folder(root, split)))


def scan_split(root, split: str | None = None, labels_file=None,
               max_per_class: int | None = None) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, labels, class folder names) of ``root/split``, in a fixed order."""
    folder = _split_folder(root, split)
    classes, per_class = _listing(folder)
    paths, labels = [], []
    if classes:
        classes = list(classes)
        for idx, files in enumerate(per_class):
            files = files[:max_per_class]
            paths += files
            labels += [idx] * len(files)
    else:
        files = list(per_class[0])
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


class ChunkBatchSampler(Sampler):
    """The index batches of each chunk ``[lo, hi)`` in turn, cut as a loader over
    ``Subset(dataset, range(lo, hi))`` with ``batch_size`` cuts them (the last batch of a chunk
    may be short; no batch spans two chunks)."""

    def __init__(self, bounds: Sequence[tuple[int, int]], batch_size: int):
        if batch_size < 1:
            raise V2LError(f"batch size {batch_size}: must be at least 1")
        self.bounds, self.batch_size = [tuple(b) for b in bounds], batch_size

    def n_batches(self, lo: int, hi: int) -> int:
        return -(-(hi - lo) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for lo, hi in self.bounds:
            for start in range(lo, hi, self.batch_size):
                yield list(range(start, min(start + self.batch_size, hi)))

    def __len__(self) -> int:
        return sum(self.n_batches(lo, hi) for lo, hi in self.bounds)


def load_chunks(dataset: Dataset, chunks: Sequence[int], bounds: Callable[[int], tuple[int, int]],
                batch_size: int, num_workers: int, pin_memory: bool = False):
    """(chunk, its batches) for each chunk in turn, every batch from ONE DataLoader: its
    workers start once and decode the next chunk's first batches while the caller still works
    on the current one. The batches are those of a ``DataLoader(Subset(dataset,
    range(*bounds(chunk))), batch_size, collate_fn=collate_skip_bad)`` per chunk, in order.
    A chunk's batches are read before the next chunk is given (the ones the caller leaves
    are skipped)."""
    chunks = list(chunks)
    sampler = ChunkBatchSampler([bounds(c) for c in chunks], batch_size)
    if not len(sampler):
        yield from ((chunk, iter(())) for chunk in chunks)
        return
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_skip_bad, pin_memory=pin_memory)
    batches = iter(loader)
    for chunk, (lo, hi) in zip(chunks, sampler.bounds):
        mine = itertools.islice(batches, sampler.n_batches(lo, hi))
        yield chunk, mine
        deque(mine, maxlen=0)


def merge_batches(batches: list[dict]) -> dict:
    """One ``collate_skip_bad`` batch of the samples of several, in order: what collating them
    all at once gives."""
    good = [b for b in batches if "image" in b]
    out: dict = {"n_skipped": sum(b["n_skipped"] for b in batches)}
    if not good:
        return out | {"index": torch.empty(0, dtype=torch.long)}
    first = good[0]["image"]
    if isinstance(first, tuple):
        out["image"] = tuple(torch.cat([b["image"][j] for b in good]) for j in range(len(first)))
    else:
        out["image"] = torch.cat([b["image"] for b in good])
    return out | {key: torch.cat([b[key] for b in good]) for key in ("label", "index")}
