"""Quiesce plugins: applications paused for an instant around a point in time.

See :mod:`dingyuan.agent.quiesce.base` for the rules and docs/architecture.md, "Consistency
providers and quiesce plugins", for the plugins that exist and those that are designed.
"""

from .base import ON_FAILURE, OnFailure, Plugin, Quiescer, QuiesceReport, Watchdog, call_with_timeout
from .factory import build_plugins, quiescer_for
from .mysql import MysqlPlugin
from .oracle import OraclePlugin
from .postgresql import PostgresqlPlugin
from .script import ScriptPlugin
from .spec import PluginSpec, QuiesceSpec, parse_quiesce
from .sqlite import SqlitePlugin
from .sqlserver import SqlServerPlugin

__all__ = [
    "ON_FAILURE",
    "MysqlPlugin",
    "OnFailure",
    "OraclePlugin",
    "Plugin",
    "PluginSpec",
    "PostgresqlPlugin",
    "QuiesceReport",
    "QuiesceSpec",
    "Quiescer",
    "ScriptPlugin",
    "SqlServerPlugin",
    "SqlitePlugin",
    "Watchdog",
    "build_plugins",
    "call_with_timeout",
    "parse_quiesce",
    "quiescer_for",
]
