"""Video question answering through VoCo-compressed frames (VoCo-LLaMA's temporal extension).

A clip is T frames sampled uniformly (``data.video``). Each frame becomes V2L tokens as an
image does in step 5 (its local tokens, optionally, then its global words; with
``position_words`` also a word naming where its shape's local codes lie), and each frame is
compressed **alone** into k VoCo positions (``models.voco.VoCo.compress``, the image
mechanism unchanged). A question's prompt is

    [BOS] VIDEO_TEXT <frame 1 block> <frame 2 block> ... <frame T block> QUESTION_TEXT

with the T blocks in time order at consecutive positions, read by the frozen LLM. A frame's
block depends on its tokens alone, so frames with the same tokens share one block (a static
scene costs one compression) and every question about a clip reuses its frames' blocks:
``FrameBlocks`` compresses each distinct frame once per run.

Conditions (``realize_clip``):

- ``upper``: every frame's full tokens as text, in order (what the blocks compress);
- ``none``: no frame at all (the question alone);
- ``lower`` / ``voco``: the blocks of the untrained / trained VoCo weights, in order;
- ``last``: the last frame's block only (trained weights): what one frame tells;
- ``shuffled``: the trained blocks in a seeded order other than time order: what the
  frames tell without their order.

Answers are greedy continuations (optionally limited to a set of candidate answers), cut at
the first line break and compared with the ground truth after VQA-style normalisation
(``engine.vqa.normalize``: lower case, punctuation, articles, number words): exact-match
accuracy. The paper's video numbers are judged by GPT-3.5 instead, which cannot run
offline; the two are not comparable.
"""
from __future__ import annotations

import random
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from engine.voco import Slot, realize
from models.llm import encode_segment
from models.voco import VoCo
from utils.errors import V2LError
from utils.stages import VOCO_VIDEO

CONDITIONS = ("upper", "none", "lower", "voco", "last", "shuffled")
VIDEO_TEXT = "Video:"                                # before the frames
QUESTION_TEXT = "\nQuestion: {question}\nAnswer:"    # after them
POSITION_WORDS = ("left", "right", "top", "bottom", "centre")


def frame_key(video: str, t: int) -> str:
    return f"{video}#{t}"


# ----------------------------------------------------------------------------- frame tokens

def position_word(image: torch.Tensor, margin: float = 1 / 6, share: float = 0.06) -> str:
    """Where a frame's shape lies in ``image`` ([C, H, W] or [H, W]; the demo passes the frame
    as the tokenizer decodes it from its tokens): the pixels farthest from the border's median
    colour (the ``share`` most distant ones, among those that differ from it at all) are the
    shape's; their centroid names a side ("left", "right", "top", "bottom") when it is more
    than ``margin`` of the frame from the centre along its larger offset, else "centre"."""
    x = image.float()
    x = x[None] if x.dim() == 2 else x
    _, h, w = x.shape
    border = torch.cat([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], 1)
    distance = (x - border.median(1).values[:, None, None]).norm(dim=0)
    if distance.max() <= 1e-6:
        return "centre"
    cut = max(float(torch.quantile(distance.flatten(), 1 - share)), 1e-6)
    ys, xs = torch.nonzero(distance >= cut, as_tuple=True)
    dx = (xs.float().mean().item() + 0.5) / w - 0.5
    dy = (ys.float().mean().item() + 0.5) / h - 0.5
    if max(abs(dx), abs(dy)) <= margin:
        return "centre"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "bottom" if dy > 0 else "top"


@torch.no_grad()
def frame_word_ids(tokenizer, text_tokenizer, frames: list, info: dict,
                   position_words: bool = False, batch_size: int = 64) -> list[list[int]]:
    """Each frame's (PIL image's) tokens exactly as ``engine.voco.image_word_ids`` makes an
    image's from a file: its local tokens when ``info["local_tokens"]``, then its global words
    (``global_k``, ``word_separator``, ``global_dedup``, ``sort_words`` of the step-5 artifact's
    voco.json) as LLM ids; with ``position_words``, the ``position_word`` of the frame as the
    tokenizer decodes it from its own tokens (local and global) after them: where the shape is,
    read from what the tokens carry (their codes alone vary too much over a plain background
    to be read by identity: docs/video.md)."""
    from engine.fewshot import fetch_count, image_words
    from models.quantizers import topk_nearest
    clip = tokenizer.clip
    weight = tokenizer.tok_embeddings_global.weight
    k, sep = info["global_k"], info.get("word_separator", "")
    dedup, sort = info.get("global_dedup", False), info.get("sort_words", False)
    n = fetch_count(k, dedup, weight.shape[0])
    local = info.get("local_tokens", False) or position_words
    view, views = clip.image_view(), clip.image_views(tokenizer.config.resolution)
    device = tokenizer.llm_ids.device
    out = []
    for s in range(0, len(frames), batch_size):
        batch = frames[s:s + batch_size]
        emb = clip.encode_images(torch.stack([view(f) for f in batch])).to(weight.device)
        strings = tokenizer.global_strings(topk_nearest(emb, weight, n, tokenizer.config.global_metric))
        grids = (tokenizer.local_tokens(torch.stack([views(f)[0] for f in batch]).to(device)).cpu()
                 if local else [None] * len(batch))
        where = [None] * len(batch)
        if position_words:
            idx = topk_nearest(emb, weight, tokenizer.config.global_topk, tokenizer.config.global_metric)
            decoded = tokenizer.decode(grids.to(device), global_idx=idx).cpu()
            where = [position_word(img) for img in decoded]
        for st, grid, pos in zip(strings, grids, where):
            text = image_words(st, k, sep, dedup, sort=sort)
            if position_words:
                text += (sep or " ") + pos
            ids = grid.flatten().tolist() if info.get("local_tokens", False) else []
            out.append(ids + encode_segment(text_tokenizer, text))
    return out


# ----------------------------------------------------------------------------- prompts

class VideoPrompter:
    """Question prompts over a clip's frame slots, and candidate answers as token ids."""

    def __init__(self, text_tokenizer, video_text: str = VIDEO_TEXT,
                 question_text: str = QUESTION_TEXT):
        if "{question}" not in question_text:
            raise V2LError(f"--question_text {question_text!r} must hold {{question}}")
        self.text_tokenizer, self.video_text, self.question_text = text_tokenizer, video_text, question_text

    def encode(self, text: str) -> list[int]:
        return encode_segment(self.text_tokenizer, text)

    def segments(self, question: str, keys: list[str], answer: str | None = None) -> list:
        """[BOS + VIDEO_TEXT, Slot(frame 1), ..., Slot(frame T), QUESTION_TEXT (+ answer, EOS)]."""
        bos = self.text_tokenizer.bos_token_id
        head = ([bos] if bos is not None else []) + self.encode(self.video_text)
        tail = self.encode(self.question_text.format(question=question))
        if answer is not None:
            tail += self.answer_ids(answer)
        return [head] + [Slot(k) for k in keys] + [tail]

    def answer_ids(self, answer: str) -> list[int]:
        """The answer as the LLM writes it after the prompt (a leading space), then EOS."""
        eos = self.text_tokenizer.eos_token_id
        ids = self.encode(" " + answer.strip())
        if not ids:
            raise V2LError(f"answer {answer!r} tokenises to nothing")
        return ids + ([eos] if eos is not None else [])


def shuffled_order(n: int, seed) -> list[int]:
    """A seeded permutation of range(n) other than the identity (n >= 2)."""
    order = list(range(n))
    if n < 2:
        return order
    rng = random.Random(str(seed))
    while order == sorted(order):
        rng.shuffle(order)
    return order


def realize_clip(segments: list, condition: str, words=None, blocks=None, seed=0) -> list:
    """A clip's prompt segments for one condition (module docstring)."""
    if condition not in CONDITIONS:
        raise ValueError(condition)
    slots = [i for i, s in enumerate(segments) if isinstance(s, Slot)]
    segs = list(segments)
    if condition == "last":
        segs = [s for i, s in enumerate(segs) if not isinstance(s, Slot) or i == slots[-1]]
    elif condition == "shuffled":
        order = shuffled_order(len(slots), seed)
        for i, j in zip(slots, order):
            segs[i] = segments[slots[j]]
    kind = {"upper": "upper", "none": "none"}.get(condition, "voco")
    return realize(segs, kind, words=words, blocks=blocks)


# ----------------------------------------------------------------------------- blocks

class FrameBlocks(Mapping):
    """Frame key -> its VoCo block, each distinct frame (by its tokens) compressed once.

    ``words``: frame key -> token ids. ``compress(voco, keys, k, chunk)`` compresses the
    frames of ``keys`` not made yet, ``chunk`` distinct frames per batch; ``compressed`` counts
    the compressions, ``frames`` the frames served."""

    def __init__(self, words: dict[str, list[int]], store: dict | None = None):
        self.words = words
        self._by_tokens: dict[tuple, object] = {}
        self.store = store if store is not None else {}
        self.compressed = 0

    def compress(self, voco: VoCo, keys, k: int, chunk: int = 32) -> None:
        todo, seen = [], set()
        for key in keys:
            tokens = tuple(self.words[key])
            if tokens not in self._by_tokens and tokens not in seen:
                seen.add(tokens)
                todo.append(tokens)
        for s in range(0, len(todo), chunk):
            part = todo[s:s + chunk]
            with torch.no_grad():
                made = voco.compress([torch.tensor(t) for t in part], k)
            for tokens, block in zip(part, made):
                self._by_tokens[tokens] = block.detach()
            self.compressed += len(part)

    def __getitem__(self, key: str):
        return self._by_tokens[tuple(self.words[key])]

    def __contains__(self, key) -> bool:
        return key in self.words and tuple(self.words[key]) in self._by_tokens

    def __iter__(self):
        return (k for k in self.words if k in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


# ----------------------------------------------------------------------------- answers

def normalize_answer(text: str) -> str:
    """VQA-style normalisation of an answer (``engine.vqa.normalize`` after cutting at the
    first line break and stripping)."""
    from engine.vqa import normalize
    return normalize(text.split("\n")[0].strip()).strip()


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def candidate_sets(questions, mode: str) -> dict[str, list[str]] | None:
    """Candidate answers per category (``mode`` "category"), one set for all ("all": the key
    ""), or None ("open": free generation)."""
    if mode == "open":
        return None
    if mode not in ("all", "category"):
        raise V2LError(f"--answer_set {mode!r}: use open, all or category")
    out: dict[str, set] = {}
    for q in questions:
        out.setdefault(q.category if mode == "category" else "", set()).add(q.answer.strip())
    return {c: sorted(a) for c, a in out.items()}


# ----------------------------------------------------------------------------- training

def answer_loss(voco: VoCo, rows: list[list], words: dict[str, list[int]], k: int,
                n_answer: list[int], objective: str = "ce") -> tuple[torch.Tensor, int]:
    """(summed loss over the answer tokens, their number) for clip prompts that end with their
    answer (the last ``n_answer[i]`` tokens of row i, EOS included). The frames are compressed
    here, with gradients (each distinct frame once per batch). ``objective`` "ce": the answer
    tokens' cross-entropy (the authors' loss); "kl": KL(teacher || student) at the same
    positions, the teacher being the frozen LLM reading every frame's full tokens (Eq. 1)."""
    keys = sorted({s.path for row in rows for s in row if isinstance(s, Slot)})
    distinct = sorted({tuple(words[key]) for key in keys})
    made = dict(zip(distinct, voco.compress([torch.tensor(t) for t in distinct], k)))
    blocks = {key: made[tuple(words[key])] for key in keys}
    s_hidden, _, _, _, s_index = voco.prefill([realize_clip(r, "voco", blocks=blocks) for r in rows],
                                              hidden=True)
    picked, targets = [], []
    for i, row in enumerate(rows):
        text = [t for seg in row if not isinstance(seg, Slot) for t in seg]
        n_text, n = len(text), n_answer[i]
        at = torch.arange(n_text - n - 1, n_text - 1)          # positions predicting the answer
        h = s_hidden[i][s_index[i] >= 0]
        picked.append(h[at.to(h.device)])
        targets.append(torch.tensor(text[n_text - n:]))
    s_logits = voco.logits_of(torch.cat(picked))
    count = s_logits.shape[0]
    if objective == "ce":
        return F.cross_entropy(s_logits, torch.cat(targets).to(s_logits.device), reduction="sum"), count
    if objective != "kl":
        raise V2LError(f"--objective {objective!r}: use ce or kl")
    with torch.no_grad():
        t_hidden, _, _, _, t_index = voco.prefill([realize_clip(r, "upper", words=words) for r in rows],
                                                  hidden=True)
        t_rows = []
        for i, row in enumerate(rows):
            h = t_hidden[i][t_index[i] >= 0]
            n_text, n = h.shape[0], n_answer[i]
            t_rows.append(h[n_text - n - 1:n_text - 1])
        t_log = F.log_softmax(voco.logits_of(torch.cat(t_rows)), -1)
    s_log = F.log_softmax(s_logits, -1)
    return (t_log.exp() * (t_log - s_log)).sum(), count


# ----------------------------------------------------------------------------- artifacts

VIDEO_VOCO = VOCO_VIDEO.id    # step 6's artifact (a VoCo artifact continued on video)


def load_video_voco(voco_dir, llm, tokenizer_dir):
    """``engine.voco.load_voco`` for a step-5 artifact (stage "voco") or a step-6 one (stage
    "voco_video", the same files): (VoCo with its untrained start, voco.json, trained state)."""
    from pathlib import Path

    from engine.voco import check_identity
    from utils.artifacts import MANIFEST, load_json, load_tensors, read_manifest, require_input
    from utils.stages import TOKENIZER
    manifest = read_manifest(voco_dir, made_by="step5_train_voco.py or step6_train_video.py")
    if manifest["stage"] not in ("voco", VIDEO_VOCO):
        raise V2LError(f"{voco_dir}: holds a '{manifest['stage']}' artifact, expected VoCo weights "
                       "(step5_train_voco.py or step6_train_video.py)")
    info = load_json(Path(voco_dir) / "voco.json")
    check_identity(info["llm_identity"], llm, str(voco_dir))
    if (Path(tokenizer_dir) / MANIFEST).is_file() and "tokenizer" in manifest.get("inputs", {}):
        require_input(manifest, "tokenizer", read_manifest(tokenizer_dir, TOKENIZER),
                      f"{voco_dir} (VoCo weights)")
    voco = VoCo(llm.model, info["k_max"], info["lora_rank"], info["lora_alpha"],
                info["lora_targets"], bos_id=info["bos_id"], seed=info["seed"],
                context_ids=info.get("context_ids", []), init_ids=info.get("init_ids", []))
    return voco, info, load_tensors(Path(voco_dir) / "voco.safetensors")


def clip_words(tokenizer, text_tokenizer, videos: list[str], t: int, info: dict,
               position_words: bool, stats=None, progress: bool = True) -> dict[str, list[int]]:
    """frame key -> token ids for every frame of ``videos`` (T uniformly sampled frames each)."""
    from tqdm import tqdm

    from data.video import read_frames
    out: dict[str, list[int]] = {}
    piece = max(1, 64 // t)
    for s in tqdm(range(0, len(videos), piece), desc="frames", disable=not progress):
        part = videos[s:s + piece]
        frames = [f for v in part for f in read_frames(v, t, stats)]
        ids = frame_word_ids(tokenizer, text_tokenizer, frames, info, position_words)
        for i, v in enumerate(part):
            for j in range(t):
                out[frame_key(v, j)] = ids[i * t + j]
    return out
