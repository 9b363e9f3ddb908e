"""Step 1: batched greedy decoding equals the one-prompt-at-a-time loop; the script's
artifact, its resume after a stop, 2-process sharding, and its errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_llm import make_tiny_llama, reference_expand, reference_next_tokens

from engine.greedy import greedy_next_tokens
from engine.vocabulary import expand_tokens, prompt_text
from models.llm import encode_prompts, load_llm, resolve_dtype, token_strings
from utils.artifacts import load_tensors, read_manifest
from utils.errors import V2LError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "step1_expand_vocabulary.py"


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("step1") / "llama", "meta", n_shards=2)


@pytest.fixture(scope="module")
def llm(llm_dir):
    return load_llm(llm_dir, device="cpu")


def test_prompt_text_drops_one_leading_space():
    assert prompt_text("a photo of {}", " cat sitting") == "a photo of cat sitting"
    assert prompt_text("a photo of {}", "ing") == "a photo of ing"
    assert prompt_text("a photo of {}", "  x") == "a photo of  x"


def test_batched_greedy_equals_one_prompt_at_a_time(llm):
    tok = llm.text_tokenizer
    words = token_strings(tok, range(0, len(tok), 8))
    texts = [prompt_text("a photo of {}", w) for w in words] + ["cat", "a", "the dog is 2024 big"]
    prompts = encode_prompts(tok, texts)
    assert len({len(p) for p in prompts}) > 3          # really mixed lengths, so padding happens
    want = reference_next_tokens(llm.model, prompts)
    for batch_size, share in [(64, True), (7, True), (50, False)]:
        got = greedy_next_tokens(llm.model, prompts, batch_size=batch_size, share_prefix=share)
        assert torch.equal(got, want), (batch_size, share)


def test_expand_equals_the_literal_per_prompt_scheme(llm):
    subwords = token_strings(llm.text_tokenizer, range(260, 300))
    got = expand_tokens(llm.model, llm.text_tokenizer, subwords, batch_size=16)
    want = reference_expand(llm.model, llm.text_tokenizer, subwords)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(set(got[0].tolist())) > 5               # not a degenerate constant model


def _run(args, tmp_path, torchrun=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(launcher + [SCRIPT, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _artifact(out):
    return (Path(out, "vocab.json").read_bytes(), Path(out, "vocab_tokens.safetensors").read_bytes())


@pytest.mark.slow
def test_script_stopped_then_resumed_on_two_ranks_matches_one_uninterrupted_run(llm_dir, llm, tmp_path):
    common = ["--llm", llm_dir, "--vocab_limit", "100", "--chunk_size", "32", "--batch_size", "16"]
    full = tmp_path / "full"
    r = _run(common + ["--out_dir", str(full)], tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(full, "vocab")
    assert manifest["info"]["llm_fingerprint"] == llm.fingerprint
    vocab = json.loads((full / "vocab.json").read_text())
    tokens = load_tensors(full / "vocab_tokens.safetensors")
    assert vocab["ids"] == list(range(100)) and tokens["ids"].tolist() == vocab["ids"]
    assert vocab["subword"] == token_strings(llm.text_tokenizer, range(100))
    s2 = token_strings(llm.text_tokenizer, tokens["next1"], skip_special=True)
    assert vocab["bigram"] == [a + b for a, b in zip(vocab["subword"], s2)]
    assert not vocab["printable"][1] and not any(vocab["printable"][3:259])   # BOS, byte tokens
    assert not list(full.glob(".chunks-*"))                                     # cleaned up

    part = tmp_path / "part"
    ids_file = tmp_path / "ids.json"                     # the same 100 ids, shuffled, repeated
    ids_file.write_text(json.dumps({"ids": list(range(99, -1, -1)) + [5, 7]}))
    common = common[:2] + ["--vocab_ids", str(ids_file)] + common[4:]
    r = _run(common + ["--out_dir", str(part), "--max_chunks", "1"], tmp_path)
    assert r.returncode == 2 and "stopped by --max_chunks 1 with 1 of 4 chunks done" in r.stderr, r.stderr
    assert not (part / "manifest.json").exists() and not (part / "vocab.json").exists()
    r = _run(common + ["--out_dir", str(part)], tmp_path, torchrun=True)   # resume, on 2 ranks
    assert r.returncode == 0, r.stderr
    assert _artifact(part) == _artifact(full)


def test_script_stopped_with_chunks_missing_exits_nonzero_with_one_line(llm_dir, tmp_path):
    out = tmp_path / "part"
    r = _run(["--llm", llm_dir, "--vocab_limit", "40", "--chunk_size", "16", "--batch_size", "16",
              "--max_chunks", "1", "--out_dir", str(out)], tmp_path)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopped by --max_chunks 1 with 1 of 3 chunks done" in errors[0] \
        and "rerun the same command to continue" in errors[0], r.stderr
    assert not (out / "manifest.json").exists() and len(list(out.glob(".chunks-*/chunk*"))) == 1


def test_auto_precision_is_the_authors_fp16_on_a_gpu_fp32_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # as on an H100
    assert resolve_dtype("auto", "cuda:3") == torch.float16
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cuda") == torch.bfloat16          # still there when asked for
    script = _script_module([], monkeypatch)
    assert script.DTYPE == "auto"


def test_script_bad_inputs_fail_with_one_line(llm_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "consolidated.00.pth").symlink_to(Path(llm_dir) / "consolidated.00.pth")
    r = _run(["--llm", str(broken), "--out_dir", str(tmp_path / "b")], tmp_path)
    assert r.returncode == 2 and "params.json missing" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def _script_module(argv, monkeypatch):
    """Import the script (it keeps its defaults when imported), then set these flags."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("step1_under_test", ROOT / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.configure(vars(module), argv)
    return module


@pytest.mark.parametrize("content,message", [
    ("[3, 1, 3, 2]", None), ('{"ids": [7, 0]}', None), ("[1, 400]", "in \\[0, 400\\)"),
    ("[]", "non-empty"), ('{"ids": ["a"]}', "list of token ids"), ("{oops", "unreadable")])
def test_vocab_ids_file(tmp_path, monkeypatch, content, message):
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(content)
    script = _script_module(["--vocab_ids", str(ids_file)], monkeypatch)
    if message is None:
        assert script.selected_ids(400) == sorted(set(json.loads(content) if content[0] == "["
                                                      else json.loads(content)["ids"]))
    else:
        with pytest.raises(V2LError, match=message):
            script.selected_ids(400)
    assert _script_module(["--vocab_limit", "5"], monkeypatch).selected_ids(400) == list(range(5))
