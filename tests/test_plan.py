"""Restore planning as a pure function of per-level listings (spec §6.1, examples from §6.3)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from ltxvfs.errors import NonContiguousError, PlanError, TxNotAvailableError
from ltxvfs.plan import choose_plan
from ltxvfs.storage.base import FileInfo

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)


def f(level, lo, hi, minute=None):
    created = T0 + timedelta(minutes=hi if minute is None else minute)
    return FileInfo(level=level, min_txid=lo, max_txid=hi, size=1000, created_at=created)


def listing(*files):
    out: dict[int, list[FileInfo]] = {}
    for x in files:
        out.setdefault(x.level, []).append(x)
    for v in out.values():
        v.sort(key=lambda i: (i.min_txid, i.max_txid))
    return out


def spans(plan):
    return [(x.level, x.min_txid, x.max_txid) for x in plan]


SPEC_REPLICA = listing(
    f(9, 1, 100), f(2, 101, 400), f(1, 401, 450), f(1, 451, 470),
    *[f(0, n, n) for n in range(441, 476)],
)


def test_latest_follows_the_spec_example():
    plan = choose_plan(SPEC_REPLICA)
    assert spans(plan) == [(9, 1, 100), (2, 101, 400), (1, 401, 450), (1, 451, 470),
                           (0, 471, 471), (0, 472, 472), (0, 473, 473), (0, 474, 474),
                           (0, 475, 475)]
    assert plan.txid == 475


def test_txid_stops_exactly_at_the_target():
    plan = choose_plan(SPEC_REPLICA, txid=464)
    assert spans(plan)[:3] == [(9, 1, 100), (2, 101, 400), (1, 401, 450)]
    assert spans(plan)[3:] == [(0, n, n) for n in range(451, 465)]


def test_txid_inside_the_snapshot_needs_an_exact_chain():
    with pytest.raises(TxNotAvailableError, match="TXID 0000000000000032 is not in the replica"):
        choose_plan(SPEC_REPLICA, txid=50)


def test_txid_beyond_the_replica():
    with pytest.raises(TxNotAvailableError, match="00000000000001f4"):
        choose_plan(SPEC_REPLICA, txid=500)


def test_gap_fails_latest_but_not_txid_or_time():
    files = [x for fs in SPEC_REPLICA.values() for x in fs if (x.level, x.min_txid) != (0, 472)]
    replica = listing(*files)
    with pytest.raises(NonContiguousError,
                       match="have up to 00000000000001d7 but next file starts at 00000000000001d9"):
        choose_plan(replica)
    assert choose_plan(replica, txid=471).txid == 471
    assert choose_plan(replica, timestamp=T0 + timedelta(days=1)).txid == 471


def test_timestamp_picks_files_created_before():
    plan = choose_plan(SPEC_REPLICA, timestamp=T0 + timedelta(minutes=460, seconds=30))
    # L1 451-470 (created at minute 470) is too new; L0 files up to 460 are taken.
    assert plan.txid == 460
    assert (1, 451, 470) not in spans(plan)


def test_timestamp_after_newest_gives_latest():
    assert choose_plan(SPEC_REPLICA, timestamp=T0 + timedelta(days=30)).txid == 475


def test_timestamp_before_oldest_is_a_clear_error():
    with pytest.raises(TxNotAvailableError, match="oldest retained file"):
        choose_plan(SPEC_REPLICA, timestamp=T0)


def test_time_errors_print_rfc3339_with_z():
    """Issue 15 item 13: the times in the message are RFC 3339 in UTC with ``Z`` (as PRAGMA
    litestream_time prints them), not Python's ``...07.773000+00:00``."""
    oldest = datetime(2026, 11, 30, 12, 0, 7, 773000, tzinfo=UTC)
    files = listing(FileInfo(0, 1, 1, 1000, oldest),
                    FileInfo(0, 2, 2, 1000, oldest + timedelta(seconds=1)))
    asked = datetime(2026, 11, 30, 13, 0, 7, 500000, tzinfo=timezone(timedelta(hours=2)))
    with pytest.raises(TxNotAvailableError) as info:
        choose_plan(files, timestamp=asked)
    assert str(info.value) == (
        "transaction not available: no LTX file before 2026-11-30T11:00:07.5Z; "
        "the oldest retained file is from 2026-11-30T12:00:07.773Z")


def test_empty_replica():
    with pytest.raises(TxNotAvailableError, match="no LTX files"):
        choose_plan({})


def test_both_txid_and_timestamp_refused():
    with pytest.raises(PlanError, match="both"):
        choose_plan(SPEC_REPLICA, txid=3, timestamp=T0)


def test_l0_only_replica():
    plan = choose_plan(listing(*[f(0, n, n) for n in range(1, 6)]))
    assert spans(plan) == [(0, n, n) for n in range(1, 6)]


def test_prefers_larger_max_then_smaller_min_then_higher_level():
    plan = choose_plan(listing(f(0, 1, 1), f(1, 1, 5), f(2, 1, 5), f(0, 2, 2), f(1, 2, 6)))
    # From 0: candidates L1 1-5, L2 1-5, L0 1-1 -> L2 1-5 (same span, higher level).
    # Then L1 2-6 overlaps and reaches further.
    assert spans(plan) == [(2, 1, 5), (1, 2, 6)]


def test_replica_without_a_snapshot_start():
    """Files from TXID 1 were removed (retention) and nothing covers them."""
    replica = listing(f(1, 5, 9), f(0, 10, 10))
    with pytest.raises(NonContiguousError, match="have up to 0000000000000000"):
        choose_plan(replica)
    with pytest.raises(TxNotAvailableError, match="no LTX file before .*; the oldest retained file is from"):
        choose_plan(replica, timestamp=T0 + timedelta(days=1))


def test_naive_timestamp_is_utc():
    naive = (T0 + timedelta(minutes=460, seconds=30)).replace(tzinfo=None)
    assert choose_plan(SPEC_REPLICA, timestamp=naive).txid == 460


# A follower at some TXID whose next L0 files retention removed: litestream's layout with a
# snapshot, L2 every 30 TXIDs, L1 every 5, and the newest L0 files.
BRIDGE_REPLICA = listing(
    f(9, 1, 100), f(2, 61, 90), f(2, 91, 100),
    f(1, 81, 85), f(1, 86, 90), f(1, 91, 95), f(1, 96, 100),
    f(0, 99, 99), f(0, 100, 100),
)


def test_bridge_overlaps_what_the_follower_has_as_little_as_possible():
    from ltxvfs.plan import choose_bridge

    # The plan would apply the snapshot (re-keying every page); the bridge takes the L1 file
    # holding TXID 88 (overlap 86-87 only), then the file starting exactly at 91 that reaches
    # furthest.
    assert spans(choose_plan(BRIDGE_REPLICA)) == [(9, 1, 100)]
    assert spans(choose_bridge(BRIDGE_REPLICA, 87, 100)) == [(1, 86, 90), (2, 91, 100)]
    assert spans(choose_bridge(BRIDGE_REPLICA, 90, 100)) == [(2, 91, 100)]
    assert spans(choose_bridge(BRIDGE_REPLICA, 97, 100)) == [(1, 96, 100)]
    assert spans(choose_bridge(BRIDGE_REPLICA, 98, 100)) == [(0, 99, 99), (0, 100, 100)]
    assert choose_bridge(BRIDGE_REPLICA, 100, 100) == ()
    # Below every compacted level only the snapshot reaches: the caller uses the plan.
    assert choose_bridge(BRIDGE_REPLICA, 50, 100) is None
    gap = listing(f(9, 1, 10), f(1, 11, 15), f(0, 18, 18))
    assert choose_bridge(gap, 12, 18) is None
