"""jatos.js in a real browser (the system Chromium, headless) against a real server: every
name of the JATOS 3.10 API outside the channels, the ordered request queue, and what the
server stored (publix-http.md §6-§11, DESIGN.md §5).

The test study (tests/studies/jsapi) has three reloadable components that all show the
same page; the tests call jatos.* through page.evaluate and check both what the page saw
and what the server stored."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import pytest

from conftest import LiveServer, Participant, RemoteLab, make_jzip

pytest.importorskip("playwright.sync_api")

ASSETS = Path(__file__).parent / "studies" / "jsapi"
BATCH = {"uuid": None, "title": "Lab batch", "active": True, "maxActiveMembers": None, "maxTotalMembers": None,
         "maxTotalWorkers": None, "allowedWorkerTypes": ["GeneralMultiple", "PersonalSingle"], "comments": None,
         "batchInput": '{"b":1}'}


def jsapi_archive(**study: object) -> bytes:
    components = [{"title": title, "htmlFilePath": "page.html", "reloadable": True,
                   "componentInput": json.dumps({"c": number})}
                  for number, title in enumerate(("First", "Second", "Third"), start=1)]
    files = {path.name: path.read_bytes() for path in ASSETS.iterdir()}
    return make_jzip(title="jatos.js API", dir_name=f"jsapi_{uuid.uuid4().hex[:6]}", components=components,
                     files=files, batches=[{**BATCH, "uuid": str(uuid.uuid4())}], studyInput='{"s":1}', **study)


@pytest.fixture
def lab(live_server: LiveServer) -> RemoteLab:
    return RemoteLab(live_server)


@pytest.fixture
def study_id(lab: RemoteLab) -> int:
    return lab.import_study(jsapi_archive())


@pytest.fixture
def participant(chromium, lab: RemoteLab, study_id: int, live_server: LiveServer):
    context = chromium.new_context()
    page = context.new_page()
    page.goto(f"{live_server.url}/publix/{lab.code(study_id)}?lang=de&frameId=7")
    yield Participant(page, lab).ready()
    context.close()


def leave(participant: Participant, action: str) -> None:
    """Run `action`, which leaves the page, and wait until the next page has loaded."""
    with participant.page.expect_navigation():
        participant.js(f"setTimeout(() => {{ {action}; }}, 0)")


def next_page(participant: Participant, action: str) -> Participant:
    """Run `action` and wait for the next component's onLoad."""
    leave(participant, action)
    return participant.ready()


# --- variables (publix-http.md §7) -----------------------------------------------------------


def test_ids_properties_and_inputs(participant: Participant, lab: RemoteLab, study_id: int) -> None:
    """IDs come from the ID cookie as strings; inputs are parsed JSON; properties have no inputs."""
    values = participant.js("""() => ({
        ids: [jatos.studyId, jatos.componentId, jatos.batchId, jatos.workerId, jatos.studyResultId,
              jatos.componentResultId].map(v => typeof v),
        studyId: jatos.studyId, componentPos: jatos.componentPos, studyLength: jatos.studyLength,
        titles: jatos.componentList.map(c => c.title), study: jatos.studyProperties.title,
        component: jatos.componentProperties.title, batch: jatos.batchProperties.title,
        inputs: [jatos.studyJsonInput, jatos.studyInput, jatos.componentJsonInput, jatos.componentInput,
                 jatos.batchJsonInput, jatos.batchInput],
        studyPropertiesHaveInput: "studyInput" in jatos.studyProperties,
        query: jatos.urlQueryParameters, code: jatos.studyCode, session: jatos.studySessionData,
        version: typeof jatos.version, workerType: jatos.workerType, same: window.jatos === jatos,
        settings: [jatos.httpTimeout, jatos.httpRetry, jatos.httpRetryWait, typeof jatos.waitSendDataOverlayConfig]
    })""")
    assert values["ids"] == ["string"] * 6 and values["studyId"] == str(study_id)
    assert (values["componentPos"], values["studyLength"], values["titles"]) == (1, 3, ["First", "Second", "Third"])
    assert (values["study"], values["component"], values["batch"]) == ("jatos.js API", "First", "Lab batch")
    assert values["inputs"] == [{"s": 1}, {"s": 1}, {"c": 1}, {"c": 1}, {"b": 1}, {"b": 1}]
    assert values["studyPropertiesHaveInput"] is False
    assert values["query"] == {"lang": "de", "frameId": "7"}
    assert len(values["code"]) == 11 and values["session"] == {} and values["version"] == "string"
    assert values["workerType"] == "GeneralMultiple" and values["same"] is True
    assert values["settings"][:3] == [30000, 5, 1000] and values["settings"][3] == "object"


def test_add_jatos_ids(participant: Participant) -> None:
    added = participant.js("jatos.addJatosIds({answer: 42})")
    assert added["answer"] == 42
    assert {"studyId", "componentId", "studyResultId", "componentResultId", "workerId", "batchId"} <= set(added)


# --- result data and the request queue (§6.3, §8; DESIGN.md §5) ----------------------------------


def test_two_hundred_rapid_appends_arrive_complete_and_in_order(participant: Participant) -> None:
    """Calls made in one go leave in call order, one at a time; all 200 resolve and are stored once."""
    order = participant.js("""() => {
        const done = [];
        const calls = [];
        for (let i = 0; i < 200; i++) calls.push(jatos.appendResultData("[" + i + "]").then(() => done.push(i)));
        return Promise.all(calls).then(() => done);
    }""")
    assert order == list(range(200))
    assert participant.stored() == "".join(f"[{i}]" for i in range(200)) + "\n"


def test_submit_overwrites_and_callbacks_come_before_promises(participant: Participant) -> None:
    """submitResultData replaces; the success callback runs before the promise settles;
    returned promises also offer done/fail/always (jQuery style, as old studies use)."""
    seen = participant.js("""async () => {
        const seen = [];
        await jatos.appendResultData("old");
        const promise = jatos.submitResultData({a: 1}, () => seen.push("callback"));
        seen.push(typeof promise.done, typeof promise.fail, typeof promise.always);
        await promise.then(() => seen.push("promise"));
        await new Promise(r => jatos.appendResultData("!").done(() => seen.push("done")).always(r));
        return seen;
    }""")
    assert seen == ["function", "function", "function", "callback", "promise", "done"]
    assert participant.stored() == '{"a":1}!\n'


def test_too_large_data_is_final_and_shows_the_overlay(participant: Participant) -> None:
    """413 is not retried: the error callback and a rejected promise, and JATOS's overlay."""
    outcome = participant.js("""async () => {
        let callback = null;
        const rejected = await jatos.appendResultData("x".repeat(5000001), null, e => callback = e)
            .then(() => false, () => true);
        return {callback: callback !== null, rejected: rejected};
    }""")
    assert outcome == {"callback": True, "rejected": True}
    participant.page.wait_for_selector("text=too large", timeout=5_000)
    assert participant.stored() == "\n" or participant.stored() == ""


def test_study_session_is_kept_across_components(participant: Participant) -> None:
    participant.js("jatos.setStudySessionData({visits: 1, list: [1, 2]})")
    next_page(participant, "jatos.startNextComponent()")
    assert participant.js("jatos.studySessionData") == {"visits": 1, "list": [1, 2]}
    participant.js("jatos.studySessionData.visits = 2")
    next_page(participant, "jatos.startNextComponent()")
    assert participant.js("jatos.studySessionData.visits") == 2, "startComponent posts the session before leaving"


def test_log_and_errors_reach_the_server(participant: Participant) -> None:
    """log POSTs to the component's log; after catchAndLogErrors, uncaught errors, rejected
    promises and console warnings do too (logError only warns that it is abolished, as in 3.10)."""
    logged: list[str] = []
    participant.page.on("request", lambda r: logged.append(r.post_data or "") if r.url.endswith("/log") else None)
    participant.js("""async () => {
        jatos.catchAndLogErrors();
        await jatos.log("plain message");
        jatos.logError("old style");
        setTimeout(() => { throw new Error("uncaught boom"); }, 0);
        Promise.reject(new Error("rejected boom"));
        await new Promise(r => setTimeout(r, 500));
    }""")
    participant.page.wait_for_timeout(500)
    for expected in ("plain message", "jatos.logError is abolished", "uncaught boom", "rejected boom"):
        assert any(expected in text for text in logged), (expected, logged)


def test_heartbeat_period_can_be_set(participant: Participant) -> None:
    beats: list[float] = []
    participant.page.on("request", lambda r: beats.append(time.monotonic()) if r.url.endswith("/heartbeat") else None)
    participant.js("jatos.setHeartbeatPeriod(200)")
    participant.page.wait_for_timeout(1200)
    assert len(beats) >= 3



def test_the_heartbeat_beats_from_a_worker_while_another_tab_is_in_front(participant: Participant) -> None:
    """Page timers of background tabs are throttled to once a minute or less; a Web Worker's are not."""
    page = participant.page
    assert any(worker.url.startswith("blob:") for worker in page.workers), "the heartbeat runs in a Web Worker"
    beats: list[float] = []
    page.on("request", lambda r: beats.append(time.monotonic()) if r.url.endswith("/heartbeat") else None)
    participant.js("jatos.setHeartbeatPeriod(200)")
    other = page.context.new_page()
    other.bring_to_front()
    print("background page is", participant.js("document.visibilityState"))
    other.wait_for_timeout(1200)
    assert len(beats) >= 3


# --- files (§8.5-§8.6) --------------------------------------------------------------------------


def test_upload_and_download_of_blobs_strings_and_objects(participant: Participant) -> None:
    """uploadResultFile takes a Blob, a string or an object; downloadResultFile gives text as a
    string, JSON as an object, anything else as a Blob; both signatures (name; component, name)."""
    participant.js("""async () => {
        await jatos.uploadResultFile(new Blob([new Uint8Array([0, 1, 255])]), "bytes.bin");
        await jatos.uploadResultFile("just text", "note.txt");
        await jatos.uploadResultFile({answer: [1, 2]}, "answer.json");
    }""")
    next_page(participant, "jatos.startNextComponent()")
    got = participant.js("""async () => {
        const text = await jatos.downloadResultFile(1, "note.txt");
        const object = await jatos.downloadResultFile("answer.json");
        const blob = await jatos.downloadResultFile("bytes.bin");
        return {text: text, object: object, blob: blob instanceof Blob,
                bytes: Array.from(new Uint8Array(await blob.arrayBuffer()))};
    }""")
    assert got == {"text": "just text", "object": {"answer": [1, 2]}, "blob": True, "bytes": [0, 1, 255]}


def test_a_20_megabyte_upload_downloads_byte_identical(participant: Participant) -> None:
    size = 20 * 1024 * 1024
    expected = hashlib.sha256(bytes(i * 7 % 251 for i in range(251)) * (size // 251) +
                              bytes(i * 7 % 251 for i in range(size % 251))).hexdigest()
    participant.js("""async (size) => {
        const data = new Uint8Array(size);
        for (let i = 0; i < size; i++) data[i] = (i % 251) * 7 % 251;
        await jatos.uploadResultFile(new Blob([data]), "big.bin");
    }""", size)
    next_page(participant, "jatos.startNextComponent()")
    digest = participant.js("""async () => {
        const blob = await jatos.downloadResultFile(1, "big.bin");
        const hash = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
        return Array.from(new Uint8Array(hash)).map(b => b.toString(16).padStart(2, "0")).join("");
    }""")
    assert digest == expected


# --- component flow (§6) ---------------------------------------------------------------------


@pytest.mark.parametrize("action, landing, data", [
    ("jatos.startNextComponent('n')", "Second", "n"), ("jatos.startComponentByPos(3, 'p')", "Third", "p"),
    ("jatos.startComponentByTitle('Second', 't')", "Second", "t"), ("jatos.startLastComponent('l')", "Third", "l"),
    ("jatos.startComponent(jatos.componentList[2].uuid, 'u', 'via message')", "Third", "u"),
    ("jatos.startComponent(jatos.componentList[1].id)", "Second", ""),
])
def test_starting_components(participant: Participant, action: str, landing: str, data: str) -> None:
    """Each start function reaches its component in the same run; result data given to it is
    appended to the component left."""
    first_sr = participant.sr_id
    next_page(participant, action)
    assert participant.where() == landing
    assert participant.sr_id == first_sr
    assert participant.stored() == (data + "\n" if data else "")


def test_starting_waits_for_pending_data_with_the_overlay(participant: Participant, live_server) -> None:
    """A slow append: startNextComponent shows "Sending data. Please wait." and leaves only after it."""
    participant.js("""() => {
        const send = window.fetch;
        window.fetch = (url, options) => String(url).endsWith("resultData")
            ? new Promise(r => setTimeout(r, 2500)).then(() => send(url, options)) : send(url, options);
    }""")
    with participant.page.expect_navigation(timeout=10_000):
        participant.js("jatos.appendResultData('slow'); jatos.startNextComponent()")
        participant.page.wait_for_selector("text=Sending data. Please wait.", timeout=5_000)
    participant.ready()
    assert participant.where() == "Second" and participant.stored().startswith("slow")


def test_an_unknown_component_calls_the_error_callback(participant: Participant) -> None:
    errors = participant.js("""() => {
        const errors = [];
        jatos.startComponentByPos(9, null, e => errors.push(e));
        jatos.startComponentByTitle("Nope", null, "msg", e => errors.push(e));
        return errors;
    }""")
    assert errors == ["Component position does not exist", "Component with title Nope does not exist"]


# --- ending and aborting (§8.8-§8.10) --------------------------------------------------------------


@pytest.mark.parametrize("action, state, message, leaves", [
    ("jatos.endStudy()", "FINISHED", None, True),
    ("jatos.endStudy(false, 'it failed')", "FAIL", "it failed", True),
    ("jatos.endStudy('final data', true, 'done')", "FINISHED", "done", True),
    ("jatos.endStudyAjax(true, 'ajax')", "FINISHED", "ajax", False),
    ("jatos.endStudyAjax('ajax data', false)", "FAIL", None, False),
    ("jatos.endStudyWithoutRedirect(true, 'quiet')", "FINISHED", "quiet", False),
])
def test_end_variants(participant: Participant, action: str, state: str, message: str | None, leaves: bool) -> None:
    """Ending with a page change shows the study's own end page (an unsuccessful end shows
    its message instead); the Ajax variants stay on the page."""
    sr_id = participant.sr_id
    if leaves:
        leave(participant, action)
        shown = participant.page.content()
        assert ("The study's own end page" in shown) if state == "FINISHED" else (message in shown)
    else:
        participant.js(f"Promise.resolve({action})")
        participant.page.wait_for_timeout(300)
        assert participant.where() == "First"
    meta = participant.lab.metadata(sr_id)
    assert meta["studyState"] == state
    assert meta.get("message") == message
    if "data" in action:
        assert "data" in participant.lab.data(sr_id)


def test_end_study_and_redirect(participant: Participant, live_server) -> None:
    target = f"{live_server.url}/ping"
    sr_id = participant.sr_id
    leave(participant, f"jatos.endStudyAndRedirect('{target}', 'last words', true, 'redirected')")
    assert participant.page.url == target
    meta = participant.lab.metadata(sr_id)
    assert (meta["studyState"], meta["message"]) == ("FINISHED", "redirected")
    assert participant.lab.data(sr_id).startswith("last words")


def put_data_and_file(participant: Participant) -> int:
    participant.js("Promise.all([jatos.submitResultData('secret'), jatos.uploadResultFile('x', 'f.txt')])")
    return participant.sr_id


@pytest.mark.parametrize("action, leaves", [
    ("jatos.abortStudy('stopped')", True),
    ("jatos.abortStudyAjax('stopped')", False),
    ("jatos.abortStudyWithoutRedirect('stopped')", False),
    ("jatos.abortStudyAndRedirect(location.origin + '/ping', 'stopped')", True),
])
def test_abort_variants_delete_data_and_files(participant: Participant, live_server, action: str,
                                              leaves: bool) -> None:
    sr_id = put_data_and_file(participant)
    if leaves:
        leave(participant, action)
    else:
        participant.js(f"Promise.resolve({action})")
        participant.page.wait_for_timeout(300)
    meta = participant.lab.metadata(sr_id)
    assert (meta["studyState"], meta["message"]) == ("ABORTED", "stopped")
    assert participant.lab.data(sr_id).strip() == ""
    assert not (live_server.config.uploads / str(sr_id)).exists() or \
        not any((live_server.config.uploads / str(sr_id)).rglob("f.txt"))


def test_abort_button_asks_then_aborts(participant: Participant) -> None:
    sr_id = put_data_and_file(participant)
    participant.js("jatos.addAbortButton({text: 'Quit', confirmText: 'Really quit?', msg: 'quit by button'})")
    dialogs: list[str] = []
    participant.page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    with participant.page.expect_navigation():
        participant.page.click("text=Quit")
    assert dialogs == ["Really quit?"]
    assert participant.lab.metadata(sr_id)["studyState"] == "ABORTED"


# --- overlays and the unload warning (§6.4) ---------------------------------------------------------


def test_overlays(participant: Participant) -> None:
    participant.js("jatos.showOverlay({text: 'First overlay', showImg: false})")
    participant.page.wait_for_selector("text=First overlay")
    participant.js("jatos.removeOverlay()")
    participant.page.wait_for_selector("text=First overlay", state="detached")
    participant.js("jatos.showOverlay({text: 'A'}); jatos.showOverlay({text: 'B'})")
    participant.js("jatos.removeOverlays()")
    assert participant.page.locator("text=B").count() == 0


def test_before_unload_warning(participant: Participant) -> None:
    participant.js("jatos.showBeforeUnloadWarning(true)")
    participant.page.click("#where")  # a page without user activation may not ask
    dialogs: list[str] = []
    participant.page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.dismiss()))
    participant.page.close(run_before_unload=True)
    participant.page.wait_for_timeout(500)
    assert dialogs == ["beforeunload"]


# --- surviving the network (DESIGN.md §5) -------------------------------------------------------------


def test_server_stopped_for_ten_seconds_loses_no_append(chromium, lab: RemoteLab, study_id: int,
                                                        live_server: LiveServer) -> None:
    """Appends made while the server is down wait and arrive, in order, once it is back."""
    context = chromium.new_context()
    page = context.new_page()
    page.goto(f"{live_server.url}/publix/{lab.code(study_id)}")
    participant = Participant(page, lab).ready()
    participant.js("for (let i = 0; i < 10; i++) jatos.appendResultData('[' + i + ']')")
    participant.page.wait_for_timeout(500)
    port = live_server.server.effective_port
    live_server.close()
    participant.js("void (window.late = Promise.all([10, 11, 12].map(i => jatos.appendResultData('[' + i + ']'))))")
    time.sleep(10)
    restarted = LiveServer(live_server.config, port=port)
    try:
        participant.js("window.late")
        expected = "".join(f"[{i}]" for i in range(13)) + "\n"
        assert RemoteLab(restarted).data(participant.sr_id) == expected
    finally:
        restarted.close()
        context.close()


def test_a_reload_sends_unacknowledged_data_once(participant: Participant) -> None:
    """An append whose answer never came is kept in sessionStorage and sent again after a reload;
    the server applies it once although the first attempt did arrive."""
    participant.js("""() => {
        const send = window.fetch;
        window.fetch = (url, options) => String(url).endsWith("resultData")
            ? send(url, options).then(() => { throw new TypeError("answer lost"); }) : send(url, options);
    }""")
    participant.js("void jatos.appendResultData('[kept]')")
    participant.page.wait_for_timeout(300)
    assert participant.stored() == "[kept]\n", "the first attempt arrived"
    pending = participant.js("Object.keys(sessionStorage).filter(k => k.startsWith('jatos-lite:pending'))")
    assert len(pending) == 1
    participant.page.on("dialog", lambda dialog: dialog.accept())  # "leave the page?" while data is pending
    participant.page.reload()
    participant.ready()
    participant.page.wait_for_function("!Object.keys(sessionStorage).some(k => k.startsWith('jatos-lite:pending'))",
                                       timeout=10_000)
    assert participant.stored() == "[kept]\n"


def test_the_http_loop_counter_counts_data_requests(participant: Participant) -> None:
    assert participant.js("""async () => {
        const before = jatos.getHttpLoopCounter();
        await Promise.all([jatos.appendResultData("a"), jatos.appendResultData("b"), jatos.setStudySessionData({})]);
        return jatos.getHttpLoopCounter() - before;
    }""") == 3
