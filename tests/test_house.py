"""House rules checked over the project's own source.

- Imports go one way: no circle among the project's modules, counting imports made inside
  functions (a lazy import hides a circle from Python, not from the design).
- Code comments and docstrings quote no measured result (a PSNR, an accuracy, a speed-up, a
  time per step): measurements belong in README.md, where their run is described. Settings and
  constants (``default 4.5e-4``, ``100 of 1,281,167`` images, ``identical -> 100 dB``) are not
  measurements and may stay.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "engine", "data", "utils", "demo", "bench")


def project_files() -> dict[str, Path]:
    """Dotted module name -> file, for the packages and the top-level scripts."""
    files = {p.stem: p for p in REPO.glob("*.py")}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = p.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = p
    return files


# ----------------------------------------------------------------------------- import circles

def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (functions included)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()

    def project_module(dotted: str) -> str | None:   # the longest project module it names
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
        return None

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".") if package else []
                anchor = anchor[:len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import f``, mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            module = project_module(target) if target else None
            if module is not None and module != name:
                found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> b -> ... -> a) per strongly connected group of modules (Tarjan)."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle_in(graph, group) for group in groups]


def _circle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest circle through the group's first module (breadth-first within the group)."""
    start = min(group)
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(group)


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "models.meta_llama" in graph["models.llm"]
    assert "models.tokenizer" in graph["engine.tokenizer_build"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_project_modules():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------- measured numbers

NUM = r"\d+(?:[.,]\d+)*"
RANGE = rf"{NUM}(?:\s*(?:-|–|to)\s*{NUM})?"
MEASURED = re.compile("|".join([
    rf"\d+\.\d+\s*dB\b",                                               # 26.17 dB (100 dB: a convention)
    rf"{RANGE}\s*%(?!\s*(?:Wilson|percentile|bootstrap|confidence|intervals?|CI)\b)",  # 79.7% (95% CI: a setting)
    rf"{RANGE}\s*(?:x|×|times)\s+(?:faster|slower|quicker|speed-?up|less|more|fewer)\b",  # 2-4x faster
    rf"\d+\.\d+(?:\s*(?:-|–)\s*\d+\.\d+)?\s*[x×](?!\w)",               # 1.55-1.69x
    rf"{RANGE}\s*(?:s|ms|sec|secs|seconds?|min|mins|minutes?|h|hours?)\s*(?:/\s*|(?:per|an?|each)\s+)\w",
    rf"{RANGE}\s*(?:min|mins|minutes?|hours?)\b",                      # 13.1 min
    rf"{RANGE}\s*(?:images|imgs|img|it|its|steps|tokens|samples|prompts|episodes)\s*/\s*s\b",
    rf"\d+\.\d+\s*(?:GiB|GB|MiB|MB)\b",                                 # 12.3 GiB of memory
    rf"\d+\.\d+\s+vs\.?\s+\d+\.\d+",                                    # 0.863 vs 0.508
    rf"\b(?:PSNR|SSIM|LPIPS|FID|CIDEr|BLEU)[\w-]*\s*(?:of\s+)?[:=]?\s*\d+\.\d+",  # PSNR-Y 27.65
]), re.IGNORECASE)


@pytest.mark.parametrize("text", [
    "27.65 vs 26.17 dB PSNR-Y", "reaches 26.17 dB", "1.55-1.69x", "a 1.6x speed-up",
    "0.30 s per step", "0.3 s/step", "retention 79.7%", "(54% vs 79%)", "35% less time",
    "ran 2-4x faster", "3 times faster", "13.1 min", "(< 1 min)", "120 images/s",
    "used 12.3 GiB", "SSIM 0.863 vs 0.508", "PSNR 27.65",
])
def test_the_rule_catches_measurements(text):
    assert MEASURED.search(text), text


@pytest.mark.parametrize("text", [
    "(default 4.5e-4)", "lr 4.5e-4", "100 of 1,281,167", "Identical images count as 100 dB.",
    "95% Wilson score interval", "with 95%\nintervals", "a 95% percentile bootstrap interval",
    "sigma 1.5, K1 = 0.01", "centre crop 256 x 256", "4 x squared error", "conv4x4/1",
    "3 x LLaMA-2's 32000", "several times faster", "0.1 LPIPS", "v0.1 heads", "(p 0.5)",
    "138 at rate 0.5 with k = 21", "Adam (0.5, 0.9, eps 1e-7)", "80 prompt templates",
])
def test_the_rule_spares_constants(text):
    assert not MEASURED.search(text), text


def comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(first line, text) of each docstring and each block of consecutive comment lines."""
    source = path.read_text(encoding="utf-8")
    out, block, last = [], [], None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.start[0]
        if block and line != last + 1:
            out.append((block[0][0], "\n".join(t for _, t in block)))
            block = []
        block.append((line, tok.string.lstrip("#")))
        last = line
    if block:
        out.append((block[0][0], "\n".join(t for _, t in block)))
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.append((body[0].value.lineno, body[0].value.value))
    return out


def test_no_measured_number_in_comments_or_docstrings():
    hits = []
    for path in sorted(project_files().values()):
        for first, text in comments_and_docstrings(path):
            for m in MEASURED.finditer(text):
                line = first + text.count("\n", 0, m.start())
                quote = text.splitlines()[text.count("\n", 0, m.start())].strip()
                hits.append(f"{path.relative_to(REPO)}:{line}: {m.group(0)!r} in {quote!r}")
    assert hits == [], ("measured numbers in code comments or docstrings (they belong in "
                        "README.md):\n" + "\n".join(hits))
