"""Database drills: proof that a snapshot of a database server holds a database that starts and
answers.

The caller mounts a writable clone of the snapshot (a drill writes: crash recovery, a shutdown
checkpoint) and names the mount. The drill finds the data directory under it (or is given it),
starts the database server on it privately, waits until it accepts connections, runs a query,
stops the server and returns a :class:`DrillResult`. A drill that fails (the server does not start,
does not answer in time, the query fails) is a result with ``ok`` False and the server's log tail
in ``detail``, never an exception: only misuse raises (:class:`~dingyuan.errors.UsageError`: no
data directory, several, a server program of that version not installed, a live server on it, files
kept outside the data directory).

What it proves: a snapshot of a running server is crash-consistent, so the server starts as after
a power cut: PostgreSQL replays its WAL, InnoDB its redo log. A drill that passes shows that this
recovery succeeds, that the system catalogs can be read (the default query lists the databases
and counts their tables) and, with ``sql``, that the data a user cares about can be read. It does
not read every page: a damaged table that no query touches goes unnoticed.

Private: the server listens on a Unix socket in a new temporary directory only (no TCP port), logs
there, and reads none of the source machine's configuration that could reach outside it:

- PostgreSQL (12 or later; ``postgres`` from ``/usr/lib/postgresql/<version>/bin``, the version of
  the cluster's ``PG_VERSION``) gets an empty configuration file, a ``pg_hba.conf`` that trusts the
  private socket (we do not know the snapshot's passwords) and command-line settings, which win over
  the cluster's ``postgresql.auto.conf``: no archiving (``archive_mode=off``: a drill must not push
  WAL into the production archive), no replication connection (``primary_conninfo``), no SSL, the
  log on stderr. It runs as the data directory's owner, or the ``postgres`` user when root owns it
  (PostgreSQL refuses to run as root). A ``postmaster.pid`` in the clone is the snapshot's stale
  lock file and is removed, unless its process runs on this very directory (then the caller passed
  live data, not a clone, and the drill refuses).
- MariaDB (``mariadbd``) runs with ``--no-defaults``, ``--skip-networking``,
  ``--skip-grant-tables`` (the private socket is the only way in), ``--skip-slave-start`` (a replica
  must not connect to its primary) and its pid file, socket and error log in the private directory;
  as the data directory's owner, or ``--user=root`` when root owns it. When the data directory
  holds a binary log, the server is started with it: InnoDB's crash recovery asks the binary log
  whether a prepared transaction committed, and refuses to start without it.

Files outside the data directory are refused before anything starts: PostgreSQL's ``pg_wal`` or
tablespaces as symlinks, MariaDB's databases or tables as symlinks or created with ``DATA
DIRECTORY`` (``.isl`` files). Their paths are those of the machine the snapshot was taken on, which
here are this machine's own: a drill on the machine that was backed up would write into its live
files.
"""

from __future__ import annotations

import contextlib
import csv
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import UsageError

Engine = Literal["postgresql", "mariadb"]

#: directory levels under the mount searched for a data directory (``/var/lib/postgresql/15/main``
#: is 5 deep); deeper trees are not walked, so discovery stays quick on a large filesystem
MAX_DEPTH = 6

#: seconds the server may take to stop before it is killed
STOP_TIMEOUT = 60.0

#: lines of the server's log kept in a failed drill's detail
LOG_LINES = 20

#: the port number, which only names PostgreSQL's socket file in the private directory
PG_PORT = 5432

#: where PostgreSQL's server programs of a major version live (Debian, then the PGDG RPMs)
PG_BINDIRS = ("/usr/lib/postgresql/{version}/bin", "/usr/pgsql-{version}/bin")

#: schemas of MariaDB itself, not counted as the user's
MARIADB_SYSTEM = ("mysql", "information_schema", "performance_schema", "sys")


@dataclass(frozen=True)
class DrillResult:
    """``ok``: the server started and the query answered. ``seconds``: the whole drill, start to
    stop. ``detail``: what happened, for a person (on failure: why, with the log's tail).
    ``rows``: the query's result as text; for the default query one ``(database, user tables)``
    row per database."""

    ok: bool
    seconds: float
    detail: str
    rows: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class DataDir:
    engine: Engine
    path: Path


class _QueryFailed(Exception):
    """A client reported an error; its message is the reason."""


def find_data_dirs(root: Path) -> list[DataDir]:
    """The data directories under ``root`` (itself included), breadth first: a directory with
    ``PG_VERSION`` and ``global/`` (PostgreSQL), or with ``ibdata1`` and a ``mysql/`` system
    schema (MariaDB, MySQL). Symlinks are not followed and nothing under a data directory is
    searched."""
    found: list[DataDir] = []
    queue: deque[tuple[Path, int]] = deque([(root, 0)])
    while queue:
        directory, depth = queue.popleft()
        engine = engine_of(directory)
        if engine is not None:
            found.append(DataDir(engine, directory))
            continue
        if depth == MAX_DEPTH:
            continue
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        queue.append((Path(entry.path), depth + 1))
    return found


def engine_of(directory: Path) -> Engine | None:
    """Which server's data directory ``directory`` is, if any."""
    if (directory / "PG_VERSION").is_file() and (directory / "global").is_dir():
        return "postgresql"
    if (directory / "ibdata1").is_file() and (directory / "mysql").is_dir():
        return "mariadb"
    return None


def drill(
    root: Path,
    *,
    data_dir: Path | None = None,
    engine: Engine | None = None,
    sql: str | None = None,
    database: str | None = None,
    start_timeout: float = 300.0,
    query_timeout: float = 60.0,
) -> DrillResult:
    """Start the database server whose data directory is under the mounted clone ``root``, run
    ``sql`` (default: list the databases and count their user tables) and stop it.

    ``data_dir`` names the data directory (absolute, or relative to ``root``) instead of searching
    for it; ``engine`` keeps only that kind. ``database`` is where ``sql`` runs (PostgreSQL's
    default: ``postgres``; MariaDB's: none, name tables as ``db.table``). ``start_timeout`` bounds
    the start, crash recovery included; ``query_timeout`` each query.
    """
    data = _choose(root, data_dir, engine)
    server: _Server = _Postgres(data.path) if data.engine == "postgresql" else _Maria(data.path)
    t0 = time.monotonic()
    with _private_dir(server.uid, server.gid) as private:
        try:
            ok, detail, rows = _run(server, private, sql, database, start_timeout, query_timeout)
        finally:
            server.stop()
    return DrillResult(ok, time.monotonic() - t0, f"{server.name} on {data.path} {detail}", tuple(rows))


def _run(
    server: _Server,
    private: Path,
    sql: str | None,
    database: str | None,
    start_timeout: float,
    query_timeout: float,
) -> tuple[bool, str, list[tuple[str, ...]]]:
    """Start the server, wait for it, query it: (ok, what happened, rows). The caller stops it."""
    t0 = time.monotonic()
    try:
        server.start(private)
    except OSError as e:
        return False, f"cannot be started: {e}", []
    failure = server.wait_ready(start_timeout)
    if failure is not None:
        return False, f"{failure}.\n{server.log_tail()}", []
    started = time.monotonic() - t0
    try:
        rows = (
            server.default_query(query_timeout) if sql is None else server.query(sql, database, query_timeout)
        )
    except _QueryFailed as e:
        return False, f"started, but the query failed: {e}\n{server.log_tail()}", []
    how = "after crash recovery" if server.recovered() else "from a clean shutdown"
    if sql is None:
        tables = sum(int(n) for _, n in rows)
        answer = f"{tables} user table(s) in {len(rows)} database(s)"
    else:
        answer = f"the query returned {len(rows)} row(s)"
    return True, f"started in {started:.1f} s {how}; {answer}", rows


def _choose(root: Path, data_dir: Path | None, engine: Engine | None) -> DataDir:
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory: mount the clone there first")
    if data_dir is not None:
        path = root / data_dir  # an absolute data_dir replaces root
        kind = engine_of(path)
        if kind is None or (engine is not None and kind != engine):
            raise UsageError(f"{path} is not a {engine or 'PostgreSQL or MariaDB'} data directory")
        return DataDir(kind, path)
    found = [d for d in find_data_dirs(root) if engine is None or d.engine == engine]
    if not found:
        raise UsageError(
            f"no {engine or 'PostgreSQL or MariaDB'} data directory within {MAX_DEPTH} levels of {root}: "
            "give its path"
        )
    if len(found) > 1:
        listed = ", ".join(f"{d.path} ({d.engine})" for d in found)
        raise UsageError(f"several data directories under {root}: {listed}; choose one")
    return found[0]


@contextlib.contextmanager
def _private_dir(uid: int | None, gid: int | None) -> Iterator[Path]:
    """A new directory only the server's user (and root) can enter: socket, log, configuration."""
    path = Path(tempfile.mkdtemp(prefix="dingyuan-drill-"))
    try:
        if uid is not None and gid is not None:
            os.chown(path, uid, gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _Server(ABC):
    """One database server started for a drill: the process, its log and its clients."""

    name = ""

    def __init__(self, data: Path) -> None:
        self.data = data
        #: whom the server runs as (None: this process's user)
        self.uid: int | None = None
        self.gid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.private = Path()
        self.log = Path()
        #: the signal that shuts the server down cleanly
        self.stop_signal = signal.SIGTERM

    def _owner(self) -> None:
        """Run as the data directory's owner when we are root: the servers check (PostgreSQL
        refuses a data directory of another user) or write files the owner must keep reading."""
        if os.geteuid() == 0:
            st = self.data.stat()
            self.uid, self.gid = st.st_uid, st.st_gid

    @abstractmethod
    def argv(self) -> list[str]: ...

    @abstractmethod
    def files(self) -> dict[str, str]:
        """Files (name: text) the server needs in the private directory before it starts."""

    def start(self, private: Path) -> None:
        self.private, self.log = private, private / "server.log"
        for name, text in self.files().items():
            (private / name).write_text(text)
            if self.uid is not None:
                os.chown(private / name, self.uid, self.gid or 0)
        drop = self.uid is not None and self.uid != os.geteuid()
        with open(self.log, "ab") as log:
            if self.uid is not None:
                os.fchown(log.fileno(), self.uid, self.gid or 0)
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.private,
                env=_env(self.private),
                start_new_session=True,  # a Ctrl-C at the terminal reaches us alone: we stop it cleanly
                user=self.uid if drop else None,
                group=self.gid if drop else None,
                extra_groups=[] if drop else None,
            )

    def wait_ready(self, timeout: float) -> str | None:
        """None once the server accepts connections, else why it does not."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            status = self.proc.poll()
            if status is not None:
                return f"exited with status {status} while starting"
            if self.ready():
                return None
            if time.monotonic() > deadline:
                return f"did not accept connections within {timeout:g} s"
            time.sleep(0.1)

    @abstractmethod
    def ready(self) -> bool: ...

    @abstractmethod
    def default_query(self, timeout: float) -> list[tuple[str, ...]]: ...

    @abstractmethod
    def query(self, sql: str, database: str | None, timeout: float) -> list[tuple[str, ...]]: ...

    @abstractmethod
    def recovered(self) -> bool:
        """Whether the log shows crash recovery (the snapshot was of a running server)."""

    def stop(self) -> None:
        """A clean shutdown; killed (the whole process group) after STOP_TIMEOUT."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(self.stop_signal)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self) -> str:
        lines = self.log_text().strip().splitlines()[-LOG_LINES:]
        return "log: " + "\n".join(lines) if lines else "the server wrote no log"

    def _client(self, argv: Sequence[str], timeout: float, **env: str) -> str:
        """Run a client program (``env``: more variables); its error message becomes
        :class:`_QueryFailed`."""
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=_env(self.private) | env,
                timeout=timeout + 10,  # the server's own limit answers first
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise _QueryFailed(f"no answer within {timeout:g} s") from None
        if done.returncode != 0:
            message = (done.stderr or done.stdout).decode(errors="replace").strip()
            raise _QueryFailed(message or f"{Path(argv[0]).name} exited with status {done.returncode}")
        return done.stdout.decode(errors="replace")


class _Postgres(_Server):
    name = "PostgreSQL"

    def __init__(self, data: Path) -> None:
        super().__init__(data)
        self.stop_signal = signal.SIGINT  # "fast" shutdown: sessions are ended, a checkpoint written
        self.version = (data / "PG_VERSION").read_text().strip()
        self.bindir = _pg_bindir(self.version)
        self._owner()
        if self.uid == 0:  # PostgreSQL refuses root; it then says the directory is not ours
            user = _user("postgres")
            self.uid, self.gid = (user.pw_uid, user.pw_gid) if user else (None, None)
        self.roles = ["postgres"]
        owner = self.uid if self.uid is not None else os.geteuid()
        with contextlib.suppress(KeyError):
            self.roles.append(pwd.getpwuid(owner).pw_name)  # initdb's default superuser
        self.role: str | None = None
        _refuse_links(data)
        _remove_stale_pid_file(data)

    def files(self) -> dict[str, str]:
        return {"postgresql.conf": "", "pg_hba.conf": "local all all trust\n", "pg_ident.conf": ""}

    def argv(self) -> list[str]:
        settings = {
            "config_file": self.private / "postgresql.conf",
            "hba_file": self.private / "pg_hba.conf",
            "ident_file": self.private / "pg_ident.conf",
            "listen_addresses": "",
            "unix_socket_directories": self.private,
            "unix_socket_permissions": "0700",
            "port": PG_PORT,
            "archive_mode": "off",
            "primary_conninfo": "",
            "ssl": "off",
            "logging_collector": "off",
            "log_destination": "stderr",
            "external_pid_file": "",
            "huge_pages": "try",
            "shared_buffers": "128MB",
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def ready(self) -> bool:
        """pg_isready says the server accepts connections (it listens early, and refuses them
        while it recovers)."""
        argv = [str(self.bindir / "pg_isready"), "-q", "-h", str(self.private), "-p", str(PG_PORT),
                "-t", "2"]  # fmt: skip
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=_env(self.private),
                timeout=30,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def _psql(self, sql: str, database: str, timeout: float) -> list[tuple[str, ...]]:
        """Run ``sql`` with psql as the first role that exists (the superuser's name is not known
        in advance)."""
        roles = [self.role] if self.role else self.roles
        for i, role in enumerate(roles):
            argv = [str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--csv", "-t",
                    "-h", str(self.private), "-p", str(PG_PORT), "-U", role, "-d", database,
                    "-c", sql]  # fmt: skip
            limit = f"-c statement_timeout={int(timeout * 1000)}"
            try:
                out = self._client(argv, timeout, PGOPTIONS=limit)
            except _QueryFailed as e:
                if f'role "{role}" does not exist' in str(e) and i + 1 < len(roles):
                    continue
                raise
            self.role = role
            return [tuple(row) for row in csv.reader(out.splitlines())]
        raise AssertionError("unreachable: the last role's failure is raised")

    def default_query(self, timeout: float) -> list[tuple[str, ...]]:
        databases = self._psql(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname",
            "template1",
            timeout,
        )
        count = (
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema' "
            "AND n.nspname NOT LIKE 'pg\\_%'"
        )
        return [(name, self._psql(count, name, timeout)[0][0]) for (name,) in databases]

    def query(self, sql: str, database: str | None, timeout: float) -> list[tuple[str, ...]]:
        return self._psql(sql, database or "postgres", timeout)

    def recovered(self) -> bool:
        return (
            re.search(r"not properly shut down|was interrupted|redo starts at", self.log_text()) is not None
        )


class _Maria(_Server):
    name = "MariaDB"

    def __init__(self, data: Path) -> None:
        super().__init__(data)
        found = shutil.which("mariadbd", path="/usr/sbin:/usr/bin:/usr/local/sbin")
        client = shutil.which("mariadb", path="/usr/bin:/usr/local/bin")
        if found is None or client is None:
            raise UsageError("MariaDB is not installed here (mariadbd, mariadb): install mariadb-server")
        self.server, self.client = found, client
        _refuse_maria_links(data)
        self._owner()

    def files(self) -> dict[str, str]:
        return {}

    @property
    def socket(self) -> Path:
        return self.private / "mysqld.sock"

    def argv(self) -> list[str]:
        argv = [self.server, "--no-defaults", f"--datadir={self.data}", f"--socket={self.socket}",
                f"--pid-file={self.private / 'mysqld.pid'}", f"--log-error={self.log}",
                f"--tmpdir={self.private}", "--skip-networking", "--skip-grant-tables",
                "--skip-slave-start", "--event-scheduler=OFF"]  # fmt: skip
        if self.uid == 0 or (self.uid is None and os.geteuid() == 0):
            argv.append("--user=root")  # root owns the data: mariadbd runs as root only when told
        binlog = _binlog(self.data)
        if binlog is not None:
            argv.append(f"--log-bin={binlog}")
        return argv

    def ready(self) -> bool:
        """The socket accepts connections (mariadbd listens once recovery is done)."""
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
        return True

    def query(self, sql: str, database: str | None, timeout: float) -> list[tuple[str, ...]]:
        argv = [self.client, "--no-defaults", f"--socket={self.socket}", "--user=root", "--batch",
                "--skip-column-names", f"--connect-timeout={max(1, int(timeout))}",
                f"--init-command=SET SESSION max_statement_time={timeout:g}", "-e", sql]  # fmt: skip
        if database:
            argv.insert(-2, f"--database={database}")
        try:
            out = self._client(argv, timeout)
        except _QueryFailed as e:  # in batch mode the client echoes the statement between dashes
            raise _QueryFailed(str(e).rpartition("--------------")[2].strip()) from None
        return [tuple(_unescape(v) for v in line.split("\t")) for line in out.splitlines()]

    def default_query(self, timeout: float) -> list[tuple[str, ...]]:
        system = ", ".join(f"'{s}'" for s in MARIADB_SYSTEM)
        return self.query(
            "SELECT s.schema_name, COUNT(t.table_name) FROM information_schema.schemata s "
            "LEFT JOIN information_schema.tables t ON t.table_schema = s.schema_name "
            f"AND t.table_type = 'BASE TABLE' WHERE s.schema_name NOT IN ({system}) "
            "GROUP BY s.schema_name ORDER BY s.schema_name",
            None,
            timeout,
        )

    def recovered(self) -> bool:
        return (
            re.search(r"Starting crash recovery|Starting final batch to recover", self.log_text()) is not None
        )


def _pg_bindir(version: str) -> Path:
    for pattern in PG_BINDIRS:
        bindir = Path(pattern.format(version=version))
        if all((bindir / p).is_file() for p in ("postgres", "psql", "pg_isready")):
            return bindir
    raise UsageError(
        f"the cluster is PostgreSQL {version}, whose server programs are not installed here "
        f"(looked in {', '.join(p.format(version=version) for p in PG_BINDIRS)}): "
        f"install postgresql-{version}"
    )


def _refuse_links(data: Path) -> None:
    """Refuse a cluster with WAL or tablespaces outside its data directory: their symlinks name
    paths of the machine the snapshot was taken on, which here are this machine's own (or
    nothing), and the server would write there."""
    tablespaces = data / "pg_tblspc"
    candidates = [data / "pg_wal", *(tablespaces.iterdir() if tablespaces.is_dir() else ())]
    links = [f"{p.relative_to(data)} -> {os.readlink(p)}" for p in candidates if p.is_symlink()]
    if links:
        raise UsageError(
            f"the cluster in {data} keeps files outside its data directory ({', '.join(links)}); "
            "a drill starts only a cluster whose WAL and tablespaces are all inside it"
        )


def _refuse_maria_links(data: Path) -> None:
    """Refuse a MariaDB data directory with files elsewhere: a database directory or table that is a
    symlink, or an InnoDB table created with ``DATA DIRECTORY`` (its ``.isl`` file holds the path).
    Those paths are the snapshot machine's, here this machine's own: a drill on the machine that
    was backed up would open the live server's files."""
    links = []
    for entry in data.iterdir():
        if entry.is_symlink():
            links.append(f"{entry.name} -> {os.readlink(entry)}")
        elif entry.is_dir():
            for f in entry.iterdir():
                if f.is_symlink():
                    links.append(f"{entry.name}/{f.name} -> {os.readlink(f)}")
                elif f.suffix == ".isl":
                    links.append(f"{entry.name}/{f.name} -> {f.read_text(errors='replace').strip()}")
    if links:
        raise UsageError(
            f"the data directory {data} keeps tables elsewhere ({', '.join(links)}); "
            "a drill starts only a server whose files are all inside it"
        )


def _remove_stale_pid_file(data: Path) -> None:
    """Remove the snapshot's ``postmaster.pid``: it names a process of the machine the snapshot
    was taken on. If that pid runs here with this very directory as its working directory, it is a
    live server on these files: refuse."""
    lock = data / "postmaster.pid"
    try:
        pid = int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = 0
    if pid > 0:
        with contextlib.suppress(OSError):
            if os.path.samefile(f"/proc/{pid}/cwd", data):
                raise UsageError(
                    f"a PostgreSQL server (pid {pid}) runs on {data}: drill a clone of a snapshot, "
                    "not live data"
                )
    lock.unlink(missing_ok=True)


def _binlog(data: Path) -> str | None:
    """The binary log's base name when the data directory holds one (an index file whose first
    entry is there), e.g. ``mysql-bin``; relay logs are not binary logs."""
    for index in sorted(data.glob("*.index")):
        if "relay" in index.name:
            continue
        with contextlib.suppress(OSError):
            entries = index.read_text().split()
            if entries and (data / Path(entries[0]).name).is_file():
                return index.stem
    return None


def _env(home: Path) -> dict[str, str]:
    """A clean environment: no PG*/MYSQL_* variable of the caller, messages in English."""
    return {
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
        "LC_ALL": "C",
        "HOME": str(home),
        "PGCLIENTENCODING": "UTF8",
    }


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


_ESCAPES = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\0": "\0"}


def _unescape(value: str) -> str:
    """A value as mariadb --batch prints it (tabs, newlines and backslashes escaped) made plain."""
    return re.sub(r"\\[\\tn0]", lambda m: _ESCAPES[m.group(0)], value)
