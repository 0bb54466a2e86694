"""A study page cannot act as the researcher (issue #16 point 5): the admin page, sign-in and the
admin session answer only at the admin port, another origin than the study pages, so a study's
script run in a researcher's test run can neither read the CSRF token nor use the session."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

import jatos_lite
from conftest import API_TOKEN, AUTH, free_port, make_jzip

# The study's own script tries what a hostile third-party study would.
PROBE_PAGE = """<!DOCTYPE html><html><head><script src="jatos.js"></script></head><body><p>probe</p><script>
jatos.onLoad(async function () {
  var outcome = {};
  async function attempt(name, url, options) {
    try { var response = await fetch(url, options); outcome[name] = response.status + " " + (await response.text()); }
    catch (error) { outcome[name] = "blocked"; }
  }
  await attempt("session", "/jatos/api/v1/admin/session", {credentials: "include"});
  await attempt("token", "/jatos/api/v1/users/1/tokens", {method: "POST", credentials: "include",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify({name: "stolen", expiresAfter: 0})});
  await attempt("adminPort", "ADMIN_ORIGIN/jatos/api/v1/admin/session", {credentials: "include"});
  await attempt("adminPage", "/jatos/", {credentials: "include"});
  await jatos.submitResultData(JSON.stringify(outcome));
  jatos.endStudy();
});
</script></body></html>"""


class TwoPorts:
    """jatos-lite as `serve` runs it: participants' port and the admin port, one server."""

    def __init__(self, root: Path):
        self.port, self.admin_port = free_port(), free_port()
        self.config = jatos_lite.Config(studies=root / "studies", data=root / "data", api_token=API_TOKEN,
                                        port=self.port, admin_port=self.admin_port, threads=8)
        self.app = jatos_lite.create_app(self.config)
        self.server = jatos_lite.guarded_server(self.app, self.config, threads=8, **jatos_lite.WAITRESS_OPTIONS,
                                                listen=f"127.0.0.1:{self.port} 127.0.0.1:{self.admin_port}")
        threading.Thread(target=self.server.run, daemon=True).start()
        self.url, self.admin_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.admin_port}"

    def close(self) -> None:
        self.server.close()
        self.app.config["jatos_lite.hub"].stop()


@pytest.fixture
def two_ports(tmp_path: Path) -> Iterator[TwoPorts]:
    server = TwoPorts(tmp_path)
    yield server
    server.close()


def fetch(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def signed_in_cookie(server: TwoPorts) -> str:
    status, _ = fetch(f"{server.url}/jatos/login?token={API_TOKEN}")
    assert status == 404, "no sign-in at the participants' port"
    request = urllib.request.Request(f"{server.admin_url}/jatos/login?token={API_TOKEN}")
    try:
        urllib.request.build_opener(NoRedirect).open(request, timeout=10)
    except urllib.error.HTTPError as error:
        assert error.code == 303
        return error.headers["Set-Cookie"].split(";")[0]
    raise AssertionError("sign-in did not redirect")


def test_the_session_counts_only_at_the_admin_port_and_tokens_at_both(two_ports: TwoPorts) -> None:
    cookie = {"Cookie": signed_in_cookie(two_ports)}
    status, text = fetch(f"{two_ports.url}/jatos/", cookie)
    assert status == 404 and f"localhost:{two_ports.admin_port}/jatos/" in text
    assert fetch(f"{two_ports.url}/jatos/api/v1/admin/session", cookie)[0] == 404
    assert fetch(f"{two_ports.url}/jatos/api/v1/studies/properties", cookie)[0] == 401
    assert fetch(f"{two_ports.url}/jatos/api/v1/studies/properties", AUTH)[0] == 200
    assert fetch(f"{two_ports.admin_url}/jatos/api/v1/admin/session", cookie)[0] == 200
    assert fetch(f"{two_ports.admin_url}/jatos/api/v1/studies/properties", cookie)[0] == 200
    assert fetch(f"{two_ports.admin_url}/publix/run")[0] == 404, "no study pages at the admin port"


def test_a_study_run_by_the_researcher_cannot_use_the_admin_session(two_ports: TwoPorts, chromium) -> None:
    page_text = PROBE_PAGE.replace("ADMIN_ORIGIN", two_ports.admin_url)
    archive = make_jzip(title="Probe", dir_name="probe", components=[{"title": "Probe", "htmlFilePath": "p.html"}],
                        files={"p.html": page_text})
    request = urllib.request.Request(f"{two_ports.admin_url}/jatos/api/v1/studies", data=archive,
                                     headers={**AUTH, "Content-Type": "application/zip"})
    study_id = json.loads(urllib.request.urlopen(request, timeout=10).read())["data"]["id"]
    page = chromium.new_context().new_page()
    page.goto(f"{two_ports.admin_url}/jatos/login?token={API_TOKEN}")
    page.wait_for_selector("#studies")
    page.goto(f"{two_ports.admin_url}/jatos/{study_id}/run")  # the admin page's test run
    outcome = probe_outcome(two_ports, study_id)
    assert outcome["session"].startswith("404") and "csrfToken" not in outcome["session"]
    assert outcome["token"].startswith("401") and "jap_" not in outcome["token"]
    assert outcome["adminPort"] == "blocked"  # another origin: the browser does not let the page read it
    assert outcome["adminPage"].startswith("404")
    _, tokens = fetch(f"{two_ports.url}/jatos/api/v1/users/1/tokens", AUTH)
    assert "stolen" not in tokens
    page.wait_for_url(f"{two_ports.admin_url}/jatos/#/studies/{study_id}", timeout=15_000)  # back on the admin page
    page.wait_for_selector("text=Probe")


def probe_outcome(server: TwoPorts, study_id: int) -> dict:
    """What the probe study's script could do, once it has stored it."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        _, data = fetch(f"{server.url}/jatos/api/v1/results/data?studyId={study_id}&asPlainText=true", AUTH)
        if data.strip():
            return json.loads(data.strip())
        time.sleep(0.2)
    raise AssertionError("the probe study stored nothing")
