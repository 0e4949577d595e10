"""docs/ARCHITECTURE.md's layout table names exactly the modules and packages in src/outlierlab."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _table_entries() -> set[str]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([\w/.]+)` \|", section, flags=re.M))


def _tree_entries() -> set[str]:
    pkg = ROOT / "src" / "outlierlab"
    names = {p.name for p in pkg.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    names |= {f"{p.name}/" for p in pkg.iterdir() if p.is_dir() and p.name != "__pycache__"}
    return names


def test_layout_table_matches_the_tree():
    table, tree = _table_entries(), _tree_entries()
    assert table - tree == set(), f"documented but absent: {sorted(table - tree)}"
    assert tree - table == set(), f"present but undocumented: {sorted(tree - table)}"
