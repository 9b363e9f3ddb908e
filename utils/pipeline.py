"""run.sh's view of the stage registry (utils/stages.py) and of what is on disk.

    python -m utils.pipeline shell                 # bash declarations for run.sh
    python -m utils.pipeline table                 # the pipeline's stages and directories
    python -m utils.pipeline check STAGE_ID ARGS   # exit 0 when the stage's artifact is current
                                                   # for these script arguments, else 1 and why

``check`` reads the settings the stage's script would run with (utils/cli.py
``parse_settings``: the script is parsed, not imported, so no model library loads)
and asks ``utils.artifacts.stale_reason``: the script itself makes the same
decision when run on its own (``run_main``).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from utils.artifacts import stale_reason
from utils.cli import parse_settings
from utils.stages import BY_ID, PIPELINE

REPO = Path(__file__).resolve().parent.parent


def shell() -> str:
    """bash declarations for run.sh: STAGE_IDS (pipeline order) and, by id, STAGE_SCRIPT,
    STAGE_DIR (under OUT) and STAGE_TITLE."""
    q = shlex.quote
    lines = ["STAGE_IDS=(" + " ".join(q(s.id) for s in PIPELINE) + ")"]
    for name, field in (("STAGE_SCRIPT", "script"), ("STAGE_DIR", "out_dir"), ("STAGE_TITLE", "title")):
        pairs = " ".join(f"[{q(s.id)}]={q(getattr(s, field))}" for s in PIPELINE)
        lines.append(f"declare -A {name}=({pairs})")
    return "\n".join(lines)


def table() -> str:
    """The pipeline as run.sh --help lists it."""
    width = max(len(s.script) for s in PIPELINE)
    return "\n".join(f"  {s.script:<{width}}  {s.out_dir + '/':<21} {s.what}" for s in PIPELINE)


def check(stage_id: str, args: list[str]) -> str | None:
    """None when the stage's artifact is current for ``args``; else why it must run."""
    stage = BY_ID[stage_id]
    values = parse_settings(REPO / stage.script, args)
    settings = {name.lower(): value for name, value in values.items()}
    return stale_reason(settings["out_dir"], stage, settings)


def main(argv: list[str]) -> int:
    if argv == ["shell"]:
        print(shell())
        return 0
    if argv == ["table"]:
        print(table())
        return 0
    if len(argv) >= 2 and argv[0] == "check" and argv[1] in BY_ID:
        why = check(argv[1], argv[2:])
        if why is not None:
            print(why)
        return 0 if why is None else 1
    print("usage: python -m utils.pipeline shell | table | check STAGE_ID [script arguments]\n"
          f"stage ids: {', '.join(s.id for s in PIPELINE)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
