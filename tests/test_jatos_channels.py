"""jatos.js's batch and group channels in real browser pages (the system Chromium, headless)
against a real server: every batch and group session function, joining, fixing, leaving and
reassigning groups, messages, member events, connection callbacks, and what the server
stored (channels.md §1-§6, carried by the long-poll transport of §7).

Each participant is a page in its own browser context (its own cookies, as on its own
tablet) showing tests/studies/channels/page.html, which notes every callback in
`window.seen`."""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

import pytest

import jatos_lite
from conftest import LiveServer, Participant, RemoteLab, make_jzip

pytest.importorskip("playwright.sync_api")

PAGE = (Path(__file__).parent / "studies" / "channels" / "page.html").read_text()


class Lab(RemoteLab):
    def __init__(self, server: LiveServer, browser):
        super().__init__(server)
        self.server = server
        self.browser = browser
        self.contexts: list = []

    def study(self, **batch: object) -> tuple[int, int]:
        """A group study with one batch (limits as given): (study ID, batch ID)."""
        batch = {"uuid": str(uuid.uuid4()), "title": "Default", "active": True, "maxActiveMembers": None,
                 "maxTotalMembers": None, "maxTotalWorkers": None, "allowedWorkerTypes": ["GeneralMultiple"],
                 "comments": None, "batchInput": None, **batch}
        components = [{"title": "Play", "htmlFilePath": "page.html", "reloadable": True}]
        study_id = self.import_study(make_jzip(title="Channels", dir_name=f"ch_{uuid.uuid4().hex[:6]}",
                                               components=components, files={"page.html": PAGE},
                                               batches=[batch], groupStudy=True))
        return study_id, self.api("GET", f"/studies/{study_id}/batches")["data"][0]["id"]

    def participant(self, code: str, fast: bool = False, route: tuple | None = None) -> Participant:
        """A new browser (context) on the link; `fast` shortens the channel timings;
        `route` = (pattern, handler) is installed before the page loads."""
        context = self.browser.new_context()
        self.contexts.append(context)
        if fast:
            context.add_init_script("window.fastChannels = true;")
        page = context.new_page()
        if route:
            page.route(*route)
        page.goto(f"{self.base}/publix/{code}")
        return Participant(page, self).ready()

    def group(self, study_id: int, count: int, **options: object) -> list[Participant]:
        """`count` participants on one link who have all joined a group."""
        code = self.code(study_id)
        members = [self.participant(code, **options) for _ in range(count)]
        for member in members:
            join(member)
        return members

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def lab(live_server: LiveServer, chromium):
    lab = Lab(live_server, chromium)
    yield lab
    lab.close()


def seen(participant: Participant, name: str) -> list[list]:
    """The arguments of every call of one callback so far."""
    return [entry[1:] for entry in participant.js("window.seen") if entry[0] == name]


def wait_until(condition, timeout: float = 10, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {message}")
        time.sleep(0.05)


def join(participant: Participant) -> None:
    participant.js("jatos.joinGroup(window.groupCallbacks)")
    wait_until(lambda: seen(participant, "onOpen"), message="onOpen")


def group_close_reason(lab: Lab, member_id: str) -> str | None:
    """Why the server closed a member's group conn (None while it is open)."""
    store = jatos_lite.Store(lab.server.config.db_path)
    try:
        with store.snapshot() as db:
            return db.value("SELECT close_reason FROM channel_conns WHERE kind = 'group' AND study_result_id = ?",
                            int(member_id))
    finally:
        store.close()


def settle(participant: Participant, call: str) -> str:
    """Run a call that returns a promise: 'ok' or the rejection text."""
    return participant.js(f"{call}.then(() => 'ok', reason => 'failed: ' + reason)")


# --- the batch channel ---------------------------------------------------------------------------


def test_batch_session_functions_reach_every_page(lab: Lab) -> None:
    study_id, batch_id = lab.study()
    code = lab.code(study_id)
    a, b = lab.participant(code), lab.participant(code)
    steps = ["jatos.batchSession.set('a', 1)", "jatos.batchSession.add('/list', [1, 2])",
             "jatos.batchSession.replace('/a', 2)", "jatos.batchSession.copy('/a', '/b')",
             "jatos.batchSession.move('/b', '/c')", "jatos.batchSession.remove('/list/0')"]
    for step in steps:
        assert settle(a, step) == "ok", step
    expected = {"a": 2, "list": [2], "c": 2}
    wait_until(lambda: b.js("jatos.batchSession.getAll()") == expected, message="b sees every patch")
    assert a.js("jatos.batchSession.getAll()") == expected
    assert b.js("[jatos.batchSession.get('a'), jatos.batchSession.find('/list/0'), jatos.batchSession.test('/c', 2),"
                " jatos.batchSession.defined('/b'), jatos.batchSession.defined('/c')]") == [2, 2, True, False, True]
    wait_until(lambda: len(seen(b, "onBatchSession")) == 6)
    assert seen(b, "onBatchSession") == [["/a", "add"], ["/list", "add"], ["/a", "replace"], ["/b", "copy"],
                                         ["/c", "move"], ["/list/0", "remove"]]
    assert settle(a, "jatos.batchSession.setAll({x: {y: 1}})") == "ok"
    wait_until(lambda: b.js("jatos.batchSession.getAll()") == {"x": {"y": 1}})
    assert lab.api("GET", f"/batches/{batch_id}/session")["data"]["sessionData"] == {"x": {"y": 1}}
    assert settle(a, "jatos.batchSession.clear()") == "ok"
    wait_until(lambda: b.js("jatos.batchSession.getAll()") == {})
    assert seen(b, "onBatchSession")[-1] == ["/", "remove"], "clear is 'remove /' on the wire, as in JATOS"
    assert lab.api("GET", f"/batches/{batch_id}/session")["data"]["sessionData"] == {}


def test_batch_session_callbacks_versioning_and_refusals(lab: Lab) -> None:
    study_id, _ = lab.study()
    a = lab.participant(lab.code(study_id))
    assert a.js("""new Promise(resolve => jatos.batchSession.set('k', 1, () => resolve('success callback'),
                                                                 () => resolve('fail callback')))""") \
        == "success callback"
    assert a.js("""async () => {
        const first = jatos.batchSession.set('p', 1), second = jatos.batchSession.set('q', 2);
        return [await first.then(() => 'ok'), await second.then(() => 'ok', reason => String(reason))];
    }""") == ["ok", "Can send only one batch session patch at a time."], "versioning allows one patch in flight"
    assert a.js("""async () => {
        jatos.batchSessionVersioning = false;
        const sent = [jatos.batchSession.set('p', 3), jatos.batchSession.set('q', 4)];
        await Promise.all(sent);
        return jatos.batchSession.getAll();
    }""") == {"k": 1, "p": 3, "q": 4}
    assert a.js("""new Promise(resolve => jatos.batchSession.replace('/missing', 1, () => resolve('success'),
                                                                     reason => resolve(String(reason))))""") \
        == "Batch session update failed", "an invalid patch is refused and calls the fail callback"


def test_a_stale_version_fails_and_the_page_catches_up(lab: Lab) -> None:
    """A page whose copy is behind (its polls were held while a researcher edited the
    session) gets SESSION_FAIL for its patch, then the new data."""
    study_id, batch_id = lab.study()
    held: list = []

    def hold(route) -> None:
        if held is not None:
            held.append(route)
        else:
            route.continue_()

    a = lab.participant(lab.code(study_id), route=("**/channels/poll*", hold))
    # playwright runs route handlers only inside its own calls: make one each time round
    wait_until(lambda: a.js("true") and held, message="a poll to hold")
    lab.api("PATCH", f"/batches/{batch_id}/session", {"admin": 1})
    a.js("void (window.outcome = jatos.batchSession.set('mine', 1).then(() => 'ok', r => String(r)))")
    for route in held:
        route.continue_()
    held = None
    wait_until(lambda: a.js("window.outcome") is not None, message="an answer to the stale patch")
    assert a.js("window.outcome") == "Batch session update failed"
    wait_until(lambda: a.js("jatos.batchSession.getAll()") == {"admin": 1}, message="the page's copy resynced")
    assert settle(a, "jatos.batchSession.set('mine', 2)") == "ok", "with the new version the patch goes through"


def test_a_counter_incremented_by_twenty_workers_one_after_another(lab: Lab) -> None:
    """onLoad comes after the batch channel is open, so each worker sees the previous count."""
    study_id, batch_id = lab.study()
    code = lab.code(study_id)
    for number in range(20):
        worker = lab.participant(code)
        assert worker.js("window.batchAtLoad") == ({} if number == 0 else {"count": number})
        assert settle(worker, "jatos.batchSession.set('count', (jatos.batchSession.get('count') || 0) + 1)") == "ok"
        with worker.page.expect_navigation():
            worker.js("setTimeout(() => jatos.endStudy(), 0)")
        worker.page.context.close()
        lab.contexts.remove(worker.page.context)
    assert lab.api("GET", f"/batches/{batch_id}/session")["data"]["sessionData"] == {"count": 20}


def test_onload_comes_even_when_the_batch_channel_cannot_open(lab: Lab) -> None:
    study_id, _ = lab.study()
    page = lab.participant(lab.code(study_id), route=("**/batch/open", lambda route: route.abort()))
    assert page.js("document.getElementById('state').textContent") == "loaded"
    assert page.js("jatos.batchSession.getAll()") == {}


def request_name(url: str) -> str:
    """What a publix request is: 'jatos.js', 'initData', 'batch/open', ..."""
    return "batch/open" if url.endswith("/batch/open") else url.rsplit("/", 1)[-1]


def test_the_batch_channel_opens_while_the_init_data_loads(lab: Lab) -> None:
    """Between a component's HTML and jatos.onLoad the page waits for three requests but only
    two round trips: jatos.js, then initData and batch/open together (issue #15 point 4);
    onLoad still comes only once both are answered, with the batch session there."""
    study_id, batch_id = lab.study()
    lab.api("PATCH", f"/batches/{batch_id}/session", {"ready": True})
    def slow_init_data(route) -> None:  # a busy Wi-Fi: a sequential open would start only after this
        time.sleep(0.3)
        route.continue_()

    page = lab.participant(lab.code(study_id), route=("**/initData*", slow_init_data))
    html_end, loaded_at = page.js("[performance.getEntriesByType('navigation')[0].responseEnd, window.loadedAt]")
    entries = page.js("performance.getEntriesByType('resource')"
                      ".map(e => ({name: e.name.split('?')[0], start: e.startTime, end: e.responseEnd}))")
    awaited = [entry for entry in entries if "/publix/" in entry["name"]
               and html_end <= entry["start"] and entry["end"] <= loaded_at]
    assert sorted(request_name(entry["name"]) for entry in awaited) == ["batch/open", "initData", "jatos.js"]
    components = {request_name(entry["name"]): entry for entry in awaited}
    init_data, batch_open = components["initData"], components["batch/open"]
    assert batch_open["start"] < init_data["end"] and init_data["start"] < batch_open["end"], \
        "initData and batch/open are in flight together"
    assert components["jatos.js"]["end"] <= min(init_data["start"], batch_open["start"])
    assert page.js("window.batchAtLoad") == {"ready": True}


def test_connection_callbacks_follow_the_heartbeat(lab: Lab) -> None:
    study_id, _ = lab.study()
    page = lab.participant(lab.code(study_id), fast=True)
    wait_until(lambda: seen(page, "onConnected"), message="onConnected after the first pong")
    assert page.js("jatos.isConnected()") is True
    page.page.route("**/channels/**", lambda route: route.abort())
    wait_until(lambda: seen(page, "onDisconnected"), message="onDisconnected when pongs stop")
    assert page.js("jatos.isConnected()") is False
    page.page.unroute("**/channels/**")
    wait_until(lambda: len(seen(page, "onConnected")) == 2, message="onConnected again after reopening")
    assert page.js("jatos.isConnected()") is True


def test_a_wifi_outage_delays_data_but_leaves_the_run_valid(lab: Lab) -> None:
    """An outage long enough for the heartbeat to fail makes jatos.js reopen the batch
    channel; however its retries and the watchdog interleave, the run stays valid, the data
    sent meanwhile arrives and nothing is logged as a channel error (DESIGN.md §5)."""
    study_id, _ = lab.study()
    page = lab.participant(lab.code(study_id), fast=True)
    logged: list[str] = []
    page.page.on("request", lambda request: logged.append(request.post_data or "")
                 if request.url.endswith("/log") else None)
    page.js("jatos.catchAndLogErrors()")
    wait_until(lambda: seen(page, "onConnected"), message="onConnected after the first pong")
    assert settle(page, "jatos.appendResultData('before;')") == "ok"
    page.page.context.set_offline(True)
    page.js("void (window.during = jatos.appendResultData('during;').then(() => 'ok', r => String(r)))")
    wait_until(lambda: seen(page, "onDisconnected"), message="the heartbeat fails")
    time.sleep(4)
    page.page.context.set_offline(False)
    wait_until(lambda: page.js("window.during") is not None, timeout=15, message="the data of the outage")
    time.sleep(2)  # room for a second open racing the first (it would supersede it)
    assert page.js("document.body.innerText").count("This study run is invalid.") == 0
    assert page.js("window.during") == "ok"
    wait_until(lambda: len(seen(page, "onConnected")) == 2, message="onConnected again after reopening")
    assert settle(page, "jatos.appendResultData('after;')") == "ok"
    assert settle(page, "jatos.batchSession.set('back', true)") == "ok", "the batch channel works again"
    assert page.stored() == "before;during;after;\n"  # plain-text export ends each run with a newline
    assert not [text for text in logged if "Batch channel" in text], logged


# --- groups ------------------------------------------------------------------------------------


def test_a_two_player_fixed_group(lab: Lab) -> None:
    study_id, batch_id = lab.study(maxActiveMembers=2)
    code = lab.code(study_id)
    a = lab.participant(code)
    join(a)
    assert a.js("[jatos.hasJoinedGroup(), jatos.hasOpenGroupChannel(), jatos.isMaxActiveMemberReached(),"
                " jatos.isGroupOpen(), jatos.groupMemberId === jatos.studyResultId]") == [True, True, False, True, True]
    assert seen(a, "onOpen") == [[a.js("jatos.studyResultId")]]
    b = lab.participant(code)
    join(b)
    wait_until(lambda: seen(a, "onMemberOpen"), message="a hears b open")
    a_id, b_id = a.js("jatos.groupMemberId"), b.js("jatos.groupMemberId")
    assert seen(a, "onMemberJoin") == [[b_id]] and seen(a, "onMemberOpen") == [[b_id]]
    assert seen(a, "onUpdate"), "member events also call onUpdate"
    for player in (a, b):
        assert player.js("[jatos.groupMembers, jatos.groupChannels]") == [[a_id, b_id], [a_id, b_id]]
        assert player.js("[jatos.isMaxActiveMemberReached(), jatos.isMaxActiveMemberOpen()]") == [True, True]
    assert a.js("jatos.groupResultId") == b.js("jatos.groupResultId")

    assert a.js("jatos.isGroupOpen()") is True, "every member's channel is open"
    assert a.js("""async () => {
        const first = jatos.setGroupFixed(), second = jatos.setGroupFixed();
        return [await first.then(() => 'ok'), await second.then(() => 'ok', reason => String(reason))];
    }""") == ["ok", "Can fix group only once."], "one fix request at a time"
    groups = lab.api("GET", f"/batches/{batch_id}/groups")["data"]
    assert [(g["groupState"], sorted(g["activeMemberList"])) for g in groups] == [("FIXED", sorted([int(a_id), int(b_id)]))]

    a.js("jatos.sendGroupMsg({move: 'rock'})")
    b.js(f"jatos.sendGroupMsgTo('{a_id}', 'paper')")
    wait_until(lambda: seen(b, "onMessage") and seen(a, "onMessage"), message="both messages arrive")
    assert seen(b, "onMessage") == [[{"move": "rock"}]] and seen(a, "onMessage") == [["paper"]]

    c = lab.participant(code)
    join(c)
    assert c.js("jatos.groupResultId") != a.js("jatos.groupResultId"), "a fixed group takes nobody new"
    assert c.js("jatos.groupMembers") == [c.js("jatos.groupMemberId")]


def test_group_session_functions(lab: Lab) -> None:
    study_id, batch_id = lab.study()
    a, b = lab.group(study_id, 2)
    steps = ["jatos.groupSession.set('turn', 'a')", "jatos.groupSession.add('/moves', [])",
             "jatos.groupSession.add('/moves/-', 'rock')", "jatos.groupSession.replace('/turn', 'b')",
             "jatos.groupSession.copy('/turn', '/last')", "jatos.groupSession.move('/last', '/first')",
             "jatos.groupSession.remove('/first')"]
    for step in steps:
        assert settle(a, step) == "ok", step
    expected = {"turn": "b", "moves": ["rock"]}
    wait_until(lambda: b.js("jatos.groupSession.getAll()") == expected, message="b sees every patch")
    assert b.js("[jatos.groupSession.get('turn'), jatos.groupSession.find('/moves/0'),"
                " jatos.groupSession.test('/turn', 'b'), jatos.groupSession.defined('/first')]") == \
        ["b", "rock", True, False]
    wait_until(lambda: len(seen(b, "onGroupSession")) == len(steps))
    assert [op for _, op in seen(b, "onGroupSession")] == ["add", "add", "add", "replace", "copy", "move", "remove"]
    group_id = lab.api("GET", f"/batches/{batch_id}/groups")["data"][0]["id"]
    assert lab.api("GET", f"/groups/{group_id}/session")["data"]["sessionData"] == expected
    assert settle(b, "jatos.groupSession.setAll({round: 2})") == "ok"
    wait_until(lambda: a.js("jatos.groupSession.getAll()") == {"round": 2})
    assert settle(b, "jatos.groupSession.clear()") == "ok"
    wait_until(lambda: a.js("jatos.groupSession.getAll()") == {})
    assert a.js("""new Promise(resolve => jatos.groupSession.remove('/nothing', () => resolve('success'),
                                                                    reason => resolve(String(reason))))""") \
        == "Group session update failed"


def test_leaving_reassigning_and_ending_reach_the_others(lab: Lab) -> None:
    study_id, batch_id = lab.study(maxActiveMembers=2)
    a, b, c = lab.group(study_id, 3)
    a_id, b_id, c_id = (p.js("jatos.groupMemberId") for p in (a, b, c))
    assert c.js("jatos.groupResultId") != a.js("jatos.groupResultId")
    assert settle(b, "jatos.leaveGroup()") == "ok"
    wait_until(lambda: seen(a, "onMemberLeave") == [[b_id]], message="a hears b leave")
    assert b.js("[jatos.hasJoinedGroup(), jatos.hasOpenGroupChannel(), jatos.groupMembers]") == [False, False, []]
    assert seen(b, "onClose"), "leaving closes the group channel"

    assert settle(a, "jatos.reassignGroup()") == "ok"
    wait_until(lambda: seen(c, "onMemberJoin") == [[a_id]], message="c hears a arrive")
    assert a.js("jatos.groupResultId") == c.js("jatos.groupResultId")
    assert sorted(a.js("jatos.groupMembers")) == sorted([c_id, a_id])

    with c.page.expect_navigation():
        c.js("setTimeout(() => jatos.endStudy(), 0)")
    wait_until(lambda: seen(a, "onMemberLeave")[-1:] == [[c_id]], message="ending the study leaves the group")
    assert a.js("jatos.groupMembers") == [a_id]


def test_four_members_exchange_ten_messages_a_second(lab: Lab) -> None:
    study_id, _ = lab.study()
    members = lab.group(study_id, 4)
    for number, member in enumerate(members):
        member.js("""number => {
            let sent = 0;
            const timer = setInterval(() => {
                jatos.sendGroupMsg({from: number, n: ++sent});
                if (sent === 30) clearInterval(timer);
            }, 100);
        }""", number)

    def messages(member: Participant) -> list[dict]:
        return [args[0] for args in seen(member, "onMessage")]

    wait_until(lambda: all(len(messages(m)) >= 90 for m in members), timeout=20, message="90 messages each")
    time.sleep(0.5)
    for number, member in enumerate(members):
        got = messages(member)
        assert len(got) == 90, "none lost, none duplicated, none of one's own"
        for sender in set(range(4)) - {number}:
            assert [m["n"] for m in got if m["from"] == sender] == list(range(1, 31)), "each sender's order kept"


def test_a_closed_tab_is_closed_for_the_others(lab: Lab) -> None:
    """With the pagehide beacon at once; a tab that vanished silently (its renderer crashed)
    within 35 s, by the stale sweep; neither is a leave."""
    study_id, _ = lab.study()
    a, b, c = lab.group(study_id, 3)
    b_id, c_id = b.js("jatos.groupMemberId"), c.js("jatos.groupMemberId")
    b.page.close()
    wait_until(lambda: [b_id] in seen(a, "onMemberClose"), timeout=5, message="the beacon closes b at once")
    assert group_close_reason(lab, b_id) == "client"
    with contextlib.suppress(Exception):  # the renderer dies: no pagehide, no beacon, as a tablet that died
        c.page.goto("chrome://crash", timeout=3_000)
    began = time.monotonic()
    wait_until(lambda: [c_id] in seen(a, "onMemberClose"), timeout=35, message="the sweeper closes c")
    print(f"silent tab reported CLOSED after {time.monotonic() - began:.1f} s")
    assert group_close_reason(lab, c_id) == "stale"
    assert seen(a, "onMemberLeave") == []
    assert a.js("jatos.groupChannels") == [a.js("jatos.groupMemberId")]
    assert sorted(a.js("jatos.groupMembers")) == sorted([a.js("jatos.groupMemberId"), b_id, c_id])


def test_a_session_patch_without_an_answer_fails_after_the_sending_timeout(lab: Lab) -> None:
    study_id, _ = lab.study()
    page = lab.participant(lab.code(study_id))
    page.page.route("**/channels/*/send", lambda route: route.abort())
    began = time.monotonic()
    assert page.js("""() => { jatos.channelSendingTimeoutTime = 500;
                              return jatos.batchSession.set('x', 1).then(() => 'ok', reason => String(reason)); }""") \
        == "Timeout sending session patch"
    assert time.monotonic() - began < 5
