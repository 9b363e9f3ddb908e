"""Few-shot understanding: episodes, prompts, constrained decoding, the prefix cache, the script."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.episodes import generate_episodes, read_episode_csv
from engine.greedy import BatchedGreedy
from models.llm import encode_segment
from models.tokenizer_io import save_tokenizer
from engine.fewshot import (FewShotPrompter, NameTrie, PositionUnion, induction_line,
                            wilson_interval)
from tiny_llm import make_tiny_llama, tiny_llama_model
from utils.errors import V2LError

ROOT = Path(__file__).resolve().parent.parent


def image_folders(root: Path, classes: dict[str, int]) -> Path:
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            color = (hash((c, i)) % 255, (37 * i) % 255, len(c) * 20 % 255)
            Image.new("RGB", (40 + i, 32), color).save(root / c / f"{i}.png")
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny", fmt="hf")


@pytest.fixture(scope="module")
def llm(llm_dir):
    from models.llm import load_llm
    return load_llm(llm_dir, device="cpu")


def test_episodes_reproducible_and_valid(tmp_path):
    root = image_folders(tmp_path, {"cat": 5, "dog": 5, "red_car": 5, "tree": 4})
    a = generate_episodes(root, 3, 2, 12, seed=7)
    b = generate_episodes(root, 3, 2, 12, seed=7)
    assert [e.to_json() for e in a] == [e.to_json() for e in b]
    assert [e.to_json() for e in generate_episodes(root, 3, 2, 5, seed=7)] == \
        [e.to_json() for e in a[:5]]                       # episode i independent of the count
    assert [e.to_json() for e in generate_episodes(root, 3, 2, 12, seed=8)] != \
        [e.to_json() for e in a]
    for ep in a:
        classes = {f for _, f in ep.support}
        assert len(classes) == 3 and ep.query[1] in classes
        paths = [p for p, _ in ep.support] + [ep.query[0]]
        assert len(set(paths)) == len(paths) == 3 * 2 + 1   # query never among the supports
        assert all(Path(p).parent.name == f for p, f in ep.support)
        assert ep.names() == sorted(ep.names())
    assert "red_car" in {n for ep in a for n in ep.names()}             # raw names by default
    assert "red car" in {n for ep in a for n in ep.names(spaces=True)}


def test_episodes_too_few_images(tmp_path):
    root = image_folders(tmp_path, {"cat": 5, "dog": 2})
    with pytest.raises(V2LError, match=r"dog: 2 images.*lower --k_shot"):
        generate_episodes(root, 2, 2, 3, seed=0)


def test_episode_csv(tmp_path):
    root = image_folders(tmp_path / "imgs", {"n01930112": 2, "n02099601": 2})
    csv = tmp_path / "2_way_1_shot.csv"
    csv.write_text("n01930112/0.png,n02099601/0.png,n02099601/1.png,\n")
    (ep,) = read_episode_csv(csv, root)
    assert len(ep.support) == 2 and ep.query[1] == "n02099601"
    # the authors' raw ImageNet names (underscores); spaces as an option
    assert ep.target() == "golden_retriever" and ep.names() == ["golden_retriever", "nematode"]
    assert ep.target(spaces=True) == "golden retriever"
    csv.write_text("n01930112/0.png,n02099601/9.png\n")
    with pytest.raises(V2LError, match="9.png not found"):
        read_episode_csv(csv, root)


def test_prompt_layout(llm):
    text_tokenizer = llm.text_tokenizer
    p = FewShotPrompter(text_tokenizer, induction=True, repeat=1)
    prompt = p.build(["cat", "dog"], [("red tree", "cat"), ("blue sky", "dog")], "green car")
    line = "For each of the following input output pairs, output is one of ['cat' or 'dog']\n"
    assert induction_line(["cat", "dog"]) == line
    # the log is the decode of the very ids the LLM reads (with a sentencepiece tokenizer each
    # separately tokenised segment brings its own leading space: "Input: <  red tree")
    assert prompt.text == text_tokenizer.decode(prompt.ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    assert prompt.text.startswith(text_tokenizer.bos_token) and prompt.text.endswith("Output: ")
    parts = ["['cat' or 'dog']"] + ["red tree", "cat", "blue sky", "dog"] * 2 + ["green car"]
    at = 0
    for part in parts:                                      # every piece, in prompt order
        at = prompt.text.index(part, at) + len(part)
    assert prompt.text.count("###\nInput: <") == 5 and prompt.text.count(">\nOutput:") == 5
    enc = lambda s: encode_segment(text_tokenizer, s)  # noqa: E731  (each segment as Meta encodes it)
    seg = enc("###\nInput: < ") + enc("red tree") + enc(" >\nOutput: ") + enc("cat")
    assert prompt.ids[0] == text_tokenizer.bos_token_id
    assert prompt.ids[1:1 + len(enc(line))] == enc(line)
    assert prompt.ids[1 + len(enc(line)):][:len(seg)] == seg
    q = enc("###\nInput: < ") + enc("green car") + enc(" >\nOutput: ")
    assert prompt.ids[-len(q):] == q
    no_ind = FewShotPrompter(text_tokenizer, induction=False).build(["cat"], [("a", "cat")], "b")
    assert not no_ind.text.startswith("For each")


def test_name_trie():
    trie = NameTrie([[5, 6], [5, 7, 8], [9]], eos_id=2)
    assert sorted(trie.allowed([])) == [5, 9]
    assert sorted(trie.allowed([5])) == [6, 7]
    assert trie.allowed([5, 6]) == [2] and not trie.finished([5, 6])
    assert trie.finished([5, 6, 2]) and trie.finished([4])
    prefix_names = NameTrie([[5], [5, 6]], eos_id=2)
    assert sorted(prefix_names.allowed([5])) == [2, 6]      # "crab" vs "crab apple"


def test_prefix_cache_logits_match_full_recompute():
    model = tiny_llama_model(300)
    shared = [1, 17, 18, 19, 20, 21, 22]
    prompts = [shared + [30, 31], shared + [40], shared + [50, 51, 52, 53, 54], [1, 17, 99]]
    ref = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    cached = BatchedGreedy(model, pad_id=0, prefix_cache=True)
    for batch in (prompts, prompts[:3]):                   # short and long shared prefixes
        got = cached.prefill(batch)[0]
        assert torch.allclose(got, ref[:len(batch)], atol=1e-4)
    plain = BatchedGreedy(model, pad_id=0, prefix_cache=False).prefill(prompts)[0]
    assert torch.allclose(plain, ref, atol=1e-4)


def test_group_prefixes_match_full_recompute():
    """Each group's shared prefix run once (beyond the batch's, or with none shared by the batch,
    or a group sharing nothing) gives every prompt's own logits and greedy tokens."""
    model = tiny_llama_model(300)
    shared = [1, 17, 18]
    cases = [([shared + [30, 31, 32, 5], shared + [30, 31, 33], shared + [40, 41, 6, 7],
               shared + [40, 41, 9], shared + [50], [1, 17, 99]], [0, 0, 1, 1, 2, 3]),
             ([[5, 30, 31, 32, 5], [5, 30, 31, 34], [6, 40, 41, 6, 7], [7, 50], [8, 9]],
              ["a", "a", "b", "c", "c"])]
    for prompts, groups in cases:
        ref = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
        got = BatchedGreedy(model, pad_id=0).prefill(prompts, groups)[0]
        assert torch.allclose(got, ref, atol=1e-4)
        want = [model.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
        assert BatchedGreedy(model, 0).generate(prompts, 4, groups=groups) == want
    with pytest.raises(V2LError, match="group labels"):
        BatchedGreedy(model, 0).prefill(cases[0][0], [0])


def test_allowed_mask_is_each_rows_constraint():
    """The step's constraint mask, built from one index copy, is row by row what each
    constraint allows: a trie's ids, every id (None or slice(None)), pad for a finished row."""
    from engine.greedy import allowed_mask
    trie = NameTrie([[20, 21], [30]], eos_id=2)
    every = type("Every", (), {"allowed": lambda self, p: slice(None)})()
    constraints, out = [trie, None, trie, every, trie], [[], [], [20], [7], [30, 2]]
    got = allowed_mask(torch.zeros(5, 50), constraints, out, pad_id=0)
    want = torch.zeros(5, 50, dtype=torch.bool)
    want[0, [20, 30]] = want[1] = want[3] = True
    want[2, 21] = want[4, 0] = True
    assert torch.equal(got, want)


def test_auto_batch_size_follows_free_memory(monkeypatch):
    """--batch_size auto: on a CPU the stages' batch of 8; on a GPU utils.memory's batch for the
    free memory after loading (weights not counted again), divided by the prompts per item, cut
    to a divisor of the chunk; a number overrides; bad values are refused with the flag."""
    import engine.greedy as g
    from utils.memory import llm_batch_size
    model = tiny_llama_model(300)
    assert g.parse_batch_size("auto") is None and g.parse_batch_size("12") == 12 == \
        g.parse_batch_size(12)
    for bad in ("0", "x", "2.5", -3):
        with pytest.raises(V2LError, match="--batch_size"):
            g.parse_batch_size(bad)
    assert g.auto_batch_size(model, 100, 16) == g.CPU_BATCH_SIZE
    free = 2 ** 26
    monkeypatch.setattr(g, "free_device_memory", lambda device: free)
    want = llm_batch_size(model.config, 4, 100, 16, free, include_weights=False)
    assert want > 64     # (the tiny model: many rows fit in 64 MiB)
    assert g.auto_batch_size(model, 100, 16) == want
    assert g.auto_batch_size(model, 100, 16, rows_per_item=3) == want // 3
    assert g.auto_batch_size(model, 100, 16, rows_per_item=3, divides=64) == \
        max(d for d in (1, 2, 4, 8, 16, 32, 64) if d <= want // 3)
    assert g.auto_batch_size(model, 400, 16) < want          # longer prompts, fewer rows
    monkeypatch.setattr(g, "free_device_memory", lambda device: 1000)
    with pytest.raises(V2LError):
        g.auto_batch_size(model, 100, 16)


def test_words_precision_changes_nothing_on_a_cpu_and_restores_tf32():
    """--tf32 / --words_amp act on a CUDA device only, and the TF32 flags come back after."""
    from engine.fewshot import words_precision
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    x = torch.randn(8, 8)
    with words_precision("cpu", tf32=True, amp="bf16"):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
        assert not torch.is_autocast_enabled("cpu") and (x @ x).dtype == torch.float32
    with words_precision("cuda", tf32=True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(V2LError, match="--words_amp"):
        with words_precision("cpu", amp="int8"):
            pass


def test_batched_generation_matches_one_at_a_time():
    model = tiny_llama_model(300)
    prompts = [[1, 5, 6, 7, 8], [1, 5, 6, 9], [1, 5, 6, 7, 10, 11, 12]]
    want = [model.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False,
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    for cache in (True, False):
        assert BatchedGreedy(model, 0, prefix_cache=cache).generate(prompts, 4) == want


def test_forced_name_tails_skip_forward_passes_and_change_nothing(monkeypatch):
    torch.manual_seed(0)
    model = tiny_llama_model(300)
    prompts = [[1, 5, 6, 7, 8], [1, 5, 6, 9], [1, 5, 6, 7, 10, 11, 12], [1, 3]]
    # names: one whose tail is forced after its first token, two sharing a first token
    names = [[20, 21, 22], [30, 31], [30, 32]]
    tries = [NameTrie(names, eos_id=2), NameTrie(names, eos_id=2),
             NameTrie([[40], [41, 42, 43, 44]], eos_id=2), None]
    calls = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))

    def run(rows, shortcut):
        calls.clear()
        out = BatchedGreedy(model, 0).generate(prompts[:rows], 6, tries[:rows], eos_id=2,
                                               skip_forced=shortcut)
        return out, len(calls)

    (want, slow), (got, fast) = run(3, False), run(3, True)
    assert got == want and fast < slow
    # a row without a constraint keeps every step going; the others' tokens are the same
    (want4, slow4), (got4, fast4) = run(4, False), run(4, True)
    assert got4 == want4 and got4[:3] == want and fast4 == slow4
    # the authors' per-position union (no EOS): forced where a column holds one token
    tries[:3] = [PositionUnion([[20, 21, 22], [30, 21, 22]])] * 3
    (want, slow), (got, fast) = run(3, False), run(3, True)
    assert got == want and fast < slow and all(row[1:] == [21, 22] for row in got)


def test_constrained_decoding_only_emits_names(llm):
    text_tokenizer = llm.text_tokenizer
    p = FewShotPrompter(text_tokenizer, induction=True)
    names = ["cat", "black dog", "blue bird"]
    trie = p.constraint(names)
    prompts = [p.build(names, [("sky", "cat")], w).ids for w in ("red", "old tree", "water")]
    gen = BatchedGreedy(llm.model, 0).generate(prompts, 16, [trie] * 3,
                                               eos_id=text_tokenizer.eos_token_id)
    for toks in gen:
        assert text_tokenizer.decode(toks, skip_special_tokens=True) in names


def test_bad_class_name_and_long_prompt(llm):
    from engine.fewshot import check_prompt_length
    p = FewShotPrompter(llm.text_tokenizer)
    with pytest.raises(V2LError, match="class name ''"):
        p.name_ids("")
    prompt = p.build(["cat"], [("red " * 80, "cat")] * 2, "dog")
    with pytest.raises(V2LError, match=r"tokens over the LLM context of 256; lower --k_shot"):
        check_prompt_length(len(prompt.ids), 16, 256, "episode 0")


def test_wilson_interval():
    lo, hi = wilson_interval(91, 100)
    assert 0.83 < lo < 0.91 < hi < 0.96
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-3)


def run_script(name: str, args: list[str], monkeypatch) -> None:
    """Run a top-level script in this process (saves the interpreter start-up)."""
    monkeypatch.setattr(sys, "argv", [name] + args)
    runpy.run_path(str(ROOT / name), run_name="__main__")


def test_eval_understanding_script_end_to_end(tmp_path, llm_dir, monkeypatch, capsys):
    from fixtures_tokenizer import make_tiny_tokenizer
    tokenizer, _, _ = make_tiny_tokenizer(tmp_path / "tok")
    save_tokenizer(tokenizer, tmp_path / "tokenizer")
    data = image_folders(tmp_path / "data" / "train", {"cat": 4, "dog": 4, "red_car": 4})
    out = tmp_path / "out"
    args = ["--tokenizer_dir", str(tmp_path / "tokenizer"), "--llm", llm_dir, "--data_dir",
            str(data.parent), "--split", "train", "--n_episodes", "6", "--batch_size", "4",
            "--global_k", "3", "--k_shot", "1", "--out_dir", str(out), "--device", "cpu",
            "--num_workers", "0"]
    run_script("eval_understanding.py", args, monkeypatch)
    (setting,) = [d for d in out.iterdir() if d.is_dir()]
    rows = [json.loads(x) for x in (setting / "episodes.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(6))
    names = ("cat", "dog", "red_car")                      # raw names, underscores kept
    assert all(r["prediction"] in names and r["target"] in names for r in rows)
    assert all(r["prompt"].endswith("Output: ") and "###" in r["prompt"] for r in rows)
    summary = json.loads((setting / "summary.json").read_text())
    assert summary["n"] == 6 and summary["ci95"][0] <= summary["accuracy"] <= summary["ci95"][1]
    for ref in ("ceiling", "floor"):                       # over the very episodes of the accuracy
        assert all(r[ref]["prediction"] in names for r in rows)
        hits = sum(r[ref]["correct"] for r in rows)
        assert summary[ref] == hits / 6 and summary[f"{ref}_ci95"] == list(wilson_interval(hits, 6))
    manifest = json.loads((out / "manifest.json").read_text())
    (row,) = manifest["info"]["settings"]
    assert {"n_way", "k_shot", "global_k", "accuracy", "ci95", "chance", "ceiling", "floor",
            "ceiling_ci95", "floor_ci95"} <= set(row) and row == summary
    assert manifest["info"]["llm_dtype"] == "fp32" and manifest["config"]["llm_dtype"] == "fp16"
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"accuracy", "ceiling", "ceiling_ci95", "floor", "floor_ci95"} <= set(header)
    assert (setting / "manifest.json").is_file() and (out / "results.md").is_file()
    run_script("eval_understanding.py", args + ["--n_episodes", "8"], monkeypatch)
    rows2 = [json.loads(x) for x in (setting / "episodes.jsonl").read_text().splitlines()]
    assert rows2[:6] == rows and len(rows2) == 8           # resumed: old lines kept, 2 added
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_script("eval_understanding.py", args + ["--k_shot", "4"], monkeypatch)
    assert exit_.value.code == 2 and "lower --k_shot" in capsys.readouterr().err
