"""Errors of one item of a request (an image, a prompt) as values: its index and why, formatted and read in one place.

A refused item travels as text ("item 3: is not an image") through Triton's error messages and onnxruntime's
exceptions; `item_error` is the one reader of that text, `ItemError` the value callers shift (from a chunk's index
to the whole list's) and name (by the file or label it was).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

ITEM = re.compile(r"item (\d+): ")


@dataclass(frozen=True)
class ItemError:
    """Item `index` refused for `reason`; `context` is what a message said before naming the item."""

    index: int
    reason: str
    context: str = ""

    def __str__(self) -> str:
        return f"{self.context}item {self.index}: {self.reason}"

    def shifted(self, offset: int) -> ItemError:
        """The same error numbered from `offset` items earlier (a chunk's item in the whole list)."""
        return replace(self, index=self.index + offset)

    def named(self, names: list[str] | tuple[str, ...], what: str) -> str | None:
        """'<name> <what>: <reason>' for the item's name among `names`, None when it has none there."""
        return f"{names[self.index]} {what}: {self.reason}" if self.index < len(names) else None


def item_error(message: str) -> ItemError | None:
    """The item error a message carries ("... item 3: why"), None when it names no item."""
    match = ITEM.search(message)
    if match is None:
        return None
    return ItemError(int(match.group(1)), message[match.end():], message[:match.start()])
