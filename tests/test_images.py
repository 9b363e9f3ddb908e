"""Image folders: the scandir listing gives exactly the files and order of the former
stat-per-file listing, a kept listing is never reused for a changed folder, and one loader
for all chunks gives exactly the batches of one loader per chunk."""
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from data import images
from data.images import (ChunkBatchSampler, ImageFolderDataset, class_folders, collate_skip_bad,
                         is_image, load_chunks, merge_batches, scan_split)
from data.transforms import clip_crop
from utils.artifacts import ChunkStore
from utils.errors import V2LError


# ---- the listing before os.scandir, kept as the reference ----
def _old_list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p))


def old_scan_split(root, split=None, max_per_class=None):
    folder = Path(root) / split if split else Path(root)
    class_dirs = sorted(sub for sub in folder.iterdir() if sub.is_dir() and not sub.name.startswith("."))
    paths, labels = [], []
    if class_dirs:
        classes = [class_dir.name for class_dir in class_dirs]
        for idx, class_dir in enumerate(class_dirs):
            files = _old_list_images(class_dir)[:max_per_class]
            paths += files
            labels += [idx] * len(files)
    else:
        classes, paths = [], _old_list_images(folder)
        labels = [-1] * len(paths)
    return paths, labels, classes


ODD_FILES = ["b.jpg", "A.JPEG", "a.jpeg", "c.Png", "d.webp", "e.tiff", "f.ppm", "g.gif", "h.bmp",
             ".jpg", ".hidden.jpg", "trail.", "two..jpg", "x.jpg.txt", "noext", "notes.txt",
             "Z.JPG", "ü-umlaut.jpg", "10.jpg", "9.jpg", "a b.png", "UPPER.TIF"]


def _odd_folder(folder: Path, outside: Path, folders: bool = True) -> None:
    folder.mkdir(parents=True)
    for name in ODD_FILES:
        (folder / name).write_bytes(b"x")
    (folder / "link.jpg").symlink_to(outside / "target.jpg")
    (folder / "broken.jpg").symlink_to(outside / "missing.jpg")
    if folders:        # in a class folder (in a split folder they would be class folders)
        (folder / "dir.jpg").mkdir()                      # a folder named like an image
        (folder / "nested").mkdir()
        (folder / "nested" / "deep.jpg").write_bytes(b"x")  # not read: one level only
        (folder / "dirlink.png").symlink_to(outside, target_is_directory=True)


@pytest.fixture
def odd_tree(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.jpg").write_bytes(b"x")
    root = tmp_path / "data"
    for cls in ("n02", "n01", "B-upper", "a-lower"):
        _odd_folder(root / "train" / cls, outside)
    (root / "train" / ".cache").mkdir()
    (root / "train" / ".cache" / "x.jpg").write_bytes(b"x")
    (root / "train" / "stray.jpg").write_bytes(b"x")   # beside class folders: not read
    (root / "train" / "empty").mkdir()
    _odd_folder(outside / "linked_class", outside)
    (root / "train" / "linked").symlink_to(outside / "linked_class", target_is_directory=True)
    _odd_folder(root / "flat", outside, folders=False)
    (root / "flat" / ".hidden_folder").mkdir()
    return root


@pytest.fixture(autouse=True)
def _no_kept_listings():
    images.clear_listings()
    yield
    images.clear_listings()


def test_scandir_listing_equals_the_former_listing(odd_tree, monkeypatch):
    for split, per_class in (("train", None), ("train", 3), ("flat", None)):
        new = scan_split(odd_tree, split, max_per_class=per_class)
        old = old_scan_split(odd_tree, split, max_per_class=per_class)
        assert new == old and len(new[0]) > 10 and [type(p) for p in new[0]] == [type(p) for p in old[0]]
        assert [str(p) for p in new[0]] == [str(p) for p in old[0]]
    paths, _, classes = scan_split(odd_tree, "train")
    assert classes == ["B-upper", "a-lower", "empty", "linked", "n01", "n02"]
    names = [p.name for p in paths if p.parent.name == "n01"]
    assert names == [".hidden.jpg", "10.jpg", "9.jpg", "A.JPEG", "UPPER.TIF", "Z.JPG", "a b.png",
                     "a.jpeg", "b.jpg", "c.Png", "d.webp", "e.tiff", "f.ppm", "g.gif", "h.bmp",
                     "link.jpg", "two..jpg", "ü-umlaut.jpg"]
    assert class_folders(odd_tree, "train") == classes and class_folders(odd_tree, "flat") == []
    with pytest.raises(V2LError, match="not found"):
        class_folders(odd_tree, "val")
    monkeypatch.chdir(odd_tree)                       # a relative root keeps its spelling
    assert scan_split(".", "train") == old_scan_split(".", "train")
    assert scan_split("train/n01") == old_scan_split("train/n01")


def _tree(root: Path, n_classes=3, n_files=4, age_s=60.0) -> Path:
    for c in range(n_classes):
        for f in range(n_files):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            (root / f"c{c}" / f"{f}.jpg").write_bytes(b"x")
    _age(root, age_s)
    return root


def _age(root: Path, age_s: float) -> None:
    """Set every folder's mtime back (its ctime stays: now)."""
    then = time.time() - age_s
    for d in [root] + [p for p in root.iterdir() if p.is_dir()]:
        os.utime(d, (then, then))


def _counting_scandir(monkeypatch) -> list:
    calls, real = [], os.scandir
    monkeypatch.setattr(images.os, "scandir", lambda p: calls.append(p) or real(p))
    return calls


def test_a_kept_listing_is_reused_only_while_nothing_changed(tmp_path, monkeypatch):
    root = _tree(tmp_path / "train")
    # ctimes are now: a short guard, each listing taken longer than that after a change (the
    # guard is what keeps two changes within one clock tick of the file system apart)
    monkeypatch.setattr(images, "RECENT_S", 0.05)
    time.sleep(0.1)
    calls = _counting_scandir(monkeypatch)
    first = scan_split(tmp_path, "train")
    assert len(calls) == 4
    assert scan_split(tmp_path, "train") == first and len(calls) == 4   # reused, not listed

    def changed(action):
        before = len(calls)
        action()
        time.sleep(0.1)
        out = scan_split(tmp_path, "train")
        assert len(calls) > before, "a changed folder reused a kept listing"
        assert out == old_scan_split(tmp_path, "train")
        return out

    changed(lambda: (root / "c1" / "new.jpg").write_bytes(b"x"))
    changed(lambda: (root / "c0" / "0.jpg").unlink())
    changed(lambda: (root / "c2" / "1.jpg").rename(root / "c2" / "1.png"))
    changed(lambda: (root / "c3").mkdir())
    changed(lambda: (root / "c3").rename(root / "c4"))

    def same_mtime():          # a copy that keeps the folder's mtime (rsync -t, tar): ctime moves
        st = os.stat(root / "c1")
        (root / "c1" / "kept.jpg").write_bytes(b"x")
        os.utime(root / "c1", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "kept.jpg" in [p.name for p in changed(same_mtime)[0]]


def test_recent_or_symlinked_folders_are_listed_every_time(tmp_path, monkeypatch):
    _tree(tmp_path / "train", age_s=0.0)              # changed just now: same clock tick possible
    calls = _counting_scandir(monkeypatch)
    scan_split(tmp_path, "train")
    n = len(calls)
    scan_split(tmp_path, "train")
    assert len(calls) == 2 * n
    monkeypatch.setattr(images, "RECENT_S", 0.05)
    root = _tree(tmp_path / "linked")
    (root / "c0" / "link.jpg").symlink_to(root / "c1" / "0.jpg")   # its target may change unseen
    time.sleep(0.1)
    scan_split(tmp_path, "linked")
    n = len(calls)
    scan_split(tmp_path, "linked")
    assert len(calls) == n + 4


def _image_tree(root: Path, n: int, corrupt: tuple = ()) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        if i in corrupt:
            (folder / f"{i:03d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
        else:
            Image.fromarray(rng.integers(0, 255, (12 + i % 5, 16, 3), dtype=np.uint8)).save(
                folder / f"{i:03d}.png")
    return root


def _same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["n_skipped"] == y["n_skipped"]
        for key in x:
            if key != "n_skipped":
                assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("workers", [0, 2])
def test_one_loader_gives_the_batches_of_one_loader_per_chunk(tmp_path, workers, capsys):
    ds = ImageFolderDataset(_image_tree(tmp_path, 23, corrupt=(4, 5)), "train",
                            transform=clip_crop(8))
    store = ChunkStore(tmp_path / "out", len(ds), 5, {"k": 1})
    store.save(1, {"done": torch.zeros(1)})            # a resumed run: chunk 1 is skipped
    todo = store.todo()
    assert todo == [0, 2, 3, 4]
    ours = {c: list(batches) for c, batches in load_chunks(ds, todo, store.bounds, 2, workers)}
    assert list(ours) == todo
    for c in todo:
        per_chunk = DataLoader(Subset(ds, range(*store.bounds(c))), batch_size=2,
                               num_workers=workers, collate_fn=collate_skip_bad)
        _same_batches(ours[c], list(per_chunk))
    assert sum(b["n_skipped"] for bs in ours.values() for b in bs) >= 1   # a corrupt file met


def test_a_chunk_left_half_read_does_not_shift_the_next(tmp_path):
    ds = ImageFolderDataset(_image_tree(tmp_path, 12), "train", transform=clip_crop(8))
    bounds = lambda c: (4 * c, min(12, 4 * c + 4))   # noqa: E731
    seen = {}
    for c, batches in load_chunks(ds, [0, 1, 2], bounds, 3, 1):
        seen[c] = next(batches)["index"].tolist()      # only the first batch of each
    assert seen == {0: [0, 1, 2], 1: [4, 5, 6], 2: [8, 9, 10]}


class _Pid:
    def __call__(self, image):
        return torch.tensor([os.getpid()])


def test_workers_start_once_for_all_chunks(tmp_path):
    ds = ImageFolderDataset(_image_tree(tmp_path, 16), "train", transform=_Pid())
    pids = {pid for _, batches in load_chunks(ds, range(8), lambda c: (2 * c, 2 * c + 2), 1, 2)
            for b in batches for pid in b["image"].flatten().tolist()}
    assert len(pids) == 2 and os.getpid() not in pids


def test_merged_batches_equal_one_collate(tmp_path, capsys):
    ds = ImageFolderDataset(_image_tree(tmp_path, 9, corrupt=(3,)), "train",
                            transform=lambda im: (clip_crop(8)(im), clip_crop(4)(im)))
    samples = [ds[i] for i in range(len(ds))]
    parts = [collate_skip_bad(samples[s:s + 2]) for s in range(0, len(samples), 2)]
    whole, merged = collate_skip_bad(samples), merge_batches(parts)
    assert merged["n_skipped"] == whole["n_skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(merged["image"], whole["image"]))
    assert torch.equal(merged["index"], whole["index"]) and torch.equal(merged["label"], whole["label"])
    assert merge_batches([collate_skip_bad([None])])["index"].numel() == 0


def test_sampler_refuses_a_bad_batch_size():
    with pytest.raises(V2LError, match="batch size 0"):
        ChunkBatchSampler([(0, 3)], 0)
    assert list(ChunkBatchSampler([(0, 5), (7, 9)], 2)) == [[0, 1], [2, 3], [4], [7, 8]]
