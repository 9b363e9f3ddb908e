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
``printable_mask`` (which ids are real text), ``encode_segment`` (the ids of one
prompt segment exactly as Meta's ``Tokenizer.encode``) and ``encode_prompts``. Meta's
layout is converted in ``models/meta_llama.py``, which also attaches a sentencepiece
``tokenizer.model`` to a text tokenizer; decoding is ``engine/greedy.py``.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from models.llava_dirs import refuse_llava_as_llm
from models.meta_llama import SENTENCEPIECE_ATTR, attach_sentencepiece, load_meta
from utils.dist import native_bf16
from utils.errors import V2LError

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class LLM:
    """A frozen causal LM (eval mode, no gradients) with its text tokenizer."""
    model: torch.nn.Module          # transformers causal LM
    text_tokenizer: object          # transformers tokenizer: text <-> the LLM's token ids
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
        return len(self.text_tokenizer)


# ----------------------------------------------------------------------------- loading

LLM_DTYPES = ("fp16", "bf16", "fp32", "auto")   # an evaluation's LLM precision; fp16 is the authors'
def cpu_native_bf16(device="cpu") -> bool:
    """Whether this CPU computes a bf16 LLM natively (``utils.dist.native_bf16``, the one rule
    every stage uses)."""
    return native_bf16(device)


def llm_dtype(name: str, device) -> str:
    """The LLM precision an evaluation runs at. On a GPU: ``name`` (fp16, the authors', bf16 or
    fp32; auto: fp16). On a CPU: bf16 when asked for (bf16 or auto) and the CPU computes it
    natively (``cpu_native_bf16``: several times faster there), otherwise fp32 (fp16 matmuls
    are slow on CPUs, and emulated bf16 slower than fp32)."""
    if name not in LLM_DTYPES:
        raise V2LError(f"--llm_dtype {name!r} unknown; use {', '.join(LLM_DTYPES)} (fp16: the paper)")
    if torch.device(device).type != "cpu":
        return "fp16" if name == "auto" else name
    return "bf16" if name in ("bf16", "auto") and cpu_native_bf16(device) else "fp32"


def resolve_dtype(dtype, device) -> torch.dtype:
    """None/"auto": fp16 on a GPU (the authors' precision), fp32 elsewhere; bf16 only when
    asked for (its rounding can flip a near-tie greedy pick)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
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
        refuse_llava_as_llm(path)       # a LLaVA is not a causal LM: one line naming --llava
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

    dtype: None/"auto" (fp16 on GPU, fp32 on CPU), "fp32", "fp16", "bf16" or a torch dtype.
    device: None (CUDA when available, else CPU) or a device; ignored with device_map. The
    weights are read straight onto it (Meta's shards memory-mapped and converted one weight at
    a time; transformers' loader with the device as its device map).
    device_map: e.g. "auto" to spread a model too large for one GPU over all visible GPUs.
    """
    fmt, path = detect_format(path)
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = resolve_dtype(dtype, device)
    if fmt == "meta":
        model, tokenizer = load_meta(path, torch_dtype, "cpu" if device_map else device)
        check_vocab(model, tokenizer, path)
        if device_map:
            model = _dispatch(model, device_map, torch_dtype)
    else:     # weights straight to the device (no whole model in host memory first)
        model, tokenizer = _load_transformers(path, fmt, torch_dtype,
                                              device_map or {"": str(torch.device(device))})
        check_vocab(model, tokenizer, path)
        if fmt == "hf":
            attach_sentencepiece(tokenizer, path / "tokenizer.model")
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


# ----------------------------------------------------------------------------- prompt ids
#
# The authors build every prompt by concatenating the ids of its segments, each from
# Meta's Tokenizer.encode, i.e. sentencepiece's own encode: it puts its dummy-prefix
# space in front of EVERY segment, so " >" is ["▁", "▁>"] and "  " three "▁".
# transformers' LLaMA tokenizers (Metaspace, prepend_scheme "first") skip that prefix
# when the text already starts with a space: " >" becomes ["▁>"], one id short.

_SWALLOWS_SPACE: dict[int, tuple[object, bool]] = {}


def _swallows_leading_space(text_tokenizer) -> bool:
    """True for sentencepiece-style tokenizers (a dummy "▁" prefix on "a") that add no
    prefix when the text starts with a space (" a" tokenises like "a")."""
    key = id(text_tokenizer)
    if key not in _SWALLOWS_SPACE or _SWALLOWS_SPACE[key][0] is not text_tokenizer:
        bare = text_tokenizer.encode("a", add_special_tokens=False)
        spaced = text_tokenizer.encode(" a", add_special_tokens=False)
        prefixed = text_tokenizer.convert_ids_to_tokens(bare[:1])[0].startswith("▁")
        _SWALLOWS_SPACE[key] = (text_tokenizer, prefixed and spaced == bare)
    return _SWALLOWS_SPACE[key][1]


def encode_segment(text_tokenizer, text: str) -> list[int]:
    """The ids of one prompt segment (no BOS/EOS) as Meta's ``Tokenizer.encode(text, bos=False,
    eos=False)``: sentencepiece's encode, dummy prefix included, for every segment.

    Uses the attached sentencepiece processor when there is one (Meta directories; HF
    directories that ship tokenizer.model); else, for a sentencepiece-style transformers
    tokenizer that swallows the prefix before a leading space, restores it by adding the
    space it would have added. Byte-level BPE tokenizers (no dummy prefix) encode as is.
    """
    sp = getattr(text_tokenizer, SENTENCEPIECE_ATTR, None)
    if sp is not None:
        return list(sp.encode(text))
    if text.startswith(" ") and _swallows_leading_space(text_tokenizer):
        text = " " + text
    return list(text_tokenizer.encode(text, add_special_tokens=False))


def encode_prompts(text_tokenizer, texts: list[str], add_bos: bool = True) -> list[list[int]]:
    """Token ids of each text (one segment each, see :func:`encode_segment`), with the
    tokenizer's BOS first when add_bos (and it has one).

    BOS is added explicitly rather than through the tokenizer's own template so the
    behaviour is the same for every model: it mirrors Meta's ``encode(text, bos=True)``.
    """
    bos = text_tokenizer.bos_token_id
    head = [bos] if add_bos and bos is not None else []
    return [head + encode_segment(text_tokenizer, t) for t in texts]
