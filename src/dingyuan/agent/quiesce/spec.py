"""A policy's ``quiesce`` setting: which plugins pause which applications, and what a failure means.

The setting is one short string (at most 255 characters), entries separated by ``;``::

    postgresql
    postgresql:host=/run/postgresql port=5432 user=postgres;on_failure=skip
    sqlite:/srv/app/app.db
    mysql:socket=/run/mysqld/mysqld.sock user=backup
    script:/usr/local/bin/freeze.sh,/usr/local/bin/thaw.sh
    oracle:sid=ORCL oracle_home=/u01/app/oracle/product/19c user=sysdba_os_auth
    sqlserver:instance=db1\\SQL2022 database=sales
    sqlite:/srv/a.db;postgresql:host=/tmp;timeout=5

- ``postgresql[:KEY=VALUE ...]``: libpq connection keywords (``host``, ``port``, ``user``,
  ``dbname``, ``sslmode``), space-separated, no quoting; no password (use ``~/.pgpass`` or
  peer/trust authentication for the agent's user). Default: libpq's defaults.
- ``mysql[:KEY=VALUE ...]`` (MariaDB or MySQL): ``host``, ``port``, ``user``, ``socket`` (an
  absolute path), ``defaults_file`` (an absolute path; its ``[client]`` group gives the
  credentials, default ``~/.my.cnf`` of the agent's user), ``flush=yes|no`` (``FLUSH TABLES``
  before the lock; default yes), space-separated; no password. Default: the local server's
  socket.
- ``oracle[:KEY=VALUE ...]`` (untested on a real server): ``sid``, ``oracle_home`` (an absolute
  path), ``user=sysdba_os_auth`` (the only authentication: the agent's user logs in ``/ as
  sysdba``), space-separated. Default: the agent's environment.
- ``sqlserver:KEY=VALUE ...`` (SQL Server 2022+, untested on a real server): ``database`` (needed),
  ``instance`` (``HOST``, ``HOST\\INSTANCE`` or ``HOST,PORT``; default ``localhost``),
  space-separated; integrated authentication, no password.
- ``sqlite:PATH``: an absolute path to the database file.
- ``script:FREEZE,THAW``: two absolute paths, run without a shell (the thaw script runs even when
  the freeze script failed: it must be safe when nothing is frozen).
- ``on_failure=crash|skip`` (at most once; default ``crash``): what a plugin failure means (a
  ``crash``-labelled snapshot, or none this time).
- ``timeout=SECONDS`` (at most once; 1 to 300, default 10): each plugin step's timeout.

Plugins run in the order given (thawed in reverse). The vault checks the setting when a policy is
written (:func:`parse_quiesce` raises ValueError with the reason) and hands it to the agent
unchanged with each work item; the agent parses it again and builds the plugins
(:func:`~dingyuan.agent.quiesce.factory.build_plugins`). This module imports nothing but the
standard library, so the vault can check a setting without the agent's optional dependencies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .base import DEFAULT_STEP_TIMEOUT, OnFailure

MAX_SPEC = 255
PLUGIN_KINDS = ("postgresql", "mysql", "sqlite", "script", "oracle", "sqlserver")
#: libpq keywords a ``postgresql`` entry may set (no password in a policy)
PG_KEYWORDS = ("host", "port", "user", "dbname", "sslmode")
#: what a ``mysql`` entry may set (no password in a policy)
MYSQL_KEYWORDS = ("host", "port", "user", "socket", "defaults_file", "flush")
#: what an ``oracle`` entry may set
ORACLE_KEYWORDS = ("sid", "oracle_home", "user")
#: what a ``sqlserver`` entry may set
SQLSERVER_KEYWORDS = ("instance", "database")
_ORACLE_SID = re.compile(r"^[A-Za-z][A-Za-z0-9_$#]{0,29}$")
#: names that need no quoting inside ``[...]`` or ``'...'`` in T-SQL
_MSSQL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.$#@-]{0,127}$")
_MSSQL_INSTANCE = re.compile(r"^[A-Za-z0-9_.-]+(?:\\[A-Za-z0-9_$]+)?(?:,\d{1,5})?$")
MAX_TIMEOUT = 300.0
_VALUE = re.compile(r"^[^\s;=\x00-\x1f\x7f]+$")


@dataclass(frozen=True)
class PluginSpec:
    """One plugin entry: ``kind`` and its arguments (``postgresql``: the libpq keywords;
    ``mysql``: its keywords; ``sqlite``: ``path``; ``script``: ``freeze`` and ``thaw``)."""

    kind: str
    args: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QuiesceSpec:
    plugins: tuple[PluginSpec, ...] = ()
    on_failure: OnFailure = "crash"
    timeout: float = DEFAULT_STEP_TIMEOUT


def _absolute(path: str, what: str) -> str:
    if not path.startswith("/") or not _VALUE.match(path.replace("=", "_")):
        raise ValueError(f"{what} must be an absolute path without spaces, got {path!r}")
    return path


def _mysql(arg: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for word in arg.split():
        key, eq, value = word.partition("=")
        if not eq or key not in MYSQL_KEYWORDS or not value or not _VALUE.match(value):
            raise ValueError(f"mysql: {word!r} is not KEY=VALUE with KEY one of {', '.join(MYSQL_KEYWORDS)}")
        if key in args:
            raise ValueError(f"mysql: {key} given twice")
        if key in ("socket", "defaults_file"):
            _absolute(value, f"mysql: {key}")
        elif key == "port" and not (value.isdigit() and 0 < int(value) < 65536):
            raise ValueError(f"mysql: port must be a TCP port number, got {value!r}")
        elif key == "flush" and value not in ("yes", "no"):
            raise ValueError(f"mysql: flush must be yes or no, got {value!r}")
        args[key] = value
    return args


def _keywords(kind: str, arg: str, allowed: tuple[str, ...]) -> dict[str, str]:
    args: dict[str, str] = {}
    for word in arg.split():
        key, eq, value = word.partition("=")
        if not eq or key not in allowed or not value or not _VALUE.match(value):
            raise ValueError(f"{kind}: {word!r} is not KEY=VALUE with KEY one of {', '.join(allowed)}")
        if key in args:
            raise ValueError(f"{kind}: {key} given twice")
        args[key] = value
    return args


def _oracle(arg: str) -> dict[str, str]:
    args = _keywords("oracle", arg, ORACLE_KEYWORDS)
    if "sid" in args and not _ORACLE_SID.match(args["sid"]):
        raise ValueError(f"oracle: sid must be an Oracle SID (letters, digits, _$#), got {args['sid']!r}")
    if "oracle_home" in args:
        _absolute(args["oracle_home"], "oracle: oracle_home")
    if args.get("user", "sysdba_os_auth") != "sysdba_os_auth":
        raise ValueError("oracle: user must be sysdba_os_auth (no password in a policy)")
    return args


def _sqlserver(arg: str) -> dict[str, str]:
    args = _keywords("sqlserver", arg, SQLSERVER_KEYWORDS)
    if "database" not in args:
        raise ValueError("sqlserver: database=NAME is needed")
    if not _MSSQL_NAME.match(args["database"]):
        raise ValueError(
            f"sqlserver: database must be a plain name (letters, digits, _.$#@-), got {args['database']!r}"
        )
    if "instance" in args and not _MSSQL_INSTANCE.match(args["instance"]):
        raise ValueError(
            f"sqlserver: instance must be HOST, HOST\\INSTANCE or HOST,PORT, got {args['instance']!r}"
        )
    return args


def _plugin(entry: str) -> PluginSpec:
    kind, _, arg = entry.partition(":")
    kind = kind.strip()
    if kind == "postgresql":
        args: dict[str, str] = {}
        for word in arg.split():
            key, eq, value = word.partition("=")
            if not eq or key not in PG_KEYWORDS or not value or not _VALUE.match(value):
                raise ValueError(
                    f"postgresql: {word!r} is not KEY=VALUE with KEY one of {', '.join(PG_KEYWORDS)}"
                )
            if key in args:
                raise ValueError(f"postgresql: {key} given twice")
            args[key] = value
        return PluginSpec("postgresql", args)
    if kind == "mysql":
        return PluginSpec("mysql", _mysql(arg))
    if kind == "oracle":
        return PluginSpec("oracle", _oracle(arg))
    if kind == "sqlserver":
        return PluginSpec("sqlserver", _sqlserver(arg))
    if kind == "sqlite":
        return PluginSpec("sqlite", {"path": _absolute(arg.strip(), "sqlite: the database")})
    if kind == "script":
        parts = [p.strip() for p in arg.split(",")]
        if len(parts) != 2:
            raise ValueError("script: needs FREEZE,THAW (two absolute paths)")
        return PluginSpec(
            "script",
            {"freeze": _absolute(parts[0], "script: FREEZE"), "thaw": _absolute(parts[1], "script: THAW")},
        )
    raise ValueError(f"unknown quiesce plugin {kind!r}: use {', '.join(PLUGIN_KINDS)}")


def parse_quiesce(text: str | None) -> QuiesceSpec:
    """The plugins, failure policy and step timeout a ``quiesce`` setting names (None or blank:
    no plugins); ValueError with the reason when it is not valid."""
    if text is None or not text.strip():
        return QuiesceSpec()
    if len(text) > MAX_SPEC:
        raise ValueError(f"the quiesce setting is longer than {MAX_SPEC} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("the quiesce setting holds control characters")
    plugins: list[PluginSpec] = []
    on_failure: OnFailure | None = None
    timeout: float | None = None
    for raw in text.split(";"):
        entry = raw.strip()
        if not entry:
            raise ValueError("the quiesce setting has an empty entry (two ';' in a row?)")
        if entry.startswith("on_failure="):
            value = entry.partition("=")[2].strip()
            if on_failure is not None:
                raise ValueError("on_failure given twice")
            if value == "crash":
                on_failure = "crash"
            elif value == "skip":
                on_failure = "skip"
            else:
                raise ValueError(f"on_failure must be crash or skip, got {value!r}")
        elif entry.startswith("timeout="):
            if timeout is not None:
                raise ValueError("timeout given twice")
            try:
                timeout = float(entry.partition("=")[2])
            except ValueError:
                raise ValueError(f"timeout must be a number of seconds, got {entry!r}") from None
            if not 1 <= timeout <= MAX_TIMEOUT:
                raise ValueError(f"timeout must be between 1 and {MAX_TIMEOUT:g} seconds")
        else:
            plugins.append(_plugin(entry))
    if not plugins:
        raise ValueError(f"the quiesce setting names no plugin ({', '.join(PLUGIN_KINDS)})")
    return QuiesceSpec(tuple(plugins), on_failure or "crash", timeout or DEFAULT_STEP_TIMEOUT)
