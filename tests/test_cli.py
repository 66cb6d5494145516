"""The ``es-pipe`` command line as a whole, over swept arguments: whatever it is given, an
exit status and a message, never a traceback (issue 7's bad-input sweep, by concept)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _sweep import SCALES, sweep
from hypothesis import strategies as st

from es_pipe.tools.cli import main as cli_main


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, manifest_root):
    d = tmp_path_factory.mktemp("cli")
    (d / "folder").mkdir()
    (d / "folder" / "a.txt").write_text("x")
    (d / "folder" / "a.cls").write_text("1")
    (d / "empty").mkdir()
    (d / "noext").mkdir()
    (d / "noext" / "README").write_text("x")
    pq.write_table(pa.table({"x": [1, 2, 3]}), d / "t.parquet")
    (d / "bad.parquet").write_bytes(b"PAR1 nope PAR1")
    (d / "bad.arrow").write_bytes(b"ARROW1 nope")
    (d / "bad.npz").write_bytes(b"PK nope")
    np.savez(d / "obj.npz", a=np.array([{"a": 1}], dtype=object))
    np.savez(d / "ragged.npz", a=np.arange(3), b=np.arange(4))
    (d / "x.txt").write_text("x")
    return d, manifest_root


def _options(pairs):
    """Well-formed option lists: 0 to 3 options from ``pairs``, flattened."""
    return st.lists(st.sampled_from(pairs), max_size=3).map(
        lambda chosen: [token for option in chosen for token in option]
    )


@pytest.mark.usefixtures("quiet")
@pytest.mark.parametrize("n", SCALES)
def test_cli_arguments(n, cli_files, tmp_path):
    """``es_pipe.tools.cli.main`` with random and invalid arguments: an exit status (argparse's
    SystemExit(2) included) and a message; never a traceback. ``demo`` always gets an
    invalid option, so that it exits in argparse instead of training."""
    d, manifests = cli_files
    counter = iter(range(10**9))
    paths = [
        str(d / p)
        for p in (
            "folder",
            "empty",
            "noext",
            "t.parquet",
            "bad.parquet",
            "bad.arrow",
            "bad.npz",
            "obj.npz",
            "ragged.npz",
            "x.txt",
            "nope",
            "nope.parquet",
        )
    ] + [str(manifests), "foo://x", ""]
    text = st.one_of(
        st.text(max_size=8),
        st.sampled_from(paths),
        st.integers(-3, 5).map(str),
        st.sampled_from(["nan", "inf", "1e9", "-"]),
    )
    shard = st.tuples(
        st.just("shard"),
        st.sampled_from(paths),
        st.sampled_from(
            [
                "out-%03d.tar",
                "out-%03d.parquet",
                "out.tar",
                "out-%s-%d.tar",
                "/proc/nope/x-%d.tar",
                "foo://x/y-%d.tar",
                "",
            ]
        ),
        st.one_of(
            _options(
                [("--format", "tar"), ("--format", "parquet"), ("--format", "json")]
                + [(o, v) for o in ("--per-shard", "--row-group") for v in ("0", "-2", "1", "x")]
            ),
            st.lists(
                st.one_of(
                    st.sampled_from(
                        ["--format", "--per-shard", "--row-group", "tar", "parquet", "json"]
                    ),
                    text,
                ),
                max_size=4,
            ),
        ),
    )
    inspect = st.tuples(
        st.just("inspect"),
        st.sampled_from(paths),
        st.one_of(
            _options(
                [("--epoch", e) for e in ("0", "1", "7", "-1")]
                + [("--shard", v) for v in ("a.tar", "tar", "zzz", "")]
                + [("--key", v) for v in ("k3", "nope", "")]
                + [("--diff", "0", "1"), ("--diff", "1", "9"), ("--json",), ("--no-progress",)]
                + [("--top", v) for v in ("-1", "0", "3")]
                + [("--plot",)]
            ),
            st.lists(
                st.one_of(
                    st.sampled_from(
                        [
                            "--epoch",
                            "--shard",
                            "--key",
                            "--diff",
                            "--json",
                            "--top",
                            "--plot",
                            "--no-progress",
                            "0",
                            "1",
                            "a.tar",
                            "k3",
                            "7",
                        ]
                    ),
                    text,
                ),
                max_size=5,
            ),
        ),
    )
    other = st.lists(
        st.one_of(
            st.sampled_from(["demo", "shard", "inspect", "bench", "--version", "--help", "-h"]),
            text,
        ),
        max_size=4,
    )

    def check(case):
        if isinstance(case, tuple):  # shard or inspect, with paths
            argv = [case[0], case[1]]
            if case[0] == "shard":
                out = case[2]
                argv.append(
                    out
                    if out.startswith(("/", "foo:")) or not out
                    else str(tmp_path / f"o{next(counter)}" / out)
                )
                argv += case[3]
            else:
                argv += [
                    str(tmp_path / f"p{next(counter)}.png") if a == "--plot" else a for a in case[2]
                ]
                if "--plot" in argv and argv.index("--plot") == len(argv) - 1:
                    argv.append(str(tmp_path / "last.png"))
        else:
            argv = list(case)
            if "demo" in argv:  # never train: an invalid option makes argparse exit first
                argv += ["--epochs", "0"]
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = cli_main(argv)
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            assert exc.code in (0, 2), (argv, exc.code)
            return f"SystemExit({exc.code})"
        assert rc in (0, 1, 2), (argv, rc)
        if rc:
            assert "es-pipe" in err.getvalue() or not argv, (argv, err.getvalue())
        return f"exit {rc}"

    strategy = st.one_of(shard, shard, inspect, inspect, other)
    sweep("CLI arguments", strategy, check, n)
