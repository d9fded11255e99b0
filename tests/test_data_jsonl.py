import ast
from pathlib import Path

import pytest

import vargpt
from vargpt.data.jsonl import first_rows, read_jsonl


def test_read_jsonl_numbers_lines_from_one_and_skips_blank_ones(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n  \n[2, 3]\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, [2, 3])]


def test_read_jsonl_names_the_file_and_line_of_a_bad_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.jsonl line 2: not JSON"):
        list(read_jsonl(path))


def test_first_rows_keeps_all_for_none_and_refuses_a_limit_below_one():
    assert first_rows([1, 2, 3], None) == [1, 2, 3]
    assert first_rows([1, 2, 3], 2) == [1, 2]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        first_rows([1, 2, 3], 0)


def test_the_generic_benchmarks_do_not_import_the_shapes_world_at_load():
    # the shapes world plugs into GenEval / DPG-Bench by name (imported when named); a module-level import would
    # tie the generic benchmarks and data readers to it again
    package = Path(vargpt.__file__).parent
    for module in (
        "evaluation/geneval.py",
        "evaluation/dpg.py",
        "evaluation/sampling.py",
        "evaluation/geneval_rules.py",
    ):
        tree = ast.parse((package / module).read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                assert "shapes" not in (node.module or ""), f"{module} imports {node.module} at load"
            if isinstance(node, ast.Import):
                assert not any("shapes" in alias.name for alias in node.names), module
