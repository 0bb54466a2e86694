"""The ChannelHub: which held polls wake on which commits, and how many polls it holds
(DESIGN.md §6: when held polls near the limit the oldest is answered at once)."""

from __future__ import annotations

import contextlib
import threading
import time

import jatos_lite


def hub(store: jatos_lite.Store, max_held: int = 10) -> jatos_lite.ChannelHub:
    return jatos_lite.ChannelHub(store, max_held=max_held)


def test_a_newer_poll_of_the_same_page_releases_the_older(store) -> None:
    channels = hub(store)
    with channels.hold("browser", "page") as first, channels.hold("browser", "page") as second:
        assert channels.released(first) and not channels.released(second)


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
            channels.wait(ticket, channels.generation, {scope}, timeout=1.0)
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
        channels.wait(ticket, generation, {"b:1"}, timeout=0.01)
