"""Consistency providers: a source made readable at one point in time.

A **provider** turns a volume's source (a disk-image file or a block device) into a path that
reads one instant of it, for as long as a ``with`` block lasts::

    provider = choose(policy.consistency, source, options)      # refuses up front, with a reason
    with provider.take(source, Quiescer(plugins, on_failure)) as pit:
        result = scan(pit.path)                                 # read the point in time
        pit.check()                                             # still valid? (freeze provider)
    # leaving the block deleted the clone / snapshot, thawed what was frozen, and raised
    # FreezeTimeout if the watchdog had to thaw: then nothing may be committed
    snapshot.consistency = pit.level
    snapshot.stats.update(pit.stats())                          # provider, plugin, paused_ms

The **pause** (:func:`paused`) is the same for every provider: prepare the quiesce plugins (may
take a while, nothing paused yet), freeze the plugins, freeze the mounted filesystems
(FIFREEZE: the kernel syncs them and blocks writers), take the instant, thaw the filesystems,
thaw the plugins. Thawing happens in ``finally`` whatever failed, and a :class:`Watchdog` thaws
everything on its own when the pause outlasts its limit.

**Levels** (``repository.manifest.CONSISTENCY_LEVELS``): ``application`` when every quiesce
plugin froze; ``filesystem`` when the filesystems in the source were frozen (or the snapshot
facility freezes them itself) but no plugin ran; ``crash`` otherwise — also when a plugin
failed and the policy said to go on.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...errors import FreezeTimeout, ProviderFailed, ProviderUnavailable, UsageError
from ...repository.manifest import CONSISTENCY_LEVELS
from ..quiesce.base import Quiescer, QuiesceReport, Watchdog
from .linux import FsFreeze

log = logging.getLogger("dingyuan.agent.consistency")

#: provider names a policy may use
PROVIDER_NAMES = ("auto", "reflink", "btrfs", "freeze", "lvm", "vss", "live")
#: consistency levels used as policy names: the level asked for picks the provider
LEVEL_ALIASES = {"crash": "live", "filesystem": "auto", "application": "auto"}


@dataclass(frozen=True)
class ProviderOptions:
    """Knobs of the providers (from the policy and the agent's configuration).

    ``freeze_timeout``: the watchdog of an instant pause (reflink, lvm, vss), seconds.
    ``max_pause``: the longest a filesystem may stay frozen while the whole source is read
    (freeze provider), seconds. ``scan_speed``: bytes per second the runner's scan reads
    (its last run's figure); None measures the device. ``keep_writable``: paths (the agent's
    state and log directories) whose filesystem must never be frozen. ``lvm_snapshot_size``:
    the copy-on-write space of an LVM snapshot (``lvcreate --size`` or ``--extents`` with %).
    """

    freeze_timeout: float = 10.0
    max_pause: float = 5.0
    scan_speed: float | None = None
    keep_writable: tuple[Path, ...] = ()
    lvm_snapshot_size: str = "10%ORIGIN"


@dataclass
class PointInTime:
    """A readable instant of a source. ``paused_seconds`` and ``notes`` are final when the
    ``with`` block has exited; ``level`` is known when it starts."""

    path: Path
    level: str
    provider: str
    paused_seconds: float = 0.0
    plugin: str | None = None
    notes: list[str] = field(default_factory=list)
    pause: Pause | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.level not in CONSISTENCY_LEVELS:
            raise ValueError(f"level must be one of {', '.join(CONSISTENCY_LEVELS)}")

    def check(self) -> None:
        """Raise FreezeTimeout when the watchdog already thawed what this instant relies on
        (call it after reading, before committing)."""
        if self.pause is not None and self.pause.watchdog.fired:
            raise FreezeTimeout(what=self.pause.watchdog.what, limit=f"{self.pause.watchdog.timeout:g}")

    def stats(self) -> dict[str, Any]:
        """What a snapshot's ``stats`` records about its point in time."""
        out: dict[str, Any] = {
            "consistency_provider": self.provider,
            "paused_ms": round(self.paused_seconds * 1000, 3),
        }
        if self.plugin:
            out["quiesce_plugin"] = self.plugin
        if self.notes:
            out["consistency_notes"] = list(self.notes)
        return out


@dataclass
class Pause:
    """What one pause did: the plugins' report, the filesystems frozen, how long."""

    report: QuiesceReport
    watchdog: Watchdog
    frozen: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def level(self, inherent: str = "crash") -> str:
        """The level this pause gives; ``inherent`` is what the provider guarantees without
        plugins (an LVM snapshot of a mounted volume: ``filesystem``)."""
        if not self.report.ok:
            return "crash"
        if self.report.plugins:
            return "application"
        if self.frozen:
            return "filesystem"
        return inherent

    def notes(self) -> list[str]:
        out = [f"quiesce: {e}" for e in self.report.errors]
        out += [f"quiesce: {n}" for n in self.report.notes]
        out += [f"froze {mp}" for mp in self.frozen]
        if self.watchdog.fired:
            out.append(f"watchdog thawed after {self.watchdog.timeout:g} s")
        return out


@contextmanager
def paused(
    quiescer: Quiescer | None, mountpoints: Sequence[str], timeout: float, what: str
) -> Iterator[Pause]:
    """Prepare and freeze the plugins, freeze ``mountpoints``, yield; thaw everything in
    ``finally`` (filesystems first, then plugins). A watchdog thaws at ``timeout`` seconds after
    the freeze began; when it did, leaving the block raises FreezeTimeout."""
    q = quiescer if quiescer is not None else Quiescer()
    q.prepare()
    wd = Watchdog(timeout, what)
    wd.add(q.thaw)
    pause = Pause(q.report, wd)
    freezes: list[FsFreeze] = []
    t0 = time.monotonic()
    wd.start()
    try:
        q.freeze()
        for mp in mountpoints:
            f = FsFreeze(mp)
            freezes.append(f)
            wd.add(f.thaw)
            try:
                f.freeze()
            except OSError as e:
                raise ProviderFailed(
                    provider="freeze", source=mp, detail=f"FIFREEZE: {e.strerror or e}"
                ) from None
            pause.frozen.append(mp)
        yield pause
    finally:
        for f in reversed(freezes):
            try:
                f.thaw()
            except OSError as e:
                log.error("cannot thaw %s: %s", f.mountpoint, e)
                q.report.errors.append(f"thaw {f.mountpoint}: {e.strerror or e}")
        q.thaw()
        wd.stop()
        if pause.frozen or q.report.frozen_at is not None:
            pause.seconds = time.monotonic() - t0
    if wd.fired:
        raise FreezeTimeout(what=what, limit=f"{timeout:g}")


class Provider(ABC):
    """Makes a source readable at one point in time. ``check`` answers up front (None, or why
    not); ``take`` is a context manager that yields a :class:`PointInTime` and cleans up on
    exit whatever happened (deletes the clone or snapshot, thaws)."""

    name: ClassVar[str]

    def __init__(self, options: ProviderOptions | None = None) -> None:
        self.options = options or ProviderOptions()

    @abstractmethod
    def check(self, source: str | Path) -> str | None:
        """None when this provider can serve ``source``, else the reason it cannot."""

    @abstractmethod
    def take(
        self, source: str | Path, quiescer: Quiescer | None = None
    ) -> AbstractContextManager[PointInTime]:
        """A point in time of ``source`` for the duration of the ``with`` block."""

    def unavailable(self, source: str | Path, reason: str) -> ProviderUnavailable:
        return ProviderUnavailable(provider=self.name, source=str(source), reason=reason)


def provider_class(name: str) -> type[Provider]:
    from .freeze import FreezeProvider
    from .live import LiveProvider
    from .lvm import LvmProvider
    from .reflink import BtrfsProvider, ReflinkProvider
    from .vss import VssProvider

    classes: dict[str, type[Provider]] = {
        "reflink": ReflinkProvider,
        "btrfs": BtrfsProvider,
        "freeze": FreezeProvider,
        "lvm": LvmProvider,
        "vss": VssProvider,
        "live": LiveProvider,
    }
    try:
        return classes[name]
    except KeyError:
        raise UsageError(
            f"unknown consistency provider {name!r}: use one of {', '.join(PROVIDER_NAMES)}"
        ) from None


def auto_candidates(source: str | Path) -> list[str]:
    """The providers ``auto`` tries, best first: an atomic snapshot before a long freeze.
    ``live`` is never chosen automatically: a crash-consistent read is asked for explicitly."""
    if os.name == "nt":
        return ["vss"]
    try:
        mode = os.stat(source).st_mode
    except OSError:
        return ["reflink"]
    if stat.S_ISBLK(mode):
        return ["lvm", "freeze"]
    return ["reflink"]


def choose(name: str, source: str | Path, options: ProviderOptions | None = None) -> Provider:
    """The provider a policy names (``auto``, a provider name, or a consistency level:
    ``crash`` reads live, ``filesystem``/``application`` mean ``auto``), checked against
    ``source``: raises ProviderUnavailable with the reason(s) when it cannot serve it."""
    name = LEVEL_ALIASES.get(name, name)
    if name != "auto":
        provider = provider_class(name)(options)
        reason = provider.check(source)
        if reason is not None:
            raise provider.unavailable(source, reason)
        return provider
    reasons = []
    for candidate in auto_candidates(source):
        provider = provider_class(candidate)(options)
        reason = provider.check(source)
        if reason is None:
            return provider
        reasons.append(f"{candidate}: {reason}")
    raise ProviderUnavailable(provider="auto", source=str(source), reason="; ".join(reasons))
