"""The plugins a policy's ``quiesce`` setting names (see :mod:`.spec`), ready for a Quiescer."""

from __future__ import annotations

from .base import Plugin, Quiescer
from .mysql import MysqlPlugin
from .oracle import OraclePlugin
from .postgresql import PostgresqlPlugin
from .script import ScriptPlugin
from .spec import QuiesceSpec, parse_quiesce
from .sqlite import SqlitePlugin
from .sqlserver import SqlServerPlugin


def build_plugins(spec: QuiesceSpec) -> list[Plugin]:
    out: list[Plugin] = []
    for p in spec.plugins:
        if p.kind == "postgresql":
            out.append(PostgresqlPlugin(p.args, timeout=spec.timeout))
        elif p.kind == "mysql":
            out.append(MysqlPlugin(p.args, timeout=spec.timeout))
        elif p.kind == "oracle":
            out.append(OraclePlugin(p.args, timeout=spec.timeout))
        elif p.kind == "sqlserver":
            out.append(SqlServerPlugin(p.args, timeout=spec.timeout))
        elif p.kind == "sqlite":
            out.append(SqlitePlugin(p.args["path"], timeout=spec.timeout))
        elif p.kind == "script":
            out.append(ScriptPlugin([p.args["freeze"]], [p.args["thaw"]], timeout=spec.timeout))
        else:  # parse_quiesce accepts no other kind
            raise ValueError(f"unknown quiesce plugin {p.kind!r}")
    return out


def quiescer_for(setting: str | None) -> Quiescer:
    """A Quiescer with the plugins and failure policy of a ``quiesce`` setting (None: no
    plugins, on_failure crash); ValueError when the setting is not valid."""
    spec = parse_quiesce(setting)
    return Quiescer(build_plugins(spec), on_failure=spec.on_failure)
