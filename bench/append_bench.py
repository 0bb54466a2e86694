"""appendResultData throughput and latency against a bare waitress+sqlite baseline.

    python bench/append_bench.py [--seconds 3] [--clients 1,8,32,128]

Both servers run in their own process on loopback with the same waitress settings; the
baseline is a WSGI app that only appends a row to a SQLite table in WAL mode with
synchronous=FULL, committing each request (what jatos-lite must do at the least). The
load comes from client threads with keep-alive connections, each doing one request after
another, like jatos.js's queue. Target (DESIGN.md §7): at 32 clients jatos-lite reaches at
least 0.7 x the baseline's requests/s.
"""

from __future__ import annotations

import argparse
import http.client
import http.cookiejar
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import API_TOKEN, AUTH, free_port, make_jzip  # noqa: E402

THREADS = 64

BASELINE = textwrap.dedent('''
    import logging, sqlite3, sys, threading, waitress
    logging.disable(logging.WARNING)
    path, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    local = threading.local()
    def connection():
        if not hasattr(local, "db"):
            local.db = sqlite3.connect(path, isolation_level=None, timeout=30)
            local.db.execute("PRAGMA journal_mode=WAL")
            local.db.execute("PRAGMA synchronous=FULL")
        return local.db
    connection().execute("CREATE TABLE IF NOT EXISTS appends (run TEXT, data TEXT)")
    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        db = connection()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO appends VALUES (?, ?)", (environ["PATH_INFO"], body.decode()))
        db.execute("COMMIT")
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return [b""]
    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, connection_limit=1000, _quiet=True)
''')

JATOS_LITE = textwrap.dedent('''
    import logging, sys, waitress, jatos_lite
    from pathlib import Path
    root, port, threads, token = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    logging.disable(logging.WARNING)
    config = jatos_lite.Config(studies=root / "studies", data=root / "data", api_token=token, threads=threads)
    waitress.serve(jatos_lite.create_app(config), host="127.0.0.1", port=port, threads=threads,
                   connection_limit=1000, _quiet=True)
''')


def start(script: str, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", script, args[0], str(port), *args[1:]], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.05)
    return process, port


def jatos_lite_targets(port: int, count: int) -> list[tuple[str, dict]]:
    """One study run per client (a General Multiple link each): (resultData path, cookie header)."""
    base = f"http://127.0.0.1:{port}"

    def api(path: str, body: bytes, content_type: str) -> dict:
        request = urllib.request.Request(base + "/jatos/api/v1" + path, data=body,
                                         headers={**AUTH, "Content-Type": content_type})
        return json.loads(urllib.request.urlopen(request).read())

    study_id = api("/studies", make_jzip(), "application/zip")["data"]["id"]
    code = api(f"/studies/{study_id}/studyCodes", json.dumps({"type": "gm"}).encode(), "application/json")["data"][0]
    targets = []
    for _ in range(count):
        jar = http.cookiejar.CookieJar()
        page = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar)).open(f"{base}/publix/{code}")
        cookies = "; ".join(f"{cookie.name}={cookie.value}" for cookie in jar)
        targets.append((urllib.parse.urlsplit(page.geturl()).path.rsplit("/", 1)[0] + "/resultData",
                        {"Cookie": cookies}))
    return targets


def load(port: int, targets: list[tuple[str, dict]], seconds: float) -> tuple[float, list[float]]:
    """Every client posts appends back to back for `seconds`: (requests/s, latencies in ms)."""
    latencies: list[list[float]] = [[] for _ in targets]
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        path, headers = targets[index]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        number = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            connection.request("POST", path, body=f"[{number}]",
                               headers={**headers, "Content-Type": "text/plain", "X-Request-Id": f"r{index}-{number}"})
            response = connection.getresponse()
            response.read()
            assert response.status == 200, response.status
            latencies[index].append((time.perf_counter() - started) * 1000)
            number += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(targets))]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flat = [value for values in latencies for value in values]
    return len(flat) / (time.monotonic() - began), flat


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,8,32,128")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        baseline, baseline_port = start(BASELINE, str(root / "baseline.sqlite"), str(THREADS))
        lite, lite_port = start(JATOS_LITE, str(root), str(THREADS), API_TOKEN)
        try:
            targets = jatos_lite_targets(lite_port, max(counts))
            print(f"{'clients':>7} | {'jatos-lite req/s':>16} {'p50 ms':>7} {'p99 ms':>7} | "
                  f"{'baseline req/s':>14} {'p50 ms':>7} {'p99 ms':>7} | ratio")
            for count in counts:
                lite_rate, lite_ms = load(lite_port, targets[:count], args.seconds)
                base_rate, base_ms = load(baseline_port, [(f"/run{i}", {}) for i in range(count)], args.seconds)
                print(f"{count:>7} | {lite_rate:>16.0f} {statistics.median(lite_ms):>7.1f} "
                      f"{percentile(lite_ms, 0.99):>7.1f} | {base_rate:>14.0f} {statistics.median(base_ms):>7.1f} "
                      f"{percentile(base_ms, 0.99):>7.1f} | {lite_rate / base_rate:.2f}", flush=True)
        finally:
            baseline.kill()
            lite.kill()


if __name__ == "__main__":
    main()
