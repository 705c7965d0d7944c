"""Item errors as values: the one reader of "item N: why", shifted from a chunk to the whole list, named by file."""

from __future__ import annotations

from patcher.triton.item_errors import ItemError, item_error


def test_a_message_naming_an_item_reads_back_as_its_index_reason_and_context() -> None:
    item = item_error("digits_text: item 3: prompt 'x' has no tokens")
    assert item == ItemError(3, "prompt 'x' has no tokens", "digits_text: ")
    assert str(item) == "digits_text: item 3: prompt 'x' has no tokens"
    assert str(item.shifted(64)) == "digits_text: item 67: prompt 'x' has no tokens"
    assert item_error("the server is busy") is None and item_error("item x: no index") is None


def test_an_item_is_named_by_its_file_when_there_is_one() -> None:
    item = ItemError(1, "is truncated")
    assert item.named(["a.png", "b.png"], "is not a readable image") == "b.png is not a readable image: is truncated"
    assert item.shifted(5).named(["a.png", "b.png"], "is not a readable image") is None
