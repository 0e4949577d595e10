"""docs/ARCHITECTURE.md against the code: the layout table names exactly the modules and
packages in src/outlierlab; every signature in its "Signatures" block is the code's
(``inspect.signature``); its run-folder tree lists exactly the names ``run_folder.py`` defines;
and no module but ``run_folder.py`` spells a run-folder file name."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _table_entries() -> set[str]:
    section = _section(DOC.read_text(), "Layout")
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


# -- signatures -----------------------------------------------------------------------------------


def documented_signatures(text: str) -> list[tuple[str, str]]:
    """``(dotted name, parameters)`` of each line of the fenced block under "## Signatures"
    (``outlierlab.x.f(a, b=1, *, c=None)``; a line may end in ``-> ...`` and a ``#`` comment)."""
    block = _section(text, "Signatures").split("```", 2)[1]
    found = []
    for line in block.splitlines()[1:]:
        line = line.split("  #", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([\w.]+)\((.*)\)(?:\s*->.*)?", line)
        assert m, f"not a signature line: {line!r}"
        found.append((m[1], m[2]))
    return found


def _resolve(dotted: str):
    """The object ``dotted`` names (the longest importable module, then attributes); whether
    it is a function reached through a class (its ``self`` is then left out)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        owner = obj
        for name in parts[i:]:
            owner, obj = obj, getattr(obj, name)
        return obj, inspect.isclass(owner) and not inspect.isclass(obj)
    raise ImportError(dotted)


def code_parameters(dotted: str) -> str:
    """The parameters of ``dotted`` as the doc writes them: names, defaults (``repr``), ``*``,
    ``/``, ``*args``, ``**kwargs``; no annotations; ``self`` left out."""
    obj, method = _resolve(dotted)
    if isinstance(obj, property):
        raise TypeError(f"{dotted} is a property, not a callable")
    params = list(inspect.signature(obj).parameters.values())
    if method and params and params[0].name in ("self", "cls"):
        params = params[1:]
    out, star = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
        else:
            out.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
        if p.kind is p.POSITIONAL_ONLY and (params[-1] is p or params[params.index(p) + 1].kind
                                            is not p.POSITIONAL_ONLY):
            out.append("/")
    return ", ".join(out)


def signature_mismatches(text: str) -> list[str]:
    """One line per documented signature that is not the code's."""
    bad = []
    for dotted, params in documented_signatures(text):
        try:
            actual = code_parameters(dotted)
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            bad.append(f"{dotted}: {type(exc).__name__}: {exc}")
            continue
        if " ".join(params.split()) != actual:
            bad.append(f"{dotted}: documented ({params}), code ({actual})")
    return bad


def test_documented_signatures_are_the_codes():
    text = DOC.read_text()
    assert len(documented_signatures(text)) >= 20
    assert signature_mismatches(text) == []


@pytest.mark.parametrize("old, new", [
    ("save(step, last_step=False)", "save(step)"),  # a parameter dropped
    ("keep=1", "keep=2"),  # a default changed
    ("Trainer.validate()", "Trainer.evaluate()"),  # a renamed method
])
def test_a_changed_signature_fails_the_check(old, new):
    text = DOC.read_text()
    head, block = text.split("## Signatures", 1)
    assert old in _section(text, "Signatures")
    mutated = head + "## Signatures" + block.replace(old, new, 1)
    assert len(signature_mismatches(mutated)) == 1


# -- the run-folder layout ------------------------------------------------------------------------


def _run_folder_names() -> dict[str, str]:
    from outlierlab import run_folder
    from outlierlab.data.tokenizer import TOKENIZER_FILE

    names = {k: v for k, v in vars(run_folder).items()
             if re.fullmatch(r"[A-Z_]+_(FILE|DIR|LOG|STATE)", k) and isinstance(v, str)}
    return {**names, "TOKENIZER_FILE": TOKENIZER_FILE}


def test_the_documented_run_folder_tree_is_run_folder_py():
    text = _section(DOC.read_text(), "Run folder")
    tree = text.split("RUN_DIR/", 1)[1].split("```", 1)[0]
    top = {re.split(r"[/ ]", line.strip(), maxsplit=1)[0]
           for line in tree.splitlines() if re.match(r"^  \S", line)}
    names = _run_folder_names()
    inside = {"CHECKPOINT_STATE", "OPTIM_FILE", "MODEL_CONFIG_FILE", "HF_CONFIG_FILE"}
    expected = {v for k, v in names.items() if k not in inside}
    assert top == expected
    for k in inside:  # the files of a checkpoint (and the final model's config)
        assert names[k] in tree, k


EXCLUSIVE = ("status.json", "metrics.jsonl", "optim.pt", "model_config.json", "sweep.log",
             "checkpoints", ".tmp-step-", ".old-step-", "config.json", "state.json")
ALLOWED = {("data/corpus.py", "state.json")}  # a `datasets` folder's own state file


def _string_literals(path: Path):
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                    ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr)
                  and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings):
            yield node.lineno, node.value


def test_only_run_folder_py_spells_run_folder_file_names():
    pkg = ROOT / "src" / "outlierlab"
    found = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if rel == "run_folder.py":
            continue
        for line, value in _string_literals(path):
            if value in EXCLUSIVE and (rel, value) not in ALLOWED:
                found.append(f"{rel}:{line}: {value!r}")
    assert found == []
