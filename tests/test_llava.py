"""The LLaVA-1.5 model path: both forms of a tiny random LLaVA give transformers'
LlavaForConditionalGeneration's logits, the image steps are LLaVA's, bad inputs are refused
with one line."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from models.llava import expand2square, load_llava, read_projector
from models.llm import load_llm
from models.llava_dirs import is_llava_dir, refuse_llava_as_llm
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
    vision = tiny["open_clip"] if form == "open_clip" else tiny["vision"]
    return load_llava(llm=tiny["llm"], vision=vision, projector=tiny["projector"],
                      dtype="fp32", device="cpu", **kw)


@pytest.mark.parametrize("form", ["llava-hf", "parts", "open_clip"])
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
        assert parts.image_tokens() == N_PATCHES       # what the stages size prompts by
        got = torch.stack([parts.llm(inputs_embeds=parts.embed_prompt([before, im, after])[None]).logits[0]
                           for im in images])
    vocab = got.shape[-1]          # the Vicuna form has no "<image>" row
    assert vocab == (want.shape[-1] if form == "llava-hf" else TEXT_VOCAB)
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
    # an open_clip tower's preprocessing is built from its config: the same pixels
    image = picture(45, 70)
    assert torch.equal(load_form(tiny, "open_clip").preprocess(image), parts.preprocess(image))
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
    one_line("is a LLaVA checkpoint", load_llm, tiny["llava"])     # every stage's --llm
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
    one_line("vision feature layer -9: the open_clip tower has 3 blocks", load_llava, llm=tiny["llm"],
             vision=tiny["open_clip"], projector=tiny["projector"], device="cpu", feature_layer=-9)
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


# ----------------------------------------------------------------------------- the training loss

def loss_case(layout, k_max=2, **voco_kw):
    """A VoCo on a tiny random Llama and three samples in a layout's shape (two with continuous
    images, one text-only), ids drawn at random."""
    from data.llava import IGNORE_INDEX, LlavaSample
    from engine.llava_voco import voco_text
    from models.voco import VoCo
    from tiny_llm import tiny_llama_model
    model = tiny_llama_model(300)
    model.config._attn_implementation = "sdpa"
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(7)

    def rand(n):
        return torch.randint(3, 300, (n,), generator=g).tolist()

    before = [1] + (rand(6) if layout == "system" else [])
    between = rand(1) if layout == "authors" else []
    samples = []
    for i, (n_after, answers) in enumerate(((12, (4, 9)), (9, (3, 7)), (8, (2, 6)))):
        after = rand(n_after)
        labels = [x if answers[0] <= j < answers[1] else IGNORE_INDEX for j, x in enumerate(after)]
        samples.append(LlavaSample(f"s{i}", "im.jpg" if i < 2 else None, list(before),
                                   [IGNORE_INDEX] * len(before), list(between) if i < 2 else [],
                                   after, labels))
    voco = VoCo(model, k_max, **({"lora_rank": 4, "seed": 0} | voco_kw), **voco_text(samples[0], 1))
    images = [torch.randn(5, 64, generator=g), torch.randn(7, 64, generator=g), None]
    return voco, samples, images


@pytest.mark.parametrize("layout", ["system", "authors"])
def test_conversation_loss_is_ce_and_kl_of_one_masked_pass(layout):
    """The loss against logits computed elsewhere: the student by one masked pass over the
    whole uncompressed prompt (tests/voco_reference.py), the teacher by the plain LLM reading
    the image's embeddings."""
    import torch.nn.functional as F

    from data.llava import IGNORE_INDEX
    from engine.llava_voco import conversation_loss
    from voco_reference import Image, single_pass, text_logits
    voco, samples, images = loss_case(layout)
    k = 2
    with torch.no_grad():
        ce, counts = conversation_loss(voco, samples, images, k, "ce", layout)
        kl, _ = conversation_loss(voco, samples, images, k, "kl", layout)
        kl_answers, _ = conversation_loss(voco, samples, images, k, "kl", layout, kl_on="answers")
        both, _ = conversation_loss(voco, samples, images, k, "both", layout, kl_weight=0.5)
        used = samples[:2]
        prompts = [([list(s.before)] if layout == "system" else []) + [Image(im), list(s.after)]
                   for s, im in zip(used, images)]
        student = text_logits(*single_pass(voco, prompts, k))
        emb = voco.llm.get_input_embeddings()
        teacher = []
        for s, im in zip(used, images):
            x = torch.cat([emb(torch.tensor(s.before)), im] +
                          ([emb(torch.tensor(s.between))] if s.between else []) + [emb(torch.tensor(s.after))])
            with voco.frozen():
                teacher.append(voco.llm(inputs_embeds=x[None]).logits[0].float())
    want_ce, n_ce, want_kl, want_kla, n_kl, n_kla = 0.0, 0, 0.0, 0.0, 0, 0
    for s, st, te in zip(used, student, teacher):
        n = len(s.after)
        st, te = st[-n:-1], te[-n:-1]                     # positions predicting after[1:]
        labels = torch.tensor(s.after_labels[1:])
        answer = labels != IGNORE_INDEX
        want_ce += F.cross_entropy(st[answer], labels[answer], reduction="sum").item()
        n_ce += int(answer.sum())
        per = F.kl_div(F.log_softmax(st, -1), F.log_softmax(te, -1), log_target=True,
                       reduction="none").sum(-1)
        want_kl += per.sum().item()
        n_kl += n - 1
        want_kla += per[answer].sum().item()
        n_kla += int(answer.sum())
    assert counts == {"samples": 2, "text_only": 1, "answer_tokens": n_ce, "kl_positions": 0}
    assert abs(ce.item() - want_ce / n_ce) < 1e-4 * max(1.0, want_ce / n_ce)
    assert abs(kl.item() - want_kl / n_kl) < 1e-4 * max(1.0, want_kl / n_kl)
    assert abs(kl_answers.item() - want_kla / n_kla) < 1e-4 * max(1.0, want_kla / n_kla)
    assert abs(both.item() - (ce.item() + 0.5 * kl.item())) < 1e-4 * both.item()
    assert kl.item() > 1e-3 and ce.item() > 1.0


@pytest.mark.parametrize("objective", ["ce", "kl", "both"])
def test_conversation_loss_trains_only_voco_weights(objective):
    """Reader frozen: gradients reach the LoRA weights (active while compressing), the VoCo
    embeddings and the image embeddings when they require grad (a trained projector), never a
    weight of the LLM."""
    from engine.llava_voco import conversation_loss
    voco, samples, images = loss_case("system")
    with torch.no_grad():
        for n, p in voco.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    images = [im.requires_grad_(True) if im is not None else None for im in images]
    loss, _ = conversation_loss(voco, samples, images, 2, objective)
    loss.backward()
    for name, p in voco.llm.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"frozen weight {name} got a gradient"
    assert voco.embeddings.grad.abs().sum() > 0
    assert all(im.grad.abs().sum() > 0 for im in images[:2])


def test_conversation_loss_refusals():
    from engine.llava_voco import conversation_loss
    voco, samples, images = loss_case("system")
    other, _, _ = loss_case("authors")
    with pytest.raises(V2LError, match="entry s0: the text around its image differs"):
        conversation_loss(other, samples, images, 2)
    with pytest.raises(V2LError, match="--objective mse: must be one of ce, kl, both"):
        conversation_loss(voco, samples, images, 2, "mse")
    with pytest.raises(V2LError, match="k=3 .*at most 2"):
        conversation_loss(voco, samples, images, 3)
    loss, counts = conversation_loss(voco, samples[2:], images[2:], 2)
    assert counts["samples"] == 0 and counts["text_only"] == 1 and loss.item() == 0


@pytest.mark.parametrize("layout", ["system", "authors"])
def test_conversation_loss_on_llava_data(tiny, layout):
    """The pieces together: a LLaVA conversation tokenised by data/llava.py in a layout, its
    image through the tiny LLaVA's vision tower and projector, the VoCo built for that layout."""
    from data.llava import ConversationEncoder
    from engine.llava_voco import conversation_loss, voco_text
    from models.voco import VoCo
    parts = load_form(tiny, "llava-hf")
    encoder = ConversationEncoder(parts.tokenizer, layout)
    sample = encoder.encode("a", "x.jpg", ["<image>\nwhat is the red car near?", "the old house.",
                                           "and the dog?", "sleeping on the road."])
    voco = VoCo(parts.llm, 2, lora_rank=2, seed=0, **voco_text(sample, parts.tokenizer.bos_token_id))
    with torch.no_grad():
        image = parts.embed_images(parts.preprocess(picture(40, 60)))[0]
    loss, counts = conversation_loss(voco, [sample], [image], 1, "both", layout)
    loss.backward()
    assert counts["answer_tokens"] == sample.n_answer_tokens > 0
    assert torch.isfinite(loss) and loss.item() > 0
    assert voco.embeddings.grad.abs().sum() > 0


def test_conversation_loss_with_a_trained_reader():
    """reader adapted: text-only samples' answers count in ce and LoRA learns through the reading
    too; a fully trained reader (no LoRA, LLM weights trainable) learns from ce, and kl (whose
    teacher is the frozen LLM) is refused."""
    from engine.llava_voco import conversation_loss
    voco, samples, images = loss_case("system", reader="adapted")
    frozen, _, _ = loss_case("system")
    with torch.no_grad():
        for n, p in voco.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    loss, counts = conversation_loss(voco, samples, images, 2, "both")
    _, frozen_counts = conversation_loss(frozen, samples, images, 2, "both")
    text_answers = samples[2].n_answer_tokens
    assert counts["samples"] == 3 and frozen_counts["samples"] == 2
    assert counts["answer_tokens"] == frozen_counts["answer_tokens"] + text_answers
    assert counts["kl_positions"] == frozen_counts["kl_positions"] > 0
    loss.backward()
    for name, p in voco.llm.named_parameters():
        assert ("lora_" in name) == (p.grad is not None), name
    full, samples, images = loss_case("system", reader="adapted", lora_rank=0)
    for p in full.llm.parameters():
        p.requires_grad_(True)
    with pytest.raises(V2LError, match="--objective kl: the KL's teacher is the frozen LLM"):
        conversation_loss(full, samples, images, 2, "kl")
    loss, _ = conversation_loss(full, samples, images, 2, "ce")
    loss.backward()
    assert all(p.grad is not None for p in full.llm.parameters())
