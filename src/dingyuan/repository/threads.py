"""Thread tuning shared by the backup and restore pipelines."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def responsive_threads() -> Iterator[None]:
    """Hand the GIL over sooner while worker threads alternate between Python and C calls.

    The pipelines keep short Python steps between long GIL-free C calls (BLAKE3, zstd, I/O); with
    the default 5 ms switch interval a worker returning from C waits behind the main thread.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    collecting = gc.isenabled()
    gc.disable()  # the pipelines make no reference cycles; the collector only scanned their tuples
    try:
        yield
    finally:
        sys.setswitchinterval(previous)
        if collecting:
            gc.enable()
