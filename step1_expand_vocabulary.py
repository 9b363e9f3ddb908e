"""Step 1: expand the frozen LLM's vocabulary into subwords, bigrams and trigrams.

For every token id t: s1 = the text of t; the frozen LLM reads "a photo of
{s1}" and greedily picks ONE next token, s2; it then reads "a photo of
{s1 + s2}" (the text, re-tokenised) and picks one more, s3. The triple
(s1, s1+s2, s1+s2+s3) of every id is written to OUT_DIR/vocab.json; the ids
of the two greedy tokens to vocab_tokens.safetensors.

VOCAB_IDS (a JSON list of ids) or VOCAB_LIMIT restrict the run to some ids
(quick runs, demos); "ids" in vocab.json says which, and row i of every later
codebook is LLM token ids[i].

Token texts keep their word boundaries (" cat" + " sitting" = " cat sitting";
the authors' per-token decoding dropped the space and produced "catsitting").
Each prompt starts with the tokenizer's BOS token, as the authors' Meta
encode(bos=True) does (ADD_BOS). Byte and control tokens are kept in id order
but flagged printable=false; later stages leave them out of the global words.

Prompts are batched (sorted by length, left-padded, the shared "a photo of"
prefix computed once and reused from the KV cache) and give the same greedy
tokens as the authors' one-prompt-at-a-time loop. Work is saved in chunks: a
killed run resumes, and under torchrun the chunks are shared between ranks
(the same artifact for any number of processes; several nodes need one output
folder shared by all of them). A run that ends with chunks missing (--max_chunks)
exits with status 2 and says so; rerun the same command to continue.

DTYPE auto runs the LLM in fp16 on a GPU, as the authors did, and fp32 on a CPU.
bf16 can be chosen, but where two next tokens are nearly tied its rounding can
pick the other one: the vocabulary then differs from the authors' in places.

    python step1_expand_vocabulary.py --llm llama-2-7b --out_dir out/vocab
    torchrun --nproc_per_node 8 step1_expand_vocabulary.py --llm llama-2-7b
"""
import hashlib
import json

import torch
from tqdm import tqdm

from engine.vocabulary import expand_tokens
from models.llm import load_llm, printable_mask, token_strings
from utils import dist
from utils.artifacts import ChunkStore, load_json, save_json, save_tensors, write_manifest
from utils.cli import configure, run_main
from utils.errors import V2LError
from utils.stages import VOCAB

LLM = None  # the frozen LLM: Hugging Face dir, Meta LLaMA dir (consolidated.*.pth + params.json) or .gguf
OUT_DIR = "out/vocab"  # where the vocab artifact is written
PROMPT = "a photo of {}"  # prompt template; {} becomes the subword (then the bigram)
ADD_BOS = True  # start each prompt with the tokenizer's BOS token (as the authors' Meta encode(bos=True))
VOCAB_LIMIT = 0  # expand only the first N token ids (0: the whole vocabulary); for quick runs
VOCAB_IDS = ""  # JSON file with the token ids to expand ({"ids": [...]} or a list); "" = VOCAB_LIMIT
BATCH_SIZE = 128  # prompts per forward pass
CHUNK_SIZE = 2048  # token ids per saved chunk (the resume granularity)
MAX_CHUNKS = 0  # stop after this many chunks per process (0: no limit; rerun to continue)
DTYPE = "auto"  # auto: fp16 on a GPU (the authors'), fp32 on a CPU; or fp32, fp16, bf16
DEVICE = "auto"  # auto (CUDA when available), cuda or cpu
DEVICE_MAP = None  # "auto" spreads a model too large for one GPU over all GPUs (one process only)

settings = configure(globals())


def main():
    if LLM is None:
        raise V2LError("--llm is required: a Hugging Face model dir, Meta's LLaMA-2 dir "
                       "(consolidated.*.pth, params.json, tokenizer.model) or a .gguf file")
    if "{}" not in PROMPT:
        raise V2LError(f"--prompt {PROMPT!r} has no {{}} where the token text goes")
    ddp = dist.init(DEVICE, OUT_DIR)
    if DEVICE_MAP and ddp.active:
        raise V2LError("--device_map spreads one model over all GPUs; run one process, not torchrun")
    llm = load_llm(LLM, dtype=DTYPE, device=ddp.device, device_map=DEVICE_MAP)
    text_tokenizer = llm.text_tokenizer
    ids = selected_ids(llm.vocab_size)
    subwords = token_strings(text_tokenizer, ids)
    key = {"llm": llm.fingerprint, "weights": llm.ident, "prompt": PROMPT, "add_bos": ADD_BOS,
           "ids": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
           "dtype": str(next(llm.model.parameters()).dtype)}
    store = ChunkStore(OUT_DIR, len(ids), CHUNK_SIZE, key)

    todo = store.todo(ddp.rank, ddp.world)
    todo = todo[:MAX_CHUNKS] if MAX_CHUNKS > 0 else todo
    for i in tqdm(todo, desc=f"step1 rank {ddp.rank}", disable=not ddp.is_main):
        lo, hi = store.bounds(i)
        next1, next2 = expand_tokens(llm.model, text_tokenizer, subwords[lo:hi], PROMPT, ADD_BOS, BATCH_SIZE)
        store.save(i, {"next1": next1, "next2": next2})
    dist.barrier(ddp, "every rank's chunks")

    # rank 0 counts the chunks on disk; every rank gets its count, so all stop together
    missing = dist.all_gather_objects(store.n_chunks - store.n_done() if ddp.is_main else 0, ddp)[0]
    if missing:
        done = f"{store.n_chunks - missing} of {store.n_chunks} chunks done in {store.dir}"
        if MAX_CHUNKS > 0:
            dist.fail_once_per_node(ddp, f"stopped by --max_chunks {MAX_CHUNKS} with {done}; no "
                                         "vocabulary yet: rerun the same command to continue")
        dist.fail_once_per_node(ddp, f"{done} after every rank finished its share: the ranks do "
                                     "not write into one folder; all nodes need one output folder "
                                     "shared by all of them (a network file system; OUT in run.sh)")

    def finish():
        write_vocab(llm, ids, subwords, store.gather())
        store.cleanup()
    dist.wait_for_main(ddp, finish, "the vocabulary's files")
    dist.shutdown(ddp)


def selected_ids(vocab_size: int) -> list[int]:
    """The token ids to expand, in increasing order: VOCAB_IDS, else the first VOCAB_LIMIT, else all."""
    if not VOCAB_IDS:
        return list(range(min(VOCAB_LIMIT, vocab_size) if VOCAB_LIMIT > 0 else vocab_size))
    if VOCAB_LIMIT > 0:
        raise V2LError("--vocab_ids and --vocab_limit both set; use one of them")
    try:
        data = load_json(VOCAB_IDS)
    except (OSError, ValueError) as e:
        raise V2LError(f"--vocab_ids {VOCAB_IDS}: unreadable ({e}); pass a JSON file of token ids")
    ids = data.get("ids") if isinstance(data, dict) else data
    if not isinstance(ids, list) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise V2LError(f"--vocab_ids {VOCAB_IDS}: needs a non-empty list of token ids in "
                       f"[0, {vocab_size}) (a list, or {{\"ids\": [...]}})")
    return sorted(set(ids))


def write_vocab(llm, ids: list[int], subwords: list[str], tokens: dict) -> None:
    """vocab.json (the strings), vocab_tokens.safetensors (the ids), then the manifest."""
    text_tokenizer = llm.text_tokenizer
    s2 = token_strings(text_tokenizer, tokens["next1"], skip_special=True)
    s3 = token_strings(text_tokenizer, tokens["next2"], skip_special=True)
    bigram = [a + b for a, b in zip(subwords, s2)]
    printable = printable_mask(text_tokenizer, ids, subwords)
    save_json(f"{OUT_DIR}/vocab.json", {
        "ids": ids, "subword": subwords, "bigram": bigram,
        "trigram": [b + c for b, c in zip(bigram, s3)], "printable": printable})
    save_tensors(f"{OUT_DIR}/vocab_tokens.safetensors",
                 {"ids": torch.tensor(ids, dtype=torch.long), "next1": tokens["next1"],
                  "next2": tokens["next2"]})
    write_manifest(OUT_DIR, VOCAB, settings, ["vocab.json", "vocab_tokens.safetensors"],
                   info={"llm": llm.ident, "llm_fingerprint": llm.fingerprint, "prompt": PROMPT,
                         "vocab_size": len(ids), "printable": sum(printable),
                         "llm_vocab_size": llm.vocab_size,
                         "dtype": str(next(llm.model.parameters()).dtype)})
    print(f"wrote {OUT_DIR}: {len(ids)} tokens ({sum(printable)} printable)")


if __name__ == "__main__":
    run_main(main, VOCAB, settings)
