"""Consistency providers: a volume's source readable at one point in time.

    with choose(name, source, options).take(source, Quiescer(plugins, on_failure)) as pit:
        scan(pit.path)
    snapshot.consistency = pit.level; snapshot.stats.update(pit.stats())

See :mod:`dingyuan.agent.consistency.base` and docs/architecture.md, "Consistency providers and
quiesce plugins".
"""

from .base import (
    LEVEL_ALIASES,
    PROVIDER_NAMES,
    Pause,
    PointInTime,
    Provider,
    ProviderOptions,
    choose,
    paused,
    provider_class,
)

__all__ = [
    "LEVEL_ALIASES",
    "PROVIDER_NAMES",
    "Pause",
    "PointInTime",
    "Provider",
    "ProviderOptions",
    "choose",
    "paused",
    "provider_class",
]
