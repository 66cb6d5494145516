"""The library does not carry the application: importing any module of es_pipe's core
loads neither the demo, its harness and reports, nor the command-line tools. And the
shape of the manifests and tools packages: no module shadows the standard library, no
class is over ~250 lines without saying why, inspect reads through the public reader."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "es_pipe"
APPLICATION = ("es_pipe.demo", "es_pipe.tools", "es_pipe.cli")


def test_the_library_never_imports_the_application():
    """Every core module (found on disk, not listed by hand) is imported
    in a fresh interpreter; none of them pulls in the demo, the CLI or the tools."""
    core = sorted(
        ".".join(("es_pipe", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for p in PACKAGE.rglob("*.py")
    )
    core = [m for m in core if not m.startswith(APPLICATION) and m != "es_pipe.manifest"]
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        f"for name in {core!r}:\n"
        "    __import__(name)\n"
        f"print(len({core!r}), sorted(m for m in sys.modules if m.startswith({APPLICATION!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, loaded = out.stdout.strip().split(" ", 1)
    assert int(count) >= 30, out.stdout  # the walk found the core (manifests/, sources/...)
    assert loaded == "[]", out.stdout


def test_no_module_shadows_the_standard_library():
    names = {p.stem for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.iterdir()}
    shadowing = sorted(names & set(sys.stdlib_module_names) - {"__init__", "__main__"})
    assert shadowing == [], shadowing
    assert not (PACKAGE / "inspect.py").exists()


@pytest.mark.parametrize("package", ["manifests", "tools"])
def test_no_class_is_over_250_lines_without_a_reason(package):
    """A longer class says why in its docstring (the word "long")."""
    too_long = []
    for path in sorted((PACKAGE / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if lines > 250 and "long" not in doc:
                    too_long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert too_long == []


def test_inspect_uses_only_the_public_reader():
    """``es-pipe inspect`` reads manifests through ManifestReader's public methods: no
    ``manifests._private`` access, no ``Manifests`` (the writer) at all."""
    source = (PACKAGE / "tools" / "inspect_manifests.py").read_text()
    tree = ast.parse(source)
    private = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and isinstance(node.value, ast.Name)
        and node.value.id == "manifests"
    ]
    assert private == []
    assert "Manifests(" not in source and "ManifestReader(" in source


def test_the_old_module_paths_still_work_and_say_they_are_deprecated():
    import es_pipe
    from es_pipe.tools import cli

    with pytest.warns(DeprecationWarning, match="es_pipe.manifests.Manifests"):
        from es_pipe.manifest import Manifests
    assert Manifests is es_pipe.Manifests
    with pytest.raises(ImportError):
        from es_pipe.manifest import _crc  # noqa: F401 - private names did not survive
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.modules.pop("es_pipe.cli", None)
        import es_pipe.cli as old_cli
    assert old_cli.main is cli.main
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


@pytest.mark.parametrize("module", ["es_pipe.tools.cli", "es_pipe.tools", "es_pipe.cli"])
def test_the_command_runs_as_a_module(module):
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", module, "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("es-pipe ")


def test_the_demo_command_names_the_recommended_configuration():
    from es_pipe.demo import RECOMMENDED

    out = subprocess.run(
        [sys.executable, "-m", "es_pipe.tools.cli", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert RECOMMENDED in out.stdout and "uniform" in out.stdout


@pytest.mark.parametrize("package", ["manifests", "tools"])
def test_the_readme_layout_names_every_module_of_the_package(package):
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    assert f"{package}/" in section
    missing = [
        p.name
        for p in sorted((PACKAGE / package).glob("*.py"))
        if not p.name.startswith("__") and p.name not in section
    ]
    assert missing == []
