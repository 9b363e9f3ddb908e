"""LLaVA conversation data: vicuna_v1 text, LLaVA's token ids and answer labels, the authors'
VoCo layout, bad input.

The references below are written from LLaVA's training code's rules (its
``tokenizer_image_token`` and ``preprocess_v1`` label arithmetic) and VoCo-LLaMA's prompt
(``"<image>\\n<voco><voco>\\n"`` + the conversation without placeholder and line breaks,
``<voco>`` an added special token), independently of data/llava.py's way (labels from the
text's prefixes)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data.llava import (AUTHORS_SYSTEM, IGNORE_INDEX, IMAGE_INDEX, SYSTEM, VOCO_INDEX,
                        ConversationEncoder, LlavaConversations, conversation_text)
from utils.errors import V2LError

FIXTURE = Path(__file__).parent / "fixtures" / "llava" / "conversations.json"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A LLaMA-style sentencepiece tokenizer (EOS "</s>", BOS "<s>", not added by itself)."""
    from tiny_llm import make_sentencepiece_model
    from transformers import AutoTokenizer

    from models.meta_llama import sentencepiece_tokenizer
    root = tmp_path_factory.mktemp("tok")
    sentencepiece_tokenizer(make_sentencepiece_model(root / "spm", 400)).save_pretrained(root / "tok")
    return AutoTokenizer.from_pretrained(root / "tok"), root / "tok"


@pytest.fixture(scope="module")
def bpe_tok():
    """A byte-level BPE tokenizer (GPT-2 style: no BOS, EOS "<|endoftext|>")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from tiny_llm import WORDS
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8)) for i in range(200)]
    t.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>")


# ----------------------------------------------------------------------------- references

def with_bos(tokenizer):
    """``tokenizer(text).input_ids`` of a LLaMA tokenizer that adds BOS (as Vicuna's does)."""
    return lambda text: [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids


def tokenizer_image_token(prompt: str, encode) -> list[int]:
    chunks = [encode(c) for c in prompt.split("<image>")]
    out = [chunks[0][0]]                      # BOS once
    for i, c in enumerate(chunks):
        if i:
            out.append(IMAGE_INDEX)
        out += c[1:]
    return out


def llava_labels(prompt: str, encode, legacy: bool) -> list[int]:
    """preprocess_v1's label arithmetic, from its rules."""
    ids = tokenizer_image_token(prompt, encode)
    target = list(ids)
    cur = 1
    target[0] = IGNORE_INDEX
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        round_len = len(tokenizer_image_token(rou, encode))
        instruction_len = len(tokenizer_image_token(parts[0] + " ASSISTANT: ", encode)) - 2
        if i != 0 and not legacy:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        target[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "the reference arithmetic itself reports a tokenization mismatch"
    return target


def answers_of(labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for x in labels + [IGNORE_INDEX]:
        if x == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(x)
    return runs


# ----------------------------------------------------------------------------- the template

def test_vicuna_v1_text():
    text, spans = conversation_text(["<image>\nWhat is it?", "A cat.", "Colour?", "Black."], SYSTEM, "</s>")
    assert text == (SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? "
                    "ASSISTANT: Black.</s>")
    assert [text[s:e] for s, e in spans] == ["A cat.</s>", "Black.</s>"]
    open_text, spans = conversation_text(["Is it red?", None], SYSTEM, "</s>")
    assert open_text == SYSTEM + " USER: Is it red? ASSISTANT:" and spans == []


def test_ids_and_labels_equal_llava_preprocess(tok):
    tokenizer, _ = tok
    assert tokenizer.legacy is False
    encode = with_bos(tokenizer)
    entries = json.loads(FIXTURE.read_text())
    enc = ConversationEncoder(tokenizer, "system")
    for entry in entries[:4]:
        conv = entry["conversations"]
        conv = conv[1:] if conv[0]["from"] != "human" else conv
        turns = [m["value"] for m in conv]
        has_image = "image" in entry
        if has_image:    # LLaVA's preprocess_multimodal, from its rule
            turns = [("<image>\n" + t.replace("<image>", "").strip()).strip() if "<image>" in t else t
                     for t in turns]
        prompt = SYSTEM + " " + "".join(
            f"USER: {t} " if i % 2 == 0 else f"ASSISTANT: {t}</s>" for i, t in enumerate(turns))
        sample = enc.encode(entry["id"], entry.get("image"), [m["value"] for m in conv])
        ids, labels = sample.flat(1, 0)
        if has_image:
            assert ids == tokenizer_image_token(prompt, encode)
        else:
            assert ids == encode(prompt)
        assert labels == llava_labels(prompt, encode, legacy=False), entry["id"]
        # and independently: the labelled runs are each answer and the EOS after it
        want = [tokenizer(t, add_special_tokens=False).input_ids for t in turns[1::2]]
        runs = answers_of(labels)
        assert [tokenizer.decode(r) for r in runs] == [t + "</s>" for t in turns[1::2]]
        assert len(runs) == len(want) and all(r[-1] == tokenizer.eos_token_id for r in runs)
    # the image sits right after the system prompt and "USER: ", as LLaVA's
    s = enc.encode("a", "x.jpg", ["<image>\nWhat is it?", "A cat."])
    assert s.before == encode(SYSTEM + " USER: ") and s.image_index == len(s.before)


def test_question_prompt_is_llavas_eval_prompt(tok):
    tokenizer, _ = tok
    encode = with_bos(tokenizer)
    text = "Is the sky dark?\nAnswer the question using a single word or phrase."
    q = ConversationEncoder(tokenizer, "system").question(text)
    ids, labels = q.flat(1, 0)
    assert ids == tokenizer_image_token(SYSTEM + " USER: <image>\n" + text + " ASSISTANT:", encode)
    assert set(labels) == {IGNORE_INDEX}


def test_authors_layout_equals_their_prompt(tok):
    """Their prompt tokenised with <voco> as an added special token, as their training script
    adds it; ours splices VoCo positions instead, the text ids must be the same."""
    from transformers import AutoTokenizer
    tokenizer, path = tok
    theirs = AutoTokenizer.from_pretrained(path)
    theirs.add_special_tokens({"additional_special_tokens": ["<voco>"]})
    voco_id = theirs.convert_tokens_to_ids("<voco>")
    encode = with_bos(theirs)
    enc = ConversationEncoder(tokenizer, "authors")
    turns = ["<image>\nWhat colour is the bus?", "White\nand red.", "And the sky?", "Blue."]
    conv = (AUTHORS_SYSTEM + " USER: What colour is the bus? ASSISTANT: Whiteand red.</s>"
            "USER: And the sky? ASSISTANT: Blue.</s>")
    prompt = "<image>\n<voco><voco>\n" + conv
    sample = enc.encode("b", "bus.jpg", turns)
    ids, labels = sample.flat(1, 2)
    assert [voco_id if x == VOCO_INDEX else x for x in ids] == tokenizer_image_token(prompt, encode)
    assert [tokenizer.decode(r) for r in answers_of(labels)] == ["Whiteand red.</s>", "Blue.</s>"]
    assert labels == [IGNORE_INDEX if x == voco_id else x for x in llava_labels(prompt, encode, legacy=False)]
    assert sample.before == [tokenizer.bos_token_id] and sample.voco_index(1) == 1 + 1 + len(sample.between)
    q = enc.question("Is it red?\nAnswer with the option's letter from the given choices directly.")
    qids, _ = q.flat(1, 2)
    want = tokenizer_image_token("<image>\n<voco><voco>\n" + AUTHORS_SYSTEM + " USER: Is it red?Answer "
                                 "with the option's letter from the given choices directly. ASSISTANT:",
                                 encode)
    assert [voco_id if x == VOCO_INDEX else x for x in qids] == want


def test_any_tokenizer_labels_are_the_answers(bpe_tok):
    assert bpe_tok.bos_token_id is None
    for layout in ("system", "authors"):
        enc = ConversationEncoder(bpe_tok, layout)
        s = enc.encode("c", "x.jpg", ["<image>\nthe red car", "a small dog", "and the tree", "green"])
        _, labels = s.flat(4, 1)
        # the space before an answer is its first token's (as LLaMA's "▁"): labelled with it
        assert [bpe_tok.decode(r) for r in answers_of(labels)] == [" a small dog<|endoftext|>",
                                                                   " green<|endoftext|>"]
        assert s.n_answer_tokens == sum(len(r) for r in answers_of(labels))


# ----------------------------------------------------------------------------- the data file

def _data(tmp_path, entries=None):
    path = tmp_path / "data.json"
    if entries is None:
        shutil.copy(FIXTURE, path)
    else:
        path.write_text(json.dumps(entries))
    images = tmp_path / "images"
    for e in json.loads(path.read_text()):
        if "image" in e and e["id"] != "missing_one":
            (images / e["image"]).parent.mkdir(parents=True, exist_ok=True)
            (images / e["image"]).write_bytes(b"\x89PNG")
    return path, images


def test_dataset_skips_missing_images_and_reads_all_kinds(tmp_path, tok):
    tokenizer, _ = tok
    path, images = _data(tmp_path)
    data = LlavaConversations(path, tokenizer, images)
    assert data.missing == ["missing_one"]
    assert data.summary() == {"entries": 4, "with_image": 3, "text_only": 1, "missing_image": 1}
    by_id = {data[i].id: data[i] for i in range(len(data))}
    assert by_id["sharegpt_i6IyJda_0"].image is None and by_id["sharegpt_i6IyJda_0"].n_answer_tokens > 0
    lead = by_id["leading_gpt"]                          # LLaVA drops the leading gpt message
    assert "Hello" not in tokenizer.decode(lead.before + lead.after)
    assert data.image_path(by_id["gqa_2354786"]) == images / "gqa/images/2354786.jpg"
    # without an image folder nothing is looked for
    assert len(LlavaConversations(path, tokenizer)) == 5


def test_truncation_is_llavas(tmp_path, tok):
    tokenizer, _ = tok
    path, images = _data(tmp_path)
    full = LlavaConversations(path, tokenizer, images, image_tokens=10, voco_tokens=2)[0]
    n = full.length(10, 2)
    cut = LlavaConversations(path, tokenizer, images, max_length=n - 5, image_tokens=10, voco_tokens=2)[0]
    assert cut.truncated and not full.truncated and cut.length(10, 2) == n - 5
    assert cut.after == full.after[:-5] and cut.after_labels == full.after_labels[:-5]
    with pytest.raises(V2LError, match="000000033471.*max_length"):
        LlavaConversations(path, tokenizer, images, max_length=len(full.before) + 5, image_tokens=10)[0]


@pytest.mark.parametrize("entry, match", [
    ({"id": "e1", "image": "a.jpg", "conversations": [{"from": "human", "value": "What is it?"},
                                                      {"from": "gpt", "value": "A cat."}]},
     "entry e1: has an image but 0 <image> placeholders"),
    ({"id": "e2", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                    {"from": "gpt", "value": "A cat."}]},
     "entry e2: has <image> in its conversation but no 'image'"),
    ({"id": "e3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi"}]},
     "entry e3: message 1 is from 'human'"),
    ({"id": "e4", "conversations": [{"from": "user", "value": "Hi"}]}, "entry e4: a message is not"),
])
def test_bad_entries_name_the_entry(tmp_path, tok, entry, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(V2LError, match=match) as e:
        LlavaConversations(path, tok[0])
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path, tok):
    with pytest.raises(V2LError, match="no such file"):
        LlavaConversations(tmp_path / "none.json", tok[0])
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(V2LError, match="JSON list"):
        LlavaConversations(tmp_path / "d.json", tok[0])
    with pytest.raises(V2LError, match="--layout"):
        ConversationEncoder(tok[0], "middle")
