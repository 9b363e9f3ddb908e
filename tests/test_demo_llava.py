"""The demo's tiny LLaVA: its LLaVA-format data, the CLIP feature grid, the projector file and
its training (tiny random CLIP and LLM)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.llava import IGNORE_INDEX, LlavaConversations
from demo import llava as demo_llava
from demo.llava_world import CATEGORIES, QUADRANTS, render_scene, write_llava_world
from demo.world import COLOURS, _rng
from engine.llava_bench import answer_row, load_questions, score_exact, write_answers
from models.llava import check_projector, read_projector
from utils.errors import V2LError

N_EVAL = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_world")
    files, info = write_llava_world(root, seed=3, n_pretrain=16, n_instruct=12, n_eval=N_EVAL,
                                    size=64, progress=False)
    return root, files, info


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random LLM (HF directory) and a tiny random ModifiedResNet CLIP directory."""
    from tiny_clip import make_tiny_clip
    from tiny_llm import make_tiny_llama
    root = tmp_path_factory.mktemp("tiny_models")
    return make_tiny_llama(root / "llm", "hf"), make_tiny_clip(root / "clip")


def test_scene_puts_the_shape_in_its_quadrant():
    for i, q in enumerate(QUADRANTS * 3):
        img, scene = render_scene(_rng(0, "t", i), "red", "square", "plain", q, 64)
        assert scene.quadrant == q
        px = np.asarray(img).astype(float)
        red = (px[..., 0] - px[..., 1:].mean(-1)) > 80      # the red shape's pixels
        ys, xs = np.nonzero(red)
        assert len(xs) > 20
        cx, cy = xs.mean() / 64, ys.mean() / 64
        assert (cx > 0.5) == q.endswith("right") and (cy > 0.5) == q.startswith("bottom"), (q, cx, cy)
        assert abs(cx - scene.cx) < 0.05 and abs(cy - scene.cy) < 0.05


def test_scene_refuses_what_the_world_lacks():
    with pytest.raises(V2LError, match="not in the smooth world"):
        render_scene(_rng(0, "t"), "red", "square", "striped", "top left", 64)


def test_data_files_parse_through_data_llava(world, tiny):
    from transformers import AutoTokenizer
    root, files, _ = world
    tok = AutoTokenizer.from_pretrained(tiny[0])
    for name, n in (("pretrain.json", 16), ("instruct.json", 12)):
        data = LlavaConversations(root / name, tok, root, image_tokens=16)
        assert len(data) == n and not data.missing
        for i in range(n):
            s = data[i]
            assert s.image is not None and (root / s.image).is_file() and s.n_answer_tokens > 0
    entries = json.loads((root / "instruct.json").read_text())
    rounds = [len(e["conversations"]) // 2 for e in entries]
    assert min(rounds) >= 2 and max(rounds) <= 4
    assert all(e["conversations"][0]["value"].startswith("<image>\n") for e in entries)
    # caption entries in the plain template: only the caption and "\n" are labelled
    samples = demo_llava.caption_samples(root / "pretrain.json", tok, root)
    caption = json.loads((root / "pretrain.json").read_text())[0]["conversations"][1]["value"]
    assert tok.decode(samples[0].after_labels).strip() == caption
    assert set(samples[0].before_labels) == {IGNORE_INDEX}


def test_missing_image_is_skipped_and_counted(world, tiny, tmp_path):
    from transformers import AutoTokenizer
    root, _, _ = world
    entries = json.loads((root / "pretrain.json").read_text())
    entries[2]["image"] = "images/pretrain/gone.png"
    (tmp_path / "p.json").write_text(json.dumps(entries))
    data = LlavaConversations(tmp_path / "p.json", AutoTokenizer.from_pretrained(tiny[0]), root)
    assert len(data) == 15 and data.missing == [entries[2]["id"]]


def test_question_file_is_balanced_and_scores(world, tmp_path):
    root, _, info = world
    questions = load_questions(root / "questions.jsonl")
    assert len(questions) == 4 * N_EVAL
    cats = [q["category"] for q in questions]
    assert all(cats.count(c) == N_EVAL for c in CATEGORIES)
    scenes = json.loads((root / "scenes.json").read_text())
    for q in questions:
        assert (root / q["image"]).is_file() and q["text"].endswith(
            "Answer the question using a single word or phrase.")
        key = "quadrant" if q["category"] == "position" else q["category"]
        assert q["answer"] == scenes[q["image"]][key]
    colours = [q["answer"] for q in questions if q["category"] == "colour"]
    assert all(colours.count(c) == N_EVAL // len(COLOURS) for c in COLOURS)
    # right answers (as a model writes them: capitalised, a full stop) score 100, one wrong less
    rows = [answer_row(q, q["answer"].capitalize() + ".", "m") for q in questions]
    write_answers(tmp_path / "a.jsonl", rows)
    score = score_exact(tmp_path / "a.jsonl", root / "questions.jsonl")
    assert score.metrics["accuracy"] == 100 and score.metrics["complete"]
    assert set(score.metrics["categories"]) == set(CATEGORIES)
    rows[0]["text"] = "no idea"
    write_answers(tmp_path / "a.jsonl", rows)
    score = score_exact(tmp_path / "a.jsonl", root / "questions.jsonl")
    assert score.metrics["categories"][questions[0]["category"]] == pytest.approx(100 * (1 - 1 / N_EVAL))


def test_world_is_a_function_of_the_seed(world, tmp_path):
    root, files, _ = world
    write_llava_world(tmp_path, seed=3, n_pretrain=16, n_instruct=12, n_eval=N_EVAL, size=64,
                      progress=False)
    for rel in ("questions.jsonl", "instruct.json", "images/eval/00003.png"):
        assert (tmp_path / rel).read_bytes() == (root / rel).read_bytes()


def test_grid_reads_the_clip_feature_maps(tiny):
    vision, clip = demo_llava.load_vision(tiny[1], ["layer3", "layer4"], 4)
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    vis = clip.model.visual
    hooks = [getattr(vis, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in ("layer3", "layer4")]
    with torch.no_grad():
        vis(x)
        grid = vision(x)
    for h in hooks:
        h.remove()
    l3, l4 = seen["layer3"], seen["layer4"]
    assert l3.shape[-1] == 4 and l4.shape[-1] == 2
    assert grid.shape == (2, 16, l3.shape[1] + l4.shape[1]) and vision.width == grid.shape[-1]
    for r in range(4):
        for c in range(4):
            cell = grid[:, 4 * r + c]
            torch.testing.assert_close(cell[:, :l3.shape[1]], l3[:, :, r, c])
            torch.testing.assert_close(cell[:, l3.shape[1]:], l4[:, :, r // 2, c // 2])
    with pytest.raises(V2LError, match="--layers"):
        demo_llava.ClipGrid(vis, ["layer9"], 4)


def _trained(tiny, world, tmp_path, steps=12, **kw):
    from models.llm import load_llm
    from models.llava import ImagePreprocess, mlp2x_gelu
    root = world[0]
    vision, clip = demo_llava.load_vision(tiny[1], ["layer3", "layer4"], 4)
    lang = load_llm(tiny[0], dtype="fp32", device="cpu")
    lang.model.set_attn_implementation("sdpa")
    samples = demo_llava.caption_samples(root / "pretrain.json", lang.text_tokenizer, root)[:8]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(demo_llava.preprocessor_config(clip)))
    feats = demo_llava.image_features(vision, ImagePreprocess(tmp_path), root,
                                      sorted({s.image for s in samples}))
    torch.manual_seed(0)
    projector = mlp2x_gelu(vision.width, lang.model.config.hidden_size)
    return lang, projector, samples, feats, vision


def test_projector_steps_lower_the_loss(tiny, world, tmp_path):
    lang, projector, samples, feats, _ = _trained(tiny, world, tmp_path)
    before = [p.detach().clone() for p in lang.model.parameters()]

    def loss():
        with torch.no_grad():
            return demo_llava.batch_loss(lang.model, projector, samples, [feats[s.image] for s in samples]).item()

    first = loss()
    hist = demo_llava.train_projector(lang.model, projector, [(samples, 15)], feats, 8, 1e-2, 0.1,
                                      log_every=0)
    assert len(hist["losses"]) == 15
    assert loss() < first - 0.5        # nats: far beyond float noise
    assert all(torch.equal(a, b) for a, b in zip(before, lang.model.parameters()))   # LLM frozen


def test_batch_loss_is_the_answer_cross_entropy(tiny, world, tmp_path):
    """The padded batch's loss equals each sample's full-vocabulary cross-entropy written out."""
    lang, projector, samples, feats, _ = _trained(tiny, world, tmp_path)
    llm, table = lang.model, lang.model.get_input_embeddings()
    with torch.no_grad():
        got = demo_llava.batch_loss(llm, projector, samples[:3], [feats[s.image] for s in samples[:3]])
        nll, count = 0.0, 0
        for s in samples[:3]:
            img = projector(feats[s.image][None])[0]
            x = torch.cat([table(torch.tensor(s.before)), img, table(torch.tensor(s.after))])
            logits = llm(inputs_embeds=x[None]).logits[0]
            labels = s.before_labels + [IGNORE_INDEX] * len(img) + s.after_labels
            for t in range(1, len(labels)):
                if labels[t] != IGNORE_INDEX:
                    nll -= torch.log_softmax(logits[t - 1].double(), -1)[labels[t]].item()
                    count += 1
    assert got.item() == pytest.approx(nll / count, rel=1e-4)


def test_training_resumes_where_it_stopped(tiny, world, tmp_path, monkeypatch):
    lang, projector, samples, feats, _ = _trained(tiny, world, tmp_path)
    start = {k: v.clone() for k, v in projector.state_dict().items()}
    straight = demo_llava.train_projector(lang.model, projector, [(samples, 6)], feats, 4, 1e-2, 0.1,
                                          log_every=0)["losses"]
    done = {k: v.clone() for k, v in projector.state_dict().items()}
    projector.load_state_dict(start)
    ckpt, key = tmp_path / "ckpt.pt", {"run": 1}
    real, calls = demo_llava.batch_loss, []

    def dies_at_the_fourth_step(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(demo_llava, "batch_loss", dies_at_the_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        demo_llava.train_projector(lang.model, projector, [(samples, 6)], feats, 4, 1e-2, 0.1,
                                   checkpoint=ckpt, key=key, save_every=2, log_every=0)
    monkeypatch.setattr(demo_llava, "batch_loss", real)
    projector.load_state_dict(start)         # a fresh process: only the checkpoint (step 2) is left
    resumed = demo_llava.train_projector(lang.model, projector, [(samples, 6)], feats, 4, 1e-2, 0.1,
                                         checkpoint=ckpt, key=key, save_every=100, log_every=0)
    assert resumed["losses"][:2] == straight[:2]
    np.testing.assert_allclose(resumed["losses"], straight, rtol=1e-5)
    for k, v in projector.state_dict().items():
        torch.testing.assert_close(v, done[k], rtol=1e-5, atol=1e-6)


def test_projector_file_loads_through_models_llava(tiny, world, tmp_path):
    lang, projector, samples, feats, vision = _trained(tiny, world, tmp_path)
    out = tmp_path / "proj"
    out.mkdir()
    demo_llava.save_projector(projector, out / demo_llava.PROJECTOR_FILE)
    raw = torch.load(out / demo_llava.PROJECTOR_FILE, weights_only=True)
    assert sorted(raw) == [f"model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("bias", "weight")]
    state = read_projector(out / demo_llava.PROJECTOR_FILE)
    check_projector(state, vision.width, lang.model.config.hidden_size, out)
    with pytest.raises(V2LError, match="hidden size"):
        check_projector(state, vision.width, lang.model.config.hidden_size + 1, out)
    (out / "preprocessor_config.json").write_text(json.dumps(demo_llava.preprocessor_config(
        demo_llava.load_vision(tiny[1], ["layer3"], 4)[1])))
    (out / demo_llava.READING_FILE).write_text(json.dumps({"layers": ["layer3", "layer4"], "grid": 4}))
    parts = demo_llava.load_demo_llava(out, tiny[0], tiny[1], dtype="fp32")
    from PIL import Image
    img = Image.open(world[0] / samples[0].image)
    with torch.no_grad():
        got = parts.embed_images(parts.preprocess(img))[0]
        want = projector(feats[samples[0].image][None])[0]
    assert got.shape == (16, lang.model.config.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert parts.image_tokens() == 16
    # the LLaVA stages (step 7, eval_llava) take the folder as --mm_projector
    from engine.llava_voco import load_model
    staged = load_model(llm=tiny[0], vision=tiny[1], projector=out, dtype="fp32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(staged.embed_images(staged.preprocess(img))[0], got)
    with pytest.raises(V2LError, match="needs --llm"):
        load_model(vision=tiny[1], projector=out, dtype="fp32", device="cpu")
    # a projector for another vision width is refused with one line
    (out / demo_llava.READING_FILE).write_text(json.dumps({"layers": ["layer3"], "grid": 4}))
    with pytest.raises(V2LError, match="vision features"):
        demo_llava.load_demo_llava(out, tiny[0], tiny[1], dtype="fp32")


def test_bounds_write_scorable_answers(tiny, world, tmp_path):
    lang, projector, samples, feats, _ = _trained(tiny, world, tmp_path)
    out = tmp_path / "proj"
    out.mkdir()
    demo_llava.save_projector(projector, out / demo_llava.PROJECTOR_FILE)
    (out / "preprocessor_config.json").write_text((tmp_path / "preprocessor_config.json").read_text())
    (out / demo_llava.READING_FILE).write_text(json.dumps({"layers": ["layer3", "layer4"], "grid": 4}))
    parts = demo_llava.load_demo_llava(out, tiny[0], tiny[1], dtype="fp32")
    result = demo_llava.measure_bounds(parts, world[0], tmp_path, batch_size=16, max_new_tokens=3)
    for condition in ("upper", "no_image"):
        m = result[condition]
        assert m["n"] == 4 * N_EVAL and m["complete"] and set(m["categories"]) == set(CATEGORIES)
        rows = [json.loads(x) for x in (tmp_path / f"answers_{condition}.jsonl").read_text().splitlines()]
        assert len(rows) == 4 * N_EVAL and all(isinstance(r["text"], str) for r in rows)
    # the two conditions read different prompts: the image's 16 embeddings or none
    upper = [json.loads(x)["text"] for x in (tmp_path / "answers_upper.jsonl").read_text().splitlines()]
    none = [json.loads(x)["text"] for x in (tmp_path / "answers_no_image.jsonl").read_text().splitlines()]
    assert upper != none
