"""Progress on stderr as plain text: bytes done of the total, MB/s, ETA.

On a terminal one line is redrawn every half second (``\\r``); elsewhere (a log, a serial console
captured to a file) a new line is printed every ten seconds. Thread-safe: workers call :meth:`add`.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, label: str, total: int, out: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._print(final=True)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def line(self) -> str:
        with self._lock:
            done = self.done
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = done / elapsed
        pct = 100 * done / self.total if self.total else 100.0
        eta = _eta((self.total - done) / rate) if rate > 0 and done < self.total else "-"
        return (
            f"{self.label}: {human(done)} of {human(self.total)} ({pct:.0f}%), "
            f"{rate / 1e6:.1f} MB/s, ETA {eta}"
        )

    def _print(self, final: bool = False) -> None:
        text = self.line()
        if self.tty:
            self.out.write("\r" + text.ljust(79) + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def _loop(self) -> None:
        every = 0.5 if self.tty else 10.0
        while not self._stop.wait(every):
            self._print()
