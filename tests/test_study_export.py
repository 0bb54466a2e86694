"""Study export (GET /jatos/api/v1/studies/{id}, formats-and-api.md §1.8): an archive real
JATOS imports, and one that re-imports into jatos-lite unchanged."""

from __future__ import annotations

import io
import json
import zipfile

import webtest

import jatos_lite
from conftest import AUTH, Lab

ASSETS = {"intro.html": "<p>intro</p>", "lib/deep/x.js": "var x = 1;", "img/ü.png": b"\x89PNG\x00\xff"}


def exported(client: webtest.TestApp, study_id: int) -> zipfile.ZipFile:
    response = client.get(f"/jatos/api/v1/studies/{study_id}", headers=AUTH)
    assert response.content_type == "application/zip"
    assert response.headers["Content-Disposition"].startswith('attachment; filename="jatos_study_')
    return zipfile.ZipFile(io.BytesIO(response.body))


def rich_study(lab: Lab) -> dict:
    return lab.study(
        title="Rich", dir_name="rich_study", files=ASSETS, studyInput='{"b":2,"a":[1]}', groupStudy=True,
        endRedirectUrl="https://example.org/done?x=[x]",
        components=[{"title": "Intro", "htmlFilePath": "intro.html", "componentInput": '{"k":"v"}'},
                    {"title": "Off", "htmlFilePath": "off.html", "active": False, "reloadable": True}],
        batches=[{"uuid": "b-1", "title": "Default", "active": True, "maxActiveMembers": 2, "maxTotalMembers": 4,
                  "maxTotalWorkers": None, "allowedWorkerTypes": ["PersonalSingle", "GeneralMultiple"],
                  "comments": "first", "batchInput": '{"n":1}'},
                 {"uuid": "b-2", "title": "Second", "active": False, "maxActiveMembers": None,
                  "maxTotalMembers": None, "maxTotalWorkers": 10, "allowedWorkerTypes": ["MT"],
                  "comments": None, "batchInput": None}])


def properties(client: webtest.TestApp, study_id: int) -> dict:
    data = client.get(f"/jatos/api/v1/studies/{study_id}/properties?withComponentProperties=true"
                      "&withBatchProperties=true", headers=AUTH).json["data"]
    for item in [data, *data["components"], *data["batches"]]:
        item.pop("id")
    return data


def test_archive_layout_is_what_jatos_imports(lab: Lab, client: webtest.TestApp) -> None:
    """One .jas and one folder named dirName at the top; version first; inputs as JSON strings
    under both names; no id, date, locked or study-level active."""
    study = rich_study(lab)
    archive = exported(client, study["id"])
    tops = {name.split("/")[0] for name in archive.namelist()}
    assert tops == {"rich_study.jas", "rich_study"}
    assert {n for n in archive.namelist() if not n.endswith("/")} == \
        {"rich_study.jas"} | {f"rich_study/{path}" for path in [*ASSETS, "off.html"]}
    raw = archive.read("rich_study.jas").decode()
    assert raw.startswith('{"version":"3","data":{"uuid":')
    data = json.loads(raw)["data"]
    assert list(data) == ["uuid", "title", "description", "groupStudy", "linearStudy", "allowPreview", "dirName",
                          "comments", "studyInput", "jsonData", "endRedirectUrl", "studyEntryMsg",
                          "componentList", "batchList"]
    assert data["studyInput"] == data["jsonData"] == '{"b":2,"a":[1]}'
    assert data["componentList"][0]["componentInput"] == '{"k":"v"}'
    assert list(data["batchList"][0]) == ["uuid", "title", "active", "maxActiveMembers", "maxTotalMembers",
                                          "maxTotalWorkers", "allowedWorkerTypes", "comments", "batchInput",
                                          "jsonData"]
    assert archive.read("rich_study/img/ü.png") == ASSETS["img/ü.png"]


def test_export_then_import_elsewhere_gives_the_same_study(lab: Lab, client: webtest.TestApp, tmp_path) -> None:
    """import → export → import on a fresh server: identical properties, components, batches and assets."""
    study = rich_study(lab)
    body = client.get(f"/jatos/api/v1/studies/{study['id']}", headers=AUTH).body
    config = jatos_lite.Config(studies=tmp_path / "other_studies", data=tmp_path / "other_data",
                               api_token=lab.client.app.config["jatos_lite.config"].api_token)
    other = webtest.TestApp(jatos_lite.create_app(config))
    other_id = Lab(other).import_study(body)["data"]["id"]
    assert properties(other, other_id) == properties(client, study["id"])
    for path, content in ASSETS.items():
        stored = (config.studies / "rich_study" / path).read_bytes()
        assert stored == (content.encode() if isinstance(content, str) else content)


def test_export_reimports_over_itself(lab: Lab, client: webtest.TestApp) -> None:
    """Re-importing an export into the same server overwrites the study in place (same UUIDs)."""
    study = rich_study(lab)
    before = properties(client, study["id"])
    body = client.get(f"/jatos/api/v1/studies/{study['id']}", headers=AUTH).body
    again = lab.import_study(body, status=200, keepProperties=False, keepAssets=False)
    assert again["data"]["id"] == study["id"]
    assert properties(client, study["id"]) == before


def test_empty_asset_folders_survive(lab: Lab, client: webtest.TestApp) -> None:
    """Folders are written as entries of their own, so an empty one is not lost."""
    study = lab.study(dir_name="with_empty")
    (lab.client.app.config["jatos_lite.config"].studies / "with_empty" / "later").mkdir()
    names = exported(client, study["id"]).namelist()
    assert "with_empty/" in names and "with_empty/later/" in names


def test_export_needs_a_token_and_an_existing_study(client: webtest.TestApp) -> None:
    """401 without a token; 404 with a message for an unknown study."""
    client.get("/jatos/api/v1/studies/1", status=401)
    assert "doesn't exist" in client.get("/jatos/api/v1/studies/999", headers=AUTH, status=404).json["error"]["message"]
