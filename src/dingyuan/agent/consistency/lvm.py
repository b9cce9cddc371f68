"""LVM: a snapshot of a logical volume. **Untested on a real LVM here** (the test machine has no
device-mapper); the command sequence is tested on recorded outputs of the LVM tools.

1. ``lvs --noheadings --nosuffix --units b --separator | -o vg_name,lv_name,lv_attr,lv_size DEV``
   tells the volume group, the name and the kind (``lv_attr[0]``: ``-`` a plain volume, ``V`` a
   thin volume; anything else is refused).
2. Quiesce plugins freeze, then ``lvcreate --snapshot --name LV-dy-pit-RANDOM`` with
   ``--extents 10%ORIGIN`` (or ``--size``; thin volumes need neither and get
   ``--setactivationskip n`` so the snapshot is active). LVM suspends the device-mapper device
   while it switches, which freezes a mounted filesystem itself: the snapshot is
   filesystem-consistent (``application`` with plugins). Plugins thaw as soon as ``lvcreate``
   returns.
3. The runner reads ``/dev/VG/SNAPSHOT``.
4. Before the block exits cleanly, ``lvs -o lv_attr`` of the snapshot: a thick snapshot whose
   copy-on-write space ran out is invalid (``lv_attr[4] == 'I'``) and the run fails.
5. ``lvremove -f VG/SNAPSHOT`` whatever happened.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ...errors import ProviderFailed
from ..quiesce.base import Quiescer
from .base import PointInTime, Provider, ProviderOptions, paused
from .commands import Runner, run_command
from .linux import block_dev, mounts_of_device

log = logging.getLogger("dingyuan.agent.consistency")


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    lv: str
    attr: str
    size: int

    @property
    def thin(self) -> bool:
        return self.attr.startswith("V")


def parse_lvs(out: str) -> LogicalVolume:
    line = next((ln.strip() for ln in out.splitlines() if ln.strip()), "")
    parts = line.split("|")
    if len(parts) != 4:
        raise ValueError(f"unexpected lvs output: {out.strip()[:200]!r}")
    vg, lv, attr, size = (p.strip() for p in parts)
    return LogicalVolume(vg, lv, attr, int(size))


class LvmProvider(Provider):
    name = "lvm"

    def __init__(
        self, options: ProviderOptions | None = None, run: Runner | None = None, mounted: bool | None = None
    ) -> None:
        super().__init__(options)
        self.run: Runner = run or run_command
        self._mounted = mounted  # tests: whether the volume counts as mounted

    def volume(self, source: str | Path) -> LogicalVolume:
        out = self.run(
            [
                "lvs",
                "--noheadings",
                "--nosuffix",
                "--units",
                "b",
                "--separator",
                "|",
                "-o",
                "vg_name,lv_name,lv_attr,lv_size",
                str(source),
            ]
        )
        return parse_lvs(out)

    def check(self, source: str | Path) -> str | None:
        try:
            lv = self.volume(source)
        except (ProviderFailed, ValueError) as e:
            return f"it is not an LVM logical volume ({e})"
        if lv.attr[:1] not in ("-", "V"):
            return f"{lv.vg}/{lv.lv} is not a plain or thin volume (lv_attr {lv.attr})"
        return None

    def create_args(self, lv: LogicalVolume, snap: str) -> list[str]:
        argv = ["lvcreate", "--snapshot", "--name", snap]
        if lv.thin:
            argv += ["--setactivationskip", "n"]
        else:
            size = self.options.lvm_snapshot_size
            argv += ["--extents", size] if "%" in size else ["--size", size]
        return [*argv, f"{lv.vg}/{lv.lv}"]

    def is_mounted(self, source: str | Path) -> bool:
        if self._mounted is not None:
            return self._mounted
        try:
            dev = block_dev(source)
        except OSError:
            return False
        return dev is not None and bool(mounts_of_device(dev))

    @contextmanager
    def take(self, source: str | Path, quiescer: Quiescer | None = None) -> Iterator[PointInTime]:
        lv = self.volume(source)
        snap = f"{lv.lv}-dy-pit-{secrets.token_hex(4)}"
        target = f"{lv.vg}/{snap}"
        attempted = False
        try:
            with paused(
                quiescer, [], self.options.freeze_timeout, f"the snapshot of {lv.vg}/{lv.lv}"
            ) as pause:
                attempted = True
                self.run(self.create_args(lv, snap))
            inherent = "filesystem" if self.is_mounted(source) else "crash"
            pit = PointInTime(
                Path("/dev") / lv.vg / snap,
                pause.level(inherent),
                self.name,
                paused_seconds=pause.seconds,
                plugin=pause.report.plugin,
                notes=pause.notes(),
                pause=pause,
            )
            yield pit
            attr = self.run(["lvs", "--noheadings", "-o", "lv_attr", target]).strip()
            if len(attr) > 4 and attr[4] == "I":
                raise ProviderFailed(
                    provider=self.name,
                    source=str(source),
                    detail="the snapshot ran out of copy-on-write space while it was read "
                    "(raise the policy's LVM snapshot size)",
                )
        finally:
            if attempted:
                try:
                    self.run(["lvremove", "-f", target])
                except ProviderFailed as e:
                    log.error("cannot remove the LVM snapshot %s: %s", target, e)
