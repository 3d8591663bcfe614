"""A Django database backend over a Litestream replica: ``ENGINE = "ltxvfs.django"``.

Django's own SQLite backend with :mod:`ltxvfs.dbapi` as its driver. ``NAME`` is the replica URL
(``s3://bucket/db``, ``file:///srv/db``); ``OPTIONS`` takes ``ltxvfs.dbapi.connect``'s arguments
(``write``, ``hydration_path``, ``time``, ``txid``, ``timeout``) and the VFS's URI parameters
(``poll_interval``, ``cache_size``, ``sync_interval``, ``buffer_path``, …), plus ``max_lag``
(seconds) and ``lag_action`` (``"raise"`` or ``"warn"``) for read-only replicas. The router
:class:`ltxvfs.django.router.ReplicaRouter` sends reads to the replicas and writes and migrations
to the writer. See docs/integrations.md.
"""
