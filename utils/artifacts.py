"""Artifacts on disk: atomic writes, manifests that chain stages, resumable chunks.

Every stage writes into its own directory a set of data files plus
``manifest.json``::

    {"stage": "vocab", "id": "<sha256>", "config": {...}, "inputs": {"vocab": {"dir": ..., "id": ...}},
     "files": {"vocab.json": {"sha256": ..., "bytes": ...}}, "code_version": ..., "created": ..., "info": {...}}

``id`` is a hash of the stage name, the ids of its inputs and the hashes of its
files: it is content-addressed, so the same data gives the same id whatever the
number of processes that made it. The next stage records that id and refuses an
input whose id differs (a codebook made from another vocabulary, say).

The manifest is written last, so a directory without one is an unfinished
stage. A finished one is *current* (``stale_reason`` is None) while its
settings equal the ones a run passes now (less ``RUN_ONLY``, which change how a
stage runs, never what it makes) and every input it was made from still holds
the artifact of the recorded id, all the way up the chain; a stage reruns
otherwise (``run_main`` in utils/cli.py, run.sh). Resume state (chunks,
training checkpoints) is keyed by ``run_key``: the same settings and the inputs
by artifact id, never by path. Long stages save fixed-size chunks as they go (``ChunkStore``); a killed
run resumes from the chunks on disk, and the chunk boundaries do not depend on
the number of ranks, so a 2-process run writes exactly what a 1-process run does.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from utils.errors import V2LError
from utils.stages import Stage, producer, stage_id

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
REPO_ROOT = Path(__file__).resolve().parent.parent
# settings that change how a stage runs, never what it makes: changing one reruns nothing
RUN_ONLY = frozenset({"out_dir", "device", "num_workers", "max_chunks", "stop_after", "log_every",
                      "save_every", "save_every_epoch", "show_top", "results_csv",
                      "block_cache_gb", "cudnn_benchmark", "tokenize_workers"})


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so that no thread sees it changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.
    The file gets the mode an ordinary ``open(path, "w")`` gives (0666 less the umask): mkstemp
    makes it 0600, which would hide artifacts from the rest of a group on a shared directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; rename it to ``path`` only if the block
    succeeds, so a directory at ``path`` is always a finished one. Refuses an existing ``path``
    (never deletes what is there)."""
    path = Path(path)
    if path.exists():
        raise V2LError(f"{path}: already exists but holds no finished artifact; delete it or "
                       "choose another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the artifact is an ordinary dir
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_json(path, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)


def save_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_tensors(path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        from safetensors.torch import save_file   # torch loads lazily: shell checks stay quick
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)


def load_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def save_torch(path, obj) -> None:
    with atomic_path(path) as tmp:
        import torch
        torch.save(obj, tmp)


def file_sha256(path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    """The git commit of this code (with '+dirty' when modified), or 'unknown' outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_manifest(out_dir, stage: Stage | str, config: dict, files: list[str],
                   inputs: dict[str, str | os.PathLike] | None = None,
                   info: dict | None = None) -> dict:
    """Hash ``files`` (relative to out_dir), record the input manifests' ids, write manifest.json last.
    ``stage`` is a utils.stages entry (or its id)."""
    out_dir, stage = Path(out_dir), stage_id(stage)
    entries = {}
    for name in files:
        p = out_dir / name
        entries[name] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    input_entries = {}
    for name, d in (inputs or {}).items():
        m = read_manifest(d)
        input_entries[name] = {"dir": str(d), "stage": m["stage"], "id": m["id"]}
    ident = hashlib.sha256(json.dumps(
        [stage, {k: v["id"] for k, v in input_entries.items()},
         {k: v["sha256"] for k, v in entries.items()}], sort_keys=True).encode()).hexdigest()
    manifest = {
        "stage": stage, "id": ident, "config": _jsonable(config), "inputs": input_entries,
        "files": entries, "code_version": code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "info": _jsonable(info or {}),
    }
    save_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(out_dir, stage: Stage | str | None = None, made_by: str | None = None) -> dict:
    """Read a finished stage's manifest, or fail with the command that makes it (``made_by``,
    else the stage's script in utils/stages.py)."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if stage is not None:
        made_by, stage = made_by or producer(stage), stage_id(stage)
    fix = f"; run {made_by} first" if made_by else ""
    if not out_dir.is_dir():
        raise V2LError(f"{out_dir}: directory not found{fix}")
    if not path.is_file():
        raise V2LError(f"{out_dir}: no finished artifact here ({MANIFEST} missing){fix}")
    try:
        manifest = load_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise V2LError(f"{path}: unreadable manifest ({e}); delete the directory and rerun its stage")
    if stage is not None and manifest.get("stage") != stage:
        raise V2LError(f"{out_dir}: holds a '{manifest.get('stage')}' artifact, expected '{stage}'"
                       f"{fix or ''}")
    for name, entry in manifest.get("files", {}).items():
        p = out_dir / name
        if not p.is_file() or p.stat().st_size != entry["bytes"]:
            raise V2LError(f"{p}: missing or truncated (manifest says {entry['bytes']} bytes); "
                           f"delete {out_dir} and rerun its stage")
    return manifest


def require_input(manifest: dict, name: str, expected: dict, what: str) -> None:
    """Check that ``manifest`` was made from the artifact whose manifest is ``expected``."""
    got = manifest.get("inputs", {}).get(name, {}).get("id")
    if got != expected["id"]:
        raise V2LError(
            f"{what} was made from a different {name} artifact (id {str(got)[:12]} vs "
            f"{expected['id'][:12]}); rebuild it from the same {name} or pass the matching one")


def finished_inputs(**dirs) -> dict:
    """The given input directories that hold a manifest (a bare checkpoint file has none), for
    ``write_manifest(inputs=...)``."""
    return {name: d for name, d in dirs.items() if (Path(d) / MANIFEST).is_file()}


def artifact_id(path) -> str:
    """The identity of an input: the manifest id of the finished artifact at ``path`` (a stage
    directory, or a file directly inside one); for a file or folder without a manifest (a
    tokenizer.pt saved by hand), a hash of its content."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path.is_file() and (path.parent / MANIFEST).is_file()):
        return read_manifest(path if path.is_dir() else path.parent)["id"]
    if path.is_file():
        return "sha256:" + file_sha256(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(f"{p.relative_to(path)}:{file_sha256(p)}\n".encode())
        return "sha256:" + h.hexdigest()
    raise V2LError(f"{path}: not found")


def _input_path(config: dict, name: str, recorded: str) -> str:
    """Where a run with ``config`` reads input ``name``: its ``<name>_dir`` (or ``<name>``)
    setting, else the directory the manifest recorded."""
    return str(config.get(f"{name}_dir", config.get(name, recorded)))


def result_settings(config: dict, input_names) -> dict:
    """The settings that decide what a stage makes: all but the run-only ones and the input
    paths (inputs are compared by artifact id instead)."""
    drop = RUN_ONLY | set(input_names) | {f"{n}_dir" for n in input_names}
    return _jsonable({k: v for k, v in config.items() if k not in drop})


def run_key(config: dict, **inputs) -> dict:
    """A resume key (chunk folders, training checkpoints, answer logs): the result settings of
    ``config`` and each input (name=path) by artifact id. Same key, same results."""
    return {"settings": result_settings(config, inputs),
            "inputs": {name: artifact_id(path) for name, path in sorted(inputs.items())}}


def changed_settings(old: dict, new: dict, limit: int = 4) -> str:
    """'lr: 0.0005 there, 0.001 now; ...' for the keys whose values differ."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = "; ".join(f"--{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in keys[:limit])
    return shown + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def broken_chain(manifest: dict, seen: set | None = None) -> str | None:
    """None when every input a manifest records (and theirs, up the chain) still holds the
    artifact of the recorded id; else which one does not."""
    seen = set() if seen is None else seen
    for name, entry in manifest.get("inputs", {}).items():
        if entry["dir"] in seen:
            continue
        seen.add(entry["dir"])
        try:
            now = read_manifest(entry["dir"])
        except V2LError:
            return f"its input '{name}' ({entry['dir']}) is gone or unfinished"
        if now["id"] != entry["id"]:
            return (f"its input '{name}' ({entry['dir']}) was rebuilt (id {entry['id'][:12]} -> "
                    f"{now['id'][:12]})")
        upstream = broken_chain(now, seen)
        if upstream:
            return f"its input '{name}' is out of date: {upstream}"
    return None


def stale_reason(out_dir, stage: Stage | str, config: dict) -> str | None:
    """None when ``out_dir`` holds a current artifact of ``stage`` for the settings ``config``
    (the rules in the module docstring); otherwise why it must be (re)made."""
    try:
        manifest = read_manifest(out_dir, stage)
    except V2LError as e:
        return str(e)
    inputs = manifest.get("inputs", {})
    old_settings = result_settings(manifest.get("config", {}), inputs)
    new_settings = result_settings(config, inputs)
    if old_settings != new_settings:
        return f"settings changed ({changed_settings(old_settings, new_settings)})"
    for name, entry in inputs.items():
        path = _input_path(config, name, entry["dir"])
        try:
            if artifact_id(path) != entry["id"]:
                return f"input '{name}' ({path}) holds another artifact than it was made from"
        except V2LError:
            return f"input '{name}' ({path}) is gone or unfinished"
        upstream = broken_chain(read_manifest(Path(path) if Path(path).is_dir() else Path(path).parent))
        if upstream:
            return f"input '{name}' is out of date: {upstream}"
    return None


def is_complete(out_dir, stage: Stage | str) -> bool:
    """True when out_dir holds a finished artifact of this stage (for skipping reruns)."""
    try:
        read_manifest(out_dir, stage)
        return True
    except V2LError:
        return False


CHECKPOINT_FORMAT = "v2l-training-checkpoint-v2"


def write_checkpoint(path, key: dict, state: dict) -> None:
    """A training stage's resume point (every training stage writes this one format): its
    ``state`` (weights, optimisers, counters, random streams...) under the run's ``key``
    (``run_key``), written atomically."""
    save_torch(path, {"format": CHECKPOINT_FORMAT, "key": key, "state": state})


def read_checkpoint(path, key: dict) -> dict | None:
    """The state saved at ``path`` (None when there is none), refusing one written under
    another key with one line that names what differs and how to proceed."""
    path = Path(path)
    if not path.is_file():
        return None
    import torch
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign files raise zip/pickle errors of many kinds
        raise V2LError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]}); delete it to "
                       "start over, or restore a copy")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise V2LError(f"{path}: not a training checkpoint of this code; move it away or choose "
                       "another --out_dir")
    saved = ckpt["key"]
    if saved != key:
        if saved["settings"] != key["settings"]:
            why = f"other settings ({changed_settings(saved['settings'], key['settings'])})"
        else:
            names = sorted(n for n in set(saved["inputs"]) | set(key["inputs"])
                           if saved["inputs"].get(n) != key["inputs"].get(n))
            why = f"other input artifacts ({', '.join(names)})"
        raise V2LError(f"{path}: a checkpoint of a run with {why}; rerun with those to resume "
                       f"it, or delete {path} to train anew")
    return ckpt["state"]


class ChunkStore:
    """Fixed-size chunks of a long job, saved as they finish, so a killed run resumes: the one
    resume mechanism of every stage that works through a list (vocabulary ids, images,
    episodes, questions); training stages use ``write_checkpoint``.

    Items [0, total) are cut into chunks of ``chunk_size``; chunk i belongs to rank
    i % world, so any number of ranks makes the same chunks. A chunk holds tensors
    (``save(i, {name: tensor})``, gathered by concatenation) or, with ``rows=True``, JSON
    rows (``save(i, [dict, ...])``, gathered as one list). ``key`` (``run_key``: the
    settings that change the result and the inputs by artifact id) names the chunk folder,
    so a run with other settings or other inputs never picks up stale chunks; a chunk's file
    names its item range, so a longer run of the same key reuses the finished chunks.
    """

    def __init__(self, out_dir, total: int, chunk_size: int, key: dict, rows: bool = False):
        if chunk_size < 1:
            raise V2LError(f"chunk size {chunk_size}: must be at least 1")
        self.total, self.chunk_size, self.rows = total, chunk_size, rows
        digest = hashlib.sha256(json.dumps(_jsonable(key), sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(out_dir) / f".chunks-{digest}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_chunks = (total + chunk_size - 1) // chunk_size

    def _path(self, i: int) -> Path:
        lo, hi = self.bounds(i)
        return self.dir / f"chunk{lo:09d}-{hi:09d}.{'jsonl' if self.rows else 'safetensors'}"

    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.chunk_size, min(self.total, (i + 1) * self.chunk_size)

    def done(self, i: int) -> bool:
        return self._path(i).is_file()

    def todo(self, rank: int = 0, world: int = 1) -> list[int]:
        return [i for i in range(rank, self.n_chunks, world) if not self.done(i)]

    def n_done(self) -> int:
        return sum(self.done(i) for i in range(self.n_chunks))

    def save(self, i: int, data) -> None:
        if not self.rows:
            save_tensors(self._path(i), data)
            return
        with atomic_path(self._path(i)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in data)

    def load(self, i: int):
        if not self.rows:
            return load_tensors(self._path(i))
        with open(self._path(i), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def gather(self):
        missing = [i for i in range(self.n_chunks) if not self.done(i)]
        if missing:
            raise V2LError(f"{self.dir}: {len(missing)} of {self.n_chunks} chunks missing; "
                           "rerun the same command to finish them")
        parts = [self.load(i) for i in range(self.n_chunks)]
        if self.rows:
            return [row for part in parts for row in part]
        import torch
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def cleanup(self) -> None:
        """Remove the chunks once the job's result is written, and those of any other key left
        in the same directory (a run killed under other settings): they can no longer be used."""
        for folder in self.dir.parent.glob(".chunks-*"):
            shutil.rmtree(folder, ignore_errors=True)
