"""Freeze: a mounted filesystem on a block device without a snapshot facility.

The filesystem is frozen (FIFREEZE) for the **whole read**: the runner's scan happens inside the
``with`` block, then it is thawed. Applications that write wait all that time, so the provider
accepts a source only when the read fits the policy's ``max_pause`` (default 5 s): it refuses
up front when ``size / speed × 1.25`` exceeds it, ``speed`` being the runner's last scan speed
or, without one, a measured read of the device. A watchdog thaws at ``max_pause`` anyway; the
run then fails with FreezeTimeout and nothing is committed.

It also refuses the root filesystem and any filesystem holding a ``keep_writable`` path (the
agent's state and logs): the agent would wait for itself.

After the freeze the device's page cache is dropped: blocks read before (a previous run) may
predate writes the filesystem sent to the device directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..quiesce.base import Quiescer
from .base import PointInTime, Provider, paused
from .linux import Mount, block_dev, device_size, mount_of, mounts_of_device

#: the estimated read time times this must fit in max_pause
SAFETY = 1.25
#: bytes read to measure a device's speed
SAMPLE_BYTES = 32 << 20
MiB = 1 << 20


def measure_read_speed(path: str | Path, sample: int = SAMPLE_BYTES) -> float:
    """Bytes per second of an uncached sequential read of up to ``sample`` bytes of ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        n = min(sample, size)
        os.posix_fadvise(fd, 0, n, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            got = os.pread(fd, min(1 << 20, n - done), done)
            if not got:
                break
            done += len(got)
        return done / max(time.perf_counter() - t0, 1e-6)
    finally:
        os.close(fd)


class FreezeProvider(Provider):
    name = "freeze"

    def _mount(self, source: str | Path) -> Mount | str:
        try:
            dev = block_dev(source)
        except OSError as e:
            return f"cannot stat it: {e.strerror or e}"
        if dev is None:
            return "it is not a block device (freeze reads a mounted block device)"
        found = mounts_of_device(dev)
        if not found:
            return "it is not mounted: there is no filesystem to freeze"
        return found[0]

    def check(self, source: str | Path) -> str | None:
        m = self._mount(source)
        if isinstance(m, str):
            return m
        if os.geteuid() != 0:
            return "freezing a filesystem needs root (CAP_SYS_ADMIN)"
        if m.mountpoint == "/":
            return "it holds the root filesystem: freezing it would stop the agent itself"
        for keep in self.options.keep_writable:
            km = mount_of(keep)
            if km is not None and km.dev == m.dev:
                return f"it holds {keep}, which the agent writes during a run"
        size = device_size(source)
        speed = self.options.scan_speed or measure_read_speed(source)
        estimate = size / max(speed, 1.0)
        limit = self.options.max_pause
        if estimate * SAFETY > limit:
            return (
                f"reading its {size / MiB:.0f} MiB at {speed / MiB:.0f} MiB/s takes about {estimate:.1f} s, "
                f"too long for the policy's maximum pause of {limit:g} s; use a snapshot facility "
                "(LVM, an image file on XFS/btrfs) or raise the maximum pause"
            )
        return None

    @contextmanager
    def take(self, source: str | Path, quiescer: Quiescer | None = None) -> Iterator[PointInTime]:
        m = self._mount(source)
        if isinstance(m, str):
            raise self.unavailable(source, m)
        what = f"the filesystem on {source} ({m.mountpoint})"
        with paused(quiescer, [m.mountpoint], self.options.max_pause, what) as pause:
            fd = os.open(source, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            pit = PointInTime(Path(source), pause.level(), self.name, plugin=pause.report.plugin, pause=pause)
            yield pit
        pit.paused_seconds = pause.seconds
        pit.notes = pause.notes()
