"""The Django backend ``ENGINE = "ltxvfs.django"`` (issue 19 item 3), with a small real project
(tests/django_project: settings, an app with models and two migrations, the router).

Django runs in subprocesses (its settings are process-wide): its own test runner runs the
project's suite (notes/tests.py: migrations applied to the writer, reads through the replica by
the router, types, transactions, read-only refusals, time travel, the max-lag check); and
``migrate`` / ``shell`` write a replica that another process — this one — then reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ltxvfs import dbapi

PROJECT = Path(__file__).resolve().parent / "django_project"


def _django(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LTXVFS_DJANGO_REPLICA": (tmp_path / "replica").as_uri(),
           "LTXVFS_DJANGO_BUFFER": str(tmp_path / "buf"), "PYTHONPATH": str(PROJECT),
           "DJANGO_SETTINGS_MODULE": "settings"}
    return subprocess.run([sys.executable, "-m", "django", *args], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_project_s_test_suite_passes(tmp_path):
    proc = _django(tmp_path, "test", "notes", "--noinput", "-v", "2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Ran 8 tests" in out and "\nOK" in out, out
    assert "Applying notes.0002_title_and_longer_names... OK" in out, out
    for name in ("test_max_lag_refuses_a_stale_replica", "test_time_travel_on_the_replica",
                 "test_router_sends_reads_to_the_replica_and_writes_to_the_writer"):
        assert f"{name} (notes.tests.ReplicaTests" in out and "ok" in out, name


def test_migrate_and_write_in_one_process_read_in_another(tmp_path):
    proc = _django(tmp_path, "migrate", "--database", "default", "-v", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Applying notes.0002_title_and_longer_names... OK" in proc.stdout
    proc = _django(tmp_path, "migrate", "--database", "replica")  # the router says no: a no-op
    assert proc.returncode == 0, proc.stderr
    code = ("import datetime, decimal; from django.db import connections; "
            "from notes.models import Author, Note; a = Author.objects.create(name='ann'); "
            "Note.objects.create(author=a, body='hello', price=decimal.Decimal('1.25'), "
            "created=datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC)); "
            "print(connections['default'].sync())")
    proc = _django(tmp_path, "shell", "--no-imports", "-c", code)
    assert proc.returncode == 0, proc.stderr
    txid = proc.stdout.strip()
    con = dbapi.connect((tmp_path / "replica").as_uri())
    assert con.execute("PRAGMA litestream_txid").fetchone() == (txid,)
    assert con.execute("SELECT a.name, n.body, n.price, n.created, n.title FROM notes_note n "
                       "JOIN notes_author a ON a.id = n.author_id").fetchall() == [
        ("ann", "hello", 1.25, "2026-03-01 00:00:00", "")]  # NUMERIC affinity, as sqlite3
    assert ("notes", "0002_title_and_longer_names") in con.execute(
        "SELECT app, name FROM django_migrations").fetchall()
    con.close()
    # A Django process reading that replica through the "replica" alias.
    proc = _django(tmp_path, "shell", "--no-imports", "-c",
                   "from notes.models import Note; n = Note.objects.get(); "
                   "print(n._state.db, n.body, n.price, n.created.isoformat())")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["replica", "hello", "1.25", "2026-03-01T00:00:00+00:00"]


def test_settings_errors(tmp_path):
    code = ("from django.db import connections; c = connections['default']; "
            "c.settings_dict['OPTIONS']['max_lag'] = 5; c.ensure_connection()")
    proc = _django(tmp_path, "shell", "--no-imports", "-c", code)
    assert proc.returncode != 0
    assert "max_lag applies to read-only replicas, not the writer" in proc.stderr
    code = ("from django.db import connections; c = connections['replica']; "
            "c.settings_dict['OPTIONS']['lag_action'] = 'ignore'; c.ensure_connection()")
    proc = _django(tmp_path, "shell", "--no-imports", "-c", code)
    assert "lag_action'] must be 'raise' or 'warn', not 'ignore'" in proc.stderr


def test_a_writer_without_a_test_replica_is_refused_by_the_test_runner(tmp_path):
    code = ("from django.db import connections; c = connections['default']; "
            "c.settings_dict['TEST']['NAME'] = None; c.creation._get_test_db_name()")
    proc = _django(tmp_path, "shell", "--no-imports", "-c", code)
    assert "['TEST']['NAME'] must name a scratch replica" in proc.stderr
