"""README's code map names every module of the packages, and nothing that is not there."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "engine", "data", "demo", "utils")


def test_code_map_matches_the_tree():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    mapped = set(re.findall(r"^\| `((?:%s)/\w+\.py)` \|" % "|".join(PACKAGES), readme, re.M))
    tree = {str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).glob("*.py")
            if p.name != "__init__.py"}
    assert sorted(tree - mapped) == [], "modules missing from README's code map"
    assert sorted(mapped - tree) == [], "README's code map names modules that do not exist"


def test_every_top_level_script_is_in_the_layout_table():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    scripts = sorted(p.name for p in REPO.glob("*.py"))
    assert [s for s in scripts if f"`{s}`" not in readme] == []
