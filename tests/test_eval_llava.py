"""eval_llava.py on a tiny random LLaVA: every condition's answers written in LLaVA's answers
format and read by the benchmark scorer, the cached VoCo (and lower, and upper) answers equal
to greedy decoding over one masked pass per step written out without a cache, resuming
without recomputing, bad inputs one line each."""
import contextlib
import json
import sys
from unittest.mock import patch

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_artifacts import run_script as run
from tiny_llava import make_tiny_llava
from voco_reference import Image as Uncompressed, single_pass

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 6            # tokens per answer: the tiny LLM's context is 256 positions
MARGIN = 1e-3          # a greedy pick is compared where the top two logits are further apart than
#                        this: far above fp32's differences between the cached and the single pass
IMAGES = {"a.png": (40, 30), "b.png": (30, 50), "c.png": (56, 56), "d.png": (20, 60)}
QUESTIONS = [           # (image, question, answer); e.png is not in the folder
    ("a.png", "What colour is it?", "red"), ("b.png", "Where is it?", "left"),
    ("a.png", "What shape?", "circle"), ("e.png", "What colour is it?", "blue"),
    ("c.png", "Is it big?", "yes"), (None, "Say yes.", "yes"), ("d.png", "What shape?", "square"),
    ("c.png", "What colour is it?", "green"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny LLaVA in both forms, an image folder (one image of the question file missing),
    a generated question file with answers, and VoCo weights (k_max 2) whose state differs
    from their untrained start: in the system layout VoCo embeddings and LoRA (a frozen
    reader, and an adapted one: LoRA on while reading too), in the authors' VoCo embeddings
    only (LoRA zero, so that one masked pass without adapters is the same model)."""
    from engine.llava_eval import LlavaPrompts
    from engine.llava_voco import voco_text
    from engine.voco import llm_identity
    from models.llava import load_llava
    from models.voco import LORA_TARGETS, VoCo
    from utils.artifacts import save_json, save_tensors
    tmp = tmp_path_factory.mktemp("eval_llava")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    paths = make_tiny_llava(tmp / "llava")
    rng = np.random.RandomState(0)
    (tmp / "img").mkdir()
    for name, (w, h) in IMAGES.items():
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(tmp / "img" / name)
    with open(tmp / "questions.jsonl", "w") as f:
        for i, (image, text, answer) in enumerate(QUESTIONS):
            f.write(json.dumps({"question_id": f"q{i}", "image": image, "text": text,
                                "answer": answer, "category": "demo"}) + "\n")
    for dirname, layout, reader in (("system", "system", "frozen"), ("authors", "authors", "frozen"),
                                    ("adapted", "system", "adapted")):
        parts = load_llava(paths["llava"], dtype="fp32", device="cpu")
        sample = LlavaPrompts(parts.tokenizer, layout).sample({"text": "?", "question_id": 0}, True)
        text = voco_text(sample, parts.tokenizer.bos_token_id)
        voco = VoCo(parts.llm, 2, 4, 8.0, LORA_TARGETS, seed=0, reader=reader, **text)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():   # "trained": away from the untrained start
            voco.embeddings.add_(torch.randn(voco.embeddings.shape, generator=g))
            for name, p in parts.llm.named_parameters():   # the authors' layout: LoRA = 0
                if "lora_B" in name and dirname != "authors":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        out = tmp / f"voco_{dirname}"
        save_tensors(out / "voco.safetensors", {k: v.float() for k, v in voco.adapter_state().items()})
        save_json(out / "voco.json", {"k_max": 2, "train_ks": [1, 2], "lora_rank": 4, "lora_alpha": 8.0,
                                      "lora_targets": list(LORA_TARGETS), "seed": 0, "init_ids": [],
                                      "layout": layout, "reader": reader, "llm": parts.language.ident,
                                      "llm_identity": llm_identity(parts.language), **text})
    # a fully fine-tuned reader (step 7's --reader trained, authors' layout): its own LLM and
    # projector beside the VoCo embeddings, no LoRA
    from engine.llava_train import save_projector
    parts = load_llava(paths["llava"], dtype="fp32", device="cpu")
    sample = LlavaPrompts(parts.tokenizer, "authors").sample({"text": "?", "question_id": 0}, True)
    text = voco_text(sample, parts.tokenizer.bos_token_id)
    voco = VoCo(parts.llm, 2, 0, seed=0, reader="adapted", **text)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        voco.embeddings.add_(torch.randn(voco.embeddings.shape, generator=g))
        for q in list(parts.llm.parameters()) + list(parts.projector.parameters()):
            q.add_(torch.randn(q.shape, generator=g) * 0.05)
    out = tmp / "voco_trained"
    parts.llm.save_pretrained(out / "llm")
    parts.tokenizer.save_pretrained(out / "llm")
    save_projector(parts.projector, out / "mm_projector.bin")
    save_tensors(out / "voco.safetensors", {k: v.float() for k, v in voco.adapter_state().items()})
    save_json(out / "voco.json", {"k_max": 2, "train_ks": [1, 2], "lora_rank": 0, "lora_alpha": 16.0,
                                  "lora_targets": list(LORA_TARGETS), "seed": 0, "init_ids": [],
                                  "layout": "authors", "reader": "adapted", "trained_reader": "trained",
                                  "llm": parts.language.ident, "llm_identity": llm_identity(parts.language),
                                  **text})
    yield {"tmp": tmp, **paths}
    torch.set_num_threads(threads)


def flags(world, out, **extra):
    tmp = world["tmp"]
    return {"llava": world["llava"], "voco_dir": tmp / "voco_system", "benchmark": "exact",
            "questions": tmp / "questions.jsonl", "image_folder": tmp / "img", "eval_ks": [1],
            "max_new_tokens": MAX_NEW, "batch_size": 3, "chunk_images": 2, "device": "cpu",
            "llm_dtype": "fp32", "out_dir": tmp / out, **extra}


def answers(out, label):
    from engine.llava_bench import read_answers
    return read_answers(out / f"answers-{label}.jsonl")


@pytest.fixture(scope="module")
def evaluated(world):
    assert run("eval_llava.py", **flags(world, "full")) == 0
    return world["tmp"] / "full"


def test_end_to_end_answers_scores_and_costs(world, evaluated):
    from engine.llava_bench import score_exact
    from utils.artifacts import load_json
    res = load_json(evaluated / "results.json")
    labels = ["upper", "lower-k1", "no_image", "voco-k1"]
    kept = [f"q{i}" for i, (image, _, _) in enumerate(QUESTIONS) if image != "e.png"]
    for label in labels:
        rows = answers(evaluated, label)
        assert [r["question_id"] for r in rows] == kept      # the question file's order
        assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        scored = score_exact(evaluated / f"answers-{label}.jsonl", world["tmp"] / "questions.jsonl")
        assert scored.metrics["n"] == len(kept) and not scored.metrics["complete"]
        assert res["scores"][label]["n"] == len(kept)
    assert res["missing_images"] == {"count": 1, "questions": 1, "first": ["e.png"]}
    assert [(r["condition"], r["k"]) for r in res["rows"]] == [("upper", None), ("lower", 1),
                                                              ("no_image", None), ("voco", 1)]
    voco = res["rows"][-1]
    assert "retention" in voco and "retention_ci95" in voco
    cost = res["cost"]
    assert cost["image_tokens"] == 16
    assert cost["voco-k1"]["kv_bytes_per_image"] == cost["kv_bytes_per_token"]
    assert cost["upper"]["kv_bytes_per_image"] == 16 * cost["kv_bytes_per_token"]
    assert cost["voco-k1"]["images"] == cost["upper"]["images"] == 4
    assert cost["upper"]["prefill_flops_per_question"] > cost["voco-k1"]["prefill_flops_per_question"]
    # the image matters to the tiny LLaVA: the conditions do not all answer alike
    texts = {label: [r["text"] for r in answers(evaluated, label)] for label in labels}
    assert texts["upper"] != texts["no_image"] and texts["voco-k1"] != texts["lower-k1"]
    manifest = load_json(evaluated / "manifest.json")
    assert manifest["stage"] == "eval_llava" and "answers-voco-k1.jsonl" in manifest["files"]
    assert (evaluated / "results.md").is_file()


def reference_answers(parts, voco, layout, condition, questions, image_folder, k=1, adapters=False):
    """Greedy answers of the kept questions, each step one forward over the whole prompt, no
    cache: the plain LLM over the embedded prompt (upper), or one masked pass with the image
    and its VoCo tokens inside (tests/voco_reference.py ``single_pass``); and the smallest
    top-two gap of the logits."""
    from engine.llava_bench import load_questions
    from engine.llava_eval import LlavaPrompts
    prompts = LlavaPrompts(parts.tokenizer, layout)
    eos = parts.tokenizer.eos_token_id
    out = {}
    for q in load_questions(questions):
        if q["image"] == "e.png":
            continue
        s = prompts.sample(q, q["image"] is not None)
        emb = None
        if q["image"] is not None:
            image = Image.open(image_folder / q["image"])
            emb = parts.embed_images(parts.preprocess([image]))[0]
        tokens, gap = [], float("inf")
        for _ in range(MAX_NEW):
            after = list(s.after) + tokens
            if emb is None or condition == "no_image":
                prompt = [list(s.before) + list(s.between) + after]
            elif condition == "upper":
                prompt = [list(s.before), emb] + ([list(s.between)] if s.between else []) + [after]
            else:
                prompt = ([list(s.before)] if layout == "system" else []) + [Uncompressed(emb), after]
            with torch.no_grad():
                if condition in ("upper", "no_image"):   # the plain causal LM
                    logits = parts.llm(inputs_embeds=parts.embed_prompt(prompt)[None]).logits[0, -1]
                elif adapters:                            # the same with LoRA on everywhere
                    with patch.object(voco, "frozen", contextlib.nullcontext):
                        logits = single_pass(voco, [prompt], k)[0][0, -1]
                else:                                     # one masked pass (voco_reference)
                    logits = single_pass(voco, [prompt], k)[0][0, -1]
            top = logits.topk(2)
            gap = min(gap, float(top.values[0] - top.values[1]))
            if int(top.indices[0]) == eos:
                break
            tokens.append(int(top.indices[0]))
        out[str(q["question_id"])] = (parts.tokenizer.decode(tokens, skip_special_tokens=True).strip(), gap)
    return out


@pytest.mark.parametrize("layout", ["system", "authors"])
def test_cached_answers_equal_the_single_masked_pass(world, evaluated, layout):
    """The cached answers (each image compressed once, its block reused by the batch's
    questions) are greedy decoding over one pass per step without a cache: upper is the plain
    LLM over the embedded prompt; lower (LoRA = identity) and, in the authors' layout, voco
    (LoRA zero) are one masked pass with the image and its VoCo tokens inside. (With LoRA
    active while compressing, no single pass computes the cached model: LoRA would apply to
    every position.)"""
    from engine.llava_eval import load_llava_voco
    from models.llava import load_llava
    out = evaluated if layout == "system" else world["tmp"] / "authors"
    if layout == "authors":
        assert run("eval_llava.py", **flags(world, "authors", voco_dir=world["tmp"] / "voco_authors",
                                            conditions=["upper", "lower", "voco"])) == 0
    parts = load_llava(world["llava"], dtype="fp32", device="cpu")
    voco, _, trained, got_layout = load_llava_voco(world["tmp"] / f"voco_{layout}", parts)
    assert got_layout == layout
    start = {k: v.clone() for k, v in voco.adapter_state().items()}
    checks = [("upper", "upper", start), ("lower", "lower-k1", start)]
    if layout == "authors":
        assert all(not v.any() for k, v in trained.items() if "lora_B" in k)
        assert not torch.equal(trained["voco.embeddings"], start["voco.embeddings"])
        checks.append(("voco", "voco-k1", trained))
    compared = 0
    for condition, label, state in checks:
        voco.load_adapter_state(state)
        want = reference_answers(parts, voco, layout, condition, world["tmp"] / "questions.jsonl",
                                 world["tmp"] / "img")
        got = {r["question_id"]: r["text"] for r in answers(out, label)}
        assert got.keys() == want.keys()
        for qid, (text, gap) in want.items():
            if gap > MARGIN:
                assert got[qid] == text, (layout, label, qid)
                compared += 1
    assert compared >= 8


def test_adapted_reader(world, evaluated):
    """VoCo weights of an adapted reader (LoRA on while reading too): voco's cached answers are
    greedy decoding over one masked pass of the LLM with LoRA on; upper and no_image are read
    by the LLaVA itself (the untrained start's LoRA is the identity): the frozen run's answers."""
    from engine.llava_eval import load_llava_voco
    from models.llava import load_llava
    out = world["tmp"] / "adapted"
    assert run("eval_llava.py", **flags(world, "adapted", voco_dir=world["tmp"] / "voco_adapted")) == 0
    for label in ("upper", "no_image"):
        assert answers(out, label) == answers(evaluated, label)
    parts = load_llava(world["llava"], dtype="fp32", device="cpu")
    voco, _, trained, _ = load_llava_voco(world["tmp"] / "voco_adapted", parts)
    assert voco.reader == "adapted"
    voco.load_adapter_state(trained)
    want = reference_answers(parts, voco, "system", "voco", world["tmp"] / "questions.jsonl",
                             world["tmp"] / "img", adapters=True)
    got = {r["question_id"]: r["text"] for r in answers(out, "voco-k1")}
    frozen = {r["question_id"]: r["text"] for r in answers(evaluated, "voco-k1")}
    compared = [qid for qid, (_, gap) in want.items() if gap > MARGIN]
    assert len(compared) >= 4 and all(got[q] == want[q][0] for q in compared)
    assert got != frozen      # the same weights read by the frozen LLM answer otherwise


def test_fully_fine_tuned_reader(world):
    """VoCo weights of a fully fine-tuned reader (llm/ and mm_projector.bin beside them): voco
    is answered by that LLaVA (one masked pass of it, no LoRA), upper and lower by the given
    LLaVA, as the paper defines the bounds."""
    from engine.llava_eval import load_llava_voco, trained_reader_work, Work
    from models.llava import load_llava, with_language
    out = world["tmp"] / "trained"
    assert run("eval_llava.py", **flags(world, "trained", voco_dir=world["tmp"] / "voco_trained",
                                        conditions=["upper", "lower", "voco"])) == 0
    parts = load_llava(world["llava"], dtype="fp32", device="cpu")
    voco, info, trained, layout = load_llava_voco(world["tmp"] / "voco_trained", parts)
    assert layout == "authors" and info["trained_reader"] == "trained"
    fine = with_language(parts, world["tmp"] / "voco_trained" / "llm",
                         world["tmp"] / "voco_trained" / "mm_projector.bin")
    work = Work(parts, voco, None, [], "", 1, MAX_NEW, torch.device("cpu"))
    tuned = trained_reader_work(work, world["tmp"] / "voco_trained", info, trained)
    assert torch.equal(tuned.voco.embeddings, trained["voco.embeddings"])
    compared = 0
    for label, condition, (p, v) in (("upper", "upper", (parts, voco)), ("lower-k1", "lower", (parts, voco)),
                                     ("voco-k1", "voco", (fine, tuned.voco))):
        want = reference_answers(p, v, "authors", condition, world["tmp"] / "questions.jsonl", world["tmp"] / "img")
        got = {r["question_id"]: r["text"] for r in answers(out, label)}
        assert got.keys() == want.keys()
        for qid, (text, gap) in want.items():
            if gap > MARGIN:
                assert got[qid] == text, (label, qid)
                compared += 1
    assert compared >= 10
    assert [r["text"] for r in answers(out, "voco-k1")] != [r["text"] for r in answers(out, "lower-k1")]


def test_rerun_resumes_without_recomputing(world, evaluated, monkeypatch, capsys):
    """A run stopped after one chunk leaves no results; the rerun answers only the chunks left
    and writes the uninterrupted run's answers; a third run does nothing; a new k answers only
    lower and voco at that k."""
    import engine.llava_eval as le
    calls = []
    real = le.run_chunk

    def counted(work, groups, labels):
        calls.append((tuple(g.image for g in groups), tuple(labels)))
        return real(work, groups, labels)
    monkeypatch.setattr(le, "run_chunk", counted)
    out = world["tmp"] / "resumed"
    assert run("eval_llava.py", **flags(world, "resumed", max_chunks=1)) == 0
    assert len(calls) == 1 and not (out / "results.json").exists()
    assert run("eval_llava.py", **flags(world, "resumed")) == 0
    assert len(calls) == 3 and calls[0][0] not in [c[0] for c in calls[1:]]
    for label in ("upper", "lower-k1", "no_image", "voco-k1"):
        assert answers(out, label) == answers(evaluated, label)
    capsys.readouterr()
    assert run("eval_llava.py", **flags(world, "resumed")) == 0
    assert len(calls) == 3 and "up to date" in capsys.readouterr().out
    assert run("eval_llava.py", **flags(world, "resumed", eval_ks=[1, 2])) == 0
    assert {c[1] for c in calls[3:]} == {("lower-k2", "voco-k2")} and len(calls) == 6
    assert answers(out, "voco-k1") == answers(evaluated, "voco-k1")
    assert (out / "answers-voco-k2.jsonl").is_file()


def test_a_changed_question_file_is_not_up_to_date(world, monkeypatch, capsys):
    """Another question file at the same path: the finished run is rebuilt and every condition
    answered again (its chunks are keyed by the file's content)."""
    import shutil

    import engine.llava_eval as le
    calls = []
    real = le.run_chunk
    monkeypatch.setattr(le, "run_chunk", lambda w, g, labels: calls.append(labels) or real(w, g, labels))
    tmp = world["tmp"]
    shutil.copy(tmp / "questions.jsonl", tmp / "changing.jsonl")
    f = flags(world, "changing", questions=tmp / "changing.jsonl", conditions=["upper"])
    assert run("eval_llava.py", **f) == 0 and len(calls) == 3
    capsys.readouterr()
    assert run("eval_llava.py", **f) == 0 and len(calls) == 3
    assert "up to date" in capsys.readouterr().out
    rows = (tmp / "changing.jsonl").read_text().splitlines()
    (tmp / "changing.jsonl").write_text("\n".join(rows[:-1]) + "\n")    # one question less
    assert run("eval_llava.py", **f) == 0 and len(calls) == 6
    assert "rebuilding" in capsys.readouterr().out
    assert len(answers(tmp / "changing", "upper")) == len(QUESTIONS) - 2


def test_bad_inputs_one_line(world, capsys):
    tmp = world["tmp"]
    cases = [
        (flags(world, "bad1", eval_ks=[3]), "at most k_max=2"),
        (flags(world, "bad2", llava="", llm=world["llava"], vision_tower=world["vision"],
               mm_projector=world["projector"]), "is a LLaVA checkpoint (LlavaForConditionalGeneration)"),
        (flags(world, "bad3", benchmark="gqa"), "--benchmark gqa is scored against"),
        (flags(world, "bad4", image_folder=tmp / "nowhere"), "no such image folder"),
        (flags(world, "bad5", max_new_tokens=100), "over the LLM context of 256"),
        (flags(world, "bad6", voco_dir=tmp / "voco_system", layout="authors"),
         "trained in the 'system' layout"),
        (flags(world, "bad7", voco_dir=tmp / "voco_trained_unfinished"), "llm: not found"),
    ]
    import shutil      # a fully fine-tuned reader's directory without its LLM
    shutil.copytree(tmp / "voco_trained", tmp / "voco_trained_unfinished", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("llm"))
    for f, message in cases:
        capsys.readouterr()
        assert run("eval_llava.py", **f) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], (message, err)
        assert not (f["out_dir"] / "manifest.json").exists()


def test_retention_and_scores_follow_the_answers(world, evaluated):
    """With answers that upper and half of voco's match, the results hold the scorer's numbers
    and llava_bench.retention of the three answers files, not None."""
    from engine.llava_bench import retention, score_exact
    from utils.artifacts import load_json
    tmp = world["tmp"]
    upper = {r["question_id"]: r["text"] for r in answers(evaluated, "upper")}
    voco = {r["question_id"]: r["text"] for r in answers(evaluated, "voco-k1")}
    lines = []
    for n, (image, text, _) in enumerate(QUESTIONS):
        qid = f"q{n}"
        answer = (voco if n % 2 else upper).get(qid, "blue").rstrip(".")
        lines.append(json.dumps({"question_id": qid, "image": image, "text": text, "answer": answer,
                                 "category": "odd" if n % 2 else "even"}))
    (tmp / "answered.jsonl").write_text("\n".join(lines) + "\n")
    assert run("eval_llava.py", **flags(world, "answered", questions=tmp / "answered.jsonl")) == 0
    out = tmp / "answered"
    res = load_json(out / "results.json")
    scores = {label: score_exact(out / f"answers-{label}.jsonl", tmp / "answered.jsonl")
              for label in ("upper", "lower-k1", "voco-k1")}
    want = retention(scores["upper"], scores["lower-k1"], scores["voco-k1"])
    row = res["rows"][-1]
    assert scores["upper"].metrics["accuracy"] > scores["lower-k1"].metrics["accuracy"]
    assert row["retention"] == pytest.approx(want["retention"]) and row["retention"] is not None
    assert row["retention_ci95"] == want["ci95"]
    assert res["rows"][0]["score"] == scores["upper"].metrics["accuracy"]
    assert res["scores"]["voco-k1"]["categories"] == scores["voco-k1"].metrics["categories"]


@pytest.mark.parametrize("name", ["gqa", "pope", "mme", "scienceqa", "seed", "textvqa", "vqav2",
                                       "mmbench"])
def test_each_benchmark_is_scored_by_its_scorer(name, tmp_path):
    """eval_llava's dispatch gives each benchmark's scorer its files (the hand-made answers of
    tests/fixtures/llava); MMBench and VQAv2 test-dev write their upload files."""
    from pathlib import Path

    from engine import llava_bench as lb
    from engine.llava_eval import check_annotations, score
    f = Path(__file__).parent / "fixtures" / "llava"
    cases = {
        "gqa": (f / "gqa_answers.jsonl", f / "gqa_questions.jsonl", f / "gqa_questions.json",
                lambda a: lb.score_gqa(a, f / "gqa_questions.json")),
        "pope": (f / "pope_answers.jsonl", f / "pope" / "llava_pope_test.jsonl", f / "pope",
                 lambda a: lb.score_pope(a, f / "pope" / "llava_pope_test.jsonl", f / "pope")),
        "mme": (f / "mme_answers.jsonl", None, f / "mme", lambda a: lb.score_mme(a, f / "mme")),
        "scienceqa": (f / "sqa_answers.jsonl", None, f / "sqa",
                      lambda a: lb.score_scienceqa(a, f / "sqa" / "problems.json",
                                                   f / "sqa" / "pid_splits.json")),
        "seed": (f / "seed_answers.jsonl", None, f / "seed" / "SEED-Bench.json",
                 lambda a: lb.score_seed(a, f / "seed" / "SEED-Bench.json")),
        "textvqa": (f / "textvqa_answers.jsonl", None, f / "textvqa" / "TextVQA_0.5.1_val.json",
                    lambda a: lb.score_textvqa(a, f / "textvqa" / "TextVQA_0.5.1_val.json")),
        "vqav2": (f / "vqav2_answers.jsonl", None, f / "vqav2" / "v2_mscoco_val2014_annotations.json",
                  lambda a: lb.score_vqav2(a, f / "vqav2" / "v2_mscoco_val2014_annotations.json")),
        "mmbench": (f / "mmbench_answers.jsonl", f / "mmbench" / "mmbench_dev_20230712.tsv", "",
                    lambda a: lb.score_mmbench(a, f / "mmbench" / "mmbench_dev_20230712.tsv")),
    }
    answers_path, questions, annotations, direct = cases[name]
    check_annotations(name, str(annotations))
    got, upload = score(name, answers_path, questions, str(annotations), tmp_path / "upload")
    want = direct(answers_path)
    assert got.metrics == want.metrics and got.per_question == want.per_question
    assert (upload is not None) == (name == "mmbench") and (upload is None or Path(upload).is_file())
    if name == "vqav2":    # test-dev: the upload over LLaVA's test2015 question list
        test = f / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl"
        got, upload = score(name, answers_path, test, str(test), tmp_path / "upload")
        assert got is None and json.loads(Path(upload).read_text())


def torchrun(script: str, flags: dict, port: int) -> None:
    import os
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    args = []
    for k, v in flags.items():
        args += [f"--{k}", *map(str, v)] if isinstance(v, (list, tuple)) else [f"--{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(repo / script), *args],
                          env=env, cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_process_gloo_equals_one(world, evaluated):
    """Under torchrun chunk i (of 3) is answered on rank i % 2; rank 0 writes what one process
    writes."""
    from utils.artifacts import load_json
    out = world["tmp"] / "two"
    torchrun("eval_llava.py", flags(world, "two"), 29547)
    for label in ("upper", "lower-k1", "no_image", "voco-k1"):
        assert answers(out, label) == answers(evaluated, label)
    a, b = load_json(evaluated / "results.json"), load_json(out / "results.json")
    keep = ("condition", "k", "n", "score", "mean", "ci95", "retention", "tokens_per_image",
            "kv_bytes_per_image", "prefill_flops_per_question")
    assert [{k: r[k] for k in keep} for r in a["rows"]] == [{k: r[k] for k in keep} for r in b["rows"]]
