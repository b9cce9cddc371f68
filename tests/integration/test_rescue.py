"""The rescue tool end to end: a real vault process hands out dingyuan-rescue.pyz, which runs under a
bare ``python3 -I -S`` (no project, no site-packages, an empty environment), enrolls with a one-time
token, lists the host's snapshots, restores one bit-exact into a new sparse file, and repairs a
damaged copy fetching exactly the damaged chunks. Mistakes give clear errors and a non-zero status.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mountkit import loop_device, mounted_device
from protectkit import Vault, cli, sha256_file

CHUNK = 64 << 10
SIZE = (64 << 20) - 12345  # a partial last chunk
HOST, OTHER = "srv1", "srv2"
STATS = re.compile(r"fetched=(\d+) holes=(\d+) unchanged=(\d+) received=(\d+) written=(\d+)")
PYTHON = "/usr/bin/python3"


def _image(path: Path, seed: int, size: int) -> None:
    """Random data in some places, text that compresses in one, holes elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(30):
            f.seek(rng.randrange(0, size - 3 * CHUNK))
            f.write(rng.randbytes(rng.randrange(1, 3 * CHUNK)))
        f.seek(size // 2)
        f.write(b"the rescue tool compresses this text. " * 20000)
        f.seek(size - 100)
        f.write(rng.randbytes(100))


@dataclass
class Setup:
    vault: Vault
    image: Path
    pyz: Path
    work: Path  # the rescue tool's working directory (its state file lands there)
    other_snapshot: str

    def rescue(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-I", "-S", str(self.pyz), *args],
            cwd=self.work,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def enrollment_token(self, host: str) -> str:
        return self.vault.dy("vault", "enroll-token", host).stdout.strip()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("rescue")
    vault = Vault(root)
    image, other = root / "disk.img", root / "other.img"
    _image(image, 1, SIZE)
    _image(other, 2, 4 << 20)
    repo = ["--repo", str(vault.dir / "repository"), "--passphrase-file", str(vault.passfile)]
    cli("backup", str(image), "--volume", "root", "--host", HOST, *repo)
    cli("backup", str(other), "--volume", "data", "--host", OTHER, *repo)
    vault.start()  # indexes the snapshots in its catalog at start
    try:
        # the tool as an administrator would fetch it: no credential, the vault's CA
        r = httpx.get(
            vault.url + "/api/v1/rescue.pyz", verify=ssl.create_default_context(cafile=str(vault.ca))
        )
        assert r.status_code == 200, r.text
        pyz = root / "dingyuan-rescue.pyz"
        pyz.write_bytes(r.content)
        work = root / "live"
        work.mkdir()
        [snap] = vault.snapshots(OTHER, "data")
        yield Setup(vault, image, pyz, work, snap["id"])
    finally:
        vault.stop()


@pytest.fixture(scope="module")
def enrolled(setup: Setup) -> Setup:
    done = setup.rescue("enroll", setup.vault.url, setup.enrollment_token(HOST))
    assert done.returncode == 0, done.stderr
    assert f"enrolled as host {HOST}" in done.stdout
    state = setup.work / "dingyuan-rescue.json"
    assert state.stat().st_mode & 0o777 == 0o600  # it holds an API token
    return setup


def _stats(out: str) -> dict[str, int]:
    m = STATS.search(out)
    assert m, out
    return dict(
        zip(("fetched", "holes", "unchanged", "received", "written"), map(int, m.groups()), strict=True)
    )


def _chunks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def test_list_restore_and_delta_restore_are_bit_exact(enrolled: Setup) -> None:
    s = enrolled
    [snap] = s.vault.snapshots(HOST, "root")
    listed = s.rescue("list")
    assert listed.returncode == 0, listed.stderr
    assert snap["id"][:16] in listed.stdout and "root" in listed.stdout
    assert "data" not in listed.stdout  # another host's volume

    out = s.work / "restored.img"
    full = s.rescue("restore", "root@latest", str(out), "--yes")
    assert full.returncode == 0, full.stderr
    assert sha256_file(out) == sha256_file(s.image)
    chunks = _chunks(s.image)
    holes = sum(c == bytes(len(c)) for c in chunks)
    stats = _stats(full.stdout)
    assert stats["fetched"] == len(chunks) and stats["holes"] == holes
    assert stats["received"] < SIZE  # holes travel as headers, the text compressed
    assert out.stat().st_blocks * 512 < SIZE - holes * CHUNK // 2  # holes skipped: the file is sparse
    assert "MB/s" in full.stderr  # progress

    # damage the copy: inside a data chunk, across the boundary of two, in a hole, the partial last chunk
    data = [i for i, c in enumerate(chunks[:-1]) if c != bytes(len(c))]
    pair = next(i for i in data if i + 1 in data)
    hole = next(i for i, c in enumerate(chunks) if c == bytes(len(c)) and abs(i - pair) > 2)
    inside = next(i for i in data if abs(i - pair) > 2)
    rng = random.Random(3)
    damaged: set[int] = set()
    with open(out, "r+b") as f:
        for offset, length in (
            (inside * CHUNK + 100, 10),
            ((pair + 1) * CHUNK - 50, 100),
            (hole * CHUNK, 4096),
            (SIZE - 7, 7),
        ):
            f.seek(offset)
            f.write(rng.randbytes(length))
            damaged.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
    assert sha256_file(out) != sha256_file(s.image)
    assert len(damaged) == 5

    delta = s.rescue("restore", snap["id"][:10], str(out), "--delta", "--yes")
    assert delta.returncode == 0, delta.stderr
    assert sha256_file(out) == sha256_file(s.image)
    stats = _stats(delta.stdout)
    assert stats["fetched"] == len(damaged) and stats["holes"] == 1
    assert stats["unchanged"] == len(chunks) - len(damaged)

    again = s.rescue("restore", snap["id"], str(out), "--delta", "--yes")  # digests now cached
    assert again.returncode == 0, again.stderr
    assert _stats(again.stdout)["fetched"] == 0


def test_a_restore_over_an_existing_file_writes_its_holes(enrolled: Setup) -> None:
    s = enrolled
    out = s.work / "dirty.img"
    out.write_bytes(b"\xff" * SIZE)
    done = s.rescue("restore", "root@latest", str(out), "--yes")
    assert done.returncode == 0, done.stderr
    assert sha256_file(out) == sha256_file(s.image)


needs_loop = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in ("losetup", "mkfs.ext4", "mount")),
    reason="needs root, losetup, mkfs.ext4 and mount",
)


@needs_loop
def test_a_disk_is_restored_and_a_mounted_one_refused(enrolled: Setup, tmp_path: Path) -> None:
    s = enrolled
    backing = tmp_path / "disk"
    backing.write_bytes(b"\xaa" * (65 << 20))  # old contents everywhere, one MiB past the snapshot
    with loop_device(backing, 0, 65 << 20) as dev:
        done = s.rescue("restore", "root@latest", dev, "--yes")
        assert done.returncode == 0, done.stderr
    with open(backing, "rb") as f:
        restored, rest = f.read(SIZE), f.read()
    assert hashlib.sha256(restored).hexdigest() == sha256_file(s.image)  # holes written as zeros
    assert rest == b"\xaa" * ((65 << 20) - SIZE)  # past the snapshot: untouched

    subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True, capture_output=True)
    with loop_device(backing, 0, 65 << 20) as dev, mounted_device(dev, tmp_path / "mnt", "ext4") as mnt:
        done = s.rescue("restore", "root@latest", dev, "--yes")
        assert done.returncode == 31 and f"mounted at {mnt}" in done.stderr, done.stderr
        assert (mnt / "lost+found").is_dir()  # the file system is intact


def test_mistakes_give_clear_errors(enrolled: Setup) -> None:
    s = enrolled
    out = str(s.work / "never.img")

    def refused(*args: str, match: str, stdin: str = "") -> None:
        done = s.rescue(*args, stdin=stdin)
        assert done.returncode != 0, done.stdout
        assert re.search(match, done.stderr), done.stderr
        assert "Traceback" not in done.stderr

    refused("restore", "0" * 64, out, "--yes", match=r"no snapshot 000000000000 of host srv1")
    refused(
        "restore", s.other_snapshot, out, "--yes", match=rf"no snapshot {s.other_snapshot[:12]} of host srv1"
    )
    refused("restore", "nosuch@latest", out, "--yes", match="has no snapshot of volume 'nosuch'")
    small = s.work / "small.img"
    small.write_bytes(b"\0" * 4096)
    refused("restore", "root@latest", str(small), "--yes", match="less than the snapshot's")
    refused("restore", "root@latest", out, "--delta", "--yes", match="does not exist")
    refused("restore", "root@latest", out, stdin="no\n", match="not confirmed")
    assert not Path(out).exists()  # nothing written, not even an empty file

    token = s.enrollment_token(HOST)
    fingerprint = token.split(".")[1]
    other = s.work / "other.json"
    refused(
        "enroll",
        s.vault.url,
        f"dye1.{fingerprint}.{'x' * 43}",
        "--state",
        str(other),
        match="unknown enrollment",
    )
    refused(
        "enroll", s.vault.url, f"dye1.{'0' * 64}.{'x' * 43}", "--state", str(other), match="does not match"
    )
    refused("enroll", s.vault.url, "not-a-token", "--state", str(other), match="looks like dye1")
    assert not other.exists()
    refused("list", "--state", str(other), match="not enrolled yet")


def test_the_vault_checks_compare_bodies_and_ranges(setup: Setup) -> None:
    [snap] = setup.vault.snapshots(HOST, "root")
    base = f"/snapshots/{snap['id']}"
    r = setup.vault.api.post(f"{base}/compare", params={"start": 0}, content=b"x" * 31)
    assert r.status_code == 422 and "32 bytes" in r.json()["message"]
    r = setup.vault.api.post(f"{base}/compare", params={"start": 1020}, content=b"x" * 32 * 10)
    assert r.status_code == 422 and "past the end" in r.json()["message"]
    r = setup.vault.api.get(f"{base}/chunks", params={"start": 0, "count": 257})
    assert r.status_code == 422
    # an administrator may compare too: the zero digest matches a hole, anything else differs
    layout = setup.vault.call("GET", f"{base}/layout")
    chunks = _chunks(setup.image)
    digests = [hashlib.sha256(c).digest() for c in chunks[:100]]
    r = setup.vault.api.post(f"{base}/compare", params={"start": 0}, content=b"".join(digests))
    assert r.status_code == 200 and r.json() == {"differ": []}
    assert layout["chunks"] == len(chunks) and layout["chunk_size"] == CHUNK
    # a viewer sees snapshots but may not read a disk's contents
    viewer = setup.vault.call("POST", "/tokens", json={"role": "viewer"})["token"]
    headers = {"Authorization": f"Bearer {viewer}"}
    assert setup.vault.api.get(f"{base}", headers=headers).status_code == 200
    r = setup.vault.api.get(f"{base}/chunks", params={"start": 0, "count": 1}, headers=headers)
    assert r.status_code == 403


def test_the_build_script_makes_a_runnable_tool(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "build-rescue.sh"
    out = tmp_path / "dingyuan-rescue.pyz"
    subprocess.run(["bash", str(script), str(out)], check=True, capture_output=True, timeout=60)
    done = subprocess.run(
        [PYTHON, "-I", "-S", str(out), "--version"], env={}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("dingyuan-rescue "), done.stderr
    assert os.access(out, os.X_OK)  # runs as ./dingyuan-rescue.pyz too
