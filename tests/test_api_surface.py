"""The package's top level: every exception ltxvfs defines, and every one the docs name, is
importable as ``ltxvfs.<Name>`` (issue 15 item 12)."""

from __future__ import annotations

import builtins
import importlib
import pkgutil
import re
from pathlib import Path

import apsw

import ltxvfs
import ltxvfs.errors

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _exception_classes(module) -> dict[str, type]:
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, BaseException)
            and obj.__module__ == module.__name__ and not name.startswith("_")}


def test_every_class_of_errors_py_is_exported():
    defined = _exception_classes(ltxvfs.errors)
    assert len(defined) >= 20
    missing = sorted(set(defined) - set(ltxvfs.__all__))
    assert not missing, f"errors.py classes not in ltxvfs.__all__: {missing}"
    for name, cls in defined.items():
        assert getattr(ltxvfs, name) is cls


def test_every_public_exception_of_the_package_is_exported():
    """Exceptions defined anywhere in the package (config.py, pragmas.py, ...), not only errors.py."""
    found: dict[str, type] = {}
    for mod in pkgutil.walk_packages(ltxvfs.__path__, "ltxvfs."):
        if mod.name == "ltxvfs.cli":
            continue  # CommandError: the command line's own, printed by its main(), never raised to callers
        if mod.name.startswith(("ltxvfs.dbapi", "ltxvfs.integrations", "ltxvfs.django")):
            continue  # PEP 249's exception tree is that module's own API (Error, Warning, ...);
            # the Django backend's (ReplicaLagError) is Django's database API's
        found.update(_exception_classes(importlib.import_module(mod.name)))
    missing = sorted(set(found) - set(ltxvfs.__all__))
    assert not missing, f"exceptions defined in ltxvfs but not exported: {missing}"
    for name, cls in found.items():
        assert getattr(ltxvfs, name) is cls, name


def test_all_lists_only_what_exists():
    for name in ltxvfs.__all__:
        assert hasattr(ltxvfs, name), name
    assert len(set(ltxvfs.__all__)) == len(ltxvfs.__all__)


def test_every_error_the_docs_name_can_be_caught():
    """A `FooError` in README.md or docs/ is ltxvfs's (exported), apsw's (written apsw.Foo or one of
    SQLite's result codes), ltxvfs.dbapi's (PEP 249's), the Django backend's, or Python's own."""
    from ltxvfs import dbapi
    from ltxvfs.django import base as django_backend

    names: set[str] = set()
    for doc in DOCS:
        for prefix, name in re.findall(r"\b(ltxvfs\.|apsw\.)?([A-Z][A-Za-z0-9]*Error)\b", doc.read_text()):
            if prefix == "ltxvfs.":
                assert name in ltxvfs.__all__, f"{doc.name}: ltxvfs.{name} is not exported"
            elif prefix == "apsw.":
                assert hasattr(apsw, name), f"{doc.name}: apsw.{name} does not exist"
            names.add(name)
    assert {"InvalidMagicError", "BucketNotFoundError", "ReplicaURLError"} <= names
    unknown = sorted(n for n in names if n not in ltxvfs.__all__ and not hasattr(apsw, n)
                     and not hasattr(builtins, n) and n not in dbapi.__all__
                     and not isinstance(getattr(django_backend, n, None), type))
    assert not unknown, f"the docs name errors nobody defines: {unknown}"
    # Names the README lists as ltxvfs's are ltxvfs's, not only apsw's.
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"`([A-Z][A-Za-z]*Error)`", readme.split("Every malformed input")[1]))
    assert listed and listed <= set(ltxvfs.__all__)


def test_the_tree_catches_as_documented():
    assert issubclass(ltxvfs.InvalidMagicError, ltxvfs.LTXError)
    assert issubclass(ltxvfs.LTXError, ltxvfs.LitestreamError)
    assert issubclass(ltxvfs.BucketNotFoundError, ltxvfs.StorageError)
    assert issubclass(ltxvfs.ReplicaURLError, ValueError)
    from ltxvfs.buffer import BufferError as OldName
    from ltxvfs.pages import PageNotFoundError
    assert OldName is ltxvfs.WriteBufferError and PageNotFoundError is ltxvfs.PageNotFoundError
