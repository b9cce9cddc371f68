"""Retention: which snapshots a keep-policy keeps (``forget``).

The policy works per (host, volume) like restic's and Proxmox's: ``keep_last`` keeps the N
newest; ``keep_hourly`` keeps the newest snapshot of each of the N most recent hours that have
snapshots, and likewise for days, ISO weeks, months and years. A snapshot kept by any rule is
kept. Retention-locked snapshots and the bases of clones are always kept, whatever the policy
says.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from .manifest import Snapshot

_BUCKETS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


@dataclass(frozen=True)
class KeepPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly))


@dataclass
class Decision:
    snapshot: Snapshot
    keep: bool
    reasons: list[str]


def apply_policy(
    snaps: list[Snapshot], policy: KeepPolicy, now: datetime, pinned: Mapping[str, str] | None = None
) -> list[Decision]:
    """Decide keep/forget for every snapshot, grouped by (host, volume); newest first.

    ``pinned`` maps the ids of snapshots in use to why they are kept: ``clone-base`` for those
    clones were made from (``Repository.clone_bases()``; the repository refuses to delete
    them), ``exported`` for those a vault serves.
    """
    pinned = pinned or {}
    groups: dict[tuple[str, str], list[Snapshot]] = defaultdict(list)
    for s in snaps:
        groups[(s.host, s.volume)].append(s)
    out: list[Decision] = []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda s: (s.time, s.id), reverse=True)
        reasons: dict[str, list[str]] = {s.id: [] for s in group}
        for s in group[: policy.last]:
            reasons[s.id].append("last")
        for rule, bucket in _BUCKETS.items():
            count = getattr(policy, rule)
            seen: set[tuple[int, ...]] = set()
            for s in group:
                if len(seen) >= count:
                    break
                b = bucket(s.time)
                if b not in seen:
                    seen.add(b)
                    reasons[s.id].append(rule)
        for s in group:
            if s.locked_at(now):
                reasons[s.id].append("retention-locked")
            if s.id in pinned:
                reasons[s.id].append(pinned[s.id])
            out.append(Decision(s, bool(reasons[s.id]), reasons[s.id]))
    return out
