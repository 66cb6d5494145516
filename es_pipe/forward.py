"""Read-only attributes that a class forwards to one of its parts.

A class made of parts (a source of its plan, world and stats; a manifest reader of its
filesystem) shows some of their attributes as its own. ``Forward`` declares each one in a
line (``rank = Forward[int]("_world.rank")``), where a property would take four lines of
the same shape each: a table of what comes from where, typed for the type checker.
"""

from __future__ import annotations

import operator
from typing import Generic, NoReturn, TypeVar, overload

__all__ = ["Forward"]

T = TypeVar("T")


class Forward(Generic[T]):
    """A read-only attribute whose value is ``obj.<path>`` (a dotted path of attributes),
    read anew on each access. Like a property without a setter: assigning it raises
    ``AttributeError``; read on the class, it is the descriptor itself (its ``__doc__``
    is ``doc``)."""

    def __init__(self, path: str, doc: str | None = None) -> None:
        self.path = path
        self._get = operator.attrgetter(path)
        self.__doc__ = doc
        self.name = path

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Forward[T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Forward[T] | T:
        if obj is None:
            return self
        value: T = self._get(obj)
        return value

    def __set__(self, obj: object, value: NoReturn) -> None:  # read-only, for mypy too
        raise AttributeError(
            f"property {self.name!r} of {type(obj).__name__!r} object has no setter"
        )

    def __repr__(self) -> str:
        return f"Forward({self.path!r})"
