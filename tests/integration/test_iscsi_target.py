"""The iSCSI target's transport, driven PDU by PDU by the test initiator in ``iscsikit``: login
and CHAP, discovery, Data-Out through immediate data and R2Ts, Data-In, residuals, CmdSN rules,
sessions with several connections, reinstatement, task management and logout."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from iscsikit import Initiator, LoginFailed

from dingyuan.exports.blockdev import FileDevice
from dingyuan.exports.iscsi import chap
from dingyuan.exports.iscsi import pdu as p
from dingyuan.exports.iscsi.chap import Credentials
from dingyuan.exports.iscsi.pdu import Bhs, Pdu
from dingyuan.exports.iscsi.server import ThreadedIscsiServer
from dingyuan.repository.backup import backup
from dingyuan.repository.image import SnapshotImage
from dingyuan.repository.repo import Repository

MiB = 1 << 20
RW = "iqn.2026-11.org.dingyuan.test:rw"
RO = "iqn.2026-11.org.dingyuan.test:ro"
SECRET = "iqn.2026-11.org.dingyuan.test:chap"
MUTUAL = "iqn.2026-11.org.dingyuan.test:mutual"
FENCED = "iqn.2026-11.org.dingyuan.test:fenced"
USER = Credentials("initiator-user", "initiator-secret-1")
TARGET_USER = Credentials("target-user", "target-secret-12")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4 * MiB) + bytes(4 * MiB))
    return path


@pytest.fixture
def server(image: Path) -> Iterator[ThreadedIscsiServer]:
    with ThreadedIscsiServer(host="127.0.0.1", port=0) as s:
        s.add(RW, FileDevice(image))
        s.add(RO, FileDevice(image, read_only=True))
        s.add(SECRET, FileDevice(image, read_only=True), chap=USER)
        s.add(MUTUAL, FileDevice(image, read_only=True), chap=USER, mutual_chap=TARGET_USER)
        s.add(FENCED, FileDevice(image, read_only=True), allowed_clients=["192.0.2.0/24"])
        yield s


def test_discovery_lists_the_targets_this_initiator_may_use(server: ThreadedIscsiServer) -> None:
    with Initiator(server.port, None) as discovery:
        answer = discovery.text([("SendTargets", "All")])
    names = [v for k, v in answer if k == "TargetName"]
    assert names == sorted([RW, RO, SECRET, MUTUAL])  # not FENCED: 127.0.0.1 is not allowed
    assert ("TargetAddress", f"127.0.0.1:{server.port},1") in answer


@pytest.mark.parametrize(
    ("target", "credentials", "detail"),
    [
        ("iqn.2026-11.org.dingyuan.test:none", None, p.DETAIL_NOT_FOUND),
        (FENCED, None, p.DETAIL_AUTHORIZATION_FAILURE),
        (SECRET, None, p.DETAIL_AUTHENTICATION_FAILURE),
        (SECRET, (USER.user, "a-wrong-secret-1"), p.DETAIL_AUTHENTICATION_FAILURE),
        (SECRET, ("someone-else", USER.secret), p.DETAIL_AUTHENTICATION_FAILURE),
    ],
)
def test_refused_logins_say_why(
    server: ThreadedIscsiServer, target: str, credentials: tuple[str, str] | None, detail: int
) -> None:
    with pytest.raises(LoginFailed) as failed:
        Initiator(server.port, target, credentials=credentials)
    assert (failed.value.status_class, failed.value.status_detail) == (p.STATUS_INITIATOR_ERROR, detail)


def test_chap_login_reads_the_disk(server: ThreadedIscsiServer, image: Path) -> None:
    with Initiator(server.port, SECRET, credentials=(USER.user, USER.secret)) as ini:
        result = ini.read(0, 64)
    assert result.status == 0
    assert result.data == image.read_bytes()[: 64 * 512]


def test_mutual_chap_proves_the_target(server: ThreadedIscsiServer) -> None:
    """The initiator sends its own challenge with its answer; the target must answer it with
    its secret, and must refuse our own challenge sent back to it."""
    sock_initiator = Initiator.__new__(Initiator)
    for reflect in (False, True):
        ini = sock_initiator
        ini.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        ini.isid, ini.tsih, ini.cid, ini.cmd_sn, ini.exp_stat_sn = b"\x80\0\0\0\0\1", 0, 0, 1, 0
        ini.answer_pings = ini.header_digest = ini.data_digest = False
        first = [
            ("InitiatorName", "iqn.2026-11.org.dingyuan.test:m"),
            ("SessionType", "Normal"),
            ("TargetName", MUTUAL),
            ("AuthMethod", "CHAP"),
        ]
        ini._login_step(first, csg=0, nsg=1, transit=False)
        answer = ini._login_step([("CHAP_A", "5")], csg=0, nsg=1, transit=False)
        identifier, challenge = int(answer["CHAP_I"]), chap.decode_binary(answer["CHAP_C"])
        mine = challenge if reflect else os.urandom(16)
        keys = [
            ("CHAP_N", USER.user),
            ("CHAP_R", "0x" + chap.response(identifier, USER.secret, challenge).hex()),
            ("CHAP_I", "7"),
            ("CHAP_C", "0x" + mine.hex()),
        ]
        if reflect:
            with pytest.raises(LoginFailed):
                ini._login_step(keys, csg=0, nsg=1, transit=True)
        else:
            proof = ini._login_step(keys, csg=0, nsg=1, transit=True)
            assert proof["CHAP_N"] == TARGET_USER.user
            assert chap.decode_binary(proof["CHAP_R"]) == chap.response(7, TARGET_USER.secret, mine)
        ini.close()


def test_writes_through_immediate_unsolicited_and_solicited_data(
    server: ThreadedIscsiServer, image: Path
) -> None:
    payload = os.urandom(3 * MiB + 4096)
    with Initiator(server.port, RW) as ini:
        assert ini.negotiated["InitialR2T"] == "No"
        result = ini.write(100, payload)
        assert result.status == 0, result
        assert any(b.opcode == p.OP_R2T for b in result.pdus)
        assert ini.read(100, len(payload) // 512).data == payload
        small = ini.write(3, b"\xab" * 1024)  # immediate data only
        assert small.status == 0 and not any(b.opcode == p.OP_R2T for b in small.pdus)
    data = image.read_bytes()
    assert data[100 * 512 : 100 * 512 + len(payload)] == payload
    assert data[3 * 512 : 5 * 512] == b"\xab" * 1024


def test_residuals_when_the_expected_length_differs(server: ThreadedIscsiServer, image: Path) -> None:
    cdb = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0)  # READ(10) of 8 blocks
    with Initiator(server.port, RO) as ini:
        short = ini.command(cdb, read_length=1024)
        assert (short.status, short.residual_flags, short.residual) == (0, p.RSP_OVERFLOW, 3072)
        assert short.data == image.read_bytes()[:1024]
        long = ini.command(cdb, read_length=8192)
        assert (long.status, long.residual_flags, long.residual) == (0, p.RSP_UNDERFLOW, 4096)


def test_a_write_too_large_to_buffer_is_refused(server: ThreadedIscsiServer) -> None:
    with Initiator(server.port, RW) as ini:
        cdb = struct.pack(">BBQIBB", 0x8A, 0, 0, (64 * MiB) // 512, 0, 0)
        bhs = Bhs(
            opcode=p.OP_SCSI_COMMAND,
            final=True,
            flags=p.CMD_WRITE | p.ATTR_SIMPLE,
            itt=ini.next_itt(),
            tail=p.build_tail({p.OFF_TTT: 64 * MiB, **ini.words()}, cdb=cdb),
        )
        ini.send(Pdu(bhs=bhs))
        ini.cmd_sn += 1
        reply = ini.recv()
        assert reply.bhs.opcode == p.OP_SCSI_RESPONSE and reply.bhs.specific[1] == 0x02
        assert ini.nop(b"still here").data == b"still here"


def test_commands_outside_the_cmdsn_window_are_ignored(server: ThreadedIscsiServer) -> None:
    with Initiator(server.port, RO) as ini:
        ini.cmd_sn += 1000  # far past MaxCmdSN
        bhs = Bhs(
            opcode=p.OP_NOP_OUT,
            final=True,
            itt=ini.next_itt(),
            tail=p.build_tail({p.OFF_TTT: p.RESERVED_TAG, **ini.words()}),
        )
        ini.send(Pdu(bhs=bhs, data=b"lost"))
        ini.cmd_sn -= 1000
        reply = ini.nop(b"kept")
        assert reply.bhs.opcode == p.OP_NOP_IN and reply.data == b"kept"
        assert reply.bhs.exp_cmd_sn == ini.cmd_sn


def test_unknown_opcodes_are_rejected_and_the_connection_lives(server: ThreadedIscsiServer) -> None:
    with Initiator(server.port, RO) as ini:
        ini.send(Pdu(bhs=Bhs(opcode=0x1C, final=True, itt=ini.next_itt())))
        reply = ini.recv()
        assert reply.bhs.opcode == p.OP_REJECT and reply.bhs.specific[0] == p.REJECT_COMMAND_NOT_SUPPORTED
        assert reply.data[0] & 0x3F == 0x1C
        assert ini.read(0, 1).status == 0


def test_a_session_takes_a_second_connection(server: ThreadedIscsiServer, image: Path) -> None:
    with Initiator(server.port, RW) as first:
        assert first.negotiated["MaxConnections"] != "1"
        with Initiator(server.port, RW, isid=first.isid, tsih=first.tsih, cid=1) as second:
            second.cmd_sn = first.cmd_sn
            assert second.write(8, b"\x11" * 512).status == 0
            first.cmd_sn = second.cmd_sn
            assert first.read(8, 1).data == b"\x11" * 512
            sessions = server.sessions()
            assert len(sessions) == 1 and len(sessions[0].peers) == 2


def test_a_new_login_with_the_same_isid_reinstates_the_session(server: ThreadedIscsiServer) -> None:
    old = Initiator(server.port, RO)
    with Initiator(server.port, RO, isid=old.isid) as new:
        assert new.tsih != old.tsih
        with pytest.raises((ConnectionError, OSError)):
            old.read(0, 1)
        assert new.read(0, 1).status == 0
    old.close()


def test_logout_ends_the_session(server: ThreadedIscsiServer) -> None:
    ini = Initiator(server.port, RO)
    reply = ini.logout()
    assert reply.bhs.opcode == p.OP_LOGOUT_RESPONSE and reply.bhs.specific[0] == 0
    assert ini.sock.recv(1) == b""
    ini.close()
    assert server.sessions() == []


def test_a_vanished_initiator_leaves_no_session(server: ThreadedIscsiServer) -> None:
    ini = Initiator(server.port, RW)
    header = p.build_pdu(
        Pdu(
            bhs=Bhs(
                opcode=p.OP_SCSI_COMMAND,
                final=False,
                flags=p.CMD_WRITE,
                itt=ini.next_itt(),
                tail=p.build_tail(
                    {p.OFF_TTT: MiB, **ini.words()}, cdb=struct.pack(">BBQIBB", 0x8A, 0, 0, MiB // 512, 0, 0)
                ),
            )
        )
    )
    ini.sock.sendall(header)  # a write whose data never comes
    ini.close()
    deadline = time.monotonic() + 5
    while server.sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.sessions() == []


def test_a_read_only_export_refuses_writes_with_write_protect(
    server: ThreadedIscsiServer, image: Path
) -> None:
    before = image.read_bytes()
    with Initiator(server.port, RO) as ini:
        result = ini.write(0, os.urandom(64 << 10))
        assert result.status == 0x02 and result.sense_key == 0x07 and result.asc == (0x27, 0x00)
        assert ini.read(0, 1).status == 0  # the session goes on
    assert image.read_bytes() == before


def test_a_silent_initiator_is_pinged_and_dropped_if_it_does_not_answer(image: Path) -> None:
    with ThreadedIscsiServer(host="127.0.0.1", port=0, ping_interval=0.4) as server:
        server.add(RO, FileDevice(image, read_only=True))
        with Initiator(server.port, RO) as answering:
            answering.sock.settimeout(0.05)
            deadline = time.monotonic() + 1.5  # well past two intervals
            while time.monotonic() < deadline:  # its pings are answered as they come
                with contextlib.suppress(TimeoutError):
                    answering.recv()
            answering.sock.settimeout(10)
            assert answering.read(0, 1).status == 0
            assert len(server.sessions()) == 1
        with Initiator(server.port, RO, answer_pings=False) as silent:
            ping = silent.recv()
            assert ping.bhs.opcode == p.OP_NOP_IN and ping.bhs.itt == p.RESERVED_TAG
            assert ping.bhs.ttt != p.RESERVED_TAG
            with pytest.raises(ConnectionError):
                while True:
                    silent.recv()  # the end of the connection, within another interval
        deadline = time.monotonic() + 5
        while server.sessions() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.sessions() == []


def test_a_snapshot_image_is_read_without_a_thread_and_exactly(repo: Repository, tmp_path: Path) -> None:
    """Plain READs of a snapshot go to its non-blocking read (decoding threads fetch, the event
    loop waits); their Data-In, split at PDU and chunk boundaries alike and checked with data
    digests, is the snapshot's bytes. Anything else (a bad range) still gets its sense data."""
    rng = random.Random(5)
    source = tmp_path / "disk.img"
    with open(source, "wb") as f:
        f.truncate(6 * MiB)
        for _ in range(12):
            f.seek(rng.randrange(0, 5 * MiB))
            f.write(rng.randbytes(rng.randrange(1, 300 << 10)))
    expected = source.read_bytes()
    snapshot = backup(repo, str(source), "disk", host="h1", chunk_size=64 << 10).snapshot
    with SnapshotImage(repo, snapshot) as image, ThreadedIscsiServer(host="127.0.0.1", port=0) as server:
        soon, plain = image.read_soon, image.read
        calls = {"soon": 0, "read": 0}

        def counted_soon(offset: int, length: int) -> Any:
            calls["soon"] += 1
            return soon(offset, length)

        def counted_read(offset: int, length: int) -> bytes:
            calls["read"] += 1
            return plain(offset, length)

        image.read_soon, image.read = counted_soon, counted_read  # type: ignore[method-assign]
        server.add(RO, image)
        keys = [("DataDigest", "CRC32C"), ("HeaderDigest", "CRC32C"), ("MaxRecvDataSegmentLength", "12000")]
        with Initiator(server.port, RO, keys=keys) as ini:
            assert ini.data_digest and ini.header_digest
            lba = 0
            while lba < len(expected) // 512:
                blocks = min(rng.choice([1, 7, 128, 300, 2048]), len(expected) // 512 - lba)
                result = ini.read(lba, blocks)
                assert result.status == 0 and result.data == expected[lba * 512 : (lba + blocks) * 512]
                lba += blocks
            beyond = ini.read(len(expected) // 512, 1)
            assert beyond.status == 0x02 and beyond.asc == (0x21, 0x00)
    assert calls["soon"] > 20 and calls["read"] <= 2  # the first read may open the tree in a thread
