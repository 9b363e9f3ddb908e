"""The offline demo world: generated, labelled images of nameable things.

Every class is a colour and a shape ("red circle", "blue star"): ordinary
words a small LLM knows, so few-shot episodes over them make sense. An image
is one shape at a random position, size and rotation, with a jittered colour,
on a muted background whose kinds a *style* sets: "textured" (smooth noise, a
gradient, stripes, a checkerboard or blotches, with pixel noise) or "smooth"
(a plain colour or a gradient, almost no pixel noise: what a tokenizer trained
for minutes on a CPU can reproduce). Everything is a pure function of (seed, split, class, index), so a
world is identical whatever order or process it is made in.

``write_world`` saves it in ImageNet layout (``train/red_circle/*.png``,
``val/...``; ``data.classes.class_name`` reads the folder as "red circle"),
with one caption per image in ``captions.json``, and a few real photographs
bundled with scikit-image in ``val_photos/`` as extra reconstruction images.
``render_pool`` makes the small in-memory images the demo CLIP is trained on.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from utils.artifacts import save_json
from utils.errors import V2LError

# base RGB of each colour word (jittered per image)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 75, 215),
    "yellow": (240, 215, 35), "purple": (135, 45, 185), "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# world style -> (background kinds, largest pixel-noise sigma in 0-255 units)
STYLES: dict[str, tuple[tuple[str, ...], float]] = {
    "textured": (("noisy", "gradient", "striped", "checkered", "blotchy"), 12.0),
    "smooth": (("plain", "gradient"), 2.0),
}
# scikit-image's bundled colour and grey photographs (no download needed)
PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket", "camera",
                           "hubble_deep_field", "immunohistochemistry", "colorwheel")
SUPERSAMPLE = 2  # shapes are drawn at this multiple of the size, then box-filtered (anti-aliasing)


def class_words(colours=None, shapes=None) -> list[str]:
    """The words naming the demo classes: colours, then shapes."""
    return list(colours or COLOURS) + list(shapes or SHAPES)


def classes(colours=None, shapes=None) -> list[tuple[str, str]]:
    """(colour, shape) of every class, colour-major."""
    return [(c, s) for c in (colours or COLOURS) for s in (shapes or SHAPES)]


def folder_name(colour: str, shape: str) -> str:
    return f"{colour}_{shape}"


def _rng(seed: int, *key) -> np.random.Generator:
    """A generator determined by the seed and a key, independent of call order."""
    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@lru_cache(maxsize=4)
def _grid(n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:n, 0:width].astype(np.float32) / n
    return x, y


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A greyish colour, lightly tinted, so the shape's colour is what stands out."""
    return np.clip(rng.uniform(45, 210) + rng.uniform(-22, 22, 3), 0, 255).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, n: int, cells: int, width: int) -> np.ndarray:
    """Noise in [0, 1] on a coarse grid, bilinearly upsampled to n x width."""
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((width, n), Image.Resampling.BILINEAR), np.float32) / 255


def check_style(style: str) -> tuple[tuple[str, ...], float]:
    if style not in STYLES:
        raise V2LError(f"world style {style!r}: expected one of {', '.join(STYLES)}")
    return STYLES[style]


def background(rng: np.random.Generator, kind: str, n: int, noise: float = 12.0,
               width: int | None = None) -> np.ndarray:
    """A muted background of the given kind with pixel noise of sigma up to ``noise``:
    float32 [n, width, 3] in [0, 255] (``width`` defaults to n)."""
    width = width or n
    a, b = _muted(rng), _muted(rng)
    x, y = _grid(n, width)
    if kind == "plain":
        t = np.zeros((n, width), np.float32)
    elif kind == "noisy":
        t = _smooth_noise(rng, n, int(rng.integers(3, 9)), width)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * x + np.sin(angle) * y
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == "striped":
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 9)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * x + np.sin(angle) * y))
    elif kind == "checkered":
        cells = int(rng.integers(3, 9))
        t = ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(np.float32)
    elif kind == "blotchy":
        t = (_smooth_noise(rng, n, int(rng.integers(4, 12)), width) > 0.5).astype(np.float32)
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    img = a + t[..., None] * (b - a)
    sigma = rng.uniform(min(2.0, noise), noise)
    return img + rng.normal(0, sigma, (n, width, 1)).astype(np.float32)


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Vertices of a shape of circumradius r centred at (cx, cy), rotated by angle (radians)."""
    if shape == "circle":
        k = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(k), np.sin(k)], 1)
    elif shape == "square":
        k = np.pi / 4 + np.arange(4) * np.pi / 2
        pts = np.stack([np.cos(k), np.sin(k)], 1)
    elif shape == "triangle":
        k = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(k), np.sin(k)], 1)
    elif shape == "star":
        k = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([np.cos(k), np.sin(k)], 1) * rad[:, None]
    elif shape == "cross":
        w = 0.34
        pts = np.array([(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                        (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]) / np.hypot(1, w)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T * r + (cx, cy)
    return [tuple(p) for p in pts]


def render(rng: np.random.Generator, colour: str, shape: str, size: int,
           style: str = "textured", width: int | None = None) -> tuple[Image.Image, str]:
    """One image of a ``colour`` ``shape`` (RGB, size high, ``width`` wide: default square)
    and its background kind."""
    kinds, noise = check_style(style)
    width = width or size
    n, w = size * SUPERSAMPLE, width * SUPERSAMPLE
    kind = kinds[int(rng.integers(len(kinds)))]
    canvas = Image.fromarray(np.clip(background(rng, kind, n, noise, w), 0, 255).astype(np.uint8))
    r = rng.uniform(0.17, 0.36) * n
    cx, cy = rng.uniform(r, (w - r, n - r))
    fill = np.clip(np.array(COLOURS[colour]) * rng.uniform(0.85, 1.08)
                   + rng.integers(-18, 19, 3), 0, 255).astype(int)
    ImageDraw.Draw(canvas).polygon(shape_polygon(shape, cx, cy, r, rng.uniform(0, 2 * np.pi)),
                                   fill=tuple(fill.tolist()))
    return canvas.resize((width, size), Image.Resampling.BOX), kind


def caption(colour: str, shape: str, kind: str) -> str:
    return f"a {colour} {shape} on a {kind} background."


def parallel_imap(fn, items: list, desc: str, workers: int | None = None, progress: bool = True):
    """``fn`` over ``items`` in order, on up to ``workers`` processes (default: the CPU count,
    at most 4); each item's result depends on the item alone, so the output does not depend
    on the number of processes. One process runs in-line."""
    workers = min(workers or os.cpu_count() or 1, 4, len(items))
    bar = dict(total=len(items), desc=desc, mininterval=2, disable=not progress)
    if workers <= 1:
        yield from tqdm(map(fn, items), **bar)
        return
    methods = multiprocessing.get_all_start_methods()    # fork: no re-import in the workers
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers) as pool:
        yield from tqdm(pool.imap(fn, items, chunksize=max(1, len(items) // (8 * workers))), **bar)


def _render_chunk(job: tuple) -> np.ndarray:
    """Images [n, 3, size, size] uint8 of pool indices [start, stop) (``render_pool``)."""
    seed, start, stop, pick, size, style = job
    return np.stack([np.asarray(render(_rng(seed, "pool", i), *pick[i - start], size, style)[0])
                     for i in range(start, stop)]).transpose(0, 3, 1, 2)


def render_pool(seed: int, n: int, size: int, colours=None, shapes=None, progress: bool = True,
                style: str = "textured") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n random images (uint8 [n, 3, size, size]) with colour and shape indices [n]."""
    cls = classes(colours, shapes)
    words_c, words_s = list(colours or COLOURS), list(shapes or SHAPES)
    pick = _rng(seed, "pool-classes").integers(len(cls), size=n)
    step = 250
    jobs = [(seed, a, min(a + step, n), [cls[int(k)] for k in pick[a:a + step]], size, style)
            for a in range(0, n, step)]
    images = torch.from_numpy(np.concatenate(list(
        parallel_imap(_render_chunk, jobs, f"demo images (x{step})", progress=progress))))
    c_idx = torch.tensor([words_c.index(cls[int(k)][0]) for k in pick])
    s_idx = torch.tensor([words_s.index(cls[int(k)][1]) for k in pick])
    return images, c_idx, s_idx


def _save_photos(out: Path, size: int) -> list[str]:
    """scikit-image's bundled photos, shortest side resized to ``size``; skipped if absent."""
    import skimage.data
    written = []
    for name in PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception as e:  # a photo that would need a download, or an old scikit-image
            print(f"warning: scikit-image photo '{name}' not available ({e}); skipped",
                  file=sys.stderr)
            continue
        img = Image.fromarray(np.asarray(arr)).convert("RGB")
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
        rel = f"val_photos/{name}.png"
        img.save(out / rel)
        written.append(rel)
    return written


def _write_image(job: tuple) -> tuple[str, str]:
    """Render and save one image of the world (``write_world``): (relative path, caption)."""
    out, seed, split, colour, shape, i, size, style, width = job
    img, kind = render(_rng(seed, split, colour, shape, i), colour, shape, size, style, width)
    rel = f"{split}/{folder_name(colour, shape)}/{i:05d}.png"
    img.save(out / rel, compress_level=1)          # fast; the pixels are the same at any level
    return rel, caption(colour, shape, kind)


def write_world(out_dir, seed: int = 0, train_per_class: int = 40, val_per_class: int = 10,
                size: int = 128, colours=None, shapes=None, photos: bool = True,
                photo_size: int = 256, style: str = "textured", wide_per_class: int = 0,
                wide_aspect: float = 1.5) -> tuple[list[str], dict]:
    """Write the demo world in ImageNet layout under out_dir.

    ``wide_per_class`` images per class also go to ``val_wide/``: ``wide_aspect`` times as
    wide as high, so that the denoising "shift" (the bottom-right instead of the centre
    square) moves the picture; in a square image the two squares are the same.

    Returns (the files written, relative to out_dir; a summary for the manifest).
    ``captions.json`` maps each image's relative path to its caption.
    """
    check_style(style)
    out = Path(out_dir)
    files, captions = [], {}
    widths = {"train": size, "val": size, "val_wide": round(size * wide_aspect)}
    counts = (("train", train_per_class), ("val", val_per_class), ("val_wide", wide_per_class))
    jobs = [(out, seed, split, c, s, i, size, style, widths[split]) for split, count in counts
            for c, s in classes(colours, shapes) for i in range(count)]
    for split, count in counts:
        for c, s in classes(colours, shapes) if count else ():
            (out / split / folder_name(c, s)).mkdir(parents=True, exist_ok=True)
    for rel, text in parallel_imap(_write_image, jobs, "demo world"):
        files.append(rel)
        captions[rel] = text
    if photos:
        (out / "val_photos").mkdir(parents=True, exist_ok=True)
        files += _save_photos(out, photo_size)
    save_json(out / "captions.json", captions)
    files.append("captions.json")
    info = {"classes": [folder_name(c, s) for c, s in classes(colours, shapes)],
            "class_words": class_words(colours, shapes), "train_per_class": train_per_class,
            "val_per_class": val_per_class, "size": size, "style": style,
            "wide_per_class": wide_per_class, "wide_aspect": wide_aspect,
            "photos": [f for f in files if f.startswith("val_photos/")]}
    return files, info
