"""The LLaVA-1.5 model path: both forms of a tiny random LLaVA give transformers'
LlavaForConditionalGeneration's logits, the image steps are LLaVA's, bad inputs are refused
with one line."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from models.llava import (expand2square, is_llava_dir, load_llava, read_projector,
                          refuse_llava_as_llm)
from tiny_llava import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, N_PATCHES, TEXT_VOCAB, make_tiny_llava
from utils.errors import V2LError

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4   # fp32: the same operations in another order at most


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def reference(tiny):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(tiny["llava"], dtype=torch.float32).eval()


def picture(width, height, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def load_form(tiny, form, **kw):
    if form == "llava-hf":
        return load_llava(tiny["llava"], dtype="fp32", device="cpu", **kw)
    return load_llava(llm=tiny["llm"], vision=tiny["vision"], projector=tiny["projector"],
                      dtype="fp32", device="cpu", **kw)


@pytest.mark.parametrize("form", ["llava-hf", "parts"])
def test_logits_equal_transformers_llava(tiny, reference, form):
    """A prompt with an image: our parts (vision -> projector -> embeddings spliced at the
    placeholder -> the causal LM) give LlavaForConditionalGeneration's logits."""
    parts = load_form(tiny, form)
    assert type(parts.llm).__name__ == "LlamaForCausalLM"
    before, after = [1, 5, 9, 17, 23], [30, 31, 44, 7, 2]
    pixels = parts.preprocess([picture(70, 40), picture(30, 50, seed=1)])
    ids = torch.tensor([before + [TEXT_VOCAB] * N_PATCHES + after] * 2)
    with torch.no_grad():
        want = reference(input_ids=ids, pixel_values=pixels).logits
        blank = reference(input_ids=ids, pixel_values=torch.zeros_like(pixels)).logits
        images = parts.embed_images(pixels)
        assert images.shape == (2, N_PATCHES, 64)
        got = torch.stack([parts.llm(inputs_embeds=parts.embed_prompt([before, im, after])[None]).logits[0]
                           for im in images])
    vocab = got.shape[-1]          # the Vicuna form has no "<image>" row
    assert vocab == (TEXT_VOCAB if form == "parts" else want.shape[-1])
    assert (want - blank).abs().max() > 1.0                   # the image matters
    assert (want[..., :vocab] - got).abs().max() < TOL


def test_preprocessing_is_llavas(tiny):
    """Pad to a square in CLIP's mean colour (the image centred), then bicubic resize and
    CLIP's normalisation: against a reference written out with PIL and numpy."""
    parts = load_form(tiny, "parts")
    background = tuple(int(m * 255) for m in CLIP_MEAN)
    for w, h in ((70, 40), (31, 50), (56, 56)):
        image = picture(w, h)
        side = max(w, h)
        square = Image.new("RGB", (side, side), background)
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        ref = np.asarray(square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float64) / 255
        ref = (ref - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
        got = parts.preprocess(image)[0].permute(1, 2, 0).double().numpy()
        assert np.abs(got - ref).max() < 1e-5, (w, h)
        assert expand2square(image, background).size == (side, side)
    # the padding is the mean colour: normalised, (int(m * 255) / 255 - m) / s, near 0
    top = parts.preprocess(picture(70, 20))[0, :, 0, :]
    pad = (torch.tensor([int(m * 255) / 255 for m in CLIP_MEAN]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert (top - pad[:, None]).abs().max() < 1e-5
    # pad off: CLIP's short-side resize and centre crop (llava-hf's processor)
    image = picture(70, 40)
    plain = load_form(tiny, "parts", pad=False).preprocess(image)[0].permute(1, 2, 0).double().numpy()
    resized = image.resize((int(IMAGE_SIZE * 70 / 40), IMAGE_SIZE), Image.BICUBIC)
    left = (resized.size[0] - IMAGE_SIZE) // 2
    ref = np.asarray(resized.crop((left, 0, left + IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float64) / 255
    assert np.abs(plain - (ref - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).max() < 1e-5


def test_features_are_layer_minus_2_without_cls(tiny):
    """The features are the output of all but the last CLIP layer, CLS dropped, run layer by
    layer here."""
    parts = load_form(tiny, "parts")
    tower = parts.vision.tower
    pixels = parts.preprocess(picture(60, 45))
    with torch.no_grad():
        x = tower.pre_layrnorm(tower.embeddings(pixels))
        for layer in tower.encoder.layers[:-1]:
            out = layer(x, attention_mask=None)
            x = out[0] if isinstance(out, tuple) else out
        got = parts.vision(pixels)
        last = tower.encoder.layers[-1](x, attention_mask=None)
        last = last[0] if isinstance(last, tuple) else last
    assert got.shape == (1, N_PATCHES, 32)
    assert (got - x[:, 1:]).abs().max() < 1e-5
    assert (got - last[:, 1:]).abs().max() > 1e-2            # not the last layer's


def test_language_model_shares_the_checkpoints_weights(tiny):
    parts = load_form(tiny, "llava-hf")
    assert not any(p.requires_grad for p in parts.llm.parameters())
    assert parts.image_token_id == TEXT_VOCAB
    assert parts.tokenizer.convert_tokens_to_ids("<image>") == TEXT_VOCAB
    assert not any(t.is_meta for t in list(parts.llm.parameters()) + list(parts.llm.buffers()))
    assert parts.language.fmt == "llava-hf"


def test_bad_inputs_one_line(tiny, tmp_path):
    def one_line(match, fn, *a, **kw):
        with pytest.raises(V2LError, match=match) as e:
            fn(*a, **kw)
        assert "\n" not in str(e.value)

    assert is_llava_dir(tiny["llava"]) and not is_llava_dir(tiny["llm"])
    # a llava-hf directory where a causal LM is expected, and the reverse
    one_line(r"is a LLaVA checkpoint \(LlavaForConditionalGeneration\); give it as --llava, or give "
             "its language model", refuse_llava_as_llm, tiny["llava"])
    one_line("is a LLaVA checkpoint", load_llava, llm=tiny["llava"], vision=tiny["vision"],
             projector=tiny["projector"], device="cpu")
    one_line(r"is not a llava-hf checkpoint \(LlamaForCausalLM\).*--llm with --vision_tower",
             load_llava, tiny["llm"], device="cpu")
    one_line("is not a CLIP model", load_llava, llm=tiny["llm"], vision=tiny["llm"],
             projector=tiny["projector"], device="cpu")
    one_line("is a LLaVA checkpoint, not a CLIP vision tower", load_llava, llm=tiny["llm"],
             vision=tiny["llava"], projector=tiny["projector"], device="cpu")
    original = tmp_path / "llava-v1.5-7b"
    shutil.copytree(tiny["llm"], original)
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps(
        config | {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
                  "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    one_line("original LLaVA checkpoint", refuse_llava_as_llm, original)
    one_line("needs --mm_projector", load_llava, llm=tiny["llm"], vision=tiny["vision"])
    # projectors that do not fit
    state = read_projector(tiny["projector"])
    for name, change, match in (
            ("narrow.bin", {"0.weight": torch.zeros(64, 24)}, "takes 24-wide vision features but the "
                                                              "vision tower gives 32"),
            ("small.bin", {"0.weight": torch.zeros(48, 32), "0.bias": torch.zeros(48),
                           "2.weight": torch.zeros(48, 48), "2.bias": torch.zeros(48)},
             "outputs 48 channels but the LLM's hidden size is 64"),
            ("keys.bin", {"3.weight": torch.zeros(2)}, "not an mlp2x_gelu projector")):
        bad = tmp_path / name
        torch.save({f"model.mm_projector.{k}": v for k, v in (state | change).items()}, bad)
        one_line(match, load_llava, llm=tiny["llm"], vision=tiny["vision"], projector=bad, device="cpu")
    one_line("projector file not found", load_llava, llm=tiny["llm"], vision=tiny["vision"],
             projector=tmp_path / "none.bin", device="cpu")


def test_voco_reads_llava_images(tiny, reference):
    """VoCo wraps the LLaVA language model unchanged: a prompt holding the image's embeddings
    uncompressed gives LlavaForConditionalGeneration's logits, and the image compresses."""
    from models.voco import VoCo
    parts = load_form(tiny, "llava-hf")
    newline = parts.tokenizer.convert_tokens_to_ids("<0x0A>")
    voco = VoCo(parts.llm, 2, lora_rank=2, bos_id=1, suffix_ids=[newline])
    before, after = [1, 5, 9], [newline, 30, 31, 44]
    pixels = parts.preprocess(picture(50, 64))
    ids = torch.tensor([before + [TEXT_VOCAB] * N_PATCHES + after])
    with torch.no_grad():
        want = reference(input_ids=ids, pixel_values=pixels).logits[0, -1]
        image = parts.embed_images(pixels)[0]
        got = voco.prefill([[before, image, after]])[0][0]
        block = voco.compress([image], 2)[0]
        read = voco.prefill([[block, after]])[0][0]
    assert (want - got).abs().max() < TOL
    assert block.keys.shape == (2, 2, 2, 16) and torch.isfinite(read).all()
