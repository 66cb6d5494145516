"""The shape of es_pipe.sources: one concept per module, readers that reach the node only
through its reader interface, no class over ~250 lines without saying why, the README's
Layout naming every module, and the old import paths still working."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import es_pipe.sources as sources
from es_pipe.sources import ArrowSource, ParquetSource, ShardedSource, WebDatasetSource

SOURCES = Path(sources.__file__).resolve().parent
READERS = ("arrow.py", "webdataset.py", "dataset.py", "columnar.py")


def _node_members() -> set[str]:
    """The private names of ShardedSource: its ``self._x`` fields and ``_x`` methods."""
    tree = ast.parse((SOURCES / "base.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ShardedSource")
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef) and n.name.startswith("_")}
    for node in ast.walk(cls):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and node.attr.startswith("_")
        ):
            names.add(node.attr)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def test_the_node_has_private_members_to_protect():
    members = _node_members()
    assert {"_plan", "_stats", "_yielded", "_open_next", "_sizes"} <= members


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _node_classes(tree: ast.Module) -> list[ast.ClassDef]:
    """The classes of a module that derive from ShardedSource (directly, through
    ColumnarOption, or through a class of the module)."""
    found, names = [], {"ShardedSource", "ColumnarOption"}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(b, ast.Name) and b.id in names for b in node.bases
        ):
            found.append(node)
            names.add(node.name)
    return found


@pytest.mark.parametrize("module", READERS)
def test_no_reader_touches_the_nodes_private_members(module):
    """Readers use ``self.ctx`` (the ReadContext) and their own members only; the
    DataLoader adapter uses the public API of the node it wraps."""
    private = _node_members()
    tree = ast.parse((SOURCES / module).read_text())
    touched = {
        f"{node.attr} (line {node.lineno})"
        for cls in _node_classes(tree)
        for node in ast.walk(cls)
        if isinstance(node, ast.Attribute) and _is_self(node.value) and node.attr in private
    }
    touched |= {  # self.source._x: a wrapped node's private member
        f"source.{node.attr} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "source"
    }
    assert sorted(touched) == []
    assert module == "dataset.py" or _node_classes(tree)  # the check saw the readers


@pytest.mark.parametrize("cls", [WebDatasetSource, ParquetSource, ArrowSource])
def test_every_format_implements_the_reader_interface(cls):
    from es_pipe.sources.reader import ShardReader

    for name in ("iter_shard", "count_samples"):
        assert callable(getattr(ShardReader, name))
    assert cls.iter_shard is not ShardedSource.iter_shard


def test_no_class_is_over_250_lines_without_a_reason():
    """A longer class says why in its docstring ("... is long ...": not "longest")."""
    too_long = []
    for path in sorted(SOURCES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 250 and not re.search(r"\bis long\b", ast.get_docstring(node) or ""):
                    too_long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert too_long == []


def test_the_readme_layout_names_every_module_of_sources():
    readme = (SOURCES.parent.parent / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [
        p.name
        for p in sorted(SOURCES.glob("*.py"))
        if not p.name.startswith("__") and p.name not in section
    ]
    assert "sources/" in section and missing == []


def test_the_old_import_paths_still_work():
    from es_pipe.sources import base, plan, shards, world
    from es_pipe.sources.base import SourceOptions, merge_states
    from es_pipe.sources.options import SourceOptions as options_type
    from es_pipe.sources.shards import resolve_rank, resolve_worker

    assert merge_states is plan.merge_states is sources.merge_states
    assert SourceOptions is options_type
    assert resolve_rank is world.resolve_rank and resolve_worker is world.resolve_worker
    assert base.ShardedSource is ShardedSource
    assert resolve_rank(1, 3) == (1, 3) and shards.ShardList is sources.ShardList
