"""The vault's exports: snapshots and clones served over NBD while the vault runs.

One :class:`ExportService` per vault process owns the NBD server (its own thread and event loop),
the clone store (``<vault dir>/clones``) and the devices being served. Exports are rows of the
catalog, so a restarted vault serves them again; the devices are opened when an export starts
and closed when its last export stops. A clone is open in one place only: two exports of one
clone share its device.

An export name is 32 random bytes in base32: a client that does not know it cannot connect, and
the server does not list exports. ``allowed_clients`` narrows who may connect further.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..catalog.models import Export
from ..errors import Conflict, ExportError, UsageError
from ..exports.blockdev import BlockDevice
from ..exports.nbd.server import ThreadedNbdServer
from ..repository.clone import CloneStore
from ..repository.image import SnapshotImage
from ..repository.manifest import CloneInfo, Snapshot
from .context import VaultContext

log = logging.getLogger(__name__)
EXTRA = "exports"  # the service's key in VaultContext.extras
CLONES_DIR = "clones"
DEFAULT_NBD_PORT = 10809


def new_export_name() -> str:
    return base64.b32encode(secrets.token_bytes(20)).decode().lower()


def check_networks(networks: list[str] | None) -> list[str] | None:
    """Normalised networks (``10.0.0.0/8``, a bare address is a /32 or /128); UsageError if one
    is not a network."""
    if networks is None:
        return None
    out = []
    for n in networks:
        try:
            out.append(str(ipaddress.ip_network(n, strict=False)))
        except ValueError:
            raise UsageError(
                f"{n!r} is not an IP address or network (e.g. 192.0.2.7 or 10.1.0.0/16)"
            ) from None
    return out


WILDCARDS = ("0.0.0.0", "::", "")


def _nbd_uri(host: str, port: int, name: str) -> str:
    return f"nbd://{f'[{host}]' if ':' in host else host}:{port}/{name}"


@dataclass
class _Open:
    device: BlockDevice
    users: int


class ExportService:
    """Exports of one vault: create, list, remove; served on ``host:port`` (port 0: a free one)."""

    def __init__(self, ctx: VaultContext, host: str, port: int, advertise: str | None = None) -> None:
        self.ctx = ctx
        self.clones = CloneStore(ctx.repo, ctx.cfg.dir / CLONES_DIR)
        self.server = ThreadedNbdServer(host=host, port=port)
        self.host = host
        self.advertise = advertise
        self._lock = threading.RLock()
        self._open: dict[str, _Open] = {}  # "snapshot:<id>" / "clone:<id>" -> device

    # lifetime -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the NBD server and serve every export of the catalog again."""
        self.server.start()
        with Session(self.ctx.engine) as session, session.begin():
            for row in session.scalars(select(Export).order_by(Export.id)):
                try:
                    self._serve(row)
                except Exception as e:  # a vanished snapshot or clone must not stop the vault
                    log.error("export %d (%s %s) cannot be served again: %s", row.id, row.kind, row.target, e)

    def stop(self) -> None:
        self.server.close()
        with self._lock:
            for opened in self._open.values():
                opened.device.close()
            self._open.clear()

    @property
    def port(self) -> int:
        return self.server.port

    def uri(self, row: Export) -> str:
        """The URI clients use: the advertised address (``nbd_advertise`` in vault.json), else the
        listening one, else (listening on every address) this machine's name."""
        host = self.advertise or self.host
        if host in WILDCARDS:
            host = socket.getfqdn()
        return _nbd_uri(host, self.port, row.name)

    def local_uri(self, row: Export) -> str:
        """The URI for the vault's own machine (its VMs and mounts): loopback when it listens there."""
        return _nbd_uri("127.0.0.1" if self.host in WILDCARDS else self.host, self.port, row.name)

    # devices ----------------------------------------------------------------------------------------
    def _acquire(self, kind: str, target: str) -> BlockDevice:
        key = f"{kind}:{target}"
        with self._lock:
            opened = self._open.get(key)
            if opened is None:
                if kind == "snapshot":
                    device: BlockDevice = SnapshotImage(self.ctx.repo, self.ctx.repo.read_snapshot(target))
                else:
                    device = self.clones.open(target)
                opened = self._open[key] = _Open(device, 0)
            opened.users += 1
            return opened.device

    def _release(self, kind: str, target: str) -> None:
        key = f"{kind}:{target}"
        with self._lock:
            opened = self._open.get(key)
            if opened is None:
                return
            opened.users -= 1
            if opened.users <= 0:
                del self._open[key]
                opened.device.close()

    def _serve(self, row: Export) -> None:
        device = self._acquire(row.kind, row.target)
        try:
            self.server.add(row.name, device, allowed_clients=row.allowed_clients)
        except BaseException:
            self._release(row.kind, row.target)
            raise

    # exports ------------------------------------------------------------------------------------------
    def create(
        self,
        session: Session,
        *,
        snapshot: Snapshot | None,
        clone: CloneInfo | None,
        writable: bool,
        allowed_clients: list[str] | None,
        actor: str,
    ) -> Export:
        """Export a snapshot (read-only) or a clone; ``writable`` with a snapshot makes a clone of
        it first. The row is added to ``session`` (committed by the caller)."""
        if snapshot is not None and writable:
            clone = self.new_clone(snapshot)
            snapshot = None
        kind, target = ("snapshot", snapshot.id) if snapshot is not None else ("clone", _clone_id(clone))
        row = Export(
            name=new_export_name(),
            protocol="nbd",
            kind=kind,
            target=target,
            writable=kind == "clone",
            allowed_clients=check_networks(allowed_clients),
            created_by=actor,
        )
        session.add(row)
        session.flush()
        self._serve(row)
        return row

    def remove(self, session: Session, row: Export) -> None:
        """Stop serving ``row`` (its connections are closed) and delete it."""
        self.server.remove(row.name)
        self._release(row.kind, row.target)
        session.delete(row)

    def exports_of(self, session: Session, kind: str, target: str) -> list[Export]:
        return list(session.scalars(select(Export).where(Export.kind == kind, Export.target == target)))

    def check_unexported(self, session: Session, kind: str, target: str, action: str) -> None:
        """Conflict if ``target`` is exported (a snapshot cannot be deleted, nor a clone deleted or
        promoted, while clients use it)."""
        rows = self.exports_of(session, kind, target)
        if rows:
            ids = ", ".join(str(r.id) for r in rows)
            raise Conflict(
                f"cannot {action} {kind} {target[:12]}: it is exported (export {ids}); stop the "
                "export first with `dingyuan export stop`"
            )

    def new_clone(self, snapshot: Snapshot, name: str | None = None) -> CloneInfo:
        """A clone of ``snapshot``, named ``name`` or ``<volume>-<snapshot id prefix>-<n>``."""
        if name is None:
            taken = {c.name for c in self.clones.list()}
            stem = f"{snapshot.volume}-{snapshot.id[:8]}"
            name = next(f"{stem}-{n}" for n in range(1, len(taken) + 2) if f"{stem}-{n}" not in taken)
        return self.clones.create(snapshot, name)

    def delete_clone(self, session: Session, clone: CloneInfo) -> None:
        self.check_unexported(session, "clone", clone.id, "delete")
        self.clones.delete(clone)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"open_devices": len(self._open)}


def _clone_id(clone: CloneInfo | None) -> str:
    if clone is None:
        raise ExportError("nothing to export: give a snapshot or a clone")
    return clone.id


def service(ctx: VaultContext) -> ExportService:
    """The running vault's export service (ExportError if it runs without one)."""
    svc = ctx.extras.get(EXTRA)
    if not isinstance(svc, ExportService):
        raise ExportError("this vault serves no exports (it was started without an NBD listener)")
    return svc
