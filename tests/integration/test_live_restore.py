"""Live restore with real clients: a target served over NBD (libnbd, a VM booting from it) while
the copy runs, and a restore killed mid-way that resumes.

What a user relies on: the target is usable before the restore finishes -- a server boots from
it -- and, once the copy is done, holds exactly the snapshot plus what was written to it; a
killed restore picks up where its state says, without fetching again what it had restored.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from helpers import PASSPHRASE, init_repo

import bootkit
from dingyuan.exports.nbd.server import ThreadedNbdServer
from dingyuan.recovery.vm import Vm, VmSpec
from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.live import STATE_HEADER, LiveRestore
from dingyuan.repository.manifest import Snapshot
from dingyuan.repository.repo import Repository

MiB = 1 << 20
CS = 64 << 10
#: the budget for the ready marker under software emulation
READY_BUDGET = 180.0


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    r = init_repo(LocalBackend(tmp_path / "repo"), tmp_path / "cache", 1 * MiB)
    yield r
    r.close()


def volume(path: Path, size: int, seed: int) -> bytes:
    """A sparse volume of random data with holes; returns its bytes."""
    rnd = random.Random(seed)
    data = bytearray(size)
    for c in range(0, size, CS):
        if rnd.random() < 0.75:
            data[c : c + CS] = rnd.randbytes(min(CS, size - c))
    with path.open("wb") as f:
        f.truncate(size)
        for c in range(0, size, CS):
            if any(data[c : c + CS]):
                f.seek(c)
                f.write(data[c : c + CS])
    return bytes(data)


def back_up(repo: Repository, path: Path) -> Snapshot:
    return backup(repo, str(path), "vol", host="h1", chunk_size=CS).snapshot


def test_clients_write_over_nbd_while_the_copy_runs(repo: Repository, tmp_path: Path) -> None:
    snap_bytes = volume(tmp_path / "vol.img", 8 * MiB + 4096, seed=1)
    snap = back_up(repo, tmp_path / "vol.img")
    model = bytearray(snap_bytes)
    target = tmp_path / "target.img"
    live = LiveRestore(repo, snap, str(target), tmp_path / "state", rate=1 * MiB, batch_bytes=4 * CS)
    try:
        with ThreadedNbdServer(host="127.0.0.1", port=0) as server:
            server.add("live", live)
            h = nbd.NBD()
            h.connect_uri(f"nbd://127.0.0.1:{server.port}/live")
            assert h.get_size() == snap.size and h.can_flush() and not h.is_read_only()
            rnd = random.Random(2)
            for _ in range(200):  # partial chunks, whole chunks, across chunk borders
                off = rnd.randrange(snap.size - 1)
                data = rnd.randbytes(min(rnd.choice([1, 512, 5000, CS, 3 * CS]), snap.size - off))
                h.pwrite(data, off)
                model[off : off + len(data)] = data
            h.zero(2 * CS, 10 * CS)
            model[10 * CS : 12 * CS] = bytes(2 * CS)
            h.flush()
            assert not live.complete  # all of that happened during the copy
            got = b"".join(h.pread(min(MiB, snap.size - o), o) for o in range(0, snap.size, MiB))
            assert got == model
            live.rate = None
            assert live.wait(120)
            got = b"".join(h.pread(min(MiB, snap.size - o), o) for o in range(0, snap.size, MiB))
            assert got == model  # now straight from the target
            h.shutdown()
    finally:
        live.close()
    assert target.read_bytes() == model
    assert not (tmp_path / "state" / "state").exists()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None, reason="needs root and losetup (a loop device)"
)
def test_a_block_device_target_is_written_whole_holes_included(repo: Repository, tmp_path: Path) -> None:
    """A device is not sparse: what it held before must not show through the snapshot's holes,
    and nothing past the snapshot's size is touched."""
    snap_bytes = volume(tmp_path / "vol.img", 4 * MiB + 512, seed=4)
    snap = back_up(repo, tmp_path / "vol.img")
    backing = tmp_path / "disk.img"
    old = random.Random(5).randbytes(6 * MiB)
    backing.write_bytes(old)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        with LiveRestore(repo, snap, loop, tmp_path / "state", batch_bytes=4 * CS) as live:
            live.write(3 * CS + 7, b"client")
            assert live.wait(60)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)
    expected = bytearray(snap_bytes)
    expected[3 * CS + 7 : 3 * CS + 13] = b"client"
    got = backing.read_bytes()
    assert got[: snap.size] == expected
    assert got[snap.size :] == old[snap.size :]


# the acceptance case: a server boots from the target while it is being restored ----------------
needs_vm = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None,
    reason="needs root (the boot disk is built on a loop device) and qemu-system-x86_64",
)


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """The VM's run directory; a VM a failing test left running there is stopped."""
    path = tmp_path / "run"
    yield path
    if (path / "vm.json").exists():
        Vm.load(path).stop(timeout=0)


@needs_vm
@pytest.mark.slow
def test_a_vm_boots_from_the_target_while_the_restore_runs(
    repo: Repository, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, run_dir: Path
) -> None:
    image = bootkit.build_image(tmp_path_factory.mktemp("bootkit"))
    snap = back_up(repo, image)
    snap_bytes = image.read_bytes()
    target = tmp_path / "restored.img"
    # slow enough that the copier cannot be done when the guest comes up, however fast it boots
    live = LiveRestore(repo, snap, str(target), tmp_path / "state", rate=16 << 10, batch_bytes=CS)
    try:
        with ThreadedNbdServer(host="127.0.0.1", port=0) as server:
            server.add("restore", live)
            uri = f"nbd://127.0.0.1:{server.port}/restore"
            vm = Vm.start(VmSpec("live-restore", uri, memory_mib=256), run_dir)
            ready = vm.wait_for_serial(bootkit.READY, READY_BUDGET)
            at_ready = live.restored_bytes
            assert not live.complete, "the copy finished before the guest came up: nothing was shown"
            vm.wait_for_serial(bootkit.WRITE_OK, 30)
            vm.stop(timeout=30)
            print(
                f"ready after {ready:.1f} s ({vm.accel}) with {at_ready >> 10} KiB of "
                f"{snap.size >> 10} KiB restored"
            )
        live.rate = None
        assert live.wait(120)
    finally:
        live.close()
    assert bootkit.written_marker(target) == bootkit.WROTE.encode()
    got = target.read_bytes()
    sector = slice(bootkit.WRITE_OFFSET, bootkit.WRITE_OFFSET + bootkit.SECTOR)
    assert got[sector] == f"{bootkit.WROTE}\n".encode().ljust(bootkit.SECTOR, b"\0")
    assert got[: sector.start] == snap_bytes[: sector.start]
    assert got[sector.stop :] == snap_bytes[sector.stop :]


# a restore killed mid-way --------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dingyuan.repository.backends.local import LocalBackend
    from dingyuan.repository.live import LiveRestore
    from dingyuan.repository.repo import Repository

    repo_dir, cache, snap_id, target, state, passphrase = sys.argv[1:]
    repo = Repository.open(LocalBackend(Path(repo_dir)), passphrase.encode(), cache_dir=Path(cache))
    live = LiveRestore(repo, repo.read_snapshot(snap_id), target, state, rate=2 << 20, batch_bytes=4 << 16)
    print("started", flush=True)
    live.wait()
    print("finished", flush=True)
    """
)


def durable_chunks(state: Path) -> int:
    """How many chunks the state file on disk says are restored."""
    raw = (state / "state").read_bytes()[STATE_HEADER.size :]
    return sum(bin(b).count("1") for b in raw)


def test_a_killed_restore_resumes_and_fetches_nothing_twice(repo: Repository, tmp_path: Path) -> None:
    snap_bytes = volume(tmp_path / "vol.img", 16 * MiB, seed=3)
    snap = back_up(repo, tmp_path / "vol.img")
    target, state = tmp_path / "target.img", tmp_path / "state"
    args = [str(tmp_path / "repo"), str(tmp_path / "child-cache"), snap.id, str(target), str(state)]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args, PASSPHRASE.decode()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "started\n", child.stderr.read() if child.stderr else ""
        deadline = time.monotonic() + 60
        while durable_chunks(state) < snap.nchunks // 4:  # a commit a second: a few of them
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.communicate()  # reaps it and closes the pipes
    live = LiveRestore(repo, snap, str(target), state, start=False)
    try:
        restored = live.chunk_states()
        assert snap.nchunks // 4 <= sum(restored) < snap.nchunks
        live.start()
        assert live.wait(120)
        assert live.fetched_chunks == sum(
            1 for i in range(snap.nchunks) if not restored[i] and any(snap_bytes[i * CS : (i + 1) * CS])
        )
    finally:
        live.close()
    assert target.read_bytes() == snap_bytes
    assert sorted(os.listdir(state)) == []
