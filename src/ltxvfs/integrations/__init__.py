"""Framework integrations, each thin on :mod:`ltxvfs.dbapi`: ``sqlalchemy`` (the
``sqlite+ltxvfs://`` dialect), ``django`` (the ``ltxvfs.django`` database backend's code) and
``peewee``. Each module imports its framework; nothing here is imported by ``ltxvfs`` itself."""
