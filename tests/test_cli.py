"""The ltxvfs command line: restore, ltx (compared with `litestream ltx`), shell, demo, help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ltxvfs.cli import main
from ltxvfs.storage import open_replica

from litestream_rig import litestream_ltx
from replicas import FakePrimary, page_bytes, rows_of


@pytest.fixture
def replica(tmp_path):
    url = (tmp_path / "r").as_uri()
    with open_replica(url) as client:
        p = FakePrimary(tmp_path / "p.db", client)
        p.commit("CREATE TABLE t(x)", "INSERT INTO t VALUES (1)")
        p.commit("INSERT INTO t VALUES (2)")
        p.commit("INSERT INTO t VALUES (3)")
    p.url = url
    return p


def test_restore_latest_and_txid(replica, tmp_path, capsys):
    assert main(["restore", replica.url, "-o", str(tmp_path / "a.db")]) == 0
    assert rows_of(tmp_path / "a.db") == [(1,), (2,), (3,)]
    assert "TXID 0000000000000003" in capsys.readouterr().out
    assert main(["restore", replica.url, "-o", str(tmp_path / "b.db"), "--txid", "2"]) == 0
    assert page_bytes(tmp_path / "b.db") == replica.history[1][2]


def test_restore_refuses_existing_output_then_forces(replica, tmp_path, capsys):
    out = tmp_path / "a.db"
    out.write_text("x")
    assert main(["restore", replica.url, "-o", str(out)]) == 1
    assert capsys.readouterr().err == (  # the flag is --force (issue 15 item 13)
        f"ltxvfs: error: output {out} already exists (overwrite it with --force, or force=True "
        "from Python)\n")
    assert main(["restore", replica.url, "-o", str(out), "--force"]) == 0
    assert rows_of(out) == [(1,), (2,), (3,)]


def test_restore_dry_run_prints_the_plan(replica, tmp_path, capsys):
    assert main(["restore", replica.url, "-o", str(tmp_path / "a.db"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0000000000000001-0000000000000001.ltx" in out and "0000000000000003" in out
    assert not (tmp_path / "a.db").exists()


@pytest.mark.parametrize("args,message", [
    (["--txid", "zz"], "invalid TXID"),
    (["--timestamp", "yesterday-ish"], "invalid timestamp"),
    (["--txid", "1", "--timestamp", "2026-01-01T00:00:00Z"], "not allowed with"),
])
def test_restore_bad_arguments(replica, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(["restore", replica.url, "-o", str(tmp_path / "a.db"), *args])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_restore_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["restore", (tmp_path / "empty").as_uri(), "-o", str(tmp_path / "a.db")]) == 1
    err = capsys.readouterr().err
    assert err == "ltxvfs: error: transaction not available: the replica has no LTX files\n"
    assert main(["ltx", "gopher://x/y"]) == 1
    assert "ltxvfs: error:" in capsys.readouterr().err


@pytest.mark.interop
@pytest.mark.parametrize("level", ["0", "all"])
def test_ltx_listing_matches_litestream(replica, capsys, level):
    assert main(["ltx", replica.url, "--level", level]) == 0
    ours = capsys.readouterr().out.strip()
    theirs = litestream_ltx(replica.url, level=level if level == "all" else int(level)).strip()
    assert ours == theirs


@pytest.mark.interop
def test_ltx_json_matches_litestream(replica, capsys):
    import json

    assert main(["ltx", replica.url, "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    theirs = json.loads(litestream_ltx(replica.url, json_output=True))
    assert ours == theirs


@pytest.mark.parametrize("command", ["ltx", "verify", "info", "restore"])
def test_a_missing_file_replica_directory_is_an_error(tmp_path, capsys, command):
    """Issue 15 item 9 (CLI): a mistyped directory is one line and status 1, not an empty table."""
    url = (tmp_path / "mistyped").as_uri()
    extra = ["-o", str(tmp_path / "out.db")] if command == "restore" else []
    assert main([command, url, *extra]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"ltxvfs: error: file: replica directory {url} does not exist\n")
    assert not (tmp_path / "out.db").exists()


def test_ltx_on_an_existing_empty_directory_lists_nothing(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    assert main(["ltx", (tmp_path / "r").as_uri()]) == 0
    assert capsys.readouterr().out == "level  min_txid  max_txid  size  created\n"


def run_cli(*args, env=None, cwd=None):
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("LITESTREAM_")}
    return subprocess.run([sys.executable, "-m", "ltxvfs.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**clean, **(env or {})}, cwd=cwd)


def test_shell_errors_are_one_line(replica, tmp_path):
    """Issue 15 item 10: every failure of `ltxvfs shell` is one line on stderr and status 1,
    and the statements after a failing one do not run."""
    missing = (tmp_path / "mistyped").as_uri()
    cases = [
        ((["gopher://x/y", "SELECT 1;"], {}),
         "invalid replica URL 'gopher://x/y': unsupported scheme 'gopher' (use s3:// or file://)"),
        ((["relative/dir", "SELECT 1;"], {}),
         "invalid replica URL 'relative/dir': a scheme (s3:// or file://) or an absolute path "
         "is required"),
        (([missing, "SELECT 1;"], {}), f"file: replica directory {missing} does not exist"),
        (([replica.url, "SELECT * FROM nope;", "SELECT 42;"], {}), "no such table: nope"),
        (([replica.url, "SELEC 1;"], {}), 'near "SELEC": syntax error'),
        (([replica.url, ".nosuch"], {}), 'Unknown command "nosuch". Enter ".help" for help'),
        ((["SELECT 1;"], {}), "no replica URL: give it as the first argument (s3://bucket/path, "
                              "file:///dir) or set LITESTREAM_REPLICA_URL"),
        ((["SELECT 1;"], {"LITESTREAM_REPLICA_URL": replica.url, "LITESTREAM_POLL_INTERVAL": "x"}),
         "invalid environment variable LITESTREAM_POLL_INTERVAL 'x': expected a duration like "
         "500ms, 1s or 1m30s"),
    ]
    for (args, env), message in cases:
        proc = run_cli("shell", *args, env=env)
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", f"ltxvfs: error: {message}\n"), args


def test_shell_open_failure_is_one_line(tmp_path):
    """The VFS logs why an open failed and raises it: the shell prints it once."""
    (tmp_path / "empty").mkdir()
    url = (tmp_path / "empty").as_uri()
    proc = run_cli("shell", url, "SELECT 1;", env={"LITESTREAM_OPEN_TIMEOUT": "0.05"})
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (f"ltxvfs: error: litestream: replica {url} has no LTX files after "
                           "waiting 0.05s (open_timeout)\n")


def test_shell_sql_with_the_url_from_the_environment(replica):
    """Issue 15 item 10: `ltxvfs shell "SQL"` with LITESTREAM_REPLICA_URL runs the SQL (a first
    argument is the URL only if it looks like one: one word with a '/' or 'file:')."""
    proc = run_cli("shell", "SELECT sum(x) FROM t;", "/* a comment */ SELECT 7;", ".tables",
                   env={"LITESTREAM_REPLICA_URL": replica.url})
    assert (proc.returncode, proc.stdout.split(), proc.stderr) == (0, ["6", "7", "t"], "")
    proc = run_cli("shell", replica.url, "SELECT sum(x) FROM t;",  # the argument wins
                   env={"LITESTREAM_REPLICA_URL": "file:///nonexistent"})
    assert (proc.returncode, proc.stdout.split(), proc.stderr) == (0, ["6"], "")


def test_shell_looks_like_replica_url():
    from ltxvfs.cli import looks_like_replica_url

    for url in ["s3://b/db", "s3://b/db?endpoint=http://127.0.0.1:9000", "file:///r", "/r",
                "gopher://x", "relative/dir", "FILE:/r"]:
        assert looks_like_replica_url(url), url
    for sql in ["SELECT 1;", "VACUUM;", "select(1);", ".tables", ".open /x", "/* c */ SELECT 1",
                "/*c*/SELECT/**/1", "--x", "SELECT 1/2", "PRAGMA litestream_txid", ""]:
        assert not looks_like_replica_url(sql), sql


def test_shell_banner_ends_before_the_prompt(replica, tmp_path):
    """Issue 15 item 13: the interactive banner ends with a newline; the prompt starts a line."""
    import os
    import pty
    import re
    import select

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITESTREAM_")}
    proc = subprocess.Popen([sys.executable, "-m", "ltxvfs.cli", "shell", replica.url],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**env, "HOME": str(tmp_path), "TERM": "dumb"})
    os.close(slave)
    out = b""
    try:
        while b"sqlite> " not in out:
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, out
            out += os.read(master, 4096)
        os.write(master, b".quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.decode())
    # The read that brought the prompt may also bring the start of the escape sequence that
    # follows it (its rest in the next read, never made): what follows the prompt is not ours.
    text = text[:text.index("sqlite> ") + len("sqlite> ")]
    assert text == (f"ltxvfs shell on {replica.url}; try PRAGMA litestream_time = "
                    "'5 minutes ago';\r\nsqlite> ")


def test_shell_runs_sql(replica, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ltxvfs.cli", "shell", replica.url,
                           "SELECT sum(x) FROM t;", "PRAGMA litestream_txid;"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["6", "0000000000000003"]


def test_demo_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ltxvfs.cli", "demo", "--directory",
                           str(tmp_path / "demo")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "all steps agree" in proc.stdout
    assert "restore TXID 0000000000000002" in proc.stdout and "hydrate 100.0%" in proc.stdout


def test_demo_twice_in_one_directory_is_one_line(tmp_path):
    """Issue 15 item 10: a second demo in the same directory refuses, leaving the first's files."""
    demo = tmp_path / "demo"
    assert run_cli("demo", "--directory", str(demo)).returncode == 0
    before = {p: p.read_bytes() for p in demo.rglob("*") if p.is_file()}
    proc = run_cli("demo", "--directory", str(demo))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (f"ltxvfs: error: {demo / 'replica'} exists (an earlier demo?): give "
                           f"another --directory, or remove {demo}\n")
    assert {p: p.read_bytes() for p in demo.rglob("*") if p.is_file()} == before


def test_demo_on_s3(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ltxvfs.cli", "demo", "--s3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "replica: s3://demo/cities?endpoint=http://127.0.0.1:" in proc.stdout
    assert "all steps agree" in proc.stdout and "GET /" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("command", ["restore", "ltx", "verify", "info", "shell", "demo"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_verify_passes_then_finds_corruption_and_gaps(replica, tmp_path, capsys):
    assert main(["verify", replica.url]) == 0
    assert "3 LTX file(s) checked, 0 problem(s)" in capsys.readouterr().out
    path = tmp_path / "r" / "ltx" / "0" / "0000000000000002-0000000000000002.ltx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert main(["verify", replica.url]) == 1
    assert "ChecksumMismatchError" in capsys.readouterr().out
    path.unlink()
    assert main(["verify", replica.url]) == 1
    out = capsys.readouterr().out
    assert "gap" in out and "not restorable" in out


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def _verify_and_restore(url, out, capsys):
    verified = main(["verify", url])
    summary = capsys.readouterr().out.splitlines()[-1]
    restored = main(["restore", url, "-o", str(out)])
    return verified, summary, restored, capsys.readouterr().err


@pytest.mark.parametrize("where", ["header timestamp", "page frame", "trailer checksum"])
def test_verify_says_not_restorable_exactly_when_restore_fails(replica, tmp_path, capsys, where):
    """Issue 15 item 11: one byte of a plan file's checksum-covered bytes flipped: verify's
    summary carries restore's own error, and restore fails with it."""
    path = tmp_path / "r" / "ltx" / "0" / "0000000000000002-0000000000000002.ltx"
    size = path.stat().st_size
    _flip(path, {"header timestamp": 39, "page frame": size // 2, "trailer checksum": size - 1}[where])
    verified, summary, restored, err = _verify_and_restore(replica.url, tmp_path / "a.db", capsys)
    assert (verified, restored) == (1, 1)
    assert err.startswith("ltxvfs: error: L0/0000000000000002-0000000000000002.ltx: ")
    reason = err.removeprefix("ltxvfs: error: ").rstrip("\n")
    assert summary == f"3 LTX file(s) checked, 2 problem(s); not restorable: {reason}"
    assert not (tmp_path / "a.db").exists()


def test_verify_restorable_when_the_corrupt_file_is_not_in_the_plan(replica, tmp_path, capsys):
    """A corrupt L0 file that a compacted L1 file covers is a problem (exit 1), but restore does
    not read it: verify says so, and restore succeeds."""
    from replicas import compact

    with open_replica(replica.url) as client:
        compact(client, client.list_files(0), level=1)
    _flip(tmp_path / "r" / "ltx" / "0" / "0000000000000002-0000000000000002.ltx", 39)
    verified, summary, restored, err = _verify_and_restore(replica.url, tmp_path / "a.db", capsys)
    assert (verified, restored, err) == (1, 0, "")
    assert summary == ("4 LTX file(s) checked, 1 problem(s); latest TXID 0000000000000003 "
                       "restorable from 1 file(s)")
    assert rows_of(tmp_path / "a.db") == [(1,), (2,), (3,)]


def test_info_reports_what_the_vfs_sees(replica, capsys):
    import json

    assert main(["info", replica.url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["txid"] == "0000000000000003" and info["page_size"] == 4096
    assert info["files_per_level"] == {"0": 3} and info["restore_plan_files"] == 3


def test_stats_pragma_counts(replica):
    import apsw

    import ltxvfs

    ltxvfs.register()
    con = apsw.Connection(f"file:db?vfs=litestream&replica_url={replica.url}",
                          flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    con.execute("SELECT * FROM t").fetchall()
    stats = ltxvfs.stats(con)
    assert stats["txid"] == "0000000000000003" and stats["cache_hits"] > 0
    assert stats["indexed_pages"] == 2 and stats["conflicts"] == 0
    con.close()


def test_every_command_and_pragma_is_documented():
    from pathlib import Path

    from ltxvfs.cli import build_parser
    from ltxvfs.config import URI_PARAMETERS
    from ltxvfs.pragmas import PRAGMAS

    docs = "\n".join(p.read_text() for p in (Path(__file__).parent.parent / "docs").glob("*.md"))
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in sub.choices:
        assert f"ltxvfs {command}" in docs + readme, f"command {command} is not documented"
    for pragma in PRAGMAS:
        assert f"`{pragma}`" in docs, f"PRAGMA {pragma} is not documented"
    for param in URI_PARAMETERS:
        assert f"`{param}`" in docs, f"URI parameter {param} is not documented"
