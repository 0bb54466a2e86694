"""The admin page's results views as JATOS's "Manage Results" page describes them (issue #13
points 1-4, 6): the study, component, batch, group and worker results pages; view data; select;
filter all fields including the data, with regex and case; export data, files and metadata for
the selected or all; delete; columns; states; messages. Each test names the bullet it proves.
Screenshots go to test-artifacts/."""

from __future__ import annotations

import http.client
import http.cookiejar
import io
import json
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import LiveServer, RemoteLab, make_jzip
from test_admin_page import snap

pytest.importorskip("playwright.sync_api")

DRAWING = bytes(range(256)) * 40  # an uploaded file with every byte value
BIG = "Needle in CAPS " + "x" * 150_000  # more data than the page shows inline


class Participant:
    """One participant's browser over plain HTTP (cookies kept), on a run of the test study."""

    def __init__(self, server: LiveServer, link: str):
        self.base = server.url
        self.browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.component = urllib.parse.urlsplit(self.browser.open(link, timeout=10).geturl()).path.rsplit("/", 1)[0]
        self.run = self.component.rsplit("/", 1)[0]

    def send(self, path: str, data: bytes, content_type: str = "text/plain") -> None:
        request = urllib.request.Request(self.base + path, data=data, method="POST",
                                         headers={"Content-Type": content_type})
        self.browser.open(request, timeout=10).read()

    def data(self, text: str) -> "Participant":
        self.send(self.component + "/resultData", text.encode())
        return self

    def upload(self, name: str, content: bytes) -> "Participant":
        boundary = "----jatoslite"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        self.send(f"{self.component}/files/{name}", body, f"multipart/form-data; boundary={boundary}")
        return self

    def next_component(self, component_uuid: str, message: str) -> "Participant":
        """jatos.startNextComponent(data, message): the message goes to the component result just left."""
        query = urllib.parse.urlencode({"message": message})
        self.browser.open(f"{self.base}{self.run}/{component_uuid}/start?{query}", timeout=10).read()
        self.component = f"{self.run}/{component_uuid}"
        return self

    def join_group(self) -> "Participant":
        self.send(self.run + "/group/join", b"{}", "application/json")
        return self

    def leave(self, how: str) -> None:
        self.browser.open(f"{self.base}{self.run}/{how}", timeout=10).read()


def start_only(link: str) -> str:
    """A participant whose browser opens the study link but never loads the first component (the
    redirect to it is not followed): a run without component results. Returns the run's UUID."""
    parts = urllib.parse.urlsplit(link)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request("GET", parts.path)
    answer = connection.getresponse()
    assert answer.status == 303
    return answer.getheader("Location").split("/")[2]


def runs_in_every_state(server: LiveServer) -> dict:
    """A group study with two components and runs in every end state; returns their IDs."""
    lab = RemoteLab(server)
    study_id = lab.import_study(make_jzip(title="Manage results", dir_name="manage", groupStudy=True))
    study = lab.api("GET", f"/studies/{study_id}/properties?withComponentProperties=true&withBatchProperties=true")
    second = study["data"]["components"][1]["uuid"]
    gm = f"{server.url}/publix/{lab.code(study_id, 'gm')}"
    ps = f"{server.url}/publix/{lab.code(study_id, 'ps', comment='Anna')}"
    finished = Participant(server, gm).join_group().data('{"answer": "Personal data 42", "rt": [310, 295]}')
    finished.next_component(second, "everything okay").data("plain text").upload("drawing.bin", DRAWING)
    finished.leave("end")
    aborted = Participant(server, gm).data("gone when aborted, as in JATOS")
    aborted.leave("abort?message=too%20tired")
    running = Participant(server, gm).data(BIG)
    failed = Participant(server, ps).data('{"answer": "zebra"}')
    failed.leave("end?successful=false&message=broke")
    meta = lab.api("GET", f"/results/metadata?studyId={study_id}")["data"][0]["studyResults"]
    by_uuid = {run["uuid"]: run["id"] for run in meta}
    runs = {name: by_uuid[p.run.rsplit("/", 1)[1]] for name, p in
            (("finished", finished), ("aborted", aborted), ("running", running), ("failed", failed))}
    by_id = {run["id"]: run for run in meta}
    return {"study": study_id, "second": second, "runs": runs, "batch": study["data"]["batches"][0]["id"],
            "group": by_id[runs["finished"]]["groupId"], "psWorker": by_id[runs["failed"]]["workerId"],
            "lab": lab}


@pytest.fixture
def study(live_server: LiveServer) -> dict:
    return runs_in_every_state(live_server)


@pytest.fixture
def page(chromium, live_server: LiveServer):
    from conftest import API_TOKEN

    context = chromium.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(f"{live_server.url}/jatos/login?token={API_TOKEN}")
    page.wait_for_selector("#studies")
    yield page
    context.close()


def rows(page) -> list[int]:
    return [int(value) for value in page.eval_on_selector_all("#results tr[data-result]",
                                                              "rows => rows.map(r => r.dataset.result)")]


def wait_rows(page, count: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('#results tr[data-result]').length === {count}")


def filtered(page, text: str, count: int) -> None:
    page.fill("#filter", text)
    wait_rows(page, count)
    page.wait_for_timeout(400)  # the data search answers after typing pauses; it may add rows
    wait_rows(page, count)


def downloaded_zip(page, button: str) -> dict[str, bytes]:
    with page.expect_download() as download:
        page.locator("#exports").get_by_role("button", name=button, exact=True).click()
    with zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes())) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def test_manage_results_five_results_views_study_component_batch_group_worker(page, live_server, study) -> None:
    """Study, component, batch, group and worker results pages, each reached from where JATOS has it."""
    base, runs = live_server.url, study["runs"]
    page.goto(f"{base}/jatos/#study/{study['study']}/Results")
    wait_rows(page, 4)
    assert page.inner_text("#counts") == "Showing 4 of 4 runs · 0 selected"

    page.click("nav.tabs >> text=Components")
    page.locator("#tab tr", has_text="Component 2").get_by_role("link", name="results").click()
    page.wait_for_selector("h2 >> text=Results of component 'Component 2'")
    wait_rows(page, 1)
    assert "everything okay" not in page.inner_text("#results"), "the message is the first component's"
    assert page.inner_text("#counts") == "Showing 1 of 1 component result · 0 selected"
    snap(page, "results_component")

    page.goto(f"{base}/jatos/#study/{study['study']}/Batches")
    page.get_by_role("link", name="results").first.click()
    page.wait_for_selector("h2 >> text=Results of batch 'Default'")
    wait_rows(page, 4)

    page.goto(f"{base}/jatos/#study/{study['study']}/Sessions")
    page.locator(".session-editor", has_text=f"Group {study['group']}").get_by_role("link", name="results").click()
    page.wait_for_selector(f"h2 >> text=Results of group {study['group']}")
    wait_rows(page, 1)
    assert rows(page) == [runs["finished"]]

    page.goto(f"{base}/jatos/#study/{study['study']}/Results")
    wait_rows(page, 4)
    page.locator(f"#results tr[data-result='{runs['failed']}']").get_by_role("link", name=str(study["psWorker"])).click()
    page.wait_for_selector(f"h2 >> text=Results of worker {study['psWorker']}")
    wait_rows(page, 1)
    assert rows(page) == [runs["failed"]]
    for part in ("#filter", "#scope", "#delete-results", "#columns-menu"):
        assert page.locator(part).count() == 1, f"the worker page has {part} like every results page"


def test_manage_results_filter_all_fields_incl_data_with_regex_and_case(page, live_server, study) -> None:
    """Filter over the shown columns and the result data; regex, case-sensitive, invalid regex shown."""
    runs = study["runs"]
    page.goto(f"{live_server.url}/jatos/#study/{study['study']}/Results")
    wait_rows(page, 4)
    filtered(page, "Personal Single", 1)  # the worker type as JATOS labels it
    assert rows(page) == [runs["failed"]]
    filtered(page, "zebra", 1)  # only in the result data
    assert rows(page) == [runs["failed"]]
    assert page.inner_text("#counts") == "Showing 1 of 4 runs · 0 selected"
    filtered(page, "too tired", 1)  # the study result's message
    filtered(page, "everything okay", 1)  # a component result's message
    assert rows(page) == [runs["finished"]]
    filtered(page, "needle in caps", 1)
    page.check("#filter-case")
    wait_rows(page, 0)
    page.fill("#filter", "Needle in CAPS")
    wait_rows(page, 1)
    page.check("#filter-regex")
    filtered(page, r"Needle\s+in\s+C.PS", 1)
    assert rows(page) == [runs["running"]]
    filtered(page, r"rt.: \[3\d0", 1)
    assert rows(page) == [runs["finished"]]
    page.fill("#filter", "(unclosed")
    page.wait_for_selector("#filter-error >> text=Invalid regular expression")
    wait_rows(page, 4)
    snap(page, "results_regex_error")
    page.fill("#filter", "")
    page.wait_for_function("document.querySelector('#filter-error').textContent === ''")


def test_manage_results_select_filtered_replaces_and_export_data_files_metadata_selected_or_all(
        page, live_server, study) -> None:
    """Select all / filtered (replacing) / none; export data, files and metadata for the selected or all."""
    runs = study["runs"]
    page.goto(f"{live_server.url}/jatos/#study/{study['study']}/Results")
    wait_rows(page, 4)
    page.get_by_role("button", name="All", exact=True).click()
    assert page.inner_text("#counts").endswith("4 selected")
    filtered(page, "zebra", 1)
    page.get_by_role("button", name="Filtered", exact=True).click()
    assert page.inner_text("#counts") == "Showing 1 of 4 runs · 1 selected"
    page.fill("#filter", "")
    wait_rows(page, 4)
    assert page.locator("#results tr.chosen").count() == 1, "hidden rows were not kept selected"

    entries = downloaded_zip(page, "Results archive")
    assert {name.split("/")[0] for name in entries if name != "metadata.json"} == {f"study_result_{runs['failed']}"}
    assert [run["id"] for run in json.loads(entries["metadata.json"])["data"][0]["studyResults"]] == [runs["failed"]]

    page.select_option("#scope", "all")
    entries = downloaded_zip(page, "Results archive")
    assert {run["id"] for run in json.loads(entries["metadata.json"])["data"][0]["studyResults"]} == set(runs.values())
    assert {name.split("/")[0] for name in entries if name != "metadata.json"} == {
        f"study_result_{runs[name]}" for name in ("finished", "running", "failed")}, "an aborted run keeps no data"
    data = downloaded_zip(page, "Data (ZIP)")
    assert sorted(data[name].decode() for name in data) == sorted(
        ['{"answer": "Personal data 42", "rt": [310, 295]}', "plain text", BIG, '{"answer": "zebra"}'])
    files = downloaded_zip(page, "Files")
    assert [content for name, content in files.items() if name.endswith("/files/drawing.bin")] == [DRAWING]
    with page.expect_download() as download:
        page.locator("#exports").get_by_role("button", name="Metadata (JSON)", exact=True).click()
    metadata = json.loads(Path(download.value.path()).read_bytes())
    assert len(metadata["data"][0]["studyResults"]) == 4
    page.get_by_role("button", name="None", exact=True).click()
    page.select_option("#scope", "selected")
    page.locator("#exports").get_by_role("button", name="Data (ZIP)", exact=True).click()
    page.wait_for_selector(".notice.error >> text=Select results first")


def test_csv_exports_for_excel_with_a_byte_order_mark_and_semicolons(page, live_server, study) -> None:
    """Issue #14: the CSV buttons write for Excel on request (UTF-8 with a BOM; ';' for European Excel)."""
    page.goto(f"{live_server.url}/jatos/#study/{study['study']}/Results")
    wait_rows(page, 4)
    page.select_option("#scope", "all")

    def exported(button: str) -> bytes:
        with page.expect_download() as download:
            page.locator("#exports").get_by_role("button", name=button, exact=True).click()
        return Path(download.value.path()).read_bytes()

    assert exported("Data (merged CSV)").startswith(b"studyResultId,")
    page.select_option("#csv-for", label="Excel, with ;")
    assert exported("Data (merged CSV)").startswith(b"\xef\xbb\xbfstudyResultId;componentResultId;")
    assert exported("Metadata (CSV)").startswith(b"\xef\xbb\xbfQuota reached;Result ID;")
    page.select_option("#csv-for", label="Excel")
    assert exported("Metadata (CSV)").startswith(b"\xef\xbb\xbfQuota reached,Result ID,")
    assert exported("Metadata (JSON)").startswith(b"{"), "only the CSV exports change"


def test_manage_results_delete_is_red_confirmed_and_counts_the_runs(page, live_server, study) -> None:
    """Delete: a separate red action whose confirmation says how many runs go."""
    runs = study["runs"]
    page.goto(f"{live_server.url}/jatos/#study/{study['study']}/Results")
    wait_rows(page, 4)
    colour = page.eval_on_selector("#delete-results", "b => getComputedStyle(b).backgroundColor")
    assert colour == "rgb(192, 57, 43)"
    page.locator(f"#results tr[data-result='{runs['aborted']}'] input[type=checkbox]").check()
    page.locator(f"#results tr[data-result='{runs['failed']}'] input[type=checkbox]").check()
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.click("#delete-results")
    page.wait_for_timeout(300)
    assert asked == ["Delete 2 runs (selected) with all their data and files? This cannot be undone."]
    assert len(study["lab"].api("GET", f"/results/metadata?studyId={study['study']}")["data"][0]["studyResults"]) == 4
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept()))
    page.click("#delete-results")
    page.wait_for_selector("text=Deleted 2 runs (selected).")
    wait_rows(page, 2)
    assert sorted(rows(page)) == sorted([runs["finished"], runs["running"]])
    page.select_option("#scope", "all")
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept()))
    page.click("#delete-results")
    wait_rows(page, 0)
    assert asked[-1] == "Delete 2 runs (all) with all their data and files? This cannot be undone."


def test_manage_results_view_data_states_messages_and_an_open_row_surviving_refreshes(
        page, live_server, study) -> None:
    """View data: a row opened to its component results (state, times, message, pretty JSON, files)
    stays open, untouched, through live refreshes, and the selection with it."""
    runs = study["runs"]
    page.goto(f"{live_server.url}/jatos/")
    page.evaluate("REFRESH_MS = 300")
    page.goto(f"{live_server.url}/jatos/#study/{study['study']}/Results")
    wait_rows(page, 4)
    for state in ("FINISHED", "ABORTED", "STARTED", "FAIL"):
        assert page.locator(f"#results .state.{state}").count() == 1
    finished = page.locator(f"#results tr[data-result='{runs['finished']}']")
    finished.locator("input[type=checkbox]").check()
    finished.get_by_role("button", name="Data").click()
    details = page.locator(f"#results tr[data-details='{runs['finished']}']")
    details.locator("pre").first.wait_for()
    first, second = details.locator("section").nth(0), details.locator("section").nth(1)
    assert "everything okay" in first.locator(".message").inner_text()
    assert first.locator("pre").inner_text() == json.dumps({"answer": "Personal data 42", "rt": [310, 295]}, indent=2)
    assert "FINISHED" in first.inner_text() and "Duration" in first.inner_text()
    assert second.locator("pre").inner_text() == "plain text"
    page.evaluate(f"document.querySelector(\"tr[data-details='{runs['finished']}'] section\").marked = true")
    snap(page, "results_open_row")

    done = page.evaluate("resultsRefreshes")
    Participant(live_server, f"{live_server.url}/publix/{study['lab'].code(study['study'], 'gm')}").data("new")
    page.wait_for_function(f"resultsRefreshes >= {done + 2}")
    wait_rows(page, 5)  # a new run came in: the table changed around the open row
    assert page.evaluate(f"document.querySelector(\"tr[data-details='{runs['finished']}'] section\").marked") is True
    assert details.is_visible() and finished.locator("input[type=checkbox]").is_checked()

    with page.expect_download() as download:
        second.get_by_role("link", name="drawing.bin (10.2 kB)").click()
    assert Path(download.value.path()).read_bytes() == DRAWING

    running = page.locator(f"#results tr[data-result='{runs['running']}']")
    running.get_by_role("button", name="Data").click()
    big = page.locator(f"#results tr[data-details='{runs['running']}']")
    big.get_by_text("Too big to show here.").wait_for()
    with page.expect_download() as download:
        big.get_by_role("link", name="download data (150.0 kB)").click()
    assert Path(download.value.path()).read_text() == BIG + "\n"


def test_manage_results_columns_menu_and_1024_px_without_horizontal_page_scroll(chromium, live_server, study) -> None:
    """Columns: a drop-down menu; at 1024 px with every column shown the page does not scroll sideways:
    the table scrolls in its own box."""
    from conftest import API_TOKEN

    for width in (1024, 1400):
        context = chromium.new_context(viewport={"width": width, "height": 800})
        page = context.new_page()
        page.goto(f"{live_server.url}/jatos/login?token={API_TOKEN}")
        page.wait_for_selector("#studies")
        page.goto(f"{live_server.url}/jatos/#study/{study['study']}/Results")
        wait_rows(page, 4)
        page.click("#columns-menu summary")
        for box in page.locator("#columns-menu input[type=checkbox]").all():
            box.check()
        assert page.locator("#results th", has_text="MTurk worker ID").count() == 1
        snap(page, f"results_{width}_columns_menu")
        page.click("#columns-menu summary")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert page.evaluate("document.querySelector('.results-box').scrollWidth") > 0
        snap(page, f"results_{width}")
        for tab in ("Properties", "Components", "Batches", "Links", "Sessions", "Progress", "Files", "Log"):
            page.goto(f"{live_server.url}/jatos/#study/{study['study']}/{tab}")
            page.wait_for_selector(f"nav.tabs button.on >> text={tab}")
            page.wait_for_timeout(200)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), tab
            if tab in ("Links", "Components", "Batches"):
                snap(page, f"{tab.lower()}_{width}")
        context.close()


def test_manage_results_states_in_the_progress_chart_with_axes_and_legend(page, live_server, study) -> None:
    """States: the Progress chart counts every end state (FINISHED, ABORTED, FAIL) and has axes and a legend."""
    page.goto(f"{live_server.url}/jatos/#study/{study['study']}/Progress")
    page.wait_for_selector("#progress svg")
    legend = page.eval_on_selector_all("#progress svg text.legend", "nodes => nodes.map(n => n.textContent)")
    assert legend == ["started: 4", "finished: 1", "aborted: 1", "failed: 1"]
    assert page.locator("#progress svg text.y-tick").count() >= 2
    assert page.locator("#progress svg text.x-tick").count() == 5
    assert page.locator("#progress svg polyline").count() == 4
    snap(page, "progress_states")


def test_the_session_editor_is_large_and_checks_json_as_you_type(page, live_server, study) -> None:
    page.goto(f"{live_server.url}/jatos/#study/{study['study']}/Sessions")
    editor = page.locator(".session-editor", has_text="Batch session").locator("textarea")
    editor.wait_for()
    assert editor.bounding_box()["height"] >= 200
    editor.fill('{"round": ')
    page.wait_for_selector(".json-check.bad >> text=not valid JSON")
    page.locator(".session-editor", has_text="Batch session").get_by_role("button", name="Save session").click()
    page.wait_for_selector(".notice.error >> text=not valid JSON")
    editor.fill('{"round": 2}')
    page.wait_for_selector(".json-check.ok >> text=valid JSON")
    page.locator(".session-editor", has_text="Batch session").get_by_role("button", name="Save session").click()
    page.wait_for_selector(".notice >> text=saved")
    assert study["lab"].api("GET", f"/batches/{study['batch']}/session")["data"]["sessionData"] == {"round": 2}
    snap(page, "sessions")



def test_manage_results_a_run_without_component_results_is_listed_exported_and_deleted(
        page, live_server, study) -> None:
    """Issue #16: a run whose first component never loaded counts toward maxTotalWorkers, so the
    run views list it, count it, export it and delete it; the component view has no row for it."""
    lab, base = study["lab"], live_server.url
    uuid = start_only(f"{base}/publix/{lab.code(study['study'], 'gm')}")
    runs = lab.api("GET", f"/results/metadata?studyId={study['study']}")["data"][0]["studyResults"]
    empty_run = next(run for run in runs if run["uuid"] == uuid)
    empty = empty_run["id"]
    for view, count in ((f"batch/{study['batch']}", 5), (f"worker/{empty_run['workerId']}", 1)):
        page.goto(f"{base}/jatos/#{view}")
        wait_rows(page, count)
        assert empty in rows(page), view

    page.goto(f"{base}/jatos/#study/{study['study']}/Components")
    page.locator("#tab tr", has_text="Component 1").get_by_role("link", name="results").click()
    page.wait_for_selector("h2 >> text=Results of component 'Component 1'")
    wait_rows(page, 4)
    assert page.inner_text("#counts") == "Showing 4 of 4 component results · 0 selected"

    page.goto(f"{base}/jatos/#study/{study['study']}/Results")
    wait_rows(page, 5)
    assert page.inner_text("#counts") == "Showing 5 of 5 runs · 0 selected"
    row = page.locator(f"#results tr[data-result='{empty}']")
    assert "STARTED" in row.inner_text()
    row.get_by_role("button", name="Data").click()
    page.locator(f"#results tr[data-details='{empty}']").get_by_text("No component results").wait_for()
    row.locator("input[type=checkbox]").check()
    assert page.inner_text("#counts") == "Showing 5 of 5 runs · 1 selected"
    snap(page, "results_run_without_component_results")
    entries = downloaded_zip(page, "Results archive")
    assert list(entries) == ["metadata.json"]
    assert [(run["id"], run["componentResults"]) for run in
            json.loads(entries["metadata.json"])["data"][0]["studyResults"]] == [(empty, [])]

    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept()))
    page.click("#delete-results")
    page.wait_for_selector("text=Deleted 1 run (selected).")
    wait_rows(page, 4)
    assert asked == ["Delete 1 run (selected) with all their data and files? This cannot be undone."]
    assert empty not in rows(page) and sorted(rows(page)) == sorted(study["runs"].values())
    assert lab.api("GET", f"/results/metadata?studyResultId={empty}")["data"] == []
