"""Item images in batches for the image models (the captioner and the image tower).

An item's image may be missing or broken. A batch holds only the readable ones, with their
rows, so the caller leaves the others empty (no caption, a zero vector) instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any


def readable_batches(
    paths: Sequence[str], batch_size: int
) -> Iterator[tuple[list[int], list[Any]]]:
    """``(rows, RGB images)`` for each run of ``batch_size`` paths, unreadable images left out;
    a run with no readable image yields nothing."""
    from PIL import Image

    for start in range(0, len(paths), batch_size):
        images, rows = [], []
        for row in range(start, min(start + batch_size, len(paths))):
            try:
                with Image.open(paths[row]) as image:
                    images.append(image.convert("RGB"))
                rows.append(row)
            except (OSError, ValueError):
                continue
        if images:
            yield rows, images
