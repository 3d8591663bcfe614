"""The per-process scratch directory (journals, temporary hydration files) never piles up: a
clean exit removes it, and the next process removes those of killed ones."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from ltxvfs.scratch import PREFIX, make_scratch_dir, sweep_stale
from ltxvfs.storage import open_replica

from replicas import FakePrimary


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(30)
    return p.pid


def test_sweep_removes_only_dead_processes_dirs_of_ours(tmp_path):
    dead = tmp_path / f"{PREFIX}{_dead_pid()}-abc"
    live = tmp_path / f"{PREFIX}{os.getpid()}-def"
    for d in (dead, live):
        d.mkdir()
        (d / "journal").write_bytes(b"x")
    other = tmp_path / "ltxvfs-0"  # a buffer directory: not ours to sweep
    other.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("keep")
    link = tmp_path / f"{PREFIX}{_dead_pid()}-lnk"
    link.symlink_to(target, target_is_directory=True)
    assert sweep_stale(str(tmp_path)) == 1
    assert not dead.exists() and live.exists() and other.exists()
    assert link.is_symlink() and (target / "keep").read_text() == "keep"
    made = make_scratch_dir(str(tmp_path))
    assert os.path.basename(made).startswith(f"{PREFIX}{os.getpid()}-")
    assert (os.stat(made).st_mode & 0o777) == 0o700


CHILD = textwrap.dedent("""
    import os, sys, apsw, ltxvfs, ltxvfs.localfiles
    from urllib.parse import quote
    ltxvfs.localfiles.SPILL = 0  # journals past SPILL bytes live in the scratch directory
    ltxvfs.register(warm_up=False)
    con = apsw.Connection("file:db?vfs=litestream&write_enabled=true&replica_url="
                          + quote(sys.argv[1], safe="") + "&buffer_path=" + quote(sys.argv[3]),
                          flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI)
    con.execute("INSERT INTO t VALUES (4)")  # a rollback journal in the scratch directory
    assert con.execute("SELECT count(*) FROM t").fetchall()[0][0] >= 4  # 5 if "kill" synced
    print(sorted(os.listdir(os.environ["TMPDIR"])), flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), 9)
    # a clean exit without closing the connection
""")


def test_clean_exit_removes_the_scratch_dir_and_the_next_process_sweeps_a_killed_ones(tmp_path):
    url = (tmp_path / "replica").as_uri()
    with open_replica(url) as client:
        p = FakePrimary(tmp_path / "p.db", client)
        p.commit("CREATE TABLE t(x)", "INSERT INTO t VALUES (1), (2), (3)")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}

    def run(how: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", CHILD, url, how, str(tmp_path / how)],
                              env=env,
                              capture_output=True, text=True, timeout=120)

    killed = run("kill")
    assert killed.returncode == -9, killed.stderr
    assert [n for n in os.listdir(scratch) if n.startswith(PREFIX)], "the killed one left its dir"
    clean = run("clean")
    assert clean.returncode == 0, clean.stderr
    assert PREFIX in clean.stdout  # it had one while running
    assert [n for n in os.listdir(scratch) if n.startswith(PREFIX)] == []


READER = textwrap.dedent("""
    import os, sys, apsw, ltxvfs
    from urllib.parse import quote
    ltxvfs.register(warm_up=False)
    con = apsw.Connection("file:db?vfs=litestream&replica_url=" + quote(sys.argv[1], safe=""),
                          flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    print(con.execute("SELECT count(*) FROM t").fetchall()[0][0], flush=True)
""")


def test_only_a_process_that_makes_a_scratch_dir_sweeps(tmp_path):
    """operations.md: a process that only reads creates no scratch directory and removes none;
    the next one that needs one (a write transaction's journal) removes the killed one's."""
    url = (tmp_path / "replica").as_uri()
    with open_replica(url) as client:
        p = FakePrimary(tmp_path / "p.db", client)
        p.commit("CREATE TABLE t(x)", "INSERT INTO t VALUES (1), (2), (3)")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    stale = scratch / f"{PREFIX}{_dead_pid()}-abc"
    stale.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    reader = subprocess.run([sys.executable, "-c", READER, url], env=env, capture_output=True,
                            text=True, timeout=120)
    assert (reader.returncode, reader.stdout) == (0, "3\n"), reader.stderr
    assert sorted(os.listdir(scratch)) == [stale.name]  # none made, none removed
    writer = subprocess.run([sys.executable, "-c", CHILD, url, "clean", str(tmp_path / "buf")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert writer.returncode == 0, writer.stderr
    assert stale.name not in writer.stdout  # gone before the writer made its own
    assert [n for n in os.listdir(scratch) if n.startswith(PREFIX)] == []
