"""The demo's video world: generated clips whose questions need the frames' time order.

A clip is T frames (default 8) of one plain muted background from the image world
(``demo/world.py``: its colours, shapes and drawing), written as a real H.264 mp4 through
PyAV and read back by ``data.video`` like any dataset's clip. Three kinds, as many of each:

- **direction**: one shape crosses the frame from one side to the opposite one (left to
  right, right to left, top to bottom, bottom to top), along the middle band;
- **colour**: one shape at a fixed place changes colour once, between frames 3 and 5;
- **order**: one shape is shown, then replaced by a second, different shape elsewhere.

Every clip gets two questions, one about the start and one about the end, so that a single
frame (the last one) answers half of them and no frame order answers the other half:

====================  =======================================  =============================
category              question                                 answer
====================  =======================================  =============================
direction (from)      Which side did the shape come from?      the side it started on
direction (to)        Which side did the shape go to?          the side it ended on
colour (start)        What colour was the shape at the start?  its first colour
colour (end)          What colour is the shape at the end?     its final colour
order (first)         Which shape appeared first?              the first shape's name
order (last)          Which shape appeared last?               the second shape's name
====================  =======================================  =============================

What a frame's tokens carry decides what is answerable: the demo tokenizer's global words
are the CLIP's colour and shape words, which say nothing of where a shape is; a frame's
position is only in its local tokens (where the shape's codes are in the grid), and the
135M stand-in LLM does not read positions out of 64 codes. ``engine.video.position_word``
therefore names the side the shape's local codes lie on (a demo option of the frame tokens,
``--position_words``), which makes the direction questions answerable from the tokens. The
answers are then copies of a word from the first or the last frame that shows it: what a
frozen LLM reading the frames in order can do, and what neither the last frame alone (the
start questions) nor the frames in a shuffled order (all of them) can.

The questions are in MSRVTT-QA's released layout (``{split}_qa.json``: a list of
``{"answer", "category_id", "id", "question", "video_id"}``, clip N in ``videos/videoN.mp4``)
with ``categories.json`` naming the category ids. Everything is a function of (seed, split,
clip index).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo.world import COLOURS, SHAPES, SUPERSAMPLE, _rng, background, parallel_imap, shape_polygon
from utils.artifacts import atomic_dir, is_complete, save_json, write_manifest
from utils.stages import DEMO_VIDEO
from utils.cli import configure, run_main

OUT_DIR = "out/demo/video"  # where the clips and question files go
SEED = 0  # seed of the clips
TRAIN_CLIPS = 150  # clips of the training split (two questions each), for step 6
TEST_CLIPS = 150  # clips of the test split (two questions each), for eval_video.py
FRAMES = 8  # frames per clip (T)
SIZE = 128  # frame side in pixels
FPS = 4  # frames per second of the written mp4

settings = configure(globals())
STAGE = DEMO_VIDEO

KINDS = ("direction", "colour", "order")
SIDES = ("left", "right", "top", "bottom")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# category id -> (name, question); two per kind: the start's, then the end's
CATEGORIES = {0: ("direction (from)", "Which side did the shape come from?"),
              1: ("direction (to)", "Which side did the shape go to?"),
              2: ("colour (start)", "What colour was the shape at the start?"),
              3: ("colour (end)", "What colour is the shape at the end?"),
              4: ("order (first)", "Which shape appeared first?"),
              5: ("order (last)", "Which shape appeared last?")}
START_CATEGORIES = (0, 2, 4)   # answered by no single last frame


def _draw(canvas: Image.Image, shape: str, colour: str, cx: float, cy: float, r: float,
          angle: float, rng: np.random.Generator) -> None:
    fill = np.clip(np.array(COLOURS[colour]) * rng.uniform(0.9, 1.05), 0, 255).astype(int)
    ImageDraw.Draw(canvas).polygon(shape_polygon(shape, cx, cy, r, angle), fill=tuple(fill.tolist()))


def render_clip(seed: int, split: str, index: int, t: int = 8, size: int = 128
                ) -> tuple[list[np.ndarray], str, dict[int, str]]:
    """(frames uint8 [size, size, 3] each, the clip's kind, {category id: answer})."""
    rng = _rng(seed, "video", split, index)
    kind = KINDS[index % len(KINDS)]
    n = size * SUPERSAMPLE
    bg = np.clip(background(rng, "plain", n, noise=2.0), 0, 255).astype(np.uint8)
    r = rng.uniform(0.15, 0.19) * n
    angle = rng.uniform(0, 2 * np.pi)
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    frames, answers = [], {}
    if kind == "direction":
        side = str(rng.choice(SIDES))
        across = rng.uniform(0.42, 0.58) * n          # the middle band of the other axis
        ends = (0.2 * n, 0.8 * n) if side in ("left", "top") else (0.8 * n, 0.2 * n)
        path = np.linspace(*ends, t)
        answers = {0: side, 1: OPPOSITE[side]}
    elif kind == "colour":
        change = int(rng.integers(3, 6))              # frames before the change
        second = str(rng.choice([c for c in COLOURS if c != colour]))
        cx, cy = rng.uniform(0.3, 0.7, 2) * n
        answers = {2: colour, 3: second}
    else:
        change = int(rng.integers(3, 6))
        other = str(rng.choice([s for s in SHAPES if s != shape]))
        colour2 = str(rng.choice(list(COLOURS)))
        (cx, cy), (cx2, cy2) = rng.uniform(0.3, 0.7, (2, 2)) * n
        answers = {4: shape, 5: other}
    for i in range(t):
        canvas = Image.fromarray(bg.copy())
        if kind == "direction":
            x, y = (path[i], across) if side in ("left", "right") else (across, path[i])
            _draw(canvas, shape, colour, x, y, r, angle, rng)
        elif kind == "colour":
            _draw(canvas, shape, colour if i < change else second, cx, cy, r, angle, rng)
        elif i < change:
            _draw(canvas, shape, colour, cx, cy, r, angle, rng)
        else:
            _draw(canvas, other, colour2, cx2, cy2, r, angle, rng)
        frames.append(np.asarray(canvas.resize((size, size), Image.Resampling.BOX)))
    return frames, kind, answers


def _write_clip(job: tuple) -> tuple[int, str, dict[int, str]]:
    from data.video import write_video
    out, seed, split, index, t, size, fps = job
    frames, kind, answers = render_clip(seed, split, index, t, size)
    write_video(out / "videos" / f"video{index}.mp4", frames, fps)
    return index, kind, answers


def write_video_world(out_dir, seed: int = 0, clips: dict[str, int] | None = None, t: int = 8,
                      size: int = 128, fps: int = 4, progress: bool = True) -> tuple[list[str], dict]:
    """Write ``clips`` ({split: number}, default train 150, test 150) under ``out_dir``:
    ``videos/videoN.mp4`` (ids unique over the splits), ``{split}_qa.json`` and
    ``categories.json``. Returns (the files written, a summary for the manifest)."""
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    clips = clips or {"train": 150, "test": 150}
    files, counts, start = [], {}, 0
    for split, count in clips.items():
        jobs = [(out, seed, split, start + i, t, size, fps) for i in range(count)]
        rows = []
        for index, kind, answers in parallel_imap(_write_clip, jobs, f"demo clips ({split})",
                                                  progress=progress):
            files.append(f"videos/video{index}.mp4")
            for cat, answer in sorted(answers.items()):
                rows.append({"answer": answer, "category_id": cat, "id": len(rows),
                             "question": CATEGORIES[cat][1], "video_id": index})
        save_json(out / f"{split}_qa.json", rows)
        files.append(f"{split}_qa.json")
        counts[split] = {"clips": count, "questions": len(rows)}
        start += count
    save_json(out / "categories.json", {str(k): name for k, (name, _) in CATEGORIES.items()})
    files.append("categories.json")
    info = {"splits": counts, "frames": t, "size": size, "fps": fps, "seed": seed,
            "kinds": list(KINDS), "categories": {k: v[0] for k, v in CATEGORIES.items()}}
    return files, info


def main():
    out = Path(OUT_DIR)
    if is_complete(out, STAGE):
        print(f"demo clips: complete in {out}, skipped (delete it to rebuild with other settings)")
        return
    with atomic_dir(out) as tmp:
        files, info = write_video_world(tmp, SEED, {"train": TRAIN_CLIPS, "test": TEST_CLIPS},
                                        FRAMES, SIZE, FPS)
        write_manifest(tmp, STAGE, settings, files, info=info)
    print(f"demo clips -> {out}: " + ", ".join(f"{k} {v['clips']} clips, {v['questions']} questions"
                                              for k, v in info["splits"].items()))


if __name__ == "__main__":
    run_main(main)
