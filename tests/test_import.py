"""Study archive import as JATOS 3.10 does it (formats-and-api.md §1.1-§1.7): every version-3
variant, legacy and OSWeb files, several batches, Windows paths, non-ASCII names, re-import
with JATOS's flags, folder-name conflicts."""

from __future__ import annotations

import io
import json
import uuid
import zipfile

import pytest

import jatos_lite
from conftest import AUTH, Lab, make_jzip


def archive(jas: dict | str, entries: dict[str, bytes | str] | None = None, jas_name: str = "study.jas") -> bytes:
    """A ZIP with a .jas (a dict is written as JSON) and the given entries, names taken as they are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr(jas_name, jas if isinstance(jas, str) else json.dumps(jas))
        for name, content in (entries or {}).items():
            zipped.writestr(name, content)
    return buffer.getvalue()


def study_data(**keys: object) -> dict:
    """The `data` of a version-3 .jas with one component, as JATOS 3.10.1+ writes it."""
    return {"uuid": str(uuid.uuid4()), "title": "Imported", "description": None, "groupStudy": False,
            "linearStudy": False, "allowPreview": False, "dirName": "imported", "comments": None,
            "studyInput": None, "endRedirectUrl": None, "studyEntryMsg": None,
            "componentList": [{"uuid": str(uuid.uuid4()), "title": "Only", "htmlFilePath": "index.html",
                               "reloadable": False, "active": True, "comments": None, "componentInput": None}],
            "batchList": [{"uuid": str(uuid.uuid4()), "title": "Default", "active": True, "maxActiveMembers": None,
                           "maxTotalMembers": None, "maxTotalWorkers": None,
                           "allowedWorkerTypes": ["GeneralMultiple"], "comments": None, "batchInput": None}],
            **keys}


def imported(lab: Lab, body: bytes, status: int | str = 201, **flags: object) -> dict:
    """Import and return the study's properties with components and batches."""
    study_id = lab.import_study(body, status=status, **flags)["data"]["id"]
    return lab.client.get(f"/jatos/api/v1/studies/{study_id}/properties?withComponentProperties=true"
                          "&withBatchProperties=true", headers=AUTH).json["data"]


@pytest.fixture
def asset(config: jatos_lite.Config):
    """A file of a study's assets folder, or None if it is not there."""
    def read(study: dict, path: str) -> bytes | None:
        file = config.studies / study["dirName"] / path
        return file.read_bytes() if file.is_file() else None
    return read


@pytest.mark.parametrize("names", [("studyInput", "componentInput", "batchInput"), ("jsonData",) * 3],
                         ids=["3.10.1 names", "jsonData"])
def test_both_names_of_the_inputs_are_read(lab: Lab, names: tuple[str, str, str]) -> None:
    data = study_data()
    for key in ("studyInput", "componentInput", "batchInput"):
        for holder in (data, data["componentList"][0], data["batchList"][0]):
            holder.pop(key, None)
    data[names[0]] = '{"s": 1}'
    data["componentList"][0][names[1]] = '{"c": 2}'
    data["batchList"][0][names[2]] = '{"b": 3}'
    study = imported(lab, archive({"version": "3", "data": data}, {"imported/index.html": "<p>x</p>"}))
    assert study["studyInput"] == {"s": 1}
    assert study["components"][0]["componentInput"] == {"c": 2}
    assert study["batches"][0]["batchInput"] == {"b": 3}


@pytest.mark.parametrize("version", ["3", 3])
def test_version_3_as_string_or_number(lab: Lab, version: object) -> None:
    assert imported(lab, archive({"version": version, "data": study_data()}))["title"] == "Imported"


@pytest.mark.parametrize("version", [0, 2, "2"])
def test_a_jatos_1_archive_gets_a_default_batch(lab: Lab, version: object) -> None:
    legacy = {"uuid": str(uuid.uuid4()), "title": "Old", "description": None, "dirName": "old", "comments": None,
              "jsonData": '{"legacy": true}', "allowedWorkerList": ["MT"],
              "componentList": [{"uuid": str(uuid.uuid4()), "title": "C", "htmlFilePath": "c.html",
                                 "reloadable": True, "active": True, "jsonData": None}]}
    study = imported(lab, archive({"version": version, "data": legacy}, {"old/c.html": "<p>c</p>"}))
    assert study["studyInput"] == {"legacy": True}
    assert [b["title"] for b in study["batches"]] == ["Default"]


@pytest.mark.parametrize("version", [1, 4, "four", None])
def test_other_versions_are_refused(lab: Lab, version: object) -> None:
    jas = {"data": study_data()} if version is None else {"version": version, "data": study_data()}
    lab.import_study(archive(jas), status=400)
    assert lab.client.get("/jatos/api/v1/studies/properties", headers=AUTH).json["data"] == []


def test_an_osweb_archive_without_uuids_or_batches(lab: Lab) -> None:
    data = study_data()
    del data["uuid"], data["batchList"], data["componentList"][0]["uuid"]
    study = imported(lab, archive({"version": 3, "data": data}, {"imported/index.html": "<p>osweb</p>"}))
    assert uuid.UUID(study["uuid"]) and uuid.UUID(study["components"][0]["uuid"])
    assert [b["title"] for b in study["batches"]] == ["Default"]


def test_every_batch_of_the_archive_is_created(lab: Lab) -> None:
    data = study_data()
    data["batchList"] = [{**data["batchList"][0], "uuid": str(uuid.uuid4()), "title": f"Wave {n}",
                          "maxTotalWorkers": n} for n in (1, 2, 3)]
    study = imported(lab, archive({"version": "3", "data": data}))
    assert [(b["title"], b["maxTotalWorkers"]) for b in study["batches"]] == \
        [("Wave 1", 1), ("Wave 2", 2), ("Wave 3", 3)]


def test_windows_backslash_paths_land_in_folders(lab: Lab, asset) -> None:
    study = imported(lab, archive({"version": "3", "data": study_data()},
                                  {"imported\\index.html": "<p>index</p>", "imported\\img\\cat.txt": "meow"}))
    assert asset(study, "img/cat.txt") == b"meow"


def test_a_non_ascii_folder_name_is_kept(lab: Lab, asset) -> None:
    study = imported(lab, archive({"version": "3", "data": study_data(dirName="études_été")},
                                  {"études_été/index.html": "<p>é</p>", "études_été/ü.txt": "ü"}))
    assert study["dirName"] == "études_été"
    assert asset(study, "ü.txt") == "ü".encode()


@pytest.mark.parametrize("names", [("imported/Stim.png", "imported/stim.png"),
                                   ("imported/Img/a.png", "imported/img/b.png")])
def test_names_that_differ_only_in_case_are_refused_and_nothing_is_stored(lab: Lab, config: jatos_lite.Config,
                                                                          names: tuple[str, str]) -> None:
    """Windows and macOS keep one file for both names: one would silently overwrite the other."""
    refused = lab.import_study(archive({"version": "3", "data": study_data()}, dict.fromkeys(names, "x")), 400)
    assert refused["error"]["code"] == "IMPORT_EXPORT_ERROR"
    assert "differ only in case" in refused["error"]["message"] and "Windows and macOS" in refused["error"]["message"]
    assert lab.client.get("/jatos/api/v1/studies/properties", headers=AUTH).json["data"] == []
    assert not (config.studies / "imported").exists()


def test_an_archive_without_a_folder_gets_an_empty_one_and_macos_leftovers_are_ignored(lab: Lab) -> None:
    study = imported(lab, archive({"version": "3", "data": study_data(dirName="bare")},
                                  {"__MACOSX/._study.jas": "junk"}))
    assert study["dirName"] == "bare"


# --- the same study again (§1.5 step 3) -----------------------------------------------------------


@pytest.fixture
def original(lab: Lab, client) -> dict:
    """A study with two components and a result on the first; returns its .jas data and properties."""
    data = study_data()
    data["componentList"].append({**data["componentList"][0], "uuid": str(uuid.uuid4()), "title": "Second",
                                  "htmlFilePath": "second.html"})
    study = imported(lab, archive({"version": "3", "data": data},
                                  {"imported/index.html": "v1", "imported/old.txt": "old"}))
    code = lab.code(study["id"], "gm")
    start = client.get(f"/publix/{code}", status=303).follow()
    client.post(start.request.path.rsplit("/", 1)[0] + "/resultData", "kept", headers={"Content-Type": "text/plain"})
    return {"data": data, "study": study}


def reimport(lab: Lab, original: dict, status: int | str = 200, files: dict | None = None, **changes: object) -> dict:
    data = {**original["data"], **changes}
    return imported(lab, archive({"version": "3", "data": data}, files or {"imported/index.html": "v2"}),
                    status=status, **{k: v for k, v in changes.items() if k.startswith(("keep", "rename"))})


def test_reimport_overwrites_properties_and_assets_and_keeps_results(lab: Lab, client, asset, original: dict) -> None:
    data = original["data"]
    again = reimport(lab, original, title="Renamed", componentList=[{**data["componentList"][1], "title": "Now first"},
                                                                    data["componentList"][0]])
    assert again["id"] == original["study"]["id"] and again["title"] == "Renamed"
    assert [(c["title"], c["active"]) for c in again["components"]] == [("Now first", True), ("Only", True)]
    assert asset(again, "index.html") == b"v2" and asset(again, "old.txt") is None
    text = client.get(f"/jatos/api/v1/results/data?studyId={again['id']}&asPlainText=true", headers=AUTH).text
    assert text.strip() == "kept"
    assert [b["id"] for b in again["batches"]] == [b["id"] for b in original["study"]["batches"]]


def test_a_component_missing_from_the_new_archive_is_kept_inactive_at_the_end(lab: Lab, original: dict) -> None:
    data = original["data"]
    again = reimport(lab, original, componentList=[data["componentList"][1]])
    assert [(c["title"], c["active"]) for c in again["components"]] == [("Second", True), ("Only", False)]


@pytest.mark.parametrize("flags, title, index, old_file", [
    ({"keepProperties": True}, "Imported", b"v2", None),
    ({"keepAssets": True}, "Changed", b"v1", b"old"),
    ({"keepProperties": True, "keepAssets": True}, "Imported", b"v1", b"old"),
])
def test_reimport_flags_keep_properties_or_assets(lab: Lab, asset, original: dict, flags: dict, title: str,
                                                   index: bytes, old_file: bytes | None) -> None:
    again = reimport(lab, original, title="Changed", **flags)
    assert again["title"] == title
    assert (asset(again, "index.html"), asset(again, "old.txt")) == (index, old_file)


def test_reimport_may_take_the_uploaded_folder_name(lab: Lab, asset, original: dict) -> None:
    kept = reimport(lab, original, dirName="moved", files={"moved/index.html": "v3"})
    assert kept["dirName"] == "imported", "keepCurrentAssetsName is true by default"
    moved = reimport(lab, original, dirName="moved", files={"moved/index.html": "v4"}, keepCurrentAssetsName=False)
    assert moved["dirName"] == "moved" and asset(moved, "index.html") == b"v4"


def test_a_taken_folder_name_becomes_name_2_then_name_3(lab: Lab) -> None:
    names = [imported(lab, make_jzip(dir_name="same"))["dirName"] for _ in range(3)]
    assert names == ["same", "same_2", "same_3"]
    lab.import_study(make_jzip(dir_name="same"), status=403, renameAssets=False)


def test_a_component_uuid_of_another_study_is_refused(lab: Lab, original: dict) -> None:
    stolen = study_data()
    stolen["componentList"] = [original["data"]["componentList"][0]]
    lab.import_study(archive({"version": "3", "data": {**stolen, "dirName": "thief"}}), status=403)
    titles = [s["title"] for s in lab.client.get("/jatos/api/v1/studies/properties", headers=AUTH).json["data"]]
    assert titles == ["Imported"]
