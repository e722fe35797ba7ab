"""The one direction of imports: errors < quant < kernels < nn < io < {data, model} < train < cli.

Every module of src/nibble is parsed with ``ast``; every import, at module level or inside a function,
must point to its own package or to a layer below. The base layer is the two top-level modules every
layer may use, ``nibble.errors`` and ``nibble.devices`` (which raises NibbleError, so it sits just above
errors); ``nibble/__init__.py`` (the package's lazy public face) and ``nibble/__main__.py`` (``python -m
nibble``) sit above the CLI. And every module is named in docs/architecture.md, the map of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nibble"
MAP = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
ORDER = ["errors", "quant", "kernels", "nn", "io", "data|model", "train", "cli"]
RANK = {name: rank for rank, names in enumerate(ORDER) for name in names.split("|")}
RANK.update({"devices": RANK["errors"] + 0.5, "__init__": len(ORDER), "__main__": len(ORDER)})


def layer_of(module: str) -> str | None:
    """``nibble.quant.nf4`` -> ``quant``; None for the bare package ``nibble``."""
    parts = module.split(".")
    if parts[0] != "nibble" or len(parts) == 1:
        return None
    return parts[1]


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``tree`` (relative imports resolved against ``package``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
    return found


def violations(path: str, source: str) -> list[str]:
    """The imports of the file ``path`` (relative to src/nibble) that break the order, one message each."""
    parts = Path(path).with_suffix("").parts
    module = ".".join(("nibble", *parts))
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    own = parts[0]
    out = []
    for line, target in imported_modules(ast.parse(source), package.removesuffix(".__init__")):
        theirs = layer_of(target)
        if theirs is None or theirs == own:
            continue
        if theirs not in RANK:
            out.append(f"{path}:{line}: imports {target}, which belongs to no layer; add it to ORDER")
        elif RANK[theirs] >= RANK[own]:
            out.append(f"{path}:{line}: layer '{own}' imports {target} from layer '{theirs}', which is not below it")
    return out


def test_every_import_points_down():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40
    problems = [v for f in files for v in violations(str(f.relative_to(SRC)), f.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)


def test_every_module_is_on_the_map_and_the_map_names_no_other():
    """docs/architecture.md names each module of src/nibble in its table (a row starting with its path)."""
    modules = {f.relative_to(SRC).as_posix() for f in SRC.rglob("*.py")}
    named = {line.split("`")[1] for line in MAP.read_text(encoding="utf-8").splitlines() if line.startswith("| `")}
    assert not modules - named, f"add to {MAP.name}: {sorted(modules - named)}"
    assert not named - modules, f"remove from {MAP.name}: {sorted(named - modules)}"


def test_only_the_registry_names_a_built_in_task_module():
    """Outside train/tasks/, code reaches a task through the registry (``get_task``), never by its module."""
    from nibble.train.tasks import TASKS

    task_modules = {target.partition(":")[0] for target in TASKS.values()}
    problems = []
    for f in sorted(SRC.rglob("*.py")):
        path = f.relative_to(SRC)
        if path.parts[:2] == ("train", "tasks"):
            continue
        package = ".".join(("nibble", *path.with_suffix("").parts[:-1]))
        for line, target in imported_modules(ast.parse(f.read_text(encoding="utf-8")), package):
            if target in task_modules:
                problems.append(f"{path}:{line}: imports {target}; look the task up with get_task")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("path", "source", "fragment"),
    [
        ("model/adapter.py", "from nibble.data.classify import LabelMap\n", "layer 'model' imports nibble.data"),
        (
            "model/generate.py",
            "def load():\n    from nibble.train.run import cache_dequantized\n",
            "model/generate.py:2: layer 'model' imports nibble.train.run from layer 'train'",
        ),
        ("io/bnb.py", "from nibble.model.config import ModelConfig\n", "layer 'io' imports nibble.model.config"),
        ("quant/nf4.py", "from ..kernels import reference\n", "layer 'quant' imports nibble.kernels"),
        ("data/instruct.py", "import nibble.model.model\n", "layer 'data' imports nibble.model.model"),
    ],
)
def test_the_checker_names_file_line_and_layers(path, source, fragment):
    found = violations(path, source)
    assert len(found) == 1 and fragment in found[0], found


def test_imports_inside_a_layer_and_downward_are_allowed():
    assert violations("train/run.py", "from nibble.model.merge import write_checkpoint\nfrom . import config\n") == []
    base = "from nibble.errors import NibbleError\nfrom nibble.devices import autocast\n"
    assert violations("quant/nf4.py", base) == []
