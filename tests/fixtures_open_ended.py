"""Shared setup for the captioning and VQA tests: a small demo world, a tiny LLM, a tiny
tokenizer, and a helper that runs a top-level script in this process."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_setup(tmp: Path) -> dict[str, str]:
    """{"world", "llm", "tokenizer"}: a 2 colour x 2 shape demo world (4 train and 3 val
    images per class, 48 px), a tiny random Llama (context 256) and a tiny V2L tokenizer."""
    from demo.world import write_world
    from fixtures_tokenizer import make_tiny_tokenizer
    from models.tokenizer_io import save_tokenizer
    from tiny_llm import make_tiny_llama
    write_world(tmp / "world", seed=0, train_per_class=4, val_per_class=3, size=48,
                colours=["red", "blue"], shapes=["circle", "square"], photos=False, style="smooth")
    llm = make_tiny_llama(tmp / "llm", fmt="hf")
    tokenizer, _, _ = make_tiny_tokenizer(tmp / "tok")
    save_tokenizer(tokenizer, tmp / "tokenizer")
    return {"world": str(tmp / "world"), "llm": llm, "tokenizer": str(tmp / "tokenizer")}


def run_script(name: str, args: list[str], monkeypatch) -> None:
    """Run a top-level script in this process (saves the interpreter start-up)."""
    monkeypatch.setattr(sys, "argv", [name] + args)
    runpy.run_path(str(ROOT / name), run_name="__main__")
