"""Settings of the small Django project tests/test_django.py runs (``python -m django test``).

The writer (``default``) and a read replica (``replica``) are the same Litestream replica,
``LTXVFS_DJANGO_REPLICA`` (a file:// URL the outer test makes); the router sends reads to the
replica, writes and migrations to the writer."""

import os

SECRET_KEY = "test-only"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "notes"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REPLICA = os.environ["LTXVFS_DJANGO_REPLICA"]
BUFFER = os.environ["LTXVFS_DJANGO_BUFFER"]

DATABASES = {
    "default": {
        "ENGINE": "ltxvfs.django",
        "NAME": REPLICA,
        # Commits reach the replica at each sync: explicit here (connections["default"].sync()).
        "OPTIONS": {"write": True, "buffer_path": BUFFER, "sync_interval": "-1",
                    "poll_interval": "1h"},  # VFS settings are per replica: the same in both
        "TEST": {"NAME": REPLICA},  # a scratch replica: the test runner migrates it, keeps it
    },
    "replica": {
        "ENGINE": "ltxvfs.django",
        "NAME": REPLICA,
        "OPTIONS": {"max_lag": 30, "poll_interval": "1h"},  # no poll in the tests' way
        "TEST": {"MIRROR": "default"},
    },
}
DATABASE_ROUTERS = ["ltxvfs.django.router.ReplicaRouter"]
