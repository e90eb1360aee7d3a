"""SQLite opened for durable state: the update log, a silo's ledger, the coordinator's store.

Write-ahead logging, so readers in other processes see committed rows while one writes, and
``synchronous=FULL``, so a committed row survives a power cut: a step counts, and a release is
charged, once its transaction has committed. Autocommit mode (``isolation_level=None``): each
writer opens its own transactions (``BEGIN IMMEDIATE`` where it must read and write atomically).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from seedtune.common.errors import RunDirError


def connect(path: str | Path, schema: str) -> sqlite3.Connection:
    """Open (or create) the database at ``path`` with ``schema`` (idempotent ``CREATE ... IF NOT EXISTS``)."""
    db = sqlite3.connect(Path(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


def open_upgraded(path: str | Path, schema: str, upgrade: Callable[[sqlite3.Connection], None],
                  what: str) -> sqlite3.Connection:
    """:func:`connect`, then ``upgrade(db)`` brings a file an earlier version wrote to ``schema``,
    inside one write transaction (two processes opening the same old file must not both change
    it). A SQLite error becomes a :class:`RunDirError` naming ``what``."""
    try:
        db = connect(path, schema)
        with db:
            db.execute("BEGIN IMMEDIATE")
            upgrade(db)
    except sqlite3.Error as error:
        raise RunDirError(f"cannot open {what} {path}: {error}") from None
    return db


def existing(path: str | Path, missing: str) -> Path:
    """``path``, which must be a file; else a :class:`RunDirError` saying ``missing``."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(missing)
    return path
