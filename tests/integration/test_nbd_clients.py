"""The NBD server against real clients: qemu-img, nbdinfo, nbdcopy and libnbd.

Each test serves a sparse raw image (data runs between holes) through a FileDevice on
127.0.0.1 and checks what a user relies on: the bytes read are the image's bytes, writes land in
the file, holes are reported as holes, refusals (read-only, out of range, access control, TLS)
come back as the protocol's errors and change nothing.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import random
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dingyuan.exports.blockdev import FileDevice
from dingyuan.exports.nbd.server import ThreadedNbdServer

MiB = 1 << 20
SIZE = 64 * MiB
#: the data runs of the test image; everything else is a hole
DATA_RUNS = [(5 * MiB, 3 * MiB), (32000 * 1024, 64 * 1024), (SIZE - 4096, 4096)]

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "nbdinfo", "nbdcopy")), reason="NBD client tools missing"
)


def make_image(path: Path, seed: int = 1) -> bytes:
    """A sparse image with DATA_RUNS filled with random bytes; returns its full contents."""
    rnd = random.Random(seed)
    content = bytearray(SIZE)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, length in DATA_RUNS:
            data = rnd.randbytes(length)
            f.seek(offset)
            f.write(data)
            content[offset : offset + length] = data
    return bytes(content)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path)


@pytest.fixture
def rw_image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "rw.img"
    return path, make_image(path, seed=2)


@pytest.fixture
def server(image: tuple[Path, bytes], rw_image: tuple[Path, bytes]) -> Iterator[ThreadedNbdServer]:
    ro = FileDevice(image[0], read_only=True)
    rw = FileDevice(rw_image[0])
    with ThreadedNbdServer(host="127.0.0.1", port=0) as s:
        s.add("ro", ro, description="the read-only image")
        s.add("rw", rw)
        yield s
    ro.close()
    rw.close()


def uri(server: ThreadedNbdServer, name: str) -> str:
    return f"nbd://127.0.0.1:{server.port}/{name}"


def connect(server: ThreadedNbdServer, name: str, *, structured: bool = True, strict: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        h.set_strict_mode(0)  # send what the server must refuse, instead of refusing it here
    h.connect_uri(uri(server, name))
    return h


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def nbd_errno(call: Callable[[], Any]) -> str | None:
    """The errno name libnbd reports for a failed call ("EPERM", ...)."""
    with pytest.raises(nbd.Error) as caught:
        call()
    return caught.value.errno


# -- real tools ---------------------------------------------------------------------------------------


def test_qemu_img_compare_finds_the_export_identical(
    server: ThreadedNbdServer, image: tuple[Path, bytes]
) -> None:
    result = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", str(image[0]), uri(server, "ro")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical" in result.stdout


def test_nbdinfo_map_shows_the_holes(server: ThreadedNbdServer) -> None:
    out = subprocess.run(
        ["nbdinfo", "--map", uri(server, "ro")], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    extents = []
    for line in out.splitlines():
        offset, length, kind, *_ = line.split()
        extents.append((int(offset), int(length), int(kind)))
    assert sum(length for _, length, _ in extents) == SIZE
    assert [(o, n) for o, n, kind in extents if kind == 0] == DATA_RUNS
    assert {kind for _, _, kind in extents} == {0, 3}  # data, or hole and zero
    assert sum(n for _, n, kind in extents if kind == 3) == SIZE - sum(n for _, n in DATA_RUNS)


def test_nbdcopy_round_trips(
    server: ThreadedNbdServer, image: tuple[Path, bytes], rw_image: tuple[Path, bytes], tmp_path: Path
) -> None:
    out = tmp_path / "out.img"
    subprocess.run(["nbdcopy", uri(server, "ro"), str(out)], check=True, timeout=120)
    assert out.read_bytes() == image[1]

    source = tmp_path / "source.img"
    content = make_image(source, seed=3)
    subprocess.run(["nbdcopy", str(source), uri(server, "rw")], check=True, timeout=120)
    assert rw_image[0].read_bytes() == content


# -- libnbd: every command ---------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_pread_returns_the_image_bytes(
    server: ThreadedNbdServer, image: tuple[Path, bytes], structured: bool
) -> None:
    h = connect(server, "ro", structured=structured)
    assert h.get_structured_replies_negotiated() == structured
    content = image[1]
    for offset in range(0, SIZE, 8 * MiB):
        assert h.pread(8 * MiB, offset) == content[offset : offset + 8 * MiB]
    for offset, length in [(5 * MiB - 3, 7), (8 * MiB - 100, 3 * MiB + 17), (SIZE - 1, 1)]:
        assert h.pread(length, offset) == content[offset : offset + length]
    if structured:  # "don't fragment": one chunk, even across a hole
        chunks: list[tuple[int, bytes]] = []
        h.pread_structured(
            2 * MiB,
            4 * MiB,
            lambda buf, offset, status, error: chunks.append((offset, buf)) or 0,
            nbd.CMD_FLAG_DF,
        )
        assert chunks == [(4 * MiB, content[4 * MiB : 6 * MiB])]
    h.shutdown()


def test_a_structured_read_sends_holes_as_holes(server: ThreadedNbdServer, image: tuple[Path, bytes]) -> None:
    h = connect(server, "ro")
    chunks: list[tuple[int, int, int]] = []
    assembled = bytearray(12 * MiB)

    def chunk(subbuf: bytes, offset: int, status: int, error: Any) -> int:
        chunks.append((offset, len(subbuf), status))
        assembled[offset : offset + len(subbuf)] = subbuf
        return 0

    h.pread_structured(12 * MiB, 0, chunk)
    assert bytes(assembled) == image[1][: 12 * MiB]
    holes = sorted((o, n) for o, n, s in chunks if s == nbd.READ_HOLE)
    assert (0, MiB) in holes and (9 * MiB, MiB) in holes
    assert all(not (5 * MiB <= o < 8 * MiB) for o, _ in holes)
    h.shutdown()


def test_write_commands_reach_the_file(server: ThreadedNbdServer, rw_image: tuple[Path, bytes]) -> None:
    path, content = rw_image
    h = connect(server, "rw")
    assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero() and h.can_fast_zero()
    data = random.Random(7).randbytes(MiB + 333)
    h.pwrite(data, 3 * MiB + 5, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), 3 * MiB + 5) == data
    with open(path, "rb") as f:
        f.seek(3 * MiB + 5)
        assert f.read(len(data)) == data
    h.flush()

    h.trim(MiB, 20 * MiB)  # a hint; must succeed
    h.cache(4 * MiB, 5 * MiB)

    h.zero(MiB, 5 * MiB)  # in a data run
    h.zero(4096, 6 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    with open(path, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(MiB + 4096) == bytes(MiB + 4096)
        f.seek(6 * MiB + 4096)
        assert f.read(4096) == content[6 * MiB + 4096 : 6 * MiB + 8192]

    # a fast zero succeeds where the range already reads as zeros, and fails fast (ENOTSUP)
    # where it would have to write, leaving the data as it was
    h.zero(MiB, 40 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    assert nbd_errno(lambda: h.zero(4096, 7 * MiB, nbd.CMD_FLAG_FAST_ZERO)) == "ENOTSUP"
    assert (
        nbd_errno(lambda: h.zero(4096, 40 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)) == "ENOTSUP"
    )
    assert h.pread(4096, 7 * MiB) == content[7 * MiB : 7 * MiB + 4096]
    h.flush()
    h.shutdown()


def test_no_hole_zeroes_are_written_as_data(rw_image: tuple[Path, bytes]) -> None:
    """A device's write_zeroes may leave a hole; NO_HOLE asks for allocated zeros."""
    calls: list[str] = []

    class Recording(FileDevice):
        def write(self, offset: int, data: bytes) -> None:
            calls.append("write")
            super().write(offset, data)

        def write_zeroes(self, offset: int, length: int) -> None:
            calls.append("write_zeroes")
            super().write_zeroes(offset, length)

    with ThreadedNbdServer(host="127.0.0.1", port=0) as s:
        s.add("rec", lambda: Recording(rw_image[0]))
        h = connect(s, "rec")
        h.zero(2 * MiB + 5, 5 * MiB, nbd.CMD_FLAG_NO_HOLE)
        assert calls == ["write", "write", "write"]
        calls.clear()
        h.zero(2 * MiB, 5 * MiB)
        assert calls[0] == "write_zeroes"
        assert h.pread(2 * MiB + 5, 5 * MiB) == bytes(2 * MiB + 5)
        h.shutdown()


def _block_status(h: nbd.NBD, length: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []

    def extent(context: str, start: int, entries: list[int], error: Any) -> int:
        assert context == nbd.CONTEXT_BASE_ALLOCATION
        extents.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(length, offset, extent, flags)
    return extents


def test_block_status_reports_base_allocation(server: ThreadedNbdServer) -> None:
    h = connect(server, "ro")
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    extents = _block_status(h, 16 * MiB, 0)
    hole = nbd.STATE_HOLE | nbd.STATE_ZERO
    assert extents == [(5 * MiB, hole), (3 * MiB, 0), (8 * MiB, hole)]
    assert _block_status(h, 16 * MiB, 0, nbd.CMD_FLAG_REQ_ONE) == [(5 * MiB, hole)]
    assert _block_status(h, 16 * MiB, 6 * MiB, nbd.CMD_FLAG_REQ_ONE) == [(2 * MiB, 0)]
    h.shutdown()


def test_block_status_without_a_context_is_refused(server: ThreadedNbdServer) -> None:
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(uri(server, "ro"))
    assert nbd_errno(lambda: _block_status(h, MiB, 0)) == "EINVAL"
    h.shutdown()


def test_read_only_export_allows_multi_conn(server: ThreadedNbdServer, image: tuple[Path, bytes]) -> None:
    handles = [connect(server, "ro") for _ in range(4)]
    assert all(h.can_multi_conn() and h.is_read_only() for h in handles)
    failures: list[int] = []

    def reader(h: nbd.NBD, start: int) -> None:
        for offset in range(start * MiB, SIZE, 4 * MiB):
            if h.pread(MiB, offset) != image[1][offset : offset + MiB]:
                failures.append(offset)

    threads = [threading.Thread(target=reader, args=(h, i)) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(server.connections()) == 4
    for h in handles:
        h.shutdown()


def test_writes_to_a_read_only_export_fail_with_eperm(
    server: ThreadedNbdServer, image: tuple[Path, bytes]
) -> None:
    before = digest(image[0])
    h = connect(server, "ro", strict=False)
    assert h.is_read_only()
    assert nbd_errno(lambda: h.pwrite(b"x" * 4096, 5 * MiB)) == "EPERM"
    assert nbd_errno(lambda: h.zero(4096, 5 * MiB)) == "EPERM"
    assert nbd_errno(lambda: h.trim(4096, 5 * MiB)) == "EPERM"
    assert h.pread(4096, 5 * MiB) == image[1][5 * MiB : 5 * MiB + 4096]  # still served
    h.shutdown()
    assert digest(image[0]) == before


def test_out_of_range_requests_fail(server: ThreadedNbdServer, rw_image: tuple[Path, bytes]) -> None:
    before = digest(rw_image[0])
    h = connect(server, "rw", strict=False)
    assert nbd_errno(lambda: h.pread(4096, SIZE - 1024)) == "EINVAL"
    assert nbd_errno(lambda: h.pread(33 * MiB, 0)) == "EINVAL"  # over the 32 MiB maximum
    assert nbd_errno(lambda: h.pwrite(b"y" * 4096, SIZE - 1024)) == "ENOSPC"
    assert nbd_errno(lambda: h.trim(4096, SIZE)) == "EINVAL"
    assert h.pread(4096, SIZE - 4096) == rw_image[1][-4096:]
    h.shutdown()
    assert digest(rw_image[0]) == before


# -- negotiation ------------------------------------------------------------------------------------


def _list(server: ThreadedNbdServer) -> list[tuple[str, str]]:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(f"nbd://127.0.0.1:{server.port}")
    found: list[tuple[str, str]] = []
    h.opt_list(lambda name, description: found.append((name, description)))
    h.opt_abort()
    return found


def test_opt_list_lists_nothing_unless_listable(image: tuple[Path, bytes], server: ThreadedNbdServer) -> None:
    assert _list(server) == []
    with ThreadedNbdServer(host="127.0.0.1", port=0, listable=True) as listable:
        listable.add("a", FileDevice(image[0], read_only=True), description="first")
        listable.add("b", FileDevice(image[0], read_only=True))
        assert sorted(_list(listable)) == [("a", "first"), ("b", "")]


def test_opt_info_describes_an_export_without_opening_it(server: ThreadedNbdServer) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(uri(server, "ro"))
    h.opt_info()
    assert h.get_size() == SIZE
    assert h.get_export_description() == "the read-only image"
    assert h.is_read_only()
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 65536
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
    h.set_export_name("no-such-export")
    with pytest.raises(nbd.Error):
        h.opt_info()
    h.opt_abort()


def test_a_disallowed_client_is_refused_and_logged(
    server: ThreadedNbdServer, image: tuple[Path, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dingyuan.nbd")
    server.add("elsewhere", FileDevice(image[0], read_only=True), allowed_clients=["10.0.0.0/8"])
    server.add(
        "here", FileDevice(image[0], read_only=True), allowed_clients=[ipaddress.ip_network("127.0.0.0/8")]
    )
    with pytest.raises(nbd.Error, match=r"(?i)policy|denied|not permitted"):
        connect(server, "elsewhere")
    assert any("refused client 127.0.0.1" in r.getMessage() for r in caplog.records)
    assert all("elsewhere" not in r.getMessage() for r in caplog.records)  # names are secrets
    h = connect(server, "here")
    assert h.pread(10, 5 * MiB) == image[1][5 * MiB : 5 * MiB + 10]
    h.shutdown()


def test_unknown_export_is_refused(server: ThreadedNbdServer) -> None:
    with pytest.raises(nbd.Error):
        connect(server, "nope")


def test_remove_hangs_up_the_export_s_clients(server: ThreadedNbdServer, image: tuple[Path, bytes]) -> None:
    h = connect(server, "ro")
    assert h.pread(10, 5 * MiB) == image[1][5 * MiB : 5 * MiB + 10]
    server.remove("ro")
    assert server.names() == ["rw"]
    with pytest.raises(nbd.Error):
        h.pread(10, 5 * MiB)
    with pytest.raises(nbd.Error):
        connect(server, "ro")


def test_a_factory_device_lives_while_clients_use_it(image: tuple[Path, bytes]) -> None:
    opened: list[FileDevice] = []
    closed: list[FileDevice] = []

    class Counted(FileDevice):
        def close(self) -> None:
            closed.append(self)
            super().close()

    def factory() -> FileDevice:
        opened.append(Counted(image[0], read_only=True))
        return opened[-1]

    with ThreadedNbdServer(host="127.0.0.1", port=0) as s:
        s.add("lazy", factory)
        assert opened == []
        a, b = connect(s, "lazy"), connect(s, "lazy")
        assert len(opened) == 1  # one device shared by both connections
        a.shutdown()
        assert b.pread(10, 5 * MiB) == image[1][5 * MiB : 5 * MiB + 10]
        b.shutdown()
        connect(s, "lazy").shutdown()
    assert len(opened) == 2 and closed == opened


# -- TLS -------------------------------------------------------------------------------------------------


def _write_pki(directory: Path) -> ssl.SSLContext:
    """A CA (ca-cert.pem, as libnbd expects it) and a server certificate for 127.0.0.1 signed by
    it; returns the server's SSL context."""
    now = datetime.datetime.now(datetime.UTC)
    valid = {
        "not_valid_before": now - datetime.timedelta(hours=1),
        "not_valid_after": now + datetime.timedelta(days=1),
    }
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dingyuan test CA")])
    ca = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, **valid)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]),
            issuer_name=ca_name,
            **valid,
        )
        .public_key(key.public_key())
        .serial_number(2)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain = directory / "server.pem"
    chain.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain)
    return context


def _tls_client(pki: Path, port: int, name: str) -> nbd.NBD:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(pki))
    h.connect_uri(f"nbds://127.0.0.1:{port}/{name}")
    return h


def test_tls_only_export(image: tuple[Path, bytes], tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    context = _write_pki(pki)
    with ThreadedNbdServer(host="127.0.0.1", port=0, tls=context) as s:
        s.add("secret", FileDevice(image[0], read_only=True), tls_required=True)
        s.add("open", FileDevice(image[0], read_only=True))
        h = _tls_client(pki, s.port, "secret")
        assert h.get_tls_negotiated()
        assert h.pread(MiB, 5 * MiB) == image[1][5 * MiB : 6 * MiB]
        h.shutdown()
        with pytest.raises(nbd.Error, match="TLS"):
            connect(s, "secret")  # plaintext is refused
        plain = connect(s, "open")  # SELECTIVETLS: other exports stay open in plaintext
        assert plain.pread(10, 5 * MiB) == image[1][5 * MiB : 5 * MiB + 10]
        plain.shutdown()


def test_forced_tls_refuses_every_plaintext_option(image: tuple[Path, bytes], tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    context = _write_pki(pki)
    with ThreadedNbdServer(host="127.0.0.1", port=0, tls=context, force_tls=True, listable=True) as s:
        s.add("any", FileDevice(image[0], read_only=True))
        with pytest.raises(nbd.Error, match="TLS"):
            connect(s, "any")
        h = _tls_client(pki, s.port, "any")
        assert h.pread(10, SIZE - 10) == image[1][-10:]
        h.shutdown()
