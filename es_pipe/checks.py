"""Shared argument checks: what counts as an int, a count or a number in es_pipe's API.

``True`` is an ``int`` to Python but never a count to es_pipe, and numpy scalars are
numbers like Python's; every public argument check goes through these predicates so the
rule is written once.
"""

from __future__ import annotations

import math
from typing import TypeGuard

import numpy as np


def is_int(
    value: object, *, at_least: int | None = None, below: int | None = None, numpy: bool = False
) -> TypeGuard[int]:
    """A Python int (with ``numpy``, numpy ints too), not a bool, optionally within
    ``[at_least, below)``. Values recorded as JSON (manifests, states) stay Python ints."""
    kinds = (int, np.integer) if numpy else int
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kinds):
        return False
    return bool((at_least is None or value >= at_least) and (below is None or value < below))


def is_real(value: object) -> TypeGuard[int | float | np.integer | np.floating]:
    """An int or float (numpy numbers included), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def is_positive_number(value: object) -> TypeGuard[int | float]:
    """A finite real number > 0, e.g. a timeout in seconds."""
    return bool(is_real(value) and math.isfinite(value) and value > 0)
