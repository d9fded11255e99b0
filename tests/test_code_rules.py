"""The layout's rules, checked on the source itself so that they hold after the next change too (README, "Tour for
contributors"): short functions of bounded complexity, generic packages free of the shapes world, the library free
of the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vargpt"
MAX_FUNCTION_LINES = 79
MAX_COMPLEXITY = 20


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def _vargpt_imports(source: str, package: list[str]) -> list[str]:
    """Absolute names of the vargpt modules (and imported names) a source in `package` imports, at any depth of the
    file: lazy imports inside functions count."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [n for n in names if n.startswith("vargpt")]


def _imported_modules(path: Path) -> list[str]:
    package = list(path.relative_to(SRC.parent).with_suffix("").parts[:-1])  # an __init__'s package is its folder
    return _vargpt_imports(path.read_text(encoding="utf-8"), package)


def test_the_walk_finds_the_package():
    assert len(_sources()) > 80 and (SRC / "modeling.py") in _sources()


def test_no_function_is_80_lines_or_longer():
    too_long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, too_long


def test_no_function_is_above_complexity_20():
    radon = pytest.importorskip("radon.complexity")
    too_complex = []
    for path in _sources():
        for block in radon.cc_visit(path.read_text(encoding="utf-8")):
            if block.complexity > MAX_COMPLEXITY:
                too_complex.append(f"{path.relative_to(SRC)}:{block.lineno} {block.name} ({block.complexity})")
    assert not too_complex, too_complex


def test_generic_data_code_imports_nothing_of_the_shapes_world():
    offenders = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in sorted((SRC / "data").rglob("*.py"))
        for name in _imported_modules(path)
        if name.startswith("vargpt.shapes")
    ]
    assert not offenders, offenders


def test_the_library_never_imports_the_command_line():
    allowed = {"cli", "serving"}  # the server's own options come from the CLI's option groups
    offenders = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in _sources()
        if path.relative_to(SRC).parts[0] not in allowed
        for name in _imported_modules(path)
        if name == "vargpt.cli" or name.startswith("vargpt.cli.")
    ]
    assert not offenders, offenders


def test_the_import_walker_sees_relative_absolute_and_lazy_imports():
    """The rules above are only as good as the walker: it must resolve `..x`, `.x` and imports inside functions."""
    source = "from ..cli.options import flag\nimport vargpt.data\nimport torch\n\n"
    source += "def f():\n    from .scene import Scene\n"
    names = _vargpt_imports(source, ["vargpt", "training"])
    assert "vargpt.cli.options" in names and "vargpt.data" in names and "vargpt.training.scene" in names
    assert not any(n.startswith("torch") for n in names)
