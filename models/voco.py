"""VoCo compression inside a frozen LLM: an image's tokens packed into k VoCo positions' KV.

VoCo-LLaMA (Ye et al., 2024) places k special "VoCo" tokens after an image's
vision tokens and masks attention so that everything after the VoCo block sees
the image only through the VoCo positions; the image's key/value cache can then
be dropped and only the k VoCo entries kept. Here:

- **VoCo embeddings** are k_max learnable vectors kept outside the vocabulary and
  spliced in through ``inputs_embeds``: the LLM's vocabulary, its fingerprint and
  every tokenizer artifact stay unchanged. An image is either token ids (our V2L
  image words) or continuous embeddings ``[n, hidden]`` (a projector's output).
- **LoRA adapters** (``peft``) are active only while an image is compressed; the
  model that reads a compressed cache is the unmodified frozen LLM (the authors
  fine-tune the whole LLM instead, which would change the LLM every other stage
  shares).
- **Isolated compression.** An image is compressed on its own: [BOS] + a fixed
  context text (``context_ids``: the prompt text every image follows) + its tokens
  + k VoCo tokens at positions 0.. (the VoCo tokens see only their own image).
  The context matters: keys and values made right after BOS are unlike those of
  any word inside a prompt, and the frozen LLM cannot use them
  (step5_train_voco.py gives the measurement).
  Its VoCo keys are stored rotated back to positions 0..k-1, so the same block is
  placed into any prompt at any position by re-rotating the keys (exact for plain
  RoPE: R(a)R(b) = R(a+b)); each image is compressed once per run. Deviation: in
  the authors' single-image layout the image tokens also see the text before
  them; here they do not, which is what makes a block reusable across prompts.
- **Masks** are float additive 4D masks in the model's dtype (0 = attend,
  dtype-min = blocked) carrying causality and padding, with explicit position
  ids; transformers passes such a mask through unchanged. A boolean 4D mask is
  silently wrong under eager attention (it is added to the scores), and
  flash-attention cannot take a 4D mask at all, so it is refused. A padded query
  row attends to itself only, so it never produces NaN.
- **Positions** are compact: a prompt's text tokens and VoCo entries take
  consecutive positions; an image's own tokens take none (they are gone).
  ``single_pass`` computes the same thing in one masked forward over the whole
  sequence (image tokens placed at positions just before their VoCo block, only
  visible to their own block): the reference the cached path is tested against.

A prompt is a list of segments: a list of token ids (text), a ``VoCoBlock``
(a compressed image) or, for ``single_pass`` only, an ``Image`` (uncompressed).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from utils.errors import V2LError

ATTENTION_OK = ("sdpa", "eager")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


# ----------------------------------------------------------------------------- checks

def check_llm(model) -> None:
    """Refuse LLMs the VoCo mechanism cannot run exactly: attention without 4D-mask support
    (flash-attention), rotary variants other than plain RoPE, sliding-window attention."""
    config = model.config
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in ATTENTION_OK:
        raise V2LError(f"attention implementation '{attn}' cannot take VoCo's float 4D mask; load "
                       "the LLM with attn_implementation='sdpa' (or 'eager')")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "?"
    if rope_type not in ("default", None):
        raise V2LError(f"the LLM uses rotary type '{rope_type}': re-rotating cached VoCo keys is "
                       "exact only for plain RoPE; use an LLM with rope_type 'default'")
    if getattr(config, "sliding_window", None):
        raise V2LError("the LLM uses sliding-window attention, which VoCo's cached blocks do not "
                       "support; use a full-attention LLM")
    if not hasattr(_decoder(model), "rotary_emb"):
        raise V2LError(f"{type(model).__name__}: no rotary embedding found at model.model.rotary_emb; "
                       "VoCo supports LLaMA-style causal LMs")


def _decoder(model):
    """The decoder stack (LlamaModel) under a causal LM, also under a peft wrapper."""
    inner = getattr(model, "model", model)
    return getattr(inner, "model", inner) if not hasattr(inner, "layers") else inner


def check_context(model, n_positions: int, what: str, fix: str) -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and n_positions > context:
        raise V2LError(f"{what}: {n_positions} positions, {n_positions - context} over the LLM "
                       f"context of {context}; {fix}")


def neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Q, K] bool -> [B, 1, Q, K] float mask (0 allowed, dtype-min blocked)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill(~allowed, neg(dtype))[:, None]


# ----------------------------------------------------------------------------- rotary

def rotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE keys [B, H, k, d] (half-split layout) by ``delta`` [B] or [B, k] positions."""
    if delta.dim() == 1:
        delta = delta[:, None].expand(-1, keys.shape[2])
    freqs = delta.to(torch.float64)[..., None] * inv_freq.to(keys.device, torch.float64)
    emb = torch.cat((freqs, freqs), dim=-1)                       # [B, k, d]
    cos, sin = emb.cos()[:, None].to(keys.dtype), emb.sin()[:, None].to(keys.dtype)
    half = keys.shape[-1] // 2
    rotated_half = torch.cat((-keys[..., half:], keys[..., :half]), dim=-1)
    return keys * cos + rotated_half * sin


# ----------------------------------------------------------------------------- blocks

@dataclass
class Image:
    """An uncompressed image for ``single_pass``: token ids [n] or embeddings [n, hidden]."""
    tokens: torch.Tensor


@dataclass
class VoCoBlock:
    """One image's compressed cache: keys and values [layers, kv_heads, k, head_dim], the keys
    rotated to positions 0..k-1."""
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def k(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def detach(self) -> "VoCoBlock":
        return VoCoBlock(self.keys.detach(), self.values.detach())


def kv_bytes_per_token(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of key/value cache one position costs in ``model`` (all layers)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    size = torch.finfo(dtype or model.dtype).bits // 8
    return 2 * c.num_hidden_layers * kv_heads * head_dim * size


# ----------------------------------------------------------------------------- the module

class VoCo(nn.Module):
    """k_max VoCo embeddings + LoRA adapters (active only while compressing) on a frozen LLM.

    The LLM is modified in place by peft (LoRA layers wrap its linear layers) but, with the
    adapters disabled (``frozen()``), computes exactly what it did before.
    """

    def __init__(self, model, k_max: int, lora_rank: int = 8, lora_alpha: float = 16.0,
                 lora_targets=LORA_TARGETS, bos_id: int | None = None, seed: int = 0,
                 context_ids: list[int] | None = None, init_ids: list[int] | None = None):
        super().__init__()
        check_llm(model)
        self.llm, self.k_max, self.bos_id = model, int(k_max), bos_id
        self.context_ids = list(context_ids or [])
        self.lora = dict(rank=int(lora_rank), alpha=float(lora_alpha), targets=list(lora_targets))
        weight = model.get_input_embeddings().weight
        vocab = weight.detach().float().cpu()
        self.init_ids = list(init_ids or [])
        if self.init_ids:   # copies of these tokens' embeddings, cycled over the k_max rows
            init = vocab[[self.init_ids[i % len(self.init_ids)] for i in range(self.k_max)]]
        else:   # random rows with the vocabulary embeddings' mean and spread (the authors' new
            #     <voco> token also starts as a random embedding row)
            g = torch.Generator().manual_seed(seed)
            init = vocab.mean(0) + vocab.std() * torch.randn(self.k_max, vocab.shape[1], generator=g)
        # kept in fp32 (cast to the LLM's dtype where used) so bf16 training updates them well
        self.embeddings = nn.Parameter(init.to(weight.device))
        self.peft = None
        if self.lora["rank"] > 0:
            from peft import LoraConfig, get_peft_model
            torch.manual_seed(seed)
            config = LoraConfig(r=self.lora["rank"], lora_alpha=self.lora["alpha"],
                                target_modules=_lora_modules(model, self.lora["targets"]),
                                lora_dropout=0.0, bias="none")
            self.peft = get_peft_model(model, config)
        self._inv_freq = _decoder(model).rotary_emb.inv_freq

    # -- adapters
    def frozen(self):
        """Context in which the LLM is the unmodified frozen model (LoRA off)."""
        return self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [self.embeddings]
        if self.peft is not None:
            params += [p for n, p in self.llm.named_parameters() if "lora_" in n]
        return params

    def adapter_state(self) -> dict[str, torch.Tensor]:
        out = {"voco.embeddings": self.embeddings.detach()}
        if self.peft is not None:
            from peft import get_peft_model_state_dict
            out |= {f"lora.{k}": v.detach() for k, v in get_peft_model_state_dict(self.peft).items()}
        return out

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embeddings.copy_(state["voco.embeddings"].to(self.embeddings))
        if self.peft is not None:
            from peft import set_peft_model_state_dict
            lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
            set_peft_model_state_dict(self.peft, lora)

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype in (torch.long, torch.int, torch.int32, torch.int64):
            return self.llm.get_input_embeddings()(tokens.to(self.device))
        hidden = self.embeddings.shape[1]
        if tokens.dim() != 2 or tokens.shape[1] != hidden:
            raise V2LError(f"image embeddings of shape {tuple(tokens.shape)}: expected [n, {hidden}] "
                           "(the LLM's hidden size) or token ids [n]")
        return tokens.to(self.device, self.dtype)

    def _span(self, image: Image | torch.Tensor) -> torch.Tensor:
        """An image's compression input: [BOS] + the context text + its token embeddings,
        [n, hidden]."""
        tokens = image.tokens if isinstance(image, Image) else image
        ids = ([self.bos_id] if self.bos_id is not None else []) + self.context_ids
        parts = [self._embed(torch.tensor(ids, dtype=torch.long))] if ids else []
        return torch.cat(parts + [self._embed(tokens)])

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.k_max:
            raise V2LError(f"k={k} VoCo tokens asked for, but these VoCo weights were trained "
                           f"with at most {self.k_max}; use k between 1 and {self.k_max}")

    # -- compression
    def compress(self, images: list, k: int, adapters: bool = True) -> list[VoCoBlock]:
        """Compress each image (token ids, embeddings or ``Image``) on its own into k VoCo
        entries, in one batched, LoRA-adapted forward (``adapters=False``: the frozen LLM, as
        ``single_pass`` computes it). Gradients flow when enabled."""
        self._check_k(k)
        spans = [self._span(im) for im in images]
        lengths = torch.tensor([s.shape[0] for s in spans])
        width = int(lengths.max()) + k
        check_context(self.llm, width, "an image to compress", "use fewer image tokens")
        b, hidden, dev = len(spans), spans[0].shape[1], self.device
        voco = self.embeddings[:k].to(self.dtype)
        rows, pos = [], torch.zeros(b, width, dtype=torch.long)
        valid = torch.zeros(b, width, dtype=torch.bool)
        for i, s in enumerate(spans):               # left padding: VoCo = the last k columns
            pad = width - k - s.shape[0]
            rows.append(torch.cat([s.new_zeros(pad, hidden), s, voco]))
            pos[i, pad:] = torch.arange(s.shape[0] + k)
            valid[i, pad:] = True
        allowed = _causal_allowed(valid)
        with contextlib.nullcontext() if adapters else self.frozen():
            out = self.llm(inputs_embeds=torch.stack(rows), position_ids=pos.to(dev),
                           attention_mask=additive(allowed.to(dev), self.dtype), use_cache=True,
                           logits_to_keep=1)
        cache = out.past_key_values
        back = -lengths.to(dev)                     # VoCo sat at positions len..len+k-1
        keys = torch.stack([rotate(layer.keys[:, :, -k:], back, self._inv_freq)
                            for layer in cache.layers], 1)          # [B, layers, kv, k, d]
        values = torch.stack([layer.values[:, :, -k:] for layer in cache.layers], 1)
        return [VoCoBlock(keys[i], values[i]) for i in range(b)]

    # -- reading compressed prompts
    def prefill(self, prompts: list[list], all_logits: bool = False, explicit_positions: bool = True,
                hidden: bool = False):
        """Run prompts of text segments (lists of ids) and ``VoCoBlock``s through the frozen LLM.

        Returns (logits, cache, key_valid [B, N], next_position [B], text_index): logits are
        [B, V] for each prompt's last token, or with ``all_logits`` [B, T, V] for every text
        token (``text_index`` [B, T] gives the index of that token among the row's text tokens,
        -1 on padding); with ``hidden``, the final hidden states [B, T, hidden] of every text
        token instead of logits (``logits_of`` turns the few needed into logits). The last
        segment of a prompt must be text. ``explicit_positions=False`` is a control only:
        transformers then counts positions from the cache length (wrong).
        """
        dev, dtype = self.device, self.dtype
        rows = []
        for prompt in prompts:
            if not prompt or isinstance(prompt[-1], VoCoBlock) or not len(prompt[-1]):
                raise V2LError("a VoCo prompt must end with text (the answer is read after it)")
            text, text_pos, blocks, block_pos, p = [], [], [], [], 0
            for seg in prompt:
                if isinstance(seg, VoCoBlock):
                    blocks.append(seg)
                    block_pos.append(p)
                    p += seg.k
                else:
                    text += list(seg)
                    text_pos += range(p, p + len(seg))
                    p += len(seg)
            rows.append((text, text_pos, blocks, block_pos, p))
        check_context(self.llm, max(r[4] for r in rows), "a compressed prompt",
                      "lower --k_shot or the number of VoCo tokens")
        b = len(rows)
        n_max = max(sum(bl.k for bl in r[2]) for r in rows)
        t_max = max(len(r[0]) for r in rows)
        ids = torch.zeros(b, t_max, dtype=torch.long)
        q_pos = torch.zeros(b, t_max, dtype=torch.long)
        q_valid = torch.zeros(b, t_max, dtype=torch.bool)
        c_pos = torch.zeros(b, n_max, dtype=torch.long)
        c_valid = torch.zeros(b, n_max, dtype=torch.bool)
        text_index = torch.full((b, t_max), -1, dtype=torch.long)
        c_shift = torch.zeros(b, n_max, dtype=torch.long)
        c_keys, c_values = [], []
        for i, (text, text_pos, blocks, block_pos, _) in enumerate(rows):
            t = len(text)
            ids[i, t_max - t:] = torch.tensor(text)
            q_pos[i, t_max - t:] = torch.tensor(text_pos)
            q_valid[i, t_max - t:] = True
            text_index[i, t_max - t:] = torch.arange(t)
            n = sum(bl.k for bl in blocks)
            if n:
                c_pos[i, :n] = torch.cat([torch.arange(p, p + bl.k) for bl, p in zip(blocks, block_pos)])
                c_shift[i, :n] = torch.cat([torch.full((bl.k,), p) for bl, p in zip(blocks, block_pos)])
                c_valid[i, :n] = True
            if n_max:   # [layers, kv_heads, entries, head_dim], zero-padded to n_max entries
                k_ = torch.cat([bl.keys for bl in blocks], 2) if blocks else None
                v_ = torch.cat([bl.values for bl in blocks], 2) if blocks else None
                like = k_ if k_ is not None else next(bl for r in rows for bl in r[2]).keys
                pad = like.new_zeros(*like.shape[:2], n_max - n, like.shape[3])
                c_keys.append(torch.cat([k_, pad], 2) if k_ is not None else pad)
                c_values.append(torch.cat([v_, pad], 2) if v_ is not None else pad)
        cache = None
        if n_max:   # one rotation places every block at its position (stored at 0..k-1)
            keys = torch.stack(c_keys, 1)                      # [layers, B, kv_heads, N, d]
            shape = keys.shape
            keys = rotate(keys.reshape(shape[0] * b, *shape[2:]), c_shift.to(dev).repeat(shape[0], 1),
                          self._inv_freq).reshape(shape)
            values = torch.stack(c_values, 1)
            cache = DynamicCache(ddp_cache_data=list(zip(keys.unbind(0), values.unbind(0))))
        key_pos = torch.cat([c_pos, q_pos], 1)
        key_valid = torch.cat([c_valid, q_valid], 1)
        allowed = (key_pos[:, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
        allowed &= q_valid[:, :, None]
        allowed[:, :, n_max:] |= torch.eye(t_max, dtype=torch.bool)[None] & ~q_valid[:, :, None]
        inputs = dict(input_ids=ids.to(dev), attention_mask=additive(allowed.to(dev), dtype),
                      position_ids=q_pos.to(dev) if explicit_positions else None,
                      past_key_values=cache, use_cache=True)
        nxt = torch.tensor([r[4] for r in rows], device=dev)
        with self.frozen():
            if hidden:    # the decoder stack alone: no [B, T, vocab] logits
                out = _decoder(self.llm)(**inputs)
                return out.last_hidden_state, out.past_key_values, key_valid.to(dev), nxt, text_index
            out = self.llm(**inputs, logits_to_keep=0 if all_logits else 1)
        logits = out.logits.float() if all_logits else out.logits[:, -1].float()
        return logits, out.past_key_values, key_valid.to(dev), nxt, text_index

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float logits of final hidden states [..., hidden] (``prefill(hidden=True)``'s)."""
        return self.llm.get_output_embeddings()(hidden).float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache, key_valid: torch.Tensor, positions: torch.Tensor):
        """One decoding step: tokens [B] at ``positions`` [B] after a ``prefill``; returns
        (logits [B, V], cache, key_valid, positions + 1)."""
        key_valid = torch.cat([key_valid, key_valid.new_ones(len(tokens), 1)], 1)
        mask = additive(key_valid[:, None, :], self.dtype)
        with self.frozen():
            out = self.llm(input_ids=tokens[:, None], attention_mask=mask,
                           position_ids=positions[:, None], past_key_values=cache, use_cache=True)
        return out.logits[:, -1].float(), out.past_key_values, key_valid, positions + 1

    # -- the single-pass reference
    def single_pass(self, prompts: list[list], k: int, adapters: bool = False,
                    mask: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
        """One masked forward over whole prompts of text segments and ``Image``s (each followed
        by k VoCo tokens); returns (logits [B, T, V] float, text_index [B, T]). Computes what
        ``compress`` + ``prefill`` compute (with ``adapters`` off, the frozen LLM throughout).
        ``mask`` "bool" (the same mask as booleans) and "causal" (a plain causal mask) are
        controls that must give something else."""
        self._check_k(k)
        dev, dtype = self.device, self.dtype
        voco = self.embeddings[:k].to(dtype)
        rows = []
        for prompt in prompts:
            embeds, pos, group, is_text, span_key, p, g = [], [], [], [], [], 0, 0
            for seg in prompt:
                if isinstance(seg, Image):
                    g += 1
                    span = self._span(seg)
                    n = span.shape[0]
                    embeds += [span, voco]
                    pos += range(p - n, p + k)          # the VoCo block sits at p..p+k-1
                    group += [g] * (n + k)
                    is_text += [False] * (n + k)
                    span_key += [True] * n + [False] * k  # VoCo entries stay visible later
                    p += k
                else:
                    embeds.append(self._embed(torch.tensor(list(seg), dtype=torch.long)))
                    pos += range(p, p + len(seg))
                    group += [0] * len(seg)
                    is_text += [True] * len(seg)
                    span_key += [False] * len(seg)
                    p += len(seg)
            rows.append((torch.cat(embeds), pos, group, is_text, span_key))
        b, width = len(rows), max(r[0].shape[0] for r in rows)
        x = rows[0][0].new_zeros(b, width, rows[0][0].shape[1])
        pos = torch.zeros(b, width, dtype=torch.long)
        group = torch.full((b, width), -1, dtype=torch.long)
        span_key = torch.zeros(b, width, dtype=torch.bool)
        text_index = torch.full((b, width), -1, dtype=torch.long)
        valid = torch.zeros(b, width, dtype=torch.bool)
        for i, (e, p_, g_, t_, s_) in enumerate(rows):
            n = e.shape[0]
            x[i, width - n:] = e
            pos[i, width - n:] = torch.tensor(p_)
            group[i, width - n:] = torch.tensor(g_)
            span_key[i, width - n:] = torch.tensor(s_)
            valid[i, width - n:] = True
            t = torch.tensor(t_)
            idx = torch.full((n,), -1, dtype=torch.long)
            idx[t] = torch.arange(int(t.sum()))
            text_index[i, width - n:] = idx
        allowed = _causal_allowed(valid)
        in_image = group > 0
        same = group[:, :, None] == group[:, None, :]
        # image tokens and their VoCo tokens see only their own image; text sees no image tokens
        allowed &= torch.where(in_image[:, :, None], same, ~span_key[:, None, :])
        allowed |= torch.eye(width, dtype=torch.bool)[None] & ~valid[:, :, None]
        ctx = contextlib.nullcontext() if adapters else self.frozen()
        attention = {"float": lambda: additive(allowed.to(dev), dtype),
                     "bool": lambda: allowed[:, None].to(dev), "causal": lambda: None}[mask]()
        with ctx:
            out = self.llm(inputs_embeds=x, attention_mask=attention, position_ids=pos.to(dev))
        return out.logits.float(), text_index


def _lora_modules(model, targets) -> list[str]:
    """The full names of the linear layers LoRA adapts: ``targets`` in every layer but the last,
    where only k_proj/v_proj can matter (only the VoCo keys and values are kept; the last
    layer's queries, output projection and MLP feed nothing)."""
    last = model.config.num_hidden_layers - 1
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if parts[-1] not in targets or "layers" not in parts:
            continue
        layer = int(parts[parts.index("layers") + 1])
        if layer < last or parts[-1] in ("k_proj", "v_proj"):
            names.append(name)
    if not names:
        raise V2LError(f"no linear layer named {list(targets)} in the LLM; set --lora_targets to "
                       "its attention projection names")
    return names


def _causal_allowed(valid: torch.Tensor) -> torch.Tensor:
    """[B, T] valid columns -> [B, T, T]: causal over valid keys; a padded query sees itself."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = causal[None] & valid[:, None, :] & valid[:, :, None]
    return allowed | (torch.eye(t, dtype=torch.bool)[None] & ~valid[:, :, None])


def text_logits(logits: torch.Tensor, text_index: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the logits of its text tokens in order ([T_i, V])."""
    return [logits[i][text_index[i] >= 0] for i in range(logits.shape[0])]
