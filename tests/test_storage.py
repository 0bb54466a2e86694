"""The store (DESIGN.md §4): WAL mode with full syncs, a schema versioned by forward
migrations, a database from a newer jatos-lite refused untouched, and group commit
(writers queued together share one COMMIT; each is answered only after it)."""

from __future__ import annotations

import sqlite3
import threading
import time
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


def writers_in_one_batch(store: jatos_lite.Store, bodies: list) -> list:
    """Run each body (db -> None) in its own thread's transaction, all queued behind a first
    writer that holds the write lock, so that all share one batch; returns what each raised
    (the first writer's outcome last)."""
    outcomes: list = [None] * (len(bodies) + 1)
    queued = threading.Barrier(len(bodies) + 1)

    def write(index: int) -> None:
        queued.wait()
        try:
            with store.tx() as db:
                bodies[index](db)
        except Exception as error:  # noqa: BLE001 - the test looks at what each writer got
            outcomes[index] = error

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(bodies))]
    try:
        with store.tx():  # holds the write lock until all the others wait for it
            for thread in threads:
                thread.start()
            queued.wait()
            time.sleep(0.2)
    except Exception as error:  # noqa: BLE001
        outcomes[-1] = error
    for thread in threads:
        thread.join()
    return outcomes


def notes(store: jatos_lite.Store) -> list[str]:
    with store.snapshot() as db:
        return sorted(row[0] for row in db.all("SELECT text FROM notes"))


def test_writers_queued_together_commit_together_and_a_failing_one_takes_only_its_own_changes(tmp_path: Path) -> None:
    store = jatos_lite.Store(tmp_path / "db.sqlite")
    with store.tx() as db:
        db.run("CREATE TABLE notes (text TEXT)")

    def note(text: str):
        return lambda db: db.run("INSERT INTO notes VALUES (?)", text)

    def failing(db: jatos_lite.Db) -> None:
        db.run("INSERT INTO notes VALUES ('lost')")
        raise jatos_lite.JatosError(400, "refused")

    def kept_despite_error(db: jatos_lite.Db) -> None:
        db.run("INSERT INTO notes VALUES ('kept')")
        raise jatos_lite.CommittedError(413, "too big, but the flag is stored")

    store.BATCH_MAX_SECONDS = 60  # however slow the machine, the six writers share one batch
    commits: list[int] = []
    store.on_commit.append(lambda events, conns_changed: commits.append(1))
    outcomes = writers_in_one_batch(store, [note("a"), failing, note("b"), kept_despite_error, note("c")])
    assert len(commits) == 1
    assert [type(o).__name__ for o in outcomes] == ["NoneType", "JatosError", "NoneType", "CommittedError", "NoneType",
                                                    "NoneType"]
    assert notes(store) == ["a", "b", "c", "kept"]


class FailingCommit:
    """The writer connection, except that its next COMMIT fails as a full disk would."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self.conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)


def test_a_failed_commit_answers_every_writer_of_its_batch_with_an_error_and_stores_nothing(tmp_path: Path) -> None:
    store = jatos_lite.Store(tmp_path / "db.sqlite")
    with store.tx() as db:
        db.run("CREATE TABLE notes (text TEXT)")
    store._writer = FailingCommit(store._writer)
    outcomes = writers_in_one_batch(store, [lambda db, t=t: db.run("INSERT INTO notes VALUES (?)", t) for t in "xyz"])
    assert len(outcomes) == 4
    assert all(isinstance(o, jatos_lite.JatosError) and o.status == 503 for o in outcomes), outcomes
    store._writer = store._writer.conn
    with store.tx() as db:
        db.run("INSERT INTO notes VALUES ('after')")
    assert notes(store) == ["after"]


def test_a_write_transaction_inside_another_is_refused_instead_of_waiting_for_itself(tmp_path: Path) -> None:
    store = jatos_lite.Store(tmp_path / "db.sqlite")
    with store.tx():
        with pytest.raises(RuntimeError):
            with store.tx():
                pass
    with store.tx() as db:  # the store still works
        db.run("CREATE TABLE t (x)")
