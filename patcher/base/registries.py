"""Registries of one shape: named entries, each declaring what it builds, its parameters and its reference, as
mergekit's merge methods do (mergekit/merge_methods/registry.py). An unknown name is one `PatcherError` naming the
nearest registered ones.

The training methods, the patching strategies, the alpha searches, the Triton model builders, the merge methods and
the tasks are registries of `Registered` entries; an entry that carries more (a merge method's grids and the data it
needs) keeps it beside these fields.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from patcher.base.errors import PatcherError

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Parameter:
    """One parameter an entry takes: its default, what it means, and the values a search tries (empty: none)."""

    name: str
    default: Any
    help: str = ""
    grid: tuple[float, ...] = ()
    integer: bool = False  # a count: grid values are used as ints


@dataclass(frozen=True, kw_only=True)
class Registered(Generic[T]):
    """One registered thing: its name, one line on what it does, where it comes from, the parameters it takes and
    what builds it (a function or a class)."""

    name: str
    summary: str
    reference: str = ""
    parameters: tuple[Parameter, ...] = ()
    builds: T


class Named(Protocol):
    @property
    def name(self) -> str: ...


E = TypeVar("E", bound=Named)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """"did you mean A or B?" naming the (at most three) known names nearest `name`; "" when none is near."""
    near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(near)}?" if near else ""


def unknown_name(what: str, name: str, known: Iterable[str]) -> PatcherError:
    """The one error for a name no registry entry has: the nearest registered names first, then all of them."""
    names = list(known)
    hint = did_you_mean(name, names)
    return PatcherError(f"unknown {what} {name!r}: {hint + ' ' if hint else ''}use one of {', '.join(names)}")


class Registry(Mapping[str, E]):
    """Entries by name, in registration order, read as a mapping; `entry` answers an unknown name with
    `unknown_name`'s error."""

    def __init__(self, what: str, entries: Iterable[E]) -> None:
        self.what = what  # how the user names an entry, for errors: "--method", "merge method", ...
        self._entries: dict[str, E] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: E) -> None:
        """Register one more entry; ValueError for a name already taken (a programming error)."""
        if entry.name in self._entries:
            raise ValueError(f"{self.what} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry

    def entry(self, name: str) -> E:
        """The entry called `name`; PatcherError naming the nearest registered ones otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_name(self.what, name, self._entries) from None

    def __getitem__(self, name: str) -> E:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
