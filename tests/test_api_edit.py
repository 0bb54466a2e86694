"""The researcher's editing API (formats-and-api.md §3.2, §3.6a): study properties, study
deletion, components, batches, study-link activation, the study links list and the
metadata CSV — what admin.html is built on."""

from __future__ import annotations

import csv
import io

import webtest

from conftest import AUTH, Lab

API = "/jatos/api/v1"


def run_once(lab: Lab, study_id: int, data: str, batch_id: int | None = None, upload: bool = False) -> int:
    """A participant (own browser) runs the first component, writes `data` (and a file), ends; the study result ID."""
    browser = webtest.TestApp(lab.client.app)
    page = browser.get(f"/publix/{lab.code(study_id, 'gm', batch_id)}", status=303).follow()
    base = page.request.path.rsplit("/", 1)[0]
    browser.put(base + "/resultData", data, headers={"Content-Type": "text/plain"})
    if upload:
        browser.post(base + "/files/f.txt", upload_files=[("file", "f.txt", b"file")])
    browser.get(base.rsplit("/", 1)[0] + "/end", status=303)
    sr_uuid = base.split("/")[2]
    with lab.client.app.config["jatos_lite.store"].snapshot() as db:
        return db.value("SELECT id FROM study_results WHERE uuid = ?", sr_uuid)


def stored_data(client: webtest.TestApp, **selector: int) -> bytes:
    query = "&".join(f"{k}={v}" for k, v in selector.items())
    return client.get(f"{API}/results/data?{query}&asPlainText=true", headers=AUTH).body


def studies_root(client: webtest.TestApp):
    return client.app.config["jatos_lite.config"].studies


def test_patch_study_properties(lab: Lab, client: webtest.TestApp) -> None:
    """A partial update changes only what it names; inputs may be objects; the answer is the study."""
    study = lab.study(title="Old", description="keep me")
    answer = client.patch_json(f"{API}/studies/{study['id']}/properties",
                               {"title": "New", "studyInput": {"a": 1}, "active": False, "linearStudy": True},
                               headers=AUTH).json["data"]
    assert (answer["title"], answer["description"], answer["studyInput"], answer["active"],
            answer["linearStudy"]) == ("New", "keep me", {"a": 1}, False, True)


def test_patch_study_refuses_bad_input_and_changes_nothing(lab: Lab, client: webtest.TestApp) -> None:
    """Unknown keys, invalid JSON input and HTML in a title are 400s; the study stays as it was."""
    study = lab.study(title="Same")
    for body in ({"nope": 1}, {"studyInput": "{broken"}, {"title": "<b>x</b>"}, {"title": ""}):
        client.patch_json(f"{API}/studies/{study['id']}/properties", body, headers=AUTH, status=400)
    assert client.get(f"{API}/studies/{study['id']}/properties", headers=AUTH).json["data"]["title"] == "Same"


def test_patch_dir_name_renames_the_folder(lab: Lab, client: webtest.TestApp) -> None:
    """A new dirName moves the assets; a name another study uses is refused with 403."""
    study = lab.study(dir_name="first", files={"a.txt": "A"})
    lab.study(dir_name="second")
    client.patch_json(f"{API}/studies/{study['id']}/properties", {"dirName": "second"}, headers=AUTH, status=403)
    client.patch_json(f"{API}/studies/{study['id']}/properties", {"dirName": "renamed"}, headers=AUTH)
    assert (studies_root(client) / "renamed" / "a.txt").read_text() == "A"
    assert not (studies_root(client) / "first").exists()


def test_delete_study_removes_results_files_and_assets(lab: Lab, client: webtest.TestApp) -> None:
    """DELETE /studies/{id} takes its results, result files and folder; other studies stay."""
    doomed, kept = lab.study(dir_name="doomed"), lab.study(dir_name="kept")
    doomed_run = run_once(lab, doomed["id"], "gone", upload=True)
    run_once(lab, kept["id"], "stays")
    answer = client.delete(f"{API}/studies/{doomed['id']}", headers=AUTH).json
    assert answer["message"] == "Study deleted successfully"
    client.get(f"{API}/studies/{doomed['id']}/properties", headers=AUTH, status=404)
    assert not (studies_root(client) / "doomed").exists()
    assert stored_data(client, studyId=kept["id"]) == b"stays\n"
    assert not (client.app.config["jatos_lite.config"].uploads / str(doomed_run)).exists()


def test_components_create_list_update_reorder_delete(lab: Lab, client: webtest.TestApp) -> None:
    """Components can be added, edited, moved and removed; removing one removes its results."""
    study = lab.study(files={"c1.html": "one", "added.html": "added"})
    first, second, third = study["components"]
    added = client.post_json(f"{API}/studies/{study['id']}/components",
                             {"title": "Added", "htmlFilePath": "added.html", "componentInput": {"x": 1}},
                             headers=AUTH).json["data"]
    assert added["componentInput"] == {"x": 1}
    client.patch_json(f"{API}/components/{added['id']}", {"position": 1}, headers=AUTH)
    client.patch_json(f"{API}/components/{first['id']}", {"htmlFilePath": "moved/one.html", "htmlFileRename": True,
                                                          "reloadable": True}, headers=AUTH)
    listed = client.get(f"{API}/studies/{study['id']}/components", headers=AUTH).json["data"]
    assert [c["title"] for c in listed] == ["Added", "Component 1", "Component 2", "Component 3"]
    assert (listed[1]["htmlFilePath"], listed[1]["reloadable"]) == ("moved/one.html", True)
    assert (studies_root(client) / "test_study" / "moved" / "one.html").read_text() == "one"
    run_once(lab, study["id"], "on the added one")
    client.delete(f"{API}/components/{added['id']}", headers=AUTH)
    assert stored_data(client, studyId=study["id"]) == b""
    assert [c["id"] for c in client.get(f"{API}/studies/{study['id']}/components", headers=AUTH).json["data"]] == \
        [first["id"], second["id"], third["id"]]


def test_component_bad_input_is_refused(lab: Lab, client: webtest.TestApp) -> None:
    """Bad paths, positions and keys are 400s; unknown components 404."""
    study = lab.study()
    component = study["components"][0]
    for body in ({"htmlFilePath": "a b.html"}, {"position": 9}, {"position": "1"}, {"bogus": True}):
        client.patch_json(f"{API}/components/{component['id']}", body, headers=AUTH, status=400)
    client.get(f"{API}/components/999", headers=AUTH, status=404)


def test_batches_create_update_delete(lab: Lab, client: webtest.TestApp) -> None:
    """A second batch can be added, limited and removed with its results; the default batch stays."""
    study = lab.study()
    default = study["batches"][0]
    batch = client.post_json(f"{API}/studies/{study['id']}/batches", {"title": "Lab B", "maxTotalWorkers": 5,
                             "allowedWorkerTypes": ["GeneralMultiple"]}, headers=AUTH).json["data"]
    patched = client.patch_json(f"{API}/batches/{batch['id']}", {"batchInput": {"lab": "B"}, "active": False},
                                headers=AUTH).json["data"]
    assert (patched["title"], patched["maxTotalWorkers"], patched["batchInput"], patched["active"]) == \
        ("Lab B", 5, {"lab": "B"}, False)
    client.patch_json(f"{API}/batches/{batch['id']}", {"active": True}, headers=AUTH)
    run_once(lab, study["id"], "in B", batch_id=batch["id"])
    client.patch_json(f"{API}/batches/{batch['id']}", {"maxTotalMembers": 0}, headers=AUTH, status=400)
    client.delete(f"{API}/batches/{default['id']}", headers=AUTH, status=403)
    client.delete(f"{API}/batches/{batch['id']}", headers=AUTH)
    assert stored_data(client, studyId=study["id"]) == b""
    assert [b["id"] for b in client.get(f"{API}/studies/{study['id']}/batches", headers=AUTH).json["data"]] == \
        [default["id"]]


def test_study_links_list_and_deactivation(lab: Lab, client: webtest.TestApp) -> None:
    """Links are listed with type, batch and comment; a deactivated one no longer starts a run."""
    study = lab.study()
    personal = lab.code(study["id"], "ps", comment="Anna")
    general = lab.code(study["id"], "gm")
    links = client.get(f"{API}/studies/{study['id']}/studyLinks", headers=AUTH).json["data"]
    assert [(link["code"], link["type"], link["comment"], link["active"]) for link in links] == \
        [(personal, "PersonalSingle", "Anna", True), (general, "GeneralMultiple", None, True)]
    answer = client.patch_json(f"{API}/studyCodes/{general}", {"active": False}, headers=AUTH).json["data"]
    assert answer["active"] is False
    client.get(f"/publix/{general}", status=403)
    client.patch_json(f"{API}/studyCodes/{general}", {"active": "no"}, headers=AUTH, status=400)
    client.patch_json(f"{API}/studyCodes/nosuchcode1", {"active": True}, headers=AUTH, status=404)


def test_metadata_as_csv(lab: Lab, client: webtest.TestApp) -> None:
    """format=csv gives one row per study result with the JATOS results-table columns."""
    study = lab.study()
    sr_id = run_once(lab, study["id"], "x", upload=True)
    response = client.get(f"{API}/results/metadata?studyId={study['id']}&format=csv", headers=AUTH)
    assert response.content_type == "text/csv"
    assert response.headers["Content-Disposition"].endswith('.csv"')
    rows = list(csv.DictReader(io.StringIO(response.body.decode("utf-8"))))
    assert len(rows) == 1
    row = rows[0]
    assert (row["Result ID"], row["Type"], row["State"], row["Files"], row["Group ID"]) == \
        (str(sr_id), "GeneralMultiple", "FINISHED", "f.txt", "none")


def test_create_study_from_an_unused_folder(lab: Lab, client: webtest.TestApp) -> None:
    """A folder put into studies/ by hand becomes the new study's assets; a used one is not taken."""
    folder = studies_root(client) / "handmade"
    folder.mkdir(parents=True)
    (folder / "index.html").write_text("hi")
    created = client.post_json(f"{API}/studies", {"title": "Handmade", "dirName": "handmade"}, headers=AUTH).json
    assert created["data"]["dirName"] == "handmade"
    again = client.post_json(f"{API}/studies", {"title": "Other", "dirName": "handmade"}, headers=AUTH).json
    assert again["data"]["dirName"] == "handmade_2"
