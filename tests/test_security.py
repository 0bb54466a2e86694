"""Cookie hijacks and legacy links (issue #16, points 1, 2 and 5).

An attacker knows what every participant knows: a shared General Single or General Multiple
study code, the study's UUID (it is in every initData) and the sequential IDs of workers and
study results. Only a study result's UUID is secret (publix-http.md §4.6). With that, neither
a hand-written General Single cookie nor hand-written ID cookies may reach another
participant's run, and the old /publix/{studyId}/start links make no link a batch forbids and,
unless switched on, none that names a personal worker or General Single."""

from __future__ import annotations

import re
import time
import urllib.parse
import uuid

import pytest
import webtest

from conftest import AUTH, Lab

GS_COOKIE = "JATOS_GENERALSINGLE_UUIDS"
EVICTION_MESSAGE = "Closed by JATOS: Too many unfinished studies open in the same browser."
SWITCHED_OFF = ("Old JATOS links with '{param}' are switched off on this server. The researcher can switch them "
                "on by starting jatos-lite with --legacy-links (or JATOS_LITE_LEGACY_LINKS=on), or hand out a "
                "new study link instead.")
NOT_ALLOWED = ("It's not allowed to run this study (ID: {study}) in this batch (ID: {batch}) with a worker of type "
               "\"{label}\".")


def open_link(browser: webtest.TestApp, code: str, query: str = "") -> tuple[webtest.TestResponse, str, str]:
    """Open a study link and go to the first component: the start's response and the run's study
    result and component UUIDs."""
    started = browser.get(f"/publix/{code}{query}", status=303)
    _, _, sr, comp, _ = started.follow(status=200).request.path.split("/")
    return started, sr, comp


def replace_cookie(browser: webtest.TestApp, name: str, value: str) -> None:
    """Write a cookie by hand (webtest's set_cookie alone would send it beside the server's)."""
    for cookie in [c for c in browser.cookiejar if c.name == name]:
        browser.cookiejar.clear(cookie.domain, cookie.path, cookie.name)
    browser.set_cookie(name, value)


def stored_run(lab: Lab, sr: str) -> dict:
    with lab.client.app.config["jatos_lite.store"].snapshot() as db:
        return dict(db.one("SELECT * FROM study_results WHERE uuid = ?", sr))


def fingerprint(lab: Lab, sr: str) -> tuple:
    """Everything stored of a run: its row (last seen aside), component results and files."""
    row = stored_run(lab, sr)
    with lab.client.app.config["jatos_lite.store"].snapshot() as db:
        results = [dict(r) for r in db.all("SELECT * FROM component_results WHERE study_result_id = ? ORDER BY id",
                                           row["id"])]
    uploads = lab.client.app.config["jatos_lite.config"].uploads / str(row["id"])
    files = sorted((str(path), path.read_bytes()) for path in uploads.rglob("*") if path.is_file())
    return {k: v for k, v in row.items() if k != "last_seen_date"}, results, files


def set_cookie_values(response: webtest.TestResponse) -> dict[str, str]:
    headers = response.headers.getall("Set-Cookie")
    return {h.split("=", 1)[0]: h.split("=", 1)[1].split(";")[0] for h in headers}


def batch(allowed: list[str]) -> dict:
    return {"title": "Default", "active": True, "maxActiveMembers": None, "maxTotalMembers": None,
            "maxTotalWorkers": None, "allowedWorkerTypes": allowed, "comments": None, "batchInput": None}


def links(lab: Lab, study_id: int) -> list[dict]:
    return lab.client.get(f"/jatos/api/v1/studies/{study_id}/studyLinks", headers=AUTH).json["data"]


def personal_worker(lab: Lab, study_id: int, code: str) -> int:
    return next(link["workerId"] for link in links(lab, study_id) if link["code"] == code)


# --- point 1: the General Single cookie ----------------------------------------------------------


class Victim:
    """A General Single participant with result data, a study session, a file and URL parameters."""

    def __init__(self, lab: Lab, code: str):
        self.browser = webtest.TestApp(lab.client.app)
        _, self.sr, comp = open_link(self.browser, code, "?pid=victim")
        self.browser.put(f"/publix/{self.sr}/{comp}/resultData", "victim's answers",
                         headers={"Content-Type": "text/plain"})
        self.browser.post(f"/publix/{self.sr}/studySessionData", '{"secret": "victim"}',
                          headers={"Content-Type": "text/plain"})
        self.browser.post(f"/publix/{self.sr}/{comp}/files/victim.txt",
                          upload_files=[("file", "victim.txt", b"victim's file")])
        self.worker_id = stored_run(lab, self.sr)["worker_id"]


def forge(lab: Lab, code: str, victim: Victim, cookie: str) -> None:
    """Open the link with a hand-written General Single cookie: a run of one's own, the victim's untouched,
    and the forged entry dropped from the cookie."""
    before = fingerprint(lab, victim.sr)
    attacker = webtest.TestApp(lab.client.app)
    attacker.set_cookie(GS_COOKIE, cookie)
    started, sr, _ = open_link(attacker, code, "?pid=attacker")
    assert sr != victim.sr
    worker_id = stored_run(lab, sr)["worker_id"]
    assert worker_id > victim.worker_id, "a new worker"
    assert fingerprint(lab, victim.sr) == before
    assert re.fullmatch(r"[-0-9a-f]{36}=%d\.[0-9a-f]{32}" % worker_id, set_cookie_values(started)[GS_COOKIE])


@pytest.mark.parametrize("preview", [True, False], ids=["victim in preview", "victim started"])
def test_a_general_single_cookie_in_jatos_format_gets_its_own_run_and_leaves_the_victims_alone(
        lab: Lab, preview: bool) -> None:
    """JATOS's cookie `{studyUuid}={workerId}`, written by hand: in preview it handed over the victim's run
    (read its session and files, overwrite its URL parameters, abort it); else it refused the attacker."""
    study = lab.study(allowPreview=preview)
    code = lab.code(study["id"], "gs")
    victim = Victim(lab, code)
    forge(lab, code, victim, f"{study['uuid']}={victim.worker_id}")


@pytest.mark.parametrize("signature", ["made-up", "another worker's"])
def test_a_general_single_entry_with_a_wrong_signature_grants_nothing(lab: Lab, signature: str) -> None:
    study = lab.study(allowPreview=True)
    code = lab.code(study["id"], "gs")
    own = webtest.TestApp(lab.client.app)
    own_entry = set_cookie_values(open_link(own, code)[0])[GS_COOKIE]
    victim = Victim(lab, code)
    mac = "0" * 32 if signature == "made-up" else own_entry.rsplit(".", 1)[1]
    forge(lab, code, victim, f"{study['uuid']}={victim.worker_id}.{mac}")


def test_a_genuine_general_single_cookie_still_resumes_its_own_preview_beside_a_forged_entry(lab: Lab) -> None:
    """JATOS: several entries for a study → the highest worker ID; a forged higher one must not win."""
    study = lab.study(allowPreview=True)
    code = lab.code(study["id"], "gs")
    browser = webtest.TestApp(lab.client.app)
    _, own_sr, _ = open_link(browser, code)
    victim = Victim(lab, code)
    genuine = browser.cookies[GS_COOKIE]
    replace_cookie(browser, GS_COOKIE, f"{genuine}&{study['uuid']}={victim.worker_id}")
    started, sr, _ = open_link(browser, code, "?again=1")
    assert sr == own_sr
    assert set_cookie_values(started).get(GS_COOKIE, genuine) == genuine, "only the genuine entry is kept"
    assert stored_run(lab, victim.sr)["url_query_parameters"] == '{"pid":"victim"}'


def test_a_genuine_general_single_cookie_still_refuses_a_second_run(lab: Lab) -> None:
    study = lab.study()
    code = lab.code(study["id"], "gs")
    browser = webtest.TestApp(lab.client.app)
    open_link(browser, code)
    response = browser.get(f"/publix/{code}", status=403)
    assert response.text == "Study can be done only once."


def test_a_general_single_cookie_counts_only_in_its_own_batch(lab: Lab) -> None:
    """The cookie names a worker of batch A; batch B's link gives a run of B, never one of A."""
    study = lab.study()
    created = lab.client.post_json(f"/jatos/api/v1/studies/{study['id']}/batches",
                                   {"title": "B", "allowedWorkerTypes": ["GeneralSingle"]}, headers=AUTH)
    batch_b = created.json["data"]["id"]
    browser = webtest.TestApp(lab.client.app)
    _, first, _ = open_link(browser, lab.code(study["id"], "gs"))
    _, second, _ = open_link(browser, lab.code(study["id"], "gs", batch_b))
    assert second != first and stored_run(lab, second)["batch_id"] == batch_b
    response = browser.get(f"/publix/{lab.code(study['id'], 'gs')}", status=403)
    assert response.text == "Study can be done only once.", "batch A still knows the browser"


# --- point 2: ID cookies and the per-browser limit ------------------------------------------------


def forged_id_cookies(browser: webtest.TestApp, victim_cookie: str, count: int) -> None:
    """`count` ID cookies that parse; the least recent names the victim's run with everything but its UUID."""
    fields = dict(pair.split("=", 1) for pair in victim_cookie.split("&"))
    victim_id = int(fields["studyResultId"])
    for i in range(count):
        sr_id = victim_id if i == 0 else 10_000 + i
        forged = {**fields, "studyResultId": str(sr_id), "studyResultUuid": str(uuid.uuid4()),
                  "creationTime": str(1 + i)}
        browser.set_cookie(f"JATOS_ID_{sr_id}", "&".join(f"{k}={v}" for k, v in forged.items()))


def victim_run(lab: Lab, code: str) -> tuple[str, str]:
    """A running General Multiple run in its own browser: its UUID and its ID cookie's value."""
    browser = webtest.TestApp(lab.client.app)
    _, sr, _ = open_link(browser, code)
    return sr, next(c.value for c in browser.cookiejar if c.name.startswith("JATOS_ID_"))


def test_ten_forged_id_cookies_do_not_end_anothers_run(lab: Lab) -> None:
    study = lab.study()
    code = lab.code(study["id"], "gm")
    victim_sr, victim_cookie = victim_run(lab, code)
    attacker = webtest.TestApp(lab.client.app)
    forged_id_cookies(attacker, victim_cookie, 10)
    started, _, _ = open_link(attacker, code)
    assert stored_run(lab, victim_sr)["state"] == "STARTED"
    expired = {name for name, value in set_cookie_values(started).items() if name.startswith("JATOS_ID_") and not value}
    assert len(expired) == 10, "every forged ID cookie is deleted"


def test_the_limit_still_ends_the_least_recent_genuine_run_beside_forged_cookies(lab: Lab) -> None:
    study = lab.study()
    code = lab.code(study["id"], "gm")
    victim_sr, victim_cookie = victim_run(lab, code)
    browser = webtest.TestApp(lab.client.app)
    runs = []
    for _ in range(10):
        runs.append(open_link(browser, code)[1])
        time.sleep(0.003)  # distinct creationTime values
    forged_id_cookies(browser, victim_cookie, 1)
    open_link(browser, code)
    assert stored_run(lab, victim_sr)["state"] == "STARTED"
    evicted = stored_run(lab, runs[0])
    assert (evicted["state"], evicted["message"]) == ("FAIL", EVICTION_MESSAGE)
    assert {stored_run(lab, sr)["state"] for sr in runs[1:]} == {"STARTED"}


def raw_cookies(lab: Lab, cookies: dict[str, str]) -> webtest.TestApp:
    """A browser sending these cookies as UTF-8, as a real one does (webtest escapes other characters)."""
    wire = "; ".join(f"{name}={value}" for name, value in cookies.items()).encode().decode("latin-1")
    return webtest.TestApp(lab.client.app, extra_environ={"HTTP_COOKIE": wire})


def test_an_id_cookie_named_with_digits_int_refuses_is_deleted_not_a_500(lab: Lab) -> None:
    study = lab.study()
    value = ("batchId=1&studyAssets=x&urlBasePath=/&studyId=1&studyResultId=7&studyResultUuid=u&workerId=1"
             "&workerType=GeneralMultiple&creationTime=1")
    started = raw_cookies(lab, {"JATOS_ID_\u00b2": value}).get(f"/publix/{lab.code(study['id'], 'gm')}", status=303)
    assert set_cookie_values(started)["JATOS_ID_\u00b2".encode().decode("latin-1")] == ""


def test_a_creation_time_with_digits_int_refuses_makes_the_cookie_malformed_not_a_500(lab: Lab) -> None:
    """At the limit the least recent cookie is found by int(creationTime)."""
    study = lab.study()
    code = lab.code(study["id"], "gm")
    browser = webtest.TestApp(lab.client.app)
    runs = [open_link(browser, code)[1] for _ in range(10)]
    cookies = {c.name: c.value for c in browser.cookiejar}
    first = next(name for name, value in cookies.items() if runs[0] in value)
    cookies[first] = re.sub(r"creationTime=\d+", "creationTime=\u00b2", cookies[first])
    started, _, _ = open_link(raw_cookies(lab, cookies), code)
    assert set_cookie_values(started)[first] == ""
    assert {stored_run(lab, sr)["state"] for sr in runs} == {"STARTED"}, "nine valid cookies: nothing to end"


# --- points 1 and 5: legacy /publix/{studyId}/start links -----------------------------------------


@pytest.mark.parametrize("worker_param, label", [
    ("generalSingle", "General Single"), ("generalMultiple", "General Multiple"),
    ("workerId=W1&assignmentId=A1", "MTurk")])
def test_a_legacy_link_of_a_type_the_batch_forbids_makes_no_link(legacy_lab: Lab, worker_param: str,
                                                                label: str) -> None:
    study = legacy_lab.study(batches=[batch(["PersonalSingle"])])
    batch_id = study["batches"][0]["id"]
    before = links(legacy_lab, study["id"])
    response = legacy_lab.client.get(f"/publix/{study['id']}/start?batchId={batch_id}&{worker_param}", status=403)
    assert response.text == NOT_ALLOWED.format(study=study["id"], batch=batch_id, label=label)
    assert links(legacy_lab, study["id"]) == before


@pytest.mark.parametrize("param, worker_type", [("personalSingleWorkerId", "ps"), ("personalMultipleWorkerId", "pm")])
def test_legacy_links_naming_a_worker_are_off_by_default(lab: Lab, param: str, worker_type: str) -> None:
    """Walking worker IDs finds nothing: a real worker and a made-up one get the same answer."""
    study = lab.study()
    real = personal_worker(lab, study["id"], lab.code(study["id"], worker_type))
    for worker in (real, 987654):
        response = lab.client.get(f"/publix/{study['id']}/start?batchId={study['batches'][0]['id']}"
                                  f"&{param}={worker}", status=403)
        assert response.text == SWITCHED_OFF.format(param=param)


def test_legacy_general_single_links_are_off_by_default(lab: Lab) -> None:
    study = lab.study()
    response = lab.client.get(f"/publix/{study['id']}/start?batchId={study['batches'][0]['id']}&generalSingle",
                              status=403)
    assert response.text == SWITCHED_OFF.format(param="generalSingle")
    assert links(lab, study["id"]) == []


@pytest.mark.parametrize("param, worker_type", [("personalSingleWorkerId", "ps"), ("personalMultipleWorkerId", "pm")])
def test_legacy_links_naming_a_worker_lead_to_its_link_when_switched_on(legacy_lab: Lab, param: str,
                                                                       worker_type: str) -> None:
    study = legacy_lab.study()
    code = legacy_lab.code(study["id"], worker_type)
    worker = personal_worker(legacy_lab, study["id"], code)
    redirect = legacy_lab.client.get(f"/publix/{study['id']}/start?batchId={study['batches'][0]['id']}"
                                     f"&{param}={worker}", status=303)
    assert urllib.parse.urlsplit(redirect.headers["Location"]).path == f"/publix/{code}"


# --- Admin sessions and cookie-authenticated changes (issue #16, point 6) ------------------------------

API = "/jatos/api/v1"


def signed_in_browser(lab: Lab, token: str | None = None) -> webtest.TestApp:
    browser = webtest.TestApp(lab.client.app)
    if token is None:
        lab.sign_in(browser)
    else:
        browser.get(f"/jatos/login?token={token}", status=303)
    browser.get(f"{API}/studies/properties", status=200)
    return browser


def csrf_of(browser: webtest.TestApp) -> dict:
    return {"X-CSRF-Token": browser.get(f"{API}/admin/session").json["data"]["csrfToken"]}


def test_an_admin_session_expires_seven_days_after_sign_in(lab: Lab) -> None:
    import jatos_lite

    browser = signed_in_browser(lab)
    with lab.client.app.config["jatos_lite.store"].tx() as db:
        db.run("UPDATE admin_sessions SET created = created - ?", jatos_lite.ADMIN_SESSION_SECONDS * 1000 + 1000)
    browser.get(f"{API}/studies/properties", status=401)


@pytest.mark.parametrize("end", ["deactivate", "delete"])
def test_an_admin_session_ends_with_the_token_it_was_signed_in_with(lab: Lab, end: str) -> None:
    made = lab.client.post_json(f"{API}/users/1/tokens", {"name": "laptop", "expiresAfter": 0}, headers=AUTH).json
    browser = signed_in_browser(lab, made["data"]["token"])
    token_id = made["data"]["id"]
    if end == "deactivate":
        lab.client.patch_json(f"{API}/tokens/{token_id}", {"active": False}, headers=AUTH)
    else:
        lab.client.delete(f"{API}/tokens/{token_id}", headers=AUTH)
    browser.get(f"{API}/studies/properties", status=401)


def test_a_new_start_keeps_the_links_earlier_starts_printed_until_they_expire(lab: Lab) -> None:
    """Another server on the same data folder (or a start that failed) must not sign out the
    researcher of a running one; a printed link works for ADMIN_SESSION_SECONDS."""
    import jatos_lite

    store = lab.client.app.config["jatos_lite.store"]
    with store.tx() as db:
        first = jatos_lite.new_sign_in_token(db)
    browser = signed_in_browser(lab, first)
    with store.tx() as db:
        jatos_lite.new_sign_in_token(db)
    browser.get(f"{API}/studies/properties", status=200)
    with store.tx() as db:
        db.run("UPDATE api_tokens SET creation_date = creation_date - ? WHERE name = ?",
               (jatos_lite.ADMIN_SESSION_SECONDS + 1) * 1000, jatos_lite.SIGN_IN_TOKEN_NAME)
    browser.get(f"{API}/studies/properties", status=401)
    with store.tx() as db:
        jatos_lite.new_sign_in_token(db)
        assert db.value("SELECT COUNT(*) FROM api_tokens WHERE name = ?", jatos_lite.SIGN_IN_TOKEN_NAME) == 1


def test_signing_out_ends_the_session_and_needs_the_csrf_header(lab: Lab) -> None:
    browser = signed_in_browser(lab)
    browser.post("/jatos/logout", status=403)
    browser.get(f"{API}/studies/properties", status=200)
    answer = browser.post("/jatos/logout", headers=csrf_of(browser), status=200)
    assert "JATOS_LITE_SESSION=;" in answer.headers["Set-Cookie"]
    browser.get(f"{API}/studies/properties", status=401)
    with lab.client.app.config["jatos_lite.store"].snapshot() as db:
        assert db.value("SELECT count(*) FROM admin_sessions") == 0


def test_study_codes_by_get_need_a_bearer_token_not_the_session_cookie(lab: Lab) -> None:
    """A cross-site link or image could make the signed-in browser GET; only POST with the header may make links."""
    study = lab.study()
    browser = signed_in_browser(lab)
    links = f"{API}/studies/{study['id']}/studyLinks"
    before = len(lab.client.get(links, headers=AUTH).json["data"])
    browser.get(f"{API}/studies/{study['id']}/studyCodes?type=pm&amount=10", status=403)
    assert len(lab.client.get(links, headers=AUTH).json["data"]) == before
    assert browser.post_json(f"{API}/studies/{study['id']}/studyCodes", {"type": "pm"}, headers=csrf_of(browser)
                             ).json["data"]
    assert lab.client.get(f"{API}/studies/{study['id']}/studyCodes?type=pm", headers=AUTH).json["data"]


# --- study files: a made-up ID cookie reads no study's files ---------------------------------------


def test_study_files_need_an_id_cookie_the_database_knows(lab: Lab) -> None:
    secret = lab.study(dir_name="secret_study", files={"answers.txt": "the answers"})
    mine = lab.study(dir_name="my_study")
    _, own_cookie = victim_run(lab, lab.code(mine["id"], "gm"))
    genuine = webtest.TestApp(lab.client.app)
    _, sr, _ = open_link(genuine, lab.code(secret["id"], "gm"))
    assert genuine.get("/study_assets/secret_study/answers.txt", status=200).text == "the answers"

    fields = dict(pair.split("=", 1) for pair in own_cookie.split("&"))
    for forged in ({**fields, "studyAssets": "secret_study"},  # my own run, another study's folder
                   {**fields, "studyAssets": "secret_study", "studyResultId": "999",
                    "studyResultUuid": str(uuid.uuid4())}):  # a run that does not exist
        attacker = webtest.TestApp(lab.client.app)
        attacker.set_cookie(f"JATOS_ID_{forged['studyResultId']}", "&".join(f"{k}={v}" for k, v in forged.items()))
        attacker.get("/study_assets/secret_study/answers.txt", status=403)
    assert secret["id"] != mine["id"] and sr
