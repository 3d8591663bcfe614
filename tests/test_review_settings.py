"""Adversarial review: settings given explicitly with the value a replica resolved by default."""
from __future__ import annotations

import apsw
import pytest
from test_settings import RO, one, uri, url  # noqa: F401  (url: fixture)

import ltxvfs


@pytest.fixture(scope="module")
def vfs():
    return ltxvfs.register()


def test_max_lag_equal_to_its_resolved_default_is_not_a_conflict(vfs, url):  # noqa: F811
    a = apsw.Connection(uri(url), flags=RO)  # max_lag: 3 x poll_interval = 3 s
    b = apsw.Connection(uri(url, max_lag="3s"), flags=RO)
    with pytest.raises(apsw.CantOpenError, match=r"max_lag=4s conflicts with max_lag=3s"):
        apsw.Connection(uri(url, max_lag="4s"), flags=RO)
    for con in (b, a):
        assert one(con, "SELECT v FROM t") == "b"
        con.close()


def test_an_idle_ceiling_equal_to_its_resolved_value_is_not_a_conflict(vfs, url):  # noqa: F811
    # poll_interval above the default ceiling: no back-off, i.e. a ceiling of poll_interval.
    a = apsw.Connection(uri(url, poll_interval="1m"), flags=RO)
    b = apsw.Connection(uri(url, idle_poll_interval="1m"), flags=RO)
    with pytest.raises(apsw.CantOpenError,
                       match=r"idle_poll_interval=120s conflicts with idle_poll_interval=60s"):
        apsw.Connection(uri(url, idle_poll_interval="2m"), flags=RO)
    for con in (b, a):
        assert one(con, "SELECT v FROM t") == "b"
        con.close()
