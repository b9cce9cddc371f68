"""Quiesce plugins: applications paused for an instant around a point in time.

See :mod:`dingyuan.agent.quiesce.base` for the rules and docs/architecture.md, "Consistency
providers and quiesce plugins", for the plugins that exist and those that are designed.
"""

from .base import ON_FAILURE, OnFailure, Plugin, Quiescer, QuiesceReport, Watchdog, call_with_timeout
from .script import ScriptPlugin
from .sqlite import SqlitePlugin

__all__ = [
    "ON_FAILURE",
    "OnFailure",
    "Plugin",
    "QuiesceReport",
    "Quiescer",
    "ScriptPlugin",
    "SqlitePlugin",
    "Watchdog",
    "call_with_timeout",
]
