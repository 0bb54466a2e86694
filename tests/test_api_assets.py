"""Study assets over the JATOS API (formats-and-api.md §3.6): structure, download, upload,
delete, every path confined to the study's folder."""

from __future__ import annotations

import zlib

import pytest
import webtest

from conftest import AUTH, Lab

BASE = "/jatos/api/v1/studies"


@pytest.fixture
def study(lab: Lab) -> dict:
    return lab.study(dir_name="assets_study", files={"img/cat.png": b"meow", "c1.html": "<p>1</p>"})


def upload(client: webtest.TestApp, path: str, name: str, content: bytes, status: int) -> dict:
    return client.post(path, upload_files=[("studyAssetsFile", name, content)], headers=AUTH, status=status).json


def test_the_structure_as_a_tree_and_flat(client: webtest.TestApp, study: dict) -> None:
    tree = client.get(f"{BASE}/{study['id']}/assets/structure", headers=AUTH).json["data"]
    assert tree["type"] == "directory"
    img = next(node for node in tree["content"] if node["name"] == "img")
    assert img["content"][0]["path"] == "img/cat.png" and img["content"][0]["checksum"] == zlib.adler32(b"meow")
    flat = client.get(f"{BASE}/{study['id']}/assets/structure?flatten=true", headers=AUTH).json["data"]
    assert {node["path"] for node in flat} >= {"img/cat.png", "c1.html"}
    assert all(node["type"] == "file" for node in flat)


def test_download_upload_overwrite_and_delete(client: webtest.TestApp, study: dict) -> None:
    assets = f"{BASE}/{study['id']}/assets"
    assert client.get(f"{assets}/img/cat.png", headers=AUTH).body == b"meow"
    assert client.get(f"{assets}/img%2Fcat.png", headers=AUTH).body == b"meow", "slashes may be encoded"
    assert upload(client, assets, "top.txt", b"top", 201)["message"] == "File uploaded successfully"
    upload(client, f"{assets}/new/dir/", "inner.txt", b"inner", 201)
    assert upload(client, f"{assets}/img/cat.png", "whatever.png", b"purr", 200)["message"] == \
        "File overwritten successfully"
    for path, content in (("top.txt", b"top"), ("new/dir/inner.txt", b"inner"), ("img/cat.png", b"purr")):
        assert client.get(f"{assets}/{path}", headers=AUTH).body == content
    assert upload(client, f"{assets}/img", "x.png", b"x", 400)["error"]["code"] == "FILE_ALREADY_EXISTS"
    assert client.delete(f"{assets}/top.txt", headers=AUTH).json["message"] == "File deleted successfully"
    client.get(f"{assets}/top.txt", headers=AUTH, status=404)
    client.delete(f"{assets}/img", headers=AUTH, status=404)


@pytest.mark.parametrize("path", ["..%2F..%2Fdata%2Fjatos.sqlite", "img/..%2F..%2F..%2Fsecret", "%2Fetc%2Fpasswd"])
def test_paths_outside_the_study_folder_are_refused(client: webtest.TestApp, study: dict, path: str) -> None:
    client.get(f"{BASE}/{study['id']}/assets/{path}", headers=AUTH, status=400)
    upload(client, f"{BASE}/{study['id']}/assets/{path}", "x", b"x", 400)
    client.delete(f"{BASE}/{study['id']}/assets/{path}", headers=AUTH, status=400)


def test_assets_need_a_token(client: webtest.TestApp, study: dict) -> None:
    client.get(f"{BASE}/{study['id']}/assets/structure", status=401)
    client.get(f"{BASE}/{study['id']}/assets/img/cat.png", status=401)
