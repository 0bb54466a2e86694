"""The ChannelHub: which held polls wake on which commits, and how many polls it holds
(DESIGN.md §6: when held polls near the limit the oldest is answered at once)."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import threading
import time

import jatos_lite
from conftest import AUTH, make_jzip


def hub(store: jatos_lite.Store, max_held: int = 10, **config: object) -> jatos_lite.ChannelHub:
    return jatos_lite.ChannelHub(store, max_held, jatos_lite.Config(**config))


def test_a_newer_poll_of_the_same_page_releases_the_older(store) -> None:
    channels = hub(store)
    with channels.hold("browser", "page") as first, channels.hold("browser", "page") as second:
        assert channels.released(first) and not channels.released(second)


def test_a_poll_the_page_aborted_that_arrives_after_its_successor_is_answered_at_once(store) -> None:
    """jatos.js aborts its poll and polls again when a channel opens or closes; the aborted
    request can reach the server second. It must not release the page's newer poll (that page
    would then wait a retryAfter for nothing), nor push out any other held poll."""
    channels = hub(store, max_held=2)
    with channels.hold("browser", "other page") as other, channels.hold("browser", "page", 8) as newer, \
            channels.hold("browser", "page", 7) as aborted:
        assert channels.released(aborted) and not channels.released(newer) and not channels.released(other)
        with channels.hold("browser", "page", 9) as next_one:
            assert channels.released(newer) and not channels.released(next_one)


def test_a_fifth_poll_of_one_browser_releases_its_oldest(store) -> None:
    channels = hub(store)
    with contextlib.ExitStack() as stack:
        tickets = [stack.enter_context(channels.hold("browser", f"page {i}")) for i in range(5)]
        other = stack.enter_context(channels.hold("other browser", "page x"))
        assert [channels.released(t) for t in tickets] == [True, False, False, False, False]
        assert not channels.released(other)


def test_at_the_server_limit_the_oldest_poll_is_answered(store) -> None:
    channels = hub(store, max_held=3)
    with contextlib.ExitStack() as stack:
        tickets = [stack.enter_context(channels.hold(f"browser {i}", f"page {i}")) for i in range(4)]
        assert [channels.released(t) for t in tickets] == [True, False, False, False]


def test_a_commit_wakes_only_the_polls_of_its_scopes(store) -> None:
    """Events in b:1 wake a poll waiting on b:1 at once; one waiting on b:2 sleeps on."""
    channels = hub(store)
    woke: dict[str, float] = {}

    def wait(scope: str) -> None:
        with channels.hold(scope, scope) as ticket:
            start = time.monotonic()
            channels.wait(ticket, channels.generation, {"conn": scope}, timeout=1.0)
            woke[scope] = time.monotonic() - start

    threads = [threading.Thread(target=wait, args=(scope,)) for scope in ("b:1", "b:2")]
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    with store.tx() as db:
        jatos_lite.append_event(db, "b:1", {"msg": "x"})
    for thread in threads:
        thread.join()
    assert woke["b:1"] < 0.5 and woke["b:2"] >= 0.9


def test_a_commit_without_channel_events_wakes_nobody(store) -> None:
    channels = hub(store)
    with channels.hold("b", "p") as ticket:
        generation = channels.generation
        with store.tx() as db:
            db.run("INSERT OR REPLACE INTO settings(key, value) VALUES ('x', 'y')")
        assert channels.generation == generation
        channels.wait(ticket, generation, {"conn": "b:1"}, timeout=0.01)


def woken_within(channels: jatos_lite.ChannelHub, conns: dict[str, str], commit, timeout: float = 1.0) -> bool:
    """Whether a poll waiting on `conns` wakes before `timeout` when `commit` runs meanwhile."""
    woke = []

    def wait() -> None:
        with channels.hold("browser " + " ".join(conns), "page " + " ".join(conns)) as ticket:
            start = time.monotonic()
            channels.wait(ticket, channels.generation, conns, timeout=timeout)
            woke.append(time.monotonic() - start < timeout * 0.9)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)
    commit()
    waiter.join()
    return woke[0]


def test_an_event_wakes_only_the_polls_of_conns_that_get_it(store) -> None:
    channels = hub(store)

    def broadcast_from_a() -> None:
        with store.tx() as db:
            jatos_lite.append_event(db, "g:1", {"msg": "hi"}, exclude="a")

    def direct_to_b() -> None:
        with store.tx() as db:
            jatos_lite.append_event(db, "g:1", {"msg": "psst"}, recipient="b")

    assert not woken_within(channels, {"a": "g:1"}, broadcast_from_a)
    assert woken_within(channels, {"b": "g:1"}, broadcast_from_a)
    assert not woken_within(channels, {"c": "g:1"}, direct_to_b)
    assert woken_within(channels, {"c": "g:1", "b": "g:1"}, direct_to_b)


def test_a_commit_that_moved_a_conn_wakes_every_poll_of_its_scopes(store) -> None:
    """A conn moved to another group hears nothing in its old scope, yet its poll must wake:
    its events are now in a scope the poll does not know yet."""
    channels = hub(store)

    def move() -> None:
        with store.tx() as db:
            db.conns_changed = True
            jatos_lite.append_event(db, "g:1", {"action": "LEFT"}, exclude="a")

    assert woken_within(channels, {"a": "g:1"}, move)


def test_the_memory_keeps_a_bounded_amount_of_events_and_older_cursors_go_to_the_database(store) -> None:
    channels = hub(store, recent_events_bytes=10_000)
    ids = []
    for _ in range(30):  # an OPENED with a large session each
        with store.tx() as db:
            ids.append(jatos_lite.append_event(db, "b:1", {"action": "OPENED", "data": {"big": "x" * 1000}}))
    kept = sum(event.size for event in channels._recent)
    assert kept <= 10_000 and len(channels._recent) < 30
    assert channels.recent_answer({"c": ("b:1", ids[0])}, channels.conn_changes) is None
    newest = channels.recent_answer({"c": ("b:1", ids[-3])}, channels.conn_changes)
    assert [event["id"] for event in newest["c"]["events"]] == ids[-2:]


def test_the_memory_answers_each_scope_from_its_own_events_also_after_dropping_the_oldest(store) -> None:
    """The memory is kept by scope too (a poll looks at its scope's events, not at every group's):
    both stay the same events while the oldest are dropped."""
    channels = hub(store, recent_events_bytes=3_000)
    ids: dict[str, list[int]] = {"b:1": [], "b:2": []}
    for number in range(40):
        scope = "b:1" if number % 3 == 0 else "b:2"
        with store.tx() as db:
            ids[scope].append(jatos_lite.append_event(db, scope, {"msg": "m" * 100, "n": number}))
    assert [e.id for e in channels._recent] == sorted(e.id for kept in channels._recent_in.values() for e in kept)
    for scope, own in ids.items():
        cursor = own[-4]
        answer = channels.recent_answer({"c": (scope, cursor)}, channels.conn_changes)
        assert [event["id"] for event in answer["c"]["events"]] == own[-3:]


def test_the_watcher_takes_our_commit_for_ours_also_before_the_hub_has_heard_of_it(store) -> None:
    """Our commit is visible to the watcher before the commit hook tells the hub of it. Taken
    for another process's, it emptied the memory, and every page's next poll read the database
    (at 1,000 pages a dozen times in 10 s)."""
    channels = hub(store)
    channels._watcher = threading.Thread(target=lambda: None)  # a watcher exists: notify records what is ours
    conn = store.connect()
    turn = {"version": conn.execute("PRAGMA data_version").fetchone()[0],
            "seen": jatos_lite.last_event_id(jatos_lite.Db(conn))}
    with store.tx() as db:
        first = jatos_lite.append_event(db, "b:1", {"msg": "remembered"})

    def watcher_turn_before_the_hub_hears(events: list, conns_changed: bool) -> None:
        turn["version"], turn["seen"] = channels._wake_for_new_events(conn, turn["version"], turn["seen"])

    store.on_commit.insert(0, watcher_turn_before_the_hub_hears)
    with store.tx() as db:
        second = jatos_lite.append_event(db, "b:1", {"msg": "in the gap"})
    conn.close()
    answer = channels.recent_answer({"c": ("b:1", first - 1)}, channels.conn_changes)
    assert answer is not None and [event["id"] for event in answer["c"]["events"]] == [first, second]


def test_polls_and_sends_leave_no_garbage_for_the_collector(client, app) -> None:
    """A busy group makes hundreds of requests a second. Each reference cycle a request leaves
    waits for the garbage collector, whose pauses hold every thread (bottle's header dict,
    which refers to the environ that holds it, was one)."""
    study_id = client.post("/jatos/api/v1/studies", make_jzip(groupStudy=True, dir_name="g"),
                           headers={**AUTH, "Content-Type": "application/zip"}).json["data"]["id"]
    code = client.post_json(f"/jatos/api/v1/studies/{study_id}/studyCodes", {"type": "gm"},
                            headers=AUTH).json["data"][0]
    prefix = "/".join(client.get(f"/publix/{code}").maybe_follow().request.path.split("/")[:3])
    conn = client.post_json(f"{prefix}/group/join", {}).json["conn"]
    cookies = "; ".join(f"{c.name}={c.value}" for c in client.cookiejar) + "; JATOS_LITE_BROWSER=" + "a" * 32

    def call(method: str, path: str, query: str = "", body: bytes = b"") -> None:
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": "x",
                   "SERVER_PORT": "80", "wsgi.url_scheme": "http", "HTTP_HOST": "x", "HTTP_COOKIE": cookies,
                   "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
                   "wsgi.input": io.BytesIO(body), "wsgi.errors": io.StringIO()}
        statuses = []
        b"".join(app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
        assert statuses[0].startswith("200"), statuses

    def requests(first_cseq: int) -> None:
        for cseq in range(first_cseq, first_cseq + 20):
            call("POST", f"{prefix}/channels/{conn}/send", body=json.dumps({"cseq": cseq, "frames": [{"msg": cseq}]}).encode())
            call("GET", f"{prefix}/channels/poll", f"c={conn}:0&page=p&wait=0")

    requests(1)  # warm up: caches, lazily built objects
    gc.collect()
    gc.disable()
    try:
        requests(21)
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_held_polls_near_the_limit_warn_once_and_say_so(store, caplog) -> None:
    """Issue #15: one log line when held polls near the limit, not one per poll; capacity() tells the admin page."""
    channels = hub(store, max_held=10)
    with contextlib.ExitStack() as held:
        for number in range(7):
            held.enter_context(channels.hold(f"b{number}", "p", run=f"r{number}"))
        assert channels.capacity()["capacityWarning"] is None
        with caplog.at_level(logging.WARNING, logger="jatos_lite"):
            for number in range(7, 10):
                held.enter_context(channels.hold(f"b{number}", "p", run=f"r{number}"))
        assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
        assert "near the limit" in caplog.records[0].getMessage() and len(caplog.records) == 1
        status = channels.capacity()
        assert status["connectedPages"] == 10 and status["maxConnectedPages"] == 10
        assert "--connections" in status["capacityWarning"]
    assert channels.capacity() == {"connectedPages": 0, "maxConnectedPages": 10, "capacityWarning": None}
