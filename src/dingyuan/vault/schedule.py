"""When a policy runs and whether its recovery point objective (RPO) is met: pure functions, no I/O.

A policy's ``schedule`` is ``interval`` (continuous protection: a backup every
``interval_seconds``, at least :data:`MIN_INTERVAL`) or ``cron`` (a five-field cron expression,
evaluated in UTC by :mod:`cronsim`; minute resolution, so a six-field expression with seconds is
refused). Every datetime here is timezone-aware UTC; a naive one is a programming error
(``ValueError``).

**Next run.** ``last_start`` is when the newest *successful* backup of the volume started (or the
time of its newest snapshot, whichever is later; :mod:`dingyuan.vault.jobs` works it out):

- interval: ``last_start + interval``; ``now`` when the volume never ran or is overdue;
- cron: the first fire time after ``last_start``, ``now`` when that has passed (one catch-up run,
  however many fire times a stopped vault missed). A volume that never ran waits for the next fire
  time, unless one passed within the last :data:`FIRST_RUN_GRACE` (cron schedules usually put
  backups off-hours; enrolling a volume at noon should not start a full backup at noon).

So ``next_run(...) >= now`` always, and a volume is due when ``next_run(...) == now``.
:func:`next_attempt` adds the retry rule: after a failed attempt, the next one waits
:func:`retry_delay` (the shorter of :data:`RETRY_DELAY` and one period), so a failing agent is
retried soon, but not in a tight loop.

**Period and grace.** The period is the interval, or for cron the gap between the fire time at
or before ``now`` and the next one. The grace is half the period, at least :data:`MIN_GRACE`: a
snapshot's time is when its backup started, and it appears only once the backup has committed,
so the grace must cover the backup's duration, a retry after a transient failure and clock skew
between agent and vault; half a period is what operators of hourly or daily schedules expect
("the daily backup is late" the next midday, not at 02:01), and 60 s keeps a 10-second continuous
policy from flapping on one slow backup.

**RPO.** The newest snapshot must not be older than the allowed age:

- interval: period + grace;
- cron: the age of the newest fire time whose grace has run out (the fire time ``f`` with
  ``f + grace(f) <= now``, where ``grace(f)`` is half the gap from ``f`` to the next fire time),
  plus :data:`CLOCK_TOLERANCE`. For a regular expression this lies between the grace and
  period + grace; for an irregular one (``0 9,17 * * 1-5``) it asks exactly for the runs that
  should have finished, where "period around now" would call Monday 09:30 breached because of the
  weekend.

A volume without any snapshot is **pending** until the same deadline has passed since it was
protected (``since``: its first backup job, else when its host was added), then **breached**;
without ``since`` it stays pending.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from cronsim import CronSim, CronSimError

from ..errors import PolicyError
from ..repository.retention import KeepPolicy

MIN_INTERVAL = timedelta(seconds=10)
MIN_GRACE = timedelta(seconds=60)
GRACE_FRACTION = 0.5
FIRST_RUN_GRACE = timedelta(seconds=60)
RETRY_DELAY = timedelta(minutes=5)
CLOCK_TOLERANCE = timedelta(seconds=60)

RETENTION_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

RpoStateName = Literal["met", "breached", "pending"]


class Schedulable(Protocol):
    """What the schedule reads of a policy (``dingyuan.catalog.models.Policy`` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def schedule(self) -> str: ...
    @property
    def interval_seconds(self) -> int | None: ...
    @property
    def cron(self) -> str | None: ...


@dataclass(frozen=True)
class RpoState:
    """Whether a volume's newest snapshot is recent enough for its policy, at ``now``.

    ``state`` is ``met``, ``breached`` or ``pending`` (no snapshot yet, deadline not passed);
    ``age_seconds`` is None without a snapshot; ``allowed_seconds`` is the largest age the newest
    snapshot may have now (None while a cron expression has never come due); ``next_run`` is
    when the policy runs next, judged from the snapshot alone (:mod:`dingyuan.vault.jobs` also
    knows about running and failed jobs).
    """

    state: RpoStateName
    age_seconds: float | None
    allowed_seconds: float | None
    next_run: datetime

    @property
    def met(self) -> bool:
        return self.state == "met"

    @property
    def breached(self) -> bool:
        return self.state == "breached"

    @property
    def pending(self) -> bool:
        return self.state == "pending"


def _aware(t: datetime, what: str) -> datetime:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"naive datetime {t!r} for {what}: the schedule works in aware UTC times")
    return t.astimezone(UTC)


def _interval(policy: Schedulable) -> timedelta:
    seconds = policy.interval_seconds
    if seconds is None or seconds < MIN_INTERVAL.total_seconds():
        raise PolicyError(
            policy=policy.name,
            detail=f"interval_seconds is {seconds!r}; continuous protection needs at least "
            f"{int(MIN_INTERVAL.total_seconds())} s between backups",
        )
    return timedelta(seconds=seconds)


def _cron(policy: Schedulable) -> str:
    expr = (policy.cron or "").strip()
    if len(expr.split()) != 5:
        raise PolicyError(
            policy=policy.name,
            detail=f"cron {expr!r} is not a five-field expression (minute hour day-of-month month "
            "day-of-week, in UTC), e.g. '0 2 * * *'",
        )
    try:
        CronSim(expr, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as e:
        raise PolicyError(policy=policy.name, detail=f"cron {expr!r}: {e}") from None
    return expr


def _kind(policy: Schedulable) -> str:
    if policy.schedule not in ("interval", "cron"):
        raise PolicyError(policy=policy.name, detail=f"schedule {policy.schedule!r} is not interval or cron")
    return policy.schedule


def _fires(expr: str, start: datetime, reverse: bool = False) -> Iterator[datetime]:
    """Fire times strictly after ``start``, or with ``reverse`` at or before it."""
    if reverse:
        # cronsim gives times strictly before its start; a microsecond later includes ``start``
        return iter(CronSim(expr, start + timedelta(microseconds=1), reverse=True))
    return iter(CronSim(expr, start))


def _fire_after(policy: Schedulable, expr: str, t: datetime) -> datetime:
    try:
        return next(_fires(expr, t))
    except StopIteration:
        raise PolicyError(
            policy=policy.name, detail=f"cron {expr!r} does not fire within 50 years of {t:%Y-%m-%d}"
        ) from None


def _fire_at_or_before(expr: str, t: datetime) -> datetime | None:
    return next(_fires(expr, t, reverse=True), None)


def _grace(period: timedelta) -> timedelta:
    return max(MIN_GRACE, period * GRACE_FRACTION)


def validate_policy(policy: Schedulable, retention: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`PolicyError` if ``policy`` cannot be scheduled (or its retention is bad).

    Call it before saving a policy, so the scheduler never meets one it cannot run.
    """
    if _kind(policy) == "interval":
        _interval(policy)
    else:
        _fire_after(policy, _cron(policy), datetime(2000, 1, 1, tzinfo=UTC))
    if retention is not None:
        keep_policy(policy.name, retention)


def keep_policy(policy_name: str, retention: Mapping[str, Any]) -> KeepPolicy:
    """The keep rules of a policy's ``retention`` JSON.

    Keys are the rule names (``last``, ``hourly``, ``daily``, ``weekly``, ``monthly``,
    ``yearly``), each optionally spelled with a ``keep_`` prefix; values are counts >= 0. An
    empty mapping keeps everything (retention never removes every snapshot).
    """
    counts: dict[str, int] = {}
    for key, value in retention.items():
        rule = key.removeprefix("keep_").removeprefix("keep-")
        if rule not in RETENTION_RULES:
            raise PolicyError(
                policy=policy_name,
                detail=f"unknown retention rule {key!r}; use {', '.join(RETENTION_RULES)}",
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PolicyError(policy=policy_name, detail=f"retention {key!r} must be a count >= 0")
        if rule in counts:
            raise PolicyError(policy=policy_name, detail=f"retention rule {rule!r} is given twice")
        counts[rule] = value
    return KeepPolicy(**counts)


def period(policy: Schedulable, now: datetime) -> timedelta:
    """The policy's period at ``now``: the interval, or the gap between the cron fire times
    around ``now`` (the one at or before it and the next one)."""
    now = _aware(now, "now")
    if _kind(policy) == "interval":
        return _interval(policy)
    expr = _cron(policy)
    after = _fire_after(policy, expr, now)
    before = _fire_at_or_before(expr, now)
    if before is None:  # nothing in the last 50 years: measure forward instead
        before, after = after, _fire_after(policy, expr, after)
    return after - before


def next_run(policy: Schedulable, last_start: datetime | None, now: datetime) -> datetime:
    """When the policy should next start a backup of a volume whose newest successful backup
    started at ``last_start`` (None: never). Never earlier than ``now``; equal to it when due."""
    now = _aware(now, "now")
    if _kind(policy) == "interval":
        interval = _interval(policy)
        if last_start is None:
            return now
        return max(now, _aware(last_start, "last_start") + interval)
    expr = _cron(policy)
    if last_start is None:
        return max(now, _fire_after(policy, expr, now - FIRST_RUN_GRACE))
    return max(now, _fire_after(policy, expr, _aware(last_start, "last_start")))


def retry_delay(policy: Schedulable, now: datetime) -> timedelta:
    """How long to wait after a failed attempt: :data:`RETRY_DELAY`, or one period if shorter."""
    return min(RETRY_DELAY, period(policy, now))


def next_attempt(
    policy: Schedulable, last_start: datetime | None, last_failure: datetime | None, now: datetime
) -> datetime:
    """:func:`next_run`, but not sooner than :func:`retry_delay` after a failed attempt that
    ended at ``last_failure`` (ignored unless it is newer than ``last_start``). A volume that
    never succeeded is retried then even if its cron expression would wait for the next fire
    time: its first run is owed."""
    when = next_run(policy, last_start, now)
    if last_failure is not None:
        last_failure = _aware(last_failure, "last_failure")
        retry = last_failure + retry_delay(policy, now)
        if last_start is None:  # the first run was attempted: it is owed, whatever a cron says
            when = max(now, retry)
        elif last_failure > _aware(last_start, "last_start"):
            when = max(when, retry)
    return when


def _cron_deadline(policy: Schedulable, expr: str, now: datetime) -> datetime | None:
    """The newest fire time whose grace has run out at ``now`` (None if there is none)."""
    later = _fire_after(policy, expr, now)
    fires = _fires(expr, now, reverse=True)
    # Five-field expressions fire at most once a minute and the grace is at most half a gap (or
    # MIN_GRACE = one minute), so the second fire time back always qualifies.
    for fire in fires:
        if fire + _grace(later - fire) <= now:
            return fire
        later = fire
    return None


def rpo_state(
    policy: Schedulable,
    last_snapshot_time: datetime | None,
    now: datetime,
    since: datetime | None = None,
) -> RpoState:
    """The RPO of a volume at ``now`` (see the module docstring for the rules).

    ``last_snapshot_time`` is the time of its newest snapshot (None: none yet); ``since`` is when
    it was first protected, which decides when a volume without snapshots becomes breached.
    """
    now = _aware(now, "now")
    last = None if last_snapshot_time is None else _aware(last_snapshot_time, "last_snapshot_time")
    age = None if last is None else (now - last).total_seconds()
    upcoming = next_run(policy, last, now)
    if _kind(policy) == "interval":
        interval = _interval(policy)
        allowed: timedelta | None = interval + _grace(interval)
        # without a snapshot: breached once the allowed age has passed since protection began
        overdue = since is not None and now - _aware(since, "since") > interval + _grace(interval)
    else:
        deadline = _cron_deadline(policy, _cron(policy), now)
        allowed = None if deadline is None else now - deadline + CLOCK_TOLERANCE
        # without a snapshot: breached once a fire time after protection began is past its grace
        # (one within FIRST_RUN_GRACE before ``since`` was due too, see next_run)
        overdue = (
            deadline is not None
            and since is not None
            and deadline >= _aware(since, "since") - FIRST_RUN_GRACE
        )
    state: RpoStateName
    if last is None:
        state = "breached" if overdue else "pending"
    else:
        state = "met" if allowed is None or now - last <= allowed else "breached"
    return RpoState(state, age, None if allowed is None else allowed.total_seconds(), upcoming)
