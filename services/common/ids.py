"""Field types shared by both APIs: ids (1-64 characters, no control character) and counts."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, StringConstraints

MAX_LIST = 200  # history / exclude items per request
# Control characters (C0, DEL, C1) are refused; the pattern is valid in Python, Rust and ECMA.
ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]{1,64}$"

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=ID_PATTERN)]
UserId = ItemId


def _whole_number(value: object) -> object:
    """JSON Schema counts 4.0 as an integer, so accept it; strings and booleans stay errors."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Count = Annotated[int, BeforeValidator(_whole_number)]
