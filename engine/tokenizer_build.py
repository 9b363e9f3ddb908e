"""Step 4's starting point: a fresh V2L tokenizer on the codebooks of step 2 and step 3.

``tokenizer_from_artifacts`` reads the step-2 artifact (``codebook/``: the local
codebook and the LLM ids of its rows) and the step-3 artifact (``global/``: the
filtered global codebook and its strings), checks from their manifests that the
global codebook was filtered from this local codebook, and builds the network
(``models.tokenizer``). Saving and loading a tokenizer is ``models.tokenizer_io``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from models.clip import ClipBundle
from models.tokenizer import TokenizerConfig, V2LTokenizer
from utils.artifacts import load_json, load_tensors, read_manifest, require_input
from utils.errors import V2LError
from utils.stages import CODEBOOK, GLOBAL


def tokenizer_from_artifacts(codebook_dir, global_dir, clip: ClipBundle | None,
                             **config_overrides) -> V2LTokenizer:
    """A fresh tokenizer on the codebooks of step 2 (``codebook/``) and step 3 (``global/``)."""
    codebook_manifest = read_manifest(codebook_dir, CODEBOOK)
    global_manifest = read_manifest(global_dir, GLOBAL)
    require_input(global_manifest, "codebook", codebook_manifest, f"global codebook {global_dir}")
    local = _read_tensors(Path(codebook_dir) / "local_codebook.safetensors", ("embeddings", "llm_ids"))
    glob = _read_tensors(Path(global_dir) / "global_codebook.safetensors", ("embeddings",))
    strings = load_json(Path(global_dir) / "global_strings.json").get("strings")
    if strings is None:
        raise V2LError(f"{global_dir}/global_strings.json has no 'strings' list; "
                       "rerun step3_codebook_filtering.py")
    made_with = codebook_manifest.get("config", {})
    config_overrides.setdefault("clip_spec", made_with.get("clip", TokenizerConfig.clip_spec))
    config_overrides.setdefault("clip_pretrained", made_with.get("clip_pretrained"))
    embedded_with = codebook_manifest.get("info", {}).get("clip")
    if clip is not None and embedded_with not in (None, clip.ident):
        print(f"warning: the codebook was embedded with CLIP {embedded_with}, the global tokens "
              f"will use {clip.ident}", file=sys.stderr)
    config = TokenizerConfig.from_dict(config_overrides)
    local_codebook = local["embeddings"]
    if config.local_codebook == "random":     # the authors' ablation: no language in the codes
        local_codebook = random_like_rows(local_codebook)
    return V2LTokenizer(config, local_codebook, local["llm_ids"], glob["embeddings"], strings, clip)


def random_like_rows(codebook: torch.Tensor) -> torch.Tensor:
    """Random directions (torch's global RNG) with the norms of ``codebook``'s rows."""
    directions = torch.nn.functional.normalize(torch.randn(codebook.shape), dim=-1)
    return directions * codebook.float().norm(dim=-1, keepdim=True)


def _read_tensors(path: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        tensors = load_tensors(path)
    except Exception as e:  # noqa: BLE001 - a missing or corrupt file gets the same advice
        raise V2LError(f"{path}: unreadable ({str(e).splitlines()[0]}); rerun the stage that made it")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise V2LError(f"{path}: missing tensor(s) {missing}; rerun the stage that made it")
    return tensors
