"""eval_understanding options: reference rows, image words, constraints, class names, precision,
and torchrun (2 ranks give the 1-rank result)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.episodes import generate_episodes
from engine.fewshot import (FewShotPrompter, NameTrie, PositionUnion, evaluate_episodes,
                            image_words, normalised)
from engine.greedy import BatchedGreedy
from models.tokenizer_io import save_tokenizer
from test_fewshot import image_folders, llm, llm_dir  # noqa: F401 (shared module fixtures)
from utils.errors import V2LError

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def test_image_words_separator_strip_and_dedup():
    strings = [" dog", " Dog", " puppy", "dog.", " grass", " puppy"]
    assert image_words(strings, 3) == "".join(strings[:3])         # default: plain concatenation
    assert image_words(strings, 3, separator=",") == " dog, Dog, puppy"
    assert image_words(strings, 2, strip=True) == "dogDog"           # the authors' glued words
    # dedup: " Dog" and "dog." repeat " dog"; the slots fill from further down the ranking
    assert normalised(" Dog") == normalised("dog.") == "dog"
    assert image_words(strings, 3, dedup=True) == " dog puppy grass"
    assert image_words(strings, 5, dedup=True) == " dog puppy grass"   # ran out: fewer than k
    assert image_words(strings, 2, separator=" ", dedup=True, strip=True) == "dog puppy"
    # sort: the chosen words alphabetically, so two rankings of the same words read the same
    assert image_words([" star", " yellow"], 2, " ", sort=True) == \
        image_words([" yellow", " star", " cross"], 2, " ", sort=True) == " star  yellow"
    assert image_words([" yellow", "Yellow", " star"], 2, " ", dedup=True, sort=True) == " star  yellow"
    assert image_words([" yellow", " star"], 2, " ") == " yellow  star"      # default: nearest first


def test_union_constraint_mixes_names_trie_does_not():
    names = [[5, 6], [7, 8, 9]]
    union, trie = PositionUnion(names), NameTrie(names, eos_id=2)
    assert union.allowed([]) == [5, 7] and union.allowed([5]) == [6, 8]   # "5 8": a mix
    assert union.allowed([5, 8]) == [9] and not union.finished([5, 8])
    assert union.finished([5, 8, 9]) and union.allowed([5, 8, 9]) == []
    assert trie.allowed([5]) == [6]
    with pytest.raises(V2LError, match="--constraint"):
        FewShotPrompter(None, constraint="prefix")


def test_union_decoding_stays_in_the_columns(llm):  # noqa: F811
    text_tokenizer = llm.text_tokenizer
    prompter = FewShotPrompter(text_tokenizer, constraint="union")
    names = ["cat", "black_dog", "blue_bird"]
    union = prompter.constraint(names)
    assert isinstance(union, PositionUnion)
    prompts = [prompter.build(names, [("sky", "cat")], w).ids for w in ("red", "old tree")]
    for toks in BatchedGreedy(llm.model, 0).generate(prompts, 16, [union] * 2,
                                                     eos_id=text_tokenizer.eos_token_id):
        assert len(toks) == len(union.columns)
        assert all(t in union.columns[j] for j, t in enumerate(toks))


class Recorder(BatchedGreedy):
    """BatchedGreedy that keeps every batch of prompts it decodes."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = []

    def generate(self, prompts, *a, **k):
        self.calls.append(prompts)
        return super().generate(prompts, *a, **k)


@pytest.mark.parametrize("spaces", [False, True])
def test_references_run_on_the_same_episodes(tmp_path, llm, spaces):  # noqa: F811
    root = image_folders(tmp_path, {"red_car": 3, "dog": 3, "tree": 3})
    episodes = generate_episodes(root, 2, 1, 5, seed=3)
    words = {p: f"w{i}" for i, p in enumerate(sorted(
        {p for ep in episodes for p, _ in ep.support + (ep.query,)}))}
    prompter = FewShotPrompter(llm.text_tokenizer)
    greedy = Recorder(llm.model, 0)
    results = list(evaluate_episodes(greedy, prompter, episodes, words, 8, 2, spaces=spaces,
                                     references=True, merge_variants=False))
    assert [r.index for r in results] == [ep.index for ep in episodes]
    assert len(greedy.calls) == 3 * 3            # 3 batches (2, 2, 1) x images/ceiling/floor
    merged = Recorder(llm.model, 0)
    together = list(evaluate_episodes(merged, prompter, episodes, words, 8, 2, spaces=spaces,
                                      references=True))
    assert len(merged.calls) == 3                # one pass per batch, its 3 variants together
    assert [(r.prediction, r.prompt, r.references) for r in together] == \
        [(r.prediction, r.prompt, r.references) for r in results]
    for b, start in enumerate(range(0, 5, 2)):
        batch = episodes[start:start + 2]
        images, ceiling, floor = greedy.calls[3 * b:3 * b + 3]
        assert merged.calls[b] == images + ceiling + floor
        for ep, got_i, got_c, got_f in zip(batch, images, ceiling, floor):
            names = ep.names(spaces)
            shots = [(ep.name(f, spaces), ep.name(f, spaces)) for _, f in ep.support]
            assert got_i == prompter.build(names, [(words[p], n) for (p, _), (_, n)
                                                   in zip(ep.support, shots)],
                                           words[ep.query[0]]).ids
            assert got_c == prompter.build(names, shots, ep.target(spaces)).ids
            assert got_f == prompter.build(names, [("", n) for _, n in shots], "").ids
    for r, ep in zip(results, episodes):
        assert r.target == ep.target(spaces)
        assert set(r.references) == {"ceiling", "floor"}
        for ref in r.references.values():
            assert ref["correct"] == ref["prediction"].strip().startswith(r.target)
    off = list(evaluate_episodes(BatchedGreedy(llm.model, 0), prompter, episodes, words, 8, 2,
                                 spaces=spaces))
    assert [(r.prediction, r.prompt) for r in off] == [(r.prediction, r.prompt) for r in results]
    assert all(r.references == {} for r in off)


def _setup(tmp: Path, llm_dir: str) -> list[str]:
    from fixtures_tokenizer import make_tiny_tokenizer
    tokenizer, _, _ = make_tiny_tokenizer(tmp / "tok")
    save_tokenizer(tokenizer, tmp / "tokenizer")
    data = image_folders(tmp / "data" / "train", {"cat": 4, "dog": 4, "red_car": 4})
    return ["--tokenizer_dir", str(tmp / "tokenizer"), "--llm", llm_dir, "--data_dir",
            str(data.parent), "--split", "train", "--n_episodes", "9", "--batch_size", "2",
            "--global_k", "3", "--device", "cpu", "--num_workers", "0"]


def _rows(out: Path) -> dict:
    (setting,) = [d for d in out.iterdir() if d.is_dir()]
    rows = [json.loads(x) for x in (setting / "episodes.jsonl").read_text().splitlines()]
    return {r["index"]: r for r in rows}


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one(tmp_path, llm_dir):  # noqa: F811
    args = _setup(tmp_path, llm_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = str(REPO / "eval_understanding.py")
    one = subprocess.run([sys.executable, script, *args, "--out_dir", str(tmp_path / "w1")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29617", script, *args, "--out_dir",
                          str(tmp_path / "w2")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _rows(tmp_path / "w1"), _rows(tmp_path / "w2")
    assert sorted(a) == sorted(b) == list(range(9))     # each episode logged once, by rank 0
    assert a == b                                       # same batches -> the same answers
    ma = json.loads((tmp_path / "w1" / "manifest.json").read_text())["info"]["settings"]
    mb = json.loads((tmp_path / "w2" / "manifest.json").read_text())["info"]["settings"]
    assert ma == mb


def test_script_options_reach_the_prompts(tmp_path, llm_dir, monkeypatch, capsys):  # noqa: F811
    from test_fewshot import run_script
    out = tmp_path / "out"
    args = _setup(tmp_path, llm_dir) + ["--out_dir", str(out), "--n_episodes", "4"]
    run_script("eval_understanding.py", args + [
        "--word_separator", ",", "--global_dedup", "true", "--constraint", "union",
        "--class_names", "spaces", "--references", "false"], monkeypatch)
    rows = _rows(out)
    assert all(r["target"] in ("cat", "dog", "red car") for r in rows.values())
    assert all("red car" in r["prompt"] or "red car" not in r["target"] for r in rows.values())
    # 3 words per image joined by ",": two commas between "<" and ">" of every image
    for r in rows.values():
        images = [seg.split(">")[0] for seg in r["prompt"].split("Input: <")[1:]]
        assert images and all(seg.count(",") == 2 for seg in images), r["prompt"]
        assert "ceiling" not in r
    (row,) = json.loads((out / "manifest.json").read_text())["info"]["settings"]
    assert row["ceiling"] is None and row["floor_ci95"] is None
    capsys.readouterr()
    # turning the references on reruns the stage (the settings changed): every episode is
    # answered again with them, none mixed in from the run without
    opts = ["--word_separator", ",", "--global_dedup", "true", "--constraint", "union",
            "--class_names", "spaces"]
    run_script("eval_understanding.py", args + opts, monkeypatch)
    assert "rebuilding: settings changed (--references False there, True now)" in capsys.readouterr().err
    assert len(_rows(out)) == 4 and all("ceiling" in r for r in _rows(out).values())
    (row,) = json.loads((out / "manifest.json").read_text())["info"]["settings"]
    assert row["n"] == 4 and 0 <= row["ceiling"] <= 1 and len(row["floor_ci95"]) == 2
    # the defaults again: the other options are gone from the prompts
    run_script("eval_understanding.py", args, monkeypatch)
    assert all("," not in r["prompt"].split("Input: <")[1].split(">")[0] for r in _rows(out).values())


def test_several_ways_run_one_setting_each(tmp_path, llm_dir, monkeypatch):  # noqa: F811
    from test_fewshot import run_script
    out = tmp_path / "out"
    args = _setup(tmp_path, llm_dir) + ["--out_dir", str(out), "--n_episodes", "2", "--n_way", "2",
                                        "3", "--word_separator", "|", "--sort_words", "true",
                                        "--references", "false"]
    run_script("eval_understanding.py", args, monkeypatch)
    rows = json.loads((out / "manifest.json").read_text())["info"]["settings"]
    assert [(r["n_way"], r["n"], r["chance"]) for r in rows] == [(2, 2, 1 / 2), (3, 2, 1 / 3)]
    for setting in ("2way_1shot_k3_ind1_rep0", "3way_1shot_k3_ind1_rep0"):
        for line in (out / setting / "episodes.jsonl").read_text().splitlines():
            prompt = json.loads(line)["prompt"]
            for image in (seg.split(" >")[0] for seg in prompt.split("Input: < ")[1:]):
                words = image.split("|")
                assert len(words) == 3 and words == sorted(words, key=lambda w: (normalised(w), w))


def test_answers_of_another_tokenizer_in_the_same_directory_are_never_resumed(
        tmp_path, llm_dir, monkeypatch):  # noqa: F811
    """A run killed after its first chunk, then a tokenizer retrained into the same directory:
    the rerun answers every episode with the new tokenizer (resume keys name the tokenizer by
    artifact id, not by its path)."""
    import engine.fewshot
    from test_fewshot import run_script
    from fixtures_tokenizer import make_tiny_tokenizer
    args = _setup(tmp_path, llm_dir) + ["--n_episodes", "6", "--chunk_episodes", "2"]
    answer = engine.fewshot.evaluate_episodes
    calls = []

    def killed_after_one_chunk(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return answer(*a, **k)
    monkeypatch.setattr(engine.fewshot, "evaluate_episodes", killed_after_one_chunk)
    with pytest.raises(SystemExit) as exit_:
        run_script("eval_understanding.py", args + ["--out_dir", str(tmp_path / "out")], monkeypatch)
    assert exit_.value.code == 130
    monkeypatch.setattr(engine.fewshot, "evaluate_episodes", answer)
    run_script("eval_understanding.py", args + ["--out_dir", str(tmp_path / "first")], monkeypatch)

    retrained, _, _ = make_tiny_tokenizer(tmp_path / "tok2")       # into the same directory
    retrained.tok_embeddings_global.weight.data = retrained.tok_embeddings_global.weight.data.flip(0)
    save_tokenizer(retrained, tmp_path / "tokenizer")
    run_script("eval_understanding.py", args + ["--out_dir", str(tmp_path / "out")], monkeypatch)
    run_script("eval_understanding.py", args + ["--out_dir", str(tmp_path / "fresh")], monkeypatch)
    resumed, fresh, first = (_rows(tmp_path / d) for d in ("out", "fresh", "first"))
    assert [r["prompt"] for r in first.values()] != [r["prompt"] for r in fresh.values()]
    assert resumed == fresh
