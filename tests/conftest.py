"""Shared fixtures: a fresh jatos-lite per test, in-process (WebTest) or on a real waitress."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest
import webtest

import jatos_lite

# A test that starts a server (also in a subprocess) must not open the developer's browser.
os.environ["JATOS_LITE_BROWSER"] = "off"

API_TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def make_jzip(title: str = "Test study", dir_name: str = "test_study", components: list[dict] | None = None,
              files: dict[str, bytes | str] | None = None, batches: list[dict] | None = None,
              study_uuid: str | None = None, version: object = "3", **study_keys: object) -> bytes:
    """A study archive as JATOS 3.10 writes it. `components` are JATOS component objects (a title
    and htmlFilePath suffice); `files` maps asset paths (inside the study folder) to contents;
    missing component HTML files are created with a tiny page."""
    components = components if components is not None else [
        {"title": f"Component {i}", "htmlFilePath": f"c{i}.html"} for i in (1, 2, 3)]
    components = [{"uuid": str(uuid.uuid4()), "reloadable": False, "active": True, "comments": None,
                   "componentInput": None, **c} for c in components]
    files = dict(files or {})
    for component in components:
        path = component.get("htmlFilePath")
        if path and path not in files:
            files[path] = f"<!DOCTYPE html><title>{component['title']}</title><p>{component['title']}</p>"
    data = {"uuid": study_uuid or str(uuid.uuid4()), "title": title, "description": None, "groupStudy": False,
            "linearStudy": False, "allowPreview": False, "dirName": dir_name, "comments": None,
            "studyInput": None, "endRedirectUrl": None, "studyEntryMsg": None, "componentList": components,
            "batchList": batches if batches is not None else [
                {"uuid": str(uuid.uuid4()), "title": "Default", "active": True, "maxActiveMembers": None,
                 "maxTotalMembers": None, "maxTotalWorkers": None,
                 "allowedWorkerTypes": ["PersonalSingle", "PersonalMultiple", "GeneralSingle",
                                        "GeneralMultiple", "MT"],
                 "comments": None, "batchInput": None}]}
    data.update(study_keys)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("study.jas", json.dumps({"version": version, "data": data}))
        for path, content in files.items():
            archive.writestr(f"{dir_name}/{path}", content)
    return buffer.getvalue()


@pytest.fixture
def config(tmp_path: Path) -> jatos_lite.Config:
    return jatos_lite.Config(studies=tmp_path / "studies", data=tmp_path / "data", api_token=API_TOKEN)


@pytest.fixture
def store(config: jatos_lite.Config):
    store = jatos_lite.Store(config.db_path)
    yield store
    store.close()


@pytest.fixture
def app(config: jatos_lite.Config, store: jatos_lite.Store):
    return jatos_lite.create_app(config, store)


@pytest.fixture
def client(app) -> webtest.TestApp:
    """An in-process browser with a cookie jar."""
    return webtest.TestApp(app)


class Lab:
    """Researcher-side shortcuts over the API of an in-process app."""

    def __init__(self, client: webtest.TestApp):
        self.client = client

    def import_study(self, archive: bytes, status: int | str = "2*", **flags: object) -> dict:
        query = "&".join(f"{k}={str(v).lower()}" for k, v in flags.items())
        response = self.client.post(f"/jatos/api/v1/studies?{query}", archive, status=status,
                                    headers={**AUTH, "Content-Type": "application/zip"})
        return response.json

    def study(self, **kwargs: object) -> dict:
        """Import a fresh study (make_jzip arguments) and return its API object with components and batches."""
        study_id = self.import_study(make_jzip(**kwargs))["data"]["id"]
        return self.client.get(f"/jatos/api/v1/studies/{study_id}/properties?withComponentProperties=true"
                               "&withBatchProperties=true", headers=AUTH).json["data"]

    def code(self, study_id: int, worker_type: str, batch_id: int | None = None, **params: object) -> str:
        body = {"type": worker_type, **({"batchId": batch_id} if batch_id else {}), **params}
        return self.client.post_json(f"/jatos/api/v1/studies/{study_id}/studyCodes", body,
                                     headers=AUTH).json["data"][0]

    def sign_in(self, browser: webtest.TestApp | None = None) -> None:
        """Sign `browser` (default: this client) in as the researcher."""
        (browser or self.client).get(f"/jatos/login?token={API_TOKEN}", status=303)


@pytest.fixture
def lab(client: webtest.TestApp) -> Lab:
    return Lab(client)


@pytest.fixture
def legacy_lab(config: jatos_lite.Config, store: jatos_lite.Store) -> Lab:
    """A lab whose server accepts the old links naming a personal worker or General Single (--legacy-links)."""
    return Lab(webtest.TestApp(jatos_lite.create_app(dataclasses.replace(config, legacy_links=True), store)))


ROOT = Path(__file__).resolve().parent.parent


def folders(root: Path) -> list[str]:
    """The CLI options for a data and a studies folder inside `root`."""
    return ["--studies", str(root / "studies"), "--data", str(root / "data")]


class Started:
    """`jatos-lite serve` in a subprocess (by default the checkout's module run by this Python,
    working in `root`), up to its 'Press Ctrl+C' line."""

    def __init__(self, root: Path, port: int, *extra: str, command: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        command = command or [sys.executable, str(ROOT / "jatos_lite.py")]
        self.process = subprocess.Popen(
            [*command, "serve", "--port", str(port), "--admin-port", str(free_port()), "--api-token", API_TOKEN,
             *folders(root), *extra], cwd=root,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1", "JATOS_LITE_BROWSER": "off"})
        self.banner = ""
        while "Press Ctrl+C" not in self.banner:
            line = self.process.stdout.readline()
            assert line, f"the server ended: {self.process.stderr.read()}"
            self.banner += line

    def stop(self, how: int = signal.SIGINT) -> tuple[int, str]:
        self.process.send_signal(how)
        out, _ = self.process.communicate(timeout=30)
        return self.process.returncode, out

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()

    def api(self, method: str, path: str, body: bytes | None = None, kind: str = "application/json") -> bytes:
        request = urllib.request.Request(f"{self.url}/jatos/api/v1{path}", data=body, method=method,
                                         headers={**AUTH, "Content-Type": kind})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    """jatos-lite on a real waitress server, as `serve` builds it, on a free loopback port, in a
    background thread."""

    def __init__(self, config: jatos_lite.Config, port: int | None = None):
        self.config = config
        self.app = jatos_lite.create_app(config)
        self.server = jatos_lite.guarded_server(self.app, config, host="127.0.0.1", port=port or free_port(),
                                                threads=16, connection_limit=jatos_lite.connection_limit(config.connections),
                                                **jatos_lite.WAITRESS_OPTIONS)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.closing = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        for _ in range(100):
            try:
                urllib.request.urlopen(self.url + "/ping", timeout=1).read()
                return
            except OSError:
                time.sleep(0.05)

    def _run(self) -> None:
        try:
            self.server.run()
        except OSError:
            if not self.closing:  # closing the sockets under the loop ends it with EBADF
                raise

    def close(self) -> None:
        import waitress.wasyncore

        self.closing = True
        self.app.config["jatos_lite.hub"].stop()
        self.server.task_dispatcher.shutdown()
        waitress.wasyncore.close_all(self.server._map)  # the loop runs while any connection is open
        self.thread.join(timeout=5)
        self.app.config["jatos_lite.store"].close()


class RemoteLab:
    """Researcher-side shortcuts over the API of a live server (real HTTP)."""

    def __init__(self, server: LiveServer):
        self.base = server.url

    def raw(self, method: str, path: str, body: object = None, content_type: str = "application/json") -> bytes:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base}/jatos/api/v1{path}", data=data, method=method,
                                         headers={**AUTH, "Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def api(self, method: str, path: str, body: object = None, content_type: str = "application/json") -> dict:
        return json.loads(self.raw(method, path, body, content_type))

    def import_study(self, archive: bytes) -> int:
        return self.api("POST", "/studies", archive, "application/zip")["data"]["id"]

    def code(self, study_id: int, worker_type: str = "gm", **params: object) -> str:
        return self.api("POST", f"/studies/{study_id}/studyCodes", {"type": worker_type, **params})["data"][0]

    def metadata(self, study_result_id: int) -> dict:
        """The results metadata of one study run (formats-and-api.md §2.6)."""
        return self.api("GET", f"/results/metadata?studyResultId={study_result_id}")["data"][0]["studyResults"][0]

    def data(self, study_result_id: int) -> str:
        return self.raw("GET", f"/results/data?studyResultId={study_result_id}&asPlainText=true").decode()


class Participant:
    """A browser tab running the test study, with shortcuts to the server's view of its run."""

    def __init__(self, page, lab: RemoteLab):
        self.page, self.lab = page, lab

    def ready(self) -> "Participant":
        self.page.wait_for_function("window.ready !== undefined", timeout=15_000)
        self.page.evaluate("window.ready")
        return self

    def js(self, expression: str, arg: object = None) -> object:
        return self.page.evaluate(expression, arg)

    @property
    def sr_id(self) -> int:
        return int(self.js("jatos.studyResultId"))

    def stored(self) -> str:
        return self.lab.data(self.sr_id)

    def metadata(self) -> dict:
        return self.lab.metadata(self.sr_id)

    def where(self) -> str:
        return self.page.locator("#where").inner_text()


@pytest.fixture
def live_server(config: jatos_lite.Config):
    server = LiveServer(config)
    yield server
    server.close()


BROWSER_VARIABLE = "JATOS_LITE_TEST_BROWSER"  # names the browser to test with, where it is not found
BROWSER_COMMANDS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "msedge",
                    "microsoft-edge")
BROWSER_PATHS = {
    "darwin": ["/Applications/Chromium.app/Contents/MacOS/Chromium",
               "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
               "/Applications/Microsoft Edge.app/Contents/MacOS/Microsoft Edge"],
    "win32": [rf"{os.environ.get(root, '')}\{path}" for root in ("PROGRAMFILES", "PROGRAMFILES(X86)", "LOCALAPPDATA")
              for path in (r"Google\Chrome\Application\chrome.exe", r"Microsoft\Edge\Application\msedge.exe",
                           r"Chromium\Application\chrome.exe")],
}


def find_chromium() -> str:
    """The browser the browser tests drive: the one JATOS_LITE_TEST_BROWSER names, else Chromium,
    Chrome or Edge where each OS puts them."""
    import shutil

    named = os.environ.get(BROWSER_VARIABLE)
    if named:
        return named
    found = [shutil.which(command) for command in BROWSER_COMMANDS] + \
        [path for path in BROWSER_PATHS.get(sys.platform, []) if Path(path).is_file()]
    for path in found:
        if path:
            return path
    pytest.fail(f"No Chromium, Chrome or Edge found: install one, or name it in {BROWSER_VARIABLE}.")


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def chromium():
    """The system's Chromium (or Chrome, or Edge: find_chromium), headless, driven by playwright
    (one per test module)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        yield browser
        browser.close()
