"""N-way K-shot episodes for the few-shot understanding benchmark.

An episode is N classes, K support images per class and one query image of one
of the N classes. Episodes come from either

- ``generate_episodes``: drawn reproducibly from any class-folder data set. Each
  episode is drawn from its own random stream (seeded by ``seed`` and the
  episode's index), so episode i is the same whatever the number of episodes
  asked for, and the same seed always gives the same list. On ImageNet (class
  folders are wnids) the pool is the 20 mini-ImageNet test classes; or
- ``read_episode_csv``: the authors' CSV format, one episode per line listing
  image paths relative to the data root (a trailing comma is allowed); the last
  path is the query, the class of an image is its parent folder's name.

Support order: the shots are interleaved by class (one image of every class,
then the second of every class, ...), with the class order shuffled per
episode, so no class always sits next to the query. The induction line lists
the class names sorted, as the authors do. Class names are the raw ImageNet
names with underscores (``golden_retriever``, as the authors' prompts read) or,
as an option, with spaces (``spaces=True``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from data.classes import WNID, class_name, mini_imagenet_test_wnids
from data.images import scan_split
from utils.errors import V2LError


@dataclass(frozen=True)
class Episode:
    index: int
    support: tuple[tuple[str, str], ...]   # (image path, class folder) in prompt order
    query: tuple[str, str]                 # (image path, class folder)

    @staticmethod
    def name(folder: str, spaces: bool = False) -> str:
        """A class folder's name in prompts: raw (underscores) or with spaces."""
        return class_name(folder, spaces)

    def folders(self, spaces: bool = False) -> list[str]:
        """The episode's class folders, sorted by class name (the induction order)."""
        return sorted({f for _, f in self.support} | {self.query[1]},
                      key=lambda f: class_name(f, spaces))

    def names(self, spaces: bool = False) -> list[str]:
        return [class_name(f, spaces) for f in self.folders(spaces)]

    def target(self, spaces: bool = False) -> str:
        return class_name(self.query[1], spaces)

    def to_json(self) -> dict:
        return {"index": self.index, "support": [list(s) for s in self.support],
                "query": list(self.query)}


def class_pool(folders: list[str]) -> list[str]:
    """The classes episodes are drawn from: the mini-ImageNet test classes when the data
    set is ImageNet (wnid folders holding them all), otherwise every class folder."""
    mini = mini_imagenet_test_wnids()
    if folders and all(WNID.match(f) for f in folders) and set(mini) <= set(folders):
        return mini
    return list(folders)


def generate_episodes(root, n_way: int, k_shot: int, n_episodes: int, seed: int,
                      split: str | None = None, classes: list[str] | None = None) -> list[Episode]:
    """``n_episodes`` seeded episodes from the class folders of ``root/split``."""
    if n_way < 1 or k_shot < 0:
        raise V2LError(f"n_way={n_way}, k_shot={k_shot}: need at least 1 way and 0 shots")
    paths, labels, folders = scan_split(root, split)
    by_class: dict[str, list[str]] = {f: [] for f in folders}
    for p, lab in zip(paths, labels):
        by_class[folders[lab]].append(str(p))
    pool = list(classes) if classes else class_pool(folders)
    missing = [c for c in pool if c not in by_class]
    if missing:
        raise V2LError(f"{Path(root) / (split or '')}: class folders {missing[:3]} not found; "
                       "point --data_dir at a class-folder data set that holds them")
    if len(pool) < n_way:
        raise V2LError(f"{Path(root) / (split or '')}: only {len(pool)} classes for "
                       f"{n_way}-way episodes; lower --n_way")
    for c in pool:
        if len(by_class[c]) < k_shot + 1:
            raise V2LError(f"{Path(root) / (split or '') / c}: {len(by_class[c])} images, a "
                           f"{k_shot}-shot episode needs {k_shot + 1}; lower --k_shot")
    episodes = []
    for i in range(n_episodes):
        rng = random.Random(f"episode-{seed}-{i}")
        chosen = rng.sample(pool, n_way)
        query_class = rng.choice(chosen)
        shots = {c: rng.sample(by_class[c], k_shot + (c == query_class)) for c in chosen}
        query = (shots[query_class].pop(), query_class)
        rng.shuffle(chosen)
        support = tuple((shots[c][s], c) for s in range(k_shot) for c in chosen)
        episodes.append(Episode(i, support, query))
    return episodes


def swapped(episode: Episode, index: int) -> Episode:
    """The episode over the same images with its query and its class's first support image
    swapped (the same classes and order; another image to name)."""
    j = next(j for j, (_, c) in enumerate(episode.support) if c == episode.query[1])
    support = episode.support[:j] + (episode.query,) + episode.support[j + 1:]
    return Episode(index, support, episode.support[j])


def read_episode_csv(csv_path, data_root) -> list[Episode]:
    """Episodes from the authors' CSV lists (paths relative to ``data_root``; last = query)."""
    csv_path, data_root = Path(csv_path), Path(data_root)
    if not csv_path.is_file():
        raise V2LError(f"{csv_path}: episode list not found; give an existing CSV or leave "
                       "--episodes_csv empty to generate episodes")
    episodes = []
    for line_no, line in enumerate(csv_path.read_text(encoding="utf-8").splitlines(), 1):
        items = [s.strip() for s in line.split(",") if s.strip()]
        if not items:
            continue
        if len(items) < 2:
            raise V2LError(f"{csv_path}:{line_no}: an episode needs support images and a query")
        entries = []
        for rel in items:
            p = data_root / rel
            if not p.is_file():
                raise V2LError(f"{csv_path}:{line_no}: image {p} not found; point --data_dir "
                               "at the folder the CSV paths are relative to")
            entries.append((str(p), p.parent.name))
        episodes.append(Episode(len(episodes), tuple(entries[:-1]), entries[-1]))
    if not episodes:
        raise V2LError(f"{csv_path}: no episodes in the file")
    return episodes
