"""Batched greedy decoding through a frozen causal LM."""
from __future__ import annotations

import copy

import torch
from tqdm import tqdm
from transformers import DynamicCache

from utils.errors import V2LError


class BatchedGreedy:
    """Greedy decoding of a batch of token-id prompts through a frozen causal LM.

    Left padding, an attention mask and explicit position ids (counting real
    tokens only), and a key/value cache of the longest token prefix the batch
    shares, computed once (and kept for the next batch with the same prefix)
    and expanded to the batch. With ``groups`` (a group label per prompt), the
    longest prefix each group's prompts share beyond that is also computed once
    per group (one padded pass for all groups) and its cache copied to the
    group's rows: the few-shot episode's induction line, read once for its
    image, ceiling and floor prompts. Only the last position's logits are
    computed. Gives the same tokens as running each prompt alone (exactly so in
    fp32; in bf16/fp16 a near-tie between the top two logits can rarely flip, as
    with any change of batch shape).

    The decoding loop waits for the device once per step (the chosen ids, which
    the Python constraints read); the inputs of each forward pass are made on the
    device, and a step's constraint masks reach it in one copy.
    """

    def __init__(self, model, pad_id: int, prefix_cache: bool = True):
        self.model, self.pad_id, self.use_prefix_cache = model, pad_id, prefix_cache
        self._memo: tuple[tuple[int, ...], DynamicCache] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prefix(self, prefix: tuple[int, ...], batch: int) -> DynamicCache:
        """The prefix's cache expanded to ``batch`` rows (the last prefix is kept and reused)."""
        if self._memo is None or self._memo[0] != prefix:
            ids = torch.tensor([prefix], device=self.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self._memo = (prefix, out.past_key_values)
        cache = copy.deepcopy(self._memo[1])
        cache.batch_repeat_interleave(batch)
        return cache

    def _extend(self, segments: list[list[int]], starts: list[int], cache, mask):
        """Run one left-padded segment per row after what ``cache`` holds (``mask``: its
        attention mask [B, T] on the device, or None when empty); the segment of row i starts
        at position ``starts[i]``. Returns (model output, the mask extended by the segment)."""
        b, width = len(segments), max(len(s) for s in segments)
        host = torch.zeros((3, b, width), dtype=torch.long)     # ids, mask, positions
        host[0].fill_(self.pad_id)
        for i, s in enumerate(segments):
            n = len(s)
            if n:
                host[0, i, width - n:] = torch.tensor(s)
                host[1, i, width - n:] = 1
                host[2, i, width - n:] = torch.arange(starts[i], starts[i] + n)
        ids, seg_mask, pos = host.to(self.device)               # one copy to the device
        mask = seg_mask if mask is None else torch.cat([mask, seg_mask], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         past_key_values=cache if cache is not None else DynamicCache(),
                         use_cache=True, logits_to_keep=1)
        return out, mask

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], groups: list | None = None):
        """Run the prompts; return (last-position logits [B, V] float32, cache, attention
        mask [B, T], next position ids [B]). ``groups``: a label per prompt; the prefix the
        prompts of a group share (beyond the batch's) is run once for the group."""
        lengths = [len(p) for p in prompts]
        b, dev = len(prompts), self.device
        shared = common_prefix(prompts, min(lengths) - 1) if self.use_prefix_cache else 0
        starts, ends, labels = [shared] * b, {}, []
        if groups is not None and self.use_prefix_cache:
            if len(groups) != b:
                raise V2LError(f"{len(groups)} group labels for {b} prompts")
            labels = list(dict.fromkeys(groups))
            for g in labels:
                rows = [prompts[i][shared:] for i in range(b) if groups[i] == g]
                ends[g] = shared + common_prefix(rows, min(len(r) for r in rows) - 1)
        if any(ends[g] > shared for g in labels):     # each group's prefix, run once
            n = len(labels)
            first = {g: prompts[groups.index(g)] for g in labels}
            out, gmask = self._extend(
                [first[g][shared:ends[g]] for g in labels], [shared] * n,
                self._prefix(tuple(prompts[0][:shared]), n) if shared else None,
                torch.ones((n, shared), dtype=torch.long, device=dev) if shared else None)
            where = torch.tensor([labels.index(g) for g in groups], device=dev)
            cache = out.past_key_values
            cache.batch_select_indices(where)          # each row gets its group's cache
            mask = gmask.index_select(0, where)
            starts = [ends[g] for g in groups]
        else:
            cache = self._prefix(tuple(prompts[0][:shared]), b) if shared else None
            mask = torch.ones((b, shared), dtype=torch.long, device=dev) if shared else None
        out, mask = self._extend([p[s:] for p, s in zip(prompts, starts)], starts, cache, mask)
        nxt = torch.tensor(lengths, device=dev)
        return out.logits[:, -1].float(), out.past_key_values, mask, nxt

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 constraints: list | None = None,
                 vocab_mask: torch.Tensor | None = None,
                 eos_id: int | None = None, skip_forced: bool = True,
                 groups: list | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt: at most ``max_new_tokens`` tokens, stopping at
        EOS or when the row's constraint is complete. ``vocab_mask`` (bool [V]) limits every
        step to the ids it marks; ``constraints[i]`` limits row i to its trie. ``skip_forced``:
        a row whose constraint leaves one token at every remaining step gets them without
        forward passes (``finish_forced``; the same tokens). ``groups``: see ``prefill``."""
        logits, cache, mask, pos = self.prefill(prompts, groups)
        b = len(prompts)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        banned = None if vocab_mask is None else \
            ~vocab_mask[: logits.shape[-1]].to(logits.device)      # moved once, not per step
        for step in range(max_new_tokens):
            if banned is not None:
                logits = logits.masked_fill(banned, float("-inf"))
            nxt = greedy_step(logits, constraints, out, done, eos_id, self.pad_id)
            if skip_forced and vocab_mask is None:
                finish_forced(constraints, out, done, eos_id, max_new_tokens)
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            res = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                             past_key_values=cache, use_cache=True)
            cache, pos, logits = res.past_key_values, pos + 1, res.logits[:, -1].float()
        return [[t for t in row if t != eos_id] for row in out]


def common_prefix(prompts: list[list[int]], limit: int) -> int:
    """The length of the longest token prefix all ``prompts`` share, at most ``limit``."""
    n, first = 0, prompts[0]
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def allowed_mask(logits: torch.Tensor, constraints, out: list[list[int]],
                 pad_id: int = 0) -> torch.Tensor:
    """The ids each row's constraint allows after its tokens so far, bool [B, V] on the
    logits' device (a row without a constraint, or one that allows ``slice(None)``: every id;
    a finished row, which allows nothing: ``pad_id``, ignored). Built from one index copy."""
    rows, cols, free = [], [], []
    for i, c in enumerate(constraints):
        ids = None if c is None else (c.allowed(out[i]) or [pad_id])
        if ids is None or isinstance(ids, slice):
            free.append(i)
        else:
            rows += [i] * len(ids)
            cols += ids
    index = torch.tensor([rows + free, cols + [0] * len(free)], dtype=torch.long)
    index = index.to(logits.device, non_blocking=True)
    allow = torch.zeros_like(logits, dtype=torch.bool)
    allow[index[0, :len(rows)], index[1, :len(rows)]] = True
    if free:
        allow[index[0, len(rows):]] = True
    return allow


def greedy_step(logits: torch.Tensor, constraints, out: list[list[int]], done: list[bool],
                eos_id, pad_id: int = 0) -> torch.Tensor:
    """One greedy step for a batch: each row's argmax among the ids its constraint allows
    (``c.allowed(tokens so far)``; None: any id), appended to ``out`` for rows not ``done``;
    a row is done at EOS or when its constraint is finished. Returns the chosen ids [B]."""
    if constraints is not None:
        logits = logits.masked_fill(~allowed_mask(logits, constraints, out, pad_id), float("-inf"))
    nxt = logits.argmax(-1)
    for i, t in enumerate(nxt.tolist()):          # the step's one wait for the device
        if done[i]:
            continue
        out[i].append(t)
        c = constraints[i] if constraints is not None else None
        if t == eos_id or (c is not None and c.finished(out[i])):
            done[i] = True
    return nxt


def finish_forced(constraints, out: list[list[int]], done: list[bool], eos_id,
                  max_new_tokens: int) -> None:
    """Complete the rows whose constraint leaves one token at every remaining step (the rest
    of a class name once its first tokens single it out): greedy decoding would append
    exactly those tokens, so they are appended and the row is done without more forward
    passes. A row that still has a choice ahead is left as it is (its cache must see every
    token)."""
    if constraints is None:
        return
    for i, c in enumerate(constraints):
        if done[i] or c is None:
            continue
        path, finished = list(out[i]), False
        while len(path) < max_new_tokens:
            allowed = c.allowed(path)      # (a constraint may allow every id: slice(None))
            if not isinstance(allowed, (list, tuple)) or len(allowed) != 1:
                break
            path.append(allowed[0])
            if allowed[0] == eos_id or c.finished(path):
                finished = True
                break
        if finished or len(path) == max_new_tokens:     # (greedy stops there too)
            out[i][:] = path
            done[i] = True


@torch.no_grad()
def greedy_next_tokens(model, token_lists: list[list[int]], batch_size: int = 64,
                       pad_id: int = 0, share_prefix: bool = True, progress: bool = False) -> torch.Tensor:
    """The greedy (argmax) next token after each prompt: LongTensor [N] on CPU.

    Prompts are sorted by length so that a batch holds similar lengths, then
    run through ``BatchedGreedy.prefill``.
    """
    if any(len(t) == 0 for t in token_lists):
        raise V2LError("an empty prompt has no next token; every prompt needs at least one token")
    greedy = BatchedGreedy(model, pad_id, prefix_cache=share_prefix)
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out = torch.empty(len(token_lists), dtype=torch.long)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="greedy", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        out[idx] = greedy.prefill([token_lists[i] for i in idx])[0].argmax(-1).cpu()
    return out


CPU_BATCH_SIZE = 8     # --batch_size auto on a CPU: the batch the LLM stages have always used


def parse_batch_size(value, flag: str = "--batch_size") -> int | None:
    """``auto`` -> None (decided by ``auto_batch_size``); else a positive whole number."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(n) != str(value).strip():
        raise V2LError(f"{flag} {value!r}: use auto or a whole number of at least 1")
    return n


def free_device_memory(device) -> int | None:
    """Bytes free on a CUDA device now (the model already loaded); None on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def auto_batch_size(model, prompt_tokens: int, new_tokens: int, rows_per_item: int = 1,
                    divides: int | None = None, cpu_default: int = CPU_BATCH_SIZE) -> int:
    """``--batch_size auto``: on a GPU the most items (of ``rows_per_item`` prompts each, the
    longest ``prompt_tokens`` long, ``new_tokens`` generated) whose key/value cache and prefill
    activations fit in the device's free memory after loading (``utils.memory.llm_batch_size``,
    its safety margin included); on a CPU ``cpu_default``. With ``divides``, the largest divisor
    of it at most that (a chunk of ``divides`` items is then cut into equal batches)."""
    free = free_device_memory(next(model.parameters()).device)
    if free is None:
        n = cpu_default
    else:
        from utils.memory import llm_batch_size
        dtype_bytes = next(model.parameters()).element_size()
        n = llm_batch_size(model.config, dtype_bytes, prompt_tokens, new_tokens, free,
                           include_weights=False) // max(1, rows_per_item)
        if n < 1:
            raise V2LError(f"one item of {rows_per_item} prompts of up to {prompt_tokens} tokens "
                           f"does not fit the {free / 2 ** 30:.1f} GiB free on the GPU; give "
                           "--batch_size 1 with fewer references, or shorter prompts")
    n = max(1, n)
    if divides:
        n = max(d for d in range(1, min(n, divides) + 1) if divides % d == 0)
    return n
