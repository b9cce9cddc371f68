"""Schedules and RPO (dingyuan.vault.schedule): next run, retries and RPO, by property and example."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import assume, given
from hypothesis import strategies as st

from dingyuan.catalog.models import Policy
from dingyuan.errors import PolicyError
from dingyuan.repository.retention import KeepPolicy
from dingyuan.vault.schedule import (
    CLOCK_TOLERANCE,
    FIRST_RUN_GRACE,
    MIN_GRACE,
    RETRY_DELAY,
    keep_policy,
    next_attempt,
    next_run,
    period,
    retry_delay,
    rpo_state,
    validate_policy,
)

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday


def interval_policy(seconds: int) -> Policy:
    return Policy(name="cdp", schedule="interval", interval_seconds=seconds)


def cron_policy(expr: str) -> Policy:
    return Policy(name="nightly", schedule="cron", cron=expr)


times = st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC))
intervals = st.integers(min_value=10, max_value=40 * 86400)
offsets = st.integers(min_value=-60 * 86400, max_value=60 * 86400).map(lambda s: timedelta(seconds=s))
MINUTES = ["*", "0", "30", "59", "*/5", "*/15", "0,30", "5-10"]
HOURS = ["*", "0", "2", "23", "*/6", "9,17", "8-18"]
DAYS = ["*", "1", "15", "28", "31", "1-7"]
MONTHS = ["*", "1", "2", "6", "12", "*/3"]
WEEKDAYS = ["*", "0", "1", "6", "1-5"]


@st.composite
def cron_exprs(draw: st.DrawFn) -> str:
    expr = " ".join(draw(st.sampled_from(field)) for field in (MINUTES, HOURS, DAYS, MONTHS, WEEKDAYS))
    try:
        validate_policy(cron_policy(expr))
    except PolicyError:
        assume(False)  # e.g. the 31st of February only
    return expr


def is_fire_time(expr: str, t: datetime) -> bool:
    return next(CronSim(expr, t - timedelta(seconds=1))) == t


# --- next run: interval ---------------------------------------------------------------------


@given(seconds=intervals, now=times, last_offset=st.none() | offsets)
def test_interval_next_run_is_last_start_plus_interval_or_now(
    seconds: int, now: datetime, last_offset: timedelta | None
) -> None:
    policy = interval_policy(seconds)
    last = None if last_offset is None else now + last_offset
    nr = next_run(policy, last, now)
    assert nr >= now
    if last is None:
        assert nr == now  # never ran: at once
    else:
        assert nr == max(now, last + timedelta(seconds=seconds))


@given(seconds=intervals, start=times, steps=st.integers(1, 20))
def test_interval_runs_are_an_interval_apart(seconds: int, start: datetime, steps: int) -> None:
    """A vault that starts each backup when due starts them exactly one interval apart."""
    policy = interval_policy(seconds)
    last = None
    now = start
    starts = []
    for _ in range(steps):
        now = next_run(policy, last, now)
        starts.append(now)
        last = now
    assert all(b - a == timedelta(seconds=seconds) for a, b in pairwise(starts))


# --- next run: cron -------------------------------------------------------------------------


@given(expr=cron_exprs(), now=times, last_offset=offsets)
def test_cron_next_run_is_the_first_fire_time_after_the_last_start(
    expr: str, now: datetime, last_offset: timedelta
) -> None:
    last = now + last_offset
    nr = next_run(cron_policy(expr), last, now)
    first_after_last = next(CronSim(expr, last))
    assert nr >= now
    if nr > now:
        assert is_fire_time(expr, nr)
        assert nr == first_after_last  # no fire time is skipped
    else:
        assert first_after_last <= now  # overdue: one catch-up run now


@given(expr=cron_exprs(), now=times)
def test_cron_first_run_waits_for_a_fire_time(expr: str, now: datetime) -> None:
    nr = next_run(cron_policy(expr), None, now)
    assert nr >= now
    recent = next(CronSim(expr, now - FIRST_RUN_GRACE))
    if recent <= now:
        assert nr == now  # a fire time just passed: run it
    else:
        assert nr == recent and is_fire_time(expr, nr)


def test_cron_catch_up_after_downtime_is_one_run() -> None:
    policy = cron_policy("0 2 * * *")
    last = datetime(2026, 3, 1, 2, 0, 3, tzinfo=UTC)
    now = datetime(2026, 3, 5, 9, 0, tzinfo=UTC)  # the vault was down for days
    assert next_run(policy, last, now) == now
    assert next_run(policy, now, now) == datetime(2026, 3, 6, 2, 0, tzinfo=UTC)


def test_cron_is_evaluated_in_utc() -> None:
    berlin = datetime(2026, 3, 2, 3, 30, tzinfo=UTC).astimezone(ZoneInfo("Europe/Berlin"))  # 04:30 local
    nr = next_run(cron_policy("0 4 * * *"), berlin, berlin)
    assert nr == datetime(2026, 3, 2, 4, 0, tzinfo=UTC) and nr.tzinfo == UTC


# --- retries --------------------------------------------------------------------------------


@given(
    policy=intervals.map(interval_policy) | cron_exprs().map(cron_policy),
    now=times,
    last_offset=st.none() | offsets,
    fail_offset=offsets,
)
def test_next_attempt_waits_after_a_failure(
    policy: Policy, now: datetime, last_offset: timedelta | None, fail_offset: timedelta
) -> None:
    last = None if last_offset is None else now + last_offset
    failed = now + fail_offset
    na = next_attempt(policy, last, failed, now)
    retry = failed + retry_delay(policy, now)
    assert na >= now
    if last is None:
        assert na == max(now, retry)  # the first run was tried: retry it, cron or not
    elif failed > last:
        assert na == max(next_run(policy, last, now), retry)
    else:
        assert na == next_run(policy, last, now)  # an older failure does not matter
    assert next_attempt(policy, last, None, now) == next_run(policy, last, now)


def test_retry_delay_is_at_most_one_period() -> None:
    assert retry_delay(interval_policy(10), T0) == timedelta(seconds=10)
    assert retry_delay(interval_policy(3600), T0) == RETRY_DELAY
    assert retry_delay(cron_policy("0 2 * * *"), T0) == RETRY_DELAY
    failed = T0 - timedelta(minutes=1)
    assert next_attempt(cron_policy("0 2 * * *"), T0 - timedelta(days=2), failed, T0) == failed + RETRY_DELAY


# --- period ---------------------------------------------------------------------------------


def test_period_of_cron_is_the_gap_around_now() -> None:
    assert period(cron_policy("0 * * * *"), T0) == timedelta(hours=1)
    assert period(cron_policy("0 9,17 * * 1-5"), T0 + timedelta(hours=6)) == timedelta(hours=16)
    friday_evening = datetime(2026, 3, 6, 18, 0, tzinfo=UTC)
    assert period(cron_policy("0 9,17 * * 1-5"), friday_evening) == timedelta(hours=64)


# --- RPO ------------------------------------------------------------------------------------


@given(seconds=intervals, now=times, age=st.integers(0, 100 * 86400))
def test_interval_rpo_is_interval_plus_grace(seconds: int, now: datetime, age: int) -> None:
    state = rpo_state(interval_policy(seconds), now - timedelta(seconds=age), now)
    grace = max(MIN_GRACE.total_seconds(), seconds / 2)
    assert state.allowed_seconds == seconds + grace
    assert state.age_seconds == age
    assert state.met == (age <= seconds + grace)
    assert state.breached == (not state.met) and not state.pending


@given(expr=cron_exprs(), now=times)
def test_cron_rpo_met_when_every_run_happened(expr: str, now: datetime) -> None:
    """A snapshot at the newest fire time (a backup that ran on time) always meets the RPO."""
    newest_fire = next(CronSim(expr, now + timedelta(microseconds=1), reverse=True), None)
    assume(newest_fire is not None)
    assert newest_fire is not None
    state = rpo_state(cron_policy(expr), newest_fire, now)
    assert state.met
    assert state.allowed_seconds is not None and state.age_seconds is not None
    assert state.age_seconds <= state.allowed_seconds


@given(expr=cron_exprs(), now=times)
def test_cron_rpo_breached_when_a_run_is_missing_past_its_grace(expr: str, now: datetime) -> None:
    state = rpo_state(cron_policy(expr), now, now)
    assume(state.allowed_seconds is not None)
    assert state.allowed_seconds is not None
    deadline = now - timedelta(seconds=state.allowed_seconds) + CLOCK_TOLERANCE
    assert is_fire_time(expr, deadline)
    # the run of ``deadline`` had its grace: a snapshot from before it (minus tolerance) is too old
    too_old = deadline - CLOCK_TOLERANCE - timedelta(seconds=1)
    assert rpo_state(cron_policy(expr), too_old, now).breached
    assert rpo_state(cron_policy(expr), deadline, now).met


def test_cron_rpo_examples() -> None:
    hourly = cron_policy("0 * * * *")
    at = datetime(2026, 3, 2, 10, 20, tzinfo=UTC)
    # 10:20: the 10:00 run still has until 10:30 (half an hour of grace), so 09:00 suffices
    assert rpo_state(hourly, datetime(2026, 3, 2, 9, 0, 5, tzinfo=UTC), at).met
    assert rpo_state(hourly, datetime(2026, 3, 2, 8, 0, 5, tzinfo=UTC), at).breached
    # 10:31: the 10:00 run should have finished
    at = datetime(2026, 3, 2, 10, 31, tzinfo=UTC)
    assert rpo_state(hourly, datetime(2026, 3, 2, 9, 0, 5, tzinfo=UTC), at).breached
    assert rpo_state(hourly, datetime(2026, 3, 2, 10, 0, 5, tzinfo=UTC), at).met

    # twice a working day: Monday 09:30 asks for Friday 17:00, not for a snapshot 12 h old
    workdays = cron_policy("0 9,17 * * 1-5")
    monday = datetime(2026, 3, 9, 9, 30, tzinfo=UTC)
    friday_run = datetime(2026, 3, 6, 17, 0, 4, tzinfo=UTC)
    assert rpo_state(workdays, friday_run, monday).met
    assert rpo_state(workdays, friday_run - timedelta(hours=8), monday).breached
    assert rpo_state(workdays, friday_run, monday + timedelta(hours=5)).breached  # 09:00 run missing


def test_rpo_without_snapshot_is_pending_then_breached() -> None:
    hourly = interval_policy(3600)
    state = rpo_state(hourly, None, T0)
    assert state.pending and state.age_seconds is None and not state.met and not state.breached
    assert rpo_state(hourly, None, T0, since=T0 - timedelta(minutes=80)).pending
    assert rpo_state(hourly, None, T0, since=T0 - timedelta(minutes=91)).breached

    nightly = cron_policy("0 2 * * *")
    added = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
    assert next_run(nightly, None, added) == datetime(2026, 3, 3, 2, 0, tzinfo=UTC)
    assert rpo_state(nightly, None, added + timedelta(hours=23), since=added).pending
    # 02:00's run should have finished by 14:00 (12 h of grace)
    assert rpo_state(nightly, None, added + timedelta(hours=24, seconds=1), since=added).breached


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        (interval_policy(9), "at least 10 s"),
        (Policy(name="p", schedule="interval", interval_seconds=None), "interval_seconds is None"),
        (cron_policy("*/5 * * * * *"), "five-field"),
        (cron_policy("0 2 * *"), "five-field"),
        (cron_policy("61 * * * *"), "Bad minute"),
        (cron_policy("0 0 30 2 *"), "day-of-month"),
        (Policy(name="p", schedule="hourly"), "interval or cron"),
    ],
)
def test_policies_that_cannot_be_scheduled_are_refused(policy: Policy, words: str) -> None:
    with pytest.raises(PolicyError, match=words) as e:
        next_run(policy, None, T0)
    assert "Policy" in str(e.value)
    with pytest.raises(PolicyError):
        validate_policy(policy)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        next_run(interval_policy(60), None, datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        rpo_state(interval_policy(60), datetime(2026, 1, 1), T0)


def test_retention_rules() -> None:
    assert keep_policy("p", {}) == KeepPolicy()
    assert keep_policy("p", {"last": 3, "keep_daily": 7, "keep-weekly": 4}) == KeepPolicy(
        last=3, daily=7, weekly=4
    )
    for bad, words in (
        ({"fortnightly": 1}, "unknown retention rule"),
        ({"daily": -1}, "count >= 0"),
        ({"daily": "7"}, "count >= 0"),
        ({"daily": True}, "count >= 0"),
        ({"daily": 1, "keep_daily": 2}, "twice"),
    ):
        with pytest.raises(PolicyError, match=words):
            keep_policy("p", bad)
    with pytest.raises(PolicyError, match="unknown"):
        validate_policy(interval_policy(60), {"fortnightly": 1})
