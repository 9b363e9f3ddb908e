"""Flags from constants (utils/cli.py): one test per rule in its docstring, then every script."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.cli import build_parser, configure, settings_of
from utils.errors import V2LError
from utils.stages import ALL, PIPELINE

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([p.name for p in REPO.glob("*.py")] + [f"bench/{p.name}" for p in (REPO / "bench").glob("bench_*.py")]
                 + ["demo/setup.py"])
CODE_PACKAGES = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()) + ["tests"]

SCRIPT = '''"""A toy stage."""
import os

# how many rows per chunk
CHUNK = 64  # rows per chunk
NAME = "abc"  # a name
FLAG = False  # a flag
OPT = None  # an optional path
LIMIT: int | None = None  # an optional count
KS = (5, 21)  # exactly two values
LEVELS: tuple[int, ...] = (1, 2)  # one or more values
TASKS = ["a", "b"]  # any number of values
RATE = 1.5  # a float, 100% of it
settings = configure(globals())
AFTER = 3  # set after the flags are read: not a setting
'''


def toy(tmp_path, text=SCRIPT):
    script = tmp_path / "toy.py"
    script.write_text(text)
    return {"__file__": str(script), "__doc__": "A toy stage."}


def settings_error(body: str, tail: str = "settings = configure(globals())\n") -> str:
    with pytest.raises(V2LError) as e:
        settings_of("import os\n" + body + tail, "toy.py")
    return str(e.value)


def test_types_follow_the_defaults(tmp_path):
    g = toy(tmp_path)
    settings = configure(g, ["--chunk", "3", "--flag", "--opt", "p", "--ks", "1", "2", "--rate", "5",
                        "--tasks", "c", "--levels", "1", "2", "4"])
    assert settings == {"chunk": 3, "name": "abc", "flag": True, "opt": "p", "limit": None,
                   "ks": (1, 2), "levels": (1, 2, 4), "tasks": ["c"], "rate": 5.0}
    assert g["CHUNK"] == 3 and g["KS"] == (1, 2) and type(g["RATE"]) is float
    assert configure(g, [])["chunk"] == 64 and "after" not in settings
    with pytest.raises(SystemExit):
        configure(g, ["--chunk", "x"])
    with pytest.raises(SystemExit):
        configure(g, ["--chunk", "2.5"])
    for text, value in [("false", False), ("0", False), ("yes", True), ("on", True)]:
        assert configure(g, ["--flag", text])["flag"] is value
    with pytest.raises(SystemExit):
        configure(g, ["--flag", "maybe"])


def test_none_default_is_a_string_unless_annotated(tmp_path):
    g = toy(tmp_path)
    assert configure(g, ["--opt", "123"])["opt"] == "123"   # a path named 123 stays a path
    assert configure(g, ["--opt", "none"])["opt"] is None
    assert configure(g, ["--limit", "123"])["limit"] == 123
    assert configure(g, ["--limit", "null"])["limit"] is None
    with pytest.raises(SystemExit):
        configure(g, ["--limit", "many"])


def test_none_is_a_word_for_strings_and_an_error_for_numbers(tmp_path):
    g = toy(tmp_path)
    assert configure(g, ["--name", "none"])["name"] == "none"   # e.g. --amp none
    with pytest.raises(SystemExit):
        configure(g, ["--chunk", "none"])


def test_tuples_take_exactly_their_count_lists_any(tmp_path, capsys):
    g = toy(tmp_path)
    with pytest.raises(SystemExit):
        configure(g, ["--ks", "1"])          # Adam would get a 1-tuple
    with pytest.raises(SystemExit):
        configure(g, ["--ks", "1", "2", "3"])
    with pytest.raises(SystemExit):
        configure(g, ["--levels"])           # tuple[int, ...]: one or more
    assert configure(g, ["--tasks"])["tasks"] == []
    assert configure(g, ["--tasks", "x", "y", "z"])["tasks"] == ["x", "y", "z"]


def test_help_shows_type_and_default():
    help_text = " ".join(build_parser(SCRIPT, "A toy stage.")[0].format_help().split())
    for shown in ["how many rows per chunk: --chunk INT rows per chunk (int; default: 64)",
                  "a name (str; default: 'abc')", "a flag (bool; default: False)",
                  "an optional path (str or none; default: None)",
                  "an optional count (int or none; default: None)",
                  "exactly two values (2 x int; default: (5, 21))",
                  "one or more values (one or more int; default: (1, 2))",
                  "any number of values (list of str; default: ['a', 'b'])",
                  "a float, 100% of it (float; default: 1.5)", "A toy stage."]:
        assert shown in help_text, shown
    assert "--after" not in help_text


def test_a_comment_line_is_a_section_title_not_help():
    """A comment on its own line titles the settings below it in --help; it never leaks into
    the next flag's help (it did: a section header ended up in one flag's help)."""
    source = ("import os\nA = 1  # first\n# -- the ablations\nB = 2  # second\n"
              "C = 3  # third\n\n# -- logging\n# (rank 0 only)\nD = 4  # fourth\ncfg = configure(globals())\n")
    found = {s.name: s for s in settings_of(source)}
    assert [found[n].help for n in "ABCD"] == ["first", "second", "third", "fourth"]
    assert [found[n].section for n in "ABCD"] == ["", "-- the ablations", "-- the ablations",
                                                   "-- logging (rank 0 only)"]
    help_text = build_parser(source, None)[0].format_help().split("options:")[1]
    assert "-- the ablations:" in help_text and "-- logging (rank 0 only):" in help_text
    assert help_text.index("-- the ablations:") < help_text.index("--b INT") < help_text.index("--d INT")


def test_a_documented_none_must_work():
    """A help that offers none as a value belongs to an optional flag (--split none used to
    give the string "none" and a folder DATA_DIR/none)."""
    assert "documents none" in settings_error('SPLIT = "train"  # sub-folder (none: the root)\n')
    assert "documents none" in settings_error('N = 0  # none: no limit\n')
    ok = 'import os\nSPLIT: str | None = "train"  # sub-folder (none: the root)\n' \
         'AMP = "bf16"  # "none" turns it off, or bf16\ncfg = configure(globals())\n'
    assert [s.optional for s in settings_of(ok)] == [True, False]


def test_an_imported_script_keeps_its_defaults(tmp_path, monkeypatch):
    """configure() reads sys.argv only for __main__: a script's functions can be imported."""
    g = toy(tmp_path) | {"__name__": "toy"}
    monkeypatch.setattr(sys, "argv", ["pytest", "--chunk", "7", "--unknown"])
    assert configure(g)["chunk"] == 64 and g["CHUNK"] == 64
    assert configure(g, ["--chunk", "7"])["chunk"] == 7 and g["CHUNK"] == 7


def test_a_computed_constant_is_an_error():
    assert "LR = 0.0001 * 8 is not a literal" in settings_error("LR = 1e-4 * 8  # rate\n")
    assert "toy.py:2" in settings_error("LR = 1e-4 * 8\n")


def test_only_settings_between_imports_and_configure():
    assert "only settings" in settings_error("A = 1\nx = 2\n")
    assert "only settings" in settings_error("A, B = 1, 2\n")
    assert "only settings" in settings_error("A = B = 1\n")
    assert "only settings" in settings_error("print('hi')\n")
    # a literal UPPER_CASE constant above the imports would silently not be a flag
    with pytest.raises(V2LError, match="above the imports"):
        settings_of("A = 1\nimport os\nB = 2\ncfg = configure(globals())\n", "toy.py")
    # a computed one there is fine (e.g. ROOT = Path(__file__)... before sys.path setup)
    assert [s.name for s in settings_of("ROOT = os.getcwd()\nimport os\nB = 2\n"
                                        "settings = configure(globals())\n")] == ["B"]


def test_configure_must_be_one_top_level_statement():
    assert "no configure(globals()) call" in settings_error("A = 1\n", tail="")
    assert "not inside a function" in settings_error(
        "A = 1\n", tail="def main():\n    settings = configure(globals())\n")
    assert "not inside a function" in settings_error(
        "A = 1\n", tail="if True:\n    settings = configure(globals())\n")
    assert [s.name for s in settings_of("import os\nA = 1\nconfigure(globals())\n")] == ["A"]
    assert [s.name for s in settings_of("import os\nA = 1\ncfg = cli.configure(globals())\n")] == ["A"]


def test_unsupported_defaults_and_annotations():
    assert "tuple of them" in settings_error("A = {'a': 1}\n")
    assert "must all be" in settings_error("A = [1, 'x']\n")
    assert "unsupported annotation" in settings_error("A: dict = None\n")
    assert "annotated int" in settings_error("A: int = 'x'\n")
    assert "annotated as a list" in settings_error("A: list[int] = None\n")
    assert settings_of("import os\nA: list[int] = []\ncfg = configure(globals())\n")[0].kind is int
    assert settings_of("import os\nA = []\ncfg = configure(globals())\n")[0].kind is str


def test_a_bad_settings_block_is_one_line_at_run_time(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom utils.cli import configure\n"
                      "LR = 1e-4 * 8  # rate\ncfg = configure(globals())\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"error: {script}:4: LR = 0.0001 * 8 is not a literal, so it cannot be a flag; write its "
        "value (e.g. 8e-4, not 1e-4 * 8), or compute it below configure()"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_declares_valid_settings(script):
    source = (REPO / script).read_text()
    if "configure(globals())" not in source:
        pytest.skip("no flags")
    for s in settings_of(source, script):
        # defaults must not point into the code packages (data/, models/, ...)
        if isinstance(s.default, str) and not os.path.isabs(s.default) and "/" in s.default:
            assert s.default.split("/")[0] not in CODE_PACKAGES, (script, s.name, s.default)


def test_script_defaults_match_the_stage_registry():
    """A stage's script writes to out/<its dir> by default, and reads its inputs from theirs."""
    dirs = {f"out/{s.out_dir}" for s in ALL}
    for stage in PIPELINE:
        settings = {s.name: s.default for s in settings_of((REPO / stage.script).read_text())}
        assert settings["OUT_DIR"] == f"out/{stage.out_dir}", stage
        for name, value in settings.items():
            if name.endswith("_DIR") and isinstance(value, str) and value.startswith("out/"):
                assert value in dirs, (stage.script, name, value)


HELP_DRIVER = """
import contextlib, io, json, runpy, sys
out = {}
for script in sys.argv[1:]:
    buf, code = io.StringIO(), None
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(buf):
            if script == "demo/setup.py":
                runpy.run_module("demo.setup", run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    except BaseException as e:
        code = repr(e)
    out[script] = [code, buf.getvalue()]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_script_help_runs():
    """`--help` of every script (and python -m demo.setup) prints and exits 0: each run as its
    own __main__ (runpy) in one process, so torch and transformers are imported once."""
    scripts = [s for s in SCRIPTS if "configure(globals())" in (REPO / s).read_text()]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", HELP_DRIVER, *scripts], cwd=REPO, capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(scripts)
    for script in scripts:
        code, text = results[script]
        assert code in (0, None), (script, code, text[-2000:])
        first = ast.get_docstring(ast.parse((REPO / script).read_text())).splitlines()[0]
        assert first.split()[0] in text and "default:" in text, script


@pytest.mark.parametrize("stage, settings, says", [
    ("llava_voco", {"micro_batch": 16, "batch_size": 128}, "lower --micro_batch (now 16)"),
    ("eval_llava", {"batch_size": 8}, "lower --batch_size (now 8): the results do not depend on it"),
    ("voco", {"batch_size": 8}, "--batch_size 8 is the training's own (lowering it changes the run)"),
    ("tokenizer", {"batch_size": 8}, "it is per process"),
])
def test_out_of_memory_is_one_line_naming_the_setting(tmp_path, capsys, stage, settings, says):
    import torch
    from utils.cli import run_main
    from utils.stages import ALL

    def main():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has "
                                     "a total capacity of 79.11 GiB of which 1.02 GiB is free")
    entry = next(s for s in ALL if s.id == stage)
    with pytest.raises(SystemExit) as done:
        run_main(main, entry, settings | {"out_dir": str(tmp_path / "out")})
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of device memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in err[0], err
    assert says in err[0], err


def test_other_errors_are_not_taken_for_out_of_memory():
    from utils.cli import run_main

    def main():
        raise RuntimeError("something else")
    with pytest.raises(RuntimeError, match="something else"):
        run_main(main)
