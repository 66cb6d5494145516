"""Deprecated alias of :mod:`es_pipe.manifests` (the manifests are a package now); kept
for one release. ``from es_pipe.manifest import X`` still works for the names that
:mod:`es_pipe.manifests` exports, with a ``DeprecationWarning``; import them from
``es_pipe`` or ``es_pipe.manifests`` instead."""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    from es_pipe import manifests

    if name not in manifests.__all__:
        raise AttributeError(f"module 'es_pipe.manifest' has no attribute {name!r}")
    warnings.warn(
        f"es_pipe.manifest.{name} moved to es_pipe.manifests.{name}; es_pipe.manifest goes "
        "away in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(manifests, name)
