"""The vault's exports: snapshots and clones served over NBD or iSCSI while the vault runs.

One :class:`ExportService` per vault process owns the NBD server and the iSCSI target (each in
its own thread and event loop), the clone store (``<vault dir>/clones``) and the devices being
served. Exports are rows of the catalog, so a restarted vault serves them again; the devices are
opened when an export starts and closed when its last export stops. A clone is open in one place
only: two exports of one clone, over one protocol or both, share its device.

An NBD export name is 20 random bytes in base32: a client that does not know it cannot connect,
and the server does not list exports. An iSCSI export is a target whose IQN discovery shows to
the clients it admits; CHAP (and mutual CHAP) guards its login. ``allowed_clients`` narrows who
may connect further, over either protocol.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Any, overload

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..catalog.models import Export
from ..errors import Conflict, ExportError, ListenError, UsageError
from ..exports.blockdev import BlockDevice
from ..exports.iscsi import IQN_PREFIX
from ..exports.iscsi.chap import Credentials
from ..exports.iscsi.server import ThreadedIscsiServer
from ..exports.nbd.server import ThreadedNbdServer
from ..repository.clone import CloneStore
from ..repository.image import SnapshotImage
from ..repository.manifest import CloneInfo, Snapshot
from .context import VaultContext

log = logging.getLogger(__name__)
EXTRA = "exports"  # the service's key in VaultContext.extras
CLONES_DIR = "clones"


def new_export_name() -> str:
    return base64.b32encode(secrets.token_bytes(20)).decode().lower()


def new_iqn(vault_id: str, kind: str, target: str) -> str:
    """A target name unique to this vault and export: ``iqn...:<vault>.<kind>-<id>-<random>``."""
    vault = "".join(c for c in vault_id.lower() if c.isalnum())[:8] or "vault"
    return f"{IQN_PREFIX}:{vault}.{kind}-{target[:12].lower()}-{secrets.token_hex(3)}"


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
NOT_SERVED = "(not served: the vault runs without its {protocol} listener, --{protocol}-listen)"


def _address(host: str, port: int) -> str:
    return f"{f'[{host}]' if ':' in host else host}:{port}"


def _uri(protocol: str, host: str, port: int, name: str) -> str:
    """``nbd://HOST:PORT/NAME``, or ``iscsi://HOST:PORT/IQN/0`` (the export is LUN 0)."""
    if protocol == "iscsi":
        return f"iscsi://{_address(host, port)}/{name}/0"
    return f"nbd://{_address(host, port)}/{name}"


def _credentials(user: str | None, secret: str | None) -> Credentials | None:
    return None if user is None or secret is None else Credentials(user, secret)


@dataclass
class _Open:
    device: BlockDevice
    users: int


class ExportService:
    """Exports of one vault: create, list, remove; served on ``host:port`` (port 0: a free one)."""

    def __init__(
        self,
        ctx: VaultContext,
        *,
        nbd_listen: tuple[str, int] | None,
        iscsi_listen: tuple[str, int] | None = None,
    ) -> None:
        if nbd_listen is None and iscsi_listen is None:
            raise UsageError("an export service needs an NBD or an iSCSI listen address")
        self.ctx = ctx
        self.clones = CloneStore(ctx.repo, ctx.cfg.dir / CLONES_DIR)
        self.nbd: ThreadedNbdServer | None = None
        self.iscsi: ThreadedIscsiServer | None = None
        self._listen = {"nbd": nbd_listen or ("", 0), "iscsi": iscsi_listen or ("", 0)}
        self._advertise = {"nbd": ctx.cfg.nbd_advertise or None, "iscsi": ctx.cfg.iscsi_advertise or None}
        if nbd_listen is not None:
            self.nbd = ThreadedNbdServer(host=nbd_listen[0], port=nbd_listen[1])
        if iscsi_listen is not None:
            self.iscsi = ThreadedIscsiServer(
                host=iscsi_listen[0], port=iscsi_listen[1], advertise=self._advertise["iscsi"]
            )
        self._lock = threading.RLock()
        self._open: dict[str, _Open] = {}  # "snapshot:<id>" / "clone:<id>" -> device

    # lifetime -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the NBD server and the iSCSI target, and serve every export of the catalog again."""
        started: list[ThreadedNbdServer | ThreadedIscsiServer] = []
        for protocol, server in (("NBD", self.nbd), ("iSCSI", self.iscsi)):
            if server is None:
                continue
            try:
                server.start()
            except OSError as e:
                for other in started:
                    other.close()
                raise ListenError(
                    address=_address(*self._listen[protocol.lower()]),
                    detail=f"{e.strerror or e} (the {protocol} listener; 'off' serves none)",
                ) from None
            started.append(server)
        with Session(self.ctx.engine) as session, session.begin():
            for row in session.scalars(select(Export).order_by(Export.id)):
                try:
                    self._serve(row)
                except Exception as e:  # a vanished snapshot or clone must not stop the vault
                    log.error("export %d (%s %s) cannot be served again: %s", row.id, row.kind, row.target, e)

    def stop(self) -> None:
        for server in (self.nbd, self.iscsi):
            if server is not None:
                server.close()
        with self._lock:
            for opened in self._open.values():
                opened.device.close()
            self._open.clear()

    def listening(self, protocol: str) -> str | None:
        """``HOST:PORT`` the ``protocol`` ("nbd" or "iscsi") listener is bound to; None when off."""
        server = self.nbd if protocol == "nbd" else self.iscsi
        return None if server is None else _address(self._listen[protocol][0], server.port)

    def uri(self, row: Export) -> str:
        """The URI clients use: the advertised address (``nbd_advertise`` or ``iscsi_advertise``
        in vault.json), else the listening one, else (listening on every address) this machine's
        name. An export whose protocol this vault run does not serve says so instead."""
        if self._server(row.protocol, required=False) is None:
            return NOT_SERVED.format(protocol=row.protocol)
        host, port = self._public(row.protocol)
        return _uri(row.protocol, host, port, row.name)

    def portal(self, row: Export) -> str | None:
        """``HOST:PORT`` of the iSCSI portal initiators log in to (None for an NBD export)."""
        if row.protocol != "iscsi" or self.iscsi is None:
            return None
        return _address(*self._public("iscsi"))

    def _public(self, protocol: str) -> tuple[str, int]:
        host = self._advertise[protocol] or self._listen[protocol][0]
        port = self._server(protocol).port
        return (socket.getfqdn() if host in WILDCARDS else host), port

    def local_uri(self, row: Export) -> str:
        """The URI for the vault's own machine (its VMs and mounts): loopback when it listens there."""
        host = self._listen[row.protocol][0]
        port = self._server(row.protocol).port
        return _uri(row.protocol, "127.0.0.1" if host in WILDCARDS else host, port, row.name)

    @overload
    def _server(self, protocol: str) -> ThreadedNbdServer | ThreadedIscsiServer: ...

    @overload
    def _server(self, protocol: str, *, required: bool) -> ThreadedNbdServer | ThreadedIscsiServer | None: ...

    def _server(
        self, protocol: str, *, required: bool = True
    ) -> ThreadedNbdServer | ThreadedIscsiServer | None:
        server = self.nbd if protocol == "nbd" else self.iscsi
        if server is None and required:
            option = "nbd" if protocol == "nbd" else "iscsi"
            raise ExportError(
                f"this vault serves no {'NBD' if protocol == 'nbd' else 'iSCSI'}: start it with "
                f"`dingyuan vault serve --{option}-listen HOST:PORT` (or set {option}_listen in vault.json)"
            )
        return server

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
        server = self._server(row.protocol)
        device = self._acquire(row.kind, row.target)
        try:
            if isinstance(server, ThreadedIscsiServer):
                server.add(
                    row.name,
                    device,
                    identity=f"{row.kind}:{row.target}",
                    chap=_credentials(row.chap_user, row.chap_secret),
                    mutual_chap=_credentials(row.mutual_chap_user, row.mutual_chap_secret),
                    allowed_clients=row.allowed_clients,
                )
            else:
                server.add(row.name, device, allowed_clients=row.allowed_clients)
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
        protocol: str = "nbd",
        chap: Credentials | None = None,
        mutual_chap: Credentials | None = None,
    ) -> Export:
        """Export a snapshot (read-only) or a clone over ``protocol``; ``writable`` with a snapshot
        makes a clone of it first. ``chap`` and ``mutual_chap`` are for iSCSI only. The row is
        added to ``session`` (committed by the caller)."""
        self._server(protocol)
        if protocol != "iscsi" and (chap is not None or mutual_chap is not None):
            raise UsageError("CHAP is for iSCSI exports: add --protocol iscsi")
        if mutual_chap is not None and chap is None:
            raise UsageError("mutual CHAP needs the initiator's CHAP credentials too (--chap)")
        if snapshot is not None and writable:
            clone = self.new_clone(snapshot)
            snapshot = None
        kind, target = ("snapshot", snapshot.id) if snapshot is not None else ("clone", _clone_id(clone))
        name = new_iqn(self.ctx.cfg.repository_id, kind, target) if protocol == "iscsi" else new_export_name()
        row = Export(
            name=name,
            protocol=protocol,
            kind=kind,
            target=target,
            writable=kind == "clone",
            allowed_clients=check_networks(allowed_clients),
            created_by=actor,
            chap_user=None if chap is None else chap.user,
            chap_secret=None if chap is None else chap.secret,
            mutual_chap_user=None if mutual_chap is None else mutual_chap.user,
            mutual_chap_secret=None if mutual_chap is None else mutual_chap.secret,
        )
        session.add(row)
        session.flush()
        self._serve(row)
        return row

    def remove(self, session: Session, row: Export) -> None:
        """Stop serving ``row`` (its connections are closed) and delete it."""
        server = self._server(row.protocol, required=False)
        if server is not None:  # else it was never served in this run
            server.remove(row.name)
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
        raise ExportError("this vault serves no exports (its NBD and iSCSI listeners are both off)")
    return svc
