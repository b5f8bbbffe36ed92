"""A data file error that says where the problem is and what was expected."""

from __future__ import annotations


class DataFormatError(ValueError):
    """Bad input data: carries the file, column and row (1-based, header excluded)."""

    def __init__(
        self,
        path: str,
        message: str,
        *,
        column: str | None = None,
        row: int | None = None,
    ):
        self.path, self.column, self.row = path, column, row
        where = [path]
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {message}")
