"""Group message delivery: latency, lost and duplicated messages, against a minimal relay.

    python bench/channels_bench.py [--members 8] [--rate 10] [--seconds 20]

Every member of one group broadcasts `rate` messages per second for `seconds`, as
jatos.sendGroupMsg does over our transport: one POST .../channels/{conn}/send per message
on a keep-alive connection, and one long-poll loop (GET .../channels/poll) per member on
another. Each message carries its send time; a member records the delay until its poll
delivers each message from the others. The baseline, measured in the same run with the same
client code and waitress settings, is a minimal relay: an in-memory list of messages behind
a condition variable, no database, no membership, no durability. Target (DESIGN.md §7):
p99 under 50 ms on loopback, none lost, none duplicated.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from common import RELAY_ANSWER, percentile, start, start_jatos_lite, study_runs

THREADS = 64

RELAY = RELAY_ANSWER + textwrap.dedent('''
    import json, sys, threading, urllib.parse, waitress
    port, threads = int(sys.argv[2]), int(sys.argv[3])
    messages, changed = [], threading.Condition()
    def app(environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            frame = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
            with changed:
                messages.append(frame["frames"][0])
                changed.notify_all()
            return answer(start_response, {"cseq": frame["cseq"]})
        query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
        if "c" not in query:  # the start-up check (GET /ping)
            return answer(start_response, {})
        cursor = int(query.get("c", "x:0").split(":")[1])
        with changed:
            changed.wait_for(lambda: len(messages) > cursor, timeout=float(query.get("wait", 20)))
            events = [{"id": i + 1, "msg": m} for i, m in enumerate(messages[cursor:], start=cursor)]
        return answer(start_response, {"x": {"events": events, "cursor": cursor + len(events)}})
    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, connection_limit=1000, _quiet=True,
                   asyncore_use_poll=True)
''')


class Member:
    """One page in the group: a sender and a long-poll loop, each on its own keep-alive connection."""

    def __init__(self, port: int, number: int, prefix: str, conn: str, cursor: int, cookie: str):
        self.port, self.number, self.prefix, self.conn, self.cursor = port, number, prefix, conn, cursor
        self.headers = {"Cookie": cookie, "Content-Type": "application/json"}
        self.sent = 0
        self.latencies: list[float] = []
        self.received: dict[tuple[int, int], int] = {}
        self.stopping = threading.Event()

    def request(self, connection: http.client.HTTPConnection, method: str, path: str, body: object = None) -> dict:
        connection.request(method, self.prefix + path, body=None if body is None else json.dumps(body),
                           headers=self.headers)
        response = connection.getresponse()
        text = response.read()
        assert response.status == 200, (response.status, text)
        cookie = response.getheader("Set-Cookie")
        if cookie and cookie.split(";")[0] not in self.headers["Cookie"]:
            self.headers["Cookie"] += "; " + cookie.split(";")[0]  # the browser key of the poll cap
        return json.loads(text)

    def send_loop(self, rate: float, seconds: float, clock_zero: float) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        deadline = clock_zero + seconds
        while True:
            due = clock_zero + self.sent / rate
            if due >= deadline:
                break
            time.sleep(max(0.0, due - time.perf_counter()))
            self.sent += 1
            message = {"from": self.number, "n": self.sent, "t": time.perf_counter()}
            self.request(connection, "POST", f"channels/{self.conn}/send",
                         {"cseq": self.sent, "frames": [{"msg": message}]})
        connection.close()

    def poll_loop(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stopping.is_set():
            answer = self.request(connection, "GET", f"channels/poll?c={self.conn}:{self.cursor}"
                                                     f"&page={self.conn}&wait=2")
            arrived = time.perf_counter()
            mine = answer[self.conn]
            for event in mine["events"]:
                message = event["msg"].get("msg")
                if isinstance(message, dict) and message.get("from", self.number) != self.number:
                    key = (message["from"], message["n"])
                    self.received[key] = self.received.get(key, 0) + 1
                    self.latencies.append((arrived - message["t"]) * 1000)
            self.cursor = mine["cursor"]
        connection.close()


def jatos_lite_members(port: int, count: int) -> list[Member]:
    """`count` runs of a group study, all joined to one group, with the join events drained."""
    runs = study_runs(port, count, groupStudy=True, dir_name="channels_bench")
    members = []
    for number, (page, cookie) in enumerate(runs):
        prefix = "/".join(page.split("/")[:3]) + "/"
        probe = Member(port, number, prefix, "", 0, cookie)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        opened = probe.request(connection, "POST", "group/join", {"openId": f"bench{number}"})
        connection.close()
        members.append(Member(port, number, prefix, opened["conn"], opened["cursor"], probe.headers["Cookie"]))
    for member in members:  # skip the JOINED and OPENED events of the others
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        member.cursor = member.request(connection, "GET", f"channels/poll?c={member.conn}:{member.cursor}"
                                                          f"&wait=0")[member.conn]["cursor"]
        connection.close()
    return members


def relay_members(port: int, count: int) -> list[Member]:
    return [Member(port, number, "/", "x", 0, "") for number in range(count)]


def run(members: list[Member], rate: float, seconds: float) -> dict:
    pollers = [threading.Thread(target=m.poll_loop, daemon=True) for m in members]
    for poller in pollers:
        poller.start()
    time.sleep(0.5)
    clock_zero = time.perf_counter() + 0.1
    senders = [threading.Thread(target=m.send_loop, args=(rate, seconds, clock_zero + i / rate / len(members)))
               for i, m in enumerate(members)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    sent_at_end = time.perf_counter()
    expected = {(m.number, n) for m in members for n in range(1, m.sent + 1)}
    while time.perf_counter() - sent_at_end < 10 and not all(
            len(r.received) == len({k for k in expected if k[0] != r.number}) for r in members):
        time.sleep(0.1)
    for member in members:
        member.stopping.set()
    for poller in pollers:
        poller.join()
    latencies = [value for m in members for value in m.latencies]
    lost = sum(len({k for k in expected if k[0] != m.number} - set(m.received)) for m in members)
    duplicated = sum(times - 1 for m in members for times in m.received.values())
    return {"sent": len(expected), "delivered": len(latencies), "p50": statistics.median(latencies),
            "p99": percentile(latencies, 0.99), "max": max(latencies), "lost": lost, "duplicated": duplicated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--rate", type=float, default=10.0, help="messages per second per member")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lite, lite_port = start_jatos_lite(Path(tmp), THREADS)
        relay, relay_port = start(RELAY, tmp, str(THREADS))
        try:
            figures = {"jatos-lite": run(jatos_lite_members(lite_port, args.members), args.rate, args.seconds),
                       "baseline relay": run(relay_members(relay_port, args.members), args.rate, args.seconds)}
        finally:
            lite.kill()
            relay.kill()
    print(f"{args.members} members x {args.rate:g} msg/s x {args.seconds:g} s, broadcast to the group")
    print(f"{'':>15} | {'sent':>5} {'delivered':>9} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'lost':>5} {'dup':>4}")
    for name, f in figures.items():
        print(f"{name:>15} | {f['sent']:>5} {f['delivered']:>9} {f['p50']:>7.1f} {f['p99']:>7.1f} {f['max']:>7.1f} "
              f"{f['lost']:>5} {f['duplicated']:>4}")
    lite_p99, base_p99 = figures["jatos-lite"]["p99"], figures["baseline relay"]["p99"]
    print(f"p99 ratio jatos-lite / baseline: {lite_p99 / base_p99:.2f}  (target: p99 < 50 ms, 0 lost, 0 duplicated)")


if __name__ == "__main__":
    main()
