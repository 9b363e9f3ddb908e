"""The demo world as LLaVA data: scenes with the shape's place recorded, written in LLaVA's files.

``demo.world.render`` draws one shape anywhere and does not keep where. A scene here is drawn
with the same pieces (``demo.world.background``, ``shape_polygon``, ``COLOURS``, the same
supersampling), but the shape is placed in a chosen quadrant of the image, clear of the
midlines (its centre at least ``MIDLINE_GAP`` of the side from them, its circumradius
``RADIUS`` of the side), so "where is the shape" has one right answer that only the image's
spatial layout gives: colour, shape and background are the same wherever the shape is.

``write_llava_world`` writes, under one folder (every image a PNG under ``images/``, every
path in the files relative to that folder):

- ``pretrain.json``: LLaVA's stage-1 caption data (the layout of ``blip_laion_cc_sbu_558k.json``):
  ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n<brief-description
  request>"}, {"from": "gpt", "value": <caption>}]}``, the placeholder before or after the request;
- ``instruct.json``: instruction data in the layout of ``llava_v1_5_mix665k.json``: per image
  a conversation of 2-4 rounds over the four question types (colour, shape, background,
  position), each question with LLaVA's short-answer instruction, ``<image>\\n`` at the start
  of the first;
- ``questions.jsonl``: the evaluation questions in LLaVA's question-file layout
  (``{"question_id", "image", "text", "category"}``) with ``answer`` and the type's
  ``options`` for ``engine.llava_bench.score_exact``; the same number of questions per type, each type's
  answers balanced over its values (every evaluation image carries one question of each type).

Everything is a pure function of (seed, split, index): the same files in any order or process.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from demo.world import COLOURS, SHAPES, SUPERSAMPLE, _rng, background, check_style, parallel_imap, shape_polygon
from utils.artifacts import save_json
from utils.errors import V2LError

QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
CATEGORIES: tuple[str, ...] = ("colour", "shape", "background", "position")
RADIUS = (0.12, 0.22)          # the shape's circumradius, as a fraction of the image side
MIDLINE_GAP = 0.06             # its centre's least distance from the midlines, same unit
SHORT_ANSWER = "Answer the question using a single word or phrase."   # LLaVA's VQA instruction
# stage-1 requests for a brief description (written for the demo in the spirit of LLaVA's
# pretraining prompts; the placeholder goes before or after the request)
BRIEF_REQUESTS = ("Describe the image briefly.", "Give a short description of this image.",
                  "What does the picture show? Answer in one sentence.",
                  "Summarise the image in a few words.", "Write a brief caption for the image.",
                  "Provide a concise description of the picture.")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    quadrant: str
    cx: float                    # the shape's centre as a fraction of the width / height
    cy: float
    radius: float                # circumradius as a fraction of the side


def questions_for(style: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each category's question (listing its possible answers) and those answers."""
    kinds = check_style(style)[0]
    listed = lambda words: ", ".join(words[:-1]) + " or " + words[-1]  # noqa: E731
    return {
        "colour": (f"What colour is the shape: {listed(list(COLOURS))}?", tuple(COLOURS)),
        "shape": (f"What shape is in the image: {listed(list(SHAPES))}?", tuple(SHAPES)),
        "background": (f"Is the background {listed(list(kinds))}?", tuple(kinds)),
        "position": (f"Where is the shape: {listed(list(QUADRANTS))}?", QUADRANTS),
    }


def caption(scene: Scene) -> str:
    return f"a {scene.colour} {scene.shape} on a {scene.background} background, in the {scene.quadrant}."


def render_scene(rng: np.random.Generator, colour: str, shape: str, kind: str, quadrant: str,
                 size: int, style: str = "smooth") -> tuple[Image.Image, Scene]:
    """One ``size`` x ``size`` image: a ``colour`` ``shape`` on a ``kind`` background, in
    ``quadrant`` (``demo.world.render``'s drawing, the place chosen and kept)."""
    kinds, noise = check_style(style)
    if kind not in kinds or quadrant not in QUADRANTS or colour not in COLOURS or shape not in SHAPES:
        raise V2LError(f"scene {colour} {shape} on {kind} in {quadrant}: not in the {style} world")
    n = size * SUPERSAMPLE
    canvas = Image.fromarray(np.clip(background(rng, kind, n, noise), 0, 255).astype(np.uint8))
    r = rng.uniform(*RADIUS)
    lo = (r, 0.5 + MIDLINE_GAP)
    hi = (0.5 - MIDLINE_GAP, 1 - r)
    right, bottom = quadrant.endswith("right"), quadrant.startswith("bottom")
    cx = rng.uniform(lo[right], hi[right])
    cy = rng.uniform(lo[bottom], hi[bottom])
    fill = np.clip(np.array(COLOURS[colour]) * rng.uniform(0.85, 1.08)
                   + rng.integers(-18, 19, 3), 0, 255).astype(int)
    ImageDraw.Draw(canvas).polygon(shape_polygon(shape, cx * n, cy * n, r * n, rng.uniform(0, 2 * np.pi)),
                                   fill=tuple(fill.tolist()))
    image = canvas.resize((size, size), Image.Resampling.BOX)
    return image, Scene(colour, shape, kind, quadrant, float(cx), float(cy), float(r))


def balanced_scenes(seed: int, split: str, n: int, style: str) -> list[tuple[str, str, str, str]]:
    """n (colour, shape, background, quadrant) picks: each attribute cycles through its values
    in its own shuffled order, so each value appears n / len(values) times (+-1)."""
    kinds = check_style(style)[0]
    rng = _rng(seed, split, "attributes")
    columns = []
    for values in (tuple(COLOURS), SHAPES, kinds, QUADRANTS):
        col = [values[i % len(values)] for i in range(n)]
        rng.shuffle(col)
        columns.append(col)
    return list(zip(*columns))


def _render_job(job: tuple) -> tuple[str, dict]:
    out, seed, split, i, pick, size, style = job
    image, scene = render_scene(_rng(seed, split, i), *pick, size, style)
    rel = f"images/{split}/{i:05d}.png"
    image.save(Path(out) / rel, compress_level=1)
    return rel, asdict(scene)


def _pretrain_entry(rng, rel: str, scene: Scene, i: int) -> dict:
    request = BRIEF_REQUESTS[int(rng.integers(len(BRIEF_REQUESTS)))]
    value = f"<image>\n{request}" if rng.random() < 0.5 else f"{request}\n<image>"
    return {"id": f"pretrain-{i:05d}", "image": rel,
            "conversations": [{"from": "human", "value": value},
                              {"from": "gpt", "value": caption(scene)}]}


def _instruct_entry(rng, rel: str, scene: Scene, i: int, questions: dict) -> dict:
    order = list(CATEGORIES)
    rng.shuffle(order)
    rounds = order[:int(rng.integers(2, len(CATEGORIES) + 1))]
    conv = []
    for j, cat in enumerate(rounds):
        text = questions[cat][0] + "\n" + SHORT_ANSWER
        conv.append({"from": "human", "value": ("<image>\n" + text) if j == 0 else text})
        conv.append({"from": "gpt", "value": getattr(scene, "quadrant" if cat == "position" else cat)})
    return {"id": f"instruct-{i:05d}", "image": rel, "conversations": conv}


def write_llava_world(out_dir, seed: int = 0, n_pretrain: int = 2000, n_instruct: int = 2000,
                      n_eval: int = 120, size: int = 128, style: str = "smooth",
                      progress: bool = True) -> tuple[list[str], dict]:
    """Write the LLaVA-format demo data under ``out_dir`` (module docstring). ``n_eval``
    evaluation images, one question of each type on each (4 x n_eval questions).
    Returns (files written, relative to out_dir; a summary for a manifest)."""
    check_style(style)
    if min(n_pretrain, n_instruct, n_eval) < 1:
        raise V2LError("the LLaVA demo data needs at least one image in each split "
                       f"(got pretrain {n_pretrain}, instruct {n_instruct}, eval {n_eval})")
    start = time.perf_counter()
    out = Path(out_dir)
    questions = questions_for(style)
    counts = {"pretrain": n_pretrain, "instruct": n_instruct, "eval": n_eval}
    jobs = []
    for split, n in counts.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(str(out), seed, split, i, pick, size, style)
                 for i, pick in enumerate(balanced_scenes(seed, split, n, style))]
    rendered = list(parallel_imap(_render_job, jobs, "LLaVA demo images", progress=progress))
    by_split = {s: [] for s in counts}
    for rel, scene in rendered:
        by_split[rel.split("/")[1]].append((rel, Scene(**scene)))

    rng = _rng(seed, "conversations")
    pretrain = [_pretrain_entry(rng, rel, sc, i) for i, (rel, sc) in enumerate(by_split["pretrain"])]
    instruct = [_instruct_entry(rng, rel, sc, i, questions)
                for i, (rel, sc) in enumerate(by_split["instruct"])]
    rows = []
    for i, (rel, sc) in enumerate(by_split["eval"]):
        for cat in CATEGORIES:
            rows.append({"question_id": f"{i:05d}-{cat}", "image": rel,
                         "text": questions[cat][0] + "\n" + SHORT_ANSWER, "category": cat,
                         "answer": getattr(sc, "quadrant" if cat == "position" else cat),
                         "options": list(questions[cat][1])})
    save_json(out / "pretrain.json", pretrain)
    save_json(out / "instruct.json", instruct)
    _write_jsonl(out / "questions.jsonl", rows)
    save_json(out / "scenes.json", {rel: asdict(sc) for split in by_split.values() for rel, sc in split})
    files = [rel for rel, _ in rendered] + ["pretrain.json", "instruct.json", "questions.jsonl",
                                            "scenes.json"]
    info = {"images": counts, "questions": len(rows), "per_category": n_eval, "size": size,
            "style": style, "categories": list(CATEGORIES),
            "answers": {c: list(questions[c][1]) for c in CATEGORIES},
            "chance": {c: 100.0 / len(questions[c][1]) for c in CATEGORIES},
            "seconds": round(time.perf_counter() - start, 1)}
    return files, info


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    from utils.artifacts import atomic_path
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
