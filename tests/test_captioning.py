"""Captioning: PTB tokenisation, CIDEr-D/BLEU, data readers, prompts, examples, the script
(variants, gallery, bad input), resume (a killed run resumes; a changed setting or a tokenizer
retrained into the same directory does not) and torchrun equality."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.captions import check_images, load_captions, spread
from engine.captioning import PUNCTUATIONS, caption_scores, ptb_tokenize
import engine.open_ended
from engine.open_ended import (ExamplePicker, ImageWords, OpenEndedPrompter, Shot, StopAtSeparator,
                               cut_answer)
from fixtures_open_ended import ROOT, make_setup, run_script
from models.llm import encode_segment
from utils.errors import V2LError

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = {   # caption -> PTB tokens after pycocoevalcap's punctuation removal
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "Two dogs (a black one) play!": "two dogs -lrb- a black one -rrb- play",
    "The cat's toy isn't under the \"red\" chair; it's on the table...":
        "the cat 's toy is n't under the red chair it 's on the table",
    "A black-and-white photo at 5:30 p.m. near the U.S. border.":
        "a black-and-white photo at 5:30 p.m. near the u.s. border",
    "Don't eat it -- it costs $5.50, or 50% off.": "do n't eat it it costs $ 5.50 or 50 % off",
    "A kid can't hold [heavy] bags?": "a kid ca n't hold -lsb- heavy -rsb- bags",
    "Cannot believe you've got 'em, gonna go.": "can not believe you 've got 'em gon na go",
    "The dogs' ball is 'round the corner": "the dogs ball is round the corner",
    "Mr. Smith and 5,000 birds: a TV, etc.": "mr. smith and 5,000 birds a tv etc.",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("captioning"))


def test_ptb_tokenize():
    for text, tokens in SENTENCES.items():
        assert ptb_tokenize(text) == tokens, text


def test_ptb_tokenize_matches_java(tmp_path):
    """The Python tokenisation equals pycocoevalcap's Java PTBTokenizer where Java runs."""
    import importlib.util
    spec = importlib.util.find_spec("pycocoevalcap.tokenizer.ptbtokenizer")
    jar = Path(spec.origin).parent / "stanford-corenlp-3.4.1.jar"
    if shutil.which("java") is None or not jar.is_file():
        pytest.skip("Java or the CoreNLP jar is not available")
    src = tmp_path / "s.txt"
    src.write_text("\n".join(SENTENCES) + "\n")
    done = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                           "-preserveLines", "-lowerCase", str(src)], capture_output=True, text=True)
    java = [" ".join(w for w in line.split(" ") if w not in PUNCTUATIONS)
            for line in done.stdout.splitlines()]
    assert java == [ptb_tokenize(s) for s in SENTENCES]


def test_caption_scores():
    refs = {"1": ["A red circle sits on a plain grey background."],
            "2": ["Two dogs run through the tall green grass."],
            "3": ["An old man is reading a newspaper outside."]}
    exact = {k: v[0].upper().replace(".", " !") for k, v in refs.items()}   # case, punctuation
    s = caption_scores(exact, refs)
    # identical token sequences: every n-gram order's cosine is 1 -> CIDEr-D = 10 (x10 scale)
    assert s["CIDEr-D"] == pytest.approx(10.0) and s["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    wrong = caption_scores({"1": "two dogs", "2": "", "3": "a red circle"}, refs)
    assert wrong["CIDEr-D"] < 1.0 and wrong["per_key_cider"]["2"] == 0.0
    partial = caption_scores({"1": "a red circle on a background", "2": "dogs in grass",
                              "3": "a man reading"}, refs)
    assert wrong["CIDEr-D"] < partial["CIDEr-D"] < 10.0


def test_caption_readers(tmp_path):
    (tmp_path / "val2014").mkdir()
    karpathy = {"images": [
        {"filepath": "val2014", "filename": f"{i}.jpg", "split": s, "cocoid": i,
         "sentences": [{"raw": f"caption {i} a"}, {"raw": f"caption {i} b "}]}
        for i, s in enumerate(["test", "test", "train", "restval", "val"])]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    q, pool, fmt = load_captions(tmp_path / "k.json", tmp_path, "test", "train")
    assert fmt == "karpathy" and [x.image_id for x in q] == ["0", "1"]
    assert [x.image_id for x in pool] == ["2", "3"] and q[0].captions == ["caption 0 a", "caption 0 b"]
    assert q[0].path == str(tmp_path / "val2014" / "0.jpg")
    coco = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 7, "caption": "x"}, {"image_id": 8, "caption": "y"},
                            {"image_id": 7, "caption": "z"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    q, pool, fmt = load_captions(tmp_path / "c.json", tmp_path / "val2014")
    assert fmt == "coco" and q is pool and q[0].captions == ["x", "z"]
    (tmp_path / "m.json").write_text(json.dumps({"val/a.png": "one", "train/b.png": ["two", "2"]}))
    q, pool, fmt = load_captions(tmp_path / "m.json", None, "val", "train")
    assert fmt == "mapping" and q[0].path == str(tmp_path / "val" / "a.png")
    assert pool[0].captions == ["two", "2"]
    (tmp_path / "bad.json").write_text(json.dumps({"images": "nope"}))
    with pytest.raises(V2LError, match=r"bad.json: unknown captions format; expected a Karpathy"):
        load_captions(tmp_path / "bad.json")
    with pytest.raises(V2LError, match=r"2 of 2 images listed in c.json are missing from"):
        check_images(load_captions(tmp_path / "c.json", tmp_path / "val2014")[0], "c.json",
                     tmp_path / "val2014")
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], 5) == [1, 2]


def test_example_picker():
    class It:
        def __init__(self, i, img, qtype=""):
            self.key, self.image_id, self.qtype = f"k{i}", img, qtype
    pool = [It(i, f"img{i // 2}", "ab"[i % 2]) for i in range(40)]
    pick = ExamplePicker(pool, 3, seed=5)
    a = [pick(q) for q in pool]
    assert a == [ExamplePicker(pool, 3, seed=5)(q) for q in pool]            # seeded
    assert a != [ExamplePicker(pool, 3, seed=6)(q) for q in pool]
    assert all(pool[i].image_id != q.image_id for q, idx in zip(pool, a) for i in idx)
    assert len({tuple(x) for x in a}) > 10                                     # per query
    typed = ExamplePicker(pool, 2, seed=0, fixed=True, same_type=True)
    got = [typed(q) for q in pool]
    assert all(pool[i].qtype == q.qtype for q, idx in zip(pool, got) for i in idx)
    assert len({tuple(x) for x in got}) <= 2 + 4             # one set per type (+ own-image swaps)
    with pytest.raises(V2LError, match="lower --k_shot"):
        ExamplePicker(pool[:4], 3, seed=0)(pool[0])


def test_prompt_layout_and_stop(setup):
    from models.llm import load_llm
    text_tokenizer = load_llm(setup["llm"], device="cpu").text_tokenizer
    p = OpenEndedPrompter(text_tokenizer)
    prompt = p.build([Shot(ImageWords("red tree", (5, 6)), None, "a cat."),
                      Shot(ImageWords(""), None, None)])
    local = text_tokenizer.decode([5, 6])
    assert prompt.text == (f"###\nInput: < red tree{local} >\nOutput: a cat."
                           "###\nInput: <  >\nOutput: ")
    enc = lambda s: encode_segment(text_tokenizer, s)  # noqa: E731
    assert prompt.ids == ([text_tokenizer.bos_token_id] + enc("###\nInput: < ") + enc("red tree")
                          + [5, 6] + enc(" >\nOutput: ") + enc("a cat.") + enc("###\nInput: < ")
                          + enc(" >\nOutput: "))
    vqa = p.build([Shot(ImageWords("w"), "Is it?", None)])
    assert vqa.text.endswith("< w >\nQuestion: Is it?\nAnswer: ")
    stop = StopAtSeparator(text_tokenizer)
    assert not stop.finished(enc("a red")) and stop.finished(enc("a red ###"))
    assert stop.finished(enc("a red\nthing")) and stop.allowed([]) == slice(None)
    assert cut_answer(" a red circle.###\nInput") == "a red circle." and cut_answer("x\ny") == "x"


def caption_args(setup, out, *extra):
    return ["--captions_file", str(Path(setup["world"]) / "captions.json"), "--split", "val",
            "--tokenizer_dir", setup["tokenizer"], "--llm", setup["llm"], "--global_k", "3",
            "--k_shot", "1", "--max_images", "4", "--batch_size", "3", "--max_new_tokens", "6",
            "--device", "cpu", "--num_workers", "0", "--gallery", "4", "--out_dir", str(out),
            *extra]


def read_rows(folder: Path) -> dict:
    """A variant's answers by query key, in query order."""
    return {r["key"]: r for r in map(json.loads, (folder / "answers.jsonl").read_text().splitlines())}


def chunk_folders(out: Path) -> list[Path]:
    return sorted(out.glob("*/.chunks-*"))


def test_eval_captioning_script(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    run_script("eval_captioning.py", caption_args(setup, out), monkeypatch)
    res = json.loads((out / "results.json").read_text())
    assert set(res["variants"]) == {"image", "ceiling", "floor"} and set(res["skipped"]) == {"METEOR", "SPICE"}
    for r in res["variants"].values():
        assert r["n"] == 4 and r["CIDEr-D_ci95"][0] <= r["CIDEr-D"] <= r["CIDEr-D_ci95"][1]
    refs = json.loads((Path(setup["world"]) / "captions.json").read_text())
    rows = {v: read_rows(out / v) for v in ("image", "ceiling", "floor")}
    keys = list(rows["image"])
    assert len(keys) == 4 and {k.split("/")[1] for k in keys} == {"red_circle", "red_square",
                                                                   "blue_circle", "blue_square"}
    for k in keys:
        ex = rows["image"][k]["examples"][0]
        assert ex.startswith("train/") and rows["floor"][k]["examples"] == [ex]
        assert rows["ceiling"][k]["prompt"] == (f"###\nInput: < {refs[ex]} >\nOutput: {refs[ex]}"
                                                f"###\nInput: < {refs[k]} >\nOutput: ")
        assert rows["floor"][k]["prompt"].endswith("###\nInput: <  >\nOutput: ")
        assert "###" not in rows["image"][k]["answer"] and "\n" not in rows["image"][k]["answer"]
    assert (out / "gallery.png").stat().st_size > 10_000 and (out / "manifest.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f"{v}/answers.jsonl" for v in rows} <= set(manifest["files"])
    assert chunk_folders(out) == []                       # the chunks are gone once finished
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| variant | n | CIDEr-D | CIDEr-D 95% CI | BLEU-4 | empty |"
    assert [line.split(" | ")[0] for line in table[2:5]] == ["| image", "| ceiling", "| floor"]
    assert table[-1].startswith("skipped: METEOR (") and table[-2] == ""
    capsys.readouterr()
    for extra, message in [(["--k_shot", "6"], "tokens over the LLM context of 256; lower --k_shot"),
                           (["--image_dir", str(tmp_path)], "images listed in .*captions.json are "
                                                            "missing from"),
                           (["--captions_file", str(out / "results.json")], "unknown captions format")]:
        with pytest.raises(SystemExit) as exit_:
            run_script("eval_captioning.py", caption_args(setup, tmp_path / "o2", *extra), monkeypatch)
        err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]     # after any progress bars
        assert exit_.value.code == 2 and err.startswith("error: ") and re.search(message, err), err


def count_answers(monkeypatch, stop_after: int | None = None) -> list[int]:
    """Count the answers the engine decodes from now on (a one-item list); with ``stop_after``,
    interrupt the run (as Ctrl-C or a kill would) when that many have been decoded."""
    real, count = engine.open_ended.generate, [0]

    def generate(*args, **kwargs):
        for out in real(*args, **kwargs):
            if count[0] == stop_after:
                raise KeyboardInterrupt
            count[0] += 1
            yield out
    monkeypatch.setattr(engine.open_ended, "generate", generate)
    return count


def killed_run(args, monkeypatch, after: int) -> None:
    """Run eval_captioning.py and interrupt it once ``after`` answers are decoded."""
    with monkeypatch.context() as m:
        count_answers(m, stop_after=after)
        with pytest.raises(SystemExit) as exit_:
            run_script("eval_captioning.py", args, monkeypatch)
    assert exit_.value.code == 130


def resume_args(setup, out, *extra, tokenizer=None):
    """4 images in chunks of 3 (batches of 3): a run stopped after 3 answers has saved the
    image variant's first chunk; a complete run decodes 3 variants x 4 images."""
    args = caption_args(setup, out, "--chunk_size", "3", "--gallery", "0", *extra)
    return args + ["--tokenizer_dir", tokenizer] if tokenizer else args


def test_killed_run_resumes(setup, tmp_path, monkeypatch):
    run_script("eval_captioning.py", resume_args(setup, tmp_path / "whole"), monkeypatch)
    out = tmp_path / "killed"
    killed_run(resume_args(setup, out), monkeypatch, after=3)
    saved = sorted(out.glob("*/.chunks-*/chunk*"))
    assert [f.parent.parent.name for f in saved] == ["image"] and not (out / "manifest.json").exists()
    count = count_answers(monkeypatch)
    run_script("eval_captioning.py", resume_args(setup, out), monkeypatch)
    assert count[0] == 3 * 4 - 3                          # the saved chunk is not decoded again
    for v in ("image", "ceiling", "floor"):
        assert read_rows(out / v) == read_rows(tmp_path / "whole" / v)
    assert json.loads((out / "results.json").read_text()) == \
        json.loads((tmp_path / "whole" / "results.json").read_text())
    assert chunk_folders(out) == [] and (out / "manifest.json").is_file()


def test_changed_setting_does_not_resume(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    killed_run(resume_args(setup, out), monkeypatch, after=3)
    count = count_answers(monkeypatch)
    run_script("eval_captioning.py", resume_args(setup, out, "--max_new_tokens", "5"), monkeypatch)
    assert count[0] == 3 * 4


def test_retrained_tokenizer_does_not_resume(setup, tmp_path, monkeypatch):
    """A tokenizer retrained into the same directory: the image variant's saved answers (made
    with the old tokenizer's words) are not resumed; the answers equal a fresh run's."""
    from models.tokenizer_io import load_tokenizer, save_tokenizer
    tok = tmp_path / "tokenizer"
    shutil.copytree(setup["tokenizer"], tok)
    out = tmp_path / "out"
    killed_run(resume_args(setup, out, tokenizer=str(tok)), monkeypatch, after=3)
    retrained = load_tokenizer(tok)
    retrained.strings = retrained.strings[::-1]            # other words for the same images
    save_tokenizer(retrained, tok)
    count = count_answers(monkeypatch)
    run_script("eval_captioning.py", resume_args(setup, out, tokenizer=str(tok)), monkeypatch)
    assert count[0] == 3 * 4
    fresh = tmp_path / "fresh"
    run_script("eval_captioning.py", resume_args(setup, fresh, tokenizer=str(tok)), monkeypatch)
    assert read_rows(out / "image") == read_rows(fresh / "image")


def test_missing_scorer(monkeypatch):
    from engine.captioning import require_pycocoevalcap
    monkeypatch.setitem(sys.modules, "pycocoevalcap.cider.cider", None)
    with pytest.raises(V2LError, match=r"caption scorer is not installed.*pip install pycocoevalcap==1.2"):
        require_pycocoevalcap()


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one(setup, tmp_path):
    common = caption_args(setup, tmp_path / "x", "--max_images", "6", "--gallery", "0",
                          "--chunk_size", "3")              # 2 chunks a variant: one per rank
    results = {}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2"])):
        out = tmp_path / name
        done = subprocess.run(launcher + ["eval_captioning.py", *common, "--out_dir", str(out)],
                              cwd=ROOT, capture_output=True, text=True,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        assert ("image (rank 1)" in done.stderr) == (name == "two")   # rank 1 answered its chunks
        results[name] = (json.loads((out / "results.json").read_text()),
                         {v: read_rows(out / v) for v in ("image", "ceiling", "floor")})
        assert chunk_folders(out) == []
    assert results["one"] == results["two"]


def test_image_words_global_and_local(setup):
    from engine.fewshot import global_token_strings
    from engine.open_ended import image_words
    from models.tokenizer_io import load_tokenizer
    tokenizer = load_tokenizer(setup["tokenizer"])
    paths = sorted(str(p) for p in (Path(setup["world"]) / "val").rglob("*.png"))[:2]
    words = image_words(tokenizer, paths, 3, local=True)
    strings = global_token_strings(tokenizer, paths, 3, progress=False)
    grid = tokenizer.config.grid
    for p, s in zip(paths, strings):
        assert words[p].text == "".join(s) and len(words[p].ids) == grid * grid
        assert set(words[p].ids) <= set(tokenizer.llm_ids.tolist())
    assert all(w.ids == () for w in image_words(tokenizer, paths, 3, local=False).values())
