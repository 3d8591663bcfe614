"""SQLAlchemy's dialect compliance suite (``sqlalchemy.testing.suite``), run by
tests/test_sqlalchemy.py in a subprocess for ``sqlite+ltxvfs`` and, as the reference, for the
stdlib ``sqlite`` dialect — with the same requirements (sqla_requirements.py). The main test run
does not collect this directory (tests/conftest.py ignores it)."""

import pytest

# SQLite's provisioning hooks (temp tables, cleanup) serve sqlite+ltxvfs too; the suite loads
# them only for the dialects it knows by name.
import sqlalchemy.dialects.sqlite.provision  # noqa: F401
from sqlalchemy.dialects import registry
from sqlalchemy.testing import provision

_sqlite_post_configure = provision.post_configure_engine.fns["sqlite"]


def _post_configure_engine(url, engine, follower_ident):
    """SQLite's hook ATTACHes ``<driver>_test_schema.db`` on every connection; through the
    litestream VFS a plain file name would be opened as a replica, so for sqlite+ltxvfs the
    attached file is named as a URI of the default VFS (``file:…?vfs=unix``)."""
    if engine.driver != "ltxvfs":
        return _sqlite_post_configure(url, engine, follower_ident)
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, connection_record):
        dbapi_connection.execute('ATTACH DATABASE "file:ltxvfs_test_schema.db?vfs=unix" AS test_schema')


provision.post_configure_engine.fns["sqlite"] = _post_configure_engine

registry.register("sqlite.ltxvfs", "ltxvfs.integrations.sqlalchemy", "SQLiteDialect_ltxvfs")

pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402,F403
