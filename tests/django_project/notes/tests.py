"""The project's test suite, run by Django's test runner (``python -m django test``) from
tests/test_django.py: the writer (``default``, write mode) was migrated by the runner; reads go
through the read replica (``replica``) by the router."""

import datetime
import decimal
import time
import warnings

from django.db import DEFAULT_DB_ALIAS, connections, router, transaction
from django.db.utils import IntegrityError, OperationalError
from django.test import TransactionTestCase

from ltxvfs import registry
from ltxvfs.django.base import ReplicaLagWarning

from .models import Author, Note

WHEN = datetime.datetime(2026, 3, 1, 12, 30, tzinfo=datetime.UTC)


def _make_replicas_lag(seconds: float) -> None:
    """As if the replica's last successful poll were ``seconds`` ago (no waiting): the follower's
    clock of its last good poll is moved back."""
    for vfs in registry._registered.values():
        for replica in vfs.replicas():
            replica.last_poll_success = time.monotonic() - seconds


class ReplicaTests(TransactionTestCase):
    databases = {"default", "replica"}

    def setUp(self):
        self.writer, self.reader = connections["default"], connections["replica"]

    def _write_and_sync(self):
        ann = Author.objects.create(name="ann")
        Note.objects.create(author=ann, body="first", price=decimal.Decimal("12.50"), done=True,
                            created=WHEN, day=WHEN.date(), title="one")
        Note.objects.create(author=ann, body="second", created=WHEN + datetime.timedelta(hours=1))
        return self.writer.sync()

    def test_router_sends_reads_to_the_replica_and_writes_to_the_writer(self):
        self.assertEqual(router.db_for_read(Note), "replica")
        self.assertEqual(router.db_for_write(Note), DEFAULT_DB_ALIAS)
        self.assertFalse(router.allow_migrate("replica", "notes"))
        self.assertTrue(router.allow_migrate(DEFAULT_DB_ALIAS, "notes"))
        self._write_and_sync()
        self.assertEqual(Note.objects.all()._db or router.db_for_read(Note), "replica")
        note = Note.objects.get(body="first")
        self.assertEqual(note._state.db, "replica")
        note.done = False
        note.save()  # written through the writer
        self.assertEqual(note._state.db, DEFAULT_DB_ALIAS)

    def test_migrations_ran_on_the_writer_and_the_replica_sees_the_schema(self):
        self.writer.sync()
        with self.reader.cursor() as cur:
            tables = self.reader.introspection.table_names(cur)
            columns = {c.name for c in self.reader.introspection.get_table_description(
                cur, "notes_note")}
        self.assertIn("notes_note", tables)
        self.assertIn("django_migrations", tables)
        self.assertIn("title", columns)  # 0002 ran (a table remake for the altered field)
        applied = set(self.reader.cursor().execute(
            "SELECT name FROM django_migrations WHERE app = 'notes'").fetchall())
        self.assertEqual(applied, {("0001_initial",), ("0002_title_and_longer_names",)})

    def test_reads_through_the_replica_round_trip_types(self):
        txid = self._write_and_sync()
        self.assertEqual(self.reader.txid(), txid)
        notes = list(Note.objects.select_related("author").order_by("created"))
        self.assertEqual([(n.body, n.author.name, n.done, n.title) for n in notes],
                         [("first", "ann", True, "one"), ("second", "ann", False, "")])
        self.assertEqual(notes[0].price, decimal.Decimal("12.50"))
        self.assertEqual(notes[0].created, WHEN)
        self.assertEqual(notes[0].day, datetime.date(2026, 3, 1))
        self.assertIsNone(notes[1].day)
        self.assertEqual(Note.objects.filter(created__year=2026, done=True).count(), 1)
        self.assertEqual(Author.objects.get(name="ann").notes.count(), 2)
        self.assertEqual(list(Note.objects.filter(created__gt=WHEN).values_list("body", flat=True)),
                         ["second"])

    def test_the_replica_reads_this_process_s_commits_at_once(self):
        """In the writer's process, every connection to the replica reads through the write
        buffer (docs/write-mode.md): read-your-writes; the TXID moves on at the sync. Other
        processes see the commits once synced (tests/test_django.py)."""
        txid = self._write_and_sync()
        Note.objects.create(author=Author.objects.using("default").get(), body="third",
                            created=WHEN)
        self.assertEqual(Note.objects.count(), 3)
        self.assertEqual(Note.objects.using("default").count(), 3)
        new = self.writer.sync()
        self.assertGreater(int(new, 16), int(txid, 16))
        self.assertEqual(self.reader.txid(), new)

    def test_writes_through_the_replica_are_refused(self):
        self._write_and_sync()
        with self.assertRaisesMessage(OperationalError, "attempt to write a readonly database"):
            Note.objects.using("replica").filter(body="first").update(done=False)
        with self.assertRaisesMessage(OperationalError, "attempt to write a readonly database"):
            with transaction.atomic(using="replica"):
                Author.objects.using("replica").create(name="bob")

    def test_transactions_and_integrity_errors_on_the_writer(self):
        self._write_and_sync()
        with self.assertRaises(IntegrityError):
            with transaction.atomic():
                Author.objects.create(name="zed")
                Author.objects.create(name="ann")  # unique
        with transaction.atomic():
            Author.objects.create(name="bea")
            try:
                with transaction.atomic():  # a savepoint
                    Author.objects.create(name="ann")
            except IntegrityError:
                pass
        self.writer.sync()
        self.assertEqual(sorted(Author.objects.values_list("name", flat=True)), ["ann", "bea"])

    def test_time_travel_on_the_replica(self):
        first = self._write_and_sync()
        Note.objects.filter(body="first").delete()
        self.writer.sync()
        self.assertEqual(Note.objects.count(), 1)
        with self.reader.cursor() as cur:
            cur.execute(f"PRAGMA litestream_pin_txid = '{first}'")
        self.assertEqual(sorted(Note.objects.values_list("body", flat=True)), ["first", "second"])
        with self.reader.cursor() as cur:
            cur.execute("PRAGMA litestream_pin_txid = 'latest'")
        self.assertEqual(Note.objects.count(), 1)

    def test_max_lag_refuses_a_stale_replica(self):
        self._write_and_sync()
        self.assertEqual(Note.objects.count(), 2)
        self.assertFalse(self.reader.lag_exceeded())
        _make_replicas_lag(120)
        self.assertGreaterEqual(self.reader.lag(), 120)
        self.assertTrue(self.reader.lag_exceeded())
        with self.assertRaisesRegex(OperationalError,
                                    r"replica 'replica' \(file:.*\) last polled successfully "
                                    r"1[2-9]\d s ago; max_lag is 30 s"):
            Note.objects.count()
        self.assertEqual(Note.objects.using("default").count(), 2)  # the writer is not checked
        self.reader.settings_dict["OPTIONS"]["lag_action"] = "warn"
        self.reader.close()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.assertEqual(Note.objects.count(), 2)
            self.assertTrue(any(issubclass(w.category, ReplicaLagWarning)
                                and "max_lag is 30 s" in str(w.message) for w in caught))
            with self.settings(LTXVFS_FALLBACK_ON_LAG=True):
                from ltxvfs.django.router import ReplicaRouter

                self.assertEqual(ReplicaRouter().db_for_read(Note), DEFAULT_DB_ALIAS)
        finally:
            self.reader.settings_dict["OPTIONS"]["lag_action"] = "raise"
            self.reader.close()
            _make_replicas_lag(0)
        self.assertEqual(Note.objects.count(), 2)
