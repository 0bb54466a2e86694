"""Killing the server at any moment loses nothing it acknowledged (DESIGN.md §4).

A real `jatos-lite serve` process takes appends, session writes and uploads from a client
that records every acknowledged request; the process is then killed hard (no shutdown
code runs) while requests are in flight, restarted on the same folders, and everything
acknowledged must be there.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import json
import random
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import jatos_lite

from conftest import API_TOKEN, AUTH, free_port, make_jzip

MODULE = Path(__file__).resolve().parent.parent / "jatos_lite.py"


class ServerProcess:
    """`python jatos_lite.py serve` on a free loopback port, over the given folders."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, str(MODULE), "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--admin-port", str(free_port()),
             "--studies", str(root / "studies"), "--data", str(root / "data"), "--api-token", API_TOKEN],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/ping", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError("jatos-lite did not start")

    def kill(self) -> None:
        """A hard kill: SIGKILL on POSIX, TerminateProcess on Windows."""
        self.process.kill()
        self.process.wait(timeout=10)


def api(server: ServerProcess, path: str, body: bytes | None = None, content_type: str = "application/json") -> dict:
    request = urllib.request.Request(server.url + "/jatos/api/v1" + path, data=body,
                                     headers={**AUTH, "Content-Type": content_type})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def start_run(server: ServerProcess, study_id: int) -> tuple[urllib.request.OpenerDirector, str, str]:
    """A participant's browser started on a General Multiple link: (opener, study result UUID, component UUID)."""
    code = api(server, f"/studies/{study_id}/studyCodes", json.dumps({"type": "gm"}).encode())["data"][0]
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    page_url = browser.open(f"{server.url}/publix/{code}", timeout=10).geturl()
    sr_uuid, component_uuid = page_url.split("/publix/")[1].split("/")[:2]
    return browser, sr_uuid, component_uuid


class Participant(threading.Thread):
    """A page that writes as fast as the server answers, one request after another as jatos.js
    does: numbered appends, every 5th step a study session write, every 10th a file upload.
    It records what was acknowledged and stops at the first failure (the kill)."""

    def __init__(self, server: ServerProcess, study_id: int):
        super().__init__(daemon=True)
        self.browser, self.sr_uuid, self.component_uuid = start_run(server, study_id)
        self.server = server
        self.appends: list[int] = []
        self.sessions: list[int] = []
        self.files: list[int] = []
        self.in_flight: tuple[str, int] | None = None

    def run(self) -> None:
        for step in range(1_000_000):
            for kind, send, done in self.writes_of(step):
                self.in_flight = (kind, step)
                try:
                    self.browser.open(send(), timeout=10).read()
                except (OSError, http.client.HTTPException):  # the kill; an answer cut short is no acknowledgement
                    return
                done.append(step)
            self.in_flight = None

    def writes_of(self, step: int) -> list[tuple[str, Any, list[int]]]:
        writes = [("append", lambda: self.request("/resultData", f"[{step}]".encode(), "text/plain"), self.appends)]
        if step % 5 == 0:
            writes.append(("session", lambda: self.request("/../studySessionData", json.dumps({"n": step}).encode(),
                                                           "text/plain"), self.sessions))
        if step % 10 == 0:
            writes.append(("file", lambda: self.upload(step), self.files))
        return writes

    def request(self, path: str, body: bytes, content_type: str) -> urllib.request.Request:
        target = f"/publix/{self.sr_uuid}/{self.component_uuid}{path}".replace(f"/{self.component_uuid}/..", "")
        return urllib.request.Request(self.server.url + target, data=body, method="POST",
                                      headers={"Content-Type": content_type, "X-Request-Id": secrets.token_hex(8)})

    def upload(self, step: int) -> urllib.request.Request:
        boundary = "jatoslitetestboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f{step}.bin\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + file_content(step) + \
            f"\r\n--{boundary}--\r\n".encode()
        return self.request(f"/files/f{step}.bin", body, f"multipart/form-data; boundary={boundary}")


def file_content(step: int) -> bytes:
    return step.to_bytes(4, "big") * 16_384


def stored_run(folders: Path, sr_uuid: str) -> tuple[str, str | None]:
    """(result data, study session text) of a run, read straight from the database."""
    with jatos_lite.Store(folders / "data" / "jatos.sqlite").snapshot() as db:
        run = db.one("SELECT * FROM study_results WHERE uuid = ?", sr_uuid)
        data = db.value("SELECT data FROM component_results WHERE study_result_id = ?", run["id"])
    return data or "", run["study_session_data"]


def check_nothing_acknowledged_was_lost(folders: Path, page: Participant, server: ServerProcess) -> None:
    data, session = stored_run(folders, page.sr_uuid)
    acknowledged = "".join(f"[{n}]" for n in page.appends)
    in_flight = page.in_flight == ("append", len(page.appends))
    assert data in (acknowledged, acknowledged + f"[{len(page.appends)}]" if in_flight else acknowledged)
    if page.sessions:
        stored = json.loads(session)["n"]
        assert stored == page.sessions[-1] or page.in_flight == ("session", stored)
    for step in page.files:
        url = f"{server.url}/publix/{page.sr_uuid}/files/f{step}.bin"
        assert page.browser.open(url, timeout=10).read() == file_content(step)


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    (tmp_path / "studies").mkdir()
    return tmp_path


def test_ten_hard_kills_under_load_lose_nothing_acknowledged(folders: Path) -> None:
    """Ten times: three pages write at full speed, the server is killed at a random moment and
    restarted; every acknowledged append, session write and upload is there, the database is sound."""
    random_moment = random.Random(20261125)
    server = ServerProcess(folders)
    study_id = api(server, "/studies", make_jzip(), "application/zip")["data"]["id"]
    pages: list[Participant] = []
    for _ in range(10):
        current = [Participant(server, study_id) for _ in range(3)]
        for page in current:
            page.start()
        deadline = time.monotonic() + 30
        while not all(page.files for page in current):  # every kind of write has been acknowledged
            assert time.monotonic() < deadline, "the load did not get going"
            time.sleep(0.02)
        time.sleep(random_moment.uniform(0, 1.2))
        server.kill()
        for page in current:
            page.join(timeout=15)
        pages += current
        server = ServerProcess(folders)
    try:
        assert sum(len(p.appends) for p in pages) > 300, "the load did not get going"
        for page in pages:
            page.server = server
            check_nothing_acknowledged_was_lost(folders, page, server)
    finally:
        server.kill()
    with jatos_lite.Store(folders / "data" / "jatos.sqlite").snapshot() as db:
        assert db.value("PRAGMA integrity_check") == "ok"
