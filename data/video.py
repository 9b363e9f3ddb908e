"""Video clips and video question files: frames decoded with PyAV, uniformly sampled.

``read_frames(path, t)`` decodes a video file (any container and codec FFmpeg reads: mp4,
avi, mkv, webm) and returns ``t`` RGB frames sampled uniformly over it: frame i of t is
the middle frame of the i-th of t equal segments (the usual "uniform sampling" of video QA
work). A video with fewer than ``t`` frames gives its frames repeated in time order (a
segment then holds less than one frame, and two segments pick the same one); how many such
clips there were is counted (``SampleStats``) and said once by the caller.

``load_questions`` reads the three benchmarks of VoCo-LLaMA's video table in their released
layouts:

- **MSVD-QA** (``msvd``): ``{train,val,test}_qa.json``, a list of ``{"answer", "id",
  "question", "video_id"}`` with an integer ``video_id`` N, and ``youtube_mapping.txt``
  (lines ``<youtube clip name> vidN``) naming the clip file ``<youtube clip name>.avi``
  (``YouTubeClips/``).
- **MSRVTT-QA** (``msrvtt``): ``{train,val,test}_qa.json``, a list of ``{"answer",
  "category_id", "id", "question", "video_id"}``; clip N is ``videoN.mp4``.
- **ActivityNet-QA** (``activitynet``): ``{train,val,test}_q.json`` (``{"question",
  "question_id", "video_name"}``) and the matching ``*_a.json`` (``{"answer", "question_id",
  "type"}``); clip ``v_<video_name>`` (or ``<video_name>``) with any video extension.

A question whose clip is not in the video folder is skipped and counted; the demo writes
its generated clips in the MSRVTT-QA layout (``demo/video.py``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import V2LError

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
DATASETS = ("msvd", "msrvtt", "activitynet")
# what the released files' type/category numbers mean (ActivityNet-QA's README; MSRVTT-QA's
# category_id follows the question word)
ACTIVITYNET_TYPES = {0: "motion", 1: "spatial", 2: "temporal", 3: "yes/no", 4: "color",
                     5: "object", 6: "location", 7: "number", 8: "other"}
MSRVTT_CATEGORIES = {0: "what", 1: "who", 2: "how", 3: "when", 4: "where"}
CATEGORIES_FILE = "categories.json"   # beside a question file: {category id: name} (the demo's)


# ----------------------------------------------------------------------------- frames

def uniform_indices(n_frames: int, t: int) -> list[int]:
    """The middle frame of each of ``t`` equal segments of ``n_frames`` frames (in time order;
    with fewer frames than ``t``, some frames are picked twice)."""
    if n_frames < 1 or t < 1:
        raise ValueError(f"uniform_indices({n_frames}, {t})")
    return [min(n_frames - 1, int((i + 0.5) * n_frames / t)) for i in range(t)]


@dataclass
class SampleStats:
    """Clips read, and those that had fewer frames than asked (their frames repeated)."""
    clips: int = 0
    short: list[str] = field(default_factory=list)

    def note(self) -> str | None:
        if not self.short:
            return None
        return (f"{len(self.short)} of {self.clips} clips have fewer frames than asked (first: "
                f"{self.short[0]}): their frames are repeated in time order to make up the number")


def _decode(path: Path, wanted: set[int] | None, size: int | None) -> tuple[int, dict[int, Image.Image]]:
    """(number of frames decoded, {index: RGB frame} for the ``wanted`` indices)."""
    import av
    out: dict[int, Image.Image] = {}
    n = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise V2LError(f"{path}: no video stream; replace or remove the file")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if wanted is None or n in wanted:
                img = frame.to_image()       # RGB
                if size:
                    img = img.resize((size, size), Image.Resampling.BICUBIC)
                out[n] = img
            n += 1
    return n, out


def frame_count(path) -> int:
    """Frames in the video's first video stream, as its container declares them (0: unknown)."""
    import av
    with av.open(str(path)) as container:
        return int(container.streams.video[0].frames) if container.streams.video else 0


def read_frames(path, t: int, stats: SampleStats | None = None,
                size: int | None = None) -> list[Image.Image]:
    """``t`` RGB frames of the video at ``path``, sampled uniformly in time (see the module
    docstring); ``size``: each frame resized to size x size (None: as decoded). An unreadable or
    empty file is one error line naming it."""
    import av
    path = Path(path)
    try:
        declared = frame_count(path)
        wanted = set(uniform_indices(declared, t)) if declared > 0 else None
        n, frames = _decode(path, wanted, size)
        if n and declared > 0 and n != declared:     # the container's count was wrong: again
            n, frames = _decode(path, set(uniform_indices(n, t)), size)
        elif n and declared <= 0:
            frames = {i: frames[i] for i in uniform_indices(n, t)}
    except (av.error.FFmpegError, OSError, IndexError, ValueError) as e:
        raise V2LError(f"{path}: unreadable video ({type(e).__name__}: {e}); replace or remove "
                       "the file") from None
    if n == 0:
        raise V2LError(f"{path}: empty video (no frame decodes); replace or remove the file")
    if stats is not None:
        stats.clips += 1
        if n < t:
            stats.short.append(f"{path.name}: {n} frames for {t}")
    return [frames[i] for i in uniform_indices(n, t)]


def write_video(path, frames: list[np.ndarray], fps: int = 4) -> None:
    """Write RGB frames (uint8 [H, W, 3], H and W even) as an H.264 mp4 (yuv420p) through
    PyAV, atomically."""
    import av

    from utils.artifacts import atomic_path
    with atomic_path(path) as tmp:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            h, w = frames[0].shape[:2]
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            # near-lossless, so a frame read back is the frame drawn up to codec rounding
            stream.options = {"crf": "10", "preset": "veryfast"}
            for arr in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


# ----------------------------------------------------------------------------- questions

@dataclass(frozen=True)
class VideoQuestion:
    qid: str
    video: str        # the clip's file
    question: str
    answer: str
    category: str     # the question's type as the dataset names it ("" when it has none)


def _load_list(path: Path, keys: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise V2LError(f"{path}: question file not found; pass --questions_file")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise V2LError(f"{path}: not a JSON file ({e}); pass the released question file") from None
    if not isinstance(rows, list) or any(not isinstance(r, dict) or not set(keys) <= set(r)
                                         for r in rows):
        raise V2LError(f"{path}: expected a JSON list of objects with {', '.join(keys)}; is "
                       "--dataset right?")
    return rows


def _index_videos(video_dir: Path) -> dict[str, Path]:
    """file stem -> path of every video file directly in ``video_dir``."""
    if not video_dir.is_dir():
        raise V2LError(f"{video_dir}: video folder not found; pass --video_dir")
    return {p.stem: p for p in sorted(video_dir.iterdir()) if p.suffix.lower() in VIDEO_EXTS}


def _msvd_mapping(path: Path) -> dict[str, str]:
    """vidN -> youtube clip name, from youtube_mapping.txt."""
    if not path.is_file():
        raise V2LError(f"{path}: MSVD-QA's youtube_mapping.txt not found; pass --mapping_file")
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[1]] = parts[0]
    return out


def _categories(questions_file: Path, default: dict[int, str]) -> dict[int, str]:
    side = questions_file.parent / CATEGORIES_FILE
    if side.is_file():
        return {int(k): v for k, v in json.loads(side.read_text(encoding="utf-8")).items()}
    return default


def load_questions(dataset: str, questions_file, video_dir, answers_file=None,
                   mapping_file=None) -> tuple[list[VideoQuestion], list[str]]:
    """(questions whose clip is in ``video_dir``, the question ids whose clip is missing)."""
    if dataset not in DATASETS:
        raise V2LError(f"--dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    qfile, videos = Path(questions_file), _index_videos(Path(video_dir))
    out, missing = [], []

    def add(qid, stem_options, question, answer, category):
        path = next((videos[s] for s in stem_options if s in videos), None)
        if path is None:
            missing.append(str(qid))
        else:
            out.append(VideoQuestion(str(qid), str(path), str(question), str(answer), category))

    if dataset == "msvd":
        mapping = _msvd_mapping(Path(mapping_file) if mapping_file
                                else qfile.parent / "youtube_mapping.txt")
        for r in _load_list(qfile, ("answer", "id", "question", "video_id")):
            vid = f"vid{r['video_id']}"
            add(r["id"], [mapping.get(vid, vid)], r["question"], r["answer"], "")
    elif dataset == "msrvtt":
        names = _categories(qfile, MSRVTT_CATEGORIES)
        for r in _load_list(qfile, ("answer", "id", "question", "video_id")):
            cat = r.get("category_id")
            add(r["id"], [f"video{r['video_id']}"], r["question"], r["answer"],
                names.get(cat, str(cat)) if cat is not None else "")
    else:
        afile = Path(answers_file) if answers_file else qfile.with_name(
            qfile.name.replace("_q.json", "_a.json"))
        if afile == qfile:
            raise V2LError(f"{qfile}: ActivityNet-QA needs its answer file (*_a.json); pass "
                           "--answers_file")
        answers = {str(a["question_id"]): a for a in
                   _load_list(afile, ("answer", "question_id"))}
        for r in _load_list(qfile, ("question", "question_id", "video_name")):
            a = answers.get(str(r["question_id"]))
            if a is None:
                raise V2LError(f"{afile}: no answer for question {r['question_id']}; pass the "
                               "answer file of the same split")
            t = a.get("type")
            add(r["question_id"], [f"v_{r['video_name']}", str(r["video_name"])], r["question"],
                a["answer"], ACTIVITYNET_TYPES.get(t, str(t)) if t is not None else "")
    return out, missing
