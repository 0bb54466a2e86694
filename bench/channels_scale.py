"""Channels at classroom scale: pages in groups of 4, from 50 to 1,000 pages, against a relay.

    python bench/channels_scale.py [--pages 50,100,250,500,1000] [--every 5,1] [--seconds 20]
                                   [--processes 4] [--threads 32] [--relay-threads 1000]

Each page opens its group channel (batch maxActiveMembers = maxTotalMembers = 4) and, as
jatos.js does, keeps one long-poll (GET .../channels/poll) on one keep-alive connection and
sends each message with POST .../channels/{conn}/send on another. Every page broadcasts one
message every `every` seconds for `seconds`; the pages are spread over several load
processes. Per step the script prints delivery latency (p50, p99, max), messages lost (not
delivered within 8 s of the last send), duplicated and delivered to the wrong group, pages
that failed (a request timed out, or the server closed the channel of a page it had not heard
of for its presence timeout), the
server's peak RSS and its CPU time per message; and the same for the baseline measured at
the same step in the same run: a minimal in-memory group relay on waitress with the same
wire calls (no database, no membership, no durability). The relay holds each poll in a thread,
as jatos-lite did before it parked polls, so it runs with the thread count jatos-lite had then
(1000); with jatos-lite's 32 it could not hold more than 32 pages.
The server runs as `serve` runs it, except that every page comes from this one computer, so
the per-address connection share is lifted for the run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from common import API_TOKEN, RELAY_ANSWER, percentile, start, study_runs

import jatos_lite  # noqa: E402  (common puts the project on the path)

DRAIN_SECONDS = 8.0
LATE_MS = 5000.0
GROUP_SIZE = 4

# argv = folder, port, threads, API token: the server as `serve` builds it (guarded_server).
JATOS_LITE = textwrap.dedent('''
    import logging, sys, waitress, jatos_lite
    from pathlib import Path
    root, port, threads, token = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    logging.disable(logging.WARNING)
    config = jatos_lite.Config(studies=root / "studies", data=root / "data", api_token=token, threads=threads,
                               connections_per_address=100_000)
    app = jatos_lite.create_app(config)
    app.config["jatos_lite.hub"].start_watching()
    server = jatos_lite.guarded_server(app, config, host="127.0.0.1", port=port, threads=threads,
                                       connection_limit=jatos_lite.connection_limit(config.connections),
                                       **jatos_lite.WAITRESS_OPTIONS)
    server.run()
''')

# argv = folder, port, threads. Conns are named g<group>-<member>; a poll waits on its group.
RELAY = RELAY_ANSWER + textwrap.dedent('''
    import collections, json, logging, sys, threading, urllib.parse, waitress
    logging.disable(logging.WARNING)
    port, threads = int(sys.argv[2]), int(sys.argv[3])
    groups, changed = collections.defaultdict(list), threading.Condition()
    def app(environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            group = environ["PATH_INFO"].split("/channels/")[1].split("-")[0]
            frame = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
            with changed:
                groups[group].append(frame["frames"][0])
                changed.notify_all()
            return answer(start_response, {"cseq": frame["cseq"]})
        query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
        if "c" not in query:  # the start-up check (GET /ping)
            return answer(start_response, {})
        conn, cursor = query["c"].split(":")
        messages, cursor = groups[conn.split("-")[0]], int(cursor)
        with changed:
            changed.wait_for(lambda: len(messages) > cursor, timeout=float(query.get("wait", 20)))
            events = [{"id": i + 1, "msg": m} for i, m in enumerate(messages[cursor:], start=cursor)]
        return answer(start_response, {conn: {"events": events, "cursor": cursor + len(events)}})
    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, connection_limit=16000,
                   _quiet=True, asyncore_use_poll=True)
''')


# --- one page, in a load process ---------------------------------------------------------------

class Page:
    def __init__(self, spec: dict, port: int):
        self.spec, self.port = spec, port
        self.headers = {"Cookie": spec["cookie"], "Content-Type": "application/json"}
        self.cursor, self.sent = spec["cursor"], 0
        self.received: dict[str, int] = {}
        self.latencies: list[float] = []
        self.wrong_group = 0
        self.failed = False  # a request timed out (60 s) or the server closed the page's channel

    def run(self, loop: Callable[..., None], *args: float) -> None:
        try:
            loop(*args)
        except (OSError, RuntimeError, http.client.HTTPException):
            self.failed = True

    def request(self, connection: http.client.HTTPConnection, method: str, path: str, body: object = None) -> dict:
        connection.request(method, self.spec["prefix"] + path, body=None if body is None else json.dumps(body),
                           headers=self.headers)
        response = connection.getresponse()
        text = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status} {text[:200]!r}")
        cookie = response.getheader("Set-Cookie")
        if cookie and cookie.split(";")[0] not in self.headers["Cookie"]:
            self.headers["Cookie"] += "; " + cookie.split(";")[0]
        return json.loads(text)

    def send_loop(self, every: float, first: float, stop: float) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while first + self.sent * every < stop:
            time.sleep(max(0.0, first + self.sent * every - time.time()))
            self.sent += 1
            message = {"from": self.spec["id"], "group": self.spec["group"], "n": self.sent, "t": time.time()}
            self.request(connection, "POST", f"channels/{self.spec['conn']}/send",
                         {"cseq": self.sent, "frames": [{"msg": message}]})

    def poll_loop(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn = self.spec["conn"]
        while True:
            answer = self.request(connection, "GET", f"channels/poll?c={conn}:{self.cursor}&page={conn}&wait=20")
            arrived = time.time()
            if "closed" in answer[conn]:  # not heard of for the presence timeout: the server closed it
                raise RuntimeError("closed")
            for event in answer[conn]["events"]:
                self.note(event["msg"].get("msg"), arrived)
            self.cursor = answer[conn]["cursor"]
            if "retryAfter" in answer:
                time.sleep(answer["retryAfter"] / 1000)

    def note(self, message: object, arrived: float) -> None:
        if not isinstance(message, dict) or message.get("from") == self.spec["id"]:
            return
        if message["group"] != self.spec["group"]:
            self.wrong_group += 1
        key = f"{message['from']}:{message['n']}"
        self.received[key] = self.received.get(key, 0) + 1
        self.latencies.append((arrived - message["t"]) * 1000)


def load_process() -> None:
    """Run the pages given on stdin; print what each sent and received."""
    job = json.loads(sys.stdin.read())
    pages = [Page(spec, job["port"]) for spec in job["pages"]]
    for page in pages:
        threading.Thread(target=page.run, args=(page.poll_loop,), daemon=True).start()
    senders = [threading.Thread(target=page.run, daemon=True,
                                args=(page.send_loop, job["every"], job["start"] + (i * 0.618 % 1) * job["every"],
                                      job["start"] + job["seconds"]))
               for i, page in enumerate(pages)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    time.sleep(DRAIN_SECONDS)
    json.dump({"cpu": time.process_time(), "pages": [{"id": p.spec["id"], "group": p.spec["group"], "sent": p.sent, "received": dict(p.received),
                "latencies": list(p.latencies), "wrong": p.wrong_group, "failed": p.failed} for p in pages]},
              sys.stdout)


# --- a step: the pages set up, the load run, the figures --------------------------------------

def jatos_lite_pages(port: int, count: int) -> list[dict]:
    batch = {"title": "Scale", "active": True, "maxActiveMembers": GROUP_SIZE, "maxTotalMembers": GROUP_SIZE,
             "maxTotalWorkers": None, "allowedWorkerTypes": ["GeneralMultiple"], "comments": None,
             "batchInput": None, "uuid": "0c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5"}
    runs = study_runs(port, count, groupStudy=True, dir_name="channels_scale", batches=[batch])
    pages = []
    for number, (path, cookie) in enumerate(runs):  # joined one after another: groups fill in order
        prefix = "/".join(path.split("/")[:3]) + "/"
        page = Page({"prefix": prefix, "cookie": cookie, "cursor": 0, "conn": "", "id": number, "group": 0}, port)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        opened = page.request(connection, "POST", "group/join", {"openId": f"scale{number}"})
        connection.close()
        group = opened["events"][0]["msg"]["groupResultId"]
        pages.append({**page.spec, "cookie": page.headers["Cookie"], "conn": opened["conn"],
                      "cursor": opened["cursor"], "group": group})
    with ThreadPoolExecutor(16) as pool:  # skip the joins that happened before each page polled
        return list(pool.map(lambda spec: skip_to_now(port, spec), pages))


def skip_to_now(port: int, spec: dict) -> dict:
    page = Page(spec, port)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    answer = page.request(connection, "GET", f"channels/poll?c={spec['conn']}:{spec['cursor']}&wait=0")
    connection.close()
    return {**spec, "cursor": answer[spec["conn"]]["cursor"], "cookie": page.headers["Cookie"]}


def relay_pages(count: int) -> list[dict]:
    return [{"prefix": "/relay/", "cookie": "", "cursor": 0, "conn": f"g{n // GROUP_SIZE}-{n % GROUP_SIZE}",
             "id": n, "group": n // GROUP_SIZE} for n in range(count)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_load(port: int, pages: list[dict], every: float, seconds: float, processes: int) -> tuple[list[dict], float]:
    """What each page sent and received, and the CPU seconds the load processes used."""
    start_at = time.time() + 1.0 + len(pages) / 500
    shares = [pages[i::processes] for i in range(processes)]
    workers = [subprocess.Popen([sys.executable, __file__, "--load"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True) for _ in shares]
    for worker, share in zip(workers, shares):
        worker.stdin.write(json.dumps({"port": port, "pages": share, "every": every, "seconds": seconds,
                                       "start": start_at}))
        worker.stdin.close()
    reports = [json.loads(worker.stdout.read()) for worker in workers]
    return [page for report in reports for page in report["pages"]], sum(report["cpu"] for report in reports)


def figures(results: list[dict], cpu: float, rss: float, load_cpu: float) -> dict:
    members: dict[int, list[dict]] = {}
    for page in results:
        members.setdefault(page["group"], []).append(page)
    lost = duplicated = 0
    for page in results:
        expected = {f"{other['id']}:{n}" for other in members[page["group"]] if other["id"] != page["id"]
                    for n in range(1, other["sent"] + 1)}
        lost += len(expected - set(page["received"]))
        duplicated += sum(times - 1 for times in page["received"].values())
    latencies = [value for page in results for value in page["latencies"]]
    sent = sum(page["sent"] for page in results)
    return {"sent": sent, "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
            "max": max(latencies, default=float("nan")), "late": sum(v > LATE_MS for v in latencies), "lost": lost,
            "dup": duplicated, "wrong": sum(page["wrong"] for page in results),
            "failed": sum(page["failed"] for page in results), "rss": rss,
            "cpu_ms": cpu / sent * 1000 if sent else float("nan"),
            "load_ms": load_cpu / sent * 1000 if sent else float("nan")}


def measure(script: str, pages_of: object, count: int, args: argparse.Namespace, every: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        threads = args.threads if script is JATOS_LITE else args.relay_threads
        server, port = start(script, tmp, str(threads), API_TOKEN)
        try:
            pages = pages_of(port, count) if script is JATOS_LITE else pages_of(count)
            before = cpu_seconds(server.pid)
            results, load_cpu = run_load(port, pages, every, args.seconds, args.processes)
            return figures(results, cpu_seconds(server.pid) - before, peak_rss_mb(server.pid), load_cpu)
        finally:
            server.kill()
            server.wait()


def report(name: str, f: dict) -> None:
    print(f"{name:>10} | {f['sent']:>6} {f['p50']:>7.1f} {f['p99']:>8.1f} {f['max']:>8.1f} {f['late']:>5} "
          f"{f['lost']:>5} {f['dup']:>4} {f['wrong']:>5} {f['failed']:>6} {f['rss']:>7.0f} {f['cpu_ms']:>7.2f} "
          f"{f['load_ms']:>7.2f}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", default="50,100,250,500,1000")
    parser.add_argument("--every", default="5,1", help="seconds between one page's messages, one series each")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=jatos_lite.Config().threads)  # serve's default
    parser.add_argument("--relay-threads", type=int, default=1000)  # a thread per held poll
    args = parser.parse_args()
    print(f"groups of {GROUP_SIZE}, {args.seconds:g} s, {args.threads} jatos-lite threads, "
          f"{args.relay_threads} relay threads, "
          f"{args.processes} load processes; latency in ms; lost = not delivered {DRAIN_SECONDS:g} s after the "
          f"last send; late = over {LATE_MS / 1000:g} s; failed = pages whose request timed out (60 s) or whose "
          f"channel the server closed (not heard of for its presence timeout); RSS = server peak MB; "
          f"CPU = server ms per message; load = the load processes' ms per message (same machine)")
    for every in (float(text) for text in args.every.split(",")):
        print(f"\none message per page every {every:g} s")
        print(f"{'pages':>5} {'server':>10} | {'sent':>6} {'p50':>7} {'p99':>8} {'max':>8} {'late':>5} {'lost':>5} "
              f"{'dup':>4} {'wrong':>5} {'failed':>6} {'RSS':>7} {'CPU':>7} {'load':>7}")
        for count in (int(text) for text in args.pages.split(",")):
            for name, script, pages_of in (("jatos-lite", JATOS_LITE, jatos_lite_pages),
                                           ("relay", RELAY, relay_pages)):
                print(f"{count:>5} ", end="")
                report(name, measure(script, pages_of, count, args, every))


if __name__ == "__main__":
    if sys.argv[1:] == ["--load"]:
        load_process()
    else:
        main()
