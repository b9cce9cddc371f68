"""The backend contract (see dingyuan.repository.backends.base), checked on every backend.

To add a backend, add one line to BACKENDS: a factory from a fresh temporary directory.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dingyuan.errors import (
    ObjectExists,
    ObjectNotFound,
    StorageError,
    StorageFull,
    StorageIOError,
    UsageError,
)
from dingyuan.repository.backends.base import Backend, check_name
from dingyuan.repository.backends.faults import FaultyBackend
from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.backends.memory import MemoryBackend

BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "local": lambda tmp: LocalBackend(tmp / "repo"),
    "memory": lambda tmp: MemoryBackend(),
    "faulty-never": lambda tmp: FaultyBackend(MemoryBackend(), 0, errno.EIO),
}

ALLOWED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
INVALID_NAMES = ["", "/", "/a", "a/", "a//b", ".", "..", "../a", "a/..", "a/./b", "a b", "é", "a\\b", "a:b"]


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = BACKENDS[request.param](tmp_path)
    yield b
    b.close()


def all_objects(backend: Backend, prefix: str = "") -> dict[str, int]:
    items = list(backend.list(prefix))
    names = [n for n, _ in items]
    assert len(names) == len(set(names)), "list yielded a name twice"
    return dict(items)


# --- conformance ---------------------------------------------------------------------------------


def test_put_get_roundtrip(backend: Backend) -> None:
    backend.put("config", b"hello")
    backend.put("packs/ab/cdef", memoryview(b"xyz"))
    assert backend.get("config") == b"hello"
    assert backend.get("packs/ab/cdef") == b"xyz"
    assert backend.exists("config") and backend.exists("packs/ab/cdef")
    assert not backend.exists("packs/ab") and not backend.exists("nothing")


def test_put_replaces(backend: Backend) -> None:
    backend.put("a/b", b"old contents, longer")
    backend.put("a/b", b"new")
    assert backend.get("a/b") == b"new"
    assert all_objects(backend) == {"a/b": 3}


def test_create_refuses_existing(backend: Backend) -> None:
    backend.create("locks/x", b"first")
    with pytest.raises(ObjectExists):
        backend.create("locks/x", b"second")
    assert backend.get("locks/x") == b"first"
    assert all_objects(backend) == {"locks/x": 5}


def race_create(backend: Backend, name: str, threads: int) -> tuple[list[bytes], int]:
    """Run ``threads`` concurrent creates of ``name``; return the winners' data and the loser count."""
    barrier = threading.Barrier(threads)
    lock = threading.Lock()
    winners: list[bytes] = []
    losers = 0

    def attempt(i: int) -> None:
        nonlocal losers
        data = f"writer {i}".encode() * 100
        barrier.wait()
        try:
            backend.create(name, data)
        except ObjectExists:
            with lock:
                losers += 1
        else:
            with lock:
                winners.append(data)

    workers = [threading.Thread(target=attempt, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return winners, losers


def test_concurrent_creates_exactly_one_wins(backend: Backend) -> None:
    for round_ in range(5):
        name = f"locks/exclusive-{round_}"
        winners, losers = race_create(backend, name, 8)
        assert len(winners) == 1 and losers == 7
        assert backend.get(name) == winners[0]
    assert len(all_objects(backend, "locks/")) == 5


def test_missing_object(backend: Backend) -> None:
    backend.put("packs/ab/one", b"1")
    for name in ("missing", "packs/ab/two", "packs/ab", "packs", "packs/ab/one/deeper"):
        with pytest.raises(ObjectNotFound):
            backend.get(name)
        with pytest.raises(ObjectNotFound):
            backend.get_range(name, 0, 1)
        assert not backend.exists(name)


def test_get_range(backend: Backend) -> None:
    data = bytes(range(256)) * 4
    backend.put("blob", data)
    for offset, length in [(0, 1024), (0, 1), (1, 10), (255, 2), (1000, 24), (1023, 1), (512, 0), (1024, 0)]:
        assert backend.get_range("blob", offset, length) == data[offset : offset + length]


def test_get_range_short_read(backend: Backend) -> None:
    backend.put("blob", b"0123456789")
    for offset, length in [(0, 11), (5, 6), (10, 1), (100, 1)]:
        with pytest.raises(StorageIOError):
            backend.get_range("blob", offset, length)
    with pytest.raises(UsageError):
        backend.get_range("blob", -1, 1)
    with pytest.raises(UsageError):
        backend.get_range("blob", 0, -1)


def test_list_prefix(backend: Backend) -> None:
    objects = {
        "config": b"c" * 3,
        "keys/default": b"k" * 7,
        "packs/ab/ab01": b"",
        "packs/ab/ab02": b"x" * 11,
        "packs/ac/ac01": b"y" * 13,
        "packsX": b"z",
        "snapshots/s1": b"s" * 2,
    }
    for name, data in objects.items():
        backend.put(name, data)
    sizes = {name: len(data) for name, data in objects.items()}

    def expect(prefix: str) -> dict[str, int]:
        return {n: s for n, s in sizes.items() if n.startswith(prefix)}

    prefixes = "|c|config|pa|packs|packs/|packs/a|packs/ab|packs/ab/|packs/ab/ab0|packs/ab/ab02|packs/zz/"
    prefixes += "|snap|no|no/"
    for prefix in prefixes.split("|"):
        assert all_objects(backend, prefix) == expect(prefix), prefix


def test_list_rejects_invalid_prefix(backend: Backend) -> None:
    for prefix in ["/", "/a", "../", "a/../", "a//", "a b", "./x"]:
        with pytest.raises(UsageError):
            list(backend.list(prefix))


def test_delete_idempotent(backend: Backend) -> None:
    backend.put("a", b"1")
    backend.put("a.b", b"2")
    backend.put("dir/a", b"3")
    backend.delete("a")
    backend.delete("a")
    backend.delete("never-existed")
    backend.delete("dir/never/existed")
    backend.delete("dir")  # a "directory", not an object: nothing happens
    assert all_objects(backend) == {"a.b": 1, "dir/a": 1}
    with pytest.raises(ObjectNotFound):
        backend.get("a")
    backend.delete("dir/a")
    assert all_objects(backend) == {"a.b": 1}
    backend.put("dir/a", b"again")
    assert backend.get("dir/a") == b"again"


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_rejected(backend: Backend, name: str) -> None:
    operations: list[Callable[[], object]] = [
        lambda: backend.put(name, b"x"),
        lambda: backend.create(name, b"x"),
        lambda: backend.get(name),
        lambda: backend.get_range(name, 0, 1),
        lambda: backend.delete(name),
    ]
    for operation in operations:
        with pytest.raises(UsageError):
            operation()
    assert all_objects(backend) == {}


def test_trailing_newline_rejected() -> None:
    with pytest.raises(UsageError):
        check_name("config\n")


def test_empty_object(backend: Backend) -> None:
    backend.put("empty", b"")
    backend.create("dir/empty", memoryview(b""))
    assert backend.get("empty") == b"" and backend.get("dir/empty") == b""
    assert backend.get_range("empty", 0, 0) == b""
    with pytest.raises(StorageIOError):
        backend.get_range("empty", 0, 1)
    assert all_objects(backend) == {"empty": 0, "dir/empty": 0}


def test_large_object(backend: Backend) -> None:
    data = os.urandom(8 << 20)
    backend.put("packs/big", data)
    assert backend.get("packs/big") == data
    assert backend.get_range("packs/big", 3 << 20, 1 << 20) == data[3 << 20 : 4 << 20]
    assert backend.get_range("packs/big", (8 << 20) - 5, 5) == data[-5:]
    backend.create("packs/big2", memoryview(data)[1:])
    assert backend.get("packs/big2") == data[1:]
    assert all_objects(backend, "packs/") == {"packs/big": 8 << 20, "packs/big2": (8 << 20) - 1}


# --- properties ----------------------------------------------------------------------------------


def spec_valid(name: str) -> bool:
    """The name rule of the contract, written independently of check_name."""
    parts = name.split("/")
    return all(p and p not in (".", "..") and all(c in ALLOWED for c in p) for p in parts)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALLOWED[-5:] + "ab/ é:\\\x00", max_size=12) | st.sampled_from(INVALID_NAMES))
def test_check_name_property(name: str) -> None:
    if spec_valid(name):
        assert check_name(name) == name
    else:
        with pytest.raises(UsageError):
            check_name(name)


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_put_get_property(kind: str, tmp_path: Path) -> None:
    backend = BACKENDS[kind](tmp_path)
    component = st.text(alphabet=ALLOWED, min_size=1, max_size=16).filter(
        lambda c: c not in (".", "..") and not c.startswith(".tmp-")
    )
    counter = itertools.count()

    @settings(max_examples=40, deadline=None)
    @given(name=st.lists(component, min_size=1, max_size=3).map("/".join), data=st.binary(max_size=5000))
    def roundtrip(name: str, data: bytes) -> None:
        full = f"p{next(counter)}/{name}"
        backend.put(full, data)
        assert backend.get(full) == data
        assert dict(backend.list(full)).get(full) == len(data)
        if data:
            assert (
                backend.get_range(full, len(data) // 2, len(data) - len(data) // 2) == data[len(data) // 2 :]
            )

    roundtrip()
    backend.close()


# --- LocalBackend --------------------------------------------------------------------------------


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def fail_fsync(monkeypatch: pytest.MonkeyPatch, code: int, *, after: int = 0) -> None:
    real_fsync = os.fsync
    calls = itertools.count()

    def fsync(fd: int) -> None:
        if next(calls) >= after:
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize(
    ("code", "error"), [(errno.ENOSPC, StorageFull), (errno.EDQUOT, StorageFull), (errno.EIO, StorageIOError)]
)
@pytest.mark.parametrize("operation", ["put", "create"])
def test_local_failed_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, error: type[StorageError], operation: str
) -> None:
    backend = LocalBackend(tmp_path)
    backend.put("packs/old", b"old")
    fail_fsync(monkeypatch, code)
    with pytest.raises(error) as info:
        getattr(backend, operation)("packs/new", b"new data")
    assert type(info.value) is error and info.value.kwargs["name"] == "packs/new"
    with pytest.raises(error):
        backend.put("packs/old", b"replacement")
    monkeypatch.undo()
    assert files_under(tmp_path) == ["packs/old"]
    assert backend.get("packs/old") == b"old"


def test_local_create_failing_after_link_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = LocalBackend(tmp_path)
    backend.put("x", b"")
    fail_fsync(monkeypatch, errno.EIO, after=1)  # the file fsync succeeds, the directory fsync fails
    with pytest.raises(StorageIOError):
        backend.create("lock", b"mine")
    monkeypatch.undo()
    assert files_under(tmp_path) == ["x"]
    backend.create("lock", b"mine")
    assert backend.get("lock") == b"mine"


def test_local_fsyncs_file_and_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path / "root")
    real_fsync = os.fsync
    synced: list[str] = []

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    backend.put("a/b/c", b"data")
    if os.path.exists("/proc/self/fd"):
        root = str(tmp_path / "root")
        directories = {str(tmp_path), root, f"{root}/a", f"{root}/a/b"}
        assert directories <= set(synced)
        assert any("/.tmp-" in path for path in synced)  # the file, before it got its name
    else:
        assert len(synced) >= 5
    synced.clear()
    backend.create("a/b/d", b"data")
    assert len(synced) == 2


def test_local_temp_files_not_listed_and_names_reserved(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    backend.put("packs/ab/one", b"1")
    (tmp_path / "packs" / "ab" / ".tmp-0123").write_bytes(b"partial")
    (tmp_path / ".tmp-dir").mkdir()
    (tmp_path / ".tmp-dir" / "inside").write_bytes(b"partial")
    assert all_objects(backend) == {"packs/ab/one": 1}
    for name in (".tmp-x", "packs/.tmp-x", ".tmp-dir/inside"):
        with pytest.raises(UsageError):
            backend.put(name, b"x")
        with pytest.raises(UsageError):
            backend.get(name)
    backend.put("packs/ab/two", b"22")
    assert files_under(tmp_path / "packs") == ["ab/.tmp-0123", "ab/one", "ab/two"]


def test_local_list_walks_only_needed_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LocalBackend(tmp_path)
    for name in ("packs/ab/1", "packs/cd/2", "index/ab/3", "snapshots/4", "config"):
        backend.put(name, b"x")
    real_scandir = os.scandir
    walked: list[str] = []

    def scandir(path: str) -> object:
        walked.append(os.path.relpath(path, tmp_path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert all_objects(backend, "packs/") == {"packs/ab/1": 1, "packs/cd/2": 1}
    assert sorted(walked) == ["packs", "packs/ab", "packs/cd"]
    walked.clear()
    assert all_objects(backend, "packs/a") == {"packs/ab/1": 1}
    assert sorted(walked) == ["packs", "packs/ab"]
    walked.clear()
    assert all_objects(backend, "p") == {"packs/ab/1": 1, "packs/cd/2": 1}
    assert sorted(walked) == [".", "packs", "packs/ab", "packs/cd"]


def test_local_missing_root(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "absent")
    assert all_objects(backend) == {}
    with pytest.raises(ObjectNotFound):
        backend.get("config")
    backend.delete("config")
    assert not (tmp_path / "absent").exists()
    backend.put("config", b"c")
    assert backend.location == str(tmp_path / "absent")
    assert files_under(tmp_path) == ["absent/config"]


def test_local_object_under_a_file_is_an_io_error(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    backend.put("a", b"file")
    with pytest.raises(StorageIOError):
        backend.put("a/b", b"x")
    assert files_under(tmp_path) == ["a"]


# --- FaultyBackend -------------------------------------------------------------------------------


def test_faulty_counts_writes_only(backend: Backend) -> None:
    faulty = FaultyBackend(backend, 0, errno.ENOSPC)
    faulty.put("a", b"1")
    faulty.create("b", b"2")
    with pytest.raises(ObjectExists):
        faulty.create("b", b"2")
    faulty.delete("a")
    faulty.delete("a")
    assert faulty.get("b") == b"2" and faulty.get_range("b", 0, 1) == b"2"
    assert all_objects(faulty) == {"b": 1} and faulty.exists("b")
    with pytest.raises(UsageError):
        faulty.put("../x", b"")
    assert faulty.writes == 5
    assert faulty.location == backend.location


@pytest.mark.parametrize(("code", "error"), [(errno.ENOSPC, StorageFull), (errno.EIO, StorageIOError)])
def test_faulty_fails_nth_and_later_writes(backend: Backend, code: int, error: type[StorageError]) -> None:
    backend.put("keep", b"k")
    faulty = FaultyBackend(backend, 3, code)
    faulty.put("w1", b"1")
    faulty.create("w2", b"2")
    operations: list[Callable[[], None]] = [
        lambda: faulty.put("w3", b"3"),
        lambda: faulty.create("w4", b"4"),
        lambda: faulty.delete("keep"),
        lambda: faulty.put("w1", b"changed"),
    ]
    for operation in operations:
        with pytest.raises(error) as info:
            operation()
        assert type(info.value) is error
    assert faulty.writes == 6
    assert all_objects(faulty) == {"keep": 1, "w1": 1, "w2": 1}  # failed writes were not performed
    assert faulty.get("w1") == b"1" and faulty.get("keep") == b"k"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS])
def test_faulty_raises_what_local_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    faulty = FaultyBackend(LocalBackend(tmp_path / "f"), 1, code)
    with pytest.raises(StorageError) as injected:
        faulty.put("obj", b"x")
    local = LocalBackend(tmp_path / "l")
    fail_fsync(monkeypatch, code)
    with pytest.raises(StorageError) as real:
        local.put("obj", b"x")
    assert type(injected.value) is type(real.value)
    assert injected.value.kwargs["name"] == real.value.kwargs["name"] == "obj"
    assert injected.value.exit_code == 20
