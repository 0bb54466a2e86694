"""admin.html in a real browser (the system Chromium, headless) against a real server: sign in,
import a study, make a link, watch a participant's result appear, filter, export, delete
(formats-and-api.md, DESIGN.md §2). Screenshots of each view go to test-artifacts/."""

from __future__ import annotations

import contextlib
import http.cookiejar
import io
import json
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import API_TOKEN, LiveServer, RemoteLab, make_jzip

pytest.importorskip("playwright.sync_api")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
HOSTILE = '<script>window.pwned = true</script><img src=x onerror="window.pwned = true">'


def participant_run(base: str, link: str, data: str, end: bool = True) -> None:
    """A participant's browser over plain HTTP: start on the link, send result data, end."""
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    page = urllib.parse.urlsplit(browser.open(link, timeout=10).geturl()).path
    component_base = page.rsplit("/", 1)[0]
    browser.open(urllib.request.Request(base + component_base + "/resultData", data=data.encode(), method="POST",
                                        headers={"Content-Type": "text/plain"}), timeout=10).read()
    if end:
        browser.open(base + component_base.rsplit("/", 1)[0] + "/end", timeout=10).read()


@pytest.fixture
def admin(chromium, live_server: LiveServer):
    context = chromium.new_context(accept_downloads=True)
    page = context.new_page()
    page.goto(f"{live_server.url}/jatos/login?token={API_TOKEN}")
    page.wait_for_selector("#studies")
    yield page
    context.close()


def snap(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"admin_{name}.png"), full_page=True)


def test_without_signing_in_the_page_asks_for_the_link(chromium, live_server: LiveServer) -> None:
    context = chromium.new_context()
    page = context.new_page()
    page.goto(f"{live_server.url}/jatos/")
    page.wait_for_selector("text=Please sign in")
    context.close()


def test_a_researchers_session_from_import_to_delete(admin, live_server: LiveServer, tmp_path: Path) -> None:
    lab = RemoteLab(live_server)
    archive = tmp_path / "study.jzip"
    archive.write_bytes(make_jzip(title='Stroop "A&B"', dir_name="stroop"))
    admin.set_input_files("#import-file", str(archive))
    admin.get_by_role("button", name="Import", exact=True).click()
    title = admin.locator("#studies a", has_text='Stroop "A&B"')
    title.wait_for()
    snap(admin, "studies")

    title.click()
    admin.click("nav.tabs >> text=Links")
    admin.select_option("#link-type", "gm")
    admin.get_by_role("button", name="Create links", exact=True).click()
    admin.locator("#links .link").first.wait_for()
    admin.select_option("#link-base", live_server.url)  # the test's server listens on loopback only
    link = admin.locator("#links .link").first.inner_text()
    snap(admin, "links")

    admin.click("nav.tabs >> text=Results")
    admin.wait_for_selector("#results")
    participant_run(live_server.url, link, HOSTILE)
    participant_run(live_server.url, link, "second", end=False)
    admin.wait_for_selector("#results tr[data-result] >> nth=1", timeout=10_000)  # appears without reloading
    assert admin.locator("#results tr[data-result]").count() == 2
    assert admin.locator("#results tr[data-result]").first.inner_text().count("FINISHED") == 1

    admin.fill("#filter", "FINISHED")
    admin.wait_for_function("document.querySelectorAll('#results tr[data-result]').length === 1")
    admin.fill("#filter", "")
    admin.wait_for_function("document.querySelectorAll('#results tr[data-result]').length === 2")
    admin.get_by_role("button", name="All", exact=True).click()

    admin.locator("#results tr[data-result]").first.get_by_role("button", name="Data").click()
    admin.wait_for_selector("#results pre")
    assert HOSTILE in admin.locator("#results pre").first.inner_text()
    assert admin.evaluate("window.pwned") is None, "result data is shown escaped"
    snap(admin, "results")

    with admin.expect_download() as download:
        admin.get_by_role("button", name="Results archive", exact=True).click()
    with zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes())) as exported:
        data = [exported.read(name).decode() for name in exported.namelist() if name.endswith("data.txt")]
    assert sorted(data) == sorted([HOSTILE, "second"])

    admin.on("dialog", lambda dialog: dialog.accept())
    admin.click("#delete-results")
    admin.wait_for_selector("text=Deleted 2 runs (selected).")
    admin.wait_for_function("document.querySelectorAll('#results tr[data-result]').length === 0")
    study_id = lab.api("GET", "/studies/properties")["data"][0]["id"]
    assert lab.api("GET", f"/results/metadata?studyId={study_id}")["data"] == []


def test_properties_and_progress(admin, live_server: LiveServer) -> None:
    lab = RemoteLab(live_server)
    study_id = lab.import_study(make_jzip(title="Props", dir_name="props"))
    admin.goto(f"{live_server.url}/jatos/#study/{study_id}/Properties")
    admin.wait_for_selector("text=Study input (JSON)")
    admin.locator("textarea").nth(1).fill("{not json")
    admin.get_by_role("button", name="Save", exact=True).click()
    admin.wait_for_selector(".notice.error >> text=not valid JSON")
    admin.locator("textarea").nth(1).fill('{"level": 2}')
    admin.get_by_role("button", name="Save", exact=True).click()
    admin.wait_for_selector(".notice >> text=Saved.")
    assert lab.api("GET", f"/studies/{study_id}/properties")["data"]["studyInput"] == {"level": 2}

    participant_run(live_server.url, f"{live_server.url}/publix/{lab.code(study_id)}", "x")
    admin.goto(f"{live_server.url}/jatos/#study/{study_id}/Progress")
    admin.wait_for_selector("#progress svg >> text=finished: 1")
    snap(admin, "progress")


def test_batches_are_edited_added_and_deleted_after_asking(admin, live_server: LiveServer) -> None:
    lab = RemoteLab(live_server)
    study_id = lab.import_study(make_jzip(title="Batches", dir_name="batches"))
    admin.goto(f"{live_server.url}/jatos/#study/{study_id}/Batches")
    batch = admin.locator("fieldset").first
    batch.wait_for()
    batch.locator("p", has_text="Title").locator("input").first.fill("Morning class")
    batch.locator("label", has_text="maxActiveMembers").locator("input").fill("2")
    batch.locator("label", has_text="MTurk").locator("input").uncheck()
    batch.locator("textarea").fill("{not json")
    batch.get_by_role("button", name="Save batch").click()
    admin.wait_for_selector(".notice.error >> text=not valid JSON")
    batch.locator("textarea").fill('{"room": 4}')
    batch.get_by_role("button", name="Save batch").click()
    admin.wait_for_selector(".notice >> text=Saved.")
    saved = lab.api("GET", f"/studies/{study_id}/properties?withBatchProperties=true")["data"]["batches"][0]
    assert (saved["title"], saved["maxActiveMembers"], saved["batchInput"]) == ("Morning class", 2, {"room": 4})
    assert "MT" not in saved["allowedWorkerTypes"] and "GeneralMultiple" in saved["allowedWorkerTypes"]

    admin.get_by_role("button", name="Add batch").click()
    admin.wait_for_function("document.querySelectorAll('fieldset').length === 2")
    added = admin.locator("fieldset").nth(1)
    assert added.get_by_role("button", name="Delete batch").get_attribute("class") == "danger"
    asked = []
    admin.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    added.get_by_role("button", name="Delete batch").click()
    admin.wait_for_timeout(300)
    assert len(asked) == 1 and admin.locator("fieldset").count() == 2
    admin.once("dialog", lambda dialog: dialog.accept())
    added.get_by_role("button", name="Delete batch").click()
    admin.wait_for_function("document.querySelectorAll('fieldset').length === 1")
    batches = lab.api("GET", f"/studies/{study_id}/properties?withBatchProperties=true")["data"]["batches"]
    assert [b["title"] for b in batches] == ["Morning class"]


def test_the_servers_address_of_a_study_shows_the_study(admin, live_server: LiveServer) -> None:
    """/jatos/<id> (where JATOS links a study) redirects to #/studies/<id>: the study's page, not the list."""
    study_id = RemoteLab(live_server).import_study(make_jzip(title="Addressed", dir_name="addressed"))
    admin.goto(f"{live_server.url}/jatos/{study_id}")
    admin.wait_for_selector("h2 >> text=Addressed")
    assert admin.locator("nav.tabs button.on").inner_text() == "Properties"


def test_a_late_answer_for_a_view_left_does_not_paint_over_the_view_gone_to(admin, live_server: LiveServer) -> None:
    """The studies list is slow to come; the researcher has meanwhile opened a study. When the list
    comes at last, the study stays on the screen (it once was replaced by the list)."""
    study_id = RemoteLab(live_server).import_study(make_jzip(title="Gone to", dir_name="gone-to"))
    held = []
    admin.route("**/api/v1/studies/properties", lambda route: held.append(route))
    admin.reload()
    while not held:
        admin.wait_for_timeout(20)
    admin.evaluate(f"location.hash = '#study/{study_id}/Properties'")
    admin.wait_for_selector("h2 >> text=Gone to")
    held[0].continue_()
    admin.wait_for_timeout(500)
    assert admin.locator("h2").inner_text() == "Gone to" and admin.locator("#studies").count() == 0

@pytest.mark.parametrize("leave", ["jatos.endStudy()", "jatos.abortStudy()"])
def test_a_researchers_test_run_ends_on_the_studys_page(admin, live_server: LiveServer, leave: str) -> None:
    """A test run (Jatos worker) that ends or aborts is sent back to /jatos/<id>, which shows the study."""
    page = '<!DOCTYPE html><script src="jatos.js"></script><script>jatos.onLoad(() => window.loaded = true)</script>'
    study_id = RemoteLab(live_server).import_study(make_jzip(title="Tested", dir_name="tested",
                                                             files={"c1.html": page}))
    admin.goto(f"{live_server.url}/jatos/{study_id}/run")
    admin.wait_for_function("window.loaded === true")
    admin.evaluate(f"setTimeout(() => {{ {leave}; }}, 0)")
    admin.wait_for_url(f"**/jatos/#/studies/{study_id}")
    admin.wait_for_selector("h2 >> text=Tested")
    assert admin.locator("nav.tabs").count() == 1


@pytest.mark.parametrize("text, version", [("hello", 1), ("http://192.168.1.20:9000/publix/AbCdEfGhIjK", 4),
                                           ("http://10.0.0.2:9000/publix/" + "x" * 100, 8),
                                           ("é" * 100, 10)])
def test_qr_codes_match_a_reference_encoder_for_every_mask(admin, text: str, version: int) -> None:
    """The page's own QR encoder against python-qrcode, module for module (byte mode, level M)."""
    qrcode = pytest.importorskip("qrcode")
    for mask in range(8):
        reference = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, mask_pattern=mask, border=0)
        reference.add_data(qrcode.util.QRData(text.encode(), mode=qrcode.util.MODE_8BIT_BYTE))
        reference.make(fit=True)
        assert reference.version == version
        ours = admin.evaluate("([text, mask]) => qrMatrix(text, mask)", [text, mask])
        assert ours == [[bool(module) for module in row] for row in reference.get_matrix()], f"mask {mask}"


def test_each_link_has_a_qr_code(admin, live_server: LiveServer) -> None:
    lab = RemoteLab(live_server)
    study_id = lab.import_study(make_jzip(title="QR", dir_name="qr"))
    lab.code(study_id, "gm")
    admin.goto(f"{live_server.url}/jatos/#study/{study_id}/Links")
    admin.get_by_role("button", name="QR").first.click()
    admin.wait_for_selector("#links svg.qr")
    snap(admin, "qr")


def test_study_files_upload_list_and_delete(admin, live_server: LiveServer, tmp_path: Path) -> None:
    lab = RemoteLab(live_server)
    study_id = lab.import_study(make_jzip(title="Files", dir_name="files_study"))
    admin.goto(f"{live_server.url}/jatos/#study/{study_id}/Files")
    admin.wait_for_selector("#assets >> text=c1.html")
    (tmp_path / "stimuli.csv").write_text("word\nhouse\n")
    admin.set_input_files("#asset-file", str(tmp_path / "stimuli.csv"))
    admin.fill("#asset-folder", "lists")
    admin.get_by_role("button", name="Upload", exact=True).click()
    admin.wait_for_selector("#assets >> text=lists/stimuli.csv")
    assert lab.raw("GET", f"/studies/{study_id}/assets/lists/stimuli.csv") == b"word\nhouse\n"
    snap(admin, "files")
    admin.on("dialog", lambda dialog: dialog.accept())
    admin.locator("#assets tr", has_text="lists/stimuli.csv").get_by_role("button", name="Delete").click()
    admin.wait_for_function("!document.querySelector('#assets').textContent.includes('stimuli.csv')")


def test_the_study_log_tab_shows_the_newest_entries_and_downloads_the_log(admin, live_server: LiveServer) -> None:
    lab = RemoteLab(live_server)
    study_id = lab.import_study(make_jzip(title="Logged"))
    study_uuid = lab.api("GET", f"/studies/{study_id}/properties")["data"]["uuid"]
    participant_run(live_server.url, f"{live_server.url}/publix/{lab.code(study_id)}", "data")
    admin.goto(f"{live_server.url}/jatos/#study/{study_id}/Log")
    admin.wait_for_selector("#log >> text=Appended component result data")
    rows = admin.locator("#log tr").all_inner_texts()
    assert "Finished study run" in rows[1] and "Initial entry" in rows[-1], "newest first"
    snap(admin, "log")
    with admin.expect_download() as download:
        admin.get_by_role("button", name="Download the whole log").click()
    assert download.value.suggested_filename == f"jatos_studylog_{study_uuid}.log"
    assert b"Created study" in Path(download.value.path()).read_bytes()


def test_api_tokens_are_made_shown_once_and_deactivated(admin, live_server: LiveServer) -> None:
    admin.goto(f"{live_server.url}/jatos/#tokens")
    admin.fill("#token-name", "jatosR")
    admin.get_by_role("button", name="Create token (never expires)").click()
    token = admin.locator("#new-token .link").inner_text()
    request = urllib.request.Request(f"{live_server.url}/jatos/api/v1/admin/token",
                                     headers={"Authorization": f"Bearer {token}"})
    assert json.loads(urllib.request.urlopen(request, timeout=10).read())["data"]["name"] == "jatosR"
    admin.locator("#tokens tr", has_text="jatosR").locator("input[type=checkbox]").uncheck()
    lab = RemoteLab(live_server)
    for _ in range(100):  # until the page's PATCH has been committed
        if not lab.api("GET", "/users/1/tokens")["data"][0]["active"]:
            break
        admin.wait_for_timeout(50)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401


def test_the_page_shows_connected_pages_and_warns_near_the_limit(admin, live_server: LiveServer) -> None:
    """Issue #15: when held channel polls near the limit, the researcher sees it and what to do."""
    page = admin
    page.wait_for_selector("#server >> text=0 pages connected")
    hub = live_server.app.config["jatos_lite.hub"]
    with contextlib.ExitStack() as held:
        for number in range(int(hub.max_held * 0.8) + 1):
            held.enter_context(hub.hold(f"browser{number}", "page", run=f"run{number}"))
        page.wait_for_selector(f"#server >> text={int(hub.max_held * 0.8) + 1} pages connected", timeout=10_000)
        warning = page.text_content("#server .warning")
        assert "near the limit" in warning and "--connections" in warning
        snap(page, "capacity_warning")
    page.wait_for_selector("#server >> text=0 pages connected", timeout=10_000)
    assert page.query_selector("#server .warning") is None
