"""`dingyuan restore --live`: the target is served over NBD or iSCSI at once, a client's reads see
the snapshot and its writes are kept, and when the copy is done the target is the snapshot plus
exactly those writes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import nbd
import pytest
from iscsikit import Initiator
from protectkit import PASSPHRASE, cli, wait_for

CHUNK = 64 << 10
SECTOR = 512


class Client:
    """Reads and writes through the printed URI, whichever the protocol."""

    def __init__(self, uri: str) -> None:
        self.iscsi: Initiator | None = None
        self.nbd: nbd.NBD | None = None
        if uri.startswith("iscsi://"):
            portal, iqn, _lun = uri.removeprefix("iscsi://").split("/")
            self.iscsi = Initiator(int(portal.rsplit(":", 1)[1]), iqn)
        else:
            self.nbd = nbd.NBD()
            self.nbd.connect_uri(uri)

    def pread(self, length: int, offset: int) -> bytes:
        if self.nbd is not None:
            return bytes(self.nbd.pread(length, offset))
        assert self.iscsi is not None and offset % SECTOR == 0 and length % SECTOR == 0
        step = 8 << 20
        return b"".join(
            self.iscsi.read((offset + o) // SECTOR, min(step, length - o) // SECTOR).data
            for o in range(0, length, step)
        )

    def pwrite(self, data: bytes, offset: int) -> None:
        if self.nbd is not None:
            self.nbd.pwrite(data, offset)
            self.nbd.flush()
            return
        assert self.iscsi is not None and offset % SECTOR == 0 and len(data) % SECTOR == 0
        assert self.iscsi.write(offset // SECTOR, data).status == 0
        assert self.iscsi.command(bytes([0x35]) + bytes(9)).status == 0  # SYNCHRONIZE CACHE(10)

    def close(self) -> None:
        if self.nbd is not None:
            self.nbd.shutdown()
        if self.iscsi is not None:
            self.iscsi.logout()
            self.iscsi.close()


@pytest.mark.parametrize("protocol", ["nbd", "iscsi"])
def test_restore_live_serves_the_target_while_it_is_copied(tmp_path: Path, protocol: str) -> None:
    rng = random.Random(4)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(48 << 20)
        for _ in range(30):
            f.seek(rng.randrange(0, (48 << 20) - CHUNK))
            f.write(rng.randbytes(rng.randrange(1, 2 * CHUNK)))
    env = dict(os.environ, DINGYUAN_REPO=str(tmp_path / "repo"), DINGYUAN_PASSPHRASE=PASSPHRASE)
    cli("repo", "init", env=env)
    cli("backup", str(image), "--volume", "disk", env=env)

    target = tmp_path / "target.img"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dingyuan.cli.main",
            "restore",
            "disk@latest",
            str(target),
            "--live",
            "--protocol",
            protocol,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        uri = proc.stdout.readline().strip()
        assert uri.startswith(f"{protocol}://127.0.0.1:"), uri + proc.stderr.read()
        h = Client(uri)
        expected = bytearray(image.read_bytes())
        assert h.pread(len(expected) // 2, 0) == expected[: len(expected) // 2]
        data = rng.randbytes(3 * CHUNK + SECTOR)  # crosses chunks, ends inside one
        h.pwrite(data, 5 * CHUNK + SECTOR)
        expected[5 * CHUNK + SECTOR : 5 * CHUNK + SECTOR + len(data)] = data
        wait_for("the copy to complete", lambda: _complete(proc), 120, 0.2)
        step = 16 << 20
        got = b"".join(h.pread(min(step, len(expected) - o), o) for o in range(0, len(expected), step))
        assert got == expected  # served from the whole target now
        h.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "complete" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert target.read_bytes() == expected


def _complete(proc: subprocess.Popen[str]) -> bool:
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line or proc.poll() is None, "dingyuan restore --live exited before the copy completed"
    return "restore complete" in line
