"""The admin page's Links tab, ready for a lab (issue #13 point 5): the address links and QR codes
are built from, Copy on a plain-http network address, worker-type switches per batch. The
laptop's network address is simulated with a host name Chromium maps to the loopback server:
like a LAN address over plain http, it is not a secure context."""

from __future__ import annotations

import pytest

import jatos_lite
from conftest import API_TOKEN, CHROMIUM_ARGS, LiveServer, RemoteLab, find_chromium, make_jzip
from test_admin_page import snap

pytest.importorskip("playwright.sync_api")

LAN = "192.168.77.5"  # the network address the server says it listens on (lan_addresses is faked)


@pytest.fixture
def lab_server(config: jatos_lite.Config, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(jatos_lite, "lan_addresses", lambda: [LAN])
    server = LiveServer(config)
    yield server
    server.close()


@pytest.fixture
def lan_chromium():
    """Chromium that reaches the loopback server under the name lab.test (not a secure context)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(),
                                             args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP lab.test 127.0.0.1"])
        yield browser
        browser.close()


def signed_in(browser, origin: str):
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{origin}/jatos/login?token={API_TOKEN}")
    page.wait_for_selector("#studies")
    return page


def port_of(server: LiveServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def test_links_are_built_from_the_network_address_when_the_page_is_on_localhost(
        lan_chromium, lab_server: LiveServer) -> None:
    """Link address choice and QR payload: default the network address, 'this computer' on request."""
    lab = RemoteLab(lab_server)
    study_id = lab.import_study(make_jzip(title="Lab", dir_name="lab"))
    code = lab.code(study_id, "gm")
    port = port_of(lab_server)
    page = signed_in(lan_chromium, f"http://localhost:{port}")
    page.goto(f"http://localhost:{port}/jatos/#study/{study_id}/Links")
    page.wait_for_selector(f"#links tr[data-code='{code}']")
    network = f"http://{LAN}:{port}/publix/{code}"
    assert page.input_value("#link-base") == f"http://{LAN}:{port}"
    assert page.locator("#links .link").inner_text() == network
    row = page.locator(f"#links tr[data-code='{code}']")
    row.get_by_role("button", name="QR").click()
    assert row.locator("[data-payload]").get_attribute("data-payload") == network
    assert row.locator("svg.qr").inner_html() == page.evaluate("(text) => qrSvg(text).innerHTML", network)
    snap(page, "links_lab")

    page.select_option("#link-base", f"http://localhost:{port}")
    assert page.locator("#links .link").inner_text() == f"http://localhost:{port}/publix/{code}"
    row.get_by_role("button", name="QR").click()
    assert row.locator("[data-payload]").get_attribute("data-payload") == f"http://localhost:{port}/publix/{code}"
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    row.get_by_role("button", name="Copy").click()
    page.wait_for_selector(f".notice >> text=Copied http://localhost:{port}/publix/{code}")
    assert page.evaluate("navigator.clipboard.readText()") == f"http://localhost:{port}/publix/{code}"


def test_copy_works_on_a_plain_http_network_address(lan_chromium, lab_server: LiveServer) -> None:
    """Copy on a network address: no navigator.clipboard there, the fallback copies and says so."""
    lab = RemoteLab(lab_server)
    study_id = lab.import_study(make_jzip(title="Lab", dir_name="lab"))
    code = lab.code(study_id, "gm")
    origin = f"http://lab.test:{port_of(lab_server)}"
    page = signed_in(lan_chromium, origin)
    assert page.evaluate("window.isSecureContext") is False
    assert page.evaluate("navigator.clipboard") is None
    page.goto(f"{origin}/jatos/#study/{study_id}/Links")
    page.wait_for_selector(f"#links tr[data-code='{code}']")
    assert page.input_value("#link-base") == origin, "opened at a network address: links use it"
    page.evaluate("document.addEventListener('copy', () => { window.copied = document.getSelection().toString(); })")
    page.locator(f"#links tr[data-code='{code}']").get_by_role("button", name="Copy").click()
    page.wait_for_selector(f".notice >> text=Copied {origin}/publix/{code}")
    assert page.evaluate("window.copied") == f"{origin}/publix/{code}"
    assert page.locator(f"#links tr[data-code='{code}']").get_by_role("button", name="Copied ✓").count() == 1
    assert not page.locator(".notice.error").count()


def test_worker_type_switches_turn_types_on_and_off_per_batch(lan_chromium, lab_server: LiveServer) -> None:
    """Worker-type switches as on JATOS's Study Links page; a batch with allowedWorkerTypes null allows none."""
    lab = RemoteLab(lab_server)
    study_id = lab.import_study(make_jzip(dir_name="closed", batches=[{"title": "Lab", "allowedWorkerTypes": None}]))
    batch_id = lab.api("GET", f"/studies/{study_id}/batches")["data"][0]["id"]
    page = signed_in(lan_chromium, lab_server.url)
    page.goto(f"{lab_server.url}/jatos/#study/{study_id}/Links")
    page.wait_for_selector("#worker-types")
    assert page.locator("#worker-types input:checked").count() == 0
    page.select_option("#link-type", "pm")
    assert "does not allow Personal Multiple" in page.inner_text("#type-warning")
    switch = page.locator(f"#worker-types tr[data-batch='{batch_id}'] td").nth(2).locator("input")
    switch.check()
    page.wait_for_selector(".notice >> text=Personal Multiple links on in batch 'Lab'.")
    assert lab.api("GET", f"/batches/{batch_id}")["data"]["allowedWorkerTypes"] == ["PersonalMultiple"]
    page.select_option("#link-type", "pm")
    assert page.inner_text("#type-warning") == ""
    snap(page, "links_switches")
    page.locator(f"#worker-types tr[data-batch='{batch_id}'] td").nth(2).locator("input").uncheck()
    page.wait_for_selector(".notice >> text=Personal Multiple links off in batch 'Lab'.")
    assert lab.api("GET", f"/batches/{batch_id}")["data"]["allowedWorkerTypes"] == []


def test_the_addresses_call_lists_this_computer_and_each_network_address(lab_server: LiveServer) -> None:
    answer = RemoteLab(lab_server).api("GET", "/admin/addresses")["data"]
    port = port_of(lab_server)
    assert answer == [{"url": f"http://localhost:{port}", "network": False},
                      {"url": f"http://{LAN}:{port}", "network": True}]
