"""Fuzzing the NBD server over the network while well-behaved clients use it.

For FUZZ_SECONDS, several threads throw random and mutated traffic at a running server: garbage,
handshakes with bad magics and flags, options with wrong or huge lengths, truncated messages,
random commands, flags, offsets and lengths, writes whose payload never comes, and hang-ups in
the middle of any of these. Meanwhile libnbd clients read a read-only export (and check every
byte) and write and re-read a writable one no fuzzer touches. Afterwards the server must still
answer a fresh client, every fuzz connection must be gone (nothing hangs), threads must not have
grown past the pool, no unexpected error may have been logged, and the read-only image must be
byte for byte what it was.

The seed is DINGYUAN_TEST_SEED if set, else random, and printed: a failure replays with it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest

from dingyuan.exports.blockdev import FileDevice
from dingyuan.exports.nbd import wire
from dingyuan.exports.nbd.server import ThreadedNbdServer

# read at import: the hermetic fixture clears DINGYUAN_* variables before a test runs
SEED = int(os.environ.get("DINGYUAN_TEST_SEED") or random.SystemRandom().randrange(1 << 32))
FUZZ_SECONDS = 120
FUZZERS = 4
WORKERS = 8
MiB = 1 << 20
SIZE = 16 * MiB
NAMES = ["ro", "rw", "good-rw", "", "nope", "r", "ro\0", "x" * 5000]
QUERIES = [b"base:allocation", b"base:", b"qemu:dirty-bitmap:x", b"nocolon", b"", b"\xff\xfe"]

pytestmark = pytest.mark.slow


def _image(path: Path, rnd: random.Random) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in range(0, SIZE, 3 * MiB):
            f.seek(offset)
            f.write(rnd.randbytes(MiB))


class Fuzzer:
    """One thread's random sessions against the server."""

    def __init__(self, port: int, rnd: random.Random) -> None:
        self.port = port
        self.rnd = rnd
        self.sessions = 0
        self.kinds: dict[str, int] = {}
        #: sessions that reached the transmission phase, so the request parser was fuzzed
        self.transmissions = 0

    def run(self, deadline: float) -> None:
        kinds: list[Callable[[socket.socket], None]] = [
            self.garbage,
            self.silent,
            self.options,
            self.options,
            self.transmission,
            self.transmission,
            self.transmission,
        ]
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                    kind = self.rnd.choice(kinds)
                    kind(sock)
            except OSError:
                pass  # the server hung up on us: expected for most of what we send
            self.sessions += 1
            self.kinds[kind.__name__] = self.kinds.get(kind.__name__, 0) + 1

    # -- helpers -------------------------------------------------------------------------------

    def drain(self, sock: socket.socket, wait: float = 0.02) -> bytes:
        """Whatever the server sent within ``wait`` seconds."""
        sock.settimeout(wait)
        data = b""
        try:
            while len(data) < 1 << 20:
                part = sock.recv(65536)
                if not part:
                    break
                data += part
        except TimeoutError:
            pass
        return data

    def recv_exact(self, sock: socket.socket, n: int) -> bytes:
        sock.settimeout(2)
        data = b""
        while len(data) < n:
            part = sock.recv(n - len(data))
            if not part:
                raise ConnectionResetError("server closed")
            data += part
        return data

    def mutate(self, data: bytes) -> bytes:
        rnd = self.rnd
        data = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            choice = rnd.random()
            if choice < 0.4 and data:
                data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
            elif choice < 0.6 and data:
                del data[rnd.randrange(len(data)) :]
            elif choice < 0.8:
                data[rnd.randint(0, len(data)) : rnd.randint(0, len(data))] = rnd.randbytes(
                    rnd.randint(0, 24)
                )
            elif len(data) >= 16:  # a length field of an option header set to anything
                data[12:16] = struct.pack(">I", rnd.choice([0, 1, 6, 65536, 65537, 2**31, 2**32 - 1]))
        return bytes(data)

    def name(self) -> str:
        return self.rnd.choice(NAMES)

    def option(self) -> bytes:
        rnd = self.rnd
        kind = rnd.choice(
            [
                wire.OPT_GO,
                wire.OPT_INFO,
                wire.OPT_LIST,
                wire.OPT_STRUCTURED_REPLY,
                wire.OPT_LIST_META_CONTEXT,
                wire.OPT_SET_META_CONTEXT,
                wire.OPT_STARTTLS,
                wire.OPT_ABORT,
                wire.OPT_EXPORT_NAME,
                4,
                11,
                rnd.randrange(2**32),
            ]
        )
        # built by hand, not with wire's builders, which refuse the invalid names we want to send
        name = self.name().encode()
        if kind in (wire.OPT_GO, wire.OPT_INFO):
            infos = [rnd.randrange(6) for _ in range(rnd.randint(0, 4))]
            payload = struct.pack(f">I{len(name)}sH{len(infos)}H", len(name), name, len(infos), *infos)
        elif kind in (wire.OPT_LIST_META_CONTEXT, wire.OPT_SET_META_CONTEXT):
            queries = [rnd.choice(QUERIES) for _ in range(rnd.randint(0, 3))]
            payload = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            payload += b"".join(struct.pack(">I", len(q)) + q for q in queries)
        elif kind == wire.OPT_EXPORT_NAME:
            payload = name
        else:
            payload = rnd.randbytes(rnd.choice([0, 0, 0, 3, 100]))
        raw = wire.build_option(kind, payload)
        return self.mutate(raw) if rnd.random() < 0.4 else raw

    def greet(self, sock: socket.socket, flags: int | None = None) -> None:
        wire.parse_greeting(self.recv_exact(sock, wire.GREETING.size))
        if flags is None:
            flags = self.rnd.choice([0, 1, 2, 3, 3, 3, 4, 0xFFFFFFFF])
        sock.sendall(wire.build_client_flags(flags))

    # -- session kinds ---------------------------------------------------------------------------

    def garbage(self, sock: socket.socket) -> None:
        if self.rnd.random() < 0.5:
            self.drain(sock)
        sock.sendall(self.rnd.randbytes(self.rnd.randint(1, 300)))
        self.drain(sock)

    def silent(self, sock: socket.socket) -> None:
        """Connect and say nothing (or half a greeting reply), then leave."""
        if self.rnd.random() < 0.5:
            sock.sendall(b"\0\0")
        time.sleep(self.rnd.uniform(0, 0.5))

    def options(self, sock: socket.socket) -> None:
        self.greet(sock)
        for _ in range(self.rnd.randint(1, 12)):
            sock.sendall(self.option())
            self.drain(sock)

    def negotiate(self, sock: socket.socket) -> bool:
        """A proper handshake into a random export; whether transmission was reached."""
        rnd = self.rnd
        self.greet(sock, rnd.choice([1, 3]))
        name = rnd.choice(["ro", "rw", "rw", "nope"])
        if rnd.random() < 0.2:
            sock.sendall(wire.build_option(wire.OPT_EXPORT_NAME, name.encode()))
            reply = self.drain(sock, 0.2)
            return len(reply) >= 10
        if rnd.random() < 0.7:
            sock.sendall(wire.build_option(wire.OPT_STRUCTURED_REPLY))
            self.recv_exact(sock, wire.OPTION_REPLY_HEADER.size)
            if rnd.random() < 0.7:
                request = wire.MetaContextRequest(name, ("base:allocation",))
                sock.sendall(
                    wire.build_option(wire.OPT_SET_META_CONTEXT, wire.build_meta_context_request(request))
                )
                self.until_final(sock)
        sock.sendall(wire.build_option(wire.OPT_GO, wire.build_info_request(wire.InfoRequest(name, (3,)))))
        return self.until_final(sock) == wire.REP_ACK

    def until_final(self, sock: socket.socket) -> int:
        while True:
            _, reply_type, length = wire.parse_option_reply_header(
                self.recv_exact(sock, wire.OPTION_REPLY_HEADER.size)
            )
            self.recv_exact(sock, length)
            if reply_type not in (wire.REP_INFO, wire.REP_META_CONTEXT, wire.REP_SERVER):
                return reply_type

    def request(self) -> tuple[bytes, int]:
        """A random request header and the payload length a WRITE header announces."""
        rnd = self.rnd
        kind = rnd.choice([0, 0, 1, 1, 3, 4, 5, 6, 7, 7, rnd.randrange(16), rnd.randrange(2**16)])
        flags = rnd.choice([0, 0, 0, 1, 2, 4, 8, 16, 18, 32, rnd.randrange(2**16)])
        offset = rnd.choice([0, 4096, SIZE - 1, SIZE, SIZE + 1, 2**63, 2**64 - 1, rnd.randrange(SIZE)])
        length = rnd.choice(
            [0, 1, 512, 65536, MiB, 32 * MiB, 32 * MiB + 1, 2**32 - 1, rnd.randrange(2 * MiB)]
        )
        raw = wire.build_request(wire.Request(flags, kind, rnd.randrange(2**64), offset, length))
        if rnd.random() < 0.05:
            raw = self.mutate(raw)
        return raw, (length if kind == wire.CMD_WRITE else 0)

    def transmission(self, sock: socket.socket) -> None:
        if not self.negotiate(sock):
            return
        self.transmissions += 1
        rnd = self.rnd
        for _ in range(rnd.randint(1, 40)):
            header, payload = self.request()
            if payload > 256 * 1024:
                # announce a big write, send part of it, and vanish
                sock.sendall(header + rnd.randbytes(rnd.randrange(64 * 1024)))
                return
            sock.sendall(header + rnd.randbytes(payload))
            if rnd.random() < 0.3:
                self.drain(sock, 0.01)
        if rnd.random() < 0.5:
            sock.sendall(wire.build_request(wire.Request(0, wire.CMD_DISC, 0, 0, 0)))
        self.drain(sock, 0.05)


class GoodClient:
    """A libnbd client that must keep getting correct data through the fuzzing."""

    def __init__(self, port: int, name: str, expected: bytes | None, rnd: random.Random) -> None:
        self.h = nbd.NBD()
        self.h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        self.h.connect_uri(f"nbd://127.0.0.1:{port}/{name}")
        self.expected = bytearray(expected) if expected is not None else bytearray(self.h.pread(SIZE, 0))
        self.writes = expected is None
        self.rnd = rnd
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self, deadline: float) -> None:
        rnd = self.rnd
        try:
            while time.monotonic() < deadline:
                offset = rnd.randrange(SIZE)
                length = rnd.randint(1, min(2 * MiB, SIZE - offset))
                if self.writes and rnd.random() < 0.5:
                    data = rnd.randbytes(length)
                    self.h.pwrite(data, offset, nbd.CMD_FLAG_FUA if rnd.random() < 0.2 else 0)
                    self.expected[offset : offset + length] = data
                got = self.h.pread(length, offset)
                assert got == self.expected[offset : offset + length], f"wrong bytes at {offset}+{length}"
                self.rounds += 1
            self.h.shutdown()
        except BaseException as e:
            self.error = e


def test_fuzzing_leaves_the_server_serving_and_the_data_intact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    print(f"\n[test_nbd_fuzz] DINGYUAN_TEST_SEED={SEED} (set it to replay this run)")
    caplog.set_level(logging.WARNING)
    rnd = random.Random(SEED)
    ro_path, rw_path, good_path = tmp_path / "ro.img", tmp_path / "rw.img", tmp_path / "good.img"
    for path in (ro_path, rw_path, good_path):
        _image(path, rnd)
    ro_bytes = ro_path.read_bytes()
    ro_digest = hashlib.sha256(ro_bytes).hexdigest()
    devices = [FileDevice(ro_path, read_only=True), FileDevice(rw_path), FileDevice(good_path)]

    with ThreadedNbdServer(host="127.0.0.1", port=0, workers=WORKERS, handshake_timeout=2.0) as server:
        for name, device in zip(["ro", "rw", "good-rw"], devices, strict=True):
            server.add(name, device)
        threads_before = threading.active_count()
        deadline = time.monotonic() + FUZZ_SECONDS
        fuzzers = [Fuzzer(server.port, random.Random(rnd.randrange(2**64))) for _ in range(FUZZERS)]
        good = [
            GoodClient(server.port, "ro", ro_bytes, random.Random(rnd.randrange(2**64))),
            GoodClient(server.port, "good-rw", None, random.Random(rnd.randrange(2**64))),
        ]
        threads = [threading.Thread(target=f.run, args=(deadline,)) for f in fuzzers]
        threads += [threading.Thread(target=g.run, args=(deadline,)) for g in good]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        context = f"(seed {SEED})"
        for client in good:
            assert client.error is None, f"a well-behaved client failed: {client.error!r} {context}"
            assert client.rounds > 100, f"a well-behaved client was starved {context}"
        print(f"[test_nbd_fuzz] sessions: {[f.kinds for f in fuzzers]}")
        assert sum(f.sessions for f in fuzzers) > 10 * FUZZ_SECONDS, context
        assert sum(f.transmissions for f in fuzzers) > 2 * FUZZ_SECONDS, context

        # every fuzz connection ends: silent ones by the handshake timeout, the rest by hang-up
        settle = time.monotonic() + 10
        while server.open_connections and time.monotonic() < settle:
            time.sleep(0.1)
        assert server.open_connections == 0, f"connections left hanging {context}"
        assert threading.active_count() <= threads_before + WORKERS, f"threads leaked {context}"

        fresh = nbd.NBD()
        fresh.connect_uri(f"nbd://127.0.0.1:{server.port}/ro")
        assert fresh.pread(SIZE, 0) == ro_bytes, context
        fresh.shutdown()

    for device in devices:
        device.close()
    assert hashlib.sha256(ro_path.read_bytes()).hexdigest() == ro_digest, f"read-only image changed {context}"
    unexpected = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not unexpected, f"errors logged {context}: {[r.getMessage() for r in unexpected[:5]]}"
