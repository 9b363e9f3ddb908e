"""Class names and CLIP prompt templates, shipped with the code (no downloads).

- ``imagenet_templates.txt``: CLIP's 80 ImageNet prompt templates ("{}" = the word).
- ``imagenet_classes.tsv``: index, wnid, and the class name as the V2L authors
  write it (underscores for spaces, e.g. ``golden_retriever``). Index order =
  sorted wnid order.
- ``mini_imagenet_test_classes.tsv``: the 20 test classes of the standard
  mini-ImageNet split, used by the few-shot benchmark.
"""
from __future__ import annotations

import csv
import re
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
WNID = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=None)
def imagenet_templates() -> tuple[str, ...]:
    lines = (HERE / "imagenet_templates.txt").read_text(encoding="utf-8").splitlines()
    return tuple(line for line in lines if line.strip())


def _read_tsv(name: str) -> list[dict]:
    with open(HERE / name, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@lru_cache(maxsize=None)
def imagenet_wnid_to_name() -> dict[str, str]:
    """wnid -> the V2L authors' raw class name (underscores kept: ``golden_retriever``)."""
    return {r["wnid"]: r["name"] for r in _read_tsv("imagenet_classes.tsv")}


def torchvision_imagenet_names() -> list[str]:
    """The 1000 names in index order from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet50_Weights
    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def mini_imagenet_test_wnids() -> list[str]:
    return [r["wnid"] for r in _read_tsv("mini_imagenet_test_classes.tsv")]


def class_name(folder: str, spaces: bool = True) -> str:
    """Name of a class folder: ImageNet wnids are looked up (the authors' raw names), other
    folder names kept. spaces: underscores become spaces ("golden retriever"); False keeps
    the raw name ("golden_retriever"), as the authors' few-shot prompts do."""
    name = imagenet_wnid_to_name().get(folder, folder) if WNID.match(folder) else folder
    return name.replace("_", " ") if spaces else name
