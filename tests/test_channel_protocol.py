"""Batch and group channels over HTTP long-polling (channels.md §1-§7), with simulated members
that speak the protocol exactly as jatos.js does, against a real waitress server.

A member opens a channel with POST .../batch/open or .../group/join, sends frames with
POST .../channels/{conn}/send {"cseq", "frames"} and receives events with
GET .../channels/poll?c={conn}:{cursor}."""

from __future__ import annotations

import http.cookiejar
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

import jatos_lite
from conftest import API_TOKEN, LiveServer, RemoteLab, free_port, make_jzip


class Member:
    """One participant's browser: a study run on a link, and its open channels."""

    def __init__(self, base: str, code: str):
        self.base = base
        jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        page = self.opener.open(f"{base}/publix/{code}", timeout=10)
        self.sr = urllib.parse.urlsplit(page.geturl()).path.split("/")[2]
        self.sr_id = next(c.name.rsplit("_", 1)[1] for c in jar if c.name.startswith("JATOS_ID_")
                          and f"studyResultUuid={self.sr}" in c.value)  # the group member ID
        self.conn: dict[str, str] = {}
        self.cursor: dict[str, int] = {}
        self.cseq: dict[str, int] = {}
        self.inbox: dict[str, list[dict]] = {"batch": [], "group": []}
        self.event_ids: dict[str, list[int]] = {"batch": [], "group": []}

    def call(self, method: str, path: str, body: object = None, timeout: float = 30) -> tuple[int, object]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(f"{self.base}/publix/{self.sr}/{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with self.opener.open(request, timeout=timeout) as response:
                text = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        return status, (json.loads(text) if text.strip().startswith(("{", "[")) else text)

    def open(self, kind: str = "batch", page: str | None = None) -> dict:
        body = {"openId": uuid.uuid4().hex, **({"page": page} if page else {})}
        status, opened = self.call("POST", "batch/open" if kind == "batch" else "group/join", body)
        assert status == 200, opened
        self.conn[kind], self.cursor[kind], self.cseq[kind] = opened["conn"], opened["cursor"], 0
        self.take(kind, opened["events"])
        return opened["events"][0]["msg"]

    def take(self, kind: str, events: list[dict]) -> list[dict]:
        for event in events:
            self.event_ids[kind].append(event["id"])
            self.inbox[kind].append(event["msg"])
        return [event["msg"] for event in events]

    def send(self, kind: str, *frames: object, cseq: int | None = None) -> tuple[int, object]:
        if cseq is None:
            self.cseq[kind] += 1
            cseq = self.cseq[kind]
        return self.call("POST", f"channels/{self.conn[kind]}/send", {"cseq": cseq, "frames": list(frames)})

    def poll(self, kind: str = "batch", wait: float = 0, cursor: int | None = None,
             conn: str | None = None) -> list[dict]:
        """New messages after the cursor (holding up to `wait` seconds when there are none)."""
        start = self.cursor[kind] if cursor is None else cursor
        conn = conn or self.conn[kind]
        status, answer = self.call("GET", f"channels/poll?c={conn}:{start}&page={self.sr}&wait={wait}")
        assert status == 200, answer
        mine = answer[conn]
        if "closed" in mine:
            return [{"closed": mine["closed"]}]
        if conn != self.conn[kind]:  # an earlier conn, looked at without taking its messages
            return [event["msg"] for event in mine["events"]]
        self.cursor[kind] = mine["cursor"]
        return self.take(kind, mine["events"])

    def drain(self, kind: str = "batch") -> list[dict]:
        """Everything waiting, polling until nothing more comes."""
        messages = []
        while True:
            new = self.poll(kind)
            messages += new
            if not new or "closed" in new[0]:
                return messages

    def patch(self, kind: str, action_id: int, version: int | None, *patches: dict, versioning: bool = True) -> None:
        words = ("id", "patches", "version", "versioning") if kind == "batch" else \
            ("sessionActionId", "sessionPatches", "sessionVersion", "sessionVersioning")
        frame = {"action": "SESSION", words[0]: action_id, words[1]: list(patches), words[2]: version,
                 words[3]: versioning}
        status, answer = self.send(kind, frame)
        assert status == 200, answer

    def answer_to(self, kind: str, action_id: int) -> dict:
        """The SESSION_ACK or SESSION_FAIL for one of this member's patches."""
        key = "id" if kind == "batch" else "sessionActionId"
        for _ in range(50):
            for message in self.inbox[kind]:
                if message.get("action") in ("SESSION_ACK", "SESSION_FAIL") and message.get(key) == action_id:
                    return message
            self.poll(kind, wait=1)
        raise AssertionError(f"no answer to patch {action_id}")


class Lab(RemoteLab):
    """The researcher's side, with group-study shortcuts."""

    def study(self, group: bool = False, **batch: object) -> tuple[int, int]:
        """A new study (a group study if asked, batch limits as given): (study ID, batch ID)."""
        batch_object = {"uuid": str(uuid.uuid4()), "title": "Default", "active": True, "maxActiveMembers": None,
                        "maxTotalMembers": None, "maxTotalWorkers": None, "allowedWorkerTypes": ["GeneralMultiple"],
                        "comments": None, "batchInput": None, **batch}
        archive = make_jzip(groupStudy=group, batches=[batch_object], dir_name=f"s{uuid.uuid4().hex[:8]}")
        study_id = self.import_study(archive)
        batch_id = self.api("GET", f"/studies/{study_id}/batches")["data"][0]["id"]
        return study_id, batch_id

    def members(self, study_id: int, count: int) -> list[Member]:
        code = self.code(study_id)
        return [Member(self.base, code) for _ in range(count)]


@pytest.fixture
def lab(live_server: LiveServer) -> Lab:
    return Lab(live_server)


def actions(messages: list[dict]) -> list[str | None]:
    return [m.get("action") for m in messages]


# --- batch session (channels.md §3) -------------------------------------------------------


def test_opening_gives_the_session_and_its_version(lab: Lab) -> None:
    study_id, batch_id = lab.study()
    lab.api("PATCH", f"/batches/{batch_id}/session", {"start": 1})
    member, = lab.members(study_id, 1)
    opened = member.open()
    assert (opened["action"], opened["data"], opened["version"]) == ("OPENED", {"start": 1}, 2)


def test_a_patch_is_acknowledged_to_its_sender_and_broadcast_to_all(lab: Lab) -> None:
    study_id, batch_id = lab.study()
    a, b = lab.members(study_id, 2)
    a.open(), b.open()
    a.patch("batch", 0, 1, {"op": "add", "path": "/a", "value": [1]})
    ack = a.answer_to("batch", 0)
    assert (ack["action"], ack["version"]) == ("SESSION_ACK", 2)
    assert [m for m in a.inbox["batch"] if m.get("action") == "SESSION"] == \
        [{"action": "SESSION", "patches": [{"op": "add", "path": "/a", "value": [1]}], "version": 2}]
    assert actions(b.drain()) == ["SESSION"]
    assert lab.api("GET", f"/batches/{batch_id}/session")["data"] == {"version": 2, "sessionData": {"a": [1]}}


@pytest.mark.parametrize("patch", [
    {"op": "remove", "path": "/missing"}, {"op": "replace", "path": "/nope/deeper", "value": 1},
    {"op": "test", "path": "/a", "value": "not this"}, {"op": "bogus", "path": "/a"}, {"path": "/a"},
])
def test_a_patch_that_cannot_apply_fails_and_changes_nothing(lab: Lab, patch: dict) -> None:
    study_id, batch_id = lab.study()
    lab.api("PATCH", f"/batches/{batch_id}/session", {"a": 1})
    member, = lab.members(study_id, 1)
    member.open()
    member.patch("batch", 0, 2, {"op": "add", "path": "/b", "value": 2}, patch)
    assert member.answer_to("batch", 0)["action"] == "SESSION_FAIL"
    assert lab.api("GET", f"/batches/{batch_id}/session")["data"] == {"version": 2, "sessionData": {"a": 1}}


def test_a_stale_version_fails_unless_versioning_is_off(lab: Lab) -> None:
    study_id, batch_id = lab.study()
    member, = lab.members(study_id, 1)
    member.open()
    member.patch("batch", 0, 7, {"op": "add", "path": "/x", "value": 1})
    fail = member.answer_to("batch", 0)
    assert (fail["action"], fail["version"]) == ("SESSION_FAIL", 1)
    member.patch("batch", 1, 7, {"op": "add", "path": "/x", "value": 1}, versioning=False)
    assert member.answer_to("batch", 1)["action"] == "SESSION_ACK"
    assert lab.api("GET", f"/batches/{batch_id}/session")["data"] == {"version": 2, "sessionData": {"x": 1}}


def test_remove_root_clears_the_session(lab: Lab) -> None:
    study_id, batch_id = lab.study()
    lab.api("PATCH", f"/batches/{batch_id}/session", {"a": 1, "b": [2]})
    member, = lab.members(study_id, 1)
    member.open()
    member.patch("batch", 0, 2, {"op": "remove", "path": "/"})
    assert member.answer_to("batch", 0)["action"] == "SESSION_ACK"
    assert lab.api("GET", f"/batches/{batch_id}/session")["data"]["sessionData"] == {}


def test_concurrent_conflicting_patches_apply_exactly_one_per_version(lab: Lab) -> None:
    """Twelve members increment one counter at once, retrying on SESSION_FAIL with the version it
    names: the counter ends at 12, and every version was granted to exactly one patch."""
    study_id, batch_id = lab.study()
    lab.api("PATCH", f"/batches/{batch_id}/session", {"counter": 0})
    members = lab.members(study_id, 12)
    for member in members:
        member.open()
    acks: list[int] = []

    def increment(member: Member) -> None:
        version, value, action_id = 2, 0, 0
        while True:
            member.patch("batch", action_id, version, {"op": "replace", "path": "/counter", "value": value + 1})
            answer = member.answer_to("batch", action_id)
            if answer["action"] == "SESSION_ACK":
                acks.append(answer["version"])
                return
            action_id += 1
            version = answer["version"]
            status, session = lab_session(lab, batch_id)
            value = session["counter"] if session["version"] == version else value

    def lab_session(lab: Lab, batch_id: int) -> tuple[int, dict]:
        data = lab.api("GET", f"/batches/{batch_id}/session")["data"]
        return 200, {**data["sessionData"], "version": data["version"]}

    threads = [threading.Thread(target=increment, args=(m,)) for m in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(acks) == list(range(3, 15))
    assert lab.api("GET", f"/batches/{batch_id}/session")["data"] == {"version": 14, "sessionData": {"counter": 12}}


def test_a_repeated_send_is_applied_once(lab: Lab) -> None:
    """A retried send (same cseq, its answer was lost) does not apply its frames again."""
    study_id, batch_id = lab.study()
    member, = lab.members(study_id, 1)
    member.open()
    frame = {"action": "SESSION", "id": 0, "version": None, "versioning": False,
             "patches": [{"op": "add", "path": "/list/-", "value": 1}]}
    lab.api("PATCH", f"/batches/{batch_id}/session", {"list": []})
    for _ in range(3):
        assert member.send("batch", frame, cseq=1)[0] == 200
    assert lab.api("GET", f"/batches/{batch_id}/session")["data"]["sessionData"] == {"list": [1]}


def test_an_old_cursor_gets_every_event_exactly_once_and_in_order(lab: Lab) -> None:
    """A member that was away polls from its old cursor and gets what it missed, no more, no less;
    polling again from any earlier cursor repeats exactly the tail after it."""
    study_id, _ = lab.study()
    writer, reader = lab.members(study_id, 2)
    writer.open(), reader.open()
    start = reader.cursor["batch"]
    for number in range(30):
        writer.patch("batch", number, None, {"op": "add", "path": f"/k{number}", "value": number}, versioning=False)
    missed = reader.drain()
    assert [m["patches"][0]["value"] for m in missed] == list(range(30))
    ids = reader.event_ids["batch"][1:]
    assert ids == sorted(set(ids))
    middle = ids[9]
    again = reader.poll(cursor=middle)
    assert [m["patches"][0]["value"] for m in again] == list(range(10, 30))
    assert reader.poll(cursor=start)[0]["patches"][0]["value"] == 0


def test_an_admin_edit_reaches_open_channels_as_a_resync(lab: Lab) -> None:
    study_id, batch_id = lab.study()
    member, = lab.members(study_id, 1)
    member.open()
    lab.api("PATCH", f"/batches/{batch_id}/session?version=1", {"edited": True})
    assert member.drain() == [{"data": {"edited": True}, "version": 2}]


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400), (b"[]", 400), ({"frames": []}, 400), ({"cseq": "1", "frames": []}, 400),
    ({"cseq": 1, "frames": "x"}, 400), ({"cseq": 5, "frames": []}, 409),
])
def test_malformed_sends_are_refused_and_change_nothing(lab: Lab, body: object, status: int) -> None:
    study_id, batch_id = lab.study()
    member, = lab.members(study_id, 1)
    member.open()
    got, answer = member.call("POST", f"channels/{member.conn['batch']}/send", body)
    assert got == status and answer
    assert lab.api("GET", f"/batches/{batch_id}/session")["data"]["version"] == 1


@pytest.mark.parametrize("frame, error", [
    ("just text", "Malformed message"), ({"action": "DANCE"}, "Unknown action DANCE"),
    ({"action": "SESSION", "id": "x", "patches": []}, "numeric"),
])
def test_malformed_frames_get_an_error_message(lab: Lab, frame: object, error: str) -> None:
    study_id, batch_id = lab.study()
    member, = lab.members(study_id, 1)
    member.open()
    member.send("batch", frame)
    errors = [m for m in member.drain() if m.get("action") == "ERROR"]
    assert len(errors) == 1 and error in errors[0]["errorMsg"]
    assert lab.api("GET", f"/batches/{batch_id}/session")["data"]["version"] == 1


def test_a_closed_or_foreign_channel_is_refused(lab: Lab) -> None:
    study_id, _ = lab.study()
    a, b = lab.members(study_id, 2)
    a.open(), b.open()
    assert a.call("POST", f"channels/{b.conn['batch']}/send", {"cseq": 1, "frames": []})[0] == 404
    assert a.call("POST", f"channels/{a.conn['batch']}/close")[0] == 204
    assert a.send("batch", {"heartbeat": "ping"})[0] == 410
    assert a.poll() == [{"closed": "client"}]


def test_only_another_page_taking_over_the_run_hears_closed(lab: Lab) -> None:
    """The termination CLOSED means 'another page has this run now' (jatos.js then calls the
    run invalid); a conn replaced by an open of the same page closes without it."""
    study_id, _ = lab.study()
    member, = lab.members(study_id, 1)
    member.open(page="tab1")
    first = member.conn["batch"], member.cursor["batch"]
    member.open(page="tab1")
    assert member.poll(cursor=first[1], conn=first[0]) == [{"closed": "reopened"}]
    second = member.conn["batch"], member.cursor["batch"]
    member.open(page="tab2")
    assert actions(member.poll(cursor=second[1], conn=second[0])) == ["CLOSED"]
    assert member.poll(cursor=second[1] + 1, conn=second[0]) == [{"closed": "superseded"}]


def test_a_poll_holds_until_an_event_arrives(lab: Lab) -> None:
    """No events: the poll waits; a send elsewhere answers it within milliseconds."""
    study_id, _ = lab.study()
    a, b = lab.members(study_id, 2)
    a.open(), b.open()
    started = time.monotonic()
    assert b.poll(wait=0.5) == [] and time.monotonic() - started >= 0.45
    threading.Timer(0.3, lambda: a.patch("batch", 0, 1, {"op": "add", "path": "/x", "value": 1})).start()
    started = time.monotonic()
    assert actions(b.poll(wait=10)) == ["SESSION"]
    assert time.monotonic() - started < 1.5


def test_an_aborted_poll_arriving_late_does_not_answer_its_successor(lab: Lab) -> None:
    """A page numbers its polls (n); an older one reaching the server after a newer one of the
    same page is answered at once, and the newer one stays held until an event comes."""
    study_id, _ = lab.study()
    a, b = lab.members(study_id, 2)
    a.open(), b.open()
    path = f"channels/poll?c={b.conn['batch']}:{b.cursor['batch']}&page=p&wait=10"
    newer: list = []
    holder = threading.Thread(target=lambda: newer.append(b.call("GET", path + "&n=2")))
    holder.start()
    time.sleep(0.3)
    started = time.monotonic()
    status, late = b.call("GET", path + "&n=1")
    assert status == 200 and late["retryAfter"] and time.monotonic() - started < 1 and not newer
    a.patch("batch", 0, 1, {"op": "add", "path": "/x", "value": 1})
    holder.join(5)
    assert [e["msg"]["action"] for e in newer[0][1][b.conn["batch"]]["events"]] == ["SESSION"]


# --- groups (channels.md §4-§6) ------------------------------------------------------------


def group_state(lab: Lab, batch_id: int) -> list[tuple[str, list[int]]]:
    return [(g["groupState"], g["activeMemberList"]) for g in lab.api("GET", f"/batches/{batch_id}/groups")["data"]]


def test_joining_fills_a_group_to_its_limit_then_opens_another(lab: Lab) -> None:
    study_id, batch_id = lab.study(group=True, maxActiveMembers=2)
    a, b, c = lab.members(study_id, 3)
    opened = a.open("group")
    assert (opened["action"], opened["memberId"], opened["members"], opened["sessionData"]) == \
        ("OPENED", a.sr_id, [a.sr_id], {})
    b.open("group")
    c.open("group")
    assert [members for _, members in group_state(lab, batch_id)] == [[int(a.sr_id), int(b.sr_id)], [int(c.sr_id)]]
    seen = a.drain("group")
    assert [(m["action"], m["memberId"]) for m in seen] == [("JOINED", b.sr_id), ("OPENED", b.sr_id)]
    assert seen[-1]["channels"] == [a.sr_id, b.sr_id]


def test_broadcast_and_direct_messages(lab: Lab) -> None:
    study_id, _ = lab.study(group=True)
    a, b, c = lab.members(study_id, 3)
    for member in (a, b, c):
        member.open("group")
    for member in (a, b, c):
        member.drain("group")
    a.send("group", {"msg": {"hello": "all"}})
    a.send("group", {"recipient": c.sr_id, "msg": "psst"})
    a.send("group", {"recipient": "999999", "msg": "lost"})
    assert b.drain("group") == [{"msg": {"hello": "all"}}]
    assert c.drain("group") == [{"msg": {"hello": "all"}}, {"recipient": c.sr_id, "msg": "psst"}]
    errors = a.drain("group")
    assert [m["action"] for m in errors] == ["ERROR"] and "999999" in errors[0]["errorMsg"]


def test_a_fixed_group_takes_nobody_new(lab: Lab) -> None:
    study_id, batch_id = lab.study(group=True, maxActiveMembers=3)
    a, b = lab.members(study_id, 2)
    a.open("group")
    a.send("group", {"action": "FIXED"})
    assert [m for m in a.drain("group") if m.get("action") == "FIXED"][0]["groupState"] == "FIXED"
    b.open("group")
    assert [state for state, _ in group_state(lab, batch_id)] == ["FIXED", "STARTED"]


def test_reassign_moves_a_member_to_another_group(lab: Lab) -> None:
    study_id, batch_id = lab.study(group=True, maxActiveMembers=2)
    a, b, c = lab.members(study_id, 3)
    for member in (a, b, c):
        member.open("group")
    assert a.call("GET", "group/reassign")[0] == 200
    assert sorted(members for _, members in group_state(lab, batch_id)) == \
        sorted([[int(b.sr_id)], [int(a.sr_id), int(c.sr_id)]])
    assert [(m["action"], m["memberId"]) for m in b.drain("group")][-2:] == [("CLOSED", a.sr_id), ("LEFT", a.sr_id)]
    assert b.call("GET", "group/reassign")[0] == 204, "no other group has room for b"


def test_leaving_and_ending_leave_the_group_for_good(lab: Lab) -> None:
    """Leave tells the others LEFT; a member that left cannot join again; ending the run leaves
    too; a group whose every seat was used and left is FINISHED."""
    study_id, batch_id = lab.study(group=True, maxActiveMembers=2, maxTotalMembers=2)
    a, b = lab.members(study_id, 2)
    a.open("group"), b.open("group")
    b.drain("group")
    assert a.call("GET", "group/leave")[0] == 200
    assert [(m.get("action"), m.get("memberId")) for m in b.drain("group")] == [("CLOSED", a.sr_id), ("LEFT", a.sr_id)]
    status, message = a.call("POST", "group/join", {})
    assert status == 403 and "left its group" in message
    b.call("GET", "end")
    assert group_state(lab, batch_id) == [("FINISHED", [])]


def test_a_member_that_stops_polling_is_closed_for_the_others(lab: Lab, live_server: LiveServer) -> None:
    """The sweeper closes a conn not seen for 30 s; the others get CLOSED for that member."""
    study_id, _ = lab.study(group=True)
    a, b = lab.members(study_id, 2)
    a.open("group"), b.open("group")
    a.drain("group")
    with jatos_lite.Store(live_server.config.db_path).tx() as db:
        db.run("UPDATE channel_conns SET last_seen = last_seen - ? WHERE id = ?",
               live_server.config.presence_timeout_seconds + 1, b.conn["group"])
        jatos_lite.sweep_channels(db, time.time(), live_server.config.presence_timeout_seconds)
    closed = [m for m in a.poll("group", wait=5) if m.get("action") == "CLOSED"]  # another process: the watcher tells
    assert [m["memberId"] for m in closed] == [b.sr_id] and b.sr_id not in closed[0]["channels"]


def test_a_page_polling_often_writes_its_last_seen_once_per_interval(lab: Lab, monkeypatch) -> None:
    """Polls reuse the conn rows they read (POLLED_CONN_MEMORY_SECONDS); the write of last_seen
    must forget them, or every poll after the interval would write again."""
    monkeypatch.setattr(jatos_lite, "LAST_SEEN_REFRESH_SECONDS", 0.25)
    monkeypatch.setattr(jatos_lite, "SEEN_WRITE_SECONDS", 0.05)
    writes: list[list[str]] = []
    refresh = jatos_lite.refresh_conns
    monkeypatch.setattr(jatos_lite, "refresh_conns", lambda db, conn_ids: writes.append(conn_ids) or refresh(db, conn_ids))
    study_id, _ = lab.study(group=True)
    member, = lab.members(study_id, 1)
    member.open("group")
    started = time.monotonic()
    while time.monotonic() - started < 0.9:
        member.poll("group")
        time.sleep(0.01)
    assert 2 <= len(writes) <= 4 and all(w == [member.conn["group"]] for w in writes)


# --- held polls wait without a worker thread (Parking) --------------------------------------


PAGES = 40  # more than the live server's 16 threads


def held_polls(live_server: LiveServer) -> int:
    return live_server.app.config["jatos_lite.hub"].capacity()["connectedPages"]


def test_more_pages_than_threads_hold_polls_and_a_send_still_goes_through(lab: Lab, live_server: LiveServer) -> None:
    """40 pages hold a poll on a server with 16 worker threads: none is answered early to make
    room, a send is answered at once, and every page gets its message. While a held poll took a
    thread, the 17th poll waited for a thread and the send waited behind them."""
    study_id, _ = lab.study()
    pages = lab.members(study_id, PAGES)
    for page in pages:
        page.open("batch")
        page.drain("batch")
    answers: dict[int, list[dict]] = {}
    polls = [threading.Thread(target=lambda page=page: answers.update({id(page): page.poll("batch", wait=15)}))
             for page in pages]
    for poll in polls:
        poll.start()
    for _ in range(100):
        if held_polls(live_server) == PAGES:
            break
        time.sleep(0.05)
    assert held_polls(live_server) == PAGES
    sender, = lab.members(study_id, 1)
    version = sender.open("batch")["version"]
    started = time.monotonic()
    sender.patch("batch", 1, version, {"op": "add", "path": "/x", "value": 1})
    assert time.monotonic() - started < 2
    for poll in polls:
        poll.join(timeout=5)
    assert time.monotonic() - started < 5
    assert all(actions(answers[id(page)]) == ["SESSION"] for page in pages), answers
    assert held_polls(live_server) == 0


def page_with_nothing_new(lab: Lab) -> Member:
    study_id, _ = lab.study()
    page, = lab.members(study_id, 1)
    page.open("batch")
    page.drain("batch")
    return page


def test_a_held_poll_without_news_ends_at_its_wait_and_gives_its_place_up(lab: Lab, live_server: LiveServer) -> None:
    page = page_with_nothing_new(lab)
    started = time.monotonic()
    assert page.poll("batch", wait=1) == []
    assert 0.9 <= time.monotonic() - started < 3
    assert held_polls(live_server) == 0


def test_a_held_poll_whose_page_hung_up_gives_its_place_up(lab: Lab, live_server: LiveServer) -> None:
    page = page_with_nothing_new(lab)
    port = int(live_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET /publix/{page.sr}/channels/poll?c={page.conn['batch']}:{page.cursor['batch']}&wait=1 "
                     f"HTTP/1.1\r\nHost: lab\r\n\r\n".encode())
        time.sleep(0.3)
        assert held_polls(live_server) == 1
    time.sleep(1.5)
    assert held_polls(live_server) == 0


def test_a_page_closing_tells_the_others_at_once(lab: Lab) -> None:
    study_id, _ = lab.study(group=True)
    a, b = lab.members(study_id, 2)
    a.open("group"), b.open("group")
    a.drain("group")
    b.call("POST", f"channels/{b.conn['group']}/close")
    assert [(m["action"], m["memberId"]) for m in a.poll("group", wait=5)] == [("CLOSED", b.sr_id)]


def test_group_channels_need_a_group_study(lab: Lab) -> None:
    study_id, _ = lab.study(group=False)
    member, = lab.members(study_id, 1)
    status, message = member.call("POST", "group/join", {})
    assert status == 403 and "not a group study" in message


# --- several server processes on one database (channels.md §7) ------------------------------


def test_two_server_processes_deliver_each_others_events(lab: Lab, live_server: LiveServer, tmp_path: Path) -> None:
    port = free_port()
    config = live_server.config
    second = subprocess.Popen([sys.executable, str(Path(jatos_lite.__file__)), "serve", "--host", "127.0.0.1",
                               "--port", str(port), "--admin-port", str(free_port()),
                               "--studies", str(config.studies), "--data", str(config.data),
                               "--api-token", API_TOKEN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        study_id, _ = lab.study(group=True)
        a, = lab.members(study_id, 1)
        b = Member(f"http://127.0.0.1:{port}", lab.code(study_id))
        a.open("group"), b.open("group")
        a.drain("group")
        b.drain("group")
        for sender, receiver in ((a, b), (b, a)):
            threading.Timer(0.3, lambda s=sender: s.send("group", {"msg": f"from {s.sr_id}"})).start()
            started = time.monotonic()
            assert receiver.poll("group", wait=10) == [{"msg": f"from {sender.sr_id}"}]
            assert time.monotonic() - started < 1.5
        c, = lab.members(study_id, 1)  # on this process, which remembers its own events: the other's
        c.open("group")                # event between them must not be skipped
        c.drain("group")
        received: list[str] = []

        def listen() -> None:  # held polls, woken by each event
            while len(received) < 10:
                received.extend(m["msg"] for m in c.poll("group", wait=5) if "msg" in m)

        listener = threading.Thread(target=listen)
        listener.start()
        for turn in range(5):
            time.sleep(0.05)
            b.send("group", {"msg": f"b{turn}"})
            a.send("group", {"msg": f"a{turn}"})
        listener.join(timeout=20)
        assert received == [f"{who}{turn}" for turn in range(5) for who in "ba"]
    finally:
        second.kill()
        second.wait(timeout=10)
    

def test_a_woken_poll_answered_from_memory_gets_exactly_what_the_database_holds(lab: Lab,
                                                                                  live_server: LiveServer) -> None:
    """The hub answers woken polls from the events it remembers. After every kind of action,
    what it would answer each conn equals the database's answer, or it declines (a conn
    changed); it must answer most of the time, or the memory is not used."""
    hub = live_server.app.config["jatos_lite.hub"]
    store = live_server.app.config["jatos_lite.store"]
    study_id, batch_id = lab.study(group=True, maxActiveMembers=3)
    members = lab.members(study_id, 5)
    for member in members:
        member.open("batch")
        member.open("group")
    rng = random.Random(7)

    def broadcast(m: Member) -> None:
        m.send("group", {"msg": {"n": rng.random()}})

    def direct(m: Member) -> None:
        m.send("group", {"recipient": rng.choice(members).sr_id, "msg": "psst"})

    def group_patch(m: Member) -> None:
        m.patch("group", rng.randrange(1000), None, {"op": "add", "path": f"/k{rng.randrange(5)}", "value": 1},
                versioning=False)

    def batch_patch(m: Member) -> None:
        m.patch("batch", rng.randrange(1000), None, {"op": "add", "path": "/n", "value": rng.randrange(9)},
                versioning=False)

    def heartbeat(m: Member) -> None:
        m.send(rng.choice(["batch", "group"]), {"heartbeat": "ping"})

    def reopen(m: Member) -> None:
        kind = rng.choice(["batch", "group"])
        m.call("POST", f"channels/{m.conn[kind]}/close")
        m.open(kind)

    def reassign(m: Member) -> None:
        m.call("GET", "group/reassign")

    def admin_edit(m: Member) -> None:
        lab.api("PATCH", f"/batches/{batch_id}/session", {"n": rng.randrange(9)})

    def database_answer(cursors: dict[str, int]) -> dict:
        srs = {m.conn[kind]: m.sr for m in members for kind in ("batch", "group")}
        with store.snapshot() as db:
            return {c: jatos_lite.conn_events(db, srs[c], c, cursor) for c, cursor in cursors.items()}

    woken = arriving = 0
    for step in range(120):
        changes = hub.conn_changes
        with store.snapshot() as db:
            cursors = {m.conn[kind]: (jatos_lite.conn_scope(db, m.conn[kind]), m.cursor[kind])
                       for m in members for kind in ("batch", "group")}
        action = rng.choice([broadcast] * 4 + [direct, group_patch, batch_patch, heartbeat, reopen, reassign,
                                               admin_edit])
        action(rng.choice(members))
        memory = hub.recent_answer(cursors, changes)
        if memory is not None:  # the poll was held while the action happened
            woken += 1
            assert json.loads(jatos_lite.to_json(memory)) == database_answer(
                {c: cursor for c, (_, cursor) in cursors.items()}), (step, action.__name__)
        for member in members:  # a poll arriving now
            kind = rng.choice(["batch", "group"])
            wanted = [(member.conn[kind], member.cursor[kind] - rng.choice([0, 0, 1, 3]))]
            first = hub.poll_from_memory(member.sr, wanted, hub.conn_changes)
            if first is not None:
                arriving += 1
                assert json.loads(jatos_lite.to_json(first[0])) == database_answer(dict(wanted)), (step, member.sr)
        for member in members:
            member.drain("batch")
            member.drain("group")
    assert woken > 80 and arriving > 300
