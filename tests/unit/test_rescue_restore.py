"""The rescue tool's request planning: runs of differing chunks, retries, bounded parallelism."""

from __future__ import annotations

import pytest

from dingyuan.errors import TransferError, VaultRefused
from dingyuan.rescue import restore
from dingyuan.rescue.restore import bounded_map, retried, split_runs


def test_differing_chunks_are_fetched_as_runs_of_neighbours_within_the_limit() -> None:
    assert list(split_runs([], 4)) == []
    assert list(split_runs([3, 4, 5, 9, 10, 20], 4)) == [(3, 3), (9, 2), (20, 1)]
    assert list(split_runs(range(10), 4)) == [(0, 4), (4, 4), (8, 2)]


def test_failed_connections_and_damaged_chunks_are_retried_but_refusals_are_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(restore.time, "sleep", lambda _: None)
    calls: list[tuple[int, int]] = []

    def flaky(run: tuple[int, int]) -> str:
        calls.append(run)
        if len(calls) < restore.ATTEMPTS:
            raise TransferError("connection reset")
        return "ok"

    assert retried(flaky, "fetching chunks")((7, 2)) == "ok"
    assert calls == [(7, 2)] * restore.ATTEMPTS
    assert "fetching chunks from 7: connection reset; trying again" in capsys.readouterr().err

    def broken(run: tuple[int, int]) -> str:
        calls.append(run)
        raise TransferError("damaged")

    calls.clear()
    with pytest.raises(TransferError, match="damaged"):
        retried(broken, "fetching chunks")((0, 1))
    assert len(calls) == restore.ATTEMPTS

    def refused(run: tuple[int, int]) -> str:
        calls.append(run)
        raise VaultRefused(status=403, method="GET", path="/x", detail="not yours")

    calls.clear()
    with pytest.raises(VaultRefused):
        retried(refused, "fetching chunks")((0, 1))
    assert len(calls) == 1


def test_bounded_map_gives_every_result_and_stops_at_the_first_failure() -> None:
    assert sorted(bounded_map(lambda x: x * x, range(50), 3)) == [x * x for x in range(50)]
    started: list[int] = []

    def fail_at_5(x: int) -> int:
        started.append(x)
        if x == 5:
            raise TransferError("boom")
        return x

    with pytest.raises(TransferError, match="boom"):
        list(bounded_map(fail_at_5, range(1000), 2))
    assert len(started) < 20  # at most a window past the failure was started, not all 1000
