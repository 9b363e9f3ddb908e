"""Video through VoCo-compressed frames: PyAV decoding and uniform sampling, the released
question layouts, the cached per-frame blocks against one masked pass over the whole clip,
the conditions, the objective, and the scripts (step 6, eval_video.py) end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.video import (SampleStats, load_questions, read_frames, uniform_indices, write_video)
from engine.video import (FrameBlocks, VideoPrompter, answer_loss, exact_match, position_word,
                          realize_clip, shuffled_order)
from engine.voco import Slot
from models.voco import VoCo, VoCoBlock
from fixtures_artifacts import run_script as run
from tiny_llm import tiny_llama_model
from utils.errors import V2LError
from voco_reference import Image, prefill_logits, single_pass, text_logits

pytestmark = pytest.mark.usefixtures("one_thread")

V = 300
TOL = 1e-4   # fp32 rounding only: the two paths compute the same thing


def colour_frames(n: int, size: int = 32) -> list[np.ndarray]:
    """n flat frames, frame i of grey level 20 + 10 i (distinguishable after the codec)."""
    return [np.full((size, size, 3), 20 + 10 * i, np.uint8) for i in range(n)]


# ----------------------------------------------------------------------------- decoding

def test_uniform_indices():
    assert uniform_indices(8, 8) == list(range(8))
    assert uniform_indices(100, 4) == [12, 37, 62, 87]          # middles of 4 segments of 25
    short = uniform_indices(5, 8)                                 # fewer frames: repeats, in order
    assert len(short) == 8 and short == sorted(short) and set(short) == set(range(5))


def test_frames_read_back_in_time_order(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, colour_frames(16), fps=4)
    stats = SampleStats()
    frames = read_frames(path, 4, stats)
    levels = [float(np.asarray(f).mean()) for f in frames]
    expected = [20 + 10 * i for i in uniform_indices(16, 4)]     # frames 2, 6, 10, 14
    assert np.allclose(levels, expected, atol=3), (levels, expected)
    assert stats.clips == 1 and not stats.short and stats.note() is None
    assert read_frames(path, 4, size=16)[0].size == (16, 16)


def test_fewer_frames_than_asked_are_repeated_and_counted(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, colour_frames(3), fps=4)
    stats = SampleStats()
    levels = [round((float(np.asarray(f).mean()) - 20) / 10) for f in read_frames(path, 8, stats)]
    assert levels == [i for i in uniform_indices(3, 8)]          # 0 0 0 1 1 1 2 2
    assert stats.short == ["short.mp4: 3 frames for 8"]
    assert "1 of 1 clips have fewer frames" in stats.note()


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x00\x18ftypmp42 not really a video"])
def test_unreadable_or_empty_video_is_one_line(tmp_path, content):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(V2LError) as e:
        read_frames(path, 8)
    message = str(e.value)
    assert "bad.mp4" in message and "\n" not in message and "replace or remove" in message


# ----------------------------------------------------------------------------- question files

def test_released_layouts_and_missing_clips(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "video7.mp4", colour_frames(4))
    write_video(videos / "-abc_1_5.mp4", colour_frames(4))
    write_video(videos / "v_xyz.mp4", colour_frames(4))
    msrvtt = tmp_path / "msrvtt_test_qa.json"
    msrvtt.write_text(json.dumps([
        {"answer": "dog", "category_id": 0, "id": 0, "question": "what is it?", "video_id": 7},
        {"answer": "man", "category_id": 1, "id": 1, "question": "who is it?", "video_id": 8}]))
    got, missing = load_questions("msrvtt", msrvtt, videos)
    assert [(q.qid, Path(q.video).name, q.answer, q.category) for q in got] == [
        ("0", "video7.mp4", "dog", "what")]
    assert missing == ["1"]                                       # skipped and counted
    msvd = tmp_path / "msvd" / "test_qa.json"
    msvd.parent.mkdir()
    msvd.write_text(json.dumps([{"answer": "cat", "id": 3, "question": "what?", "video_id": 2}]))
    (msvd.parent / "youtube_mapping.txt").write_text("-zzz_0_1 vid1\n-abc_1_5 vid2\n")
    got, missing = load_questions("msvd", msvd, videos)
    assert [(q.qid, Path(q.video).name) for q in got] == [("3", "-abc_1_5.mp4")] and not missing
    anq = tmp_path / "test_q.json"
    anq.write_text(json.dumps([{"question": "is it red", "question_id": "v_xyz_1", "video_name": "xyz"},
                               {"question": "?", "question_id": "v_none_0", "video_name": "none"}]))
    (tmp_path / "test_a.json").write_text(json.dumps([
        {"answer": "yes", "question_id": "v_xyz_1", "type": 3},
        {"answer": "no", "question_id": "v_none_0", "type": 4}]))
    got, missing = load_questions("activitynet", anq, videos)
    assert [(q.qid, Path(q.video).name, q.answer, q.category) for q in got] == [
        ("v_xyz_1", "v_xyz.mp4", "yes", "yes/no")]
    assert missing == ["v_none_0"]
    with pytest.raises(V2LError, match="expected a JSON list of objects"):
        load_questions("activitynet", msrvtt, videos, answers_file=tmp_path / "test_a.json")
    with pytest.raises(V2LError, match="use one of msvd, msrvtt, activitynet"):
        load_questions("nextqa", msrvtt, videos)


# ----------------------------------------------------------------------------- the mechanism

def make_voco(attn="sdpa", k_max=4, lora_rank=4, **kw):
    model = tiny_llama_model(V)
    model.config._attn_implementation = attn
    for p in model.parameters():
        p.requires_grad_(False)
    return VoCo(model, k_max, lora_rank=lora_rank, bos_id=1, **kw)


def random_clip(g, t: int = 5, repeat: bool = True) -> dict[str, list[int]]:
    """frame key -> token ids of a clip of t frames of 6-9 tokens; frame 3 repeats frame 1 (a
    static stretch: the same tokens, one block)."""
    words = {f"c#{i}": torch.randint(3, V, (int(torch.randint(6, 10, (1,), generator=g)),),
                                     generator=g).tolist() for i in range(t)}
    if repeat:
        words["c#3"] = list(words["c#1"])
    return words


def clip_case(voco, k: int, g):
    words = random_clip(g)
    keys = list(words)
    head, tail = [1, 17, 18], [40, 41, 42, 43]
    segments = [head] + [Slot(key) for key in keys] + [tail]
    single = [head] + [Image(torch.tensor(words[key])) for key in keys] + [tail]
    return words, keys, segments, single


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("context", [False, True])
def test_cached_frame_blocks_equal_one_masked_pass_over_the_clip(attn, context):
    """Each frame compressed alone, cached, and the blocks read in time order at consecutive
    positions give the logits of one masked forward over the whole uncompressed clip."""
    voco = make_voco(attn, context_ids=[7, 8, 9] if context else None)
    g = torch.Generator().manual_seed(3)
    k = 2   # LoRA starts as the identity (B = 0): the reference runs the frozen LLM throughout
    words, keys, segments, single = clip_case(voco, k, g)
    other = random_clip(g, t=3, repeat=False)               # a second, shorter clip (padding)
    o_segments = [[1, 5]] + [Slot(key.replace("c#", "d#")) for key in other] + [[60, 61]]
    words |= {key.replace("c#", "d#"): ids for key, ids in other.items()}
    o_single = [[1, 5]] + [Image(torch.tensor(ids)) for ids in other.values()] + [[60, 61]]
    with torch.no_grad():
        ref = text_logits(*single_pass(voco, [single, o_single], k))
        blocks = FrameBlocks(words)
        blocks.compress(voco, list(words), k, chunk=3)
        got = text_logits(*prefill_logits(voco, [realize_clip(segments, "voco", blocks=blocks),
                                                 realize_clip(o_segments, "voco", blocks=blocks)]))
        shuffled = text_logits(*prefill_logits(voco, [realize_clip(segments, "shuffled", blocks=blocks,
                                                                   seed=0)]))
        last = text_logits(*prefill_logits(voco, [realize_clip(segments, "last", blocks=blocks)]))
    assert ref[0].abs().max() > 1.0
    assert max((a - b).abs().max().item() for a, b in zip(ref, got)) < TOL
    assert blocks.compressed == len(words) - 1             # the repeated frame: compressed once
    assert torch.equal(blocks["c#3"].keys, blocks["c#1"].keys)
    # the question's logits depend on the frames' order and on every frame
    assert (shuffled[0][-1] - ref[0][-1]).abs().max() > 1e-3
    assert (last[0][-1] - ref[0][-1]).abs().max() > 1e-3


def test_conditions():
    words = {f"v#{i}": [10 + i, 20 + i] for i in range(4)}
    segments = [[1, 2]] + [Slot(f"v#{i}") for i in range(4)] + [[3]]
    blocks = {key: VoCoBlock(torch.full((1, 1, 1, 2), float(i)), torch.zeros(1, 1, 1, 2))
              for i, key in enumerate(words)}
    upper = realize_clip(segments, "upper", words=words)
    assert upper == [[1, 2, 10, 20, 11, 21, 12, 22, 13, 23, 3]]
    assert realize_clip(segments, "none") == [[1, 2, 3]]
    voco = realize_clip(segments, "voco", blocks=blocks)
    assert [b.keys[0, 0, 0, 0].item() for b in voco[1:-1]] == [0, 1, 2, 3]
    last = realize_clip(segments, "last", blocks=blocks)
    assert len(last) == 3 and last[1] is blocks["v#3"]
    order = [b.keys[0, 0, 0, 0].item() for b in realize_clip(segments, "shuffled", blocks=blocks,
                                                               seed="q1")[1:-1]]
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
    assert order == [b.keys[0, 0, 0, 0].item() for b in realize_clip(
        segments, "shuffled", blocks=blocks, seed="q1")[1:-1]]        # seeded: the same again
    assert all(shuffled_order(n, s) != list(range(n)) for n in (2, 3, 8) for s in range(20))


def test_position_word_finds_the_shape():
    image = torch.zeros(3, 32, 32) + torch.tensor([0.2, 0.1, -0.3])[:, None, None]
    assert position_word(image) == "centre"                          # no shape
    left = image.clone()
    left[:, 12:20, 1:9] = torch.tensor([0.9, -0.8, 0.5])[:, None, None]
    assert position_word(left) == "left"
    bottom = image.clone()
    bottom[:, 24:31, 13:19] = 1.0
    assert position_word(bottom) == "bottom"
    middle = image.clone()
    middle[:, 13:19, 13:19] = 1.0
    assert position_word(middle) == "centre"
    grid = torch.full((8, 8), 5.0)                                   # a one-channel map works too
    grid[0:2, 3:5] = 9.0
    assert position_word(grid) == "top"


def test_exact_match_after_vqa_normalisation():
    assert exact_match(" The cat.\nQuestion: what", "cat")
    assert exact_match("two", "2") and exact_match("Red", "red")
    assert not exact_match("red circle", "red")


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_answer_loss_is_that_of_the_logits(objective):
    """The objective equals the cross-entropy / KL computed from the full logits of the cached
    path (student) and of the frozen LLM reading every frame (teacher) at the answer tokens."""
    voco = make_voco()
    g = torch.Generator().manual_seed(5)
    k = 2
    words, keys, _, _ = clip_case(voco, k, g)
    answers = [[70, 71, 2], [72, 2]]
    rows = [[[1, 17]] + [Slot(key) for key in keys] + [[40, 41] + a] for a in answers]
    total, count = answer_loss(voco, rows, words, k, [len(a) for a in answers], objective)
    assert count == sum(len(a) for a in answers)
    with torch.no_grad():
        blocks = FrameBlocks(words)
        blocks.compress(voco, keys, k)
        s_logits = text_logits(*prefill_logits(voco, [realize_clip(r, "voco", blocks=blocks) for r in rows]))
        t_logits = text_logits(*prefill_logits(voco, [realize_clip(r, "upper", words=words) for r in rows]))
    expected = 0.0
    for a, s, t in zip(answers, s_logits, t_logits):
        n = len(a)
        s_log = F.log_softmax(s[-n - 1:-1], -1)
        if objective == "ce":
            expected += -s_log.gather(1, torch.tensor(a)[:, None]).sum()
        else:
            t_log = F.log_softmax(t[-n - 1:-1], -1)
            expected += (t_log.exp() * (t_log - s_log)).sum()
    torch.testing.assert_close(total.detach(), torch.as_tensor(expected), rtol=1e-4, atol=TOL)
    total.backward()
    assert voco.embeddings.grad is not None and voco.embeddings.grad.abs().sum() > 0


def test_prompter_segments_and_answer(monkeypatch):
    class Tok:
        bos_token_id, eos_token_id = 1, 2
    monkeypatch.setattr("engine.video.encode_segment", lambda tok, text: [ord(c) for c in text])
    p = VideoPrompter(Tok(), "V:", " Q:{question} A:")
    segs = p.segments("why", ["a#0", "a#1"], answer="no")
    assert segs[0] == [1, ord("V"), ord(":")] and segs[1:3] == [Slot("a#0"), Slot("a#1")]
    assert segs[3] == [ord(c) for c in " Q:why A: no"] + [2]
    with pytest.raises(V2LError, match="must hold"):
        VideoPrompter(Tok(), "V:", "no placeholder")


# ----------------------------------------------------------------------------- the scripts

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny tokenizer, a tiny LLM, a step-5 artifact and a few demo clips."""
    from demo.video import write_video_world
    from fixtures_artifacts import make_image_folder, run_script
    from fixtures_tokenizer import make_tiny_tokenizer
    from models.tokenizer_io import save_tokenizer
    from tiny_llm import make_tiny_llama
    from utils.artifacts import write_manifest
    tmp = tmp_path_factory.mktemp("video")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer, _, dirs = make_tiny_tokenizer(tmp)
    save_tokenizer(tokenizer, tmp / "tokenizer")
    write_manifest(tmp / "tokenizer", "tokenizer", {}, ["tokenizer.pt"],
                   inputs={"codebook": dirs["codebook"], "global": dirs["global"]})
    make_image_folder(tmp / "data", n_per_class=2, classes=("cat", "dog", "bird", "tree"), odd=False)
    make_tiny_llama(tmp / "llm", fmt="hf")
    assert run_script("step5_train_voco.py", tokenizer_dir=tmp / "tokenizer", llm=tmp / "llm",
                      data_dir=tmp / "data", holdout_every=2, global_k=3, k_max=2, train_ks="2",
                      steps=2, batch_size=2, device="cpu", num_workers=0, out_dir=tmp / "voco",
                      llm_dtype="fp32") == 0
    files, info = write_video_world(tmp / "clips", clips={"train": 3, "test": 3}, t=4, size=64,
                                    progress=False)
    write_manifest(tmp / "clips", "demo_video", {}, files, info=info)
    yield tmp
    torch.set_num_threads(threads)


def step6_flags(world, out, **extra):
    return {"tokenizer_dir": world / "tokenizer", "llm": world / "llm", "voco_dir": world / "voco",
            "dataset": "msrvtt", "questions_file": world / "clips" / "train_qa.json",
            "video_dir": world / "clips" / "videos", "frames": 4, "position_words": "true",
            "steps": 4, "batch_size": 2, "save_every": 1, "device": "cpu", "out_dir": out,
            "llm_dtype": "fp32", **extra}


def test_step6_resumes_exactly_and_eval_video_runs(world, capsys):
    from utils.artifacts import load_json, load_tensors, read_manifest
    run_script = run
    full, resumed = world / "video_full", world / "video_resumed"
    assert run_script("step6_train_video.py", **step6_flags(world, full)) == 0
    assert run_script("step6_train_video.py", **step6_flags(world, resumed, stop_after=2)) == 0
    assert (resumed / "checkpoint.pt").is_file() and not (resumed / "manifest.json").exists()
    assert run_script("step6_train_video.py", **step6_flags(world, resumed)) == 0
    a, b = load_tensors(full / "voco.safetensors"), load_tensors(resumed / "voco.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_tensors(world / "voco" / "voco.safetensors")
    assert not torch.equal(a["voco.embeddings"], start["voco.embeddings"])   # it trained
    manifest = read_manifest(full, "voco_video")
    assert set(manifest["inputs"]) >= {"tokenizer", "voco"}
    assert load_json(full / "voco.json")["video"]["frames"] == 4
    out = world / "eval"
    assert run_script("eval_video.py", tokenizer_dir=world / "tokenizer", llm=world / "llm",
                      voco_dir=full, dataset="msrvtt",
                      questions_file=world / "clips" / "test_qa.json",
                      video_dir=world / "clips" / "videos", frames=4, position_words="true",
                      eval_ks=[1, 2], answer_set="category", batch_size=4, device="cpu",
                      out_dir=out, llm_dtype="fp32") == 0
    res = load_json(out / "results.json")
    got = {(r["condition"], r["k"]) for r in res["rows"]}
    assert got == {("upper", None), ("none", None)} | {(c, k) for c in ("lower", "voco", "last", "shuffled")
                                                      for k in (1, 2)}
    assert all(r["n"] == 6 for r in res["rows"])                   # 3 clips x 2 questions
    cost = res["cost"]
    full_tokens = cost["full"]["tokens_per_clip"]
    assert cost["voco k=2"]["tokens_per_clip"] == 8
    assert cost["voco k=2"]["kv_reduction"] == pytest.approx(1 - 8 / full_tokens)
    assert cost["voco k=1"]["distinct_frames_compressed"] <= 12
    answers = res["answers"]
    cands = {c: {t for t, cc in zip(answers["truth"], answers["category"]) if cc == c}
             for c in set(answers["category"])}
    assert all(p.strip() in cands[c] for p, c in zip(answers["voco k=2"], answers["category"]))
    # a clip missing from the folder: its questions skipped and counted, one line
    qfile = world / "clips_missing" / "test_qa.json"
    qfile.parent.mkdir(exist_ok=True)
    rows = json.loads((world / "clips" / "test_qa.json").read_text())
    rows.append({**rows[0], "id": 99, "video_id": 12345})
    qfile.write_text(json.dumps(rows))
    capsys.readouterr()
    assert run_script("eval_video.py", tokenizer_dir=world / "tokenizer", llm=world / "llm",
                      voco_dir=world / "voco", dataset="msrvtt", questions_file=qfile,
                      video_dir=world / "clips" / "videos", frames=4, eval_ks="1",
                      conditions_run=["voco", "last"], batch_size=4, device="cpu",
                      out_dir=world / "eval_missing", llm_dtype="fp32") == 0
    assert "1 questions name a clip not in" in capsys.readouterr().out
    assert load_json(world / "eval_missing" / "results.json")["inputs"]["missing_clips"] == 1
