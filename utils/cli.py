"""The named constants at the top of a script become its command-line flags.

A script declares its defaults nanoGPT-style, one per line, with the help text
as a trailing comment (a comment block directly above a constant is added to it)::

    import ...

    BATCH_SIZE = 64                  # prompts per forward pass
    OUT_DIR = "out/vocab"            # where the artifact is written
    MAX_IMAGES: int | None = None    # stop after this many images (none: all)

    settings = configure(globals())

Rules (tests/test_cli.py holds one test per rule):

* The settings are the statements between the script's last top-level import
  and one top-level ``settings = configure(globals())`` (or a bare
  ``configure(globals())``). A comment on a line of its own there is a section
  title: ``--help`` lists the settings below it under that title (it is never
  part of a flag's help). Only UPPER_CASE assignments may stand there; each
  becomes ``--lower_case_name``. Anything else there, an UPPER_CASE literal
  above the imports (it would silently not be a flag), no top-level call, or
  a call inside a function or an ``if`` is an error naming the line.
  Constants computed from others belong below the configure() call.
* A default must be a literal (number, string, True/False, None, or a list or
  tuple of them): ``LR = 1e-4 * 8`` is an error; write ``LR = 8e-4``.
* The type of a flag is the type of its default: int, float (an integer typed
  on the command line is accepted), str, bool (true/false, 1/0, yes/no, on/off;
  a bare ``--flag`` means true).
* ``None`` as a default: the flag is a string unless an annotation declares
  another type (``X: int | None = None``, also float, str, bool). The words
  ``none``/``null`` give None only for such optional flags (a default of None
  or an annotation with ``| None``); for a str flag ``none`` is the string
  "none" (``--amp none``), for an int flag it is an error. A help text that
  documents none as a value (``(none: all)``, ``none: ...``) must belong to an
  optional flag, so that a documented value always works; a string choice
  named none is written quoted (``"none" keeps the rate``).
* A list default takes any number of values, zero included (``--tasks a b``);
  a tuple default takes exactly as many values as it has (``--betas 0.5`` is an
  error for ``BETAS = (0.5, 0.9)``), or one or more with an annotation
  ``tuple[int, ...]``. Elements have the type of the first element (all must
  share it; an empty default holds strings unless annotated ``list[int]``).
* ``--help`` shows each flag's help, type and default, and the module docstring.

``configure`` updates the script's globals in place and returns the settings
(lower-case names) for the manifest. It reads the command line only when the
script runs as ``__main__``: an imported script keeps its defaults, so its
functions can be imported and called (``configure(vars(module), argv)`` sets
other values). ``parse_settings`` gives the same settings for a script file
and an argument list without running it (run.sh's freshness check).
"""
from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from typing import Any, Callable

from utils.errors import V2LError


NOT_GIVEN = object()   # argparse default marking a flag absent from the command line
# "(none: all)", "none: ...", "; none: ...": the help says that none is a value of the flag
DOCUMENTS_NONE = re.compile(r"(?:^|[(;,]\s*)none\s*:")
SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass
class Setting:
    name: str                 # the constant, e.g. BATCH_SIZE
    default: Any
    help: str
    kind: type                # int, float, str or bool: the type of the value (of each element)
    optional: bool = False    # accepts none/null (a None default or "T | None")
    container: type | None = None   # list or tuple
    count: int | None = None  # a tuple's exact number of values (None: any)
    section: str = ""         # the title of the comment line above its block ("" before any)

    @property
    def flag(self) -> str:
        return "--" + self.name.lower()

    def type_text(self) -> str:
        text = self.kind.__name__
        if self.container is list:
            text = f"list of {text}"
        elif self.container is tuple:
            text = f"{self.count} x {text}" if self.count is not None else f"one or more {text}"
        return text + (" or none" if self.optional else "")


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


def _is_configure_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and (getattr(node.func, "id", None) == "configure"
                                           or getattr(node.func, "attr", None) == "configure")


def _annotation(node: ast.expr | None, where: str) -> tuple[type | None, bool, type | None, bool]:
    """(element kind, optional, container, any count) from an annotation such as
    ``int | None``, ``list[int]``, ``tuple[float, ...]``."""
    if node is None:
        return None, False, None, False
    fail = V2LError(f"{where}: unsupported annotation {ast.unparse(node)!r}; use int, float, str, "
                    "bool, 'T | None', list[T], tuple[T, ...]")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        sides = [node.left, node.right]
        nones = [s for s in sides if isinstance(s, ast.Constant) and s.value is None]
        if len(nones) != 1:
            raise fail
        kind, _, container, any_count = _annotation(sides[0] if sides[1] in nones else sides[1], where)
        return kind, True, container, any_count
    if isinstance(node, ast.Name) and node.id in SCALARS:
        return SCALARS[node.id], False, None, False
    if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) in ("list", "tuple"):
        container = list if node.value.id == "list" else tuple
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        any_count = (container is tuple and len(args) == 2 and isinstance(args[1], ast.Constant)
                     and args[1].value is Ellipsis)
        if not (len(args) == 1 and container is list or any_count):
            raise fail
        kind, optional, inner, _ = _annotation(args[0], where)
        if optional or inner is not None:
            raise fail
        return kind, False, container, any_count
    raise fail


def _setting(name: str, default: Any, help_text: str, annotation: ast.expr | None,
             where: str) -> Setting:
    kind, optional, container, any_count = _annotation(annotation, where)
    if isinstance(default, (list, tuple)):
        if container is not None and container is not type(default):
            raise V2LError(f"{where}: {name} is annotated {container.__name__} but its default is a "
                           f"{type(default).__name__}")
        kinds = {type(v) for v in default}
        if len(kinds) > 1 or kinds - set(SCALARS.values()):
            raise V2LError(f"{where}: {name}'s values must all be int, all float, all str or all "
                           f"bool, not {sorted(k.__name__ for k in kinds)}")
        found = kinds.pop() if kinds else None
        if kind is not None and found is not None and found is not kind:
            raise V2LError(f"{where}: {name} is annotated with {kind.__name__} values but holds "
                           f"{found.__name__}")
        kind = kind or found or str
        count = None if (isinstance(default, list) or any_count) else len(default)
        return Setting(name, default, help_text, kind, False, type(default), count)
    if container is not None:
        raise V2LError(f"{where}: {name} is annotated as a {container.__name__} but its default "
                       f"is {default!r}; give a {container.__name__} default")
    if default is None:
        return Setting(name, None, help_text, kind or str, True)
    if type(default) not in SCALARS.values():
        raise V2LError(f"{where}: {name} = {default!r}: a setting is a number, a string, "
                       "True/False, None, or a list or tuple of them")
    if kind is not None and kind is not type(default) and not (kind is float and type(default) is int):
        raise V2LError(f"{where}: {name} is annotated {kind.__name__} but its default is "
                       f"{default!r}")
    return Setting(name, default, help_text, kind or type(default), optional)


def settings_of(source: str, filename: str = "<script>") -> list[Setting]:
    """The settings a script declares, by the rules in the module docstring."""
    comments, alone = _comments_by_line(source)
    body = ast.parse(source).body
    call = next((i for i, node in enumerate(body)
                 if any(_is_configure_call(n) for n in ast.walk(node))), None)
    if call is None:
        raise V2LError(f"{filename}: no configure(globals()) call at the top level; call it once, "
                       "right below the settings")
    node = body[call]
    if not (isinstance(node, (ast.Assign, ast.Expr)) and _is_configure_call(node.value)):
        raise V2LError(f"{filename}:{node.lineno}: call configure(globals()) as a statement of "
                       "its own at the top level (cfg = configure(globals())), right below the "
                       "settings, not inside a function or a condition")
    imports = [i for i in range(call) if isinstance(body[i], (ast.Import, ast.ImportFrom))]
    start = imports[-1] + 1 if imports else 0
    for node in body[:start]:
        names = [n for n in _assigned_names(node) or [] if n.isupper()]
        if names and _literal(node.value) is not NOT_GIVEN:
            raise V2LError(f"{filename}:{node.lineno}: {names[0]} is set above the imports and "
                           "so would not be a flag; move it below the last import (a setting) "
                           "or below configure() (not a setting)")
    found, section = [], ""
    previous_end = (body[start - 1].end_lineno or body[start - 1].lineno) + 1 if start else 1
    for node in body[start:call]:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a string standing alone documents the block
        names = _assigned_names(node)
        if (names is None or len(names) != 1 or not names[0].isupper()
                or (isinstance(node, ast.AnnAssign) and node.value is None)):
            raise V2LError(
                f"{filename}:{node.lineno}: only settings (NAME = literal, one per line) may "
                "stand between the imports and configure(); move other code below configure()")
        name, where = names[0], f"{filename}:{node.lineno}"
        default = _literal(node.value)
        if default is NOT_GIVEN:
            raise V2LError(f"{where}: {name} = {ast.unparse(node.value)} is not a literal, so it "
                           "cannot be a flag; write its value (e.g. 8e-4, not 1e-4 * 8), or "
                           "compute it below configure()")
        titles = [comments[n] for n in range(previous_end, node.lineno) if n in alone]
        if titles:
            section = " ".join(titles)
        previous_end = (node.end_lineno or node.lineno) + 1
        help_text = comments.get(node.lineno, "") if node.lineno not in alone else ""
        annotation = node.annotation if isinstance(node, ast.AnnAssign) else None
        setting = _setting(name, default, help_text, annotation, where)
        if DOCUMENTS_NONE.search(help_text) and not setting.optional:
            raise V2LError(f"{where}: {name}'s help documents none as a value, but "
                           f"--{name.lower()} none would be the string 'none'; annotate it "
                           f"'{setting.kind.__name__} | None' (or quote a string choice: \"none\")")
        setting.section = section
        found.append(setting)
    return found


def _assigned_names(node: ast.AST) -> list[str] | None:
    """The names a plain assignment sets (several for A = B = 1); None for any other statement,
    including assignments to anything but bare names (A, B = ..., sys.path[:0] = ...)."""
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign):
        targets = [node.target]
    else:
        return None
    if not all(isinstance(t, ast.Name) for t in targets):
        return None
    return [t.id for t in targets]


def _literal(node: ast.expr | None):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return NOT_GIVEN


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parser_for(setting: Setting) -> Callable[[str], Any]:
    base = {bool: _parse_bool, int: int, float: float, str: str}[setting.kind]

    def parse(text: str):
        if setting.optional and text.strip().lower() in ("none", "null"):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {setting.type_text()}, got {text!r}") from None
    parse.__name__ = setting.kind.__name__   # argparse names the type in its error message
    return parse


def build_parser(source: str, description: str | None,
                 filename: str = "<script>") -> tuple[argparse.ArgumentParser, list[Setting]]:
    settings = settings_of(source, filename)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for s in settings:
        if s.section not in groups:
            groups[s.section] = parser.add_argument_group(s.section) if s.section else parser
        group = groups[s.section]
        shown = (f"{s.help} ({s.type_text()}; default: {s.default!r})").strip()
        shown = shown.replace("%", "%%")  # argparse formats help strings
        metavar = s.kind.__name__.upper() + ("|none" if s.optional else "")
        kwargs = dict(dest=s.name, type=_parser_for(s), default=NOT_GIVEN, help=shown,
                      metavar=metavar)
        if s.container is list:
            group.add_argument(s.flag, nargs="*", **kwargs)
        elif s.container is tuple:
            group.add_argument(s.flag, nargs=s.count if s.count is not None else "+", **kwargs)
        elif s.kind is bool and not s.optional:
            group.add_argument(s.flag, nargs="?", const=True, **kwargs)
        else:
            group.add_argument(s.flag, **kwargs)
    return parser, settings


def parse_settings(path, argv: list[str], description: str | None = None) -> dict[str, Any]:
    """A script's settings (UPPER_CASE names) for a command line, without running the script.
    A mistake in the script's settings block is one line on stderr and exit status 2; a bad
    command line is argparse's usage error."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        parser, settings = build_parser(source, description, str(path))
    except V2LError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    args = parser.parse_args(argv)
    values = {}
    for s in settings:
        value = getattr(args, s.name)
        if value is NOT_GIVEN:      # (a typed "none" is a real None, not "use the default")
            value = s.default
        elif s.container is not None:
            value = s.container(value)
        values[s.name] = value
    return values


def configure(script_globals: dict, argv: list[str] | None = None) -> dict:
    """Override the calling script's constants from the command line (only when the script
    runs as __main__, or from ``argv`` when given); return them all, lower-case named."""
    if argv is None:
        argv = sys.argv[1:] if script_globals.get("__name__", "__main__") == "__main__" else []
    values = parse_settings(script_globals["__file__"], argv, script_globals.get("__doc__"))
    script_globals.update(values)
    return {name.lower(): value for name, value in values.items()}


def run_main(main: Callable[[], Any], stage=None, settings: dict | None = None) -> None:
    """Run a script's main: a V2LError becomes one clear line on stderr and exit status 2.

    With ``stage`` (a utils.stages entry) and the script's ``settings``, the stage is skipped
    when ``settings["out_dir"]`` already holds a current artifact (utils/artifacts.py
    ``stale_reason``: same settings, inputs unchanged up the chain); a stale one loses its
    manifest first, so that it reads as unfinished until it is rebuilt."""
    try:
        if stage is not None and not needs_run(stage, settings):
            return
        main()
    except V2LError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        line = out_of_memory_line(e, stage, settings or {})
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed chunks are kept; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)


# stages whose --batch_size is the training's own: what to do instead of lowering it
TRAINING = {"tokenizer": "it is per process: use devices with more memory",
            "voco": "use more processes (a step's episodes are shared out) or devices with more memory",
            "voco_video": "use more processes (a step's questions are shared out) or devices with more memory"}


def out_of_memory_line(e: BaseException, stage, settings: dict) -> str | None:
    """One line for a device out-of-memory error, naming the setting that lowers the memory
    and what changing it does; None for any other error."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(e, torch.OutOfMemoryError):
        return None
    what = ". ".join(str(e).split(". ")[:2]).strip().rstrip(".")[:200]
    if "micro_batch" in settings:
        fix = (f"lower --micro_batch (now {settings['micro_batch']}): the gradient is accumulated "
               "over a step's micro-batches, so the result does not change")
    elif "batch_size" in settings and stage is not None and stage.id in TRAINING:
        fix = (f"--batch_size {settings['batch_size']} is the training's own (lowering it changes "
               f"the run); {TRAINING[stage.id]}")
    elif "batch_size" in settings:
        fix = f"lower --batch_size (now {settings['batch_size']}): the results do not depend on it"
    else:
        fix = "free the device of other jobs or use one with more memory"
    return f"out of device memory ({what}); {fix}; rerun to resume from what was saved"


def needs_run(stage, settings: dict) -> bool:
    """False (and one line) when the stage's artifact is current; else True, after rank 0 has
    removed a stale artifact's manifest."""
    import os
    from pathlib import Path

    from utils.artifacts import MANIFEST, stale_reason
    out = Path(settings["out_dir"])
    why = stale_reason(out, stage, settings)
    main_rank = os.environ.get("RANK", "0") == "0"
    if why is None:
        if main_rank:
            print(f"{out}: up to date (same settings, same inputs); nothing to do")
        return False
    if (out / MANIFEST).is_file() and main_rank:
        print(f"{out}: rebuilding: {why}", file=sys.stderr)
        (out / MANIFEST).unlink()
    return True
