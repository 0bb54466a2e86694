"""jatos-lite as a new user meets it in the field (issue #14): a first start that says where the
data is, a second start on a taken port that changes nothing, a clean stop after which
jatos.sqlite alone holds everything, and one line that says what to do instead of a traceback."""

from __future__ import annotations

import http.cookiejar
import io
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import jatos_lite
from conftest import Started, folders, free_port, make_jzip

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def started(tmp_path: Path):
    server = Started(tmp_path, free_port())
    yield server
    server.kill()


def test_the_first_start_says_a_new_database_was_made_and_the_next_what_it_holds(tmp_path: Path) -> None:
    first = Started(tmp_path, free_port())
    assert "new database, created now" in first.banner
    assert f"Data:    {(tmp_path / 'data').resolve()}" in first.banner
    assert "jatos-lite token create" in first.banner and "API token (Bearer)" not in first.banner
    assert first.stop()[0] == 0
    second = Started(tmp_path, free_port())
    assert "database reopened: 1 studies, 0 study results" in second.banner
    second.stop()


def test_a_second_start_on_a_taken_port_says_so_and_takes_nothing_from_the_first(started: Started,
                                                                                 tmp_path: Path) -> None:
    sign_in = next(word for word in started.banner.split() if "/jatos/login?token=" in word)
    second = subprocess.run([sys.executable, str(ROOT / "jatos_lite.py"), "--port", str(started.port),
                             *folders(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and second.stdout == ""
    assert second.stderr.count("\n") == 1 and f"Port {started.port} is in use" in second.stderr
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    assert browser.open(sign_in.replace("localhost", "127.0.0.1"), timeout=10).status == 200


def run_a_participant(server: Started, chunks: list[bytes]) -> None:
    """One General Multiple run of a fresh study that appends `chunks` and ends."""
    study_id = int(server.api("POST", "/studies", make_jzip(title="Stopped", dir_name="stopped"),
                              "application/zip").split(b'"id":')[1].split(b",")[0])
    code = server.api("POST", f"/studies/{study_id}/studyCodes", b'{"type": "gm"}').split(b'"')[-2].decode()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    page = browser.open(f"{server.url}/publix/{code}", timeout=10).url
    base = page.rsplit("/", 1)[0]
    for chunk in chunks:
        browser.open(urllib.request.Request(f"{base}/resultData", data=chunk, method="POST",
                                            headers={"Content-Type": "text/plain"}), timeout=10).read()


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_after_a_clean_stop_the_database_file_alone_holds_every_result(started: Started, tmp_path: Path,
                                                                      how: int) -> None:
    chunks = [f"trial {i};".encode() for i in range(20)]
    run_a_participant(started, chunks)
    code, out = started.stop(how)
    assert code == 0 and f"stopped; data is in {(tmp_path / 'data').resolve()}" in out
    copy = tmp_path / "copy.sqlite"
    shutil.copyfile(tmp_path / "data" / "jatos.sqlite", copy)  # the file alone, without -wal or -shm
    database = sqlite3.connect(copy)
    assert database.execute("SELECT group_concat(data, '') FROM component_results").fetchone()[0] == \
        b"".join(chunks).decode()
    assert database.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    database.close()


def test_an_interrupted_export_exits_non_zero_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys) -> None:
    assert jatos_lite.main(["token", *folders(tmp_path)]) == 0

    def interrupted(*args: object, **kwargs: object):
        yield b"PK partial"
        raise KeyboardInterrupt

    monkeypatch.setattr(jatos_lite, "zip_stream", interrupted)
    target = tmp_path / "backup.zip"
    assert jatos_lite.main(["backup", "-o", str(target), *folders(tmp_path)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not target.exists() and not list(tmp_path.glob(".upload-*"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jatos-lite: ") and "Traceback" not in err, err
    return err


def test_importing_a_missing_archive_says_so(tmp_path: Path, capsys) -> None:
    assert jatos_lite.main(["import", str(tmp_path / "missing.jzip"), *folders(tmp_path)]) == 1
    assert "missing.jzip does not exist" in one_line_error(capsys)


@pytest.mark.parametrize("message, advice", [
    ("attempt to write a readonly database", "is read-only"),
    ("unable to open database file", "Choose a folder you can write to with --data"),
])
def test_a_database_that_cannot_be_written_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
                                                       message: str, advice: str) -> None:
    def refuse(self: jatos_lite.Store) -> None:
        raise sqlite3.OperationalError(message)

    monkeypatch.setattr(jatos_lite.Store, "connect", refuse)
    assert jatos_lite.main(["token", "list", *folders(tmp_path)]) == 1
    assert advice in one_line_error(capsys)


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert jatos_lite.main(["token", *folders(tmp_path)]) == 1
    assert "No permission to write" in one_line_error(capsys)


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root writes to read-only folders anyway")
def test_a_read_only_data_folder_is_one_line(tmp_path: Path, capsys) -> None:
    assert jatos_lite.main(["token", *folders(tmp_path)]) == 0
    capsys.readouterr()
    for path in (tmp_path / "data").iterdir():
        path.chmod(0o444)
    (tmp_path / "data").chmod(0o555)
    try:
        assert jatos_lite.main(["token", *folders(tmp_path)]) == 1
        one_line_error(capsys)
    finally:
        (tmp_path / "data").chmod(0o755)


def test_a_malformed_variable_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("JATOS_LITE_PORT", "ninety")
    assert jatos_lite.main(["token", "list"]) == 1
    assert "JATOS_LITE_PORT='ninety'" in one_line_error(capsys)


def test_a_console_that_cannot_show_a_folder_name_shows_question_marks(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows' cp1252 console and a data folder named in Greek."""
    console = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", console)
    root = tmp_path / "δεδομένα"
    assert jatos_lite.main(["token", *folders(root)]) == 0
    assert jatos_lite.main(["import", str(root / "x.jzip"), *folders(root)]) == 1
    (root / "x.jzip").write_bytes(make_jzip())
    assert jatos_lite.main(["import", str(root / "x.jzip"), *folders(root)]) == 0
    console.flush()
    assert "????????" in console.buffer.getvalue().decode("cp1252")


def test_the_admin_page_opens_in_a_browser_only_where_someone_can_see_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import webbrowser

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", opened.append)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    assert jatos_lite.open_in_browser("http://x/", jatos_lite.Config(browser=False)) is False
    assert jatos_lite.open_in_browser("http://x/", jatos_lite.Config()) is True
    monkeypatch.setenv("CI", "true")
    assert jatos_lite.open_in_browser("http://x/", jatos_lite.Config()) is False
    monkeypatch.delenv("CI")
    monkeypatch.delenv("DISPLAY")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert jatos_lite.open_in_browser("http://x/", jatos_lite.Config()) is False
    for _ in range(50):
        if opened:
            break
        time.sleep(0.02)
    assert opened == ["http://x/"]


def test_the_browser_tests_take_the_browser_the_variable_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import conftest

    monkeypatch.setenv(conftest.BROWSER_VARIABLE, "/opt/my-chrome/chrome")
    assert conftest.find_chromium() == "/opt/my-chrome/chrome"
    monkeypatch.delenv(conftest.BROWSER_VARIABLE)
    assert Path(conftest.find_chromium()).name in {*conftest.BROWSER_COMMANDS, "chrome.exe", "msedge.exe",
                                                   "Chromium", "Google Chrome", "Microsoft Edge"}
