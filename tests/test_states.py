"""Result states change only by the moves of the two transition tables (publix-http.md §9):
set_state makes every listed move and refuses every other one without changing anything, and
no other code writes the state of a study or component result."""

from __future__ import annotations

import ast
import re
import sqlite3
from pathlib import Path

import pytest

import jatos_lite
from conftest import Lab

TABLES = jatos_lite.RESULT_MOVES
STUDY_STATES = ["PRE", "STARTED", "DATA_RETRIEVED", "FINISHED", "ABORTED", "FAIL"]
COMPONENT_STATES = ["STARTED", "DATA_RETRIEVED", "RESULTDATA_POSTED", "FINISHED", "RELOADED", "ABORTED", "FAIL"]
STATES = {"study_results": STUDY_STATES, "component_results": COMPONENT_STATES}
PAIRS = [(table, old, new) for table, states in STATES.items() for old in states for new in states]

NOT_DONE, OPEN = ["PRE", "STARTED", "DATA_RETRIEVED"], ["STARTED", "DATA_RETRIEVED"]
# (cause, from, to) as publix-http.md §6-§9 and the study flow make them, written out apart from the tables
CAUSES = {
    "study_results": [
        ("component start of a component other than the first active one, in preview", ["PRE"], "STARTED"),
        ("initData, also a repeated one; a run in preview stays PRE", OPEN, "DATA_RETRIEVED"),
        ("successful end", NOT_DONE, "FINISHED"),
        ("unsuccessful end, eviction from the browser, group cleaner", NOT_DONE, "FAIL"),
        ("abort", NOT_DONE, "ABORTED"),
    ],
    "component_results": [
        ("initData, also a repeated one", OPEN, "DATA_RETRIEVED"),
        ("start of a different component; end: the current one if successful, every other open one",
         OPEN, "FINISHED"),
        ("allowed restart of the same component", OPEN, "RELOADED"),
        ("unsuccessful end; forbidden reload or non-linear start, whatever the last one's state",
         OPEN + ["FINISHED", "RELOADED", "FAIL"], "FAIL"),
        ("abort: the current one, then every one of the run", OPEN + ["FINISHED", "RELOADED", "FAIL", "ABORTED"],
         "ABORTED"),
    ],
}


@pytest.fixture
def run_ids(lab: Lab, store: jatos_lite.Store) -> dict[str, int]:
    """A General Multiple run of a two-component study, its first component started: the row id
    per table, and the run's id for the component results' bulk moves."""
    study = lab.study(components=[{"title": "One", "htmlFilePath": "one.html"},
                                  {"title": "Two", "htmlFilePath": "two.html"}])
    start = lab.client.get(f"/publix/{lab.code(study['id'], 'gm')}", status=303).headers["Location"]
    lab.client.get(start, status=200)
    with store.snapshot() as db:
        cr = db.one("SELECT * FROM component_results ORDER BY id DESC LIMIT 1")
    return {"study_results": cr["study_result_id"], "component_results": cr["id"], "run": cr["study_result_id"]}


def put(db: jatos_lite.Db, table: str, row_id: int, state: str) -> sqlite3.Row:
    """Set the row up in `state` (as test data, bypassing the tables) and read it back."""
    db.run(f"UPDATE {table} SET state = ?, message = 'before' WHERE id = ?", state, row_id)
    return db.one(f"SELECT * FROM {table} WHERE id = ?", row_id)


@pytest.mark.parametrize("table", STATES)
def test_the_tables_hold_exactly_the_moves_the_spec_causes(table: str) -> None:
    caused = {(old, new) for _, olds, new in CAUSES[table] for old in olds}
    assert {(old, new) for old, targets in TABLES[table].items() for new in targets} == caused


def test_the_tables_know_every_state_and_move_only_between_them() -> None:
    for table, states in STATES.items():
        assert sorted(TABLES[table]) == sorted(states)
        assert all(targets <= set(states) for targets in TABLES[table].values())


@pytest.mark.parametrize("table, old, new", PAIRS)
def test_set_state_makes_exactly_the_moves_of_the_table(store: jatos_lite.Store, run_ids: dict[str, int],
                                                        table: str, old: str, new: str) -> None:
    row_id = run_ids[table]
    with store.tx() as db:
        row = put(db, table, row_id, old)
        if new in TABLES[table][old]:
            jatos_lite.set_state(db, table, row, new, message="after")
            assert tuple(db.one(f"SELECT state, message FROM {table} WHERE id = ?", row_id)) == (new, "after")
        else:
            with pytest.raises(jatos_lite.JatosError, match=f"Illegal state change of .* {row_id}: {old} -> {new}$") \
                    as refused:
                jatos_lite.set_state(db, table, row, new, message="after")
            assert refused.value.status == 500
            assert tuple(db.one(f"SELECT * FROM {table} WHERE id = ?", row_id)) == tuple(row)


def test_a_row_read_in_another_state_is_refused_unchanged(store: jatos_lite.Store, run_ids: dict[str, int]) -> None:
    with store.tx() as db:
        stale = put(db, "study_results", run_ids["study_results"], "STARTED")
        now = put(db, "study_results", run_ids["study_results"], "PRE")
        with pytest.raises(jatos_lite.JatosError, match="is no longer STARTED"):
            jatos_lite.set_state(db, "study_results", stale, "DATA_RETRIEVED", message="after")
        assert tuple(db.one("SELECT * FROM study_results WHERE id = ?", now["id"])) == tuple(now)


def second_component_result(db: jatos_lite.Db, run_id: int) -> int:
    component_id = db.value("SELECT MAX(id) FROM components")
    return db.insert("INSERT INTO component_results(study_result_id, component_id, state, start_date) "
                     "VALUES (?, ?, 'STARTED', 0)", run_id, component_id)


def test_a_bulk_move_moves_the_rows_in_the_given_states_only(store: jatos_lite.Store,
                                                             run_ids: dict[str, int]) -> None:
    with store.tx() as db:
        put(db, "component_results", run_ids["component_results"], "RELOADED")
        second_component_result(db, run_ids["run"])
        jatos_lite.set_component_states(db, run_ids["run"], jatos_lite.CR_OPEN, "FINISHED", end_date=7)
        states = db.all("SELECT state, end_date FROM component_results WHERE study_result_id = ? ORDER BY id",
                        run_ids["run"])
        assert [tuple(row) for row in states] == [("RELOADED", None), ("FINISHED", 7)]


@pytest.mark.parametrize("old, new", [(old, new) for old in COMPONENT_STATES for new in COMPONENT_STATES
                                      if new not in TABLES["component_results"][old]])
def test_a_bulk_move_with_one_illegal_old_state_changes_nothing(store: jatos_lite.Store, run_ids: dict[str, int],
                                                                 old: str, new: str) -> None:
    with store.tx() as db:
        put(db, "component_results", run_ids["component_results"], old)
        second_component_result(db, run_ids["run"])
        before = [tuple(row) for row in db.all("SELECT * FROM component_results")]
        with pytest.raises(jatos_lite.JatosError, match=f"Illegal state change of the component results of "
                                                        f"study result {run_ids['run']}: {old} -> {new}$"):
            jatos_lite.set_component_states(db, run_ids["run"], (old, "STARTED"), new, data=None)
        assert [tuple(row) for row in db.all("SELECT * FROM component_results")] == before


# --- the rare moves of a done component result, made through publix ------------------------------


def component_states(store: jatos_lite.Store) -> list[str]:
    with store.snapshot() as db:
        return [row[0] for row in db.all("SELECT state FROM component_results ORDER BY id")]


def test_a_second_forbidden_reload_fails_the_failed_component_result_again(lab: Lab,
                                                                          store: jatos_lite.Store) -> None:
    study = lab.study()
    start = lab.client.get(f"/publix/{lab.code(study['id'], 'gm')}", status=303).headers["Location"]
    lab.client.get(start, status=200)
    for _ in range(2):
        assert "/end?successful=false" in lab.client.get(start, status=303).headers["Location"]
        assert component_states(store) == ["FAIL"]


def test_a_forbidden_reload_fails_a_finished_last_component_result(lab: Lab, store: jatos_lite.Store,
                                                                    config: jatos_lite.Config) -> None:
    """The last component result is done while the run is not once a researcher deleted the newer one."""
    study = lab.study()
    start = lab.client.get(f"/publix/{lab.code(study['id'], 'gm')}", status=303).headers["Location"]
    lab.client.get(start, status=200)
    lab.client.get(start.replace(study["components"][0]["uuid"], study["components"][1]["uuid"]), status=200)
    with store.tx() as db:
        jatos_lite.delete_selected_results(db, config, jatos_lite.selection_of(
            "componentResultId", db.value("SELECT MAX(id) FROM component_results")))
    assert component_states(store) == ["FINISHED"]
    lab.client.get(start, status=303)
    assert component_states(store) == ["FAIL"]


# --- nothing else writes a result's state ---------------------------------------------------------

STATE_WRITE = re.compile(r"UPDATE\s+(\S+)\s+SET\s+(?:(?!\bWHERE\b).)*?\bstate\s*=", re.S | re.I)
OTHER_TABLES_WITH_A_STATE = {"channel_conns", "group_results"}


def sql_texts(node: ast.AST) -> list[str]:
    """The string literals in `node`; an f-string's replacement fields read as {}."""
    if isinstance(node, ast.JoinedStr):
        return ["".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    return [text for child in ast.iter_child_nodes(node) for text in sql_texts(child)]


def state_writers(tree: ast.AST, owner: str = "<module>") -> set[str]:
    """The functions (by innermost name) whose SQL sets a `state` column of a result table."""
    found: set[str] = set()
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found |= state_writers(child, child.name)
        elif any(match.group(1) not in OTHER_TABLES_WITH_A_STATE
                 for text in sql_texts(child) for match in STATE_WRITE.finditer(text)):
            found.add(owner)
    return found


def test_only_the_table_checked_writer_updates_a_result_state() -> None:
    source = Path(jatos_lite.__file__).read_text(encoding="utf-8")
    assert state_writers(ast.parse(source)) == {"_write_state"}


def test_the_source_check_finds_a_raw_state_update() -> None:
    raw = ('def sneaky(db):\n'
           '    db.run("UPDATE component_results SET data = NULL, "\n'
           '           "state = \'ABORTED\' WHERE study_result_id = ?", 1)\n'
           '    db.run(f"UPDATE study_results SET end_date = ?, state = {x!r} WHERE id = ?", 1)\n'
           'def fine(db):\n'
           '    db.run("UPDATE group_results SET state = \'FIXED\' WHERE id = ?", 1)\n'
           '    db.run("UPDATE study_results SET last_seen_date = ? WHERE id = ? AND state = ?", 1)\n')
    assert state_writers(ast.parse(raw)) == {"sneaky"}
