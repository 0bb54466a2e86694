"""The store (DESIGN.md §4): WAL mode with full syncs, a schema versioned by forward
migrations, a database from a newer jatos-lite refused untouched, appends done in SQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import jatos_lite


def test_the_database_is_in_wal_mode_with_full_syncs(tmp_path: Path) -> None:
    store = jatos_lite.Store(tmp_path / "db.sqlite")
    with store.snapshot() as db:
        assert db.value("PRAGMA journal_mode") == "wal"
        assert db.value("PRAGMA synchronous") == 2  # FULL
        assert db.value("PRAGMA user_version") == len(jatos_lite.MIGRATIONS)
    store.close()


def test_an_older_schema_is_migrated_forward_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    old = sqlite3.connect(path)
    old.executescript(jatos_lite.MIGRATIONS[0])
    old.execute("PRAGMA user_version=1")
    tables_before = {row[0] for row in old.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    old.commit()
    old.close()
    store = jatos_lite.Store(path)
    with store.snapshot() as db:
        assert db.value("PRAGMA user_version") == len(jatos_lite.MIGRATIONS)
        tables_after = {row[0] for row in db.all("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables_before <= tables_after
    if len(jatos_lite.MIGRATIONS) > 1:
        assert tables_after - tables_before, "the later migrations added their tables"
    store.close()


def test_a_database_of_a_newer_jatos_lite_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    newer = sqlite3.connect(path)
    newer.execute("CREATE TABLE future (x)")
    newer.execute(f"PRAGMA user_version={len(jatos_lite.MIGRATIONS) + 1}")
    newer.commit()
    newer.close()
    with pytest.raises(RuntimeError, match="newer jatos-lite"):
        jatos_lite.Store(path)
    check = sqlite3.connect(path)
    assert [row[0] for row in check.execute("SELECT name FROM sqlite_master")] == ["future"]
    check.close()
