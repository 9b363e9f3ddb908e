"""LLaVA conversation data as token ids with answer labels, in LLaVA-1.5's chat format.

The data file is LLaVA's ``llava_v1_5_mix665k.json`` layout: a JSON list of entries
``{"id", "image" (optional), "conversations": [{"from": "human" | "gpt", "value"}, ...]}``,
several rounds per entry, entries without an image among them (text-only chat). An entry
with an image carries one ``<image>`` placeholder in its conversation.

The text is LLaVA's ``vicuna_v1`` template (``SYSTEM``, roles ``USER``/``ASSISTANT``,
separators " " after a user turn and ``</s>`` after an answer)::

    <system> USER: <image>\\n<question> ASSISTANT: <answer></s>USER: <question> ASSISTANT: ...

built as LLaVA's training code builds it: a leading message not from ``human`` is dropped,
the placeholder is moved to the front of its message (``<image>\\n`` + the rest, stripped),
the text is cut at the placeholder and each piece tokenised on its own (the tokenizer's BOS
kept once, at the start), and the labels are the answers' tokens and the ``</s>`` after
each; everything else is ``IGNORE_INDEX``. Where an answer starts is found from the text
(the tokens of the text up to the ``ASSISTANT:`` before it), not from LLaVA's length
arithmetic, so the ids and labels are LLaVA's wherever its arithmetic agrees with the text
and stay right where it does not (there LLaVA drops the sample's labels with a
"tokenization mismatch" warning). ``</s>`` is the tokenizer's EOS token (the same string
for LLaMA and Vicuna).

Layouts (where the image and the VoCo tokens go):

- ``system`` (ours, the default): the image where LLaVA puts it, right after the system
  prompt and the first ``USER: ``; the VoCo slot right after the image; then the rest.
  With no VoCo tokens this is exactly LLaVA-1.5's sequence, and what an image is
  compressed after is the same for every sample (BOS, system prompt, ``USER: ``).
- ``authors`` (VoCo-LLaMA's ``preprocess_v1``): BOS, the image, "\\n", the VoCo slot,
  "\\n", then the conversation with the ``<image>`` placeholder and every "\\n" removed,
  under the authors' system prompt (``AUTHORS_SYSTEM``: "... assistant of the image.
  ..."). Their ``<voco>`` is a vocabulary token, so the text after it is tokenised as text
  after a special token (here: after the EOS token, then dropped).

A sample is returned as segments (``LlavaSample``): the ids before the image slot, the ids
between the image and the VoCo slot, and the ids after, with labels. Truncation is
LLaVA's: the first ``max_length`` positions of the sequence with the image's embeddings
(``image_tokens`` of them) and the VoCo slot spliced in are kept.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import V2LError

IGNORE_INDEX = -100                # label of a position that is not an answer token
IMAGE_INDEX = -200                 # LLaVA's placeholder id for an image position (flat())
VOCO_INDEX = -201                  # placeholder id for a VoCo position (flat())
IMAGE_TOKEN = "<image>"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
AUTHORS_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant of the "
                  "image. The assistant gives helpful, detailed, and polite answers to the "
                  "user's questions.")
ROLES = ("USER", "ASSISTANT")
SPEAKERS = ("human", "gpt")
SEP = " "                          # after a user turn; after an answer: the EOS token
LAYOUTS = ("system", "authors")
MAX_LENGTH = 2048                  # LLaVA-1.5's model_max_length
IMAGE_TOKENS = 576                 # CLIP ViT-L/14-336: 24 x 24 patches, CLS dropped


@dataclass
class LlavaSample:
    """One conversation as segments: ``before`` + [image] + ``between`` + [VoCo] + ``after``.

    ``image`` is the image file (relative to the image folder) or None for a text-only
    entry (then there is no slot: the ids are ``before`` + ``between`` + ``after``).
    ``*_labels`` are aligned with their ids: the id at an answer token, ``IGNORE_INDEX``
    elsewhere; ``between`` is never labelled."""
    id: str
    image: str | None
    before: list[int]
    before_labels: list[int]
    between: list[int] = field(default_factory=list)
    after: list[int] = field(default_factory=list)
    after_labels: list[int] = field(default_factory=list)
    truncated: bool = False

    @property
    def image_index(self) -> int:
        """Position of the first image embedding in the spliced sequence."""
        return len(self.before)

    def voco_index(self, image_tokens: int) -> int:
        """Position of the first VoCo entry when the image takes ``image_tokens`` positions."""
        return len(self.before) + (image_tokens if self.image is not None else 0) + len(self.between)

    def length(self, image_tokens: int, voco_tokens: int = 0) -> int:
        slots = image_tokens + voco_tokens if self.image is not None else 0
        return len(self.before) + len(self.between) + len(self.after) + slots

    @property
    def n_answer_tokens(self) -> int:
        return sum(x != IGNORE_INDEX for x in self.before_labels + self.after_labels)

    def flat(self, image_tokens: int, voco_tokens: int = 0) -> tuple[list[int], list[int]]:
        """(ids, labels) of the whole sequence, ``IMAGE_INDEX`` / ``VOCO_INDEX`` at the slots
        (labels ``IGNORE_INDEX`` there)."""
        if self.image is None:
            return (self.before + self.between + self.after,
                    self.before_labels + [IGNORE_INDEX] * len(self.between) + self.after_labels)
        ids = (self.before + [IMAGE_INDEX] * image_tokens + self.between + [VOCO_INDEX] * voco_tokens
               + self.after)
        labels = (self.before_labels + [IGNORE_INDEX] * (image_tokens + len(self.between) + voco_tokens)
                  + self.after_labels)
        return ids, labels

    def truncate(self, max_length: int, image_tokens: int, voco_tokens: int = 0) -> "LlavaSample":
        """The first ``max_length`` positions (LLaVA's truncation, the image's embeddings
        counted); the slots must fit whole."""
        if self.length(image_tokens, voco_tokens) <= max_length:
            return self
        head = self.length(image_tokens, voco_tokens) - len(self.after)
        if head > max_length:
            raise V2LError(f"entry {self.id}: {len(self.before)} text tokens, the image ({image_tokens} "
                           f"positions) and {voco_tokens} VoCo tokens do not fit in max_length "
                           f"{max_length}; raise --max_length")
        keep = max_length - head
        return LlavaSample(self.id, self.image, self.before, self.before_labels, self.between,
                           self.after[:keep], self.after_labels[:keep], truncated=True)


# ----------------------------------------------------------------------------- the template

def conversation_text(turns: list[str | None], system: str, sep2: str) -> tuple[str, list[tuple[int, int]]]:
    """vicuna_v1's prompt of alternating user / assistant turns (None or "": the role alone,
    ``"ROLE:"``, as LLaVA writes an open turn). Returns the text and, per non-empty answer,
    the character span of the answer and the ``sep2`` after it."""
    text, spans = system + SEP, []
    for i, msg in enumerate(turns):
        role = ROLES[i % 2]
        if not msg:
            text += role + ":"
            continue
        text += role + ": "
        start = len(text)
        text += msg + (SEP if i % 2 == 0 else sep2)
        if i % 2 == 1:
            spans.append((start, len(text)))
    return text, spans


def move_image_first(value: str) -> str:
    """LLaVA's ``preprocess_multimodal`` for a message holding the placeholder."""
    if IMAGE_TOKEN not in value:
        return value
    return (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ConversationEncoder:
    """Token ids and labels of conversations and questions for one tokenizer and layout."""

    def __init__(self, tokenizer, layout: str = "system"):
        if layout not in LAYOUTS:
            raise V2LError(f"--layout {layout}: must be one of {', '.join(LAYOUTS)}")
        if tokenizer.eos_token is None:
            raise V2LError("the LLM's tokenizer has no EOS token: vicuna_v1 ends every answer with "
                           "it; use the LLM's own tokenizer directory")
        self.tokenizer, self.layout = tokenizer, layout
        self.sep2 = tokenizer.eos_token
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.system = AUTHORS_SYSTEM if layout == "authors" else SYSTEM
        special = tokenizer(self.sep2, add_special_tokens=False).input_ids
        if special != [tokenizer.eos_token_id]:
            raise V2LError(f"the tokenizer splits its EOS token {self.sep2!r} into {special}: "
                           "use a tokenizer whose EOS is a special token")
        self._special = special[0]

    # -- tokenisation of one text piece
    def _fresh(self, text: str) -> list[int]:
        """A piece tokenised on its own (LLaVA's ``tokenizer_image_token`` per chunk)."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) if text else []

    def _after_special(self, text: str) -> list[int]:
        """A piece as the tokenizer reads it right after a special token."""
        if not text:
            return []
        ids = list(self.tokenizer(self.sep2 + text, add_special_tokens=False).input_ids)
        if ids[:1] != [self._special]:
            raise V2LError(f"the tokenizer merges its EOS token {self.sep2!r} with the text after it; "
                           "the authors' layout needs it kept apart (use --layout system)")
        return ids[1:]

    def _labelled(self, text: str, spans: list[tuple[int, int]], encode) -> tuple[list[int], list[int]]:
        """Ids of ``text`` and labels: the tokens of each span (answer + sep2). A span starts
        at the token after those of the text up to the span's separating space."""
        ids = encode(text)
        labels = [IGNORE_INDEX] * len(ids)
        for s, e in spans:
            start = _common_prefix(encode(text[:max(s - 1, 0)]), ids)
            end = _common_prefix(encode(text[:e]), ids)
            labels[start:end] = ids[start:end]
        return ids, labels

    @staticmethod
    def _split(text: str, spans: list[tuple[int, int]], at: int) -> tuple[list, list]:
        before = [(s, e) for s, e in spans if e <= at]
        after = [(s - at, e - at) for s, e in spans if s >= at]
        if len(before) + len(after) != len(spans):
            raise V2LError("an answer holds the <image> placeholder")   # checked at load
        return before, after

    # -- a conversation
    def encode(self, sample_id: str, image: str | None, turns: list[str | None],
               training: bool = True) -> LlavaSample:
        """``turns``: the messages, alternating user / assistant, starting with the user.
        ``training``: the placeholder is moved to the front of its message first (LLaVA's
        training data path; its evaluation writes ``<image>\\n`` + the question as is)."""
        if image is None:   # text-only chat: no placeholder, no slots, nothing removed
            text, spans = conversation_text(turns, self.system, self.sep2)
            ids, labels = self._labelled(text, spans, self._fresh)
            return LlavaSample(str(sample_id), None, list(self.bos), [IGNORE_INDEX] * len(self.bos),
                               [], ids, labels)
        if training:
            turns = [move_image_first(t) if t else t for t in turns]
        if self.layout == "authors":
            turns = [t.replace(IMAGE_TOKEN, "").replace("\n", "") if t else t for t in turns]
            text, spans = conversation_text(turns, self.system, self.sep2)
            ids, labels = self._labelled("\n" + text, [(s + 1, e + 1) for s, e in spans],
                                         self._after_special)
            return LlavaSample(str(sample_id), image, list(self.bos), [IGNORE_INDEX] * len(self.bos),
                               self._fresh("\n"), ids, labels)
        text, spans = conversation_text(turns, self.system, self.sep2)
        at = text.index(IMAGE_TOKEN)
        head, tail = text[:at], text[at + len(IMAGE_TOKEN):]
        spans_head, spans_tail = self._split(text, spans, at)
        ids0, labels0 = self._labelled(head, spans_head, self._fresh)
        ids1, labels1 = self._labelled(tail, [(s - len(IMAGE_TOKEN), e - len(IMAGE_TOKEN))
                                              for s, e in spans_tail], self._fresh)
        return LlavaSample(str(sample_id), image, self.bos + ids0, [IGNORE_INDEX] * len(self.bos) + labels0,
                           [], ids1, labels1)

    def question(self, text: str, image: str | None = "image", question_id: str = "") -> LlavaSample:
        """The prompt LLaVA's evaluation builds for one question (``<image>\\n`` + ``text`` as the
        user turn, then ``ASSISTANT:`` to be continued); no labels."""
        turns = [(IMAGE_TOKEN + "\n" + text) if image is not None else text, None]
        return self.encode(question_id, image, turns, training=False)


# ----------------------------------------------------------------------------- the data file

def _turns(entry, path, index: int) -> tuple[str, str | None, list[str]]:
    """(id, image, messages) of one entry, checked."""
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise V2LError(f"{where}: not LLaVA conversation data (each entry needs a 'conversations' "
                       "list of {'from', 'value'})")
    sample_id = str(entry.get("id", index))
    where = f"{path}: entry {sample_id}"
    conv = entry["conversations"]
    for m in conv:
        if not isinstance(m, dict) or m.get("from") not in SPEAKERS or not isinstance(m.get("value"), str):
            raise V2LError(f"{where}: a message is not {{'from': 'human' | 'gpt', 'value': str}}: "
                           f"{str(m)[:80]}")
    if conv and conv[0]["from"] != "human":   # LLaVA drops a leading message not from the user
        conv = conv[1:]
    for j, m in enumerate(conv):
        if m["from"] != SPEAKERS[j % 2]:
            raise V2LError(f"{where}: message {j} is from '{m['from']}' where '{SPEAKERS[j % 2]}' "
                           "was expected; the turns must alternate human, gpt")
    if not conv:
        raise V2LError(f"{where}: the conversation has no user message")
    image = entry.get("image")
    if image is not None and not isinstance(image, str):
        raise V2LError(f"{where}: 'image' must be one file name (LLaVA-1.5 data has one image per "
                       f"entry), got {str(image)[:80]}")
    n = sum(m["value"].count(IMAGE_TOKEN) for m in conv)
    if image is not None and n != 1:
        raise V2LError(f"{where}: has an image but {n} {IMAGE_TOKEN} placeholders in its conversation; "
                       f"put exactly one ('{IMAGE_TOKEN}\\n' at the start of the first human message)")
    if image is None and n:
        raise V2LError(f"{where}: has {IMAGE_TOKEN} in its conversation but no 'image'; add the image "
                       "file or remove the placeholder")
    if image is not None and any(IMAGE_TOKEN in m["value"] for m in conv[1::2]):
        raise V2LError(f"{where}: the {IMAGE_TOKEN} placeholder is in an answer; move it to a human message")
    return sample_id, image, [m["value"] for m in conv]


class LlavaConversations:
    """LLaVA conversation data: entries checked on load, tokenised when read
    (``dataset[i]`` -> ``LlavaSample``, truncated to ``max_length`` with ``image_tokens``
    image positions and ``voco_tokens`` VoCo positions counted).

    With ``image_folder``, an entry whose image file is not there is skipped and counted
    (``missing``: their ids); without it, images are not looked for."""

    def __init__(self, path, tokenizer, image_folder=None, layout: str = "system",
                 max_length: int = MAX_LENGTH, image_tokens: int = IMAGE_TOKENS, voco_tokens: int = 0):
        path = Path(path)
        if not path.is_file():
            raise V2LError(f"{path}: no such file; give LLaVA's conversation JSON "
                           "(e.g. llava_v1_5_mix665k.json)")
        try:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise V2LError(f"{path}: not valid JSON ({e}); give LLaVA's conversation JSON") from e
        if not isinstance(entries, list):
            raise V2LError(f"{path}: expected a JSON list of conversation entries (LLaVA's layout)")
        self.encoder = ConversationEncoder(tokenizer, layout)
        self.layout, self.max_length = layout, int(max_length)
        self.image_tokens, self.voco_tokens = int(image_tokens), int(voco_tokens)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        if self.image_folder is not None and not self.image_folder.is_dir():
            raise V2LError(f"{self.image_folder}: no such folder; give the folder the data's image "
                           "paths are relative to")
        self.items: list[tuple[str, str | None, list[str]]] = []
        self.missing: list[str] = []
        for i, entry in enumerate(entries):
            sample_id, image, turns = _turns(entry, path, i)
            if image is not None and self.image_folder is not None \
                    and not (self.image_folder / image).is_file():
                self.missing.append(sample_id)
                continue
            self.items.append((sample_id, image, turns))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> LlavaSample:
        sample = self.encoder.encode(*self.items[i])
        return sample.truncate(self.max_length, self.image_tokens, self.voco_tokens)

    def image_path(self, sample: LlavaSample) -> Path | None:
        if sample.image is None:
            return None
        return (self.image_folder / sample.image) if self.image_folder is not None else Path(sample.image)

    def modality_lengths(self) -> list[int]:
        """Each entry's words over its messages, negative for a text-only entry: what LLaVA's
        ``group_by_modality_length`` orders by."""
        return [(1 if image is not None else -1) * sum(len(t.split()) for t in turns)
                for _, image, turns in self.items]

    def summary(self) -> dict:
        with_image = sum(1 for _, image, _ in self.items if image is not None)
        return {"entries": len(self.items), "with_image": with_image,
                "text_only": len(self.items) - with_image, "missing_image": len(self.missing)}
