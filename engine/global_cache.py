"""Each training image's global token indices, computed by CLIP once and reused (step 4).

An image's global tokens are the k nearest entries of the frozen global codebook to the
frozen CLIP's embedding of its centre crop (data/transforms.py ``ImageViews``: resize,
centre crop, no random augmentation). Nothing in them changes during training, so the
tokenizer's training pass takes them from here after the first time an image is seen
instead of running CLIP ViT-L/14 again, twice per iteration (the generator's forward and
the discriminator step's fresh forward), for 100 epochs.

The cache holds integers only: k indices per image (int16 when the global codebook has at
most 32768 entries), e.g. 1.28M ImageNet images x 21 x 2 bytes = 54 MB per process, plus
one flag byte per image.

- ``lookup``: the indices of a batch when every image of it is filled (else None: the batch
  runs CLIP, as without the cache, and ``add`` keeps what CLIP gave).
- ``add`` queues the device tensor; ``flush`` stores the queued ones (a copy to the host,
  done where the host waits for the device anyway: logging steps, epoch ends, checkpoints).
- ``sync``: under DDP each process sees its own share of the images per epoch; the
  indices each filled since the last sync are exchanged, so that from the second epoch on
  no process runs CLIP (a collective: every rank calls it, at epoch ends and checkpoints).
- ``state_dict`` / ``load_state_dict``: saved in the training checkpoint under the cache's
  ``ident`` (the images' paths, CLIP, k, metric and global codebook); a checkpoint of other
  images is not loaded (the cache then fills anew).

CLIP's indices for an image do not depend on the batch it ran in where CLIP's per-image
computation does not (a float32 CPU run: tested equal, tests/test_step4.py); on a GPU the
kernels chosen for a batch may round the embedding differently in its last bits, which
can swap the k-th and (k+1)-th nearest entry only where their distances tie to that
precision: the cache then keeps the first answer, a recomputation would give either.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from utils import dist


def cache_ident(paths, clip_ident: str, topk: int, metric: str,
                global_codebook: torch.Tensor) -> str:
    """What the cached indices are a function of: the images (their paths, in dataset
    order), the CLIP, k, the metric and the global codebook's values."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode("utf-8", "surrogateescape") + b"\0")
    h.update(f"{clip_ident}\0{topk}\0{metric}\0".encode())
    h.update(global_codebook.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class GlobalTokenCache:
    """k global token indices per dataset index, filled on first use."""

    def __init__(self, n_images: int, topk: int, n_global: int, ident: str = ""):
        dtype = np.int16 if n_global <= 2 ** 15 else np.int32
        self.idx = np.zeros((n_images, topk), dtype=dtype)
        self.filled = np.zeros(n_images, dtype=bool)
        self.ident = ident
        self._pending: list[tuple[np.ndarray, torch.Tensor]] = []   # (indices, device ids)
        self._new: list[np.ndarray] = []       # dataset indices stored since the last sync
        self.hits = self.misses = 0            # batches served / batches that ran CLIP

    def __len__(self) -> int:
        return len(self.filled)

    def lookup(self, index: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """The [B, k] long indices of dataset images ``index`` on ``device``, or None when
        one of them is not cached yet."""
        rows = np.asarray(index, dtype=np.int64)
        if len(rows) == 0 or not self.filled[rows].all():
            self.misses += 1
            return None
        self.hits += 1
        ids = torch.from_numpy(self.idx[rows])
        if device.type == "cuda":
            ids = ids.pin_memory()
        return ids.to(device, non_blocking=True).long()

    def add(self, index: torch.Tensor, global_idx: torch.Tensor) -> None:
        """Queue CLIP's indices of dataset images ``index`` (stored at the next ``flush``)."""
        rows = np.asarray(index, dtype=np.int64)
        self._pending.append((rows, global_idx.detach().to("cpu", non_blocking=True)))

    def flush(self) -> None:
        """Store the queued indices (an image filled before keeps its first indices)."""
        if not self._pending:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()           # the queued copies to the host are done
        for rows, ids in self._pending:
            self._store(rows, ids.numpy())
        self._pending = []

    def _store(self, rows: np.ndarray, ids: np.ndarray) -> None:
        new = ~self.filled[rows]
        rows, ids = rows[new], ids[new]
        rows, first = np.unique(rows, return_index=True)   # a padded epoch repeats images
        self.idx[rows] = ids[first]
        self.filled[rows] = True
        self._new.append(rows)

    def sync(self, ddp: dist.Dist) -> None:
        """Exchange the indices every process filled since the last sync (a collective)."""
        self.flush()
        rows = np.concatenate(self._new) if self._new else np.zeros(0, dtype=np.int64)
        self._new = []
        if not ddp.active:
            return
        mine = (rows, self.idx[rows])
        dist.barrier(ddp, "the other ranks to share their global tokens")
        for r, (their_rows, their_ids) in enumerate(dist.all_gather_objects(mine, ddp)):
            if r != ddp.rank:
                self._store(their_rows, their_ids)
        self._new = []                         # what came from the others is shared already

    def state_dict(self) -> dict:
        self.flush()
        return {"ident": self.ident, "idx": torch.from_numpy(self.idx.copy()),
                "filled": torch.from_numpy(self.filled.copy())}

    def load_state_dict(self, state: dict) -> bool:
        """Take the saved indices when they were made from the same images and codebook
        (True); else keep this cache as it is (False)."""
        if state.get("ident") != self.ident or tuple(state["idx"].shape) != self.idx.shape:
            return False
        self.idx = state["idx"].numpy().astype(self.idx.dtype, copy=True)
        self.filled = state["filled"].numpy().copy()
        self._pending, self._new = [], []
        return True
