"""LLaVA's benchmark harness: each scorer on hand-made answer files (tests/fixtures/llava/) whose
expected scores are worked out here by hand from the benchmark's official scoring rules."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from engine.llava_bench import (OPTION_LETTER, SHORT_ANSWER, answer_row, evalai_answer, load_questions,
                                mme_answer, mmbench_questions, option_letter, score_exact, score_mmbench, pope_answer, read_answers, retention,
                                score_gqa, score_mme, score_pope, score_scienceqa, score_seed,
                                score_textvqa, score_vqav2, scienceqa_letter, scienceqa_questions,
                                textvqa_accuracy, with_prompt, write_answers, write_mmbench_upload,
                                write_vqav2_upload)
from engine.vqa import vqa_accuracy
from utils.errors import V2LError

F = Path(__file__).parent / "fixtures" / "llava"


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------- files and prompts

def test_prompts_and_question_files(tmp_path):
    assert with_prompt("Is it red?", "short") == "Is it red?\n" + SHORT_ANSWER
    assert with_prompt("Is it red?\n" + SHORT_ANSWER, "short") == "Is it red?\n" + SHORT_ANSWER
    assert with_prompt("Which?\nA. x", "option") == "Which?\nA. x\n" + OPTION_LETTER
    qs = load_questions(F / "gqa_questions.jsonl", prompt="short")
    assert [q["text"].endswith("\n" + SHORT_ANSWER) for q in qs] == [True] * 4
    assert qs[2]["text"] == "What color is the bus?\n" + SHORT_ANSWER          # appended where missing
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "image": "a.jpg"}\n')
    with pytest.raises(V2LError, match="q.jsonl: question 1 has no text"):
        load_questions(bad)


def test_answers_file_is_llavas_format(tmp_path):
    q = {"question_id": 7, "text": "Is it red?\n" + SHORT_ANSWER, "prompt": "Is it red?\n" + SHORT_ANSWER}
    rows = [answer_row(q, "Yes", "llava-v1.5-7b-voco1")]
    write_answers(tmp_path / "a.jsonl", rows)
    line = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    assert list(line) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert line["question_id"] == 7 and line["text"] == "Yes" and line["metadata"] == {}
    assert answer_row(q, "Yes", "llava-v1.5-7b-voco1")["answer_id"] == line["answer_id"]
    assert answer_row(q, "No", "llava-v1.5-7b-voco1")["answer_id"] != line["answer_id"]
    assert read_answers(tmp_path / "a.jsonl") == [line]


def test_mmbench_and_scienceqa_questions_as_llava_builds_them():
    rows = mmbench_questions(F / "mmbench" / "mmbench_dev_20230712.tsv")
    # options up to the first empty cell; the hint before the question; the letter instruction last
    assert rows[0]["text"] == "What colour is the car?\nA. red\nB. blue\n" + OPTION_LETTER
    assert rows[0]["prompt"] == "What colour is the car?\nA. red\nB. blue"
    assert rows[1]["text"] == ("Look closely.\nHow many dogs are there?\nA. 1\nB. 2\nC. 3\nD. 4\n"
                               + OPTION_LETTER)
    assert rows[1]["question_id"] == 1 and rows[1]["image_b64"] == "d29ybGQ="
    sqa = scienceqa_questions(F / "sqa" / "llava_test_CQM-A.json")
    assert sqa[0]["text"] == ("Context: N/A\nQuestion: Which color is the bird?\nOptions: (A) red (B) blue "
                              "(C) green\n" + OPTION_LETTER)
    assert sqa[0]["prompt"] == "<image>\n" + sqa[0]["text"] and sqa[0]["image"] == "1/image.png"
    assert sqa[1]["image"] is None and sqa[1]["prompt"] == sqa[1]["text"]


# ----------------------------------------------------------------------------- scorers

def test_gqa():
    s = score_gqa(F / "gqa_answers.jsonl", F / "gqa_questions.json")
    # "Yes." -> "yes" right; "Left" -> "left" right; "white and red" wrong; "No.." -> "no" right
    assert s.per_question == {"201640614": 1.0, "201640615": 1.0, "201640616": 0.0, "201640617": 1.0}
    assert s.metrics["accuracy"] == approx(75.0)
    assert s.metrics["binary"] == approx(100.0) and s.metrics["open"] == approx(50.0)
    assert s.metrics["n"] == 4 and s.metrics["n_annotated"] == 4 and s.metrics["complete"]


def test_gqa_refuses_questions_outside_the_balanced_set(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": "201640618", "prompt": "", "text": "red"}))
    with pytest.raises(V2LError, match="question 201640618 .* is not in"):
        score_gqa(tmp_path / "a.jsonl", F / "gqa_questions.json")


def test_pope():
    assert [pope_answer(t) for t in ("Yes", "No, there is not.", "There is no dog.", "NO",
                                     "I do not think so", "Yes. No.")] == \
        ["yes", "no", "no", "yes", "no", "yes"]
    s = score_pope(F / "pope_answers.jsonl", F / "pope" / "llava_pope_test.jsonl", F / "pope")
    random, popular = s.metrics["categories"]["random"], s.metrics["categories"]["popular"]
    # random: yes/yes TP, no/no TN, no/yes FN, yes/no FP
    assert (random["TP"], random["FP"], random["TN"], random["FN"]) == (1, 1, 1, 1)
    assert [random[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == \
        [approx(50.0)] * 5
    # popular: yes/yes TP, "not" -> no/no TN, "NO" -> yes/no FP
    assert (popular["TP"], popular["FP"], popular["TN"], popular["FN"]) == (1, 1, 1, 0)
    assert popular["accuracy"] == approx(200 / 3) and popular["precision"] == approx(50.0)
    assert popular["recall"] == approx(100.0) and popular["f1"] == approx(200 / 3)
    assert popular["yes_ratio"] == approx(200 / 3)
    assert s.metrics["f1"] == approx((50 + 200 / 3) / 2) and s.metrics["accuracy"] == approx((50 + 200 / 3) / 2)
    assert s.per_question == {"1": 1.0, "2": 1.0, "3": 0.0, "4": 0.0, "5": 1.0, "6": 1.0, "7": 0.0}
    assert s.metrics["complete"]


def test_pope_pairs_in_order_and_checks_the_images(tmp_path):
    lines = (F / "pope_answers.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join([lines[2], lines[1], lines[0]] + lines[3:]) + "\n")  # 2 before 1
    with pytest.raises(V2LError, match="question 2 .* is paired with .*in order"):
        score_pope(tmp_path / "a.jsonl", F / "pope" / "llava_pope_test.jsonl", F / "pope")


def test_mme(tmp_path):
    assert [mme_answer(t) for t in ("Yes", "no", "Yes, there is", "It is", "Not sure", "nope")] == \
        ["yes", "no", "yes", "other", "no", "no"]
    s = score_mme(F / "mme_answers.jsonl", F / "mme")
    existence, artwork = s.metrics["categories"]["existence"], s.metrics["categories"]["artwork"]
    # existence: 3 of 4 questions right (acc 75), 1 of 2 images with both right (acc+ 50)
    assert existence["acc"] == approx(75.0) and existence["acc_plus"] == approx(50.0)
    assert existence["score"] == approx(125.0)
    # artwork: "It is" -> other (wrong); the Monet line has MME's double space before the suffix
    assert artwork["acc"] == approx(50.0) and artwork["acc_plus"] == approx(0.0)
    assert s.metrics["perception"] is None and "OCR" in s.metrics["perception_missing"]
    assert not s.metrics["complete"] and len(s.per_question) == 6
    (tmp_path / "a.jsonl").write_text("\n".join((F / "mme_answers.jsonl").read_text().splitlines()[:3]))
    with pytest.raises(V2LError, match="000000044279.txt has 1 answers"):
        score_mme(tmp_path / "a.jsonl", F / "mme")


def test_mme_totals_when_every_category_is_answered(tmp_path):
    mme = tmp_path / "mme"
    rows = []
    for part in (("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR"),
                 ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")):
        for c in part:
            (mme / c).mkdir(parents=True)
            (mme / c / "1.txt").write_text("Q1? Please answer yes or no.\tYes\nQ2? Please answer yes or no.\tNo\n")
            rows += [{"question_id": f"{c}/1.png", "prompt": "Q1?\n" + SHORT_ANSWER, "text": "Yes"},
                     {"question_id": f"{c}/1.png", "prompt": "Q2?\n" + SHORT_ANSWER,
                      "text": "No" if c != "OCR" else "Yes"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = score_mme(tmp_path / "a.jsonl", mme)
    # nine perfect perception categories (200 each) and OCR at acc 50 + acc+ 0; cognition 4 x 200
    assert s.metrics["perception"] == approx(9 * 200 + 50) and s.metrics["cognition"] == approx(800)
    assert s.metrics["complete"]


def test_scienceqa():
    assert [scienceqa_letter(t) for t in ("C", "D. hen", "The answer is A.", "AB", "", "b")] == \
        ["C", "D", "A", "FAILED", "FAILED", "FAILED"]
    s = score_scienceqa(F / "sqa_answers.jsonl", F / "sqa" / "problems.json", F / "sqa" / "pid_splits.json")
    # 1: C = choice 2 right; 2: A right; 3: D right; 4: C is beyond its two choices: wrong
    assert s.per_question == {"1": 1.0, "2": 1.0, "3": 1.0, "4": 0.0}
    assert s.metrics["accuracy"] == approx(75.0)
    assert s.metrics["img_accuracy"] == approx(200 / 3) and s.metrics["n_img"] == 3     # 1, 3, 4
    assert s.metrics["complete"]


def test_seed():
    s = score_seed(F / "seed_answers.jsonl", F / "seed" / "SEED-Bench.json")
    # exact match: "A" right, "B." wrong, "C" right
    assert s.per_question == {"101": 1.0, "102": 0.0, "103": 1.0}
    assert s.metrics["accuracy"] == approx(200 / 3)
    assert s.metrics["types"] == {"Instance Identity": approx(100.0), "Scene Understanding": approx(50.0)}
    assert s.metrics["n_annotated"] == 3 and s.metrics["complete"]      # the video question is not counted


def test_evalai_normalisation():
    assert evalai_answer("Two dogs.") == "2 dogs"
    assert evalai_answer("The Dog's bone") == "dog 's bone"
    assert evalai_answer("dont know") == "don't know"
    assert evalai_answer("3,000") == "3000" and evalai_answer("1.5") == "1.5"
    assert evalai_answer("x-ray") == "x ray" and evalai_answer("Yes?") == "yes"
    # the table's own quirks: capitalised keys never apply, "she's"/"let's" stay, "somebody'd" loses it
    assert evalai_answer("Im here") == "im here" and evalai_answer("shes") == "shes"
    assert evalai_answer("somebody'd") == "somebodyd" and evalai_answer("couldn'tve") == "couldn't've"


def test_textvqa():
    gts = ["two", "3", "3", "Two.", "3", "3", "3", "3", "3", "3"]
    # "2" matches the 2 normalised "two"s: 1/3 for each of those 2 left out, 2/3 for the other 8
    assert textvqa_accuracy("2", gts) == approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    s = score_textvqa(F / "textvqa_answers.jsonl", F / "textvqa" / "TextVQA_0.5.1_val.json")
    # 34602: "Dakota" matches 3 ("dakota" x2, "Dakota."): 2/3 for those 3, 1 for the other 7 -> 0.9
    assert s.per_question == {"34602": approx(0.9), "34603": approx(0.6)}
    assert s.metrics["accuracy"] == approx(75.0)
    assert s.metrics["n"] == 2 and s.metrics["n_annotated"] == 3 and not s.metrics["complete"]


def test_vqav2_val():
    s = score_vqav2(F / "vqav2_answers.jsonl", F / "vqav2" / "v2_mscoco_val2014_annotations.json")
    # "Yes." -> "yes" against ten "yes": 1; "two" -> "2" against 2, 2, two, 3 x 7: 0.9;
    # "Red" -> "red" against red, dark red x 9: 0.3
    assert s.per_question == {"262148000": approx(1.0), "262148001": approx(0.9), "393225000": approx(0.3)}
    assert s.metrics["accuracy"] == approx(220 / 3)
    assert s.metrics["types"] == {"number": approx(90.0), "other": approx(30.0), "yes/no": approx(100.0)}
    # the conversion matters: the official score of the raw "Yes." (all ten agree: no normalising) is 0
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 0.0


def test_mmbench_dev_offline(tmp_path):
    assert [option_letter(t) for t in ("A", "B. blue", "C)", "The answer is D.", "AB", "E", "blue")] == \
        ["A", "B", "C", "D", "FAILED", "FAILED", "FAILED"]
    tsv = F / "mmbench" / "mmbench_dev_20230712.tsv"
    s = score_mmbench(F / "mmbench_answers.jsonl", tsv)
    # 0: "A" = red, the answer A; 1: "B" = "2", the answer C = "3"
    assert s.per_question == {"0": 1.0, "1": 0.0} and s.metrics["accuracy"] == approx(50.0)
    assert not s.metrics["circular"]
    # circular: every rotation must name the right option ("3"): rounds 1-2 do, round 3 does not
    rows = [{"question_id": 1, "round_id": 0, "text": "C", "options": ["1", "2", "3", "4"]},
            {"question_id": 1, "round_id": 1, "text": "B", "options": ["2", "3", "4", "1"]},
            {"question_id": 0, "round_id": 0, "text": "A", "options": ["red", "blue"]},
            {"question_id": 0, "round_id": 1, "text": "A", "options": ["blue", "red"]}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = score_mmbench(tmp_path / "a.jsonl", tsv)
    assert s.per_question == {"1": 1.0, "0": 0.0} and s.metrics["circular"]


def test_exact_match_on_a_generated_set(tmp_path):
    qs = [{"question_id": i, "image": f"{i}.png", "text": f"q{i}\n" + SHORT_ANSWER, "answer": a, "category": c}
          for i, (a, c) in enumerate([("red", "colour"), ("blue", "colour"), ("circle", "shape"),
                                      ("top left", "position")])]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in qs))
    texts = ["Red.", "green", "circle", "Top left"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(answer_row(q, t, "m")) for q, t in zip(qs, texts)))
    s = score_exact(tmp_path / "a.jsonl", tmp_path / "q.jsonl")
    assert s.per_question == {"0": 1.0, "1": 0.0, "2": 1.0, "3": 1.0}
    assert s.metrics["categories"] == {"colour": approx(50.0), "position": approx(100.0), "shape": approx(100.0)}
    assert s.metrics["accuracy"] == approx(75.0)


def test_named_option_finds_the_first_option_a_free_answer_names(tmp_path):
    from engine.llava_bench import named_option
    places = ["top left", "top right", "bottom left", "bottom right"]
    assert named_option("The shape is red, not blue", ["blue", "red"]) == "red"
    assert named_option("circle\nUSER: is it red", ["red", "circle"]) == "circle"
    assert named_option("In the Top Left.", places) == "top left"
    assert named_option("reddish", ["red"]) is None          # whole words only
    assert named_option("a gradient", ["plain", "gradient"]) == "gradient"
    assert named_option("nothing", ["red"]) is None
    qs = [{"question_id": 0, "image": "0.png", "text": "q", "answer": "red", "options": ["red", "blue"]},
          {"question_id": 1, "image": "1.png", "text": "q", "answer": "blue", "options": ["red", "blue"]},
          {"question_id": 2, "image": "2.png", "text": "q", "answer": "red"}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(q) for q in qs))
    texts = ["The shape is red\nUSER", "red or blue", "The shape is red"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(answer_row(q, t, "m")) for q, t in zip(qs, texts)))
    s = score_exact(tmp_path / "a.jsonl", tmp_path / "q.jsonl")
    assert s.per_question == {"0": 1.0, "1": 0.0, "2": 0.0}   # no options: exact match still


# ----------------------------------------------------------------------------- uploads

def test_vqav2_upload(tmp_path):
    n = write_vqav2_upload(F / "vqav2_answers.jsonl", F / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl",
                           tmp_path / "up.json")
    assert n == 3
    assert json.loads((tmp_path / "up.json").read_text()) == [
        {"question_id": 262148000, "answer": "yes"}, {"question_id": 262148001, "answer": "2"},
        {"question_id": 393225000, "answer": "red"}, {"question_id": 393225001, "answer": ""}]


def _check_mmbench_table(header, rows):
    assert header == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert [(str(r[0]), r[6]) for r in rows] == [("0", "A"), ("1", "B")]


@pytest.mark.parametrize("missing", [("openpyxl",), ("openpyxl", "pandas")])
def test_mmbench_upload_tsv(tmp_path, monkeypatch, missing):
    import builtins
    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name in missing:
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    path, note = write_mmbench_upload(F / "mmbench_answers.jsonl", F / "mmbench" / "mmbench_dev_20230712.tsv",
                                      tmp_path / "llava.xlsx")
    assert path == tmp_path / "llava.tsv" and missing[-1] in note and "wrote TSV" in note
    with open(path, newline="") as f:
        table = list(csv.reader(f, delimiter="\t"))
    _check_mmbench_table(table[0], table[1:])


def test_mmbench_upload_xlsx(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    path, note = write_mmbench_upload(F / "mmbench_answers.jsonl", F / "mmbench" / "mmbench_dev_20230712.tsv",
                                      tmp_path / "llava.xlsx")
    assert path.suffix == ".xlsx" and note == "xlsx"
    table = [list(r) for r in openpyxl.load_workbook(path).active.iter_rows(values_only=True)]
    _check_mmbench_table(table[0], table[1:])


# ----------------------------------------------------------------------------- retention

def test_retention():
    upper = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0}
    lower = {"a": 0.0, "b": 0.0, "c": 1.0, "d": 0.0}
    voco = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
    r = retention(upper, lower, voco)
    # (0.5 - 0.25) / (0.75 - 0.25)
    assert r["retention"] == approx(0.5) and r["n"] == 4
    lo, hi = r["ci95"]
    assert lo <= 0.5 <= hi
    same = retention(upper, upper, voco)
    assert same["retention"] is None and same["ci95"] is None
    with pytest.raises(V2LError, match="same, non-empty questions"):
        retention(upper, lower, {"a": 1.0})


def test_retention_from_scores(tmp_path):
    s = score_gqa(F / "gqa_answers.jsonl", F / "gqa_questions.json")
    worse = tmp_path / "w.jsonl"
    rows = read_answers(F / "gqa_answers.jsonl")
    for r in rows:
        r["text"] = "maybe"
    worse.write_text("\n".join(json.dumps(r) for r in rows))
    floor = score_gqa(worse, F / "gqa_questions.json")
    r = retention(s, floor, s)
    assert r["retention"] == approx(1.0) and r["upper"] == approx(0.75) and r["lower"] == approx(0.0)

