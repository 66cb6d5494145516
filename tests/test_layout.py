"""The library does not carry the application: importing es_pipe loads neither the demo,
its harness and reports, nor the CLI."""

from __future__ import annotations

import subprocess
import sys


def test_the_library_never_imports_the_application():
    code = (
        "import sys, es_pipe, es_pipe.sources, es_pipe.manifest, es_pipe.elastic\n"
        "print(sorted(m for m in sys.modules if m.startswith(('es_pipe.demo', 'es_pipe.cli'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_demo_command_names_the_recommended_configuration():
    from es_pipe.demo import RECOMMENDED

    out = subprocess.run(
        [sys.executable, "-m", "es_pipe.tools.cli", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert RECOMMENDED in out.stdout and "uniform" in out.stdout
