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
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import BASELINE, percentile, start, start_jatos_lite, study_runs

THREADS = 64


def jatos_lite_targets(port: int, count: int) -> list[tuple[str, dict]]:
    """One study run per client (a General Multiple link each): (resultData path, cookie header)."""
    return [(page.rsplit("/", 1)[0] + "/resultData", {"Cookie": cookies})
            for page, cookies in study_runs(port, count)]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,8,32,128")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        baseline, baseline_port = start(BASELINE, str(root / "baseline.sqlite"), str(THREADS))
        lite, lite_port = start_jatos_lite(root, THREADS)
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
