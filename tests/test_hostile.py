"""Hostile input (issue "Measured" §3-§4): malformed bodies, escaping paths, unknown runs,
wrong states, bad tokens. Every such request gets a 4xx with a message, never a 5xx, and
nothing stored changes (but JATOS's quota flag); the server keeps serving.

As in JATOS, a study result's UUID (122 random bits) is the participant's key to the run:
whoever knows it may write to it (publix-http.md §4.6), so the attacks use UUIDs that
were never handed out."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import socket
import threading
import time
import zipfile
from dataclasses import dataclass

import pytest
import webtest

import jatos_lite
from conftest import API_TOKEN, AUTH, Lab, free_port, make_jzip

VOLATILE = ("last_seen_date", "last_seen", "quota_reached")  # JATOS flags a refused oversized write
TABLES = ("studies", "components", "batches", "workers", "study_links", "study_results", "component_results",
          "api_tokens", "group_results", "channel_conns")


@dataclass
class Scene:
    """Two studies; a participant in the middle of a run of the first."""

    lab: Lab
    client: webtest.TestApp
    browser: webtest.TestApp
    sr: str
    comp: str
    study_dir: str

    def fingerprint(self) -> str:
        """A digest of every stored row and result file (last-seen times aside)."""
        config = self.client.app.config["jatos_lite.config"]
        digest = hashlib.sha256()
        with self.client.app.config["jatos_lite.store"].snapshot() as db:
            for table in TABLES:
                for row in db.all(f"SELECT * FROM {table} ORDER BY 1"):
                    digest.update(repr({k: row[k] for k in row.keys() if k not in VOLATILE}).encode())
        for path in sorted(config.uploads.rglob("*")):
            digest.update(str(path.relative_to(config.uploads)).encode())
            if path.is_file():
                digest.update(path.read_bytes())
        return digest.hexdigest()


def start(lab: Lab, study_id: int) -> tuple[webtest.TestApp, str, str]:
    browser = webtest.TestApp(lab.client.app)
    page = browser.get(f"/publix/{lab.code(study_id, 'gm')}", status=303).follow()
    _, _, sr, comp, _ = page.request.path.split("/")
    return browser, sr, comp


@pytest.fixture
def scene(lab: Lab, client: webtest.TestApp) -> Scene:
    study = lab.study(dir_name="mine", files={"c1.html": "<p>1</p>"})
    lab.study(dir_name="theirs", files={"secret.txt": SECRET})
    browser, sr, comp = start(lab, study["id"])
    browser.put(f"/publix/{sr}/{comp}/resultData", "kept", headers={"Content-Type": "text/plain"})
    browser.post(f"/publix/{sr}/{comp}/files/kept.txt", upload_files=[("file", "kept.txt", b"kept")])
    return Scene(lab, client, browser, sr, comp, "mine")


SECRET = "TOP-SECRET-OF-ANOTHER-STUDY"
NEVER_HANDED_OUT = "3f0c1d2e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"


def zip_with(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def valid_jas() -> bytes:
    return zipfile.ZipFile(io.BytesIO(make_jzip(dir_name="evil"))).read("study.jas")


# (name, method, path template, body, content type, extra headers). {sr}, {comp}, {unknown} are filled in.
PARTICIPANT_ATTACKS = [
    ("invalid UTF-8 result data", "PUT", "/publix/{sr}/{comp}/resultData", b"\xff\xfe\xfa", "text/plain", {}),
    ("oversized result data", "PUT", "/publix/{sr}/{comp}/resultData", b"x" * 5_000_001, "text/plain", {}),
    ("oversized append", "POST", "/publix/{sr}/{comp}/resultData", b"x" * 5_000_001, "text/plain", {}),
    ("an unknown run's data", "PUT", "/publix/{unknown}/{comp}/resultData", b"stolen", "text/plain", {}),
    ("malformed run UUID", "PUT", "/publix/not-a-uuid/{comp}/resultData", b"x", "text/plain", {}),
    ("unknown component", "PUT", "/publix/{sr}/00000000-0000-0000-0000-000000000000/resultData", b"x",
     "text/plain", {}),
    ("malformed request id", "POST", "/publix/{sr}/{comp}/resultData", b"x", "text/plain",
     {"X-Request-Id": "x" * 300}),
    ("an unknown run's session", "POST", "/publix/{unknown}/studySessionData", b"{}", "text/plain", {}),
    ("an unknown run's heartbeat", "POST", "/publix/{unknown}/heartbeat", b"", "text/plain", {}),
    ("an unknown run's log", "POST", "/publix/{unknown}/{comp}/log", b"x", "text/plain", {}),
    ("upload without a file", "POST", "/publix/{sr}/{comp}/files/a.txt", b"nothing", "text/plain", {}),
    ("channel poll of an unknown run", "GET", "/publix/{unknown}/channels/poll?c=abc:0", None, None, {}),
    ("malformed poll", "GET", "/publix/{sr}/channels/poll?c=%00:x", None, None, {}),
    ("send to an unknown channel", "POST", "/publix/{sr}/channels/nope/send", b'{"cseq":1,"frames":[]}',
     "application/json", {}),
    ("malformed send", "POST", "/publix/{sr}/channels/nope/send", b"{", "application/json", {}),
    ("batch channel of an unknown run", "POST", "/publix/{unknown}/batch/open", b"{}", "application/json", {}),
    ("group join of a non-group study", "POST", "/publix/{sr}/group/join", b"{}", "application/json", {}),
    ("an unknown run's end", "GET", "/publix/{unknown}/end", None, None, {}),
    ("an unknown run's abort", "GET", "/publix/{unknown}/abort", None, None, {}),
]

ESCAPING_NAMES = ["../x.txt", "..%2Fx.txt", "%2e%2e/x.txt", "a/../../x.txt", "/etc/passwd", "..\\x.txt",
                  "x\x00.txt", "con.txt", "a:b.txt", "*.txt", "x" * 300 + ".txt"]

ESCAPING_READS = ["/publix/{sr}/{comp}/../../../data/jatos.sqlite", "/publix/{sr}/{comp}/..%2F..%2Ftheirs%2Fsecret.txt",
                  "/publix/{sr}/final/..%2Ftheirs%2Fsecret.txt", "/study_assets/theirs/secret.txt",
                  "/study_assets/mine/..%2Ftheirs%2Fsecret.txt", "/study_assets/..%2Fdata%2Fjatos.sqlite",
                  "/study_assets_root/%2e%2e/data/jatos.sqlite", "/publix/{sr}/files/..%2F..%2Fjatos.sqlite",
                  "/publix/{unknown}/files/kept.txt", "/jatos/api/v1/results/files/..%2Fjatos.sqlite"]


def fill(scene: Scene, template: str) -> str:
    return template.format(sr=scene.sr, comp=scene.comp, unknown=NEVER_HANDED_OUT)


def assert_refused(response: webtest.TestResponse) -> None:
    assert 400 <= response.status_int < 500, response.status
    assert response.body.strip(), "a refusal says why"


@pytest.mark.parametrize("name, method, path, body, content_type, headers", PARTICIPANT_ATTACKS,
                         ids=[a[0] for a in PARTICIPANT_ATTACKS])
def test_participant_attacks_are_refused_and_change_nothing(scene: Scene, name, method, path, body, content_type,
                                                           headers) -> None:
    before = scene.fingerprint()
    extra = {**headers, **({"Content-Type": content_type} if content_type else {})}
    response = scene.browser.request(fill(scene, path), method=method, body=body or b"", headers=extra,
                                     expect_errors=True)
    assert_refused(response)
    assert scene.fingerprint() == before


@pytest.mark.parametrize("filename", ESCAPING_NAMES)
def test_upload_names_that_escape_or_are_not_portable_are_refused(scene: Scene, filename: str) -> None:
    before = scene.fingerprint()
    response = scene.browser.post(f"/publix/{scene.sr}/{scene.comp}/files/{filename}",
                                  upload_files=[("file", "x.txt", b"evil")], expect_errors=True)
    assert_refused(response)
    assert scene.fingerprint() == before


@pytest.mark.parametrize("path", ESCAPING_READS)
def test_reads_outside_ones_own_folder_are_refused(scene: Scene, path: str) -> None:
    response = scene.browser.get(fill(scene, path), expect_errors=True)
    assert_refused(response)
    assert SECRET.encode() not in response.body and b"SQLite format" not in response.body


def test_end_page_assets_stay_in_the_study_folder(scene: Scene) -> None:
    """After the end, /final/ serves the study's end page without the ID cookie, but nothing beside it."""
    scene.browser.get(f"/publix/{scene.sr}/end", status=303)
    for path in ("..%2Ftheirs%2Fsecret.txt", "..%2F..%2Fdata%2Fjatos.sqlite"):
        response = scene.browser.get(f"/publix/{scene.sr}/final/{path}", expect_errors=True)
        assert_refused(response)
        assert SECRET.encode() not in response.body


def test_a_finished_run_cannot_write(scene: Scene) -> None:
    """Result data, logs and uploads after the end are refused (wrong state) and store nothing
    (JATOS still takes a General Multiple run's study session then: §9.4)."""
    scene.browser.get(f"/publix/{scene.sr}/end", status=303)
    before = scene.fingerprint()
    for method, path in (("PUT", "/{comp}/resultData"), ("POST", "/{comp}/resultData"), ("POST", "/{comp}/log"),
                         ("POST", "/{comp}/files/late.txt")):
        assert_refused(scene.browser.request(f"/publix/{scene.sr}" + fill(scene, path), method=method, body=b"late",
                                             headers={"Content-Type": "text/plain"}, expect_errors=True))
    assert scene.fingerprint() == before


ARCHIVES = {
    "not a zip": b"PK\x03\x04 this is not a zip",
    "zip slip": zip_with({"study.jas": valid_jas(), "evil/../../escaped.txt": b"x"}),
    "two folders": zip_with({"study.jas": valid_jas(), "evil/a.txt": b"x", "other/b.txt": b"x"}),
    "no description": zip_with({"evil/a.txt": b"x"}),
    "bad JSON": zip_with({"study.jas": b"{nope", "evil/a.txt": b"x"}),
    "reserved folder name": zip_with({"study.jas": valid_jas().replace(b'"evil"', b'"publix"'), "publix/a": b"x"}),
}


@pytest.mark.parametrize("name", ARCHIVES)
def test_malformed_archives_are_refused_and_change_nothing(scene: Scene, name: str) -> None:
    before = scene.fingerprint()
    studies = scene.client.app.config["jatos_lite.config"].studies
    folders = sorted(p.name for p in studies.iterdir())
    scene.lab.import_study(ARCHIVES[name], status="4*")
    assert scene.fingerprint() == before
    assert sorted(p.name for p in studies.iterdir()) == folders
    assert not (studies.parent / "escaped.txt").exists()


def test_a_zip_bomb_is_refused_before_unpacking(tmp_path) -> None:
    """An archive that would unpack beyond the limit is refused from its directory alone."""
    import jatos_lite

    config = jatos_lite.Config(studies=tmp_path / "studies", data=tmp_path / "data", api_token=API_TOKEN,
                               max_archive=1_000_000)
    client = webtest.TestApp(jatos_lite.create_app(config))
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("study.jas", valid_jas())
        archive.writestr("evil/zeros.bin", b"\0" * 20_000_000)
    assert len(bomb.getvalue()) < 100_000
    Lab(client).import_study(bomb.getvalue(), status=413)
    assert not (config.studies / "evil").exists()
    assert not any(config.tmp.rglob("zeros.bin"))


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer"}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic " + API_TOKEN}, {"Authorization": API_TOKEN}])
def test_api_without_a_valid_token_is_401(client: webtest.TestApp, headers: dict) -> None:
    for path in ("/jatos/api/v1/admin/token", "/jatos/api/v1/studies/properties", "/jatos/api/v1/results?studyId=1"):
        assert client.get(path, headers=headers, status=401).json["error"]["message"]


def test_a_revoked_token_stops_working(lab: Lab, client: webtest.TestApp) -> None:
    import jatos_lite

    store = client.app.config["jatos_lite.store"]
    with store.tx() as db:
        token_id, token = jatos_lite.mint_api_token(db, "short lived")
    bearer = {"Authorization": f"Bearer {token}"}
    client.get("/jatos/api/v1/admin/token", headers=bearer, status=200)
    with store.tx() as db:
        db.run("UPDATE api_tokens SET active = 0 WHERE id = ?", token_id)
    client.get("/jatos/api/v1/admin/token", headers=bearer, status=401)


def test_cookie_sessions_need_the_csrf_token_for_changes(lab: Lab, client: webtest.TestApp) -> None:
    """A signed-in browser may read; a change without X-CSRF-Token is 403 (cross-site forms can't send it)."""
    study = lab.study()
    browser = webtest.TestApp(client.app)
    lab.sign_in(browser)
    assert browser.get("/jatos/api/v1/studies/properties").json["data"]
    cookie = [c for c in browser.cookiejar if c.name == "JATOS_LITE_SESSION"][0]
    assert cookie.has_nonstandard_attr("HttpOnly") and cookie.get_nonstandard_attr("SameSite") == "Lax"
    browser.patch_json(f"/jatos/api/v1/studies/{study['id']}/properties", {"title": "x"}, status=403)
    csrf = browser.get("/jatos/api/v1/admin/session").json["data"]["csrfToken"]
    browser.patch_json(f"/jatos/api/v1/studies/{study['id']}/properties", {"title": "x"},
                       headers={"X-CSRF-Token": csrf})


def test_study_codes_are_unguessable(lab: Lab) -> None:
    """Codes are 11 characters of 62 (65 bits) and do not repeat."""
    study = lab.study()
    codes = lab.client.post_json(f"/jatos/api/v1/studies/{study['id']}/studyCodes", {"type": "ps", "amount": 500},
                                 headers=AUTH).json["data"]
    assert len(set(codes)) == 500 and all(len(code) == 11 and code.isalnum() for code in codes)
    assert len({code[0] for code in codes}) > 40, "codes look random, not sequential"


def test_unknown_routes_are_4xx_with_a_message(client: webtest.TestApp) -> None:
    for path in ("/nope", "/publix", "/jatos/api/v1/nope", "/publix/a/b/c/d/e/f"):
        assert_refused(client.get(path, expect_errors=True))


def test_the_server_still_serves_after_everything(scene: Scene) -> None:
    for name, method, path, body, content_type, headers in PARTICIPANT_ATTACKS:
        scene.browser.request(fill(scene, path), method=method, body=body or b"",
                              headers={**headers, **({"Content-Type": content_type} if content_type else {})},
                              expect_errors=True)
    scene.browser.post(f"/publix/{scene.sr}/{scene.comp}/resultData", " and more",
                       headers={"Content-Type": "text/plain"})
    text = scene.client.get("/jatos/api/v1/results/data?studyResultId=1&asPlainText=true", headers=AUTH).body
    assert text == b"kept and more\n"
    assert json.loads(scene.client.get("/jatos/api/v1/admin/token", headers=AUTH).body)["data"]


def test_a_header_that_is_not_utf8_is_400(scene) -> None:
    """Bottle decodes header values as UTF-8 when they are read; bytes that are not must not crash a request."""
    response = scene.client.post(f"/publix/{scene.sr}/{scene.comp}/resultData", b"x",
                                 headers={"Content-Type": "text/plain", "X-Request-Id": "caf\xe9"}, status=400)
    assert "UTF-8" in response.text


# --- Robust parsing (issue #16, point 6) --------------------------------------------------------------

DEEP = "[" * 200_000


@pytest.mark.parametrize("path", [
    "/jatos/api/v1/studies/%C2%B2/properties", "/jatos/api/v1/studies/99999999999999999999999/properties",
    "/jatos/api/v1/batches/%C2%B2/session", "/jatos/api/v1/results?studyId=%C2%B2",
    "/jatos/api/v1/results?studyResultId=99999999999999999999999",
    "/jatos/api/v1/results/files/a.txt?componentResultId=%C2%B2",
    "/jatos/api/v1/results/files/a.txt?componentResultId=99999999999999999999999",
    "/jatos/api/v1/tokens/99999999999999999999999"])
def test_ids_with_other_digits_or_too_many_are_not_found_not_a_500(client: webtest.TestApp, path: str) -> None:
    """Refused, or (a results selector in the query) ignored like any other word."""
    assert client.get(path, headers=AUTH, expect_errors=True).status_int < 500


@pytest.mark.parametrize("query", ["?batchId=%C2%B2&generalMultiple", "?batchId=99999999999999999999999&generalMultiple"])
def test_an_old_link_with_odd_digits_is_refused_not_a_500(lab: Lab, query: str) -> None:
    """Unauthenticated: anyone on the network can ask."""
    study = lab.study()
    assert_refused(lab.client.get(f"/publix/{study['id']}/start{query}", expect_errors=True))
    assert_refused(lab.client.get(f"/publix/99999999999999999999999/start{query}", expect_errors=True))


def test_deeply_nested_result_data_leaves_the_merged_csv_working(scene: Scene) -> None:
    """Such data is not a table: the export still answers, with the other runs' rows."""
    scene.browser.put(f"/publix/{scene.sr}/{scene.comp}/resultData", DEEP, headers={"Content-Type": "text/plain"})
    browser, sr, comp = start(scene.lab, scene.lab.client.get("/jatos/api/v1/studies/properties", headers=AUTH)
                              .json["data"][0]["id"])
    browser.put(f"/publix/{sr}/{comp}/resultData", '[{"rt": 412}]', headers={"Content-Type": "text/plain"})
    text = scene.client.get("/jatos/api/v1/results/data?studyId=1&format=csv", headers=AUTH).text
    assert text.splitlines()[0].endswith(",rt") and text.splitlines()[1].endswith(",412")


@pytest.mark.parametrize("what", ["open", "send"])
def test_deeply_nested_json_from_a_participant_is_400(scene: Scene, what: str) -> None:
    before = scene.fingerprint()
    path = {"open": "batch/open", "send": "channels/nope/send"}[what]
    response = scene.browser.post(f"/publix/{scene.sr}/{path}", DEEP, headers={"Content-Type": "application/json"},
                                  expect_errors=True)
    assert_refused(response)
    assert scene.fingerprint() == before


@pytest.mark.parametrize("body", ['{"data": ' + "[" * 100_000 + "}", DEEP], ids=["in an object", "bare"])
def test_deeply_nested_api_bodies_are_400(lab: Lab, body: str) -> None:
    lab.study()
    for method, path in (("PATCH", "/jatos/api/v1/batches/1/session"),
                         ("POST", "/jatos/api/v1/studies/1/studyCodes"),
                         ("PATCH", "/jatos/api/v1/studies/1/properties")):
        assert_refused(lab.client.request(path, method=method, body=body.encode(),
                                          headers={**AUTH, "Content-Type": "application/json"}, expect_errors=True))


@pytest.mark.parametrize("expires_after", [10 ** 30, 2 ** 63, 101 * 365 * 86400])
def test_a_token_lifetime_beyond_reason_is_400(client: webtest.TestApp, expires_after: int) -> None:
    client.post_json("/jatos/api/v1/users/1/tokens", {"name": "x", "expiresAfter": expires_after},
                     headers=AUTH, status=400)
    assert client.get("/jatos/api/v1/users/1/tokens", headers=AUTH).json["data"] == []


@pytest.mark.parametrize("comment", [{"a": 1}, ["x"], 5, True])
def test_a_study_code_comment_that_is_not_text_is_400(lab: Lab, comment: object) -> None:
    study = lab.study()
    before = len(lab.client.get(f"/jatos/api/v1/studies/{study['id']}/studyLinks", headers=AUTH).json["data"])
    lab.client.post_json(f"/jatos/api/v1/studies/{study['id']}/studyCodes", {"type": "ps", "comment": comment},
                         headers=AUTH, status=400)
    assert len(lab.client.get(f"/jatos/api/v1/studies/{study['id']}/studyLinks", headers=AUTH).json["data"]) == before


def test_an_archive_whose_file_and_folder_names_clash_is_400(scene: Scene) -> None:
    before = scene.fingerprint()
    studies = scene.client.app.config["jatos_lite.config"].studies
    folders = sorted(p.name for p in studies.iterdir())
    archive = zip_with({"study.jas": valid_jas(), "evil/a/b": b"file", "evil/a/b/c": b"file in a folder"})
    assert scene.lab.import_study(archive, status=400)["error"]["message"]
    assert scene.fingerprint() == before
    assert sorted(p.name for p in studies.iterdir()) == folders


# --- Issue #16 points 4 and 8: a participant filling the laptop's disk or taking the poll slots ---------

def lab_with(tmp_path, **limits: object) -> Lab:
    """A lab on its own server with the given Config limits."""
    config = jatos_lite.Config(studies=tmp_path / "studies", data=tmp_path / "data", api_token=API_TOKEN, **limits)
    return Lab(webtest.TestApp(jatos_lite.create_app(config)))


def raw_request(port: int, head: bytes, body: bytes, timeout: float = 5.0) -> bytes:
    """Send `head` and as much of `body` as the server takes; what it answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):
            for start in range(0, len(body), 1 << 16):
                sock.sendall(body[start:start + (1 << 16)])
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        return answer


def test_a_huge_body_is_refused_before_waitress_buffers_it_but_an_archive_import_may_be_large(tmp_path) -> None:
    """The server as `serve` builds it (waitress's one limit at the archive size): a body announced at
    300 MB to a publix URL is answered 413 after its first megabyte; a study archive import may
    still be larger than every other body, but only for a caller with a valid token: without one
    (or with a made-up token or session cookie) it is refused before the body is read."""
    config = jatos_lite.Config(studies=tmp_path / "studies", data=tmp_path / "data", threads=4)
    app = jatos_lite.create_app(config)
    port = free_port()
    server = jatos_lite.guarded_server(app, config, host="127.0.0.1", port=port, threads=config.threads,
                                       max_request_body_size=config.max_archive, **jatos_lite.WAITRESS_OPTIONS)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        started = time.monotonic()
        answer = raw_request(port, f"POST /publix/{NEVER_HANDED_OUT}/heartbeat HTTP/1.1\r\nHost: lab\r\n"
                                   "Content-Length: 300000000\r\n\r\n".encode(), b"x" * 1_000_000, timeout=3)
        assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 3
        import_request = ("POST /jatos/api/v1/studies HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n{}"
                          "Content-Type: application/zip\r\nContent-Length: 40000000\r\n\r\n")
        for credentials in ("", "Authorization: Bearer jap_made_up\r\n", "Cookie: JATOS_LITE_SESSION=guess\r\n"):
            started = time.monotonic()
            refused = raw_request(port, import_request.format(credentials).encode(), b"x" * 1_000_000, timeout=3)
            assert refused.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 3, (credentials, refused[:200])
        with app.config["jatos_lite.store"].tx() as db:
            token = f"Authorization: Bearer {jatos_lite.mint_api_token(db, 'importer')[1]}\r\n"
        archive = raw_request(port, import_request.format(token).encode(), b"x" * 40_000_000)
        assert archive.startswith(b"HTTP/1.1 400"), archive[:200]  # read to the end, then found not to be a .jzip
    finally:
        server.close()
        app.config["jatos_lite.hub"].stop()


def test_a_start_with_a_huge_query_string_is_refused_and_stores_nothing(scene: Scene) -> None:
    study_id = scene.client.get("/jatos/api/v1/studies/properties", headers=AUTH).json["data"][0]["id"]
    code = scene.lab.code(study_id, "gm")
    before = scene.fingerprint()
    response = webtest.TestApp(scene.client.app).get(f"/publix/{code}?junk={'x' * 20_000}", expect_errors=True)
    assert response.status_int == 400 and b"query string" in response.body
    assert scene.fingerprint() == before


def open_batch_channel(browser: webtest.TestApp, sr: str) -> dict:
    return browser.post_json(f"/publix/{sr}/batch/open", {"openId": "o" + sr[:8]}).json


def test_a_batch_session_beyond_its_limit_is_refused_with_a_message(lab: Lab) -> None:
    study = lab.study(dir_name="sessions")
    browser, sr, _ = start(lab, study["id"])
    opened = open_batch_channel(browser, sr)
    conn, cursor = opened["conn"], opened["cursor"]
    frame = {"action": "SESSION", "id": 1, "version": 1, "patches": [{"op": "add", "path": "/big",
                                                                      "value": "x" * 1_200_000}]}
    browser.post_json(f"/publix/{sr}/channels/{conn}/send", {"cseq": 1, "frames": [frame]})
    events = browser.get(f"/publix/{sr}/channels/poll?c={conn}:{cursor}&wait=0").json[conn]["events"]
    messages = [event["msg"] for event in events]
    assert [m["action"] for m in messages] == ["ERROR", "SESSION_FAIL"]
    assert "larger than 1.0 MB" in messages[0]["errorMsg"] and messages[1]["version"] == 1
    batch_id = study["batches"][0]["id"]
    assert lab.client.get(f"/jatos/api/v1/batches/{batch_id}/session", headers=AUTH).json["data"] == \
        {"version": 1, "sessionData": {}}
    refused = lab.client.patch_json(f"/jatos/api/v1/batches/{batch_id}/session", {"big": "x" * 1_200_000},
                                    headers=AUTH, expect_errors=True)
    assert refused.status_int == 413 and "larger than" in refused.json["error"]["message"]


def test_general_multiple_runs_share_an_upload_quota_per_batch(tmp_path) -> None:
    lab = lab_with(tmp_path, max_uploads_per_batch=100_000)
    study = lab.study(dir_name="uploads")
    answers = []
    for _ in range(3):
        browser, sr, comp = start(lab, study["id"])
        answers.append(browser.post(f"/publix/{sr}/{comp}/files/f.bin", upload_files=[("file", "f.bin", b"x" * 40_000)],
                                    expect_errors=True))
    assert [a.status_int for a in answers] == [200, 200, 413]
    assert b"limit of this batch" in answers[2].body


def test_writes_are_refused_while_the_disk_is_nearly_full_and_the_admin_page_is_told(tmp_path) -> None:
    lab = lab_with(tmp_path, min_free_disk=10 ** 18)
    study = lab.study(dir_name="full")
    code = lab.code(study["id"], "gm")
    assert webtest.TestApp(lab.client.app).get(f"/publix/{code}", expect_errors=True).status_int == 507
    lab.sign_in()
    answer = lab.client.get("/jatos/api/v1/admin/session").json["data"]
    assert answer["freeDiskBytes"] > 0 and "free" in answer["diskWarning"]


def test_writes_are_refused_with_507_in_a_running_run_when_the_disk_fills(tmp_path) -> None:
    config = jatos_lite.Config(studies=tmp_path / "studies", data=tmp_path / "data", api_token=API_TOKEN)
    app = jatos_lite.create_app(config)
    lab = Lab(webtest.TestApp(app))
    study = lab.study(dir_name="filling")
    browser, sr, comp = start(lab, study["id"])
    app.config["jatos_lite.free_space"].floor = 10 ** 18
    for response in (browser.put(f"/publix/{sr}/{comp}/resultData", "x", headers={"Content-Type": "text/plain"},
                                 expect_errors=True),
                     browser.post(f"/publix/{sr}/{comp}/files/a.txt", upload_files=[("file", "a.txt", b"a")],
                                  expect_errors=True),
                     browser.post(f"/publix/{sr}/studySessionData", "{}", expect_errors=True)):
        assert response.status_int == 507 and b"disk is full" in response.body
    assert not list(config.uploads.rglob("a.txt"))


def test_polls_with_made_up_page_keys_or_conns_cannot_push_out_another_pages_poll(tmp_path) -> None:
    """16 polls of one run, each with its own page= and no browser cookie, and 16 polls naming conns
    that do not exist: the other participant's held poll stays held (no retryAfter)."""
    lab = lab_with(tmp_path, threads=20)  # the hub holds 16 polls
    study = lab.study(dir_name="polls")
    victim, victim_sr, _ = start(lab, study["id"])
    victim_conn = open_batch_channel(victim, victim_sr)
    attacker, attacker_sr, _ = start(lab, study["id"])
    attacker_conn = open_batch_channel(attacker, attacker_sr)
    answers: dict[str, webtest.TestResponse] = {}

    def poll(name: str, app: webtest.TestApp, path: str) -> None:
        answers[name] = app.get(path, expect_errors=True)

    victim_path = f"/publix/{victim_sr}/channels/poll?c={victim_conn['conn']}:{victim_conn['cursor']}&page=v&wait=3"
    threads = [threading.Thread(target=poll, args=("victim", victim, victim_path))]
    threads[0].start()
    time.sleep(0.3)
    for i in range(16):
        cookieless = webtest.TestApp(lab.client.app)
        path = f"/publix/{attacker_sr}/channels/poll?c={attacker_conn['conn']}:{attacker_conn['cursor']}&page=p{i}&wait=1"
        threads.append(threading.Thread(target=poll, args=(f"a{i}", cookieless, path)))
        made_up = f"/publix/{attacker_sr}/channels/poll?c=nosuchconn{i}:0&page=q{i}&wait=1"
        threads.append(threading.Thread(target=poll, args=(f"b{i}", cookieless, made_up)))
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(answers[f"b{i}"].status_int >= 400 for i in range(16))
    assert answers["victim"].status_int == 200 and "retryAfter" not in answers["victim"].json
