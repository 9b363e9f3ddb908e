"""LLaVA's benchmarks offline: question files and prompts, answers files, scores, upload files,
and retention across conditions. Written from the rules of LLaVA's evaluation code
(``docs/Evaluation.md``, ``scripts/convert_*.py``, ``llava/eval/*.py``) and each
benchmark's official scoring; docs/benchmarks.md lists them and how each was checked.

Question files are LLaVA's: JSON lines ``{"question_id", "image", "text", "category"?}``
whose ``text`` already ends with the benchmark's instruction (``SHORT_ANSWER`` or
``OPTION_LETTER``); MMBench's TSV and ScienceQA's ``llava_test_CQM-A.json`` are read into
the same form. The model reads ``<image>\\n`` + ``text`` as the user turn (data/llava.py).

Answers files are LLaVA's: JSON lines ``{"question_id", "prompt", "text", "answer_id",
"model_id", "metadata"}``.

Every scorer reads an answers file and the benchmark's own annotation files and returns a
``Score``: the benchmark's metrics and a per-question correctness in [0, 1] (keyed by
question id) from which ``retention`` compares conditions. A scorer scores the questions
answered (each must be in the annotations) and reports ``n`` and ``n_annotated``: a
number is the benchmark's official score only when ``complete``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.vqa import ARTICLES, CONTRACTIONS, NUMBERS, process_punctuation, vqa_accuracy
from utils.artifacts import atomic_path
from utils.errors import V2LError

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
PROMPTS = {"short": SHORT_ANSWER, "option": OPTION_LETTER}
MME_SUFFIX = "Please answer yes or no."
MME_CATEGORIES = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                   "landmark", "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation",
                  "code_reasoning"),
}
SQA_OPTIONS = ("A", "B", "C", "D", "E")
MMBENCH_OPTIONS = ("A", "B", "C", "D")
MMBENCH_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
ANSWER_FIELDS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


@dataclass
class Score:
    benchmark: str
    metrics: dict
    per_question: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- files

def read_jsonl(path, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise V2LError(f"{path}: no such file; give {what}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise V2LError(f"{path}: line {n} is not JSON ({e.msg}); give {what}") from e
            if not isinstance(row, dict):
                raise V2LError(f"{path}: line {n} is not a JSON object; give {what}")
            rows.append(row)
    return rows


def read_json(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise V2LError(f"{path}: no such file; give {what}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise V2LError(f"{path}: not valid JSON ({e}); give {what}") from e


def with_prompt(text: str, kind: str | None) -> str:
    """``text`` + "\\n" + the instruction of ``kind`` ("short" or "option"), unless it ends
    with it already (LLaVA's question files carry it)."""
    if kind is None:
        return text
    suffix = PROMPTS[kind]
    return text if text.rstrip().endswith(suffix) else text + "\n" + suffix


def load_questions(path, prompt: str | None = None) -> list[dict]:
    """LLaVA's question file; ``prompt`` ("short"/"option") appends the instruction where a
    question lacks it. Each row gets ``prompt``: what the answers file records (the text)."""
    rows = read_jsonl(path, "a LLaVA question file (JSON lines with question_id, image, text)")
    seen = set()
    for n, row in enumerate(rows, 1):
        missing = [k for k in ("question_id", "text") if k not in row]
        if missing:
            raise V2LError(f"{path}: question {n} has no {', '.join(missing)}; LLaVA's question files "
                           "have question_id, image, text")
        key = (str(row["question_id"]), row["text"])
        if key in seen:
            raise V2LError(f"{path}: question {row['question_id']} appears twice")
        seen.add(key)
        row["text"] = with_prompt(row["text"], prompt)
        row.setdefault("prompt", row["text"])
        row.setdefault("image", None)
    return rows


def _is_none(value) -> bool:
    """MMBench's empty cell: missing, NaN, '', 'nan' or 'none'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def _read_tsv(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise V2LError(f"{path}: no such file; give MMBench's TSV (e.g. mmbench_dev_20230712.tsv)")
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "index" not in rows[0] or "question" not in rows[0]:
        raise V2LError(f"{path}: not MMBench's TSV (needs the columns index, question, A, B, ...)")
    return rows


def mmbench_questions(path) -> list[dict]:
    """MMBench's TSV as questions, the prompt LLaVA builds: hint (if any), question, one line
    per option ``"A. ..."`` (up to the first empty one), then ``OPTION_LETTER``. The image is
    the row's base64 (``image_b64``); ``prompt`` (the answers file's) is without the
    instruction, as LLaVA records it."""
    out = []
    for row in _read_tsv(path):
        options = []
        for letter in MMBENCH_OPTIONS:
            if letter not in row or _is_none(row[letter]):
                break
            options.append(row[letter])
        question = row["question"]
        if not _is_none(row.get("hint")):
            question = row["hint"] + "\n" + question
        for letter, option in zip(MMBENCH_OPTIONS, options):
            question += "\n" + letter + ". " + option
        qid = int(row["index"]) if row["index"].strip().lstrip("-").isdigit() else row["index"]
        out.append({"question_id": qid, "image": None, "image_b64": row.get("image"),
                    "text": question + "\n" + OPTION_LETTER, "prompt": question, "options": options,
                    "category": row.get("category")})
    return out


def scienceqa_questions(path) -> list[dict]:
    """LLaVA's ``llava_test_CQM-A.json`` as questions: the first message without its
    placeholder, then ``OPTION_LETTER``; text-only questions have ``image`` None. ``prompt``
    is LLaVA's record: ``<image>\\n`` first for an image question."""
    entries = read_json(path, "LLaVA's ScienceQA question file (llava_test_CQM-A.json)")
    if not isinstance(entries, list):
        raise V2LError(f"{path}: expected a JSON list of LLaVA conversation entries")
    out = []
    for e in entries:
        try:
            text = e["conversations"][0]["value"].replace("<image>", "").strip()
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise V2LError(f"{path}: entry {str(e)[:60]} has no conversations[0].value") from err
        text = text + "\n" + OPTION_LETTER
        image = e.get("image")
        out.append({"question_id": e["id"], "image": image, "text": text,
                    "prompt": ("<image>\n" + text) if image else text})
    return out


def vqav2_questions(path, image_name: str = "COCO_val2014_{:012d}.jpg") -> list[dict]:
    """VQAv2's official questions JSON (``{"questions": [{"question_id", "image_id",
    "question"}]}``) as LLaVA questions with ``SHORT_ANSWER``."""
    data = read_json(path, "VQAv2's questions JSON (v2_OpenEnded_mscoco_val2014_questions.json)")
    if not isinstance(data, dict) or "questions" not in data:
        raise V2LError(f"{path}: not VQAv2's questions JSON (no 'questions')")
    return [{"question_id": q["question_id"], "image": image_name.format(int(q["image_id"])),
             "text": q["question"] + "\n" + SHORT_ANSWER, "prompt": q["question"] + "\n" + SHORT_ANSWER}
            for q in data["questions"]]


def answer_row(question: dict, text: str, model_id: str, metadata: dict | None = None) -> dict:
    """One line of LLaVA's answers file. ``answer_id`` is derived from the rest (LLaVA draws
    a random one), so a rerun writes the same file."""
    qid = question["question_id"]
    digest = hashlib.sha1(f"{model_id}\0{qid}\0{question.get('prompt', '')}\0{text}".encode()).hexdigest()
    return {"question_id": qid, "prompt": question.get("prompt", question.get("text", "")), "text": text,
            "answer_id": digest[:22], "model_id": model_id, "metadata": dict(metadata or {})}


def write_answers(path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in ANSWER_FIELDS}, ensure_ascii=False) + "\n")


def read_answers(path) -> list[dict]:
    rows = read_jsonl(path, "a LLaVA answers file (JSON lines with question_id, prompt, text)")
    for n, row in enumerate(rows, 1):
        if "question_id" not in row or not isinstance(row.get("text"), str):
            raise V2LError(f"{path}: answer {n} has no question_id or text; LLaVA's answers files "
                           "have question_id, prompt, text, answer_id, model_id, metadata")
    return rows


def _by_id(answers: list[dict], path) -> dict[str, dict]:
    out = {}
    for row in answers:
        key = str(row["question_id"])
        if key in out:
            raise V2LError(f"{path}: question {key} is answered twice; merge the chunks once")
        out[key] = row
    return out


def _unknown(keys, known, path, annotations) -> None:
    extra = [k for k in keys if k not in known]
    if extra:
        raise V2LError(f"{path}: question {extra[0]} (and {len(extra) - 1} more) is not in "
                       f"{annotations}; score against the annotations of the split that was run")


def _pct(x: float) -> float:
    return 100.0 * x


# ----------------------------------------------------------------------------- GQA

def score_gqa(answers_path, questions_path) -> Score:
    """GQA's accuracy (its ``eval.py``): exact match of the prediction with the answer over
    the balanced questions; the prediction is LLaVA's conversion of the output (trailing
    periods removed, lower case). Also binary (yes/no structure) and open accuracy."""
    questions = read_json(questions_path, "GQA's questions JSON (testdev_balanced_questions.json)")
    if not isinstance(questions, dict):
        raise V2LError(f"{questions_path}: not GQA's questions JSON ({{question id: question}})")
    balanced = {str(k): q for k, q in questions.items() if q.get("isBalanced", True)}
    answers = _by_id(read_answers(answers_path), answers_path)
    _unknown(answers, balanced, answers_path, questions_path)
    per, kinds = {}, {"binary": [], "open": []}
    for qid, row in answers.items():
        q = balanced[qid]
        correct = float(row["text"].rstrip(".").lower() == q["answer"])
        per[qid] = correct
        structural = q.get("types", {}).get("structural")
        kinds["open" if structural == "query" else "binary"].append(correct)
    n = len(per)
    return Score("gqa", {"accuracy": _pct(sum(per.values()) / n) if n else None,
                         **{k: _pct(sum(v) / len(v)) if v else None for k, v in kinds.items()},
                         "n": n, "n_annotated": len(balanced), "complete": n == len(balanced)}, per)


# ----------------------------------------------------------------------------- POPE

def pope_answer(text: str) -> str:
    """POPE's reading of an output (LLaVA's ``eval_pope.py``): the first sentence, commas
    removed, split on spaces; "no" if a word is "No", "no" or "not", else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def _binary_metrics(preds: list[str], labels: list[str]) -> dict:
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labels))
    fp = sum(p == "yes" and g != "yes" for p, g in zip(preds, labels))
    tn = sum(p == "no" and g != "yes" for p, g in zip(preds, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(preds)
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": _pct((tp + tn) / n),
            "precision": _pct(precision), "recall": _pct(recall), "f1": _pct(f1),
            "yes_ratio": _pct(preds.count("yes") / n), "n": n}


def score_pope(answers_path, questions_path, annotation_dir) -> Score:
    """POPE per category (``coco_pope_<category>.json`` in ``annotation_dir``): accuracy,
    precision, recall, F1 and the ratio of "yes" answers; labels other than "no" count as
    "yes". As LLaVA's script, a category's answers (in the answers file's order, the
    category from the question file) are paired with the annotation lines in order; the
    pairs must show the same image. ``f1`` / ``accuracy``: the mean over categories."""
    questions = {str(q["question_id"]): q for q in read_jsonl(
        questions_path, "LLaVA's POPE question file (llava_pope_test.jsonl)")}
    answers = read_answers(answers_path)
    _unknown([str(a["question_id"]) for a in answers], questions, answers_path, questions_path)
    annotation_dir = Path(annotation_dir)
    files = sorted(annotation_dir.glob("coco_pope_*.json")) if annotation_dir.is_dir() else []
    if not files:
        raise V2LError(f"{annotation_dir}: no coco_pope_<category>.json files; give POPE's "
                       "annotation folder")
    per, categories = {}, {}
    for file in files:
        category = file.stem[len("coco_pope_"):]
        labels = read_jsonl(file, "POPE's annotation lines (label, image, text)")
        mine = [a for a in answers if questions[str(a["question_id"])].get("category") == category]
        if not mine:
            continue
        if len(mine) > len(labels):
            raise V2LError(f"{answers_path}: {len(mine)} answers in category {category}, {file} has "
                           f"{len(labels)} labels; use the question file POPE's files were made with")
        preds = []
        for a, label in zip(mine, labels):
            q = questions[str(a["question_id"])]
            if "image" in label and q.get("image") is not None \
                    and Path(str(q["image"])).name != Path(str(label["image"])).name:
                raise V2LError(f"{answers_path}: question {a['question_id']} ({q['image']}) is paired "
                               f"with {file}'s line for {label['image']}; POPE pairs them in order, "
                               "so answer the questions in the question file's order")
            preds.append(pope_answer(a["text"]))
            gold = "no" if label["label"] == "no" else "yes"
            per[str(a["question_id"])] = float(preds[-1] == gold)
        categories[category] = _binary_metrics(preds, ["no" if lb["label"] == "no" else "yes"
                                                       for lb in labels[:len(preds)]])
        categories[category]["n_annotated"] = len(labels)
    if not categories:
        raise V2LError(f"{answers_path}: no answer is in a category of {annotation_dir}")
    mean = lambda k: sum(c[k] for c in categories.values()) / len(categories)   # noqa: E731
    return Score("pope", {"f1": mean("f1"), "accuracy": mean("accuracy"), "categories": categories,
                          "n": len(per), "complete": all(c["n"] == c["n_annotated"]
                                                         for c in categories.values())}, per)


# ----------------------------------------------------------------------------- MME

def mme_answer(text: str) -> str:
    """MME's reading (its ``calculation.py``): lower case; "yes"/"no" as is, else "yes" if
    the first four characters hold "yes", "no" if they hold "no", else "other"."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    return "yes" if "yes" in t[:4] else "no" if "no" in t[:4] else "other"


def mme_ground_truth(mme_dir) -> dict[tuple[str, str, str], str]:
    """(category, QA file, question) -> "Yes"/"No" from MME's release folder: a category's QA
    files are in ``questions_answers_YN/`` when it has an ``images/`` folder, else beside
    the images; each line ``question<TAB>answer``."""
    mme_dir = Path(mme_dir)
    if not mme_dir.is_dir():
        raise V2LError(f"{mme_dir}: no such folder; give MME's MME_Benchmark_release_version folder")
    gt = {}
    for category in sorted(p for p in mme_dir.iterdir() if p.is_dir()):
        qa = category / "questions_answers_YN" if (category / "images").is_dir() else category
        for file in sorted(qa.glob("*.txt")):
            for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise V2LError(f"{file}: line {n} is not 'question<TAB>answer'")
                gt[(category.name, file.name, parts[0])] = parts[1]
    if not gt:
        raise V2LError(f"{mme_dir}: no question files found; give MME's release folder")
    return gt


def _mme_question(prompt: str, key_exists) -> str:
    """LLaVA's ``convert_answer_to_mme.py``: the instruction removed, MME's own suffix back."""
    q = prompt.replace(SHORT_ANSWER, "").strip() if SHORT_ANSWER in prompt else prompt
    if MME_SUFFIX not in q:
        one = q + " " + MME_SUFFIX
        q = one if key_exists(one) else q + "  " + MME_SUFFIX
    return q


def score_mme(answers_path, mme_dir) -> Score:
    """MME: per category, acc (questions right) + acc+ (images with both questions right),
    each in percent; perception and cognition are the sums over their categories (None
    unless all are answered). Question ids are LLaVA's ``<category>/<image file>``."""
    gt = mme_ground_truth(mme_dir)
    groups: dict[str, dict[str, list[bool]]] = {}
    per = {}
    for row in read_answers(answers_path):
        qid = str(row["question_id"])
        category, image = qid.split("/")[0], qid.split("/")[-1]
        qa_file = image.split(".")[0] + ".txt"
        question = _mme_question(row.get("prompt", ""), lambda q: (category, qa_file, q) in gt)
        if (category, qa_file, question) not in gt:
            raise V2LError(f"{answers_path}: question {qid} '{question[:50]}' is not in {mme_dir}; "
                           "score against the MME release the question file was made from")
        gold = gt[(category, qa_file, question)].lower()
        if gold not in ("yes", "no"):
            raise V2LError(f"{mme_dir}: {category}/{qa_file}: answer '{gold}' is not Yes or No")
        correct = mme_answer(row["text"]) == gold
        per[f"{qid}\t{question}"] = float(correct)
        groups.setdefault(category, {}).setdefault(qa_file, []).append(correct)
    categories = {}
    for category, images in groups.items():
        odd = [f for f, v in images.items() if len(v) != 2]
        if odd:
            raise V2LError(f"{answers_path}: {category}/{odd[0]} has {len(images[odd[0]])} answers; "
                           "MME scores the two questions of each image together")
        flat = [c for v in images.values() for c in v]
        acc = _pct(sum(flat) / len(flat))
        acc_plus = _pct(sum(all(v) for v in images.values()) / len(images))
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                                "images": len(images)}
    metrics = {"categories": categories, "n": len(per)}
    for part, names in MME_CATEGORIES.items():
        have = [c for c in names if c in categories]
        metrics[part] = sum(categories[c]["score"] for c in names) if len(have) == len(names) else None
        metrics[f"{part}_missing"] = [c for c in names if c not in categories]
    metrics["complete"] = not metrics["perception_missing"] and not metrics["cognition_missing"]
    return Score("mme", metrics, per)


# ----------------------------------------------------------------------------- ScienceQA

def scienceqa_letter(text: str) -> str:
    """The option letter LLaVA's ``eval_science_qa.py`` reads: the whole output if it is a
    letter A-E, the first character of "X. ...", or the one "The answer is X." in it;
    else "FAILED"."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else "FAILED"


def score_scienceqa(answers_path, problems_path, splits_path, split: str = "test") -> Score:
    """ScienceQA: accuracy of the option letter over the split's answered problems, and over
    those with an image (``img_accuracy``: ScienceQA-IMG, the number LLaVA reports). A letter
    beyond the problem's choices is wrong."""
    problems = read_json(problems_path, "ScienceQA's problems.json")
    splits = read_json(splits_path, "ScienceQA's pid_splits.json")
    if split not in splits:
        raise V2LError(f"{splits_path}: no split '{split}' (has {', '.join(sorted(splits))})")
    ids = {str(p) for p in splits[split]}
    answers = _by_id(read_answers(answers_path), answers_path)
    _unknown(answers, ids, answers_path, f"{splits_path} [{split}]")
    per, img = {}, []
    for qid, row in answers.items():
        prob = problems[qid]
        letter = scienceqa_letter(row["text"])
        index = SQA_OPTIONS.index(letter) if letter in SQA_OPTIONS[:len(prob["choices"])] else -1
        per[qid] = float(index == prob["answer"])
        if prob.get("image"):
            img.append(per[qid])
    n_img = sum(1 for p in ids if problems[p].get("image"))
    n = len(per)
    return Score("scienceqa", {"accuracy": _pct(sum(per.values()) / n) if n else None,
                               "img_accuracy": _pct(sum(img) / len(img)) if img else None,
                               "n": n, "n_img": len(img), "n_annotated": len(ids),
                               "n_img_annotated": n_img, "complete": n == len(ids)}, per)


# ----------------------------------------------------------------------------- SEED

def score_seed(answers_path, seed_path, data_type: str | None = "image") -> Score:
    """SEED-Bench: the output must equal the answer letter exactly (LLaVA's
    ``convert_seed_for_submission.py``); accuracy over the answered questions of
    ``data_type`` ("image": SEED-Image; None: all), and per question type."""
    data = read_json(seed_path, "SEED-Bench.json")
    if not isinstance(data, dict) or "questions" not in data:
        raise V2LError(f"{seed_path}: not SEED-Bench.json (no 'questions')")
    names = {v: k for k, v in data.get("question_type", {}).items()}
    questions = {str(q["question_id"]): q for q in data["questions"]
                 if data_type is None or q.get("data_type") == data_type}
    answers = _by_id(read_answers(answers_path), answers_path)
    _unknown(answers, questions, answers_path, f"{seed_path} [{data_type or 'all'}]")
    per, types = {}, {}
    for qid, row in answers.items():
        q = questions[qid]
        per[qid] = float(row["text"] == q["answer"])
        types.setdefault(names.get(q.get("question_type_id"), str(q.get("question_type_id"))),
                         []).append(per[qid])
    n = len(per)
    return Score("seed", {"accuracy": _pct(sum(per.values()) / n) if n else None,
                          "types": {k: _pct(sum(v) / len(v)) for k, v in sorted(types.items())},
                          "n": n, "n_annotated": len(questions), "complete": n == len(questions)}, per)


# ----------------------------------------------------------------------------- VQA accuracy



def evalai_answer(text: str) -> str:
    """The answer normalisation of EvalAI's VQA processor (LLaVA's ``m4c_evaluator``, applied
    before VQAv2 upload and in TextVQA): lower case, commas and "?" removed, "'s" split off,
    line breaks to spaces, VQA punctuation rules, number words to digits, articles dropped,
    contractions restored."""
    t = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    t = process_punctuation(t.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBERS.get(w, w) for w in t.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def textvqa_accuracy(answer: str, human_answers: list[str]) -> float:
    """TextVQA's accuracy (``m4c_evaluator``): both sides normalised by ``evalai_answer``, then
    min(#other annotators who gave it / 3, 1) averaged over the ten leave-one-out subsets."""
    if len(human_answers) != 10:
        raise V2LError(f"TextVQA needs the 10 human answers per question, got {len(human_answers)}")
    pred, gts = evalai_answer(answer), [evalai_answer(a) for a in human_answers]
    return sum(min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3)
               for i in range(len(gts))) / len(gts)


def textvqa_question(prompt: str) -> str:
    """The question inside a TextVQA prompt, as LLaVA's ``eval_textvqa.py`` finds it."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if m is None:
            raise V2LError(f"TextVQA prompt '{prompt[:60]}' has no 'Question: ... Short answer:'")
        question = m.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise V2LError(f"TextVQA prompt '{prompt[:60]}' is not one of LLaVA's layouts "
                       "(question, optional OCR line, instruction)")
    return question.lower()


def score_textvqa(answers_path, annotations_path) -> Score:
    """TextVQA val: the mean of ``textvqa_accuracy``. Answers are matched to annotations as
    LLaVA's script does: the answer's question_id is the image id, with the question read
    back from its prompt (or, failing that, the annotation's own question id)."""
    data = read_json(annotations_path, "TextVQA's annotations (TextVQA_0.5.1_val.json)")
    if not isinstance(data, dict) or "data" not in data:
        raise V2LError(f"{annotations_path}: not TextVQA's annotations (no 'data')")
    by_image = {(str(a["image_id"]), a["question"].lower()): a for a in data["data"]}
    by_qid = {str(a["question_id"]): a for a in data["data"]}
    per = {}
    for row in read_answers(answers_path):
        qid = str(row["question_id"])
        ann = by_image.get((qid, textvqa_question(row.get("prompt", "")))) or by_qid.get(qid)
        if ann is None:
            raise V2LError(f"{answers_path}: question {qid} is not in {annotations_path}; score "
                           "against the annotations of the split that was run")
        key = f"{ann['question_id']}"
        if key in per:
            raise V2LError(f"{answers_path}: question {key} is answered twice")
        per[key] = textvqa_accuracy(row["text"], ann["answers"])
    n = len(per)
    return Score("textvqa", {"accuracy": _pct(sum(per.values()) / n) if n else None, "n": n,
                             "n_annotated": len(data["data"]), "complete": n == len(data["data"])}, per)


def score_vqav2(answers_path, annotations_path) -> Score:
    """VQAv2 (val) as the test server scores LLaVA's upload: the output normalised by
    ``evalai_answer`` (LLaVA's conversion), then the official VQA accuracy
    (``engine.vqa.vqa_accuracy``) against the ten answers; also per answer type."""
    data = read_json(annotations_path, "VQAv2's annotations (v2_mscoco_val2014_annotations.json)")
    if not isinstance(data, dict) or "annotations" not in data:
        raise V2LError(f"{annotations_path}: not VQAv2's annotations (no 'annotations')")
    anns = {str(a["question_id"]): a for a in data["annotations"]}
    answers = _by_id(read_answers(answers_path), answers_path)
    _unknown(answers, anns, answers_path, annotations_path)
    per, types = {}, {}
    for qid, row in answers.items():
        a = anns[qid]
        per[qid] = vqa_accuracy(evalai_answer(row["text"]), [x["answer"] for x in a["answers"]])
        types.setdefault(a.get("answer_type", "all"), []).append(per[qid])
    n = len(per)
    return Score("vqav2", {"accuracy": _pct(sum(per.values()) / n) if n else None,
                           "types": {k: _pct(sum(v) / len(v)) for k, v in sorted(types.items())},
                           "n": n, "n_annotated": len(anns), "complete": n == len(anns)}, per)


# ----------------------------------------------------------------------------- MMBench dev, generated sets

def option_letter(text: str, letters=MMBENCH_OPTIONS) -> str:
    """The option letter of an output: the letter alone, the first character of "X. ..." or
    "X) ...", or the one "The answer is X." in it; else "FAILED"."""
    t = text.strip()
    if t in letters:
        return t
    if len(t) >= 2 and t[0] in letters and t[1] in ".)" and (len(t) == 2 or t[2] == " "):
        return t[0]
    found = re.findall(r"The answer is ([A-Z])", t)
    return found[0] if len(found) == 1 and found[0] in letters else "FAILED"


def score_mmbench(answers_path, tsv_path) -> Score:
    """MMBench dev offline (the TSV's ``answer`` column): an answer is right when the option
    its letter names (in that answer's own option order, ``options``, where LLaVA's
    ``--all-rounds`` rotated them) is the correct option's text; a question is right when
    all its answers (rounds) are: MMBench's circular rule when there are several. The
    letter is read by ``option_letter``, not by MMBench's ChatGPT matching: not the official
    number (that comes from the upload), but the same questions under every condition."""
    rows = {str(r["index"]): r for r in _read_tsv(tsv_path)}
    if "answer" not in next(iter(rows.values())):
        raise V2LError(f"{tsv_path}: no 'answer' column (a test split); use write_mmbench_upload")
    rounds: dict[str, list[bool]] = {}
    for a in read_answers(answers_path):
        qid = str(a["question_id"])
        if qid not in rows:
            raise V2LError(f"{answers_path}: question {qid} is not in {tsv_path}")
        row = rows[qid]
        original = [row[c] for c in MMBENCH_OPTIONS if c in row and not _is_none(row[c])]
        options = a.get("options") or original
        letter = option_letter(a["text"], MMBENCH_OPTIONS[:len(options)])
        chosen = options[MMBENCH_OPTIONS.index(letter)] if letter != "FAILED" else None
        rounds.setdefault(qid, []).append(chosen is not None and chosen == row[row["answer"].strip()])
    per = {qid: float(all(v)) for qid, v in rounds.items()}
    n = len(per)
    return Score("mmbench", {"accuracy": _pct(sum(per.values()) / n) if n else None, "n": n,
                             "circular": any(len(v) > 1 for v in rounds.values()),
                             "n_annotated": len(rows), "complete": n == len(rows)}, per)


def named_option(text: str, options) -> str | None:
    """The option ``text`` names first (whole words, any case; of two starting at the same
    place the longer), or None where it names none: "The shape is red" -> "red",
    "circle\nUSER: ..." -> "circle". As LLaVA's MME and POPE scorers find "yes" or "no" in a
    free answer, for a generated question file that lists each question's ``options``."""
    best = None
    for option in options:
        m = re.search(r"(?<!\w)" + re.escape(str(option).lower()) + r"(?!\w)", text.lower())
        if m and (best is None or (m.start(), -len(option)) < (best[0], -len(best[1]))):
            best = (m.start(), str(option))
    return None if best is None else best[1]


def score_exact(answers_path, questions_path) -> Score:
    """Exact match for a question file whose rows carry their ``answer`` (a generated set in
    LLaVA's format, e.g. the demo's): the output with GQA's conversion (trailing periods
    removed, lower case) against the answer in lower case; overall and per ``category``.
    A row that lists its ``options`` is scored by the option the output names first
    (``named_option``) instead: for a model that answers in a sentence or runs on past its
    answer (the demo's frozen stand-in LLM has no end-of-answer in vicuna_v1)."""
    questions = {str(q["question_id"]): q for q in load_questions(questions_path)}
    missing = [k for k, q in questions.items() if "answer" not in q]
    if missing:
        raise V2LError(f"{questions_path}: question {missing[0]} has no 'answer'; score_exact needs "
                       "the answer in every row")
    answers = _by_id(read_answers(answers_path), answers_path)
    _unknown(answers, questions, answers_path, questions_path)
    per, cats = {}, {}
    for qid, row in answers.items():
        q = questions[qid]
        if q.get("options"):
            per[qid] = float((named_option(row["text"], q["options"]) or "").lower()
                             == str(q["answer"]).lower())
        else:
            per[qid] = float(row["text"].rstrip(".").lower() == str(q["answer"]).lower())
        cats.setdefault(q.get("category") or "all", []).append(per[qid])
    n = len(per)
    return Score("exact", {"accuracy": _pct(sum(per.values()) / n) if n else None,
                           "categories": {k: _pct(sum(v) / len(v)) for k, v in sorted(cats.items())},
                           "n": n, "n_annotated": len(questions), "complete": n == len(questions)}, per)


# ----------------------------------------------------------------------------- uploads

def write_vqav2_upload(answers_path, questions_path, out_path) -> int:
    """VQAv2 test-dev upload (LLaVA's ``convert_vqav2_for_submission.py``): a JSON list of
    ``{question_id, answer}`` over every question of the question file, the answer
    normalised by ``evalai_answer``, "" where unanswered. Returns the number answered."""
    answers = _by_id(read_answers(answers_path), answers_path)
    questions = read_jsonl(questions_path, "LLaVA's VQAv2 test question file "
                           "(llava_vqav2_mscoco_test2015.jsonl)")
    out = [{"question_id": q["question_id"],
            "answer": evalai_answer(answers[str(q["question_id"])]["text"])
            if str(q["question_id"]) in answers else ""} for q in questions]
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f)
    return sum(str(q["question_id"]) in answers for q in questions)


def write_mmbench_upload(answers_path, tsv_path, out_path) -> tuple[Path, str]:
    """MMBench upload (LLaVA's ``convert_mmbench_for_submission.py``): the TSV without the
    columns hint, category, source, image, comment, l2-category, a ``prediction`` column
    inserted as the 7th (the output of the answer with that index; the last one where there
    are several), as xlsx. Without pandas and openpyxl it writes the same table as TSV
    (``out_path`` with suffix .tsv) and says so. Returns (path written, note)."""
    answers = {}
    for row in read_answers(answers_path):
        answers[str(row["question_id"])] = row["text"]
    out_path = Path(out_path)
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is not None:
        df = pd.read_table(tsv_path)
        df = df.drop(columns=[c for c in MMBENCH_DROPPED if c in df.columns])
        df.insert(min(6, len(df.columns)), "prediction",
                  [answers.get(str(i)) for i in df["index"]])
        try:
            import openpyxl  # noqa: F401
        except ImportError:
            path = out_path.with_suffix(".tsv")
            with atomic_path(path) as tmp:
                df.to_csv(tmp, sep="\t", index=False)
            return path, "openpyxl is not installed: wrote TSV (pip install openpyxl for xlsx)"
        path = out_path.with_suffix(".xlsx")
        buffer = io.BytesIO()     # pandas picks the format by the file's suffix: write bytes first
        df.to_excel(buffer, index=False, engine="openpyxl")
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(buffer.getvalue())
        return path, "xlsx"
    rows = _read_tsv(tsv_path)
    columns = [c for c in rows[0] if c not in MMBENCH_DROPPED]
    columns.insert(min(6, len(columns)), "prediction")
    path = out_path.with_suffix(".tsv")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(columns)
        for r in rows:
            w.writerow([answers.get(str(r["index"]), "") if c == "prediction" else r[c] for c in columns])
    return path, "pandas is not installed: wrote TSV (pip install pandas openpyxl for xlsx)"


# ----------------------------------------------------------------------------- retention

def retention(upper, lower, voco, n_boot: int = 2000, seed: int = 0) -> dict:
    """Retention = (voco - lower) / (upper - lower) of a benchmark's mean per-question score,
    with a paired bootstrap 95% interval (``engine.voco.retention_interval``). Each argument
    is a ``Score`` or its ``per_question``; the three must cover the same questions.
    ``retention`` is None where upper does not beat lower."""
    from engine.voco import retention_interval   # torch and transformers: only when needed
    u, lo, v = (x.per_question if isinstance(x, Score) else x for x in (upper, lower, voco))
    if not (set(u) == set(lo) == set(v)) or not u:
        raise V2LError("retention: upper, lower and voco must have answered the same, non-empty "
                       f"questions (got {len(u)}, {len(lo)}, {len(v)})")
    keys = sorted(u)
    xs = [[float(d[k]) for k in keys] for d in (u, lo, v)]
    means = [sum(x) / len(x) for x in xs]
    gap = means[0] - means[1]
    return {"retention": (means[2] - means[1]) / gap if gap > 0 else None,
            "ci95": retention_interval(*xs, n_boot=n_boot, seed=seed),
            "n": len(keys), "upper": means[0], "lower": means[1], "voco": means[2]}
