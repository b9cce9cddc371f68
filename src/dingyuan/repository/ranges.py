"""Byte ranges of the block devices over a snapshot (image, clone, live restore): the checks and
the chunk-wise walks they share."""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import ExportError, UsageError


def check_range(name: str, closed: bool, size: int, offset: int, length: int) -> None:
    """ExportError on a closed device; UsageError for a range not inside ``[0, size)``."""
    if closed:
        raise ExportError(f"{name} is closed")
    if offset < 0 or length <= 0 or offset + length > size:
        raise UsageError(f"range {offset}+{length} is outside {name} ({size} bytes)")


def state_runs(
    states: bytes | bytearray, cs: int, offset: int, length: int
) -> Iterator[tuple[int, int, int]]:
    """``(state, start, end)`` byte ranges of equal chunk state covering the range, where
    ``states[i]`` is the state of chunk ``i``."""
    end = offset + length
    first, last = offset // cs, (end - 1) // cs + 1
    window = bytes(states[first:last])
    n = 0
    while n < len(window):
        m = n
        while m < len(window) and window[m] == window[n]:
            m += 1
        yield window[n], max(offset, (first + n) * cs), min(end, (first + m) * cs)
        n = m


def chunk_parts(cs: int, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
    """``(chunk index, start, end)`` of the range, offsets within the chunk."""
    pos, end = offset, offset + length
    while pos < end:
        i = pos // cs
        stop = min(end, (i + 1) * cs)
        yield i, pos - i * cs, stop - i * cs
        pos = stop
