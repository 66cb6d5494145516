"""Shared plumbing of the bad-input sweeps, which sit next to the concept each one tests
(the ``test_*`` functions that call :func:`sweep`: losses and sample dicts in test_stage.py,
hyper-parameters in test_sampler.py and test_sampling.py, source options and shard lists in
test_sources_errors.py, manifest folders in test_manifests.py, CLI arguments in test_cli.py,
shard bytes in test_fuzz_shards.py), and the strategies of odd values they share.

Every property runs under hypothesis with a fixed budget per category: ``DEFAULT`` examples in
the default run, ``FAULTS`` under the ``faults`` marker (``make test-faults``, or only the
sweeps: ``pytest -m "faults and sweep"``). Examples are derandomized (seeded from the test),
so a run is reproducible.

Outcomes are counted per category: how many inputs were tried, how many gave a correct result,
and which es_pipe error the others raised. With ``ES_PIPE_SWEEP_REPORT=path.json`` the counts
are merged into that JSON file at the end of each test module (tests/conftest.py; the
README's "bad inputs tried" figures come from it).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from es_pipe.errors import EsPipeError

DEFAULT = int(os.environ.get("ES_PIPE_SWEEP_EXAMPLES", "40"))
FAULTS = int(os.environ.get("ES_PIPE_SWEEP_FAULTS_EXAMPLES", "600"))

SCALES = [
    pytest.param(DEFAULT, id="default", marks=[pytest.mark.sweep, pytest.mark.timeout(120)]),
    pytest.param(
        FAULTS,
        id="faults",
        marks=[pytest.mark.sweep, pytest.mark.faults, pytest.mark.timeout(1800)],
    ),
]  # the timeouts: a hang fails

# Odd values of every kind, for any argument: what users hand es_pipe by mistake.
weird_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.complex_numbers(allow_nan=False, max_magnitude=1e3),
    st.just(object()),
    st.just([]),
    st.just({}),
    st.builds(np.int64, st.integers(-(2**63), 2**63 - 1)),
    st.builds(np.float32, st.floats(width=32)),
)
small = st.one_of(weird_scalars, st.integers(-2, 40))  # for counts, sizes and seeds
fractions = st.one_of(weird_scalars, st.floats(-0.5, 1.5))  # for ratios and betas


def sweep_samples(n: int, shard: str = "s") -> list[dict]:
    """``n`` good sample dicts of one shard (identity fields and a small tensor)."""
    return [
        {"x": torch.full((2,), float(i)), "__key__": f"k{i}", "__shard__": shard, "__index__": i}
        for i in range(n)
    ]


COUNTS: dict[str, Counter] = defaultdict(Counter)
SCALE_OF: dict[str, str] = {}


def record(category: str, outcome: str) -> None:
    COUNTS[category]["tried"] += 1
    COUNTS[category][outcome] += 1


def outcome_of(exc: BaseException | None) -> str:
    return "ok" if exc is None else type(exc).__name__


def sweep(
    category: str,
    strategy: st.SearchStrategy,
    check: Callable[[Any], str | None],
    n: int,
    times: int = 1,
) -> None:
    """Run ``check`` on ``n * times`` examples of ``strategy`` (``n``: the scale, DEFAULT or
    FAULTS; ``times``: more for cheap categories); count its outcomes under ``category``.

    ``check`` returns an outcome label (``"ok"``, an es_pipe error name, ...) and raises
    ``AssertionError`` for a wrong result or any exception that is not an es_pipe error.
    """
    SCALE_OF[category] = "default" if n == DEFAULT else "faults"

    @settings(
        max_examples=n * times,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(strategy)
    def prop(value: Any) -> None:
        record(category, check(value) or "ok")

    prop()


def es_error_or_ok(fn: Callable[[], Any], expect: tuple[type[BaseException], ...] = (EsPipeError,)):
    """Call ``fn``; return ``(result, None)`` or ``(None, error)`` for an es_pipe error.

    Anything else (a raw TypeError, KeyError, ArrowInvalid ...) fails the test with the input
    that caused it: a crash inside es_pipe or a dependency.
    """
    try:
        return fn(), None
    except expect as exc:
        message = str(exc)
        assert len(message) > 20, f"{type(exc).__name__} with a vague message: {message!r}"
        return None, exc


def dump_report() -> None:
    """Merge the counts into ``$ES_PIPE_SWEEP_REPORT`` (JSON) and print them."""
    if not COUNTS:
        return
    summary = {
        cat: {"scale": SCALE_OF.get(cat, "default"), **dict(sorted(c.items()))}
        for cat, c in sorted(COUNTS.items())
    }
    print("\nbad inputs tried:", json.dumps(summary, indent=1))
    path = os.environ.get("ES_PIPE_SWEEP_REPORT")
    if path:
        old: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError), open(path) as f:
            old = json.load(f)
        for cat, c in summary.items():
            key = f"{cat} [{c['scale']}]"
            prev = old.get(key, {})
            merged = {k: v for k, v in prev.items() if k != "scale"}
            for k, v in c.items():
                if k != "scale":
                    merged[k] = merged.get(k, 0) + v
            old[key] = {"scale": c["scale"], **merged}
        old["total tried"] = sum(
            v.get("tried", 0) for k, v in old.items() if isinstance(v, dict) and "tried" in v
        )
        with open(path, "w") as f:
            json.dump(old, f, indent=1, sort_keys=True)
    COUNTS.clear()


def raises_as_recorded(error: type[BaseException], message: str, call: Callable[[], Any]) -> None:
    """One regression the sweep found (an entry of a test module's ``REGRESSIONS``): ``call()``
    raises ``error`` with ``message`` in its text, where it once raised something raw."""
    with pytest.raises(error, match=message):
        call()


@st.composite
def few_faults(draw, valid: dict, bad: dict, required: tuple = ()):
    """Keyword arguments: valid values for a random subset of ``valid``'s keys (and every
    ``required`` one), then 0 to 3 of them replaced by values from ``bad`` (single and
    double faults are the ones that slip past validation)."""
    out = {k: draw(s) for k, s in valid.items() if k in required or draw(st.booleans())}
    faults = draw(st.sampled_from([0, 1, 1, 1, 2, 3]))
    if faults:
        for key in draw(st.lists(st.sampled_from(sorted(bad)), max_size=faults, unique=True)):
            out[key] = draw(bad[key])
    return out
