"""VoCo procedures: few-shot prompts with compressed images, constrained decoding over them,
the distillation objective, the class split and the artifact's compatibility checks.

An episode prompt is built as segments: text (token ids) and image slots. A slot
becomes, per condition:

- ``upper``: the image's words as text (the full few-shot prompt of the V2L method);
- ``none``: nothing (the prompt without images);
- ``voco`` / ``lower``: the image's compressed VoCo block (trained / untrained weights).

The prompt text is the authors' few-shot format (``engine.fewshot``'s induction line,
``###\\nInput: < ... >\\nOutput: name``), each piece tokenised on its own.

The objective (the paper's Eq. 1, which the authors' code replaces by answer
cross-entropy): on a training episode with its answer, the frozen LLM reading the
full image words is the teacher, the same LLM reading only the VoCo blocks the
student; the loss is KL(teacher || student) of the next-token distributions at
every text position after the first image whose next token is text (the support
answers, the separators, the query's answer and its EOS).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from data.classes import WNID, class_name, mini_imagenet_test_wnids
from engine.fewshot import IN_TEXT, OUT_TEXT, NameTrie, induction_line
from engine.greedy import finish_forced, greedy_step
from models.llm import encode_segment
from models.voco import VoCo, VoCoBlock
from utils.errors import V2LError
from utils.stages import TOKENIZER, VOCO

CONDITIONS = ("upper", "lower", "none", "voco")


# ----------------------------------------------------------------------------- classes

def split_classes(folders: list[str], holdout_every: int) -> tuple[list[str], list[str]]:
    """(training classes, evaluation classes). On ImageNet (wnid folders holding the 20
    mini-ImageNet test classes) the evaluation classes are those 20; elsewhere every
    ``holdout_every``-th class in sorted order is held out."""
    folders = sorted(folders)
    mini = mini_imagenet_test_wnids()
    if folders and all(WNID.match(f) for f in folders) and set(mini) <= set(folders):
        held = set(mini)
    else:
        if holdout_every < 2:
            raise V2LError(f"--holdout_every {holdout_every}: need at least 2 (every n-th class "
                           "is held out for evaluation)")
        held = set(folders[::holdout_every])
    return [f for f in folders if f not in held], [f for f in folders if f in held]


# ----------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Slot:
    """Where an image goes in a prompt."""
    path: str


class VoCoPrompter:
    """Builds episode prompts as segments (text ids and image ``Slot``s)."""

    def __init__(self, text_tokenizer, induction: bool = True):
        self.text_tokenizer, self.induction = text_tokenizer, induction
        self.encode = lru_cache(maxsize=None)(self._encode)

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(encode_segment(self.text_tokenizer, text))

    def name_ids(self, name: str) -> list[int]:
        ids = list(self.encode(name))
        if not ids:
            raise V2LError(f"class name '{name}' tokenises to nothing; rename its class folder")
        return ids

    def segments(self, episode, answer: bool = False, names: bool = False):
        """The episode's prompt; with ``answer``, followed by the query's name and EOS. With
        ``names``, also a list of booleans over the prompt's text tokens (all text segments
        joined): True at the class-name tokens after each image (and the answer's EOS)."""
        bos = self.text_tokenizer.bos_token_id
        text: list[int] = [bos] if bos is not None else []
        if self.induction:
            text += self.encode(induction_line(episode.names(spaces=True)))
        flags = [False] * len(text)
        out: list = []

        def add(ids, is_name: bool = False) -> None:
            text.extend(ids)
            flags.extend([is_name] * len(ids))

        for path, folder in list(episode.support) + [episode.query]:
            add(self.encode(IN_TEXT))
            out += [list(text), Slot(path)]
            text.clear()                  # (add() extends this same list)
            add(self.encode(OUT_TEXT))
            if (path, folder) != episode.query:
                add(self.name_ids(class_name(folder)), True)
        if answer:
            add(self.name_ids(episode.target(spaces=True)), True)
            if self.text_tokenizer.eos_token_id is not None:
                add([self.text_tokenizer.eos_token_id], True)
        out.append(text)
        return (out, flags) if names else out

    def constraint(self, episode) -> NameTrie | None:
        if not self.induction:
            return None
        return NameTrie([self.name_ids(n) for n in episode.names(spaces=True)], self.text_tokenizer.eos_token_id)


def image_context(text_tokenizer) -> list[int]:
    """The text every image of a prompt follows (``IN_TEXT``, as ``VoCoPrompter`` encodes it):
    the context an image is compressed after (``VoCo(context_ids=...)``)."""
    return list(encode_segment(text_tokenizer, IN_TEXT))


def image_followup(text_tokenizer) -> list[int]:
    """The text that follows every image of a prompt (``OUT_TEXT``): the tokens whose embeddings
    start the VoCo embeddings with ``VoCo(init_ids=...)``."""
    return list(encode_segment(text_tokenizer, OUT_TEXT))


def realize(segments: list, condition: str, words: dict[str, list[int]] | None = None,
            blocks: dict[str, VoCoBlock] | None = None) -> list:
    """Fill a prompt's image slots for one condition (see the module docstring); adjacent
    text is merged."""
    out: list = []
    for seg in segments:
        if isinstance(seg, Slot):
            if condition == "upper":
                seg = list(words[seg.path])
            elif condition == "none":
                continue
            else:
                seg = blocks[seg.path]
        if isinstance(seg, VoCoBlock) or not out or isinstance(out[-1], VoCoBlock):
            out.append(seg if isinstance(seg, VoCoBlock) else list(seg))
        else:
            out[-1] = out[-1] + list(seg)
    return out


def prompt_positions(prompt: list) -> int:
    """Positions a realised prompt occupies (text tokens + VoCo entries)."""
    return sum(seg.k if isinstance(seg, VoCoBlock) else len(seg) for seg in prompt)


def retention_interval(upper: list[bool], lower: list[bool], voco: list[bool], n_boot: int = 2000,
                       seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Paired percentile-bootstrap interval of retention = (voco - lower) / (upper - lower)
    over episodes: one resample of the episode indices serves all three conditions (they
    answered the same episodes). None when fewer than half the resamples have upper > lower."""
    u, lo, v = (torch.tensor(x, dtype=torch.float64) for x in (upper, lower, voco))
    if not len(u) == len(lo) == len(v) or not len(u):
        raise V2LError("retention_interval: the three conditions need the same, non-empty episodes")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(u), (n_boot, len(u)), generator=g)
    gap = u[idx].mean(1) - lo[idx].mean(1)
    ok = gap > 0
    if int(ok.sum()) < n_boot / 2:
        return None
    ret = (v[idx].mean(1) - lo[idx].mean(1))[ok] / gap[ok]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return [float(x) for x in torch.quantile(ret, q)]


# ----------------------------------------------------------------------------- blocks in memory

class BlockStore(Mapping):
    """Compressed blocks (path -> ``VoCoBlock``) kept in CPU memory and handed out on ``device``.

    ``add`` copies a block into memory the store owns: pinned slabs of ``SLAB_BYTES`` when
    ``device`` is a GPU (the blocks packed one after another, so a transfer is a plain DMA and
    no block pays the pinned allocator's rounding), a copy of its own on a CPU. Reading
    ``store[path]`` moves the block to ``device`` and keeps it in a least-recently-used cache of
    at most ``cache_bytes`` (None: unbounded; 0: none kept, a block stays on the device only
    while the batch that read it holds it). The tensors are the same bits wherever they are, so
    what a prompt reads does not depend on the cache. ``host_bytes``: the blocks held in CPU
    memory; ``hits`` / ``reads``: reads served by the cache, all reads."""

    SLAB_BYTES = 1 << 28

    def __init__(self, device, cache_bytes: int | None = None):
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.cache_bytes = cache_bytes
        self._host: dict[str, VoCoBlock] = {}
        self._cache: OrderedDict[str, VoCoBlock] = OrderedDict()
        self._cached = 0
        self._slab, self._used = None, 0
        self.host_bytes = self.hits = self.reads = 0

    def add(self, path: str, block: VoCoBlock) -> None:
        keys, values = block.keys.detach(), block.values.detach()
        if self.pin:
            out = [self._slot(keys), self._slot(values)]
            for dst, src in zip(out, (keys, values)):
                dst.copy_(src, non_blocking=True)   # ordered before any later read on the stream
            keys, values = out
        else:
            keys, values = keys.to("cpu", copy=True), values.to("cpu", copy=True)
        old = self._host.pop(path, None)
        self.host_bytes += block.nbytes - (old.nbytes if old is not None else 0)
        self._host[path] = VoCoBlock(keys, values)
        self._drop(path)

    def _slot(self, like: torch.Tensor) -> torch.Tensor:
        n = like.numel()
        if self._slab is None or self._slab.dtype != like.dtype or self._used + n > self._slab.numel():
            size = max(self.SLAB_BYTES // like.element_size(), n)
            self._slab, self._used = torch.empty(size, dtype=like.dtype, pin_memory=True), 0
        out = self._slab[self._used:self._used + n].view(like.shape)
        self._used += n
        return out

    def host(self, path: str) -> VoCoBlock:
        """The block as kept in CPU memory (not moved, not cached)."""
        return self._host[path]

    def __getitem__(self, path: str) -> VoCoBlock:
        self.reads += 1
        block = self._cache.get(path)
        if block is not None:
            self.hits += 1
            self._cache.move_to_end(path)
            return block
        host = self._host[path]
        block = VoCoBlock(host.keys.to(self.device, non_blocking=self.pin),
                          host.values.to(self.device, non_blocking=self.pin))
        if self.cache_bytes is None or block.nbytes <= self.cache_bytes:
            self._cache[path] = block
            self._cached += block.nbytes
            while self.cache_bytes is not None and self._cached > self.cache_bytes:
                self._drop(next(iter(self._cache)))
        return block

    def _drop(self, path: str) -> None:
        block = self._cache.pop(path, None)
        if block is not None:
            self._cached -= block.nbytes

    def __contains__(self, path) -> bool:
        return path in self._host

    def __iter__(self):
        return iter(self._host)

    def __len__(self) -> int:
        return len(self._host)


def synced_clock(device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` has finished (CUDA runs
    asynchronously: without this a timed region ends before the GPU's work does)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------- decoding

@torch.no_grad()
def greedy(voco: VoCo, prompts: list[list], max_new_tokens: int, constraints: list | None,
           eos_id: int | None) -> list[list[int]]:
    """Greedy continuation of realised prompts through the frozen LLM, each row limited to its
    ``NameTrie`` when given; stops at EOS or a finished name."""
    logits, cache, valid, pos, _ = voco.prefill(prompts)
    b = len(prompts)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(max_new_tokens):
        nxt = greedy_step(logits, constraints, out, done, eos_id)
        finish_forced(constraints, out, done, eos_id, max_new_tokens)
        if all(done) or step == max_new_tokens - 1:
            break
        logits, cache, valid, pos = voco.step(nxt, cache, valid, pos)
    return [[t for t in row if t != eos_id] for row in out]


# ----------------------------------------------------------------------------- objective

def kl_positions(segments: list) -> list[bool]:
    """For an answered prompt's segments: at which prompt-text tokens the KL is taken (after
    the first image, where the next token is text)."""
    use: list[bool] = []
    seen_image = False
    for j, seg in enumerate(segments):
        if isinstance(seg, Slot):
            seen_image = True
            continue
        followed_by_image = j + 1 < len(segments) and isinstance(segments[j + 1], Slot)
        n = len(seg)
        for t in range(n):
            last = t == n - 1
            use.append(seen_image and not (last and (followed_by_image or j == len(segments) - 1)))
    return use


def distill_loss(voco: VoCo, segment_rows: list[list], words: dict[str, list[int]], k: int,
                 name_rows: list[list[bool]] | None = None) -> tuple[torch.Tensor, int]:
    """(sum of KL(teacher || student) over the KL positions, number of positions) for a batch
    of answered episode prompts; the student's images are compressed here (with gradients).
    ``name_rows`` (``VoCoPrompter.segments(..., names=True)``'s flags): the KL is taken only
    where the next token is a class name's (or the answer's EOS)."""
    paths = sorted({s.path for row in segment_rows for s in row if isinstance(s, Slot)})
    compressed = voco.compress([torch.tensor(words[p]) for p in paths], k)
    blocks = dict(zip(paths, compressed))
    with torch.no_grad():
        teacher_prompts = [realize(row, "upper", words=words) for row in segment_rows]
        t_hidden, _, _, _, t_index = voco.prefill(teacher_prompts, hidden=True)
    s_hidden, _, _, _, s_index = voco.prefill([realize(row, "voco", blocks=blocks)
                                               for row in segment_rows], hidden=True)
    t_rows, s_rows = [], []      # the hidden states at the KL positions, then their logits only
    for i, row in enumerate(segment_rows):
        use = kl_positions(row)
        if name_rows is not None:
            use = [u and nxt for u, nxt in zip(use, name_rows[i][1:] + [False])]
        use_t = torch.tensor(use, device=s_hidden.device)
        t_rows.append(t_hidden[i][t_index[i] >= 0][_teacher_text_mask(row, words)][use_t])
        s_rows.append(s_hidden[i][s_index[i] >= 0][use_t])
    with torch.no_grad():
        t_log = F.log_softmax(voco.logits_of(torch.cat(t_rows)), -1)
    s_log = F.log_softmax(voco.logits_of(torch.cat(s_rows)), -1)
    return (t_log.exp() * (t_log - s_log)).sum(), int(sum(len(r) for r in s_rows))


def _teacher_text_mask(segments: list, words: dict[str, list[int]]) -> torch.Tensor:
    """Over the teacher's text tokens (prompt text and image words): True at prompt text."""
    mask = []
    for seg in segments:
        mask += [False] * len(words[seg.path]) if isinstance(seg, Slot) else [True] * len(seg)
    return torch.tensor(mask)


# ----------------------------------------------------------------------------- artifacts

def llm_identity(llm) -> dict:
    """What a VoCo artifact must match: the vocabulary fingerprint and the architecture
    (the fingerprint alone does not tell two sizes of one LLM family apart)."""
    c = llm.model.config
    return {"fingerprint": llm.fingerprint, "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
            "intermediate_size": getattr(c, "intermediate_size", None)}


def check_identity(recorded: dict, llm, where: str) -> None:
    now = llm_identity(llm)
    diff = [k for k in now if recorded.get(k) != now[k]]
    if diff:
        raise V2LError(f"{where}: VoCo weights made for another LLM ({', '.join(diff)} differ: "
                       f"{[recorded.get(k) for k in diff]} vs {[now[k] for k in diff]}); pass the "
                       "LLM they were trained with or retrain step 5 for this one")


def set_attention(llm, attn: str) -> None:
    """Select the attention implementation; the VoCo check refuses the ones it cannot use."""
    if attn in ("sdpa", "eager"):
        llm.model.set_attn_implementation(attn)
    else:
        llm.model.config._attn_implementation = attn   # refused by models.voco.check_llm



def image_word_ids(tokenizer, text_tokenizer, paths: list[str], k: int, separator: str = "",
                   dedup: bool = False, sort: bool = False, num_workers: int = 0,
                   progress: bool = True, local: bool = False) -> dict[str, list[int]]:
    """Each image's words exactly as the few-shot prompt reads them
    (``engine.fewshot.image_words``: its first ``k`` global words, optionally without repeats
    or sorted, joined by ``separator``), as the LLM's token ids (one prompt segment): what a
    VoCo block compresses. With ``local``, the image's local tokens (LLM ids in raster order)
    come first: the tokenizer's whole output, local then global."""
    from engine.fewshot import fetch_count, global_token_strings, image_words
    from engine.open_ended import local_token_ids
    n = fetch_count(k, dedup, tokenizer.tok_embeddings_global.weight.shape[0])
    strings = global_token_strings(tokenizer, paths, n, num_workers=num_workers, progress=progress)
    locals_ = local_token_ids(tokenizer, paths) if local else [()] * len(paths)
    return {p: list(loc) + encode_segment(text_tokenizer,
                                          image_words(s, k, separator, dedup, sort=sort))
            for p, s, loc in zip(paths, strings, locals_)}


def load_voco(voco_dir, llm, tokenizer_dir) -> tuple[VoCo, dict, dict]:
    """(VoCo on ``llm`` with its untrained initial weights, the artifact's voco.json, the trained
    weights to ``load_adapter_state``) from a step-5 artifact, checked to be made for this LLM
    and (when the tokenizer has a manifest) from this tokenizer. The untrained state is the
    paper's lower bound ("random compression"): initial VoCo embeddings, LoRA = identity.
    Like every ``VoCo``, it attaches LoRA layers to ``llm.model`` in place (``VoCo.remove()``
    takes them out)."""
    from pathlib import Path

    from utils.artifacts import MANIFEST, load_json, load_tensors, read_manifest, require_input
    manifest = read_manifest(voco_dir, VOCO)
    info = load_json(Path(voco_dir) / "voco.json")
    check_identity(info["llm_identity"], llm, str(voco_dir))
    if (Path(tokenizer_dir) / MANIFEST).is_file():
        require_input(manifest, "tokenizer", read_manifest(tokenizer_dir, TOKENIZER), f"{voco_dir} (VoCo weights)")
    voco = VoCo(llm.model, info["k_max"], info["lora_rank"], info["lora_alpha"],
                info["lora_targets"], bos_id=info["bos_id"], seed=info["seed"],
                context_ids=info.get("context_ids", []), init_ids=info.get("init_ids", []))
    return voco, info, load_tensors(Path(voco_dir) / "voco.safetensors")


def prefill_flops(model, n_new: float, n_past: float = 0.0) -> float:
    """Approximate FLOPs of a prefill of ``n_new`` tokens after ``n_past`` cached ones: the
    layers' matmuls (2 x parameters per token), attention scores and mixing (4 x layers x
    heads*head_dim per query-key pair, causal), and one row of output logits."""
    c = model.config
    layer_params = sum(p.numel() for n, p in model.named_parameters()
                       if ".layers." in n and "lora_" not in n)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    pairs = n_new * n_past + n_new * (n_new + 1) / 2
    return (2 * layer_params * n_new + 4 * c.num_hidden_layers * c.num_attention_heads * head_dim * pairs
            + 2 * c.hidden_size * c.vocab_size)
