"""Killing the server at any moment loses nothing it acknowledged (DESIGN.md §4).

A real `jatos-lite serve` process takes appends, session writes and uploads from a client
that records every acknowledged request; the process is then killed hard (no shutdown
code runs) while requests are in flight, restarted on the same folders, and everything
acknowledged must be there.
"""

from __future__ import annotations

import http.cookiejar
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

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
    """Sends numbered appends one after another, as jatos.js does, and records which were acknowledged."""

    def __init__(self, server: ServerProcess, browser: urllib.request.OpenerDirector, path: str):
        super().__init__(daemon=True)
        self.server, self.browser, self.path = server, browser, path
        self.acknowledged: list[int] = []

    def run(self) -> None:
        for number in range(100_000):
            request = urllib.request.Request(f"{self.server.url}{self.path}", data=f"[{number}]".encode(),
                                             method="POST", headers={"Content-Type": "text/plain",
                                                                     "X-Request-Id": f"append-{number}"})
            try:
                self.browser.open(request, timeout=10).read()
            except (OSError, urllib.error.HTTPError):
                return
            self.acknowledged.append(number)


def stored_data(server: ServerProcess, study_id: int) -> str:
    request = urllib.request.Request(f"{server.url}/jatos/api/v1/results/data?studyId={study_id}&asPlainText=true",
                                     headers=AUTH)
    return urllib.request.urlopen(request, timeout=10).read().decode()


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    (tmp_path / "studies").mkdir()
    return tmp_path


def test_kill_during_appends_keeps_every_acknowledged_append(folders: Path) -> None:
    """Three participants append as fast as they can; a hard kill mid-stream loses none that was answered."""
    server = ServerProcess(folders)
    study_id = api(server, "/studies", make_jzip(), "application/zip")["data"]["id"]
    participants = []
    for _ in range(3):
        browser, sr_uuid, component_uuid = start_run(server, study_id)
        participants.append(Participant(server, browser, f"/publix/{sr_uuid}/{component_uuid}/resultData"))
    for participant in participants:
        participant.start()
    time.sleep(1.5)
    server.kill()
    for participant in participants:
        participant.join(timeout=15)
    assert all(len(p.acknowledged) > 10 for p in participants), [len(p.acknowledged) for p in participants]

    restarted = ServerProcess(folders)
    try:
        text = stored_data(restarted, study_id)
    finally:
        restarted.kill()
    for participant in participants:
        # The data of one run is the concatenation of its appends, so find this run's stream.
        expected = "".join(f"[{n}]" for n in participant.acknowledged)
        streams = [line for line in text.splitlines() if line.startswith("[0]")]
        assert any(stream.startswith(expected) for stream in streams)
        # At most the one request in flight at the kill may be stored without its answer.
        assert any(stream in (expected, expected + f"[{len(participant.acknowledged)}]") for stream in streams)


def test_kill_after_upload_keeps_the_file(folders: Path) -> None:
    """An upload that was answered is on disk, whole, after a hard kill."""
    server = ServerProcess(folders)
    study_id = api(server, "/studies", make_jzip(), "application/zip")["data"]["id"]
    browser, sr_uuid, component_uuid = start_run(server, study_id)
    content = bytes(range(256)) * 4096
    boundary = "jatoslitetestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"blob.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{server.url}/publix/{sr_uuid}/{component_uuid}/files/blob.bin", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    browser.open(request, timeout=10).read()
    server.kill()

    restarted = ServerProcess(folders)
    try:
        downloaded = browser.open(f"{restarted.url}/publix/{sr_uuid}/files/blob.bin", timeout=10).read()
    finally:
        restarted.kill()
    assert downloaded == content
