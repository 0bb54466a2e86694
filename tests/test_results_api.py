"""A scripted participant completes a three-component study through every kind of link, and
everything it sent comes back through the results API byte-identical, in the formats of
formats-and-api.md §2 (combined archive, metadata, data as ZIP and text, files, one file),
selected by query or JSON body; a repeated request id is applied once; delete removes it all."""

from __future__ import annotations

import csv
import io
import json
import zipfile

import pytest
import webtest

import jatos_lite
from conftest import AUTH, Lab

TEXT = {"Content-Type": "text/plain; charset=UTF-8"}
COMPONENTS = [{"title": f"Part {n}", "htmlFilePath": f"p{n}.html"} for n in (1, 2, 3)]


def upload(browser: webtest.TestApp, base: str, name: str, content: bytes) -> None:
    browser.post(f"{base}/files/{name}", upload_files=[("file", name, content)], status=200)


def complete_study(browser: webtest.TestApp, start_url: str, tag: str) -> str:
    """Run all three components: submit, append (one retried), a study session, an upload each; end
    with a message. Returns the study result UUID."""
    page = browser.get(start_url, status=303).follow()
    sr, first = page.request.path.split("/")[2:4]
    components = [c["uuid"] for c in browser.get(f"/publix/{sr}/{first}/initData").json["componentList"]]
    for number, component in enumerate(components, start=1):
        if number > 1:
            browser.get(f"/publix/{sr}/{component}/start", status=200)
        base = f"/publix/{sr}/{component}"
        browser.put(f"{base}/resultData", f"{tag}-{number}:".encode(), headers=TEXT)
        for piece in ("é", "ü", "é"):  # the second "é" repeats the first one's request id: a retry
            browser.post(f"{base}/resultData", piece.encode(), headers={**TEXT, "X-Request-Id": f"{tag}{number}{piece!a}"})
        browser.post(f"/publix/{sr}/studySessionData", json.dumps({"at": number}), headers=TEXT)
        upload(browser, base, f"file{number}.bin", bytes([number]) * 1000)
    browser.get(f"/publix/{sr}/end?successful=true&message=done+{tag}", status=303)
    return sr


@pytest.fixture
def finished(lab: Lab, client: webtest.TestApp) -> dict:
    """One study, completed once through each of PS, PM, GS, GM and the researcher's test run."""
    study = lab.study(components=COMPONENTS)
    runs = {}
    for kind in ("ps", "pm", "gs", "gm"):
        runs[kind] = complete_study(webtest.TestApp(client.app), f"/publix/{lab.code(study['id'], kind)}", kind)
    researcher = webtest.TestApp(client.app)
    lab.sign_in(researcher)
    runs["jatos"] = complete_study(researcher, researcher.get(f"/jatos/{study['id']}/run", status=303).location
                                   .replace("http://localhost:80", ""), "jatos")
    return {"study": study, "runs": runs}


def expected_data(tag: str, number: int) -> str:
    return f"{tag}-{number}:éü"


def test_metadata_has_every_run_finished_with_its_message_and_files(client: webtest.TestApp, finished: dict) -> None:
    meta = client.get(f"/jatos/api/v1/results/metadata?studyId={finished['study']['id']}", headers=AUTH).json
    results = meta["data"][0]["studyResults"]
    assert {(r["workerType"], r["studyState"], r["message"]) for r in results} == {
        (kind, "FINISHED", f"done {tag}") for kind, tag in
        [("PersonalSingle", "ps"), ("PersonalMultiple", "pm"), ("GeneralSingle", "gs"), ("GeneralMultiple", "gm"),
         ("Jatos", "jatos")]}
    for result in results:
        assert [c["componentState"] for c in result["componentResults"]] == ["FINISHED"] * 3
        assert [[f["filename"] for f in c["files"]] for c in result["componentResults"]] == \
            [["file1.bin"], ["file2.bin"], ["file3.bin"]]
        assert result["endDate"] >= result["startDate"]


def test_the_combined_archive_gives_back_every_byte(client: webtest.TestApp, finished: dict) -> None:
    response = client.get(f"/jatos/api/v1/results?studyId={finished['study']['id']}", headers=AUTH)
    assert response.content_type == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.body)) as archive:
        names = archive.namelist()
        assert names[-1] == "metadata.json" and not any(name.endswith("/") for name in names)
        metadata = json.loads(archive.read("metadata.json"))
        uuid_to_tag = {sr: tag for tag, sr in finished["runs"].items()}
        for result in metadata["data"][0]["studyResults"]:
            tag = uuid_to_tag[result["uuid"]]
            for number, component in enumerate(result["componentResults"], start=1):
                folder = f"study_result_{result['id']}/comp-result_{component['id']}"
                assert archive.read(f"{folder}/data.txt").decode() == expected_data(tag, number)
                assert archive.read(f"{folder}/files/file{number}.bin") == bytes([number]) * 1000


def test_plain_text_data_has_one_line_per_component_result(client: webtest.TestApp, finished: dict) -> None:
    text = client.get(f"/jatos/api/v1/results/data?studyId={finished['study']['id']}&asPlainText=true",
                      headers=AUTH).text
    assert sorted(text.splitlines()) == sorted(expected_data(tag, n) for tag in finished["runs"] for n in (1, 2, 3))


def test_selectors_by_query_and_by_json_body_agree(client: webtest.TestApp, finished: dict) -> None:
    meta = client.get(f"/jatos/api/v1/results/metadata?studyId={finished['study']['id']}", headers=AUTH).json
    first = meta["data"][0]["studyResults"][0]
    ids = [c["id"] for c in first["componentResults"]]
    by_query = client.get("/jatos/api/v1/results/data?" + "&".join(f"componentResultId={i}" for i in ids),
                          headers=AUTH)
    by_body = client.post_json("/jatos/api/v1/results/data", {"componentResultIds": ids}, headers=AUTH)
    by_range = client.post_json("/jatos/api/v1/results/data", {"componentResultIds": f"{ids[0]} - {ids[-1]}"},
                                headers=AUTH)
    with zipfile.ZipFile(io.BytesIO(by_query.body)) as a, zipfile.ZipFile(io.BytesIO(by_body.body)) as b, \
            zipfile.ZipFile(io.BytesIO(by_range.body)) as c:
        assert sorted(a.namelist()) == sorted(b.namelist()) == sorted(c.namelist())
        assert len(a.namelist()) == 3 and all(name.endswith("data.txt") for name in a.namelist())


def test_files_zip_and_a_single_file(client: webtest.TestApp, finished: dict) -> None:
    meta = client.get(f"/jatos/api/v1/results/metadata?studyId={finished['study']['id']}", headers=AUTH).json
    component = meta["data"][0]["studyResults"][0]["componentResults"][1]
    files = client.get(f"/jatos/api/v1/results/files?componentResultId={component['id']}", headers=AUTH)
    with zipfile.ZipFile(io.BytesIO(files.body)) as archive:
        assert [archive.read(name) for name in archive.namelist()] == [bytes([2]) * 1000]
    single = client.get(f"/jatos/api/v1/results/files/file2.bin?componentResultId={component['id']}", headers=AUTH)
    assert single.body == bytes([2]) * 1000


def test_deleting_a_run_removes_its_data_and_files_only(client: webtest.TestApp, finished: dict) -> None:
    study_id = finished["study"]["id"]
    meta = client.get(f"/jatos/api/v1/results/metadata?studyId={study_id}", headers=AUTH).json
    doomed, kept = meta["data"][0]["studyResults"][:2]
    client.post_json("/jatos/api/v1/results/delete", {"studyResultIds": [doomed["id"]]}, headers=AUTH)
    left = client.get(f"/jatos/api/v1/results/metadata?studyId={study_id}", headers=AUTH).json
    assert [r["id"] for r in left["data"][0]["studyResults"]] == \
        [r["id"] for r in meta["data"][0]["studyResults"][1:]]
    client.get(f"/jatos/api/v1/results/files/file1.bin?componentResultId={doomed['componentResults'][0]['id']}",
               headers=AUTH, status=404)
    client.get(f"/jatos/api/v1/results/files/file1.bin?componentResultId={kept['componentResults'][0]['id']}",
               headers=AUTH, status=200)


# --- jatos-lite: tabular data merged into one CSV (beyond JATOS, #297) -----------------------------


@pytest.mark.parametrize("data, rows", [
    ('rt,key\n350,f\n420,j\n', [{"rt": "350", "key": "f"}, {"rt": "420", "key": "j"}]),
    ('rt,key\n350,f\nrt,key\n420,j', [{"rt": "350", "key": "f"}, {"rt": "420", "key": "j"}]),
    ('[{"rt": 350, "ok": true}]\n[{"rt": 420, "ok": false}]', [{"rt": 350, "ok": True}, {"rt": 420, "ok": False}]),
    ('{"rt": 1}{"rt": 2}', [{"rt": 1}, {"rt": 2}]),
    ('[{"nested": {"a": 1}}]', []),
    ('[1, 2, 3]', []),
    ('{"broken": ', []),
    ('', []),
])
def test_tabular_data_is_recognised(data: str, rows: list[dict]) -> None:
    assert jatos_lite.data_rows(data) == rows


def test_csv_and_json_data_merge_into_one_csv_with_the_ids_first(lab: Lab, client: webtest.TestApp) -> None:
    study = lab.study()
    code = lab.code(study["id"], "gm")
    for data in ("trial,rt\n1,350\n2,420\n", '[{"trial": 1, "rt": 500, "correct": true}]', "free text"):
        browser = webtest.TestApp(client.app)
        base = browser.get(f"/publix/{code}", status=303).follow().request.path.rsplit("/", 1)[0]
        browser.post(f"{base}/resultData", data.encode(), headers=TEXT)
    response = client.get(f"/jatos/api/v1/results/data?studyId={study['id']}&format=csv", headers=AUTH)
    assert response.content_type == "text/csv"
    table = list(csv.reader(io.StringIO(response.text)))
    assert table[0] == jatos_lite.CSV_ID_COLUMNS + ["trial", "rt", "correct"]
    assert [row[5:] for row in table[1:]] == [["1", "350", ""], ["2", "420", ""], ["1", "500", "true"]]
    assert table[1][:2] == table[2][:2] != table[3][:2], "each row carries its study and component result IDs"


@pytest.mark.parametrize("path", ["data", "metadata"])
def test_csv_for_excel_has_a_byte_order_mark_and_on_request_semicolons(lab: Lab, client: webtest.TestApp,
                                                                        path: str) -> None:
    """Excel on Windows reads UTF-8 only after a byte order mark; European Excel splits at ';'."""
    study = lab.study()
    browser = webtest.TestApp(client.app)
    base = browser.get(f"/publix/{lab.code(study['id'], 'gm')}", status=303).follow().request.path.rsplit("/", 1)[0]
    browser.post(f"{base}/resultData", "wort,rt\nMärchen,350\n".encode(), headers=TEXT)
    url = f"/jatos/api/v1/results/{path}?studyId={study['id']}&format=csv"
    plain = client.get(url, headers=AUTH).body
    excel = client.get(url + "&excel=true", headers=AUTH)
    assert excel.content_type == "text/csv" and excel.body == b"\xef\xbb\xbf" + plain and not plain.startswith(b"\xef")
    european = client.get(url + "&excel=true&semicolon=true", headers=AUTH).body.decode("utf-8-sig")
    assert list(csv.reader(io.StringIO(european), delimiter=";")) == list(csv.reader(io.StringIO(plain.decode())))
    assert ";" in european.splitlines()[0] and ("Märchen" in european) == (path == "data")
    client.get(url + "&excel=perhaps", headers=AUTH, status=400)
    operation = client.get("/openapi.json").json["paths"][f"/jatos/api/v1/results/{path}"]["get"]
    assert {"#/components/parameters/excel", "#/components/parameters/semicolon"} <= {
        parameter["$ref"] for parameter in operation["parameters"]}


def test_search_finds_runs_by_their_data_plain_case_or_regex(client: webtest.TestApp, finished: dict) -> None:
    """jatos-lite: GET /results/search, the admin page's filter over result data."""
    study = finished["study"]["id"]

    def found(**query: object) -> list[int]:
        return client.get("/jatos/api/v1/results/search", {"studyId": study, **query}, headers=AUTH).json["data"]

    every = client.get(f"/jatos/api/v1/results/metadata?studyId={study}", headers=AUTH).json["data"][0]
    crs = {cr["id"]: run["workerType"] for run in every["studyResults"] for cr in run["componentResults"]}
    assert [crs[i] for i in found(text="GS-2")] == ["GeneralSingle"]
    assert found(text="GS-2", caseSensitive="true") == []
    assert [crs[i] for i in found(text="gs-2", caseSensitive="true")] == ["GeneralSingle"]
    assert len(found(text=r"^(ps|pm)-[13]:éü", regex="true")) == 4
    refused = client.get("/jatos/api/v1/results/search", {"studyId": study, "text": "(", "regex": "true"},
                         headers=AUTH, status=400)
    assert "Invalid regular expression" in refused.json["error"]["message"]
    assert found(text="zzz") == [] and client.get("/jatos/api/v1/results/search?text=gs", headers=AUTH).json["data"] == []


def test_worker_selector_and_details_for_the_admin_page(client: webtest.TestApp, finished: dict) -> None:
    """jatos-lite: workerId selects a worker's runs (JATOS's worker results page); details=true adds each
    component's title and message and the MTurk worker ID; without it the metadata stays JATOS's."""
    every = client.get(f"/jatos/api/v1/results/metadata?studyId={finished['study']['id']}", headers=AUTH).json
    run = every["data"][0]["studyResults"][0]
    assert "message" not in run["componentResults"][0] and "mturkWorkerId" not in run
    mine = client.get(f"/jatos/api/v1/results/metadata?workerId={run['workerId']}&details=true", headers=AUTH).json
    runs = mine["data"][0]["studyResults"]
    assert [r["id"] for r in runs] == [run["id"]] and runs[0]["mturkWorkerId"] is None
    assert [c["componentTitle"] for c in runs[0]["componentResults"]] == ["Part 1", "Part 2", "Part 3"]
    assert all("message" in c for c in runs[0]["componentResults"])


# --- jatos-lite: runs without component results (issue #16) ------------------------------------------
# A participant who opens a study link but never loads the first component leaves a run with no
# component result. JATOS never exports it nor lets it be deleted, yet it counts toward
# maxTotalWorkers; jatos-lite's run selectors reach it.


@pytest.fixture
def with_empty_run(lab: Lab, client: webtest.TestApp, store: jatos_lite.Store) -> dict:
    """A study with one run that sent data and one whose first component page was never requested."""
    study = lab.study()
    code = lab.code(study["id"], "gm")
    full = webtest.TestApp(client.app)
    base = full.get(f"/publix/{code}", status=303).follow().request.path.rsplit("/", 1)[0]
    full.post(f"{base}/resultData", b"some data", headers=TEXT)
    webtest.TestApp(client.app).get(f"/publix/{code}", status=303)  # the redirect to the component is not followed
    with store.snapshot() as db:
        full_id, empty_id = [row[0] for row in db.all("SELECT id FROM study_results ORDER BY id")]
        assert db.value("SELECT COUNT(*) FROM component_results WHERE study_result_id = ?", empty_id) == 0
    meta = client.get(f"/jatos/api/v1/results/metadata?studyResultId={full_id}", headers=AUTH).json
    return {"study": study, "full": meta["data"][0]["studyResults"][0], "empty": empty_id}


def _runs(client: webtest.TestApp, query: str) -> dict[int, list[int]]:
    """Study result ID -> its component result IDs, as /results/metadata selects them."""
    data = client.get(f"/jatos/api/v1/results/metadata?{query}", headers=AUTH).json["data"]
    return {run["id"]: [c["id"] for c in run["componentResults"]] for study in data for run in study["studyResults"]}


def test_a_run_without_component_results_is_in_the_metadata_through_every_run_selector(
        client: webtest.TestApp, with_empty_run: dict) -> None:
    full = with_empty_run["full"]
    meta = client.get(f"/jatos/api/v1/results/metadata?studyResultId={with_empty_run['empty']}", headers=AUTH).json
    assert meta["data"], "the run is there"
    empty = meta["data"][0]["studyResults"][0]
    assert empty["componentResults"] == [] and empty["studyState"] == "STARTED"
    assert list(empty) == list(full), "the same keys in the same order as any study result"
    both = {full["id"]: [full["componentResults"][0]["id"]], empty["id"]: []}
    study = with_empty_run["study"]
    for query in (f"studyId={study['id']}", f"studyUuid={study['uuid']}", f"batchId={empty['batchId']}",
                  f"studyResultId={full['id']}&studyResultId={empty['id']}"):
        assert _runs(client, query) == both, query
    assert _runs(client, f"workerId={empty['workerId']}") == {empty["id"]: []}
    assert _runs(client, f"componentId={study['components'][0]['id']}") == {full["id"]: both[full["id"]]}
    by_body = client.post_json("/jatos/api/v1/results/metadata", {"studyResultIds": f"{empty['id']}"}, headers=AUTH)
    assert by_body.json["data"][0]["studyResults"] == [empty]
    details = client.get(f"/jatos/api/v1/results/metadata?studyResultId={empty['id']}&details=true", headers=AUTH)
    assert details.json["data"][0]["studyResults"][0]["componentResults"] == []


def test_a_run_without_component_results_is_a_row_of_the_metadata_csv(client: webtest.TestApp,
                                                                        with_empty_run: dict) -> None:
    response = client.get(f"/jatos/api/v1/results/metadata?studyId={with_empty_run['study']['id']}&format=csv",
                          headers=AUTH)
    table = list(csv.DictReader(io.StringIO(response.text)))
    assert [int(row["Result ID"]) for row in table] == [with_empty_run["full"]["id"], with_empty_run["empty"]]
    assert table[1]["Files"] == "none" and table[1]["State"] == "STARTED"


def test_a_run_without_component_results_is_in_the_archives_metadata_json_only(client: webtest.TestApp,
                                                                                with_empty_run: dict) -> None:
    full, empty = with_empty_run["full"], with_empty_run["empty"]
    response = client.get(f"/jatos/api/v1/results?studyResultId={full['id']}&studyResultId={empty}", headers=AUTH)
    with zipfile.ZipFile(io.BytesIO(response.body)) as archive:
        assert archive.namelist() == [f"study_result_{full['id']}/comp-result_{full['componentResults'][0]['id']}"
                                      "/data.txt", "metadata.json"]
        runs = json.loads(archive.read("metadata.json"))["data"][0]["studyResults"]
        assert runs[0] == full and [(run["id"], run["componentResults"]) for run in runs[1:]] == [(empty, [])]
    only_empty = client.get(f"/jatos/api/v1/results/data?studyResultId={empty}", headers=AUTH)
    with zipfile.ZipFile(io.BytesIO(only_empty.body)) as archive:
        assert archive.namelist() == []
    assert client.get(f"/jatos/api/v1/results/data?studyResultId={empty}&asPlainText=true", headers=AUTH).body == b""


def test_deleting_a_run_without_component_results_removes_it_and_the_log_says_so(
        client: webtest.TestApp, with_empty_run: dict, store: jatos_lite.Store) -> None:
    study, full, empty = with_empty_run["study"], with_empty_run["full"], with_empty_run["empty"]
    log = f"/jatos/api/v1/studies/{study['id']}/log?download=false&entryLimit=1"
    assert json.loads(client.get(log, headers=AUTH).body)[0]["msg"] != "Removed result data and files"
    answer = client.post_json("/jatos/api/v1/results/delete", {"studyResultIds": [empty]}, headers=AUTH).json
    assert answer == {"apiVersion": jatos_lite.API_VERSION, "message": "Deleted 1 study result without component "
                      "results", "data": []}
    assert _runs(client, f"studyId={study['id']}") == {full["id"]: [full["componentResults"][0]["id"]]}
    with store.snapshot() as db:
        assert db.value("SELECT COUNT(*) FROM study_results WHERE id = ?", empty) == 0
    assert json.loads(client.get(log, headers=AUTH).body)[0]["msg"] == "Removed result data and files"
    again = client.post_json("/jatos/api/v1/results/delete", {"studyResultIds": [empty]}, headers=AUTH).json
    assert again == {"apiVersion": jatos_lite.API_VERSION, "data": []}, "nothing selected, nothing deleted"


def test_deleting_a_study_s_results_takes_its_runs_without_component_results_too(
        client: webtest.TestApp, with_empty_run: dict) -> None:
    study, full = with_empty_run["study"], with_empty_run["full"]
    answer = client.post(f"/jatos/api/v1/results/delete?studyId={study['id']}", headers=AUTH).json
    assert answer["data"] == [full["componentResults"][0]["id"]]
    assert answer["message"] == "Deleted 1 study result without component results"
    assert _runs(client, f"studyId={study['id']}") == {}


def test_deleting_a_run_s_last_component_result_still_deletes_the_run(client: webtest.TestApp,
                                                                       with_empty_run: dict) -> None:
    """Today's rule: a run that a deletion of component results leaves empty goes too (the
    answer has no message: no run was selected that had no component results)."""
    study, full, empty = with_empty_run["study"], with_empty_run["full"], with_empty_run["empty"]
    cr_id = full["componentResults"][0]["id"]
    answer = client.post_json("/jatos/api/v1/results/delete", {"componentResultIds": [cr_id]}, headers=AUTH).json
    assert answer == {"apiVersion": jatos_lite.API_VERSION, "data": [cr_id]}
    assert _runs(client, f"studyId={study['id']}") == {empty: []}


NASTY = 'a "quote", a \\ and\na line\tand \x01 ü 日本 \u2028 </script>'


def odd_run(store: jatos_lite.Store, config: jatos_lite.Config, study_id: int) -> dict:
    """A run with every optional metadata field and odd text in each text column: a component result
    without an end and with an upload (and a partial one, left out), and one with empty data."""
    with store.tx() as db:
        component_id, component_uuid = db.one("SELECT id, uuid FROM components WHERE study_id = ?", study_id)
        batch_id, batch_uuid = db.one("SELECT id, uuid FROM batches WHERE study_id = ?", study_id)
        db.run("UPDATE batches SET title = ? WHERE id = ?", NASTY, batch_id)
        worker_id = db.insert("INSERT INTO workers(type, comment, mturk_worker_id) VALUES ('MTurk', ?, ?)",
                              NASTY, NASTY)
        sr_id = db.insert("INSERT INTO study_results(uuid, study_code, study_id, batch_id, worker_id, state, "
                          "start_date, end_date, last_seen_date, url_query_parameters, confirmation_code, message, "
                          "quota_reached, group_result_id) VALUES ('sr-uuid', ?, ?, ?, ?, 'FINISHED', 1700000000000, "
                          "1700090061999, 1700090061000, ?, ?, ?, 1, 7)", NASTY, study_id, batch_id, worker_id,
                          json.dumps({"q": NASTY, "n": [1, 2.5]}), NASTY, NASTY)
        crs = [db.insert("INSERT INTO component_results(study_result_id, component_id, state, start_date, end_date, "
                         "data, data_size, message, quota_reached) VALUES (?, ?, ?, 1700000000000, ?, ?, ?, ?, ?)",
                         sr_id, component_id, state, end, data, size, message, quota)
               for state, end, data, size, message, quota in [("STARTED", None, "ab", 2, None, 0),
                                                             ("FINISHED", 1700000001000, "", 0, NASTY, 1)]]
    folder = config.uploads / str(sr_id) / str(crs[0])
    folder.mkdir(parents=True)
    (folder / "f é.bin").write_bytes(b"x" * 1500)
    (folder / ".upload-partial").write_bytes(b"x")
    return {"sr_id": sr_id, "crs": crs, "worker_id": worker_id, "batch": (batch_id, batch_uuid),
            "component": (component_id, component_uuid)}


def test_metadata_is_exactly_what_jatos_writes_with_odd_text_and_every_optional_field(
        lab: Lab, client: webtest.TestApp, store: jatos_lite.Store, config: jatos_lite.Config) -> None:
    """The metadata is written from templates rather than as dicts through json: byte for byte
    what to_json of JATOS's objects gives, field order and escapes included."""
    study = lab.study(components=COMPONENTS[:1])
    run = odd_run(store, config, study["id"])
    (component_id, component_uuid), (batch_id, batch_uuid) = run["component"], run["batch"]
    for details in (False, True):
        more = {"componentTitle": "Part 1"} if details else {}
        components = [{
            "id": run["crs"][0], "componentId": component_id, "componentUuid": component_uuid,
            "startDate": 1700000000000, "endDate": None, "duration": None, "componentState": "STARTED",
            "path": f"/study_result_{run['sr_id']}/comp-result_{run['crs'][0]}",
            "data": {"size": 2, "sizeHumanReadable": "2 B"},
            "files": [{"filename": "f é.bin", "size": 1500, "sizeHumanReadable": "1.5 kB"}], "isQuotaReached": False,
            **({**more, "message": None} if details else {})}, {
            "id": run["crs"][1], "componentId": component_id, "componentUuid": component_uuid,
            "startDate": 1700000000000, "endDate": 1700000001000, "duration": "00:00:01",
            "componentState": "FINISHED", "path": f"/study_result_{run['sr_id']}/comp-result_{run['crs'][1]}",
            "data": {"size": 0, "sizeHumanReadable": "0 B", "filename": "data.txt"}, "files": [],
            "isQuotaReached": True, **({**more, "message": NASTY} if details else {})}]
        result = {
            "id": run["sr_id"], "uuid": "sr-uuid", "studyCode": NASTY, "comment": NASTY, "startDate": 1700000000000,
            "endDate": 1700090061999, "duration": "1:01:01:01", "lastSeenDate": 1700090061000,
            "studyState": "FINISHED", "message": NASTY, "urlQueryParameters": {"q": NASTY, "n": [1, 2.5]},
            "workerId": run["worker_id"], "workerType": "MTurk", "batchId": batch_id, "batchUuid": batch_uuid,
            "batchTitle": NASTY, "groupId": 7, "confirmationCode": NASTY,
            **({"mturkWorkerId": NASTY} if details else {}), "isQuotaReached": True, "componentResults": components}
        expected = {"apiVersion": jatos_lite.API_VERSION, "data": [{
            "studyId": study["id"], "studyUuid": study["uuid"], "studyTitle": study["title"],
            "studyResults": [result]}]}
        body = client.get(f"/jatos/api/v1/results/metadata?studyResultId={run['sr_id']}&details={str(details).lower()}",
                          headers=AUTH).text
        assert body == jatos_lite.to_json(expected)


def test_uploaded_files_with_and_without_one_listing_of_the_uploads_folder(config: jatos_lite.Config) -> None:
    """Up to `most_runs` run folders the uploads folder is listed once; beyond, each run's folder
    is: the same files either way, stray files where folders belong ignored."""
    for sr_id, cr_id, name in [(1, 1, "b"), (1, 1, "a"), (1, 2, ".upload-x"), (2, 3, "c")]:
        (config.uploads / str(sr_id) / str(cr_id)).mkdir(parents=True, exist_ok=True)
        (config.uploads / str(sr_id) / str(cr_id) / name).write_bytes(b"x")
    (config.uploads / "3").write_text("a file where a run's folder belongs")
    (config.uploads / "4").mkdir()
    (config.uploads / "4" / "5").write_text("a file where a component result's folder belongs")
    asked = [(1, 1), (1, 2), (1, 9), (2, 3), (3, 1), (4, 5), (9, 9), (1, 1)]
    for most_runs in (10_000, 0):
        files = jatos_lite._UploadedFiles(config, most_runs)
        assert [[path.name for path in files(sr_id, cr_id)] for sr_id, cr_id in asked] == \
            [["a", "b"], [], [], ["c"], [], [], [], ["a", "b"]]


@pytest.mark.parametrize("size, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (1049, "1.0 kB"),
                                        (1050, "1.1 kB"), (999_949, "999.9 kB"), (999_950, "1.0 MB"),
                                        (1_234_567, "1.2 MB"), (5 * 10**21, "5000.0 EB")])
def test_human_readable_sizes_round_half_up_like_jatos(size: int, text: str) -> None:
    assert jatos_lite.human_bytes(size) == text
