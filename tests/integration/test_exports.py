"""Instant access end to end: a vault process serves snapshots and clones over NBD to real
clients (qemu-img, nbdinfo, nbdcopy), and the CLI mounts them (ext4 and NTFS), restores single
files, and writes through clones that survive a vault restart while the snapshot stays as it was.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest
from mountkit import Disk, leftovers, loop_device, make_disk, needs_mount_tools, partition_range, read_tree
from protectkit import Vault, cli, sha256_file

pytestmark = [needs_mount_tools]
CHUNK = 64 << 10


@dataclass
class Setup:
    root: Path
    vault: Vault
    raw: Path  # a sparse disk image with data and holes
    ext4: Disk
    ntfs: Disk

    def dy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.vault.dy(*args, check=check)

    def export(self, ref: str, *more: str) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.dy("export", "start", ref, *more, "--json").stdout)
        return doc

    def snapshot(self, volume: str) -> dict[str, object]:
        snaps = self.vault.call("GET", "/snapshots", params={"volume": volume})
        assert len(snaps) >= 1
        doc: dict[str, object] = snaps[-1]
        return doc


def _sparse_image(path: Path, seed: int) -> None:
    """64 MiB: random data in some chunks, holes elsewhere, a partial chunk at the end."""
    rng = random.Random(seed)
    size = (64 << 20) - 12345
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(40):
            off = rng.randrange(0, size - CHUNK)
            f.seek(off)
            f.write(rng.randbytes(rng.randrange(1, 3 * CHUNK)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("exports")
    vault = Vault(root)
    raw = root / "raw.img"
    _sparse_image(raw, 1)
    ext4 = make_disk(root / "ext4.img", None, ["ext4"], seed=2)
    ntfs = make_disk(root / "ntfs.img", "gpt", ["ntfs"], seed=3)
    repo = ["--repo", str(vault.dir / "repository"), "--passphrase-file", str(vault.passfile)]
    for volume, image in (("raw", raw), ("ext4", ext4.image), ("ntfs", ntfs.image)):
        cli("backup", str(image), "--volume", volume, "--host", "srv1", *repo)
    vault.start()  # indexes the snapshots in its catalog at start
    s = Setup(root, vault, raw, ext4, ntfs)
    try:
        yield s
    finally:
        vault.stop()
        assert leftovers(root) == []


def test_real_clients_read_the_export_exactly(setup: Setup, tmp_path: Path) -> None:
    snap = setup.snapshot("raw")
    export = setup.export("raw@latest")
    uri = str(export["uri"])
    assert re.fullmatch(rf"nbd://127\.0\.0\.1:{setup.vault.nbd_port}/[a-z2-7]{{32}}", uri)
    assert export["kind"] == "snapshot" and export["target"] == snap["id"] and not export["writable"]

    restored = tmp_path / "restored.img"
    cli(
        "restore",
        str(snap["id"]),
        str(restored),
        "--repo",
        str(setup.vault.dir / "repository"),
        "--passphrase-file",
        str(setup.vault.passfile),
    )
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(restored), uri], capture_output=True, text=True
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr

    # nbdinfo --map: the holes of the image are holes of the export
    mapping = json.loads(
        subprocess.run(["nbdinfo", "--map", "--json", uri], capture_output=True, check=True, text=True).stdout
    )
    holes = sum(e["length"] for e in mapping if e["type"] & 1)
    data = [(e["offset"], e["length"]) for e in mapping if not e["type"] & 1]
    assert holes > 0 and data
    with open(setup.raw, "rb") as f:
        for off, n in data:  # every data extent lies where the image has data
            f.seek(off)
            assert any(f.read(n)), f"extent at {off} reported as data is all zeros in the snapshot"

    # nbdcopy: out and back in through a writable clone
    out = tmp_path / "out.img"
    subprocess.run(["nbdcopy", uri, str(out)], check=True)
    assert sha256_file(out) == sha256_file(setup.raw)
    refused = setup.vault.api.delete(f"/snapshots/{snap['id']}")  # in use: kept
    assert refused.status_code == 409 and "exported" in refused.json()["message"]
    setup.dy("export", "stop", str(export["id"]))
    gone = subprocess.run(["nbdinfo", uri], capture_output=True, text=True)
    assert gone.returncode != 0


def test_writes_land_in_a_clone_that_survives_a_crash(setup: Setup, tmp_path: Path) -> None:
    snap = setup.snapshot("raw")
    export = setup.export("raw@latest", "--writable")
    assert export["kind"] == "clone" and export["writable"]
    clone_id = str(export["target"])
    payload = random.Random(9).randbytes(3 * CHUNK + 100)
    src = tmp_path / "payload"
    src.write_bytes(payload)
    # write through the export with nbdcopy into a range of the clone (qemu-io would need qemu-utils
    # too); nbdcopy writes the whole target, so copy the image with the payload spliced in
    changed = tmp_path / "changed.img"
    subprocess.run(["cp", "--sparse=always", str(setup.raw), str(changed)], check=True)
    with open(changed, "r+b") as f:
        f.seek(5 * CHUNK + 7)
        f.write(payload)
    subprocess.run(["nbdcopy", "--flush", str(changed), str(export["uri"])], check=True)

    # the snapshot is unchanged, bytes and id
    after = setup.snapshot("raw")
    assert after["id"] == snap["id"]
    ro = setup.export(str(snap["id"]))
    subprocess.run(["nbdcopy", str(ro["uri"]), str(tmp_path / "snap.img")], check=True)
    assert sha256_file(tmp_path / "snap.img") == sha256_file(setup.raw)

    setup.vault.kill()  # a crash: what was flushed survives it
    setup.vault.start()
    clones = json.loads(setup.dy("clone", "list", "--json").stdout)
    assert clone_id in [c["id"] for c in clones]
    exports = json.loads(setup.dy("export", "list", "--json").stdout)
    again = next(e for e in exports if e["id"] == export["id"])  # served again after the restart
    subprocess.run(["nbdcopy", str(again["uri"]), str(tmp_path / "clone.img")], check=True)
    assert sha256_file(tmp_path / "clone.img") == sha256_file(changed)

    # a snapshot of the clone restores to what was written; promote makes it a volume
    setup.dy("export", "stop", str(export["id"]), str(ro["id"]))
    name = next(c["name"] for c in clones if c["id"] == clone_id)
    snap_doc = json.loads(setup.dy("clone", "snapshot", name, "--json").stdout)
    restored = tmp_path / "clone-restored.img"
    cli(
        "restore",
        snap_doc["id"],
        str(restored),
        "--repo",
        str(setup.vault.dir / "repository"),
        "--passphrase-file",
        str(setup.vault.passfile),
    )
    assert sha256_file(restored) == sha256_file(changed)
    promoted = json.loads(setup.dy("clone", "promote", name, "--volume", "raw-fixed", "--json").stdout)
    assert promoted["volume"] == "raw-fixed"
    assert clone_id not in [c["id"] for c in json.loads(setup.dy("clone", "list", "--json").stdout)]


def test_libnbd_commands_on_a_clone_export(setup: Setup, tmp_path: Path) -> None:
    """Every command a client may send, through the vault to a clone; the snapshot stays as it was."""
    snap = setup.snapshot("raw")
    export = setup.export("raw@latest", "--writable")
    model = bytearray(setup.raw.read_bytes())
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(str(export["uri"]))
    assert h.get_size() == len(model) and h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    rng = random.Random(5)
    for _ in range(30):
        off = rng.randrange(len(model) - 3 * CHUNK)
        n = rng.randrange(1, 3 * CHUNK)
        op = rng.choice(["write", "zero", "zero-no-hole", "trim"])
        if op == "write":
            data = rng.randbytes(n)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.3 else 0)
            model[off : off + n] = data
        elif op == "trim":  # afterwards the range reads as zeros or as before: take what it reads
            h.trim(n, off)
            model[off : off + n] = h.pread(n, off)
            assert model[off : off + n] in (bytes(n), model[off : off + n])
        else:
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if op == "zero-no-hole" else 0)
            model[off : off + n] = bytes(n)
    h.flush()
    h.cache(4 * CHUNK, 0)
    step = 16 << 20  # reads up to 32 MiB are allowed; the server splits them into structured chunks
    assert b"".join(h.pread(min(step, len(model) - o), o) for o in range(0, len(model), step)) == model
    extents: list[tuple[int, int]] = []

    def collect(context: str, offset: int, entries: list[int], error: object) -> int:
        extents.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(len(model), 0, collect)
    pos = 0
    for length, flags in extents:  # a range reported as a hole reads as zeros
        if flags & nbd.STATE_HOLE:
            assert not any(model[pos : pos + length])
        pos += length
    assert pos >= len(model)
    h.shutdown()
    setup.dy("export", "stop", str(export["id"]))
    assert setup.snapshot("raw")["id"] == snap["id"]
    ro = setup.export(str(snap["id"]))
    subprocess.run(["nbdcopy", str(ro["uri"]), str(tmp_path / "snap.img")], check=True)
    setup.dy("export", "stop", str(ro["id"]))
    assert sha256_file(tmp_path / "snap.img") == sha256_file(setup.raw)
    setup.dy("clone", "delete", str(export["target"]))


@pytest.mark.parametrize("volume", ["ext4", "ntfs"])
def test_mount_reads_the_files_of_a_snapshot(setup: Setup, tmp_path: Path, volume: str) -> None:
    disk = setup.ext4 if volume == "ext4" else setup.ntfs
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    setup.dy("mount", f"{volume}@latest", str(mnt))
    try:
        tree = read_tree(mnt)
    finally:
        setup.dy("umount", str(mnt))
    ((_, expected),) = disk.trees.items()
    assert tree == expected
    assert json.loads(setup.dy("export", "list", "--json").stdout) == []  # umount stopped it


@pytest.mark.parametrize("volume", ["ext4", "ntfs"])
def test_rw_mount_writes_a_clone_and_fsck_is_clean(setup: Setup, tmp_path: Path, volume: str) -> None:
    before = setup.snapshot(volume)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    setup.dy("mount", f"{volume}@latest", str(mnt), "--rw")
    try:
        (mnt / "new.txt").write_text("written through a clone\n")
    finally:
        setup.dy("umount", str(mnt))
    clones = json.loads(setup.dy("clone", "list", "--json").stdout)
    clone = next(c for c in clones if c["snapshot"] == before["id"])
    assert setup.snapshot(volume)["id"] == before["id"]

    image = tmp_path / "clone.img"
    export = setup.export(clone["name"])
    subprocess.run(["nbdcopy", str(export["uri"]), str(image)], check=True)
    setup.dy("export", "stop", str(export["id"]))
    if volume == "ext4":
        check = ["e2fsck", "-fn", str(image)]
        read = ["debugfs", "-R", "cat /new.txt", str(image)]
        _check_and_read(check, read)
    else:  # the NTFS disk has a GPT: check its partition through a loop device
        offset, size = partition_range(image, 1)
        with loop_device(image, offset, size, read_only=True) as dev:
            _check_and_read(["ntfsfix", "-n", dev], ["ntfscat", dev, "new.txt"])
    setup.dy("clone", "delete", clone["name"])


def _check_and_read(check: list[str], read: list[str]) -> None:
    fsck = subprocess.run(check, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert subprocess.run(read, capture_output=True, text=True).stdout == "written through a clone\n"


def test_restore_files_copies_files_out_of_a_snapshot(setup: Setup, tmp_path: Path) -> None:
    to = tmp_path / "out"
    setup.dy("restore-files", "ntfs@latest", "/data.bin", "/tree/a", "--to", str(to))
    ((_, expected),) = setup.ntfs.trees.items()
    assert (to / "data.bin").read_bytes() == expected["data.bin"][1]
    assert (to / "tree/a/b/deep.bin").read_bytes() == expected["tree/a/b/deep.bin"][1]
    assert json.loads(setup.dy("export", "list", "--json").stdout) == []
