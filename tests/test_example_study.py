"""The bundled example study, installed on first start, runs to its end in a real browser
and stores result data, appended data, the study session and a file (jatos.js issue §4)."""

from __future__ import annotations

import json

import pytest

import jatos_lite

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def example_server(live_server):
    jatos_lite.install_example_study(jatos_lite.Store(live_server.config.db_path), live_server.config)
    return live_server


def example_link(store: jatos_lite.Store) -> tuple[int, str]:
    with store.tx() as db:
        study = db.one("SELECT * FROM studies WHERE uuid = ?", jatos_lite.EXAMPLE_STUDY["uuid"])
        code = jatos_lite.study_links_for(db, jatos_lite.default_batch(db, study["id"]), "GeneralMultiple")[0]
    return study["id"], code


def test_example_study_runs_to_the_end(example_server, chromium) -> None:
    """Three reaction rounds, a summary file downloaded on the next page, a normal end."""
    store = jatos_lite.Store(example_server.config.db_path)
    study_id, code = example_link(store)
    page = chromium.new_context().new_page()
    page.goto(f"{example_server.url}/publix/{code}")
    for _ in range(3):
        page.click("#go.green", timeout=10_000)
    page.wait_for_selector("text=Your mean reaction time was", timeout=10_000)
    assert page.evaluate("jatos.studySessionData.visits") == 1
    page.click("#finish")
    page.wait_for_url("**/endPage.html", timeout=10_000)

    with store.snapshot() as db:
        run = db.one("SELECT * FROM study_results WHERE study_id = ?", study_id)
        results = db.all("SELECT * FROM component_results WHERE study_result_id = ? ORDER BY id", run["id"])
    assert (run["state"], run["message"]) == ("FINISHED", "completed")
    assert run["study_session_data"] is None  # JATOS clears the study session at the end
    trials = [json.loads(line) for line in results[0]["data"].splitlines()]
    assert [t["round"] for t in trials] == [1, 2, 3]
    summary = json.loads(results[1]["data"])["seenSummary"]
    assert summary["trials"] == 3
    assert summary["meanRt"] == pytest.approx(sum(t["rt"] for t in trials) / 3)


def test_example_study_is_installed_once(example_server) -> None:
    """A second start neither duplicates the example nor brings it back after it was deleted."""
    jatos_lite.install_example_study(jatos_lite.Store(example_server.config.db_path), example_server.config)
    with jatos_lite.Store(example_server.config.db_path).snapshot() as db:
        assert db.value("SELECT COUNT(*) FROM studies") == 1


def test_a_reload_fetches_no_unchanged_file_again(example_server, chromium) -> None:
    """Lab Wi-Fi: on a reload the browser asks whether jatos.js and the study's files changed,
    and the server answers 304 without sending them again."""
    _, code = example_link(jatos_lite.Store(example_server.config.db_path))
    page = chromium.new_context().new_page()
    page.goto(f"{example_server.url}/publix/{code}")
    page.wait_for_selector("#go", timeout=10_000)
    answers: dict[str, int] = {}
    page.on("response", lambda response: answers.__setitem__(response.url.rsplit("/", 1)[-1], response.status))
    page.reload()
    page.wait_for_selector("#go", timeout=10_000)
    assert answers.get("jatos.js") == 304 and answers.get("style.css") == 304
