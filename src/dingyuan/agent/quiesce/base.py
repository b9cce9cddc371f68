"""Quiesce plugins and the Quiescer that runs them around a point in time.

A **plugin** brings one application to a state worth keeping and holds it there for an instant:

- ``prepare()`` runs before anything is paused and may take a while (a checkpoint, a flush),
  so that the pause itself is short;
- ``freeze()`` pauses the application (writers wait from here on);
- ``thaw()`` lets it go on. It is called whatever happened before, also after ``freeze()``
  failed or timed out, so it must be idempotent and safe when nothing is frozen. A ``freeze()``
  that completes after its timeout must notice that ``thaw()`` already ran and let go at once.

Each step runs in its own thread with the plugin's ``timeout``: a hung step is reported as a
failure and the run goes on without waiting for it (a thread cannot be killed; plugins make
their own blocking calls interruptible: subprocesses are killed, SQLite waits at most the
timeout).

The **Quiescer** runs the plugins in order (prepare all, freeze all, thaw all in reverse), always
thaws, measures the pause and collects errors. What a failure means is the policy's choice,
``on_failure``:

- ``"crash"``: every plugin is thawed at once, the run goes on and the snapshot is labelled
  ``crash`` (nothing better is promised);
- ``"skip"``: every plugin is thawed and :class:`~dingyuan.errors.QuiesceFailed` is raised: no
  snapshot this time.

The :class:`Watchdog` is the last line of defence used by the consistency providers: when a
pause lasts longer than its limit, a daemon thread runs the registered thaw actions itself.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ...errors import PluginFailed, QuiesceFailed

log = logging.getLogger("dingyuan.agent.quiesce")

OnFailure = Literal["crash", "skip"]
ON_FAILURE: tuple[OnFailure, ...] = ("crash", "skip")

#: default time a plugin step may take (seconds)
DEFAULT_STEP_TIMEOUT = 10.0
#: the Quiescer gives up on a step this long after its timeout: a plugin that enforces its own
#: timeout (the script plugin kills its command) reports first, with a better message
STEP_GRACE = 0.5


class Plugin(ABC):
    """One application to quiesce. Subclasses set ``name`` and implement ``freeze``/``thaw``."""

    name: ClassVar[str] = "plugin"

    def __init__(self, timeout: float = DEFAULT_STEP_TIMEOUT) -> None:
        self.timeout = timeout

    def prepare(self) -> None:  # noqa: B027 (optional step: a no-op unless a plugin needs it)
        """Before the pause: work that shortens it (a checkpoint). Nothing is paused yet."""

    @abstractmethod
    def freeze(self) -> None:
        """Pause the application: from here until ``thaw`` its on-disk state must not change."""

    @abstractmethod
    def thaw(self) -> None:
        """Let the application go on. Idempotent; safe when ``freeze`` failed or never ran."""

    def describe(self) -> str:
        return self.name

    def notes(self) -> list[str]:
        """What the snapshot should record about this freeze (a database's log position), read
        after ``freeze`` returned."""
        return []


def call_with_timeout(fn: Callable[[], None], timeout: float, name: str) -> BaseException | None:
    """Run ``fn`` in a daemon thread; its exception, a :class:`TimeoutError` when it has not
    returned after ``timeout`` seconds, or None. A timed-out call keeps running in the
    background (a thread cannot be killed)."""
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # reported to the caller
            box.append(e)
        else:
            box.append(None)

    t = threading.Thread(target=run, name=f"dingyuan-{name}", daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        return TimeoutError(f"no answer after {timeout:g} s")
    return box[0]


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


@dataclass
class QuiesceReport:
    """What the plugins did: ``ok`` is true when every plugin prepared and froze (vacuously
    true without plugins), ``errors`` lists every failure (thaw failures too), ``frozen_at`` is
    the monotonic time the first freeze began, ``thawed_at`` when the last thaw returned,
    ``notes`` what the plugins said about their freeze."""

    plugins: tuple[str, ...]
    ok: bool = True
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    frozen_at: float | None = None
    thawed_at: float | None = None

    @property
    def plugin(self) -> str | None:
        return "+".join(self.plugins) or None

    @property
    def paused_seconds(self) -> float:
        if self.frozen_at is None:
            return 0.0
        return (self.thawed_at or time.monotonic()) - self.frozen_at


class Quiescer:
    """Runs ``plugins`` around a point in time; see the module docstring for the rules."""

    def __init__(self, plugins: Sequence[Plugin] = (), on_failure: OnFailure = "crash") -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}")
        self.plugins = tuple(plugins)
        self.on_failure: OnFailure = on_failure
        self.report = QuiesceReport(tuple(p.describe() for p in self.plugins))
        self._to_thaw: list[Plugin] = []
        self._lock = threading.Lock()

    def _fail(self, plugin: Plugin, step: str, err: BaseException) -> None:
        detail = _describe(err)
        if isinstance(err, PluginFailed):
            detail = str(err.kwargs.get("detail") or err)
        msg = f"{plugin.describe()}: {step} failed: {detail}"
        log.warning("quiesce %s", msg)
        self.report.ok = False
        self.report.errors.append(msg)
        if self.on_failure == "skip":
            self.thaw()
            raise QuiesceFailed(plugin=plugin.describe(), step=step, detail=detail)
        self.thaw()

    def prepare(self) -> None:
        """Run every plugin's ``prepare``; a failure is handled by ``on_failure``."""
        for p in self.plugins:
            err = call_with_timeout(p.prepare, p.timeout + STEP_GRACE, f"{p.name}-prepare")
            if err is not None:
                self._fail(p, "prepare", err)
                return

    def freeze(self) -> bool:
        """Freeze every plugin in order (after a successful ``prepare``); true when all froze.
        After a failure every plugin is already thawed (or QuiesceFailed is raised)."""
        if not self.report.ok:
            return False
        if self.plugins:
            self.report.frozen_at = time.monotonic()
        for p in self.plugins:
            with self._lock:
                self._to_thaw.append(p)  # before freeze: a hung freeze is thawed too
            err = call_with_timeout(p.freeze, p.timeout + STEP_GRACE, f"{p.name}-freeze")
            if err is not None:
                self._fail(p, "freeze", err)
                return False
            self.report.notes.extend(f"{p.describe()}: {n}" for n in p.notes())
        return True

    def thaw(self) -> None:
        """Thaw every plugin that was asked to freeze, in reverse order, each with its timeout.
        Idempotent and thread-safe (the watchdog may call it concurrently)."""
        with self._lock:
            todo, self._to_thaw = self._to_thaw, []
        for p in reversed(todo):
            err = call_with_timeout(p.thaw, p.timeout + STEP_GRACE, f"{p.name}-thaw")
            if err is not None:
                msg = f"{p.describe()}: thaw failed: {_describe(err)}"
                log.error("quiesce %s", msg)
                self.report.errors.append(msg)
        if todo:
            self.report.thawed_at = time.monotonic()


class Watchdog:
    """Runs thaw actions (newest first) once ``timeout`` seconds have passed, unless stopped
    before. Actions must be idempotent: the normal path runs them too. ``fired`` tells whether
    the watchdog had to act."""

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout = timeout
        self.what = what
        self.fired = False
        self._actions: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, action: Callable[[], None]) -> None:
        with self._lock:
            self._actions.append(action)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dingyuan-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._stop.wait(self.timeout):
            return
        with self._lock:
            if self._stop.is_set():
                return
            self.fired = True
            actions = list(reversed(self._actions))
        log.error("watchdog: %s paused for %g s, thawing it", self.what, self.timeout)
        for action in actions:
            try:
                action()
            except Exception:
                log.exception("watchdog: a thaw action failed")

    def stop(self) -> None:
        """Disarm; when the watchdog is firing, wait (bounded) until its actions are done."""
        with self._lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + DEFAULT_STEP_TIMEOUT)
