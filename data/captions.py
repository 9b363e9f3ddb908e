"""Captioning and VQA data from local files: references, questions, answers and image paths.

Captions (``load_captions``), by the JSON's shape:
- COCO Karpathy ``dataset_coco.json``: ``{"images": [{"filepath", "filename", "split",
  "cocoid", "sentences": [{"raw"}]}]}``; images at ``<image_dir>/<filepath>/<filename>``;
  the split (``test``, ``val``, ``train``, ``restval``) is the image's own field;
- COCO ``captions_val2014.json``: ``{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}``; images at ``<image_dir>/<file_name>``; no splits;
- a plain mapping ``{"<relative image path>": "caption" or ["caption", ...]}``, as the
  demo world's ``captions.json`` or any folder of images; the split of an image is the
  first folder of its path (``val/red_circle/00000.png`` is in ``val``).

Questions (``load_vqa``): VQAv2's questions and annotations JSON files with COCO
images, or questions generated from the demo world's labels (``demo_questions``).

Every loader returns (queries, examples): the items to answer and the pool that
in-context examples are drawn from. Where a file has no split, both are the
whole set and an example is never the query's own image.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from data.images import is_image
from utils.errors import V2LError


@dataclass
class CaptionItem:
    image_id: str
    path: str
    captions: list[str]

    @property
    def key(self) -> str:
        return self.image_id


@dataclass
class VQAItem:
    question_id: str
    image_id: str
    path: str
    question: str
    answers: list[str]            # the annotators' answers (VQAv2: ten)
    qtype: str = ""               # question type (examples may be drawn from the same type)
    labels: str | None = None     # the image's own labels/caption: the ceiling's image words
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.question_id


def _read_json(path, what: str, fix: str):
    path = Path(path)
    if not path.is_file():
        raise V2LError(f"{path}: {what} not found; {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise V2LError(f"{path}: not valid JSON ({e}); {fix}")


CAPTION_FORMATS = ("a Karpathy dataset_coco.json, a COCO captions_*.json, or a "
                   "{image path: caption or [captions]} mapping")


def caption_format(data) -> str:
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if "annotations" in data:
            return "coco"
        if all(isinstance(i, dict) and "sentences" in i for i in data["images"][:5]):
            return "karpathy"
    elif isinstance(data, dict) and data and all(
            is_image(Path(k)) and (isinstance(v, str) or (isinstance(v, list) and v
                                                            and all(isinstance(c, str) for c in v)))
            for k, v in data.items()):
        return "mapping"
    return "unknown"


def load_captions(captions_file, image_dir=None, split: str | None = "test",
                  example_split: str = "train") -> tuple[list[CaptionItem], list[CaptionItem], str]:
    """(queries of ``split``, example pool of ``example_split``, format) from a captions file.

    ``image_dir`` defaults to the captions file's folder; ``split`` None takes every image.
    For the Karpathy file,
    ``example_split`` "train" also takes "restval" (both are its training images)."""
    captions_file = Path(captions_file)
    data = _read_json(captions_file, "captions file", "pass --captions_file " + CAPTION_FORMATS)
    fmt = caption_format(data)
    root = Path(image_dir) if image_dir else captions_file.parent
    try:
        if fmt == "karpathy":
            items = {}
            for im in data["images"]:
                cap = [s["raw"].strip() for s in im["sentences"]]
                ident = str(im.get("cocoid", im.get("imgid", im["filename"])))
                items[ident] = (im["split"], CaptionItem(ident, str(root / im.get("filepath", "")
                                                                     / im["filename"]), cap))
            pool_splits = {example_split} | ({"restval"} if example_split == "train" else set())
            queries = [it for s, it in items.values() if split is None or s == split]
            pool = [it for s, it in items.values() if s in pool_splits]
        elif fmt == "coco":
            caps: dict[str, list[str]] = {}
            for a in data["annotations"]:
                caps.setdefault(str(a["image_id"]), []).append(str(a["caption"]).strip())
            queries = [CaptionItem(str(im["id"]), str(root / im["file_name"]), caps[str(im["id"])])
                       for im in data["images"] if str(im["id"]) in caps]
            pool = queries
        elif fmt == "mapping":
            everything = [CaptionItem(k, str(root / k), [v] if isinstance(v, str) else list(v))
                          for k, v in data.items()]
            queries, pool = _split_by_folder(everything, split, example_split)
        else:
            raise V2LError(f"{captions_file}: unknown captions format; expected {CAPTION_FORMATS}")
    except (KeyError, TypeError, AttributeError) as e:
        raise V2LError(f"{captions_file}: a {fmt} captions file without the field {e}; expected "
                       f"{CAPTION_FORMATS}")
    if not queries:
        raise V2LError(f"{captions_file}: no images in split '{split}'; pass --split "
                       "(Karpathy: test, val; a mapping: the first folder of its paths)")
    return queries, pool, fmt


def _split_by_folder(items: list, split: str, example_split: str) -> tuple[list, list]:
    """Split a mapping by the first folder of each path; no such folders: all items, twice."""
    first = lambda it: Path(it.image_id).parts[0] if len(Path(it.image_id).parts) > 1 else ""  # noqa: E731
    if split is None or not any(first(it) == split for it in items):
        return items, items
    return [it for it in items if first(it) == split], [it for it in items if first(it) == example_split]


def spread(items: list, n: int | None) -> list:
    """At most n items, evenly spaced over the list (so a capped run still covers every class
    of a list sorted by class); all of them when n is None or not smaller."""
    if n is None or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def spread_images(items: list, n: int | None) -> list:
    """The items (questions) of at most n images, evenly spaced over the images."""
    images = spread(list(dict.fromkeys(it.image_id for it in items)), n)
    keep = set(images)
    return [it for it in items if it.image_id in keep]


def check_images(items: list, source, image_dir) -> None:
    """Refuse items whose image file is missing, naming how many images and the first."""
    paths = list(dict.fromkeys(it.path for it in items))
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise V2LError(f"{len(missing)} of {len(paths)} images listed in {source} are missing from "
                       f"{image_dir} (e.g. {missing[0]}); pass --image_dir, the folder holding them")


# ----------------------------------------------------------------------------- VQA

def load_vqav2(questions_file, annotations_file, image_dir, labels_file=None) -> tuple[list, list]:
    """VQAv2 questions + annotations (ten answers each) with images
    ``<image_dir>/COCO_<subtype>_<image id, 12 digits>.jpg``. Every question is a query and
    the pool is the same set (an example is never about the query's image).
    ``labels_file``, a COCO captions file, gives each image's first caption as its labels."""
    fix = "pass --questions_file (v2_OpenEnded_mscoco_val2014_questions.json)"
    q = _read_json(questions_file, "VQAv2 questions file", fix)
    a = _read_json(annotations_file, "VQAv2 annotations file",
                   "pass --annotations_file (v2_mscoco_val2014_annotations.json)")
    if not (isinstance(q, dict) and isinstance(q.get("questions"), list)):
        raise V2LError(f"{questions_file}: not a VQAv2 questions file (no 'questions' list); {fix}")
    if not (isinstance(a, dict) and isinstance(a.get("annotations"), list)):
        raise V2LError(f"{annotations_file}: not a VQAv2 annotations file (no 'annotations' list); "
                       "pass --annotations_file (v2_mscoco_val2014_annotations.json)")
    labels = {}
    if labels_file:
        caps, _, _ = load_captions(labels_file, image_dir, split=None)
        labels = {c.image_id: c.captions[0] for c in caps}
    subtype = q.get("data_subtype", "val2014")
    try:
        ann = {str(x["question_id"]): x for x in a["annotations"]}
        items = []
        for x in q["questions"]:
            qid, img = str(x["question_id"]), int(x["image_id"])
            if qid not in ann:
                raise V2LError(f"{annotations_file}: no annotation for question {qid} of "
                               f"{questions_file}; pass the annotations of the same split")
            an = ann[qid]
            items.append(VQAItem(qid, str(img), str(Path(image_dir) / f"COCO_{subtype}_{img:012d}.jpg"),
                                 str(x["question"]), [str(y["answer"]) for y in an["answers"]],
                                 str(an.get("question_type", "")), labels.get(str(img)),
                                 {"answer_type": an.get("answer_type")}))
    except (KeyError, TypeError, ValueError) as e:
        raise V2LError(f"{questions_file} / {annotations_file}: VQAv2 entry without a valid {e}; "
                       "pass VQAv2's own questions and annotations files")
    return items, items


DEMO_QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?",
                  "yes/no": "Is the shape {colour}?"}


def demo_questions(data_dir, split: str, seed: int = 0, answers: int = 10) -> list[VQAItem]:
    """Three questions per image of a demo world split (class folders ``<colour>_<shape>``):
    its colour, its shape, and "Is the shape <c>?" with c its own colour for half the images
    (seeded) and another colour of the world otherwise. The answer is given ``answers`` times
    (as if every annotator agreed); the labels "<colour> <shape>" are the ceiling's words."""
    root = Path(data_dir) / split
    if not root.is_dir():
        raise V2LError(f"{root}: no such folder; pass --data_dir, a demo world with {split}/ "
                       "(made by python -m demo.setup)")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    bad = [p.name for p in folders if p.name.count("_") != 1]
    if not folders or bad:
        raise V2LError(f"{root}: expected class folders named <colour>_<shape> (the demo world), "
                       f"found {bad[:3] or 'none'}; pass the demo world's data folder")
    colours = sorted({p.name.split("_")[0] for p in folders})
    items = []
    for folder in folders:
        colour, shape = folder.name.split("_")
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg")):
            image_id = f"{split}/{folder.name}/{path.name}"
            rng = random.Random(f"{seed}/{image_id}")
            ask = colour if rng.random() < 0.5 or len(colours) == 1 else \
                rng.choice([c for c in colours if c != colour])
            for qtype, (question, answer) in {
                    "colour": (DEMO_QUESTIONS["colour"], colour),
                    "shape": (DEMO_QUESTIONS["shape"], shape),
                    "yes/no": (DEMO_QUESTIONS["yes/no"].format(colour=ask),
                               "yes" if ask == colour else "no")}.items():
                items.append(VQAItem(f"{image_id}#{qtype}", image_id, str(path), question,
                                     [answer] * answers, qtype, f"{colour} {shape}"))
    return items
