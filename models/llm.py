"""A frozen causal LLM and its tokenizer, loaded from what users have.

``load_llm(path)`` accepts:
- a Hugging Face model directory (``config.json`` + weights + tokenizer files);
- Meta's original LLaMA / LLaMA-2 directory: ``consolidated.NN.pth`` shards,
  ``params.json`` and the sentencepiece ``tokenizer.model`` (in the directory
  or its parent, as Meta's download script lays it out). It is converted on
  load into transformers' ``LlamaForCausalLM``: keys renamed, model-parallel
  shards merged, and the rotary query/key rows permuted from Meta's
  interleaved (re, im) pairs to transformers' half-split layout;
- a GGUF file (or a directory holding exactly one), through transformers'
  ``gguf_file=`` loader (needs the ``gguf`` package).

Nothing assumes sentencepiece or a 32k vocabulary: byte-level BPE models
(GPT-2 style, e.g. SmolLM2's 49,152 tokens) work the same way.

Also here: ``token_strings`` (the faithful text of single token ids),
``printable_mask`` (which ids are real text) and ``greedy_next_tokens``
(one greedy token for many prompts: batched, left-padded, with the prompts'
shared prefix computed once and reused from the KV cache).
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from utils.errors import V2LError

# Meta name -> transformers name, per decoder layer.
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# Dimension along which Meta's model-parallel shards split each weight (None: replicated).
# Column-parallel linears split their output rows, row-parallel ones their input
# columns; LLaMA-1/2's ParallelEmbedding splits the embedding dimension.
_SHARD_DIM = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
              "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1,
              "feed_forward.w3.weight": 0, "attention_norm.weight": None, "ffn_norm.weight": None,
              "tok_embeddings.weight": 1, "norm.weight": None, "output.weight": 0}
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class LLM:
    """A frozen causal LM (eval mode, no gradients) with its tokenizer."""
    model: torch.nn.Module          # transformers causal LM
    tokenizer: object               # transformers tokenizer
    ident: str                      # what was loaded: "<format>:<path>"
    fingerprint: str                # hash of the vocabulary (see llm_fingerprint)
    fmt: str                        # "hf", "meta" or "gguf"

    @property
    def device(self) -> torch.device:
        """Where inputs go (the embedding's device, also under a device map)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer can produce: 0 .. vocab_size-1."""
        return len(self.tokenizer)


# ----------------------------------------------------------------------------- loading

def resolve_dtype(dtype, device) -> torch.dtype:
    """None/"auto": bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise V2LError(f"dtype {dtype!r} unknown; use auto, fp32, fp16 or bf16")
    return names[dtype]


def detect_format(path) -> tuple[str, Path]:
    """("hf" | "meta" | "gguf", path to load) for a model path, or a V2LError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise V2LError(f"{path}: LLM path not found; pass a Hugging Face model directory, "
                       "Meta's LLaMA directory (consolidated.*.pth + params.json) or a .gguf file")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise V2LError(f"{path}: not a model directory or .gguf file; pass the directory instead")
    if (path / "config.json").is_file():
        return "hf", path
    if (path / "params.json").is_file() or any(path.glob("consolidated.*.pth")):
        return "meta", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise V2LError(f"{path}: holds {len(ggufs)} .gguf files; pass the one to use")
    raise V2LError(f"{path}: unknown model format (no config.json, params.json, "
                   "consolidated.*.pth or .gguf); pass a Hugging Face, Meta or GGUF model")


def load_llm(path, dtype=None, device=None, device_map=None) -> LLM:
    """Load a frozen causal LM and its tokenizer from a HF directory, Meta directory or GGUF file.

    dtype: None/"auto" (bf16 or fp16 on GPU, fp32 on CPU), "fp32", "fp16", "bf16" or a torch dtype.
    device: None (CUDA when available, else CPU) or a device; ignored with device_map.
    device_map: e.g. "auto" to spread a model too large for one GPU over all visible GPUs.
    """
    fmt, path = detect_format(path)
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = resolve_dtype(dtype, device)
    if fmt == "meta":
        model, tokenizer = _load_meta(path, torch_dtype)
        check_vocab(model, tokenizer, path)
        model = _dispatch(model, device_map, torch_dtype) if device_map else model.to(device)
    else:
        model, tokenizer = _load_transformers(path, fmt, torch_dtype, device_map)
        check_vocab(model, tokenizer, path)
        if not device_map:
            model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LLM(model, tokenizer, f"{fmt}:{path}", llm_fingerprint(tokenizer), fmt)


def _load_transformers(path: Path, fmt: str, dtype: torch.dtype, device_map=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {"gguf_file": path.name} if fmt == "gguf" else {}
    where = path.parent if fmt == "gguf" else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, device_map=device_map,
                                                     **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise V2LError(f"{path}: cannot load this {fmt} model ({first}); check the files are "
                       "complete and the architecture is a causal LM") from e
    return model, tokenizer


def _dispatch(model, device_map, dtype):
    """Spread a model loaded on the CPU over the GPUs (layers kept whole)."""
    from accelerate import dispatch_model, infer_auto_device_map
    if device_map == "auto":
        device_map = infer_auto_device_map(model, dtype=dtype,
                                           no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map=device_map)


def check_vocab(model, tokenizer, path) -> None:
    """The tokenizer must cover the embedding rows (rows may be padded up to a multiple of 64)."""
    rows = model.get_input_embeddings().weight.shape[0]
    n = len(tokenizer)
    padded = rows > n and rows % 64 == 0
    if n != rows and not padded:
        raise V2LError(f"{path}: the tokenizer has {n} tokens but the model's embedding has {rows} "
                       "rows; the tokenizer does not belong to this model, use the model's own")


def llm_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary (token strings and ids, special tokens) for manifests."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = sorted(int(i) for i in tokenizer.all_special_ids)
    blob = json.dumps([vocab, special, tokenizer.bos_token_id, tokenizer.eos_token_id],
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- Meta's format

def _meta_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's rotary layout (interleaved pairs per head) -> transformers' (two halves per head)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _meta_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of _meta_permute: transformers' layout -> Meta's."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier=None) -> int:
    """The feed-forward width Meta's LLaMA code derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_files(path: Path) -> tuple[dict, Path, list[Path]]:
    """params, tokenizer.model and the shard list of a Meta directory, checked for completeness."""
    params_file = path / "params.json"
    if not params_file.is_file():
        raise V2LError(f"{path}: incomplete Meta LLaMA directory, params.json missing; "
                       "copy it from the original download")
    try:
        params = json.loads(params_file.read_text())
    except json.JSONDecodeError as e:
        raise V2LError(f"{params_file}: not valid JSON ({e}); restore it from the original download")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise V2LError(f"{params_file}: lacks {', '.join(missing)}; not a LLaMA params.json, "
                       "restore it from the original download")
    tok = next((p for p in (path / "tokenizer.model", path.parent / "tokenizer.model")
                if p.is_file()), None)
    if tok is None:
        raise V2LError(f"{path}: tokenizer.model not found here or in the parent directory; "
                       "copy Meta's tokenizer.model next to params.json")
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise V2LError(f"{path}: no consolidated.*.pth weight shards; the download is incomplete")
    numbers = [int(p.name.split(".")[1]) if p.name.split(".")[1].isdigit() else -1 for p in shards]
    if numbers != list(range(len(shards))):
        raise V2LError(f"{path}: weight shards are numbered {numbers}, expected 0..{len(shards) - 1}; "
                       "a shard is missing, download it again")
    return params, tok, shards


def meta_config(params: dict, vocab_size: int, intermediate_size: int):
    """transformers LlamaConfig from Meta's params.json (the weights fix vocab and FFN width)."""
    from transformers import LlamaConfig
    dim, n_heads = params["dim"], params["n_heads"]
    expected = meta_intermediate_size(dim, params.get("multiple_of", 256),
                                      params.get("ffn_dim_multiplier"))
    if expected != intermediate_size:
        raise V2LError(f"params.json implies a feed-forward width of {expected} (dim, multiple_of, "
                       f"ffn_dim_multiplier) but the weights have {intermediate_size}; "
                       "params.json belongs to another model")
    if params.get("vocab_size", -1) not in (-1, vocab_size):
        raise V2LError(f"params.json says vocab_size {params['vocab_size']} but the weights have "
                       f"{vocab_size} rows; params.json belongs to another model")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=intermediate_size,
        num_hidden_layers=params["n_layers"], num_attention_heads=n_heads,
        num_key_value_heads=params.get("n_kv_heads") or n_heads,
        rms_norm_eps=params.get("norm_eps", 1e-5), max_position_embeddings=params.get("max_seq_len", 4096),
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def meta_to_hf_state_dict(shards: list[dict], params: dict) -> dict[str, torch.Tensor]:
    """Merge Meta's model-parallel shards and rename/permute them into a transformers state dict."""
    n_heads = params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    out = {}

    def merged(key: str) -> torch.Tensor:
        dim = _SHARD_DIM[key.split(".", 2)[-1] if key.startswith("layers.") else key]
        if dim is None or len(shards) == 1:
            return shards[0][key]
        return torch.cat([s[key] for s in shards], dim=dim)

    for key, name in _TOP_KEYS.items():
        out[name] = merged(key)
    for i in range(params["n_layers"]):
        for key, name in _LAYER_KEYS.items():
            w = merged(f"layers.{i}.{key}")
            if key == "attention.wq.weight":
                w = _meta_permute(w, n_heads)
            elif key == "attention.wk.weight":
                w = _meta_permute(w, n_kv)
            out[f"model.layers.{i}.{name}"] = w
    return out


def _load_meta(path: Path, dtype: torch.dtype):
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    params, tok_file, shard_files = _meta_files(path)
    shards = []
    for f in shard_files:
        try:
            shards.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # torch raises many types for a damaged archive
            raise V2LError(f"{f}: unreadable weight shard ({type(e).__name__}); download it again") from e
    emb = shards[0].get("tok_embeddings.weight")
    if emb is None:
        raise V2LError(f"{shard_files[0]}: not a LLaMA checkpoint (no tok_embeddings.weight)")
    if emb.shape[1] * len(shards) != params["dim"]:
        raise V2LError(f"{path}: {len(shards)} shard(s) hold {emb.shape[1] * len(shards)} of "
                       f"{params['dim']} embedding dims; shards are missing, download them again")
    intermediate = sum(s["layers.0.feed_forward.w1.weight"].shape[0] for s in shards)
    config = meta_config(params, emb.shape[0], intermediate)
    try:
        state = meta_to_hf_state_dict(shards, params)
    except KeyError as e:
        raise V2LError(f"{path}: weight {e} missing from the shards; the checkpoint is incomplete") from e
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers are not in checkpoints
    return model, sentencepiece_tokenizer(tok_file)


def sentencepiece_tokenizer(tok_file):
    """transformers' LlamaTokenizer built from a sentencepiece tokenizer.model (Meta's)."""
    import shutil
    import tempfile

    from transformers import LlamaTokenizer
    tok_file = Path(tok_file)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(tok_file, Path(tmp) / "tokenizer.model")
        try:
            return LlamaTokenizer.from_pretrained(tmp)
        except Exception as e:  # sentencepiece/protobuf raise assorted types on a bad file
            raise V2LError(f"{tok_file}: not a sentencepiece tokenizer model ({type(e).__name__}); "
                           "LLaMA-3 style tiktoken files are not supported, convert to Hugging Face "
                           "format instead") from e


def save_meta_llama(model, tokenizer_model_path, out_dir, n_shards: int = 1) -> Path:
    """Write a transformers Llama in Meta's original layout (params.json, consolidated.NN.pth shards,
    tokenizer.model): the inverse of the loader, for tests and for exporting."""
    import shutil
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if n_heads % n_shards or n_kv % n_shards or cfg.hidden_size % n_shards:
        raise V2LError(f"n_shards={n_shards} must divide the heads ({n_heads}), kv heads ({n_kv}) "
                       f"and width ({cfg.hidden_size})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    inverse = {v: k for k, v in _TOP_KEYS.items()}
    meta = {inverse[k]: v for k, v in sd.items() if k in inverse}
    if "output.weight" not in meta:  # tied embeddings
        meta["output.weight"] = sd["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        for key, name in _LAYER_KEYS.items():
            w = sd[f"model.layers.{i}.{name}"]
            if key == "attention.wq.weight":
                w = _meta_unpermute(w, n_heads)
            elif key == "attention.wk.weight":
                w = _meta_unpermute(w, n_kv)
            meta[f"layers.{i}.{key}"] = w
    from utils.artifacts import save_json, save_torch
    for s in range(n_shards):
        shard = {}
        for key, w in meta.items():
            dim = _SHARD_DIM[key.split(".", 2)[-1] if key.startswith("layers.") else key]
            shard[key] = w.clone() if dim is None else w.chunk(n_shards, dim=dim)[s].clone()
        save_torch(out_dir / f"consolidated.{s:02d}.pth", shard)
    dim, inter = cfg.hidden_size, cfg.intermediate_size
    params = {"dim": dim, "n_layers": cfg.num_hidden_layers, "n_heads": n_heads, "n_kv_heads": n_kv,
              "vocab_size": cfg.vocab_size, "norm_eps": cfg.rms_norm_eps,
              "rope_theta": float((cfg.rope_parameters or {}).get("rope_theta", 10000.0)),
              "multiple_of": 256}
    if meta_intermediate_size(dim, 256) != inter:  # a width Meta's rule yields with one multiple
        params["multiple_of"] = inter
        base = int(2 * (4 * dim) / 3)
        if base > inter:
            params["ffn_dim_multiplier"] = inter / base
    save_json(out_dir / "params.json", params)
    shutil.copy(tokenizer_model_path, out_dir / "tokenizer.model")
    return out_dir


# ----------------------------------------------------------------------------- token text

def token_strings(tokenizer, ids, skip_special: bool = False) -> list[str]:
    """The text each single token id stands for, as it reads inside a sentence.

    Word-initial tokens keep their leading space (sentencepiece "▁cat" and
    byte-level BPE "Ġcat" both give " cat"); decoding an id alone would drop
    it for sentencepiece, so each id is decoded after an anchor token and the
    anchor's text removed. Byte tokens give their byte (or U+FFFD when it is
    not valid UTF-8 alone). skip_special: special tokens (BOS, EOS, ...) give "".
    """
    ids = [int(i) for i in ids]
    anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    head = tokenizer.decode(anchor, **kw)
    special = set(tokenizer.all_special_ids)
    out = []
    for i in ids:
        if skip_special and i in special:
            out.append("")
            continue
        text = tokenizer.decode(anchor + [i], **kw)
        out.append(text[len(head):] if text.startswith(head) else tokenizer.decode([i], **kw))
    return out


def printable_mask(tokenizer, ids, strings: list[str] | None = None) -> list[bool]:
    """False for special/control tokens, byte tokens (<0x0A>), and text that is empty,
    whitespace only, undecodable (U+FFFD) or holds control characters."""
    ids = [int(i) for i in ids]
    strings = token_strings(tokenizer, ids) if strings is None else strings
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    out = []
    for i, piece, s in zip(ids, pieces, strings):
        ok = (i not in special and not (piece and _BYTE_TOKEN.match(piece)) and s.strip() != ""
              and "\ufffd" not in s and not any(unicodedata.category(c)[0] == "C" for c in s))
        out.append(ok)
    return out


# ----------------------------------------------------------------------------- greedy decoding

def encode_prompts(tokenizer, texts: list[str], add_bos: bool = True) -> list[list[int]]:
    """Token ids of each text, with the tokenizer's BOS first when add_bos (and it has one).

    BOS is added explicitly rather than through the tokenizer's own template so the
    behaviour is the same for every model: it mirrors Meta's ``encode(text, bos=True)``.
    """
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None:
        ids = [[bos] + x for x in ids]
    return [list(x) for x in ids]


class BatchedGreedy:
    """Greedy decoding of a batch of token-id prompts through a frozen causal LM.

    Left padding, an attention mask and explicit position ids (counting real
    tokens only), and a key/value cache of the longest token prefix the batch
    shares, computed once (and kept for the next batch with the same prefix)
    and expanded to the batch. Only the last position's logits are computed.
    Gives the same tokens as running each prompt alone (exactly so in fp32; in
    bf16/fp16 a near-tie between the top two logits can rarely flip, as with
    any change of batch shape).
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

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]):
        """Run the prompts; return (last-position logits [B, V] float32, cache, attention
        mask [B, T], next position ids [B])."""
        lengths = [len(p) for p in prompts]
        shared = 0
        if self.use_prefix_cache:
            limit = min(lengths) - 1          # every row keeps a token of its own
            while shared < limit and all(p[shared] == prompts[0][shared] for p in prompts):
                shared += 1
        suffixes = [p[shared:] for p in prompts]
        width = max(len(s) for s in suffixes)
        b, dev = len(prompts), self.device
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        pos = torch.zeros((b, width), dtype=torch.long)
        for i, s in enumerate(suffixes):
            n = len(s)
            ids[i, width - n:] = torch.tensor(s)
            mask[i, shared + width - n:] = 1
            pos[i, width - n:] = torch.arange(shared, shared + n)
        cache = self._prefix(tuple(prompts[0][:shared]), b) if shared else DynamicCache()
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = torch.tensor(lengths, device=dev)
        return out.logits[:, -1].float(), out.past_key_values, mask, nxt

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 constraints: list | None = None,
                 vocab_mask: torch.Tensor | None = None,
                 eos_id: int | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt: at most ``max_new_tokens`` tokens, stopping at
        EOS or when the row's constraint is complete. ``vocab_mask`` (bool [V]) limits every
        step to the ids it marks; ``constraints[i]`` limits row i to its trie."""
        logits, cache, mask, pos = self.prefill(prompts)
        b = len(prompts)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for step in range(max_new_tokens):
            if vocab_mask is not None:
                logits = logits.masked_fill(~vocab_mask[: logits.shape[-1]].to(logits.device),
                                            float("-inf"))
            if constraints is not None:
                allow = torch.zeros_like(logits, dtype=torch.bool)
                for i, c in enumerate(constraints):
                    if c is None:
                        allow[i] = True
                    else:  # a finished row has nothing left: any id, it is ignored
                        allow[i, c.allowed(out[i]) or [self.pad_id]] = True
                logits = logits.masked_fill(~allow, float("-inf"))
            nxt = logits.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                out[i].append(t)
                c = constraints[i] if constraints is not None else None
                if t == eos_id or (c is not None and c.finished(out[i])):
                    done[i] = True
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            res = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                             past_key_values=cache, use_cache=True)
            cache, pos, logits = res.past_key_values, pos + 1, res.logits[:, -1].float()
        return [[t for t in row if t != eos_id] for row in out]



@torch.no_grad()
def greedy_next_tokens(model, token_lists: list[list[int]], batch_size: int = 64,
                       pad_id: int = 0, share_prefix: bool = True, progress: bool = False) -> torch.Tensor:
    """The greedy (argmax) next token after each prompt: LongTensor [N] on CPU.

    Prompts are sorted by length so that a batch holds similar lengths, then
    run through ``BatchedGreedy.prefill``.
    """
    if any(len(t) == 0 for t in token_lists):
        raise V2LError("an empty prompt has no next token; every prompt needs at least one token")
    decoder = BatchedGreedy(model, pad_id, prefix_cache=share_prefix)
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    out = torch.empty(len(token_lists), dtype=torch.long)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="greedy", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        out[idx] = decoder.prefill([token_lists[i] for i in idx])[0].argmax(-1).cpu()
    return out


# ----------------------------------------------------------------------------- vocabulary expansion

def prompt_text(template: str, text: str) -> str:
    """The prompt for a token's text: ``template`` with ``text`` in place of {}.

    One leading space is dropped first, so " cat" (a word-initial token) and
    "cat" both read "a photo of cat", as in the authors' prompts (sentencepiece
    drops that space when decoding a sequence that starts with the token).
    """
    return template.format(text[1:] if text.startswith(" ") else text)


def expand_tokens(model, tokenizer, subwords: list[str], template: str = "a photo of {}",
                  add_bos: bool = True, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """For each subword s1: the greedy token after the prompt of s1 (next1, text s2), then the
    greedy token after the prompt of s1 + s2 re-tokenised as text (next2). Returns (next1, next2)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    first = greedy_next_tokens(model, encode_prompts(
        tokenizer, [prompt_text(template, s) for s in subwords], add_bos), batch_size, pad)
    s2 = token_strings(tokenizer, first, skip_special=True)
    second = greedy_next_tokens(model, encode_prompts(
        tokenizer, [prompt_text(template, a + b) for a, b in zip(subwords, s2)], add_bos),
        batch_size, pad)
    return first, second
