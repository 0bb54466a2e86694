"""What the benchmark scripts share: servers in their own processes, study runs, percentiles."""

from __future__ import annotations

import http.cookiejar
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import API_TOKEN, AUTH, free_port, make_jzip  # noqa: E402

# argv = folder, port, threads, API token. As `serve` runs it, without the banner.
JATOS_LITE = textwrap.dedent('''
    import logging, sys, waitress, jatos_lite
    from pathlib import Path
    root, port, threads, token = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    logging.disable(logging.WARNING)
    config = jatos_lite.Config(studies=root / "studies", data=root / "data", api_token=token, threads=threads)
    app = jatos_lite.create_app(config)
    app.config["jatos_lite.hub"].start_watching()
    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, connection_limit=1000, _quiet=True,
                   **jatos_lite.WAITRESS_OPTIONS)
''')


# argv = database file, port, threads. The least a server that keeps data must do: store each
# request body as a row, one committed transaction per request (WAL, synchronous=FULL).
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
    connection().execute("CREATE TABLE IF NOT EXISTS requests (path TEXT, body BLOB)")
    def app(environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        db = connection()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO requests VALUES (?, ?)", (environ["PATH_INFO"], body))
        db.execute("COMMIT")
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return [b""]
    waitress.serve(app, host="127.0.0.1", port=port, threads=threads, connection_limit=2000, _quiet=True,
                   asyncore_use_poll=True, max_request_body_size=2 ** 31)
''')


# The JSON answer of the relay baselines (channels_bench, channels_scale): joined into their scripts.
RELAY_ANSWER = textwrap.dedent('''
    import json
    def answer(start_response, body):
        data = json.dumps(body).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]
''')


def start(script: str, *args: str) -> tuple[subprocess.Popen, int]:
    """Run a server script (argv: args[0], a free port, the other args); return once it answers."""
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


def start_jatos_lite(root: Path, threads: int) -> tuple[subprocess.Popen, int]:
    return start(JATOS_LITE, str(root), str(threads), API_TOKEN)


def api(port: int, path: str, body: bytes, content_type: str = "application/json") -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/jatos/api/v1{path}", data=body,
                                     headers={**AUTH, "Content-Type": content_type})
    return json.loads(urllib.request.urlopen(request).read())


def study_runs(port: int, count: int, **study: object) -> list[tuple[str, str]]:
    """Import a study (make_jzip arguments) and start `count` runs on one General Multiple link,
    each in its own browser: (path of the run's first page, that browser's Cookie header)."""
    study_id = api(port, "/studies", make_jzip(**study), "application/zip")["data"]["id"]
    code = api(port, f"/studies/{study_id}/studyCodes", json.dumps({"type": "gm"}).encode())["data"][0]
    runs = []
    for _ in range(count):
        jar = http.cookiejar.CookieJar()
        page = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar)).open(
            f"http://127.0.0.1:{port}/publix/{code}")
        runs.append((urllib.parse.urlsplit(page.geturl()).path, "; ".join(f"{cookie.name}={cookie.value}" for cookie in jar)))
    return runs


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")
