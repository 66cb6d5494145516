"""The public names of the previous release, kept for one release as deprecated aliases.

Why: the old names collided. ``Sampler`` was not a ``torch.utils.data.Sampler``;
``Sampler``/``EvolvedSampler``, ``EvolvedSampling``/``evolve`` and ``Evolved`` named two
concepts five ways, beside the modules ``sampler`` and ``sampling``; ``InfoBatch`` was a
function with a class name. Now each concept has one name:

========================  ==================================================================
old name                  new name
========================  ==================================================================
``Sampler``               ``Selector`` (the same class)
``EvolvedSampler(B, b,    ``Selector(Evolved(beta1, beta2), B, b, ...)``;
beta1=, beta2=, ...)``    ``EvolvedSampler.recommended`` is ``Selector.recommended``
``EvolvedSampling``       ``SelectStage`` (the same class)
``evolve(it, s, ...)``    ``torchdata.nodes.Loader(SelectStage(it, s, ...))``
``InfoBatch(r, d)``       ``Pruning.infobatch(r, d)``
========================  ==================================================================

Each old name still works where it was importable (``es_pipe``, and the module that
defined it), and each use, an import of the name or an attribute access such as
``es_pipe.Sampler(...)``, emits one ``DeprecationWarning`` naming its replacement. The
modules route unknown attributes here through a module ``__getattr__`` (PEP 562), so the
old names appear in no ``__all__``, no ``dir()`` and no star import.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torchdata.nodes as tn

from es_pipe.eswp.rule import Pruning
from es_pipe.sampler import Selector
from es_pipe.sampling import Evolved
from es_pipe.stage import SelectStage, default_collate

# old name -> its replacement, as users now write it
REPLACEMENTS: dict[str, str] = {
    "Sampler": "es_pipe.Selector (the same class)",
    "EvolvedSampler": (
        "es_pipe.Selector(es_pipe.Evolved(beta1, beta2), meta_batch_size, batch_size, ...); "
        "EvolvedSampler.recommended(...) is es_pipe.Selector.recommended(...)"
    ),
    "EvolvedSampling": "es_pipe.SelectStage (the same class)",
    "evolve": "torchdata.nodes.Loader(es_pipe.SelectStage(iterable, sampler, ...))",
    "InfoBatch": "es_pipe.Pruning.infobatch(ratio, delta)",
}
# module -> the old names it exported
OLD_NAMES: dict[str, tuple[str, ...]] = {
    "es_pipe": tuple(REPLACEMENTS),
    "es_pipe.sampler": ("Sampler", "EvolvedSampler"),
    "es_pipe.stage": ("EvolvedSampling", "evolve"),
    "es_pipe.eswp": ("InfoBatch",),
    "es_pipe.eswp.rule": ("InfoBatch",),
    "es_pipe.pruning": ("InfoBatch",),
}


def old_name(module: str, name: str) -> Any:
    """The object the deprecated ``module.name`` stands for, with one
    ``DeprecationWarning``; ``AttributeError`` for any other name (a module's
    ``__getattr__`` calls this)."""
    if name not in OLD_NAMES.get(module, ()):
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    # ``from package import name`` asks twice: importlib's _handle_fromlist (hasattr),
    # then the import statement itself. Warn once, at the second: the user's line.
    if sys._getframe(2).f_code.co_name != "_handle_fromlist":
        warnings.warn(
            f"{module}.{name} is deprecated and goes away in the next release: use "
            f"{REPLACEMENTS[name]}",
            DeprecationWarning,
            stacklevel=3,
        )
    return _TARGETS[name]


class EvolvedSampler(Selector):
    """Deprecated: ``Selector(Evolved(beta1, beta2), meta_batch_size, batch_size, ...)``;
    its ``recommended`` is :meth:`Selector.recommended`."""

    def __init__(
        self,
        meta_batch_size: int,
        batch_size: int,
        *,
        beta1: float = 0.2,
        beta2: float = 0.8,
        **options: Any,
    ) -> None:
        super().__init__(Evolved(beta1, beta2), meta_batch_size, batch_size, **options)


def evolve(
    iterable: Iterable[Any],
    sampler: Selector,
    *,
    loss_fn: Callable[[Any], Any] | None = None,
    collate_fn: Callable[[list[Any]], Any] = default_collate,
) -> tn.Loader:
    """Deprecated: ``torchdata.nodes.Loader(SelectStage(iterable, sampler, ...))``."""
    return tn.Loader(SelectStage(iterable, sampler, loss_fn=loss_fn, collate_fn=collate_fn))


def InfoBatch(ratio: float = 0.5, delta: float = 0.875) -> Pruning:
    """Deprecated: ``Pruning.infobatch(ratio, delta)``."""
    return Pruning.infobatch(ratio, delta)


_TARGETS: dict[str, Any] = {
    "Sampler": Selector,
    "EvolvedSampler": EvolvedSampler,
    "EvolvedSampling": SelectStage,
    "evolve": evolve,
    "InfoBatch": InfoBatch,
}
