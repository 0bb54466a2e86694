"""A lab day at once: 200 participants, each a whole study run, against a bare baseline.

    python bench/lab_bench.py [--participants 200] [--appends 50] [--upload-mb 1]

Each simulated participant starts on a General Multiple link, fetches initData, sends
`appends` result-data appends one after another (as jatos.js's queue does), uploads one
file of `upload-mb` MB and ends the study, each on its own keep-alive connection; all
start together. Afterwards every run's data and file are read back through the API and
compared byte for byte. The baseline, run the same way in the same run, is a bare
waitress + SQLite app that stores every request body as a row (WAL, synchronous=FULL).
Peak RSS is the server process's high-water mark (Linux /proc). Target (DESIGN.md §7):
0 lost bytes, server RSS under 150 MB.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import AUTH, BASELINE, percentile, start, start_jatos_lite, study_runs

THREADS = 1000  # what `serve` uses


BOUNDARY = "labbenchboundary"


def upload_body(content: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"upload.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()


class Participant(threading.Thread):
    """One study run, request after request; records each latency in ms."""

    def __init__(self, port: int, page: str, cookie: str, appends: int, upload: bytes, gate: threading.Event):
        super().__init__(daemon=True)
        self.port, self.page, self.cookie, self.appends, self.upload, self.gate = port, page, cookie, appends, upload, gate
        self.latencies: list[float] = []
        self.error: str | None = None

    def request(self, connection: http.client.HTTPConnection, method: str, path: str, body: bytes = b"",
                content_type: str = "text/plain") -> bytes:
        started = time.perf_counter()
        connection.request(method, path, body=body or None,
                           headers={"Cookie": self.cookie, "Content-Type": content_type,
                                    "X-Request-Id": f"{path}:{len(self.latencies)}"})
        response = connection.getresponse()
        answer = response.read()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: {response.status} {answer[:200]!r}")
        self.latencies.append((time.perf_counter() - started) * 1000)
        return answer

    def run(self) -> None:
        self.gate.wait()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        component = self.page.rsplit("/", 1)[0]
        run = component.rsplit("/", 1)[0]
        try:
            self.request(connection, "GET", component + "/initData")
            for number in range(self.appends):
                self.request(connection, "POST", component + "/resultData", f"[{number}]".encode())
            self.request(connection, "POST", component + "/files/upload.bin", upload_body(self.upload),
                         f"multipart/form-data; boundary={BOUNDARY}")
            self.request(connection, "GET", run + "/end")
        except (OSError, RuntimeError) as error:
            self.error = str(error)
        finally:
            connection.close()


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def drive(port: int, runs: list[tuple[str, str]], appends: int, upload: bytes) -> tuple[float, list[Participant]]:
    gate = threading.Event()
    participants = [Participant(port, page, cookie, appends, upload, gate) for page, cookie in runs]
    for participant in participants:
        participant.start()
    began = time.perf_counter()
    gate.set()
    for participant in participants:
        participant.join()
    return time.perf_counter() - began, participants


def lost_bytes(port: int, participants: list[Participant], appends: int, upload: bytes) -> int:
    """Bytes acknowledged to a participant that the API does not give back."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    expected = "".join(f"[{n}]" for n in range(appends)).encode()
    lost = 0
    for participant in participants:
        sr_id = re.search(r"JATOS_ID_(\d+)=", participant.cookie).group(1)
        connection.request("GET", f"/jatos/api/v1/results/metadata?studyResultId={sr_id}", headers=AUTH)
        meta = json.loads(connection.getresponse().read())["data"][0]["studyResults"][0]
        connection.request("GET", f"/jatos/api/v1/results/data?studyResultId={meta['id']}&asPlainText=true",
                           headers=AUTH)
        data = connection.getresponse().read().rstrip(b"\n")
        lost += len(expected) - len(data) if data == expected[:len(data)] else len(expected)
        component_result = meta["componentResults"][0]["id"]
        connection.request("GET", f"/jatos/api/v1/results/files/upload.bin?componentResultId={component_result}",
                           headers=AUTH)
        response = connection.getresponse()
        stored = response.read()
        lost += 0 if response.status == 200 and stored == upload else len(upload)
    connection.close()
    return lost


def summary(name: str, seconds: float, participants: list[Participant], rss: float, lost: str) -> str:
    latencies = [value for p in participants for value in p.latencies]
    failed = sum(1 for p in participants if p.error)
    return (f"{name:>10} | {seconds:>6.1f} s {len(latencies) / seconds:>8.0f} req/s "
            f"{statistics.median(latencies):>7.1f} {percentile(latencies, 0.99):>8.1f} | "
            f"{rss:>7.0f} MB | {failed:>6} {lost:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--participants", type=int, default=200)
    parser.add_argument("--appends", type=int, default=50)
    parser.add_argument("--upload-mb", type=float, default=1.0)
    args = parser.parse_args()
    upload = bytes(range(256)) * int(args.upload_mb * 4096)
    with tempfile.TemporaryDirectory() as tmp:
        lite, lite_port = start_jatos_lite(Path(tmp), THREADS)
        baseline, baseline_port = start(BASELINE, str(Path(tmp) / "baseline.sqlite"), str(THREADS))
        try:
            runs = study_runs(lite_port, args.participants, dir_name="lab_bench")
            lite_seconds, lite_participants = drive(lite_port, runs, args.appends, upload)
            lite_rss = peak_rss_mb(lite.pid)
            lost = lost_bytes(lite_port, lite_participants, args.appends, upload)
            fake_runs = [(f"/publix/run{n}/component/start", "") for n in range(args.participants)]
            base_seconds, base_participants = drive(baseline_port, fake_runs, args.appends, upload)
            base_rss = peak_rss_mb(baseline.pid)
        finally:
            lite.kill()
            baseline.kill()
    print(f"{args.participants} participants x (initData, {args.appends} appends, one {args.upload_mb:g} MB upload, end)")
    print(f"{'':>10} | {'time':>8} {'throughput':>14} {'p50 ms':>7} {'p99 ms':>8} | {'peak RSS':>10} | "
          f"{'failed':>6} {'lost bytes':>10}")
    print(summary("jatos-lite", lite_seconds, lite_participants, lite_rss, str(lost)))
    print(summary("baseline", base_seconds, base_participants, base_rss, "-"))
    print(f"time ratio baseline / jatos-lite: {base_seconds / lite_seconds:.2f}  "
          f"(target: 0 lost bytes, jatos-lite peak RSS < 150 MB)")
    for participant in lite_participants:
        if participant.error:
            print("jatos-lite error:", participant.error)
            break


if __name__ == "__main__":
    main()
