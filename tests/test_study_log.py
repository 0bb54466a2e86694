"""The study log (JATOS's StudyLogger; formats-and-api.md §3.2 `GET /studies/{id}/log`): which
events are logged with which fields, the log file and the newest-first JSON array with
`entryLimit`, retiring the log with its study, and that an entry belongs to the transaction of
the change it records."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path

import pytest
import webtest

import jatos_lite
from conftest import AUTH, Lab, make_jzip

API = "/jatos/api/v1"


def log_file(client: webtest.TestApp, study: int | str) -> webtest.TestResponse:
    return client.get(f"{API}/studies/{study}/log", headers=AUTH)


def entries(client: webtest.TestApp, study: int | str) -> list[dict]:
    """The study's log, oldest first, as the downloaded file has it."""
    text = log_file(client, study).body.decode("ascii")
    assert text.startswith("\n"), "JATOS starts its log files with an empty line"
    return [json.loads(line) for line in text[1:].split("\n")]


def messages(client: webtest.TestApp, study: int | str) -> list[str]:
    return [entry["msg"] for entry in entries(client, study)]


def newest(client: webtest.TestApp, study: int | str, count: int) -> list[dict]:
    return entries(client, study)[-count:]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Participant:
    """A participant's browser in one study run, at its first component."""

    def __init__(self, lab: Lab, study_id: int, worker_type: str = "gm"):
        self.browser = webtest.TestApp(lab.client.app)
        self.code = lab.code(study_id, worker_type)
        page = self.browser.get(f"/publix/{self.code}", status=303).follow()
        self.component = page.request.path.rsplit("/", 1)[0]
        self.run = self.component.rsplit("/", 1)[0]

    def append(self, data: str, **headers: str) -> None:
        self.browser.post(self.component + "/resultData", data.encode("utf-8"),
                          headers={"Content-Type": "text/plain", **headers})


def test_a_new_study_starts_its_log_as_jatos_does(lab: Lab, client: webtest.TestApp) -> None:
    """Initial entry (study UUID, MAC, hash function), 'Created study' by the admin, and the
    description's hash when there is a description; the file is named as JATOS names it."""
    study = lab.study(description="Stroop, café")
    response = log_file(client, study["id"])
    assert response.content_type == "application/octet-stream"
    assert response.headers["Content-Disposition"] == f'attachment; filename="jatos_studylog_{study["uuid"]}.log"'
    first, created, described = entries(client, study["id"])
    assert list(first) == ["msg", "timestamp", "studyUuid", "serversMac", "hashFunction"]
    assert (first["msg"], first["studyUuid"], first["hashFunction"]) == ("Initial entry", study["uuid"], "SHA-256")
    assert re.fullmatch(r"([0-9A-F]{2}-){5}[0-9A-F]{2}", first["serversMac"])
    assert isinstance(first["timestamp"], int) and abs(first["timestamp"] - jatos_lite.now_ms()) < 60_000
    assert created == {"msg": "Created study", "userName": "Admin", "timestamp": created["timestamp"]}
    assert described["msg"] == "Study description changed"
    assert described["studyDescriptionHash"] == study["descriptionHash"] == sha256("Stroop, café".encode("latin-1"))

    plain = client.post_json(f"{API}/studies", {"title": "No description"}, headers=AUTH).json["data"]
    assert messages(client, plain["id"]) == ["Initial entry", "Created study"]


def test_a_participant_run_is_logged_with_hashes_of_data_and_files(lab: Lab, client: webtest.TestApp) -> None:
    """Start (worker type, batch, study code, worker), each data write with the SHA-256 of what
    that request sent, an upload with the file's SHA-256 and name, the end."""
    study = lab.study()
    participant = Participant(lab, study["id"])
    participant.append("abc")
    participant.browser.put(participant.component + "/resultData", "xyz", headers={"Content-Type": "text/plain"})
    participant.append("é你")
    participant.browser.post(participant.component + "/files/pic.png", upload_files=[("file", "x.png", b"PNG!")])
    participant.browser.get(participant.run + "/end", status=303)

    started, appended, replaced, unicode, uploaded, finished = newest(client, study["id"], 6)
    worker = started["workerId"]
    assert list(started) == ["msg", "batchId", "studyCode", "workerId", "timestamp"]
    assert (started["msg"], started["batchId"], started["studyCode"]) == (
        "Started study run with General Multiple worker", study["batches"][0]["id"], participant.code)
    component_uuid = study["components"][0]["uuid"]
    assert list(appended) == ["msg", "componentUuid", "workerId", "dataHash", "timestamp"]
    assert (appended["msg"], appended["componentUuid"], appended["workerId"], appended["dataHash"]) == (
        "Appended component result data", component_uuid, worker, sha256(b"abc"))
    assert (replaced["msg"], replaced["dataHash"]) == ("Replaced component result data", sha256(b"xyz"))
    assert unicode["dataHash"] == sha256("é?".encode("latin-1")), "JATOS hashes the ISO-8859-1 bytes"
    assert list(uploaded) == ["msg", "componentUuid", "workerId", "fileHash", "fileName", "timestamp"]
    assert (uploaded["msg"], uploaded["fileHash"], uploaded["fileName"]) == ("Uploaded file", sha256(b"PNG!"),
                                                                              "pic.png")
    assert finished == {"msg": "Finished study run", "workerId": worker, "timestamp": finished["timestamp"]}

    aborting = Participant(lab, study["id"], "pm")
    aborting.browser.get(aborting.run + "/abort")
    assert newest(client, study["id"], 1)[0]["msg"] == "Aborted study run"


def test_text_outside_latin1_is_logged_as_question_marks(lab: Lab, client: webtest.TestApp) -> None:
    """JATOS writes its logs in ISO-8859-1; an upload named é你.txt is logged as é?.txt, and
    the file stays ASCII (the é escaped), so it reads the same in either encoding."""
    study = lab.study()
    participant = Participant(lab, study["id"])
    participant.browser.post(participant.component + "/files/%C3%A9%E4%BD%A0.txt",
                             upload_files=[("file", "x.txt", b"x")])
    assert newest(client, study["id"], 1)[0]["fileName"] == "é?.txt"
    assert log_file(client, study["id"]).body.isascii()


def test_a_retried_append_is_logged_once(lab: Lab, client: webtest.TestApp) -> None:
    study = lab.study()
    participant = Participant(lab, study["id"])
    for _ in range(3):
        participant.append("once", **{"X-Request-Id": "r-1"})
    assert messages(client, study["id"]).count("Appended component result data") == 1


def test_a_run_evicted_by_the_browsers_run_limit_is_logged(lab: Lab, client: webtest.TestApp) -> None:
    study = lab.study()
    code = lab.code(study["id"], "gm")
    browser = webtest.TestApp(client.app)
    for _ in range(jatos_lite.Config().id_cookie_limit + 1):
        browser.get(f"/publix/{code}", status=303)
    log = entries(client, study["id"])
    abandoned = [entry for entry in log if entry["msg"] == "Finish abandoned study"]
    first_worker = next(entry["workerId"] for entry in log if entry["msg"].startswith("Started study run"))
    assert [entry["workerId"] for entry in abandoned] == [first_worker]


def test_a_researchers_changes_and_exports_are_logged(lab: Lab, client: webtest.TestApp, store: jatos_lite.Store,
                                                      config: jatos_lite.Config, tmp_path: Path) -> None:
    """Description changes (with the new hash; only when it changes), batches, result exports
    (not the metadata), a single result file, result deletion; all by the admin."""
    study = lab.study(description="one")
    study_id = study["id"]
    properties = f"{API}/studies/{study_id}/properties"
    before = len(entries(client, study_id))
    client.patch_json(properties, {"title": "Renamed"}, headers=AUTH)
    client.patch_json(properties, {"description": "two"}, headers=AUTH)
    client.patch_json(properties, {"description": ""}, headers=AUTH)
    assert [entry.get("studyDescriptionHash") for entry in entries(client, study_id)[before:]] == [
        sha256(b"two"), "null"]

    batch = client.post_json(f"{API}/studies/{study_id}/batches", {"title": "Second"}, headers=AUTH).json["data"]
    assert newest(client, study_id, 1)[0] == {"msg": "Created batch", "batchId": batch["id"], "userName": "Admin",
                                              "timestamp": newest(client, study_id, 1)[0]["timestamp"]}
    client.delete(f"{API}/batches/{batch['id']}", headers=AUTH)
    assert [(e["msg"], e.get("batchId")) for e in newest(client, study_id, 2)] == [
        ("Removed result data and files", None), ("Removed batch", batch["id"])]

    participant = Participant(lab, study_id)
    participant.append("data")
    participant.browser.post(participant.component + "/files/f.txt", upload_files=[("file", "f.txt", b"f")])
    cr_id = client.get(f"{API}/results/metadata?studyId={study_id}", headers=AUTH).json[
        "data"][0]["studyResults"][0]["componentResults"][0]["id"]
    exports = [("/results", ["Exported results (files and/or data)"]),
               ("/results/metadata", []),
               ("/results/data", ["Exported results (files and/or data)"]),
               ("/results/data?asPlainText=true", ["Exported result data", "Exported result data to file"]),
               ("/results/files", ["Exported results (files and/or data)"]),
               (f"/results/files/f.txt?componentResultId={cr_id}", ["Exported single result file"])]
    for path, logged in exports:
        before = len(entries(client, study_id))
        client.get(f"{API}{path}{'&' if '?' in path else '?'}studyId={study_id}", headers=AUTH)
        added = entries(client, study_id)[before:]
        assert [entry["msg"] for entry in added] == logged, path
        assert all(entry["userName"] == "Admin" for entry in added)

    jatos_lite.export_results(store, config, str(study_id), tmp_path / "results.zip")
    assert newest(client, study_id, 1)[0]["msg"] == "Exported results (files and/or data)"

    client.post_json(f"{API}/results/delete", {"componentResultIds": [cr_id]}, headers=AUTH)
    assert newest(client, study_id, 1)[0]["msg"] == "Removed result data and files"
    client.delete(f"{API}/components/{study['components'][1]['id']}", headers=AUTH)
    assert newest(client, study_id, 1)[0]["msg"] == "Removed result data and files"


def test_deleting_a_study_retires_its_log(lab: Lab, client: webtest.TestApp, store: jatos_lite.Store) -> None:
    """As JATOS: each batch's removal, 'Removed study', then the last entry; the log is kept
    under a retired key, and the same study imported again starts a new log."""
    archive = make_jzip()
    study = client.get(f"{API}/studies/{lab.import_study(archive)['data']['id']}/properties", headers=AUTH).json["data"]
    client.delete(f"{API}/studies/{study['id']}", headers=AUTH)
    client.get(f"{API}/studies/{study['uuid']}/log", headers=AUTH, status=404)
    with store.snapshot() as db:
        (key,) = [row[0] for row in db.all("SELECT DISTINCT log FROM study_log")]
        retired = [json.loads(row[0]) for row in db.all("SELECT entry FROM study_log ORDER BY id")]
    assert re.fullmatch(re.escape(study["uuid"]) + r"_\d{13}", key)
    assert [(e["msg"], e.get("batchId")) for e in retired[-4:]] == [
        ("Removed result data and files", None), ("Removed batch", study["batches"][0]["id"]),
        ("Removed study", None), ("Last entry of the study log", None)]
    assert retired[-1]["studyUuid"] == study["uuid"] and "userName" not in retired[-1]

    again = lab.import_study(archive)["data"]
    assert again["uuid"] == study["uuid"]
    assert messages(client, again["id"]) == ["Initial entry", "Created study"]


def test_the_json_view_is_newest_first_and_cut_at_entry_limit(lab: Lab, client: webtest.TestApp) -> None:
    study = lab.study(description="d")
    for title in ("a", "b"):
        client.post_json(f"{API}/studies/{study['id']}/batches", {"title": title}, headers=AUTH)
    whole = entries(client, study["id"])
    view = f"{API}/studies/{study['uuid']}/log?download=false"

    def array(query: str = "") -> list:
        response = client.get(view + query, headers=AUTH)
        assert response.content_type == "application/x-ndjson"
        return json.loads(response.body)

    assert array() == array("&entryLimit=-1") == array(f"&entryLimit={len(whole)}") == whole[::-1]
    assert array("&entryLimit=2") == whole[:-3:-1] + [jatos_lite.STUDY_LOG_CUT]
    assert array("&entryLimit=0") == [jatos_lite.STUDY_LOG_CUT]
    assert client.get(f"{API}/studies/{study['id']}/log?entryLimit=1", headers=AUTH).body == log_file(
        client, study["id"]).body, "entryLimit applies only to download=false"
    bad = client.get(view + "&entryLimit=ten", headers=AUTH, status=400).json
    assert bad["error"]["code"] == "INVALID_REQUEST"


def test_an_unknown_study_is_404_and_no_credentials_401(lab: Lab, client: webtest.TestApp) -> None:
    study = lab.study()
    error = client.get(f"{API}/studies/999/log", headers=AUTH, status=404).json["error"]
    assert error["code"] == "NOT_FOUND"
    assert client.get(f"{API}/studies/{study['id']}/log", status=401).json["error"]["code"] == "AUTH_ERROR"
    client.get(f"{API}/studies/{study['id']}/log", headers={"Authorization": "Bearer jap_nope"}, status=401)


def test_an_entry_is_written_in_the_transaction_of_its_change(lab: Lab, client: webtest.TestApp,
                                                              store: jatos_lite.Store,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that fails after its entry was inserted leaves no entry; an append refused for
    its size commits the quota flag but logs nothing."""
    def count() -> int:
        with store.snapshot() as db:
            return db.value("SELECT COUNT(*) FROM study_log")

    def refuse(*args: object) -> None:
        raise jatos_lite.JatosError(409, "refused")

    before = count()
    monkeypatch.setattr(jatos_lite, "insert_batch", refuse)  # called after 'Created study' is inserted
    client.post_json(f"{API}/studies", {"title": "Doomed"}, headers=AUTH, status=409)
    assert count() == before
    monkeypatch.undo()

    study = lab.study()
    participant = Participant(lab, study["id"])
    before = count()
    participant.browser.post(participant.component + "/resultData", b"x" * 5_000_001,
                             headers={"Content-Type": "text/plain"}, status=413)
    assert count() == before
    with store.snapshot() as db:
        assert db.value("SELECT quota_reached FROM study_results") == 1


def test_an_older_database_gives_each_existing_study_a_log(config: jatos_lite.Config) -> None:
    """The migration writes the entry JATOS writes when it finds a study without a log."""
    config.db_path.parent.mkdir(parents=True)
    old = sqlite3.connect(config.db_path)
    for script in jatos_lite.MIGRATIONS[:2]:
        old.executescript(script)
    old.execute("INSERT INTO studies(uuid, title, dir_name, created) VALUES ('old-uuid', 'Old', 'old', 0)")
    old.execute("PRAGMA user_version=2")
    old.commit()
    old.close()
    client = webtest.TestApp(jatos_lite.create_app(config))
    (entry,) = entries(client, "old-uuid")
    assert entry["msg"] == "Could not find a study log although the study already exists. Create a new one."
    assert (entry["studyUuid"], entry["hashFunction"]) == ("old-uuid", "SHA-256")
    assert abs(entry["timestamp"] - jatos_lite.now_ms()) < 60_000
    client.app.config["jatos_lite.store"].close()
