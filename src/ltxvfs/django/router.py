"""A database router for Litestream read replicas served by ``ENGINE = "ltxvfs.django"``.

    DATABASE_ROUTERS = ["ltxvfs.django.router.ReplicaRouter"]

Reads go to a read replica, writes and migrations to the writer. The writer is
``settings.LTXVFS_WRITER`` (default ``"default"``); the replicas are ``settings.LTXVFS_REPLICAS``
(default: every other ``ltxvfs.django`` database whose OPTIONS do not say ``write``). With
``settings.LTXVFS_FALLBACK_ON_LAG = True`` a read whose replica is over its ``max_lag`` goes to
the writer instead (otherwise the replica refuses or warns, as its ``lag_action`` says).

A replica sees the writer's commits once they are synced (``sync_interval``, 1 s by default, or
``connections["default"].sync()``): for read-your-writes, read with ``.using("default")``.
"""

from __future__ import annotations

import random

from django.conf import settings
from django.db import connections

ENGINE = "ltxvfs.django"


class ReplicaRouter:
    def __init__(self) -> None:
        self.writer = getattr(settings, "LTXVFS_WRITER", "default")
        replicas = getattr(settings, "LTXVFS_REPLICAS", None)
        if replicas is None:
            replicas = [alias for alias, cfg in settings.DATABASES.items()
                        if alias != self.writer and cfg.get("ENGINE") == ENGINE
                        and not cfg.get("OPTIONS", {}).get("write")]
        self.replicas = list(replicas)
        self.fallback_on_lag = getattr(settings, "LTXVFS_FALLBACK_ON_LAG", False)

    def db_for_read(self, model, **hints):
        if not self.replicas:
            return self.writer
        alias = random.choice(self.replicas)
        if self.fallback_on_lag and connections[alias].lag_exceeded():
            return self.writer
        return alias

    def db_for_write(self, model, **hints):
        return self.writer

    def allow_relation(self, obj1, obj2, **hints):
        pool = {self.writer, *self.replicas}
        if obj1._state.db in pool and obj2._state.db in pool:
            return True
        return None

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        if db in self.replicas:
            return False  # a replica's schema is the writer's
        return None
