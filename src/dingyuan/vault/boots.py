"""Snapshots booted as VMs on the vault's machine, and recovery drills that prove they boot.

A boot is a qemu VM (:mod:`dingyuan.recovery.vm`) whose disk is a writable export of a clone: a
snapshot is never written, and what the VM writes stays in the clone, which can be promoted to a
volume of its own. Each boot has a directory ``<vault dir>/vms/<id>/`` holding the VM's state
(``vm.json``: qemu runs in a session of its own, so it outlives a restarted vault), its serial
console log, its monitor and VNC sockets, and ``boot.json``, what the vault made for it (the export
and the clone). Stopping a boot stops the VM and the export and keeps the clone.

A drill boots a snapshot isolated (no network but a forwarded probe port), waits for a health
probe (a serial-console pattern or a TCP port) within a timeout, and records the verdict and the
time to ready on the snapshot (its ``drill`` annotation); the clone it used is deleted afterwards.
A database drill mounts the snapshot read/write through a clone and starts PostgreSQL or MariaDB
on it (:mod:`dingyuan.recovery.dbdrill`).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.orm import Session

from ..catalog.models import Export
from ..catalog.models import Snapshot as SnapshotRow
from ..errors import DingyuanError, ExportError, NotFound, UsageError
from ..exports.mount import mounted
from ..recovery.dbdrill import DrillResult, Engine
from ..recovery.dbdrill import drill as database_drill
from ..recovery.vm import Vm, VmSpec
from ..repository.manifest import CloneInfo, Snapshot, fmt_time, utcnow
from .exports import ExportService
from .jobs import JobKind, JobState, VaultJob

log = logging.getLogger(__name__)
EXTRA = "boots"  # the service's key in VaultContext.extras
VMS_DIR = "vms"
LOCAL_ONLY = ["127.0.0.0/8"]  # a boot's export serves the VM on this machine only
DrillKind = Literal["boot", "postgresql", "mariadb"]


@dataclass
class BootInfo:
    """What the vault made for one boot (``boot.json``)."""

    id: str
    export_id: int
    clone_id: str
    snapshot_id: str
    created: str
    created_by: str


@dataclass
class VmOptions:
    memory_mib: int = 1024
    cpus: int = 1
    network: Literal["isolated", "user", "bridge"] = "isolated"
    bridge: str | None = None
    firmware: Literal["bios", "uefi"] = "bios"
    vnc: bool = True
    probe_port: int | None = None


class BootService:
    """The VMs of one vault, on top of its export service."""

    def __init__(self, exports: ExportService) -> None:
        self.exports = exports
        self.root = exports.ctx.cfg.dir / VMS_DIR
        self.root.mkdir(mode=0o700, exist_ok=True)
        self._drill_lock = threading.Lock()

    # boots ------------------------------------------------------------------------------------
    def boot(
        self,
        session: Session,
        *,
        snapshot: Snapshot | None,
        clone: CloneInfo | None,
        options: VmOptions,
        actor: str,
    ) -> tuple[BootInfo, Vm]:
        """Boot a snapshot (through a new clone) or a clone; the export row is added to
        ``session``. Raises ExportError with qemu's message if the VM does not start."""
        row = self.exports.create(
            session, snapshot=snapshot, clone=clone, writable=True, allowed_clients=LOCAL_ONLY, actor=actor
        )
        boot_id = secrets.token_hex(6)
        info = BootInfo(
            id=boot_id,
            export_id=row.id,
            clone_id=row.target,
            snapshot_id=self.exports.clones.get(row.target).base.id,
            created=fmt_time(utcnow()),
            created_by=actor,
        )
        run_dir = self.root / boot_id
        try:
            run_dir.mkdir(mode=0o700)
            (run_dir / "boot.json").write_text(json.dumps(asdict(info)))
            vm = Vm.start(self._spec(f"boot-{boot_id}", self.exports.local_uri(row), options), run_dir)
        except BaseException:
            self.exports.remove(session, row)
            shutil.rmtree(run_dir, ignore_errors=True)
            if snapshot is not None:  # the clone made for this boot holds nothing yet
                session.flush()
                self.exports.delete_clone(session, self.exports.clones.get(row.target))
            raise
        return info, vm

    def _spec(self, name: str, uri: str, options: VmOptions) -> VmSpec:
        return VmSpec(name=name, disk_uri=uri, **asdict(options))

    def boots(self) -> list[tuple[BootInfo, Vm | None]]:
        """Every boot, oldest first, with its VM (None if its state cannot be read)."""
        out = []
        for path in sorted(self.root.glob("*/boot.json")):
            info = BootInfo(**json.loads(path.read_text()))
            try:
                vm: Vm | None = Vm.load(path.parent)
            except DingyuanError:
                vm = None
            out.append((info, vm))
        return sorted(out, key=lambda b: b[0].created)

    def get(self, boot_id: str) -> tuple[BootInfo, Vm | None]:
        for info, vm in self.boots():
            if info.id == boot_id:
                return info, vm
        raise NotFound(f"no boot {boot_id!r}; list them with GET /api/v1/boots")

    def stop(self, session: Session, boot_id: str) -> BootInfo:
        """Stop the VM (ACPI power button, then harder) and its export; the clone keeps what the
        VM wrote."""
        info, vm = self.get(boot_id)
        if vm is not None and vm.alive():
            vm.stop()
        row = session.get(Export, info.export_id)
        if row is not None:
            self.exports.remove(session, row)
        shutil.rmtree(self.root / boot_id, ignore_errors=True)
        return info

    # drills -----------------------------------------------------------------------------------
    def start_drill(self, snapshot: Snapshot, volume_id: int | None, spec: dict[str, Any], actor: str) -> int:
        """Run a drill (``spec``: a :class:`~dingyuan.vault.schemas.DrillSpec` as a dict) on
        ``snapshot`` as a vault job in a thread of its own; returns the job's id. Drills run one
        at a time: a VM under software emulation takes what the machine has."""
        ctx = self.exports.ctx
        job = VaultJob(
            ctx.engine, JobKind.DRILL, utcnow(), volume_id, {"snapshot": snapshot.id, "kind": spec["kind"]}
        )

        def run() -> None:
            try:
                with self._drill_lock, Session(ctx.engine) as session, session.begin():
                    verdict = self.drill(
                        session,
                        snapshot,
                        spec["kind"],
                        pattern=re.escape(spec["pattern"]) if spec.get("pattern") else None,
                        probe_port=spec.get("port"),
                        timeout=spec.get("timeout_seconds", 300),
                        options=VmOptions(memory_mib=spec.get("memory_mib", 1024), vnc=False),
                        actor=actor,
                    )
                job.end(JobState.SUCCEEDED, {"verdict": verdict})
            except DingyuanError as e:
                job.end(JobState.FAILED, {}, str(e))
            except Exception as e:
                log.exception("drill of snapshot %s failed", snapshot.id[:12])
                job.end(JobState.FAILED, {}, f"{type(e).__name__}: {e}")

        threading.Thread(target=run, name=f"drill-{job.id}", daemon=True).start()
        return job.id

    def drill(
        self,
        session: Session,
        snapshot: Snapshot,
        kind: DrillKind,
        *,
        pattern: str | None = None,
        probe_port: int | None = None,
        timeout: float = 300.0,
        options: VmOptions | None = None,
        actor: str,
    ) -> dict[str, Any]:
        """Run a drill on ``snapshot`` and record its verdict on it (the ``drill`` annotation).
        Returns the verdict: ``{"kind", "result": "passed"|"failed", "seconds", "time", "detail"}``."""
        clone = self.exports.new_clone(snapshot, f"drill-{snapshot.id[:8]}-{secrets.token_hex(3)}")
        started = time.monotonic()
        try:
            if kind == "boot":
                result = self._boot_drill(session, clone, pattern, probe_port, timeout, options, actor)
            else:
                result = self._database_drill(session, clone, kind, timeout, actor)
        finally:
            try:
                self.exports.delete_clone(session, clone)
            except DingyuanError as e:  # the verdict stands; the clone is left for the operator
                log.error(
                    "drill clone %s of snapshot %s was not deleted: %s", clone.name, snapshot.id[:12], e
                )
        verdict = {
            "kind": kind,
            "result": "passed" if result.ok else "failed",
            "seconds": round(result.seconds, 1),
            "time": fmt_time(utcnow()),
            "detail": result.detail[-2000:],
            "wall_seconds": round(time.monotonic() - started, 1),
        }
        self._record(session, snapshot, verdict)
        return verdict

    def _boot_drill(
        self,
        session: Session,
        clone: CloneInfo,
        pattern: str | None,
        probe_port: int | None,
        timeout: float,
        options: VmOptions | None,
        actor: str,
    ) -> DrillResult:
        if (pattern is None) == (probe_port is None):
            raise ExportError("a boot drill needs exactly one probe: a console pattern or a TCP port")
        opts = options or VmOptions(vnc=False)
        opts.network, opts.bridge, opts.probe_port = "isolated", None, probe_port
        row = self.exports.create(
            session, snapshot=None, clone=clone, writable=True, allowed_clients=LOCAL_ONLY, actor=actor
        )
        run_dir = Path(tempfile.mkdtemp(prefix="drill-", dir=self.root))
        vm = None
        try:
            vm = Vm.start(self._spec(f"drill-{clone.id[:8]}", self.exports.local_uri(row), opts), run_dir)
            if pattern is not None:
                seconds = vm.wait_for_serial(pattern, timeout)
                what = f"console showed {pattern!r}"
            else:
                seconds = vm.wait_for_tcp(timeout)
                what = f"port {probe_port} answered"
            return DrillResult(True, seconds, f"{what} {seconds:.1f} s after power-on")
        except ExportError as e:
            return DrillResult(False, 0.0, str(e))
        finally:
            if vm is not None and vm.alive():
                vm.stop(timeout=10)
            self.exports.remove(session, row)
            shutil.rmtree(run_dir, ignore_errors=True)

    def _database_drill(
        self, session: Session, clone: CloneInfo, kind: DrillKind, timeout: float, actor: str
    ) -> DrillResult:
        row = self.exports.create(
            session, snapshot=None, clone=clone, writable=True, allowed_clients=LOCAL_ONLY, actor=actor
        )
        # the server runs as its data's owner, who must reach the mount: not under the vault's
        # private directory, in a temporary one anyone may traverse (but not list)
        state = Path(tempfile.mkdtemp(prefix="dingyuan-drill-"))
        state.chmod(0o711)
        try:
            with mounted(self.exports.local_uri(row), writable=True, state_dir=state) as info:
                engine: Engine = "postgresql" if kind == "postgresql" else "mariadb"
                return database_drill(info.target, engine=engine, start_timeout=timeout)
        except ExportError as e:
            return DrillResult(False, 0.0, f"cannot mount the snapshot: {e}")
        except UsageError as e:  # no data directory of that engine, or no server programs for it
            return DrillResult(False, 0.0, str(e))
        finally:
            self.exports.remove(session, row)
            shutil.rmtree(state, ignore_errors=True)

    def _record(self, session: Session, snapshot: Snapshot, verdict: dict[str, Any]) -> None:
        ctx = self.exports.ctx
        with ctx.repo_lock:
            snap = ctx.repo.read_snapshot(snapshot.id)
            snap.annotations = {**snap.annotations, "drill": verdict}
            ctx.repo.update_snapshot(snap)
        row = session.get(SnapshotRow, snapshot.id)
        if row is not None:
            row.annotations = snap.annotations
