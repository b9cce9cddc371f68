"""Targets and sessions: the state an iSCSI server keeps above single connections.

A :class:`Target` is one export: a name (IQN), who may log in, and the SCSI target (its logical
unit over a block device) that every session to it shares, so reservations and unit attentions
span sessions as SPC-4 wants. A :class:`Session` is one I_T nexus: an initiator port (initiator
name + ISID) logged in to a target, with one or more connections, and the session-wide command
numbering (CmdSN) that puts their commands in order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dingyuan.errors import UsageError
from dingyuan.exports import access
from dingyuan.exports.blockdev import DeviceSource
from dingyuan.exports.iscsi.chap import Credentials
from dingyuan.exports.iscsi.login import COMMAND_WINDOW
from dingyuan.exports.iscsi.pdu import Pdu
from dingyuan.exports.iscsi.text import SessionParams
from dingyuan.exports.scsi import LogicalUnit, Nexus, ScsiTarget

if TYPE_CHECKING:
    from dingyuan.exports.iscsi.connection import Connection

SN_MASK = 0xFFFFFFFF
#: iSCSI names are at most 223 bytes (RFC 7143 section 4.2.7.1)
MAX_NAME = 223


def sn_delta(a: int, b: int) -> int:
    """``a - b`` in 32-bit serial number arithmetic (RFC 1982): negative when a is before b."""
    d = (a - b) & SN_MASK
    return d - (1 << 32) if d & 0x80000000 else d


class Target:
    """One exported target: its name, access rules and shared SCSI target."""

    def __init__(
        self,
        name: str,
        source: DeviceSource,
        *,
        identity: str | None = None,
        chap: Credentials | None = None,
        mutual_chap: Credentials | None = None,
        allowed_clients: Iterable[access.IpNetwork | str] | None = None,
    ) -> None:
        if not name or len(name.encode()) > MAX_NAME or any(c.isspace() or c == "\0" for c in name):
            raise UsageError(f"an iSCSI target name must be 1-{MAX_NAME} bytes without spaces: {name!r}")
        if mutual_chap is not None and chap is None:
            raise UsageError("mutual CHAP needs the initiator's CHAP credentials too")
        self.name = name
        #: what the disk's serial and NAA identifier derive from: the same for every export of one
        #: snapshot or clone, so a server (multipath, a cluster, Windows' disk list) knows it again
        self.identity = identity or name
        self.chap = chap
        self.mutual_chap = mutual_chap
        self.allowed_clients = access.networks(allowed_clients)
        self.sessions: set[Session] = set()
        self.removed = False
        self._source = source
        self._scsi: ScsiTarget | None = None

    def admits(self, peer: access.IpAddress | None) -> bool:
        return access.admits(self.allowed_clients, peer)

    @property
    def opened(self) -> ScsiTarget | None:
        """The SCSI target if :meth:`scsi` built it already (no thread hop needed then)."""
        return self._scsi

    def scsi(self) -> ScsiTarget:
        """The SCSI target, built (and a factory's device opened) on first use; call it from a
        worker thread, since opening a device may read a repository."""
        if self._scsi is None:
            device = self._source() if callable(self._source) else self._source
            digest = hashlib.sha256(self.identity.encode()).digest()
            unit = LogicalUnit(device, serial=digest[:8].hex(), device_id=digest[8:24])
            self._scsi = ScsiTarget({0: unit})
        return self._scsi

    def close(self) -> None:
        """Close the SCSI target; a device the caller gave (not a factory) stays open."""
        if self._scsi is not None and callable(self._source):
            self._scsi.close()
        self._scsi = None


@dataclass(eq=False)
class Session:
    """One logged-in session (an I_T nexus) and its command numbering."""

    tsih: int
    isid: bytes
    params: SessionParams
    target: Target | None  # None in a discovery session
    exp_cmd_sn: int
    portal_group_tag: int = 1

    def __post_init__(self) -> None:
        self.connections: dict[int, Connection] = {}
        #: SCSI commands admitted and not yet answered: each narrows the window MaxCmdSN opens
        self.outstanding = 0
        #: commands that arrived ahead of ExpCmdSN (only with several connections), by CmdSN;
        #: None holds the place of a command an ABORT TASK took as received
        self._waiting: dict[int, tuple[Connection, Pdu] | None] = {}

    @property
    def initiator_name(self) -> str:
        return self.params.initiator_name or ""

    @property
    def nexus(self) -> Nexus:
        target_name = "" if self.target is None else self.target.name
        return Nexus(
            initiator_port=f"{self.initiator_name},i,0x{self.isid.hex()}",
            target_port=f"{target_name},t,0x{self.portal_group_tag:04x}",
            relative_port=self.portal_group_tag,
        )

    @property
    def max_cmd_sn(self) -> int:
        """ExpCmdSN plus the free places of the window: commands still running hold theirs, so an
        initiator can have at most COMMAND_WINDOW commands open. It never decreases: admitting a
        command moves ExpCmdSN up as its place is taken."""
        return (self.exp_cmd_sn + COMMAND_WINDOW - 1 - self.outstanding) & SN_MASK

    def admit(self, connection: Connection, pdu: Pdu) -> list[tuple[Connection, Pdu]]:
        """The non-immediate PDUs ready to run, in CmdSN order, after ``pdu`` arrived.

        A CmdSN outside [ExpCmdSN, MaxCmdSN] is dropped without an answer (RFC 7143 section
        4.2.2.1); one ahead of ExpCmdSN waits for the ones before it.
        """
        delta = sn_delta(pdu.bhs.cmd_sn, self.exp_cmd_sn)
        if not 0 <= delta <= sn_delta(self.max_cmd_sn, self.exp_cmd_sn) or pdu.bhs.cmd_sn in self._waiting:
            return []
        self._waiting[pdu.bhs.cmd_sn] = (connection, pdu)
        return self._deliverable()

    def _deliverable(self) -> list[tuple[Connection, Pdu]]:
        """Take what waits at ExpCmdSN and after it, in order, moving ExpCmdSN on."""
        ready = []
        while self.exp_cmd_sn in self._waiting:
            waiting = self._waiting.pop(self.exp_cmd_sn)
            if waiting is not None:
                ready.append(waiting)
            self.exp_cmd_sn = (self.exp_cmd_sn + 1) & SN_MASK
        return ready

    def consider_received(self, ref_cmd_sn: int, tmf_cmd_sn: int) -> bool:
        """ABORT TASK for a task we do not know (RFC 7143 section 11.5.1): a RefCmdSN inside the
        command window and before the request's own CmdSN is taken as received (the command,
        if it arrives later, is dropped), and the abort succeeds; one outside the window names
        no task. Whether the abort succeeds."""
        delta = sn_delta(ref_cmd_sn, self.exp_cmd_sn)
        if (
            not 0 <= delta <= sn_delta(self.max_cmd_sn, self.exp_cmd_sn)
            or sn_delta(ref_cmd_sn, tmf_cmd_sn) >= 0
        ):
            return False
        if ref_cmd_sn not in self._waiting:
            self._waiting[ref_cmd_sn] = None
            self._deliverable()  # a placeholder at ExpCmdSN moves it on
        return True

    def forget_waiting(self, connection: Connection) -> None:
        """Drop what a closed connection left waiting for earlier commands."""
        for sn in [sn for sn, w in self._waiting.items() if w is not None and w[0] is connection]:
            del self._waiting[sn]
