"""The named constants at the top of a script become its command-line flags.

A script declares its defaults nanoGPT-style, one per line, with the help text
as a trailing comment::

    BATCH_SIZE = 64          # prompts per forward pass
    OUT_DIR = "out/vocab"    # where the artifact is written

and calls ``cfg = configure(globals())``. Every UPPER_CASE literal assignment
becomes ``--batch_size`` / ``--out_dir``; the comment is its ``--help`` line,
the module docstring the description. Values typed on the command line are
parsed with the type of the default (bool accepts true/false/1/0, ``none``
gives None, a list default takes several values). The script's globals are
updated in place, and the returned dict is what goes into the manifest.
"""
from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from typing import Any, Callable

from utils.errors import V2LError


NOT_GIVEN = object()   # argparse default marking a flag absent from the command line


def _comments_by_line(source: str) -> tuple[dict[int, str], set[int]]:
    """Comment text by line number, and the lines that hold nothing but a comment."""
    out, alone = {}, set()
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
            if lines[tok.start[0] - 1].lstrip().startswith("#"):
                alone.add(tok.start[0])
    return out, alone


def _constants(source: str) -> list[tuple[str, Any, str]]:
    """(name, default, help) for each top-level UPPER_CASE literal assignment."""
    comments, alone = _comments_by_line(source)
    found = []
    for node in ast.parse(source).body:
        if any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "configure"
               for n in ast.walk(node)):
            break  # the settings block ends where the script reads its flags
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if not (isinstance(target, ast.Name) and target.id.isupper()):
            continue
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue  # computed values are not user settings
        help_text = "" if node.lineno in alone else comments.get(node.lineno, "")
        # a comment block directly above the constant also counts
        line = node.lineno - 1
        above = []
        while line in alone:
            above.insert(0, comments[line])
            line -= 1
        help_text = " ".join(filter(None, above + [help_text]))
        found.append((target.id, value, help_text))
    return found


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _typed(default: Any) -> Callable[[str], Any]:
    if isinstance(default, bool):
        return _parse_bool
    kind = type(default)

    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        if kind is float:
            return float(text)
        if kind is int:
            return int(text)
        if default is None:  # an optional setting: a number when it reads as one (MAX_IMAGES = None)
            for number in (int, float):
                try:
                    return number(text)
                except ValueError:
                    pass
        return text
    return parse


def build_parser(source: str, description: str | None) -> tuple[argparse.ArgumentParser, list]:
    constants = _constants(source)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default, help_text in constants:
        flag = "--" + name.lower()
        shown = f"{help_text} (default: {default!r})".replace("%", "%%")  # argparse formats help
        if isinstance(default, (list, tuple)):
            elem = default[0] if default else ""
            parser.add_argument(flag, dest=name, nargs="*", type=_typed(elem), default=NOT_GIVEN,
                                help=shown, metavar=name)
        elif isinstance(default, bool):
            parser.add_argument(flag, dest=name, nargs="?", const=True, type=_parse_bool,
                                default=NOT_GIVEN, help=shown, metavar="BOOL")
        else:
            parser.add_argument(flag, dest=name, type=_typed(default), default=NOT_GIVEN,
                                help=shown, metavar=name)
    return parser, constants


def configure(script_globals: dict, argv: list[str] | None = None) -> dict:
    """Override the calling script's constants from the command line; return them all."""
    path = script_globals["__file__"]
    with open(path, encoding="utf-8") as f:
        source = f.read()
    parser, constants = build_parser(source, script_globals.get("__doc__"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config = {}
    for name, default, _ in constants:
        value = getattr(args, name)
        if value is NOT_GIVEN:      # (a typed "none" is a real None, not "use the default")
            value = default
        elif isinstance(default, tuple):
            value = tuple(value)
        script_globals[name] = value
        config[name.lower()] = value
    return config


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's main: a V2LError becomes one clear line on stderr and exit status 2."""
    try:
        main()
    except V2LError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed chunks are kept; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)
