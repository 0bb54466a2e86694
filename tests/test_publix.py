"""The publix participant protocol against the spec (publix-http.md §4-§11, fixes of §13 applied).

Each participant's browser is its own `webtest.TestApp` with its own cookie jar. The server's view
of a run is read back through the results metadata API, as a researcher would see it."""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import re
import time
import urllib.parse
from dataclasses import dataclass, field

import pytest
import webtest

from conftest import AUTH, Lab

TEXT = {"Content-Type": "text/plain; charset=UTF-8"}
AJAX = {"X-Requested-With": "XMLHttpRequest"}
MTURK_QUERY = "?workerId=A1B2C3D4&assignmentId=ASSIGN1&hitId=HIT1"
ID_COOKIE_KEYS = ["batchId", "componentId", "componentPos", "componentResultId", "creationTime", "studyAssets",
                  "urlBasePath", "jatosRun", "studyId", "studyResultId", "studyResultUuid", "workerId", "workerType"]
EVICTION_MESSAGE = "Closed by JATOS: Too many unfinished studies open in the same browser."
ALL_TYPES = ["PersonalSingle", "PersonalMultiple", "GeneralSingle", "GeneralMultiple", "MT"]
SHORT = {"ps": "PersonalSingle", "pm": "PersonalMultiple", "gs": "GeneralSingle", "gm": "GeneralMultiple",
         "mt": "MT"}
UI_NAME = {"ps": "Personal Single", "pm": "Personal Multiple", "gs": "General Single", "gm": "General Multiple",
           "mt": "MTurk"}


# --- helpers -------------------------------------------------------------------------------------


def batch(**overrides: object) -> dict:
    """A JATOS batch object for make_jzip (all participant types allowed unless overridden)."""
    return {"title": "Default", "active": True, "maxActiveMembers": None, "maxTotalMembers": None,
            "maxTotalWorkers": None, "allowedWorkerTypes": ALL_TYPES, "comments": None, "batchInput": None,
            **overrides}


def new_browser(lab: Lab) -> webtest.TestApp:
    return webtest.TestApp(lab.client.app)


def cookie_fields(value: str) -> dict[str, str]:
    """An ID cookie value (`k=v&k=v`, §5.1) as an ordered dict."""
    return dict(pair.split("=", 1) for pair in value.split("&"))


def id_cookies(browser: webtest.TestApp) -> dict[str, dict[str, str]]:
    return {c.name: cookie_fields(c.value) for c in browser.cookiejar if c.name.upper().startswith("JATOS_ID")}


def set_cookies(response: webtest.TestResponse) -> dict[str, dict[str, str | bool]]:
    """Set-Cookie headers by name: {"value": ..., lower-case attribute: value (or True for flags)}."""
    cookies: dict[str, dict[str, str | bool]] = {}
    for header in response.headers.getall("Set-Cookie"):
        first, *attributes = header.split(";")
        name, _, value = first.partition("=")
        parsed: dict[str, str | bool] = {"value": value}
        for attribute in attributes:
            key, sep, attr_value = attribute.strip().partition("=")
            parsed[key.lower()] = attr_value if sep else True
        cookies[name.strip()] = parsed
    return cookies


def cache_directives(response: webtest.TestResponse) -> set[str]:
    return {d.strip().lower() for d in response.headers.get("Cache-Control", "").split(",") if d.strip()}


def refused(response: webtest.TestResponse, status: int, message: str) -> None:
    """A publix error: the status and, for a non-HTML request, the message as plain text (§1.4, §10.1)."""
    assert response.status_int == status, response.text
    assert response.content_type == "text/plain"
    assert response.text == message


@dataclass
class Run:
    """One study run in one browser, with shortcuts to its publix URLs and its metadata."""

    lab: Lab
    browser: webtest.TestApp
    sr: str  # study result UUID
    comp: str  # UUID of the component page the browser is on
    sr_id: int
    page: webtest.TestResponse
    start_response: webtest.TestResponse = field(repr=False)

    def url(self, tail: str) -> str:
        return f"/publix/{self.sr}/{tail}"

    def go(self, comp: str, status: int | str = 200) -> webtest.TestResponse:
        """Start a component (what jatos.js's startComponent* navigates to)."""
        response = self.browser.get(self.url(f"{comp}/start"), status=status)
        if response.status_int == 200:
            self.comp = comp
        return response

    def init_data(self, status: int | str = 200) -> webtest.TestResponse:
        return self.browser.get(self.url(f"{self.comp}/initData"), status=status)

    def result_data(self, method: str, body: str, status: int | str = 200) -> webtest.TestResponse:
        return self.browser.request(self.url(f"{self.comp}/resultData"), method=method, body=body.encode(),
                                    headers=TEXT, status=status)

    def session(self, body: str, status: int | str = 200) -> webtest.TestResponse:
        return self.browser.post(self.url("studySessionData"), body.encode(), headers=TEXT, status=status)

    def upload(self, name: str, content: bytes) -> webtest.TestResponse:
        return self.browser.post(self.url(f"{self.comp}/files/{name}"), upload_files=[("file", name, content)])

    def end(self, query: str = "", status: int | str = "*", **headers: str) -> webtest.TestResponse:
        return self.browser.get(self.url(f"end{query}"), headers=headers, status=status)

    def abort(self, query: str = "", status: int | str = "*", **headers: str) -> webtest.TestResponse:
        return self.browser.get(self.url(f"abort{query}"), headers=headers, status=status)

    def meta(self) -> dict:
        """The run's results metadata (studyState, dates, componentResults, ...)."""
        data = self.lab.client.get(f"/jatos/api/v1/results/metadata?studyResultId={self.sr_id}",
                                   headers=AUTH).json["data"]
        return data[0]["studyResults"][0]

    def states(self) -> tuple[str, list[str]]:
        meta = self.meta()
        return meta["studyState"], [cr["componentState"] for cr in meta["componentResults"]]

    def data(self) -> str:
        return self.lab.client.get(f"/jatos/api/v1/results/data?studyResultId={self.sr_id}&asPlainText=true",
                                   headers=AUTH).text


def start(lab: Lab, code: str, query: str = "", browser: webtest.TestApp | None = None) -> Run:
    """Open a study link and follow it to the first component page (§4.4)."""
    browser = browser or new_browser(lab)
    started = browser.get(f"/publix/{code}{query}", status=303)
    page = started.follow(status=200)
    _, publix, sr, comp, tail = page.request.path.split("/")
    assert (publix, tail) == ("publix", "start")
    sr_id = next(int(f["studyResultId"]) for f in id_cookies(browser).values() if f["studyResultUuid"] == sr)
    return Run(lab, browser, sr, comp, sr_id, page, started)


def uuids(study: dict) -> list[str]:
    return [c["uuid"] for c in study["components"]]


def make_run(lab: Lab, worker_type: str = "gm", query: str = "", **study_kwargs: object) -> tuple[dict, Run]:
    study = lab.study(**study_kwargs)
    if worker_type == "mt" and not query:
        query = MTURK_QUERY
    return study, start(lab, lab.code(study["id"], worker_type), query)


def personal_worker(lab: Lab, study_id: int, code: str) -> int:
    """The worker a personal study code was made for."""
    links = lab.client.get(f"/jatos/api/v1/studies/{study_id}/studyLinks", headers=AUTH).json["data"]
    return next(link["workerId"] for link in links if link["code"] == code)


# --- §4.5 worker types ---------------------------------------------------------------------------


@pytest.mark.parametrize("same_browser", [True, False], ids=["same browser", "other browser"])
def test_a_personal_single_link_runs_once_and_a_second_start_is_refused(lab: Lab, same_browser: bool) -> None:
    _, run = make_run(lab, "ps")
    code = run.meta()["studyCode"]
    browser = run.browser if same_browser else new_browser(lab)
    refused(browser.get(f"/publix/{code}", status=403), 403, "Study can be done only once.")
    assert run.meta()["studyState"] == "STARTED", "the refused start leaves the running run alone"


def test_a_personal_multiple_link_starts_a_new_run_of_the_same_worker_each_time(lab: Lab) -> None:
    study = lab.study()
    code = lab.code(study["id"], "pm")
    first, second = start(lab, code), start(lab, code)
    assert first.sr != second.sr
    assert first.meta()["workerId"] == second.meta()["workerId"]
    assert second.meta()["workerType"] == "PersonalMultiple"


def test_a_general_multiple_link_creates_a_new_worker_for_every_run(lab: Lab) -> None:
    study = lab.study()
    code = lab.code(study["id"], "gm")
    browser = new_browser(lab)
    first, second = start(lab, code, browser=browser), start(lab, code, browser=browser)
    assert first.sr != second.sr
    assert first.meta()["workerId"] != second.meta()["workerId"]
    assert {first.meta()["workerType"], second.meta()["workerType"]} == {"GeneralMultiple"}


def test_a_general_single_start_remembers_the_worker_in_an_http_only_cookie(lab: Lab) -> None:
    """§5.5: JATOS_GENERALSINGLE_UUIDS = {studyUuid}={workerId}, HttpOnly, SameSite=Lax, long-lived; beyond
    JATOS, the entry carries a signature (128 bits of HMAC-SHA256 in hex) so that it cannot be forged."""
    study, run = make_run(lab, "gs")
    cookie = set_cookies(run.start_response)["JATOS_GENERALSINGLE_UUIDS"]
    assert re.fullmatch(rf"{study['uuid']}={run.meta()['workerId']}\.[0-9a-f]{{32}}", str(cookie["value"]))
    assert cookie["httponly"] is True and str(cookie["samesite"]).lower() == "lax"
    assert cookie["path"] == "/" and cookie["max-age"] == "864000000" and "secure" not in cookie


def test_a_general_single_link_runs_once_per_browser(lab: Lab) -> None:
    _, run = make_run(lab, "gs")
    code = run.meta()["studyCode"]
    refused(run.browser.get(f"/publix/{code}", status=403), 403, "Study can be done only once.")
    other = start(lab, code)
    assert other.sr != run.sr and other.meta()["workerId"] != run.meta()["workerId"]


@pytest.mark.parametrize("turk_submit_to, worker_type", [
    ("", "MT"), ("https://www.mturk.com", "MT"), ("https://workersandbox.mturk.com", "MTSandbox"),
    ("https://WorkerSANDBOX.mturk.com", "MTSandbox")])
def test_the_mturk_worker_type_is_decided_by_turk_submit_to(lab: Lab, turk_submit_to: str, worker_type: str) -> None:
    """A batch that allows only MT runs sandbox workers too (§4.6 "do" table)."""
    query = MTURK_QUERY + (f"&turkSubmitTo={urllib.parse.quote(turk_submit_to)}" if turk_submit_to else "")
    _, run = make_run(lab, "mt", query, batches=[batch(allowedWorkerTypes=["MT"])])
    assert run.meta()["workerType"] == worker_type


def test_an_mturk_worker_id_maps_to_one_worker_case_insensitively_and_may_run_again(lab: Lab) -> None:
    study = lab.study()
    code = lab.code(study["id"], "mt")
    first = start(lab, code, "?workerId=AbC123&assignmentId=X1")
    second = start(lab, code, "?workerId=%20abc123%20&assignmentId=X2")
    assert first.sr != second.sr
    assert first.meta()["workerId"] == second.meta()["workerId"]


@pytest.mark.parametrize("query, message", [
    ("?assignmentId=A1", "MTurk's workerId is missing in the query parameters."),
    ("?workerId=W1&assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE", "No preview available for study {sid}."),
], ids=["no workerId", "MTurk preview"])
def test_an_mturk_start_needs_a_worker_and_no_mturk_preview(lab: Lab, query: str, message: str) -> None:
    study = lab.study()
    browser = new_browser(lab)
    response = browser.get(f"/publix/{lab.code(study['id'], 'mt')}{query}", status=400)
    refused(response, 400, message.format(sid=study["id"]))
    assert not id_cookies(browser)


def test_a_run_starts_at_the_first_active_component(lab: Lab) -> None:
    study, run = make_run(lab, components=[{"title": "Off", "htmlFilePath": "a.html", "active": False},
                                           {"title": "On", "htmlFilePath": "b.html"}])
    assert run.comp == uuids(study)[1]


def test_a_study_without_active_components_cannot_start_and_leaves_nothing_behind(lab: Lab) -> None:
    """§4.4 step 6: 404, no cookie, and the run is rolled back: once the component is active again
    the same Personal Single link starts normally (a kept run would make it "done only once")."""
    study = lab.study(components=[{"title": "Off", "htmlFilePath": "a.html", "active": False}])
    code = lab.code(study["id"], "ps")
    browser = new_browser(lab)
    response = browser.get(f"/publix/{code}", status=404)
    refused(response, 404, f"The study with ID {study['id']} has no active components.")
    assert "Set-Cookie" not in response.headers
    lab.client.patch_json(f"/jatos/api/v1/components/{study['components'][0]['id']}", {"active": True},
                          headers=AUTH)
    assert start(lab, code, browser=browser).meta()["studyState"] == "STARTED"


# --- §4.7 preview ---------------------------------------------------------------------------------


@pytest.mark.parametrize("worker_type", ["ps", "gs"])
def test_a_preview_run_starts_in_pre_and_may_reload_its_first_component(lab: Lab, worker_type: str) -> None:
    _, run = make_run(lab, worker_type, allowPreview=True)
    assert run.meta()["studyState"] == "PRE"
    run.go(run.comp)
    run.go(run.comp)
    assert run.states() == ("PRE", ["RELOADED", "RELOADED", "STARTED"])


@pytest.mark.parametrize("worker_type", ["ps", "gs"])
def test_reopening_the_link_during_preview_resumes_the_same_run(lab: Lab, worker_type: str) -> None:
    _, run = make_run(lab, worker_type, allowPreview=True)
    again = start(lab, run.meta()["studyCode"], "?second=1", browser=run.browser)
    assert again.sr == run.sr
    assert run.meta()["urlQueryParameters"] == {"second": "1"}, "re-entry replaces the query parameters (§4.4)"


@pytest.mark.parametrize("worker_type", ["ps", "gs"])
def test_starting_another_component_ends_the_preview_and_uses_up_the_link(lab: Lab, worker_type: str) -> None:
    study, run = make_run(lab, worker_type, allowPreview=True)
    run.go(uuids(study)[1])
    assert run.meta()["studyState"] == "STARTED"
    refused(run.browser.get(f"/publix/{run.meta()['studyCode']}", status=403), 403, "Study can be done only once.")


def test_init_data_does_not_move_a_preview_run_out_of_pre(lab: Lab) -> None:
    _, run = make_run(lab, "ps", allowPreview=True)
    run.init_data()
    assert run.states() == ("PRE", ["DATA_RETRIEVED"])


@pytest.mark.parametrize("worker_type", ["pm", "gm", "mt"])
def test_only_single_workers_get_a_preview(lab: Lab, worker_type: str) -> None:
    _, run = make_run(lab, worker_type, allowPreview=True)
    assert run.meta()["studyState"] == "STARTED"


# --- §4.8 legacy links ----------------------------------------------------------------------------


@pytest.mark.parametrize("worker_param, worker_type", [
    ("personalSingleWorkerId={worker}", "PersonalSingle"),
    ("personalMultipleWorkerId={worker}", "PersonalMultiple"),
    ("generalSingle=true", "GeneralSingle"),
    ("generalMultiple", "GeneralMultiple"),
    ("workerId=W9&assignmentId=A9", "MT"),
    ("workerId=W9&assignmentId=A9&turkSubmitTo=https%3A%2F%2Fworkersandbox.mturk.com", "MTSandbox"),
])
def test_a_legacy_link_becomes_a_study_link_keeping_all_parameters(legacy_lab: Lab, worker_param: str,
                                                                   worker_type: str) -> None:
    lab = legacy_lab
    study = lab.study()
    personal = worker_type.startswith("Personal")
    personal_code = lab.code(study["id"], "ps" if worker_type == "PersonalSingle" else "pm") if personal else ""
    worker = personal_worker(lab, study["id"], personal_code) if personal else ""
    query = f"batchId={study['batches'][0]['id']}&" + worker_param.format(worker=worker)
    browser = new_browser(lab)
    redirect = browser.get(f"/publix/{study['id']}/start?{query}", status=303)
    location = urllib.parse.urlsplit(redirect.headers["Location"])
    _, publix, code = location.path.split("/")
    assert publix == "publix" and len(code) == 11
    if personal:
        assert code == personal_code, "the personal worker's own link"
    run = start(lab, code, "?" + location.query, browser)
    meta = run.meta()
    assert meta["workerType"] == worker_type
    assert meta["urlQueryParameters"] == dict(urllib.parse.parse_qsl(query, keep_blank_values=True))


@pytest.mark.parametrize("query, message", [
    ("batchId=999&generalMultiple", "Unknown study or batch"),
    ("batchId={batch}", "Unknown worker type"),
    ("batchId={batch}&mode=requester-preview", "You cannot start a study from a MTurk requester preview"),
    ("batchId={batch}&personalSingleWorkerId=abc", "Couldn't parse worker ID from URL query string"),
    ("batchId={batch}&personalSingleWorkerId={pm_worker}", "Worker not of type PersonalSingle"),
], ids=["unknown batch", "no worker type", "requester preview", "unparsable worker", "wrong worker type"])
def test_a_bad_legacy_link_is_400(legacy_lab: Lab, query: str, message: str) -> None:
    lab = legacy_lab
    study = lab.study()
    pm_worker = personal_worker(lab, study["id"], lab.code(study["id"], "pm"))
    query = query.format(batch=study["batches"][0]["id"], pm_worker=pm_worker)
    refused(lab.client.get(f"/publix/{study['id']}/start?{query}", status=400), 400, message)


def test_a_legacy_link_with_an_unknown_personal_worker_is_400_not_500(legacy_lab: Lab) -> None:
    """§13: JATOS answers 500 here; the fix is a 400."""
    lab = legacy_lab
    study = lab.study()
    response = lab.client.get(f"/publix/{study['id']}/start?batchId={study['batches'][0]['id']}"
                              "&personalSingleWorkerId=987654", expect_errors=True)
    assert response.status_int == 400


# --- §4.6 authorisation and batch limits ----------------------------------------------------------


def test_an_unknown_study_code_is_refused(lab: Lab) -> None:
    """§4.4 step 1 (the spec says 400 "No valid study link", not 404)."""
    refused(lab.client.get("/publix/AbCdEfGhIjK", status=400), 400, "No valid study link")


@pytest.mark.parametrize("switch_off, status, message", [
    ("link", 403, "This study link is inactive"),
    ("study", 403, "The study (ID: {sid}) was deactivated by an admin."),
    ("batch", 403, "The batch (ID: {bid}) is inactive."),
])
def test_a_start_is_refused_when_link_study_or_batch_is_inactive(lab: Lab, switch_off: str, status: int,
                                                                 message: str) -> None:
    study = lab.study()
    sid, bid = study["id"], study["batches"][0]["id"]
    code = lab.code(sid, "gm")
    path = {"link": f"/studyCodes/{code}", "study": f"/studies/{sid}/properties", "batch": f"/batches/{bid}"}
    lab.client.patch_json(f"/jatos/api/v1{path[switch_off]}", {"active": False}, headers=AUTH)
    browser = new_browser(lab)
    refused(browser.get(f"/publix/{code}", status=status), status, message.format(sid=sid, bid=bid))
    assert not id_cookies(browser)


@pytest.mark.parametrize("worker_type", ["ps", "pm", "gs", "gm", "mt"])
def test_a_worker_type_the_batch_does_not_allow_cannot_start(lab: Lab, worker_type: str) -> None:
    others = [t for t in ALL_TYPES if t != SHORT[worker_type]]
    study = lab.study(batches=[batch(allowedWorkerTypes=others)])
    code = lab.code(study["id"], worker_type)
    response = lab.client.get(f"/publix/{code}{MTURK_QUERY if worker_type == 'mt' else ''}", status=403)
    refused(response, 403, f"It's not allowed to run this study (ID: {study['id']}) in this batch "
                           f"(ID: {study['batches'][0]['id']}) with a worker of type \"{UI_NAME[worker_type]}\".")


def test_max_total_workers_counts_member_and_personal_workers_and_refuses_beyond_it(lab: Lab) -> None:
    """Batch of 3: the researcher's Jatos worker + one pre-created personal worker + one new General
    Multiple worker = 3 (allowed: the rule is "greater than"); the next General Multiple run is refused."""
    study = lab.study(batches=[batch(maxTotalWorkers=3)])
    lab.code(study["id"], "pm")
    code = lab.code(study["id"], "gm")
    start(lab, code)
    message = (f"For the batch (ID: {study['batches'][0]['id']}) the maximum number of workers is "
               "already reached.")
    for _ in range(2):  # the refused start added no worker
        refused(new_browser(lab).get(f"/publix/{code}", status=403), 403, message)


def test_deactivating_the_study_does_not_stop_a_running_run(lab: Lab) -> None:
    study, run = make_run(lab)
    lab.client.patch_json(f"/jatos/api/v1/studies/{study['id']}/properties", {"active": False}, headers=AUTH)
    run.init_data()
    run.result_data("PUT", "still here")
    assert run.end().status_int == 303


def test_removing_the_worker_type_from_the_batch_fails_later_calls_but_not_heartbeat_or_component_start(
        lab: Lab) -> None:
    """§4.6: the "do" check runs on almost every call, but not on heartbeats nor non-Jatos component starts."""
    study, run = make_run(lab)
    lab.client.patch_json(f"/jatos/api/v1/batches/{study['batches'][0]['id']}",
                          {"allowedWorkerTypes": ["PersonalSingle"]}, headers=AUTH)
    refused(run.init_data(status=403), 403, f"It's not allowed to run this study (ID: {study['id']}) in this batch "
                                            f"(ID: {study['batches'][0]['id']}) with a worker of type "
                                            "\"General Multiple\".")
    run.browser.post(run.url("heartbeat"), b"", headers=TEXT, status=200)
    run.go(uuids(study)[1], status=200)


# --- §5 ID cookies ---------------------------------------------------------------------------------


def test_the_id_cookie_of_a_new_run_has_jatos_format_and_attributes(lab: Lab) -> None:
    """§5.1: JATOS_ID_{srId}, keys in JATOS's order, `null` for the unset component fields, readable by
    JavaScript, Path=/, Max-Age 10000 days, no Domain/Secure/SameSite by default."""
    study, run = make_run(lab, dir_name="jatosjs_test_study_你经常来吗")
    cookie = set_cookies(run.start_response)[f"JATOS_ID_{run.sr_id}"]
    fields = cookie_fields(str(cookie["value"]))
    assert list(fields) == ID_COOKIE_KEYS
    meta = run.meta()
    assert meta["id"] == run.sr_id and meta["uuid"] == run.sr
    assert fields == {
        "batchId": str(study["batches"][0]["id"]), "componentId": "null", "componentPos": "null",
        "componentResultId": "null", "creationTime": fields["creationTime"],
        "studyAssets": urllib.parse.quote_plus(study["dirName"]), "urlBasePath": "/", "jatosRun": "null",
        "studyId": str(study["id"]), "studyResultId": str(run.sr_id), "studyResultUuid": run.sr,
        "workerId": str(meta["workerId"]), "workerType": "GeneralMultiple"}
    assert abs(int(fields["creationTime"]) - time.time() * 1000) < 60_000
    assert cookie["path"] == "/" and cookie["max-age"] == "864000000"
    assert not {"httponly", "secure", "samesite", "domain"} & set(cookie)


def test_a_component_start_rewrites_the_id_cookie_with_the_component(lab: Lab) -> None:
    study, run = make_run(lab)
    before = id_cookies(run.browser)[f"JATOS_ID_{run.sr_id}"]
    run.go(uuids(study)[2])
    fields = id_cookies(run.browser)[f"JATOS_ID_{run.sr_id}"]
    cr_ids = [cr["id"] for cr in run.meta()["componentResults"]]
    assert (fields["componentId"], fields["componentPos"], fields["componentResultId"]) == (
        str(study["components"][2]["id"]), "3", str(cr_ids[-1]))
    assert int(fields["creationTime"]) >= int(before["creationTime"])


def test_a_pre_3_9_8_slot_cookie_is_deleted_as_malformed(lab: Lab) -> None:
    """§5.2: JATOS_IDS_0 (old slot-indexed name) is not an ID cookie any more and gets deleted."""
    study = lab.study()
    browser = new_browser(lab)
    browser.set_cookie("JATOS_IDS_0", "batchId=1&studyResultId=1")
    response = browser.get(f"/publix/{lab.code(study['id'], 'gm')}", status=303)
    deleted = set_cookies(response)["JATOS_IDS_0"]
    assert deleted["value"] == "" and deleted["max-age"] == "0"


def open_runs(lab: Lab, code: str, browser: webtest.TestApp, count: int) -> list[Run]:
    runs = []
    for _ in range(count):
        runs.append(start(lab, code, browser=browser))
        time.sleep(0.003)  # distinct creationTime values
    return runs


def test_the_eleventh_run_in_a_browser_evicts_the_least_recent_one_as_fail(lab: Lab) -> None:
    """§5.3 with the default limit of 10 ID cookies."""
    study = lab.study()
    code = lab.code(study["id"], "gm")
    browser = new_browser(lab)
    runs = open_runs(lab, code, browser, 10)
    newest = start(lab, code, browser=browser)
    evicted = runs[0].meta()
    assert evicted["studyState"] == "FAIL" and evicted["message"] == EVICTION_MESSAGE
    assert evicted["endDate"] is not None
    assert [cr["componentState"] for cr in evicted["componentResults"]] == ["FAIL"]
    deletion = set_cookies(newest.start_response)[f"JATOS_ID_{runs[0].sr_id}"]
    assert deletion["max-age"] == "0"
    assert len(id_cookies(browser)) == 10 and f"JATOS_ID_{runs[0].sr_id}" not in id_cookies(browser)
    assert {r.meta()["studyState"] for r in runs[1:]} == {"STARTED"}


def test_eviction_picks_the_least_recently_written_cookie_not_the_oldest_run(lab: Lab) -> None:
    study = lab.study()
    code = lab.code(study["id"], "gm")
    browser = new_browser(lab)
    runs = open_runs(lab, code, browser, 10)
    runs[0].go(uuids(study)[1])  # refreshes the oldest run's cookie
    time.sleep(0.003)
    start(lab, code, browser=browser)
    assert runs[0].meta()["studyState"] == "STARTED"
    assert runs[1].meta()["studyState"] == "FAIL"


# --- §6.1-§6.2 component flow ---------------------------------------------------------------------


@pytest.mark.parametrize("linear, path", [(False, (0, 2)), (False, (0, 2, 1)), (False, (0, 1, 0)), (True, (0, 2))],
                         ids=["skip ahead", "skip and back", "back", "linear skip ahead"])
def test_an_allowed_component_start_finishes_the_previous_component_result(lab: Lab, linear: bool,
                                                                           path: tuple[int, ...]) -> None:
    """§6.2 rule 4: any order in a non-linear study; same or higher position in a linear one."""
    study, run = make_run(lab, linearStudy=linear)
    for position in path[1:]:
        page = run.go(uuids(study)[position])
        assert page.content_type == "text/html" and f"Component {position + 1}" in page.text
        assert id_cookies(run.browser)[f"JATOS_ID_{run.sr_id}"]["componentPos"] == str(position + 1)
    meta = run.meta()
    assert [cr["componentId"] for cr in meta["componentResults"]] == [study["components"][p]["id"] for p in path]
    assert [cr["componentState"] for cr in meta["componentResults"]] == ["FINISHED"] * (len(path) - 1) + ["STARTED"]
    assert all(cr["endDate"] for cr in meta["componentResults"][:-1])


def test_a_linear_study_refuses_going_back_and_the_run_fails(lab: Lab) -> None:
    study, run = make_run(lab, linearStudy=True)
    run.go(uuids(study)[1])
    redirect = run.go(uuids(study)[0], status=303)
    c1, c2 = (c["id"] for c in study["components"][:2])
    reason = (f"Study 'Test study' (ID: {study['id']}) allows only linear study flow. But component {c2} "
              f"attempted to start component {c1}. The study is finished.")
    assert redirect.headers["Location"] == run.url("end?successful=false&message=" + urllib.parse.quote_plus(reason))
    assert run.states() == ("STARTED", ["FINISHED", "FAIL"])
    page = redirect.follow(status=200)
    assert page.content_type == "text/html" and reason in html.unescape(page.text)
    meta = run.meta()
    assert (meta["studyState"], meta["message"]) == ("FAIL", reason)


def test_reloading_a_non_reloadable_component_is_refused_and_the_run_fails(lab: Lab) -> None:
    study, run = make_run(lab)
    redirect = run.go(run.comp, status=303)
    reason = (f"It's not allowed to reload this component (ID: {study['components'][0]['id']}). "
              f"Study (ID: {study['id']}) is finished.")
    assert redirect.headers["Location"] == run.url("end?successful=false&message=" + urllib.parse.quote_plus(reason))
    assert run.states() == ("STARTED", ["FAIL"])
    redirect.follow(status=200)
    assert run.meta()["studyState"] == "FAIL" and run.meta()["message"] == reason


def test_reloading_a_reloadable_component_starts_a_fresh_component_result(lab: Lab) -> None:
    _, run = make_run(lab, components=[{"title": "R", "htmlFilePath": "r.html", "reloadable": True}])
    run.go(run.comp)
    assert run.states() == ("STARTED", ["RELOADED", "STARTED"])
    assert run.meta()["componentResults"][0]["endDate"] is not None


def test_an_inactive_component_cannot_be_started(lab: Lab) -> None:
    study, run = make_run(lab, components=[{"title": "A", "htmlFilePath": "a.html"},
                                           {"title": "B", "htmlFilePath": "b.html", "active": False}])
    refused(run.go(uuids(study)[1], status=403), 403, f"Component {study['components'][1]['id']} is not active.")
    assert run.states() == ("STARTED", ["STARTED"])


@pytest.mark.parametrize("sr, comp, status, message", [
    ("undefined", "{comp}", 403, "Error getting study result UUID"),
    ("3f0c1d2e-4b5a-4c6d-8e7f-9a0b1c2d3e4f", "{comp}", 400,
     "Study result 3f0c1d2e-4b5a-4c6d-8e7f-9a0b1c2d3e4f doesn't exist."),
    ("{sr}", "undefined", 403, "Error getting component UUID"),
    ("{sr}", "{foreign}", 404, "Component {foreign} doesn't exist."),
], ids=["undefined run", "unknown run", "undefined component", "component of another study"])
def test_component_start_checks_run_and_component(lab: Lab, sr: str, comp: str, status: int, message: str) -> None:
    _, run = make_run(lab)
    foreign = uuids(lab.study(dir_name="other"))[0]
    names = {"sr": run.sr, "comp": run.comp, "foreign": foreign}
    response = run.browser.get(f"/publix/{sr.format(**names)}/{comp.format(**names)}/start", status=status)
    refused(response, status, message.format(**names))


# --- §7 initData ----------------------------------------------------------------------------------


TOP_LEVEL = {"studySessionData": str, "studyProperties": dict, "batchProperties": dict, "componentList": list,
             "componentProperties": dict, "urlQueryParameters": dict, "studyCode": str}
PROPERTY_KEYS = {
    "studyProperties": {"id", "uuid", "title", "description", "descriptionHash", "locked", "groupStudy",
                        "linearStudy", "allowPreview", "dirName", "studyInput"},
    "batchProperties": {"id", "title", "maxActiveMembers", "maxTotalMembers", "maxTotalWorkers",
                        "allowedWorkerTypes", "batchInput"},
    "componentProperties": {"id", "uuid", "title", "htmlFilePath", "reloadable", "componentInput"},
}


def test_init_data_has_exactly_the_top_level_keys_with_their_types(lab: Lab) -> None:
    _, run = make_run(lab)
    response = run.init_data()
    assert response.content_type == "application/json"
    data = response.json
    assert set(data) == set(TOP_LEVEL)
    assert {key: type(data[key]) for key in data} == TOP_LEVEL
    assert data["studyCode"] == run.meta()["studyCode"]


@pytest.mark.parametrize("part", sorted(PROPERTY_KEYS))
def test_init_data_property_objects_have_exactly_the_spec_keys_with_explicit_nulls(lab: Lab, part: str) -> None:
    """jsonData (the pre-3.10 name of the input key) may be added (§7); nothing else, and nulls stay."""
    _, run = make_run(lab)
    properties = run.init_data().json[part]
    assert set(properties) - {"jsonData"} == PROPERTY_KEYS[part]
    assert isinstance(properties["id"], int) and not isinstance(properties["id"], bool)
    if part == "batchProperties":
        assert properties["maxTotalWorkers"] is None and properties["maxTotalMembers"] is None
        assert properties["batchInput"] is None


def test_init_data_describes_the_study_batch_and_requested_component(lab: Lab) -> None:
    study, run = make_run(lab, title="Tea", dir_name="tea", linearStudy=True,
                          batches=[batch(title="B1", maxTotalWorkers=50, maxActiveMembers=2)])
    run.go(uuids(study)[1])
    data = run.init_data().json
    s, b, c = data["studyProperties"], data["batchProperties"], data["componentProperties"]
    assert (s["id"], s["uuid"], s["title"], s["dirName"], s["linearStudy"], s["groupStudy"], s["locked"],
            s["allowPreview"]) == (study["id"], study["uuid"], "Tea", "tea", True, False, False, False)
    assert (b["id"], b["title"], b["maxTotalWorkers"], b["maxActiveMembers"]) == (
        study["batches"][0]["id"], "B1", 50, 2)
    assert (c["id"], c["uuid"], c["title"], c["htmlFilePath"], c["reloadable"]) == (
        study["components"][1]["id"], uuids(study)[1], "Component 2", "c2.html", False)


@pytest.mark.parametrize("description, expected", [
    ("Tests for JATOS' jatos.js development (אבטיח)",
     "ae880f0b46a4a1dddd30c278752358c14078562528fe6b33d6cbed3fe7e4195e"),
    ("héllo", hashlib.sha256("héllo".encode("latin-1")).hexdigest()),
    (None, None), ("", None)], ids=["tests.html vector", "latin-1", "null", "empty"])
def test_the_description_hash_is_sha256_of_latin1_bytes(lab: Lab, description: str | None,
                                                        expected: str | None) -> None:
    _, run = make_run(lab, description=description)
    assert run.init_data().json["studyProperties"]["descriptionHash"] == expected


def test_allowed_worker_types_come_in_jatos_hash_set_order(lab: Lab) -> None:
    """tests.html compares the array literally (§7)."""
    types = ["PersonalMultiple", "Jatos", "PersonalSingle"]
    _, run = make_run(lab, "pm", batches=[batch(allowedWorkerTypes=types)])
    assert run.init_data().json["batchProperties"]["allowedWorkerTypes"] == [
        "PersonalSingle", "Jatos", "PersonalMultiple"]


def test_the_component_list_has_every_component_in_position_order(lab: Lab) -> None:
    components = [{"title": "A", "htmlFilePath": "a.html", "reloadable": True},
                  {"title": "B", "htmlFilePath": "b.html", "active": False},
                  {"title": "C", "htmlFilePath": "c.html"}]
    study, run = make_run(lab, components=components)
    assert run.init_data().json["componentList"] == [
        {"id": c["id"], "uuid": c["uuid"], "title": c["title"], "active": c["active"],
         "reloadable": c["reloadable"], "position": i} for i, c in enumerate(study["components"], 1)]


def test_inputs_are_json_text_keeping_the_key_order(lab: Lab) -> None:
    text = '{"sa":"test","sb":5,"sc":[1,2,3],"sd":{"se":"foo","sf":"אבטיח"}}'
    z_first = '{"z":1,"a":2}'
    _, run = make_run(lab, studyInput=json.loads(text), batches=[batch(batchInput=json.loads(z_first))],
                      components=[{"title": "A", "htmlFilePath": "a.html", "componentInput": json.loads(z_first)}])
    data = run.init_data().json
    for value, expected in ((data["studyProperties"]["studyInput"], text),
                            (data["batchProperties"]["batchInput"], z_first),
                            (data["componentProperties"]["componentInput"], z_first)):
        assert isinstance(value, str)
        assert json.dumps(json.loads(value), separators=(",", ":"), ensure_ascii=False) == expected


def test_study_session_data_is_sent_as_the_stored_text(lab: Lab) -> None:
    study, run = make_run(lab)
    assert run.init_data().json["studySessionData"] == "{}"
    run.session('{"b": 1,  "a":[2]}')
    run.go(uuids(study)[1])
    assert run.init_data().json["studySessionData"] == '{"b": 1,  "a":[2]}'


@pytest.mark.parametrize("query, expected", [
    ("", {}),
    ("?PROLIFIC_PID=xyz&frameId=1", {"PROLIFIC_PID": "xyz", "frameId": "1"}),
    ("?a=b+c%26d&a=second&code=x&empty=", {"a": "b c&d", "code": "x", "empty": ""}),
    ("?n=%E4%BD%A0", {"n": "你"}),
], ids=["none", "prolific", "first value decoded", "utf-8"])
def test_url_query_parameters_are_the_start_requests_first_values(lab: Lab, query: str, expected: dict) -> None:
    _, run = make_run(lab, "gm", query)
    assert run.init_data().json["urlQueryParameters"] == expected


# --- §8 data endpoints, end, abort, end page ------------------------------------------------------


def test_study_session_data_is_stored_verbatim_without_validation(lab: Lab) -> None:
    study, run = make_run(lab)
    response = run.session("not json at all")
    assert response.body == b""
    run.go(uuids(study)[1])
    assert run.init_data().json["studySessionData"] == "not json at all"


def test_a_heartbeat_updates_last_seen_even_after_the_end(lab: Lab) -> None:
    _, run = make_run(lab)
    run.end(status=303)
    before = run.meta()["lastSeenDate"]
    time.sleep(0.01)
    response = run.browser.post(run.url("heartbeat"), b"", headers={"Content-Type": "text/plain"}, status=200)
    assert response.body == b""
    assert run.meta()["lastSeenDate"] > before


def test_result_data_put_replaces_and_post_appends(lab: Lab) -> None:
    _, run = make_run(lab)
    assert run.result_data("PUT", "first").body == b""
    run.result_data("PUT", "second")
    run.result_data("POST", ",third")
    run.result_data("POST", "—fourth")
    assert run.data() == "second,third—fourth\n"
    assert run.meta()["componentResults"][0]["data"]["size"] == len("second,third—fourth".encode())


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_empty_result_data_is_refused(lab: Lab, method: str) -> None:
    _, run = make_run(lab)
    refused(run.result_data(method, "", status=400), 400, "Result data empty")


@pytest.mark.parametrize("method, first", [("PUT", 0), ("POST", 4_000_000)], ids=["replace", "append"])
def test_result_data_beyond_the_limit_is_413_and_flags_the_quota(lab: Lab, method: str, first: int) -> None:
    """§8.3: limit 5 MB (JATOS's default) on the UTF-8 size, existing data counted when appending."""
    _, run = make_run(lab)
    if first:
        run.result_data("PUT", "a" * first)
    response = run.result_data(method, "b" * (5_000_001 - first), status=413)
    refused(response, 413, "Result data size exceeds allowed 5.0 MB. Consider using result files instead.")
    meta = run.meta()
    assert meta["isQuotaReached"] and meta["componentResults"][0]["isQuotaReached"]
    assert meta["componentResults"][0]["data"]["size"] == first


def test_end_unsuccessful_with_a_message_fails_the_run_and_shows_the_message(lab: Lab) -> None:
    _, run = make_run(lab)
    page = run.end("?successful=false&message=Participant%20declined", status=200)
    assert page.content_type == "text/html" and "Participant declined" in page.text
    meta = run.meta()
    assert (meta["studyState"], meta["message"]) == ("FAIL", "Participant declined")
    assert meta["endDate"] is not None and "confirmationCode" not in meta
    assert [cr["componentState"] for cr in meta["componentResults"]] == ["FAIL"]
    assert set_cookies(page)[f"JATOS_ID_{run.sr_id}"]["max-age"] == "0"
    assert not id_cookies(run.browser)


def test_a_successful_end_goes_to_the_end_page(lab: Lab) -> None:
    _, run = make_run(lab)
    redirect = run.end(status=303)
    assert redirect.headers["Location"] == run.url("final/endPage.html")
    assert set_cookies(redirect)[f"JATOS_ID_{run.sr_id}"]["max-age"] == "0"
    assert run.states() == ("FINISHED", ["FINISHED"])
    assert "This study is finished. Thank you for your participation." in redirect.follow(status=200).text


@pytest.mark.parametrize("worker_type", ["mt", "gm", "gs", "pm", "ps"])
def test_an_ajax_end_answers_200_with_the_confirmation_code_only_for_mturk(lab: Lab, worker_type: str) -> None:
    _, run = make_run(lab, worker_type)
    response = run.end(status=200, **AJAX)
    meta = run.meta()
    if worker_type == "mt":
        assert response.text == meta["confirmationCode"] and len(response.text) == 36
    else:
        assert response.body == b"" and "confirmationCode" not in meta
    assert meta["studyState"] == "FINISHED"


def test_an_mturk_end_sends_the_confirmation_code_to_the_end_page(lab: Lab) -> None:
    _, run = make_run(lab, "mt")
    redirect = run.end(status=303)
    code = run.meta()["confirmationCode"]
    assert redirect.headers["Location"] == run.url(f"final/endPage.html?confirmationCode={code}")
    page = redirect.follow(status=200)
    assert "Confirmation code:" in page.text and code in page.text


def test_an_unsuccessful_mturk_ajax_end_is_200_with_an_empty_body(lab: Lab) -> None:
    """§13 fix: JATOS answers 500 (null body); jatos-lite 200 and empty."""
    _, run = make_run(lab, "mt")
    assert run.end("?successful=false", status=200, **AJAX).body == b""
    assert run.meta()["studyState"] == "FAIL" and "confirmationCode" not in run.meta()


def test_abort_deletes_result_data_and_files_but_keeps_the_run(lab: Lab) -> None:
    study, run = make_run(lab)
    run.result_data("PUT", "one")
    run.upload("a.txt", b"file one")
    run.go(uuids(study)[1])
    run.result_data("PUT", "two")
    page = run.abort("?message=bye", status=200)
    assert "Cancelled Study" in page.text and "data were deleted" in page.text.lower()
    meta = run.meta()
    assert (meta["studyState"], meta["message"]) == ("ABORTED", "bye") and meta["endDate"] is not None
    assert [cr["componentState"] for cr in meta["componentResults"]] == ["ABORTED", "ABORTED"]
    assert all(cr["data"]["size"] == 0 and cr["files"] == [] for cr in meta["componentResults"])
    assert run.data() == ""
    assert set_cookies(page)[f"JATOS_ID_{run.sr_id}"]["max-age"] == "0"


@pytest.mark.parametrize("finish", ["end", "abort"])
def test_an_ajax_end_or_abort_is_200_empty_and_deletes_only_a_cookie_the_request_carries(lab: Lab,
                                                                                         finish: str) -> None:
    """§8.7/§5.2: another browser (without the run's cookie) ends the run but gets no cookie deletion."""
    _, run = make_run(lab)
    stranger = dataclasses.replace(run, browser=new_browser(lab))
    response = getattr(stranger, finish)(status=200, **AJAX)
    assert response.body == b""
    assert f"JATOS_ID_{run.sr_id}" not in set_cookies(response)
    assert run.meta()["studyState"] in ("FINISHED", "ABORTED")


def test_the_end_page_of_an_unfinished_run_is_400(lab: Lab) -> None:
    _, run = make_run(lab)
    refused(run.browser.get(run.url("final/endPage.html"), status=400), 400,
            f"The study result {run.sr} isn't finished yet.")


def test_the_end_redirect_url_is_filled_from_the_query_parameters(lab: Lab) -> None:
    _, run = make_run(lab, "gm", "?PROLIFIC_PID=a%20b",
                      endRedirectUrl="https://x.org/done?pid=[PROLIFIC_PID]&s=[SONA]")
    final = run.end(status=303).follow(status=303)
    assert final.headers["Location"] == "https://x.org/done?pid=a+b&s=undefined"


# --- §9 states, timestamps, calls after the end ---------------------------------------------------


def test_states_and_timestamps_follow_the_run(lab: Lab) -> None:
    study, run = make_run(lab)
    meta = run.meta()
    assert (meta["studyState"], meta["endDate"]) == ("STARTED", None)
    assert meta["startDate"] <= meta["componentResults"][0]["startDate"]
    assert meta["startDate"] <= meta["lastSeenDate"]
    run.init_data()
    assert run.states() == ("DATA_RETRIEVED", ["DATA_RETRIEVED"])
    run.go(uuids(study)[1])
    assert run.states() == ("DATA_RETRIEVED", ["FINISHED", "STARTED"])
    run.init_data()
    assert run.states() == ("DATA_RETRIEVED", ["FINISHED", "DATA_RETRIEVED"])
    run.end(status=303)
    meta = run.meta()
    assert run.states() == ("FINISHED", ["FINISHED", "FINISHED"])
    first, second = meta["componentResults"]
    assert first["endDate"] <= second["startDate"] <= second["endDate"] <= meta["endDate"]
    assert meta["startDate"] <= meta["endDate"]


def test_study_session_data_does_not_touch_last_seen(lab: Lab) -> None:
    _, run = make_run(lab)
    before = run.meta()["lastSeenDate"]
    time.sleep(0.01)
    run.session('{"x":1}')
    assert run.meta()["lastSeenDate"] == before


def call(run: Run, what: str, status: int | str) -> webtest.TestResponse:
    """One participant call on the run's current component."""
    comp = run.comp
    if what == "start":
        return run.browser.get(run.url(f"{comp}/start"), status=status)
    if what == "initData":
        return run.browser.get(run.url(f"{comp}/initData"), status=status)
    if what == "upload":
        return run.browser.post(run.url(f"{comp}/files/late.txt"), upload_files=[("file", "late.txt", b"x")],
                                status=status)
    method, tail = {"PUT resultData": ("PUT", "resultData"), "POST resultData": ("POST", "resultData"),
                    "log": ("POST", "log")}[what]
    return run.browser.request(run.url(f"{comp}/{tail}"), method=method, body=b"late", headers=TEXT, status=status)


@pytest.mark.parametrize("what", ["start", "initData", "PUT resultData", "POST resultData", "log", "upload"])
@pytest.mark.parametrize("finish", ["end", "abort"])
def test_run_calls_after_the_run_is_done_are_403(lab: Lab, what: str, finish: str) -> None:
    _, run = make_run(lab)
    run.result_data("PUT", "kept")
    getattr(run, finish)(status="*")
    refused(call(run, what, 403), 403, f"Study run is already finished (study result {run.sr_id})")
    assert run.data() == ("kept\n" if finish == "end" else "")


@pytest.mark.parametrize("worker_type", ["ps", "gs"])
@pytest.mark.parametrize("what", ["studySessionData", "end", "abort", "download"])
def test_single_workers_get_study_can_be_done_only_once_after_the_end(lab: Lab, worker_type: str,
                                                                     what: str) -> None:
    _, run = make_run(lab, worker_type)
    run.upload("a.txt", b"x")
    run.end(status=303)
    paths = {"end": run.url("end"), "abort": run.url("abort"), "download": run.url("files/a.txt")}
    if what == "studySessionData":
        response = run.session("{}", status=403)
    else:
        response = run.browser.get(paths[what], status=403)
    refused(response, 403, "Study can be done only once.")
    assert run.meta()["studyState"] == "FINISHED"


def test_a_general_multiple_run_may_still_write_its_session_and_repeat_end_after_the_end(lab: Lab) -> None:
    _, run = make_run(lab)
    run.end("?successful=false&message=first", status=200)
    run.session('{"late":true}', status=200)
    assert run.end(status=303).headers["Location"] == run.url("final/endPage.html")
    assert run.abort(status=200, **AJAX).body == b""
    meta = run.meta()
    assert (meta["studyState"], meta["message"]) == ("FAIL", "first"), "no state change on a done run"


def test_a_repeated_ajax_end_of_an_mturk_run_returns_the_stored_code(lab: Lab) -> None:
    _, run = make_run(lab, "mt")
    first = run.end(status=200, **AJAX).text
    assert run.end(status=200, **AJAX).text == first == run.meta()["confirmationCode"]


# --- §11.2-§11.3 headers ---------------------------------------------------------------------------


def test_the_favicon_browsers_ask_for_is_an_empty_answer_not_an_error(lab: Lab) -> None:
    answer = lab.client.get("/favicon.ico", status=204)
    assert answer.body == b"" and "max-age" in answer.headers["Cache-Control"]


def test_the_component_page_must_not_be_cached(lab: Lab) -> None:
    _, run = make_run(lab)
    assert run.page.content_type == "text/html" and run.page.charset.lower() == "utf-8"
    assert cache_directives(run.page) == {"no-cache", "no-store"}


DATA_CALLS = {
    "initData": lambda run: run.init_data(),
    "PUT resultData": lambda run: run.result_data("PUT", "x"),
    "POST resultData": lambda run: run.result_data("POST", "x"),
    "studySessionData": lambda run: run.session("{}"),
    "heartbeat": lambda run: run.browser.post(run.url("heartbeat"), b"", headers=TEXT),
    "log": lambda run: run.browser.post(run.url(f"{run.comp}/log"), b"hello", headers=TEXT),
    "upload": lambda run: run.upload("a.txt", b"x"),
    "download": lambda run: (run.upload("b.txt", b"x"), run.browser.get(run.url("files/b.txt")))[1],
    "Ajax end": lambda run: run.end(status=200, **AJAX),
}


@pytest.mark.parametrize("name", list(DATA_CALLS))
def test_data_endpoints_answer_no_store(lab: Lab, name: str) -> None:
    """§11.2: jatos-lite should send Cache-Control: no-store on initData and all data endpoints."""
    _, run = make_run(lab)
    response = DATA_CALLS[name](run)
    assert response.status_int == 200
    assert "no-store" in cache_directives(response)


def test_study_assets_are_private(lab: Lab) -> None:
    """§11.2: private as in JATOS; jatos-lite adds no-cache: a tablet keeps the file but asks
    whether it changed (a 304 answer carries no body), so an edited asset shows at once."""
    _, run = make_run(lab, dir_name="my_assets", files={"img/a.txt": "asset"})
    for path in ("/study_assets/my_assets/img/a.txt", run.url(f"{run.comp}/img/a.txt")):
        response = run.browser.get(path, status=200)
        assert response.text == "asset" and cache_directives(response) == {"private", "no-cache"}


def test_an_unchanged_asset_or_jatos_js_is_answered_304_without_a_body(lab: Lab) -> None:
    study, run = make_run(lab, dir_name="cached", files={"img/a.txt": "asset"})
    for path in ("/study_assets/cached/img/a.txt", run.url(f"{run.comp}/img/a.txt"), run.url(f"{run.comp}/jatos.js")):
        first = run.browser.get(path, status=200)
        assert first.headers["ETag"] and first.headers["Last-Modified"]
        again = run.browser.get(path, headers={"If-None-Match": first.headers["ETag"]}, status=304)
        assert again.body == b""
        since = run.browser.get(path, headers={"If-Modified-Since": first.headers["Last-Modified"]}, status=304)
        assert since.body == b""
        run.browser.get(path, headers={"If-None-Match": '"other"'}, status=200)


def test_an_edited_asset_is_sent_again(lab: Lab) -> None:
    study, run = make_run(lab, dir_name="edited", files={"img/a.txt": "first"})
    tag = run.browser.get("/study_assets/edited/img/a.txt", status=200).headers["ETag"]
    (lab.client.app.config["jatos_lite.config"].studies / "edited" / "img" / "a.txt").write_text("second, longer")
    response = run.browser.get("/study_assets/edited/img/a.txt", headers={"If-None-Match": tag}, status=200)
    assert response.text == "second, longer" and response.headers["ETag"] != tag


def test_result_files_are_never_answered_from_a_cache(lab: Lab) -> None:
    _, run = make_run(lab)
    run.browser.post(run.url(f"{run.comp}/files/a.txt"), upload_files=[("file", "a.txt", b"data")], status=200)
    response = run.browser.get(run.url("files/a.txt"), headers={"If-None-Match": "*"}, status=200)
    assert response.body == b"data" and "ETag" not in response.headers


def test_jatos_js_next_to_the_component_page_is_private(lab: Lab) -> None:
    """§11.2: private as in JATOS; jatos-lite adds no-cache so an updated jatos.js is used at once."""
    _, run = make_run(lab)
    response = run.browser.get(run.url(f"{run.comp}/jatos.js"), status=200)
    assert cache_directives(response) == {"private", "no-cache"}


@pytest.mark.parametrize("where", ["component", "fixed"])
def test_jatos_js_is_served_as_javascript(lab: Lab, where: str) -> None:
    _, run = make_run(lab)
    path = run.url(f"{run.comp}/jatos.js") if where == "component" else "/assets/javascripts/jatos.js"
    response = run.browser.get(path, status=200)
    assert response.content_type in ("application/javascript", "text/javascript")
    assert b"jatos" in response.body


def publix_answers(lab: Lab) -> dict[str, webtest.TestResponse]:
    """One answer of every kind a participant's browser sees in a run."""
    _, run = make_run(lab)
    answers = {"run start": run.start_response, "component page": run.page,
               "initData": run.init_data(), "resultData": run.result_data("PUT", "x"),
               "heartbeat": run.browser.post(run.url("heartbeat"), b"", headers=TEXT),
               "jatos.js": run.browser.get(run.url(f"{run.comp}/jatos.js")),
               "error": run.browser.get(run.url("undefined/start"), status=403)}
    answers["end"] = run.end(status=303)
    answers["end page"] = answers["end"].follow(status=200)
    return answers


ANSWERS = ["run start", "component page", "initData", "resultData", "heartbeat", "jatos.js", "error", "end",
           "end page"]


@pytest.mark.parametrize("answer", ANSWERS)
def test_publix_answers_carry_the_frame_and_referrer_headers_but_no_nosniff(lab: Lab, answer: str) -> None:
    """§11.3: X-Frame-Options SAMEORIGIN and Play's Referrer-Policy; X-Content-Type-Options deliberately not."""
    response = publix_answers(lab)[answer]
    assert response.headers.get("X-Frame-Options") == "SAMEORIGIN"
    assert response.headers.get("Referrer-Policy") == "origin-when-cross-origin, strict-origin-when-cross-origin"
    assert "X-Content-Type-Options" not in response.headers


def test_publix_answers_carry_plays_default_xss_and_cross_domain_headers(lab: Lab) -> None:
    for name, response in publix_answers(lab).items():
        assert response.headers.get("X-XSS-Protection") == "1; mode=block", name
        assert response.headers.get("X-Permitted-Cross-Domain-Policies") == "master-only", name


@pytest.mark.parametrize("answer", ["run start", "component page", "end page"])
def test_pages_that_run_study_code_have_no_content_security_policy(lab: Lab, answer: str) -> None:
    """§11.3: jatos-lite must not put a restrictive CSP on the component start page or the end page."""
    assert "Content-Security-Policy" not in publix_answers(lab)[answer].headers


@pytest.mark.parametrize("channel", ["batch/open", "group/join"])
def test_a_websocket_attempt_at_a_channel_gets_a_clean_400(lab: Lab, channel: str) -> None:
    """§8.11: a client trying a WebSocket gives up at once; jatos-lite's channels open with POST."""
    _, run = make_run(lab)
    response = run.browser.get(run.url(channel), status=400)
    assert "POST" in response.text
