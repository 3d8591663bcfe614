"""Framework integrations, each thin on :mod:`ltxvfs.dbapi` or apsw: ``sqlalchemy`` (the
``sqlite+ltxvfs://`` dialect) and ``peewee`` (``APSWDatabase`` on a replica). The Django backend
lives in :mod:`ltxvfs.django` (Django imports ``ENGINE + ".base"``). Each module imports its
framework; nothing here is imported by ``ltxvfs`` itself."""
