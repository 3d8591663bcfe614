"""A model-based simulation of one process's ltxvfs (issue 14, item 1).

Hypothesis's ``RuleBasedStateMachine`` drives one process through random sequences of: opening
and closing connections on two replicas (r1: ours to write; r2: followed, written by an outside
primary), read and write transactions, spilling updates, schema changes, VACUUM, write mode on
and off, time travel and back, polls, syncs, outside commits, compaction / snapshots / retention,
hydration, storage faults for one step, a crash (the process abandoned; its write buffer as
kill -9 leaves it), and a replaced replica. Shrinking gives a minimal failing sequence.

The oracle is a plain SQLite file per replica (tests/sim_model.py) plus the history of states by
TXID; after every step: every read equals the oracle at the TXID its transaction sees (one
digest of the whole database, read in one transaction: never a mix of two), integrity_check is
ok, every new TXID holds an acknowledged state (in commit order), ``ltxvfs.restore`` gives the
oracle; after a sync every acknowledged commit is on the replica; after a crash the buffer gives
them back; at the end the real ``litestream restore`` agrees, and no thread, descriptor or file
is left behind.

Why hypothesis and not a seeded walk: its shrinker turns a failing 60-step run into the few steps
that matter, and ``derandomize`` gives CI fixed seeds. Polls, syncs and compaction are driven by
hand (poll_interval=1h, sync_interval=-1s, compaction off), so a run is deterministic except for
hydration's background thread.

``LTXVFS_SIM_EXAMPLES`` / ``LTXVFS_SIM_STEPS`` size a long run (``LTXVFS_SIM_RANDOM=1``: fresh
seeds); ``LTXVFS_RELIABILITY_LOG`` gets the figures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import apsw
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sim_model import (
    Faults,
    FaultyClient,
    Figures,
    ReplicaModel,
    digest,
    file_digest,
    integrity,
    page_count,
    statements,
)

import ltxvfs
import ltxvfs.modes as modes_mod
import ltxvfs.vfs as vfs_mod
from ltxvfs import registry
from ltxvfs.compact import compact_level, enforce_l0_retention, enforce_snapshot_retention, snapshot
from ltxvfs.config import VFSConfig
from ltxvfs.errors import ConflictError, LitestreamError
from ltxvfs.plan import compute_plan
from ltxvfs.pragmas import format_time
from ltxvfs.storage import open_replica

from litestream_rig import litestream_restore

EXAMPLES = int(os.environ.get("LTXVFS_SIM_EXAMPLES", "0"))
STEPS = int(os.environ.get("LTXVFS_SIM_STEPS", "0"))
#: Replace a replica while this process has it open (off until the reported mixing is fixed).
REPLACE_OPEN = bool(os.environ.get("LTXVFS_SIM_REPLACE_OPEN"))
PARAMS = "poll_interval=1h&sync_interval=-1s&compaction_levels=off&snapshot_interval=0&cache_size=32k"
FIGURES = Figures()
OPS = st.tuples(st.sampled_from(["insert", "update", "delete", "big", "schema"]),
                st.integers(1, 12), st.sampled_from([0, 40, 300, 1500, 4000]))
IDX = st.integers(0, 7)


def counted(fn):
    """Count the rule's runs in the figures."""
    def wrapper(self, *args, **kwargs):
        FIGURES.rules[fn.__name__] += 1
        return fn(self, *args, **kwargs)
    wrapper.__name__ = fn.__name__
    return wrapper


def ltxvfs_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ltxvfs-")]


def fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


@dataclass
class Slot:
    con: apsw.Connection
    rep: str
    may_write: bool
    txn: str | None = None  # None, "read", "write"
    view: str | None = None  # "writer", "follower", "pinned" (while in a transaction)
    seen: tuple[int, str] | None = None  # (TXID, digest) the transaction saw first
    began: int = 0  # step the transaction (or the pin) started
    pin: tuple[str, int] | None = None  # ("txid", T) or ("time", ms)
    pinned_at: int = 0
    pin_gen: int = 0  # the replica's generation when pinned (a pinned state outlives a replace)
    last: int = 0  # highest TXID a follower view of this slot saw (monotonic)
    gen: int = 0


class Simulation(RuleBasedStateMachine):
    s3_endpoint: str | None = None

    def __init__(self) -> None:
        super().__init__()
        FIGURES.examples += 1
        self.step = 0
        self.threads0 = {t.ident for t in ltxvfs_threads()}
        self.fds0 = fds()
        self.root = Path(tempfile.mkdtemp(prefix="ltxvfs-sim-"))
        self.faults = Faults()
        self.faulted = False
        self._saved = (vfs_mod.open_replica, modes_mod.DISABLE_WAIT, vfs_mod.LINGER)
        vfs_mod.open_replica = lambda url: FaultyClient(self._saved[0](url), self.faults)
        modes_mod.DISABLE_WAIT = 0.2
        vfs_mod.LINGER = 0  # the model: a replica closes with its last connection
        self.reps: dict[str, ReplicaModel] = {}
        for name, page_size in (("r1", 1024), ("r2", 4096)):
            if self.s3_endpoint and name == "r1":
                url = (f"s3://sim/{os.path.basename(self.root)}-{name}?endpoint="
                       f"{self.s3_endpoint}&region=us-east-1")
            else:
                url = (self.root / name).as_uri()
            self.reps[name] = ReplicaModel(name, url, open_replica(url), self.root, page_size)
        self.slots: list[Slot] = []
        self.crash_buffer = False  # a crash left a buffer file (committed records or not)
        self.gen = 0
        self.deleted_at = {"r1": 0, "r2": 0}  # last step that deleted files of a replica
        self.vfs: vfs_mod.LitestreamVFS | None = None
        self.new_process()

    # --- the process --------------------------------------------------------------------------

    def new_process(self) -> None:
        self.gen += 1
        self.vfs_name = f"sim{os.getpid()}x{id(self):x}x{self.gen}"
        self.vfs = ltxvfs.register(self.vfs_name, config=VFSConfig(), warm_up=False)
        self.writer_on = False
        self.opened: dict[str, bool] = {}
        #: per replica: its Replica object was built or cleanly polled since the last replace
        self.fresh: dict[str, bool] = {}
        self.polled_at: dict[str, int] = {}  # step of the replica's last open or clean poll

    def replica(self, rep: str):
        key = self.vfs_mod_identity(rep)
        for r in self.vfs.replicas():
            if r.key == key:
                return r
        return None

    def vfs_mod_identity(self, rep: str) -> str:
        from ltxvfs.storage import parse_replica_url
        return parse_replica_url(self.reps[rep].url).identity

    def buffer_path(self) -> Path:
        return self.root / "r1.buffer"

    def uri(self, rep: str, write: bool, hydrate: bool, small: bool) -> str:
        u = (f"file:sim-{rep}?vfs={self.vfs_name}&replica_url={quote(self.reps[rep].url, safe='')}"
             f"&{PARAMS}&buffer_path={quote(str(self.buffer_path()), safe='')}")
        if write:
            u += "&write_enabled=true"
        if hydrate:
            u += "&hydration_enabled=true"
        return u  # settings are per replica (issue 15): the small page cache is in PARAMS

    def others(self, slot: Slot) -> list[Slot]:
        return [s for s in self.slots if s is not slot and s.rep == slot.rep]

    def expect(self, err: BaseException | None, allowed: tuple, what: str) -> None:
        """``err`` (None: success) must be one of ``allowed`` (exception classes)."""
        if err is None:
            return
        FIGURES.errors_seen[f"{what}:{type(err).__name__}"] += 1
        if isinstance(err, ConflictError):
            raise AssertionError(f"{what}: a conflict with no other writer") from err
        if self.faulted and isinstance(err, (apsw.BusyError, apsw.CantOpenError, apsw.SQLError,
                                             LitestreamError, apsw.IOError)):
            return
        if not isinstance(err, allowed):
            raise AssertionError(f"{what}: unexpected {type(err).__name__}: {err}") from err

    # --- oracle transactions ------------------------------------------------------------------

    def oracle(self, rep: str) -> apsw.Connection:
        return self.reps[rep].oracle

    def oracle_commit(self, rep: str) -> None:
        m = self.reps[rep]
        if m.oracle.in_transaction:
            m.oracle.execute("COMMIT")
        m.committed = digest(m.oracle)
        m.chain.append(m.committed)
        m.unsynced = True

    def oracle_rollback(self, rep: str) -> None:
        if self.oracle(rep).in_transaction:
            self.oracle(rep).execute("ROLLBACK")

    # --- rules: connections -------------------------------------------------------------------

    @initialize(hydrate=st.booleans(), small=st.booleans(), follower=st.booleans())
    def start(self, hydrate, small, follower):
        """Most runs start with a writer on r1 (and maybe a follower of r2)."""
        self.open_conn("r1", True, hydrate, small)
        if follower:
            self.open_conn("r2", False, hydrate, small)

    @precondition(lambda self: len(self.slots) < 4)
    @rule(rep=st.sampled_from(["r1", "r1", "r2"]), write=st.booleans(), hydrate=st.booleans(),
          small=st.booleans())
    @counted
    def open_conn(self, rep, write, hydrate, small):
        write = write and rep == "r1"
        first = self.replica(rep) is None
        try:
            con = apsw.Connection(self.uri(rep, write, hydrate, small),
                                  flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
                                  | apsw.SQLITE_OPEN_URI)
        except Exception as err:
            self.expect(err, (), "open")
            return
        con.set_busy_timeout(0)
        # Issue 15's rule: a connection opened read-write writes while its replica is in write
        # mode, whoever turned it on (every slot here is opened read-write).
        self.slots.append(Slot(con, rep, True, gen=self.reps[rep].generation))
        if small:  # SQLite's cache: 10 pages, so a large transaction spills
            try:
                con.execute("PRAGMA cache_size = 10")
            except apsw.BusyError as err:  # it reads the schema: a committing writer blocks it
                self.expect(err, (apsw.BusyError,) if any(
                    s.txn == "write" for s in self.others(self.slots[-1])) else (), "cache_size")
        if first:
            self.opened[rep] = hydrate
            self.fresh[rep] = True
            self.polled_at[rep] = self.step
        if write:
            self.writer_on = True

    @precondition(lambda self: self.slots)
    @rule(i=IDX)
    @counted
    def close_conn(self, i):
        slot = self.slots.pop(i % len(self.slots))
        last = not self.others(slot)
        err = None
        try:
            slot.con.close()
        except Exception as e:
            err = e
        if slot.txn == "write":
            self.oracle_rollback(slot.rep)
        self.expect(err, (), "close")
        if last and slot.rep == "r1" and self.writer_on:
            self.writer_on = False
            self.reps["r1"].observe()
            if err is None:  # the final sync
                self.synced()
        if last:
            self.opened.pop(slot.rep, None)
            self.fresh.pop(slot.rep, None)
            assert self.replica(slot.rep) is None

    def synced(self) -> None:
        """A sync (or final sync) returned: every acknowledged commit is on the replica."""
        m = self.reps["r1"]
        m.observe()
        assert m.history[m.latest] == m.committed, "an acknowledged commit is not on the replica"
        m.unsynced = False
        m.chain = [m.committed]
        self.crash_buffer = False

    # --- rules: reads -------------------------------------------------------------------------

    def expected_view(self, slot: Slot) -> str:
        if slot.pin is not None:
            return "pinned"
        return "writer" if slot.rep == "r1" and self.writer_on else "follower"

    def read(self, slot: Slot, start: bool = False) -> None:
        """Read the whole database in one transaction and judge it. Outside a transaction the
        read is its own (BEGIN ... COMMIT); ``start`` leaves the transaction open."""
        con, m = slot.con, self.reps[slot.rep]
        outside = slot.txn is None
        if outside:
            slot.view, slot.began, slot.seen = self.expected_view(slot), self.step, None
        try:
            if outside:
                con.execute("BEGIN")
            d = digest(con)
            txid = int(con.execute("PRAGMA litestream_txid").fetchall()[0][0], 16)
            ok = integrity(con)
        except apsw.Error as err:
            built = slot.pinned_at if slot.pin else min(slot.began, self.polled_at.get(
                slot.rep, 0))  # when the state this view reads was built
            busy_ok = (any(s.txn == "write" for s in self.others(slot))
                       or slot.view != "writer" and self.deleted_at[slot.rep] >= built)
            self.expect(err, (apsw.BusyError,) if busy_ok else (), "read")
            if outside and con.in_transaction:
                con.execute("ROLLBACK")
            if not con.in_transaction:
                if slot.txn == "write":
                    self.oracle_rollback(slot.rep)
                slot.txn, slot.seen, slot.view = None, None, None
            return
        FIGURES.reads_checked += 1
        assert ok == "ok", ok
        if outside and not start:
            con.execute("COMMIT")
        elif outside:
            slot.txn = "read"
        where = f"{slot.rep} {slot.view} read at TXID {txid}"
        if slot.seen is not None:  # inside one transaction: the same database every time
            if slot.view == "writer":  # its TXID is the last synced one: a sync may move it
                assert d == slot.seen[1] and txid >= slot.seen[0], \
                    f"{where}: the transaction saw {slot.seen} first"
            else:
                assert (txid, d) == slot.seen, f"{where}: the transaction saw {slot.seen} first"
            return
        if slot.txn == "read":
            slot.seen = (txid, d)
        if slot.view == "writer":
            want = digest(m.oracle) if slot.txn == "write" else m.committed
            assert d == want, f"{where}: not the acknowledged state"
            assert txid in m.history, f"{where}: no such TXID in the history"
            if not m.unsynced and slot.txn != "write":
                assert d == m.history[txid], f"{where}: all synced, yet not that TXID's state"
            return
        if slot.view == "pinned" and slot.pin_gen != m.generation:
            history = m.old_histories[slot.pin_gen]  # pinned before the replica was replaced
            assert history.get(txid) == d, f"{where}: not that TXID's state (pinned before replace)"
            return
        if not self.fresh.get(slot.rep, True) and m.history.get(txid) != d:
            # replaced, not polled since: the replica object may still hold the old history
            assert any(h.get(txid) == d for h in m.old_histories), f"{where}: no history's state"
            return
        assert txid in m.history, f"{where}: no such TXID in the history"
        assert d == m.history[txid], f"{where}: not that TXID's state"
        if slot.view == "pinned":
            kind, value = slot.pin
            if kind == "txid":
                assert txid == value, f"{where}: pinned to {value}"
            else:
                assert m.timestamps[txid] <= value, f"{where}: after the pinned time {value}"
            return
        if slot.gen != m.generation:
            slot.last, slot.gen = 0, m.generation
        assert txid >= max(slot.last, m.follow_floor), \
            f"{where}: went back (saw {slot.last}, polled {m.follow_floor})"
        slot.last = txid

    @precondition(lambda self: self.slots)
    @rule(i=IDX)
    @counted
    def read_any(self, i):
        self.read(self.slots[i % len(self.slots)])

    @precondition(lambda self: any(s.txn is None for s in self.slots))
    @rule(i=IDX)
    @counted
    def begin_read(self, i):
        free = [s for s in self.slots if s.txn is None]
        self.read(free[i % len(free)], start=True)

    @precondition(lambda self: any(s.txn for s in self.slots))
    @rule(i=IDX, commit=st.booleans())
    @counted
    def end_txn(self, i, commit):
        busy = [s for s in self.slots if s.txn]
        slot = busy[i % len(busy)]
        try:
            slot.con.execute("COMMIT" if commit else "ROLLBACK")
        except apsw.Error as err:
            self.expect(err, (apsw.BusyError,) if commit and slot.txn == "write" and any(
                s.txn == "read" for s in self.others(slot)) else (), "commit")
            assert slot.con.in_transaction, "a busy COMMIT keeps the transaction"
            return
        if slot.txn == "write":
            if commit:
                self.oracle_commit(slot.rep)
            else:
                self.oracle_rollback(slot.rep)
        slot.txn, slot.seen, slot.view = None, None, None

    # --- rules: writes ------------------------------------------------------------------------

    def refusal(self, slot: Slot) -> tuple:
        """What starting a write transaction on ``slot`` must give, () if it must work."""
        other_writer = any(s.txn == "write" for s in self.others(slot))
        if slot.rep != "r1" or not self.writer_on or not slot.may_write or slot.pin:
            # a writer that spilled holds EXCLUSIVE: even reading the schema is busy then
            return (apsw.ReadOnlyError, apsw.BusyError) if other_writer else (apsw.ReadOnlyError,)
        if other_writer:
            return (apsw.BusyError,)
        return ()

    @precondition(lambda self: any(s.txn != "read" for s in self.slots))
    @rule(i=IDX, op=OPS, explicit=st.booleans(), seq=st.integers(0, 999))
    @counted
    def write(self, i, op, explicit, seq):
        free = [s for s in self.slots if s.txn != "read"]
        slot = free[i % len(free)]
        con, oracle = slot.con, self.oracle(slot.rep)
        refused = self.refusal(slot) if slot.txn is None else ()
        if slot.txn is None and explicit:
            try:
                con.execute("BEGIN IMMEDIATE")
            except apsw.Error as err:
                self.expect(err, refused, "begin")
                return
            assert not refused, f"BEGIN IMMEDIATE worked, expected {refused}"
            oracle.execute("BEGIN")
            slot.txn, slot.view, slot.seen, slot.began = "write", "writer", None, self.step
        auto = slot.txn is None
        for sql in statements(op, seq, page_count(oracle)):
            try:
                con.execute(sql)
            except apsw.Error as err:
                readers = any(s.txn == "read" for s in self.others(slot))
                self.expect(err, refused or ((apsw.BusyError,) if readers else ()), "write")
                if con.in_transaction:
                    con.execute("ROLLBACK")
                if slot.txn == "write":  # the oracle's open transaction is this slot's
                    self.oracle_rollback(slot.rep)
                slot.txn, slot.view = None, None
                return
            if refused:  # only a statement that changes nothing needs no write lock
                before = digest(oracle)
                oracle.execute("SAVEPOINT noop")
                oracle.execute(sql)
                changed = digest(oracle) != before
                oracle.execute("ROLLBACK TO noop")
                oracle.execute("RELEASE noop")
                assert not changed, f"{sql!r} worked, expected {refused}"
                continue
            if auto:
                oracle.execute(sql)
                self.oracle_commit(slot.rep)
            else:
                oracle.execute(sql)

    @precondition(lambda self: any(s.txn is None for s in self.slots))
    @rule(i=IDX)
    @counted
    def vacuum(self, i):
        free = [s for s in self.slots if s.txn is None]
        slot = free[i % len(free)]
        try:
            slot.con.execute("VACUUM")
        except apsw.Error as err:
            refused = self.refusal(slot) or ((apsw.BusyError,) if self.others(slot) else ())
            self.expect(err, refused, "vacuum")
            return
        assert not self.refusal(slot), "VACUUM worked on a read-only connection"
        self.oracle(slot.rep).execute("VACUUM")
        self.oracle_commit(slot.rep)

    # --- rules: pragmas -----------------------------------------------------------------------

    def pragma(self, slot: Slot, name: str, value: str | None = None):
        sql = f"PRAGMA {name}" if value is None else f"PRAGMA {name} = '{value}'"
        try:
            return slot.con.execute(sql).fetchall()[0][0], None
        except Exception as err:
            return None, err

    @precondition(lambda self: any(s.rep == "r1" for s in self.slots))
    @rule(i=IDX, on=st.booleans())
    @counted
    def set_write_mode(self, i, on):
        r1 = [s for s in self.slots if s.rep == "r1"]
        slot = r1[i % len(r1)]
        _, err = self.pragma(slot, "litestream_write_enabled", "1" if on else "0")
        if on:
            self.expect(err, (), "enable")
            if err is None:
                self.writer_on = slot.may_write = True
            return
        busy = any(s.txn and s.view == "writer" for s in r1)
        self.expect(err, (apsw.SQLError,) if slot.txn == "write" else (apsw.BusyError,) if busy
                    else (), "disable")
        self.reps["r1"].observe()
        if err is None and self.writer_on:
            self.writer_on = False
            self.synced()

    @precondition(lambda self: any(s.rep == "r1" for s in self.slots))
    @rule(i=IDX)
    @counted
    def sync(self, i):
        r1 = [s for s in self.slots if s.rep == "r1"]
        _, err = self.pragma(r1[i % len(r1)], "litestream_sync")
        self.expect(err, () if self.writer_on else (apsw.SQLError,), "sync")
        self.reps["r1"].observe()
        if err is None:
            self.synced()

    @precondition(lambda self: any(s.txn is None for s in self.slots))
    @rule(i=IDX, k=st.integers(0, 99), by_time=st.booleans(), back=st.booleans())
    @counted
    def travel(self, i, k, by_time, back):
        free = [s for s in self.slots if s.txn is None]
        slot = free[i % len(free)]
        m = self.reps[slot.rep]
        if back:
            _, err = self.pragma(slot, "litestream_time" if by_time else "litestream_pin_txid",
                                 "latest")
            self.expect(err, (), "unpin")
            if err is None:
                slot.pin = None
            return
        txids = sorted(m.history)
        txid = txids[k % len(txids)]
        try:
            compute_plan(m.client, txid=txid)
            refused = ()
        except LitestreamError:
            refused = (apsw.SQLError,)
        if by_time:
            ms = m.timestamps[txid]
            when = format_time(datetime.fromtimestamp(ms / 1000, UTC))
            _, err = self.pragma(slot, "litestream_time", when)
            self.expect(err, (apsw.SQLError,), "pin time")  # the moment may be gone
            pin = ("time", ms)
        else:
            _, err = self.pragma(slot, "litestream_pin_txid", f"{txid:016x}")
            self.expect(err, refused, "pin txid")
            pin = ("txid", txid)
        if err is None:
            slot.pin, slot.pinned_at, slot.pin_gen = pin, self.step, m.generation

    @precondition(lambda self: self.slots)
    @rule(rep=st.sampled_from(["r1", "r2"]))
    @counted
    def poll(self, rep):
        replica = self.replica(rep)
        if replica is None:
            return
        replica.poll()
        if not self.faulted and replica.last_error is None and not (
                rep == "r1" and self.writer_on):
            assert replica.state.txid == self.reps[rep].latest, "a clean poll reaches the latest"
            self.reps[rep].follow_floor = self.reps[rep].latest
            self.fresh[rep] = True
            self.polled_at[rep] = self.step

    @precondition(lambda self: any(self.opened.values()))
    @rule(i=IDX)
    @counted
    def wait_hydrated(self, i):
        """Wait (bounded) until the hydration file is current, then read through it."""
        for rep, hydrating in self.opened.items():
            replica = self.replica(rep)
            if not hydrating or replica is None or replica.hydrator is None:
                continue
            tick = threading.Event()
            for _ in range(2000):  # 10 s at most
                progress = replica.hydrator.progress()
                if progress == "100.0" or progress.startswith("failed"):
                    break
                tick.wait(0.005)
            else:
                raise AssertionError(f"{rep}: hydration stuck at {progress}")
            FIGURES.rules[f"hydrated:{progress[:6]}"] += 1
            mine = [s for s in self.slots if s.rep == rep]
            if mine:
                self.read(mine[i % len(mine)])

    # --- rules: the outside world -------------------------------------------------------------

    @rule(rep=st.sampled_from(["r1", "r2", "r2"]), op=OPS, seq=st.integers(0, 999))
    @counted
    def outside_commit(self, rep, op, seq):
        m = self.reps[rep]
        if rep == "r1" and (self.writer_on or m.unsynced):
            return  # an outside writer would make ours conflict (tested elsewhere)
        m.outside_commit(statements(op, seq, page_count(m.oracle)))

    @rule(rep=st.sampled_from(["r1", "r2"]),
          job=st.sampled_from(["l1", "l2", "snapshot", "l0-retention", "snapshot-retention"]))
    @counted
    def compact(self, rep, job):
        client = self.reps[rep].client
        try:
            if job in ("l1", "l2"):
                compact_level(client, int(job[1]))
            elif job == "snapshot":
                snapshot(client)
            elif job == "l0-retention":
                if enforce_l0_retention(client, 0):
                    self.deleted_at[rep] = self.step
            elif enforce_snapshot_retention(client, 0, [1, 2]):
                self.deleted_at[rep] = self.step
        except LitestreamError as err:
            self.expect(err, (), f"compact {job}")

    @precondition(lambda self: not self.writer_on)
    @rule(rep=st.sampled_from(["r2", "r2", "r1"]), rows=st.integers(1, 40))
    @counted
    def replace(self, rep, rows):
        m = self.reps[rep]
        if rep == "r1" and m.unsynced:
            return
        if self.replica(rep) is not None and not REPLACE_OPEN:
            # test_follow.py::test_a_read_transaction_never_mixes_a_replaced_history_into_its_own
            # (reported): a state of the old history reads same-named files of the new one
            return
        m.replace(rows)
        self.deleted_at[rep] = self.step
        self.fresh[rep] = False

    @precondition(lambda self: self.writer_on)
    @rule()
    @counted
    def crash(self):
        """The process dies: no final sync; the buffer stays as kill -9 leaves it."""
        FIGURES.crashes += 1
        path = self.buffer_path()
        left = path.read_bytes() if path.exists() else None
        writers = [r.writer for r in self.vfs.replicas() if r.writer is not None]
        for w in writers:
            w.closed = True  # no final sync from here on
        for slot in self.slots:
            try:
                slot.con.close()
            except Exception:
                pass
        for w in writers:
            w.buffer.close()
        self.slots = []
        self.oracle_rollback("r1")
        registry.unregister(self.vfs_name)
        self.crash_buffer = left is not None
        if left is None:
            path.unlink(missing_ok=True)
        else:
            tmp = path.with_name(path.name + ".crash")
            tmp.write_bytes(left)
            os.replace(tmp, path)
        self.new_process()

    @rule(kind=st.sampled_from(["error", "throttle", "lost", "vanish"]),
          ops=st.sampled_from([("list",), ("read",), ("write",), ("delete",),
                               ("list", "read", "write", "delete")]),
          times=st.integers(1, 3),
          action=st.sampled_from(["sync", "poll", "read", "open", "travel", "close", "write",
                                  "disable", "enable"]),
          i=IDX, data=st.data())
    @counted
    def fault(self, kind, ops, times, action, i, data):
        self.faults.arm(kind, ops, times)
        self.faulted = True
        try:
            if action == "open" and len(self.slots) < 4:
                self.open_conn("r1" if i % 3 else "r2", bool(i % 2), False, bool(i & 4))
            elif not self.slots:
                return
            elif action == "sync" and any(s.rep == "r1" for s in self.slots):
                self.sync(i)
            elif action == "poll":
                self.poll(self.slots[i % len(self.slots)].rep)
            elif action == "read":
                self.read_any(i)
            elif action == "travel" and any(s.txn is None for s in self.slots):
                self.travel(i, i, bool(i % 2), False)
            elif action == "close":
                self.close_conn(i)
            elif action == "write" and any(s.txn != "read" for s in self.slots):
                self.write(i, data.draw(OPS), bool(i % 2), i)
            elif action in ("disable", "enable") and any(s.rep == "r1" for s in self.slots):
                self.set_write_mode(i, action == "enable")
        finally:
            self.faults.disarm()
            self.faulted = False
            FIGURES.faults.update(self.faults.injected)
            self.faults.injected.clear()

    # --- after every step ---------------------------------------------------------------------

    @invariant()
    def check_replicas(self) -> None:
        self.step += 1
        FIGURES.steps += 1
        for slot in list(self.slots):  # every connection's view, every step
            if slot.txn != "write":
                self.read(slot)
        for m in self.reps.values():
            m.observe()
            if self.step % 3 == 0 or m.name == "r1":
                assert m.restore_digest() == m.history[m.latest], f"{m.name}: restore differs"
        if not self.slots and self.vfs._tmpdir is not None:
            left = os.listdir(self.vfs._tmpdir)
            assert not left, f"files left in the scratch directory with no connection: {left}"

    def teardown(self) -> None:
        try:
            self._teardown()
        finally:
            vfs_mod.open_replica, modes_mod.DISABLE_WAIT, vfs_mod.LINGER = self._saved

    def _teardown(self) -> None:
        for _slot in list(self.slots):
            self.close_conn(0)
        m = self.reps["r1"]
        if m.unsynced or self.crash_buffer:  # reopening must give a crash's commits back
            self.open_conn("r1", True, False, False)
            self.read_any(0)
            self.close_conn(0)
        assert not m.unsynced, "acknowledged commits were never synced"
        assert not self.buffer_path().exists(), "a fully synced buffer is removed"
        for m in self.reps.values():
            m.observe()
            FIGURES.txids += m.latest
            FIGURES.restores += m.restores
            out = litestream_restore(m.url, self.root / f"litestream-{m.name}.db")
            FIGURES.litestream_restores += 1
            assert file_digest(out) == m.history[m.latest], f"{m.name}: litestream restore differs"
            m.oracle.close()
            m.client.close()
        tmpdir = self.vfs._tmpdir
        registry.unregister(self.vfs_name)
        assert tmpdir is None or not os.path.exists(tmpdir), "scratch directory left"
        for t in ltxvfs_threads():
            if t.ident not in self.threads0:
                t.join(10)
        left = [t.name for t in ltxvfs_threads() if t.ident not in self.threads0]
        assert not left, f"threads left: {left}"
        leaked = {f for f in fds() - self.fds0 if "socket:" not in f}
        assert not leaked, f"descriptors left: {leaked}"
        shutil.rmtree(self.root)


def run(machine, examples: int, steps: int, name: str) -> None:
    FIGURES.__init__()
    try:
        run_state_machine_as_test(machine, settings=settings(
            max_examples=EXAMPLES or examples, stateful_step_count=STEPS or steps,
            deadline=None, derandomize=not os.environ.get("LTXVFS_SIM_RANDOM"), database=None,
            suppress_health_check=list(HealthCheck), print_blob=True))
    finally:
        FIGURES.log(name)
        print(FIGURES.as_json(name))


def test_simulation_file_replicas():
    run(Simulation, 120, 60, "simulation-file")


@pytest.mark.slow
def test_simulation_s3_replica(s3_server, s3_admin):
    s3_admin.create_bucket(Bucket="sim")

    class OnS3(Simulation):
        s3_endpoint = s3_server

    run(OnS3, 12, 40, "simulation-s3")
