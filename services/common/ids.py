"""Identifier rules shared by both APIs: 1-64 characters, none of them a control character."""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints

MAX_LIST = 200  # history / exclude items per request
# Control characters (C0, DEL, C1) are refused; the pattern is valid in Python, Rust and ECMA.
ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]{1,64}$"

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=ID_PATTERN)]
UserId = ItemId
