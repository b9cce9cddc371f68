"""The explicit crash-consistent fallback: read the live source as it is.

Nothing is paused and nothing is copied, so this is not a point in time at all: blocks read
early and late may come from different moments. It is what a policy gets with ``live`` (or the
level ``crash``), and never chosen by ``auto``. Quiesce plugins are not run: there is no
instant to pause for (the pause would last the whole read).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..quiesce.base import Quiescer
from .base import PointInTime, Provider

NOTE = "live read: not a point in time"


class LiveProvider(Provider):
    name = "live"

    def check(self, source: str | Path) -> str | None:
        if not os.path.exists(source):
            return "it does not exist"
        if not os.access(source, os.R_OK):
            return "it is not readable by the agent"
        return None

    @contextmanager
    def take(self, source: str | Path, quiescer: Quiescer | None = None) -> Iterator[PointInTime]:
        notes = [NOTE]
        if quiescer is not None and quiescer.plugins:
            notes.append("quiesce plugins not run: a live read has no instant to pause for")
        yield PointInTime(Path(source), "crash", self.name, notes=notes)
