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
  shares). ``reader="adapted"`` reads with the adapters on as well (LoRA on the reader;
  with ``lora_rank=0`` and LLM weights the caller trains: the authors' full fine-tuning). Constructing a ``VoCo`` attaches the LoRA layers to the LLM object it
  is given (in place); ``VoCo.remove()`` takes them out again.
- **Isolated compression.** An image is compressed on its own: [BOS] + a fixed
  context text (``context_ids``: the prompt text every image follows) + its tokens
  + a fixed text after it (``suffix_ids``: VoCo-LLaMA's layout puts "\n" between the image
  and its VoCo tokens) + k VoCo tokens at positions 0.. (the VoCo tokens see only their own
  image).
  The context is there so that an image's keys and values are made as the
  frozen LLM reads them inside a prompt, not as right after BOS.
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

A prompt is a list of segments: a list of token ids (text), a float tensor [n, hidden] of
embeddings read as they are (an uncompressed continuous image: the upper bound and the
distillation teacher) or a ``VoCoBlock`` (a compressed image). The tests hold a reference that
computes the same logits in one masked forward over whole uncompressed prompts
(tests/voco_reference.py, and one for embedding segments in tests/test_voco.py).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from utils.errors import V2LError

ATTENTION_OK = ("sdpa", "eager")
READERS = ("frozen", "adapted")
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


def block_shape(model, k: int) -> tuple[int, int, int, int]:
    """The shape of a ``VoCoBlock``'s keys (and values) at ``k`` in ``model``: [layers,
    kv_heads, k, head_dim]; its dtype is the model's."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return (c.num_hidden_layers, kv_heads, int(k), head_dim)


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

    Constructing a VoCo changes ``model``, the caller's object, in place: peft replaces its
    targeted linear layers by LoRA layers and sets ``requires_grad=False`` on its own weights.
    With the adapters off (``frozen()``, under which prompts are read by default) it
    computes exactly what it did before; ``remove()`` restores the original layers and flags.
    The initial weights come from generators of their own seeded with ``seed``; the global
    random state is left as it was.
    """

    def __init__(self, model, k_max: int, lora_rank: int = 8, lora_alpha: float = 16.0,
                 lora_targets=LORA_TARGETS, bos_id: int | None = None, seed: int = 0,
                 context_ids: list[int] | None = None, init_ids: list[int] | None = None,
                 suffix_ids: list[int] | None = None, reader: str = "frozen"):
        super().__init__()
        check_llm(model)
        if reader not in READERS:
            raise V2LError(f"--reader {reader}: must be one of {', '.join(READERS)}")
        self.llm, self.k_max, self.bos_id, self.reader = model, int(k_max), bos_id, reader
        self.context_ids = list(context_ids or [])
        self.suffix_ids = list(suffix_ids or [])
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
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.peft = None
        if self.lora["rank"] > 0:
            from peft import LoraConfig, get_peft_model
            config = LoraConfig(r=self.lora["rank"], lora_alpha=self.lora["alpha"],
                                target_modules=_lora_modules(model, self.lora["targets"]),
                                lora_dropout=0.0, bias="none")
            # peft's layer construction draws throwaway values (nn.Linear's default init) from
            # the global CPU generator: its state is put back, and the values are set below
            state = torch.get_rng_state()
            try:
                with torch.device("cpu"):
                    self.peft = get_peft_model(model, config)
            finally:
                torch.set_rng_state(state)
            _init_lora(model, seed)
        self._inv_freq = _decoder(model).rotary_emb.inv_freq

    def remove(self):
        """Take the LoRA layers out of the LLM again (peft's ``unload``: the original linear
        layers back, nothing merged) and restore its weights' ``requires_grad`` flags; returns
        the LLM. The VoCo cannot be used afterwards."""
        model = self.llm
        if self.peft is not None:
            self.peft.unload()
            model.__dict__.pop("peft_config", None)     # set by peft on the model it wraps
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self.llm = self.peft = None
        self._requires_grad = []
        return model

    # -- adapters
    def frozen(self):
        """Context in which the LLM is the unmodified frozen model (LoRA off)."""
        return self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()

    def reading(self):
        """Context in which prompts are read: the frozen LLM (``reader`` "frozen": LoRA off) or
        the LLM as it is ("adapted": LoRA on, and whatever weights the caller trains)."""
        return self.frozen() if self.reader == "frozen" else contextlib.nullcontext()

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

    def _span(self, tokens: torch.Tensor) -> torch.Tensor:
        """An image's compression input: [BOS] + the context text + its token embeddings + the
        suffix text, [n, hidden]."""
        ids = ([self.bos_id] if self.bos_id is not None else []) + self.context_ids
        parts = [self._embed(torch.tensor(ids, dtype=torch.long))] if ids else []
        parts.append(self._embed(tokens))
        if self.suffix_ids:
            parts.append(self._embed(torch.tensor(self.suffix_ids, dtype=torch.long)))
        return torch.cat(parts)

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.k_max:
            raise V2LError(f"k={k} VoCo tokens asked for, but these VoCo weights were trained "
                           f"with at most {self.k_max}; use k between 1 and {self.k_max}")

    # -- compression
    def compress(self, images: list[torch.Tensor], k: int) -> list[VoCoBlock]:
        """Compress each image (token ids [n] or embeddings [n, hidden]) on its own into k VoCo
        entries, in one batched, LoRA-adapted forward (inside ``frozen()``: the frozen LLM's).
        Gradients flow when enabled."""
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
    def prefill(self, prompts: list[list], hidden: bool = False, teacher: bool = False):
        """Run prompts of text segments (lists of ids), embedding segments ([n, hidden] float
        tensors, read uncompressed) and ``VoCoBlock``s through the frozen LLM.

        Returns (logits, cache, key_valid [B, N], next_position [B], text_index): logits are
        [B, V] for each prompt's last token; with ``hidden``, the final hidden states
        [B, T, hidden] of every token read in this pass (text tokens and embedding rows: every
        position but the blocks') instead (``logits_of`` turns the few needed into logits;
        ``text_index`` [B, T] gives the index of a token among its row's tokens read, -1 on
        padding). The last segment of a prompt must be text or embeddings. The prompts are read
        as ``reading()`` says; with ``teacher``, by the frozen LLM whatever the reader (the
        distillation teacher).
        """
        inputs, key_valid, nxt, text_index = self._prefill_inputs(prompts)
        with self.frozen() if teacher else self.reading():
            if hidden:    # the decoder stack alone: no [B, T, vocab] logits
                out = _decoder(self.llm)(**inputs)
                return out.last_hidden_state, out.past_key_values, key_valid, nxt, text_index
            out = self.llm(**inputs, logits_to_keep=1)
        return out.logits[:, -1].float(), out.past_key_values, key_valid, nxt, text_index

    def _prefill_inputs(self, prompts: list[list]):
        """(the LLM's inputs for ``prefill``: ids, mask, position ids and the cache of the VoCo
        blocks placed at their positions; key_valid [B, N]; next_position [B]; text_index)."""
        dev, dtype = self.device, self.dtype
        rows, embedded = [], []     # embedded: per row, (offset among its tokens, [n, hidden])
        for prompt in prompts:
            if not prompt or isinstance(prompt[-1], VoCoBlock) or not len(prompt[-1]):
                raise V2LError("a VoCo prompt must end with text (the answer is read after it)")
            text, text_pos, blocks, block_pos, p, embeds = [], [], [], [], 0, []
            for seg in prompt:
                if isinstance(seg, VoCoBlock):
                    blocks.append(seg)
                    block_pos.append(p)
                    p += seg.k
                    continue
                if _is_embeddings(seg):
                    embeds.append((len(text), self._embed(seg)))
                    seg = [0] * seg.shape[0]            # placeholder ids, replaced below
                text += list(seg)
                text_pos += range(p, p + len(seg))
                p += len(seg)
            rows.append((text, text_pos, blocks, block_pos, p))
            embedded.append(embeds)
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
                # (a block kept elsewhere, as eval_compression keeps them in CPU memory, is
                # moved here: .to is a no-op for one already on the device)
                k_ = torch.cat([bl.keys.to(dev) for bl in blocks], 2) if blocks else None
                v_ = torch.cat([bl.values.to(dev) for bl in blocks], 2) if blocks else None
                like = k_ if k_ is not None else next(bl for r in rows for bl in r[2]).keys.to(dev)
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
                      position_ids=q_pos.to(dev), past_key_values=cache, use_cache=True)
        if any(embedded):   # embedding segments: the rows' input embeddings, ids looked up
            inputs["inputs_embeds"] = self._splice(inputs.pop("input_ids"), embedded, t_max,
                                                   [len(r[0]) for r in rows])
        nxt = torch.tensor([r[4] for r in rows], device=dev)
        return inputs, key_valid.to(dev), nxt, text_index

    def _splice(self, ids: torch.Tensor, embedded: list, t_max: int, lengths: list[int]) -> torch.Tensor:
        """Input embeddings [B, T, hidden]: the ids' embeddings with each row's embedding
        segments in their places (rows left-padded to ``t_max``; differentiable in the
        segments)."""
        table = self.llm.get_input_embeddings()
        out = []
        for i, segments in enumerate(embedded):
            row, start, pieces, at = table(ids[i]), t_max - lengths[i], [], 0
            for offset, x in segments:
                pieces += [row[at:start + offset], x.to(row.dtype)]
                at = start + offset + x.shape[0]
            out.append(torch.cat(pieces + [row[at:]]) if segments else row)
        return torch.stack(out)

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float logits of final hidden states [..., hidden] (``prefill(hidden=True)``'s)."""
        return self.llm.get_output_embeddings()(hidden).float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache, key_valid: torch.Tensor, positions: torch.Tensor):
        """One decoding step: tokens [B] at ``positions`` [B] after a ``prefill``; returns
        (logits [B, V], cache, key_valid, positions + 1)."""
        key_valid = torch.cat([key_valid, key_valid.new_ones(len(tokens), 1)], 1)
        mask = additive(key_valid[:, None, :], self.dtype)
        with self.reading():
            out = self.llm(input_ids=tokens[:, None], attention_mask=mask,
                           position_ids=positions[:, None], past_key_values=cache, use_cache=True)
        return out.logits[:, -1].float(), out.past_key_values, key_valid, positions + 1


def _is_embeddings(seg) -> bool:
    """A prompt segment of embeddings ([n, hidden] float tensor), not token ids."""
    return isinstance(seg, torch.Tensor) and seg.is_floating_point()


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


def _init_lora(model, seed: int) -> None:
    """Set the LoRA weights peft attached to ``model`` to their start, drawn from a generator
    of its own seeded with ``seed``: B = 0 and A kaiming-uniform, as peft initialises them.
    The draws repeat, module by module, those peft's construction makes after
    ``torch.manual_seed(seed)``: nn.Linear's default init of A, then of B (both overwritten),
    then A's own, rounded through the base layer's dtype as peft does. A seed therefore gives
    the start it gave when the construction drew from the seeded global generator."""
    g = torch.Generator().manual_seed(seed)

    def draw(shape) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float32, device="cpu")
        return nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=g)

    with torch.no_grad():
        for module in model.modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if not isinstance(lora_a, nn.ModuleDict):
                continue
            for name in lora_a:
                a, b = lora_a[name].weight, lora_b[name].weight
                draw(a.shape)       # nn.Linear's default init of A
                draw(b.shape)       # and of B
                a.copy_(draw(a.shape).to(module.get_base_layer().weight.dtype))
                b.zero_()


def _causal_allowed(valid: torch.Tensor) -> torch.Tensor:
    """[B, T] valid columns -> [B, T, T]: causal over valid keys; a padded query sees itself."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = causal[None] & valid[:, None, :] & valid[:, :, None]
    return allowed | (torch.eye(t, dtype=torch.bool)[None] & ~valid[:, :, None])
