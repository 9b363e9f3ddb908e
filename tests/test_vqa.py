"""VQA: VQAv2 accuracy and normalisation, demo questions, VQAv2 files, the script
(variants, intervals, ceiling skipped without labels, bad input)."""
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from data.captions import demo_questions, load_vqav2, spread_images
from engine.vqa import normalize, vqa_accuracy
from fixtures_open_ended import make_setup, run_script
from utils.errors import V2LError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("vqa"))


def test_vqa_accuracy():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0   # >= 3 of every other 9
    assert vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # 2 "yes": leaving out a "yes" leaves 1 match (1/3), leaving out a "no" leaves 2 (2/3)
    assert vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 / 3 + 16 / 3) / 10)
    assert vqa_accuracy("maybe", ["yes"] * 2 + ["no"] * 8) == 0.0
    # annotators disagree: both sides normalised (articles, number words, punctuation, case)
    assert vqa_accuracy("Two dogs.", ["2 dogs"] * 4 + ["dogs"] * 6) == 1.0
    assert vqa_accuracy("the red one\n", ["red one"] * 5 + ["red"] * 5) == 1.0
    # annotators agree: the official script compares the raw answer (a quirk kept)
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert normalize("Dont, it's 3.5 ft!") == "don't it's 3.5 ft"
    assert normalize("a man/woman") == "man woman" and normalize("one (1)") == "1 1"


def test_contractions_follow_the_official_table():
    """The VQA/EvalAI table as it applies to lower-cased answers: a form with one apostrophe
    left out is restored, its capitalised keys ("Im", "Ive") never match, "somebody'd" becomes
    "somebodyd"; common words stay."""
    assert normalize("couldnt") == "couldn't" and normalize("couldn'tve") == "couldn't've"
    assert normalize("couldnt've") == "couldn't've" and normalize("hed've") == "he'd've"
    assert normalize("somebody'd") == "somebodyd"
    for word in ("im", "ive", "lets", "shes", "well", "its"):
        assert normalize(word) == word


def test_demo_questions(setup):
    qs = demo_questions(setup["world"], "val", seed=0)
    assert len(qs) == 4 * 3 * 3 and qs == demo_questions(setup["world"], "val", seed=0)
    by_type = {t: [q for q in qs if q.qtype == t] for t in ("colour", "shape", "yes/no")}
    for q in by_type["colour"] + by_type["shape"]:
        colour, shape = Path(q.path).parent.name.split("_")
        assert q.answers == [colour if q.qtype == "colour" else shape] * 10
        assert q.labels == f"{colour} {shape}"
    yes = [q for q in by_type["yes/no"] if q.answers[0] == "yes"]
    assert all(re.fullmatch(r"Is the shape (red|blue)\?", q.question) for q in by_type["yes/no"])
    assert all(Path(q.path).parent.name.startswith(q.question.split()[-1][:-1]) for q in yes)
    assert 0 < len(yes) < 12
    assert {q.image_id for q in spread_images(qs, 2)} == {qs[0].image_id, qs[18].image_id}
    with pytest.raises(V2LError, match="expected class folders named <colour>_<shape>"):
        demo_questions(Path(setup["world"]).parent, "tok", seed=0)


def make_vqav2(tmp: Path, n_images: int = 4) -> dict[str, str]:
    (tmp / "val2014").mkdir(parents=True)
    questions, annotations = [], []
    for img in range(n_images):
        Image.new("RGB", (40, 30), (60 * img, 100, 20)).save(tmp / "val2014" / f"COCO_val2014_{img:012d}.jpg")
        for j, (q, a, t) in enumerate([("What color is it?", "green", "what color is the"),
                                       ("Is it big?", "yes", "is the")]):
            qid = img * 10 + j
            questions.append({"image_id": img, "question": q, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": img, "question_type": t,
                                "answer_type": "yes/no" if a == "yes" else "other",
                                "answers": [{"answer": a, "answer_id": k + 1} for k in range(10)]})
    files = {"q": tmp / "q.json", "a": tmp / "a.json"}
    files["q"].write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    files["a"].write_text(json.dumps({"annotations": annotations}))
    return {k: str(v) for k, v in files.items()} | {"images": str(tmp / "val2014")}


def test_vqav2_reader(tmp_path):
    f = make_vqav2(tmp_path)
    items, pool = load_vqav2(f["q"], f["a"], f["images"])
    assert len(items) == 8 and pool is items and items[1].answers == ["yes"] * 10
    assert items[2].path.endswith("COCO_val2014_000000000001.jpg") and items[0].qtype == "what color is the"
    Path(f["a"]).write_text(json.dumps({"annotation": []}))
    with pytest.raises(V2LError, match=r"a.json: not a VQAv2 annotations file"):
        load_vqav2(f["q"], f["a"], f["images"])


def vqa_args(setup, out, *extra):
    return ["--questions_file", "", "--data_dir", setup["world"], "--tokenizer_dir", setup["tokenizer"],
            "--llm", setup["llm"], "--global_k", "3", "--k_shot", "2", "--max_images", "4",
            "--batch_size", "6", "--device", "cpu", "--num_workers", "0", "--gallery", "3",
            "--max_new_tokens", "4", "--out_dir", str(out), *extra]


def test_eval_vqa_script_demo(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script("eval_vqa.py", vqa_args(setup, out), monkeypatch)
    res = json.loads((out / "results.json").read_text())
    assert set(res["variants"]) == {"image", "ceiling", "floor"} and res["skipped"] == {}
    for per in res["variants"].values():
        assert set(per) == {"all", "colour", "shape", "yes/no"} and per["all"]["n"] == 12
        assert all(r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] for r in per.values())
    rows = {json.loads(x)["key"]: json.loads(x) for x in (out / "ceiling" / "answers.jsonl").read_text().splitlines()}
    for key, row in rows.items():
        image, qtype = key.split("#")
        colour, shape = image.split("/")[1].split("_")
        assert row["prompt"].endswith(f"< {colour} {shape} >\nQuestion: "
                                      + row["prompt"].split("Question: ")[-1])
        assert all(e.startswith("train/") and e.endswith("#" + qtype) for e in row["examples"])
    assert (out / "gallery.png").is_file() and (out / "manifest.json").is_file()
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + 3 * 4 and "skipped" not in (out / "results.md").read_text()
    assert not list(out.glob("*/.chunks-*"))


def test_eval_vqa_script_vqav2(setup, tmp_path, monkeypatch, capsys):
    f = make_vqav2(tmp_path / "vqa")
    args = vqa_args(setup, tmp_path / "out", "--questions_file", f["q"], "--annotations_file", f["a"],
                    "--image_dir", f["images"], "--k_shot", "1", "--gallery", "0")
    run_script("eval_vqa.py", args, monkeypatch)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["variants"]) == {"image", "floor"} and "labels_file" in res["skipped"]["ceiling"]
    assert set(res["variants"]["floor"]) == {"all", "yes/no", "other"}
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[0] == "| variant | answer type | n | accuracy % | 95% CI |" and len(table) == 2 + 6 + 2
    assert table[-1].startswith("skipped: ceiling (") and "labels_file" in table[-1]
    capsys.readouterr()
    (Path(f["images"]) / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(SystemExit):
        run_script("eval_vqa.py", args + ["--out_dir", str(tmp_path / "o2")], monkeypatch)
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert re.fullmatch(r"error: 1 of \d+ images listed in .*q.json are missing from .*val2014 "
                        r"\(e.g. .*COCO_val2014_000000000002.jpg\); pass --image_dir.*", err), err
    Path(f["q"]).write_text("[1, 2]")
    with pytest.raises(SystemExit):
        run_script("eval_vqa.py", args + ["--out_dir", str(tmp_path / "o3")], monkeypatch)
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert err.startswith("error: ") and "not a VQAv2 questions file" in err
