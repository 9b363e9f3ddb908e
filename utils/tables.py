"""Result tables: every stage's results.md (and results.csv) from rows of formatted cells.

    files = write_table(OUT_DIR, ["task", "psnr"], [["inpainting", "27.1"]], csv=True)

A stage formats its own cells (percentages, intervals, empty for a missing value);
this module only lays them out, writes them atomically and prints the Markdown.
"""
from __future__ import annotations

from pathlib import Path

from utils.artifacts import save_text


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(out_dir, columns: list[str], rows: list[list[str]], csv: bool = False,
                note: str = "") -> list[str]:
    """Write ``results.md`` (the table, then ``note`` if any) and, with ``csv``, ``results.csv``
    under ``out_dir``; print the Markdown; return the file names written."""
    out = Path(out_dir)
    md = markdown_table(columns, rows)
    save_text(out / "results.md", md + (f"\n\n{note}" if note else "") + "\n")
    files = ["results.md"]
    if csv:
        save_text(out / "results.csv",
                  "\n".join(",".join(str(c) for c in row) for row in [columns] + rows) + "\n")
        files.append("results.csv")
    print(md)
    return files
