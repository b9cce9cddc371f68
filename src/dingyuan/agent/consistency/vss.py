"""Windows VSS: a shadow copy of a volume. **Designed, not tested on Windows**: the command
sequence and the parsers are tested on recorded outputs of ``diskshadow`` and ``vssadmin``.

1. Quiesce plugins freeze (scripts, for applications without a VSS writer).
2. ``diskshadow /s SCRIPT`` with a persistent, writer-involving shadow copy::

       set context persistent
       set verbose on
       begin backup
       add volume C: alias dy
       create
       end backup

   VSS asks every writer (SQL Server, Exchange, Hyper-V, the registry, ...) to freeze, flushes
   NTFS, takes the shadow copy, and thaws the writers (VSS holds writes for at most 10 s). We
   read ``Shadow copy ID`` and ``Shadow copy device name``
   (``\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopyN``) from its output. Plugins thaw when
   diskshadow returns. (diskshadow ships with Windows Server; a client Windows needs a VSS
   requestor of our own through the COM API, the same sequence.)
3. ``vssadmin list writers``: a writer whose ``Last error`` is not ``No error`` did not quiesce
   its application: handled like a failed quiesce plugin (``crash`` label, or no snapshot).
4. The runner reads the shadow copy device (a volume image).
5. ``vssadmin delete shadows /shadow={ID} /quiet`` whatever happened.

To check on Windows: the backup type diskshadow declares to the writers (a "copy" backup must
not truncate SQL Server or Exchange logs), and reading the device object with the scan's
``os.open``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ...errors import ProviderFailed, QuiesceFailed
from ..quiesce.base import Quiescer
from .base import PointInTime, Provider, ProviderOptions, paused
from .commands import Runner, run_command

log = logging.getLogger("dingyuan.agent.consistency")

ALIAS = "dy"


@dataclass(frozen=True)
class Shadow:
    id: str
    device: str


@dataclass(frozen=True)
class Writer:
    name: str
    state: str
    last_error: str

    @property
    def ok(self) -> bool:
        return self.last_error.lower() == "no error" and "failed" not in self.state.lower()


def volume_of(source: str | Path) -> str:
    """``C:`` from ``C:``, ``C:\\``, ``\\\\.\\C:`` or ``\\\\?\\C:``."""
    m = re.fullmatch(r"(?:\\\\[.?]\\)?([A-Za-z]):\\?", str(source))
    if not m:
        raise ValueError(f"{source} is not a volume letter (C: or \\\\.\\C:)")
    return f"{m.group(1).upper()}:"


def diskshadow_script(volume: str) -> str:
    return "\r\n".join(
        [
            "set context persistent",
            "set verbose on",
            "begin backup",
            f"add volume {volume} alias {ALIAS}",
            "create",
            "end backup",
            "",
        ]
    )


def parse_diskshadow(out: str) -> Shadow:
    """The shadow copy diskshadow created (its ID and device name)."""
    sid = re.search(r"Shadow copy ID = (\{[0-9A-Fa-f-]{36}\})", out)
    dev = re.search(r"Shadow copy device name: (\\\\\?\\GLOBALROOT\\Device\\\S+)", out)
    if not sid or not dev:
        err = next((ln.strip() for ln in out.splitlines() if "error" in ln.lower()), out.strip()[-300:])
        raise ValueError(f"diskshadow created no shadow copy: {err}")
    return Shadow(sid.group(1), dev.group(1))


def parse_writers(out: str) -> list[Writer]:
    writers = []
    for block in re.split(r"\r?\n\s*\r?\n", out):
        name = re.search(r"Writer name: '([^']*)'", block)
        state = re.search(r"State: (.*)", block)
        err = re.search(r"Last error: (.*)", block)
        if name and state and err:
            writers.append(Writer(name.group(1), state.group(1).strip(), err.group(1).strip()))
    return writers


class VssProvider(Provider):
    name = "vss"

    def __init__(
        self, options: ProviderOptions | None = None, run: Runner | None = None, windows: bool | None = None
    ) -> None:
        super().__init__(options)
        self.run: Runner = run or run_command
        self.windows = os.name == "nt" if windows is None else windows

    def check(self, source: str | Path) -> str | None:
        if not self.windows:
            return "VSS exists only on Windows"
        try:
            volume_of(source)
        except ValueError as e:
            return str(e)
        return None

    def _create(self, volume: str) -> Shadow:
        fd, script = tempfile.mkstemp(prefix="dingyuan-vss-", suffix=".dsh")
        try:
            with os.fdopen(fd, "w", newline="") as f:
                f.write(diskshadow_script(volume))
            out = self.run(["diskshadow", "/s", script])
        finally:
            os.unlink(script)
        try:
            return parse_diskshadow(out)
        except ValueError as e:
            raise ProviderFailed(provider=self.name, source=volume, detail=str(e)) from None

    @contextmanager
    def take(self, source: str | Path, quiescer: Quiescer | None = None) -> Iterator[PointInTime]:
        volume = volume_of(source)
        q = quiescer if quiescer is not None else Quiescer()
        shadow: Shadow | None = None
        try:
            with paused(q, [], self.options.freeze_timeout, f"the shadow copy of {volume}") as pause:
                shadow = self._create(volume)
            writers = parse_writers(self.run(["vssadmin", "list", "writers"]))
            failed = [w for w in writers if not w.ok]
            for w in failed:
                msg = f"VSS writer {w.name}: {w.state}, last error {w.last_error}"
                q.report.errors.append(msg)
                q.report.ok = False
                if q.on_failure == "skip":
                    raise QuiesceFailed(plugin=f"VSS writer {w.name}", step="freeze", detail=w.last_error)
            inherent = "application" if writers and not failed else "filesystem"
            yield PointInTime(
                Path(shadow.device),
                pause.level(inherent),
                self.name,
                paused_seconds=pause.seconds,
                plugin=pause.report.plugin,
                notes=[*pause.notes(), f"shadow copy {shadow.id}"],
                pause=pause,
            )
        finally:
            if shadow is not None:
                try:
                    self.run(["vssadmin", "delete", "shadows", f"/shadow={shadow.id}", "/quiet"])
                except ProviderFailed as e:
                    log.error("cannot delete the shadow copy %s: %s", shadow.id, e)
