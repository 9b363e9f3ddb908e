"""Every figure the stages write: image grids and matplotlib plots, saved atomically as PNG."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from utils.artifacts import atomic_path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=100)
    _pyplot().close(fig)


def save_image_grid(images: torch.Tensor, path, per_line: int, padding: int = 2) -> None:
    """PNG of a batch of images in [-1, 1], ``per_line`` images per row, ``padding`` px apart."""
    from torchvision.utils import save_image

    grid = images.detach().float().clamp(-1, 1).cpu() * 0.5 + 0.5
    with atomic_path(path) as tmp:
        save_image(grid, tmp, nrow=per_line, padding=padding, format="png")


def save_comparison_grid(rows: list[torch.Tensor], path, per_line: int = 8) -> None:
    """PNG of image batches in [-1, 1] shown as aligned rows (e.g. originals over
    reconstructions), ``per_line`` images wide; long batches wrap into blocks of rows."""
    n = rows[0].shape[0]
    blocks = [torch.cat([r[s:s + per_line] for r in rows]) for s in range(0, n, per_line)]
    save_image_grid(torch.cat(blocks), path, min(per_line, n))


def plot_code_histogram(counts: torch.Tensor, usage: dict, path, title: str = "local tokens") -> None:
    """Rank-frequency plot of code counts (log scale); ``usage`` (``engine.metrics.codebook_usage``)
    gives the title's usage and perplexity."""
    used = counts[counts > 0].sort(descending=True).values.double()
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    ax.plot(torch.arange(1, used.numel() + 1).numpy(), used.numpy())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("code rank")
    ax.set_ylabel("occurrences")
    ax.set_title(f"{title}: {usage['codebook_used']}/{usage['codebook_size']} used, "
                 f"perplexity {usage['codebook_perplexity']:.1f}")
    _save(fig, path)


def plot_hit_histogram(hits: torch.Tensor, min_hits: float, path) -> None:
    """Histogram of hit counts (hit candidates only, log axes) with the threshold marked."""
    hit = hits[hits > 0].double()
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    if hit.numel():
        top = float(hit.max())
        bins = torch.logspace(0, max(torch.log10(torch.tensor(top)).item(), 0.1), 50).numpy()
        ax.hist(hit.numpy(), bins=bins)
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axvline(max(min_hits, 1.0), color="red", linestyle="--",
               label=f"keep > {min_hits:g} ({int((hits > min_hits).sum())} kept)")
    ax.set_xlabel("top-k hits per candidate")
    ax.set_ylabel("candidates")
    ax.legend()
    _save(fig, path)


def save_text_gallery(image_paths: list[str], texts: list[str], path, per_line: int = 4,
                      wrap: int = 40) -> None:
    """PNG of images, each with its text underneath (e.g. generated captions and references),
    ``per_line`` images per row; long lines are wrapped at ``wrap`` characters."""
    import textwrap

    from data.images import load_rgb
    plt = _pyplot()
    n = len(image_paths)
    cols = max(1, min(per_line, n))
    rows = max(1, (n + cols - 1) // cols)
    printable = lambda t: "".join(c if c.isprintable() else "?" for c in t)  # noqa: E731
    lines = [[line for t in text.split("\n") for line in textwrap.wrap(printable(t), wrap) or [""]]
             for text in texts]
    text_h = 0.16 * max((len(x) for x in lines), default=1) + 0.1      # inches at 8 pt
    fig = plt.figure(figsize=(3.0 * cols, (2.6 + text_h) * rows))
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[2.6, text_h] * rows, hspace=0.05,
                            wspace=0.08, left=0.01, right=0.99, top=0.99, bottom=0.01)
    for i, (p, text) in enumerate(zip(image_paths, lines)):
        r, c = divmod(i, cols)
        ax = fig.add_subplot(grid[2 * r, c])
        ax.imshow(load_rgb(p))
        ax.axis("off")
        ax = fig.add_subplot(grid[2 * r + 1, c])
        ax.axis("off")
        ax.text(0, 1, "\n".join(text), va="top", ha="left", fontsize=8, family="monospace",
                transform=ax.transAxes)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # glyphs the font lacks
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_curves(series: dict, path, xlabel: str, ylabel: str, title: str = "",
                log_x: bool = False, log_y: bool = False, hline: float | None = None) -> None:
    """Line plot of named series {name: (x, y)} or {name: (x, y, lower, upper)} (a shaded
    band, e.g. a 95% interval); ``hline`` draws a dashed reference line."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for name, values in series.items():
        x, y = values[0], values[1]
        ax.plot(x, y, marker="o" if len(x) < 20 else None, label=name)
        if len(values) == 4:
            ax.fill_between(x, values[2], values[3], alpha=0.2)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--")
    if log_x:
        ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    _save(fig, path)
