"""The `jatos-lite` command: options from flags and `JATOS_LITE_*` variables as the README's
table says, and `import`, `links` and `token` on the same folders, also while a server runs."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest
import webtest

import jatos_lite
from conftest import AUTH, LiveServer, RemoteLab, Started, free_port, make_jzip

ROOT = Path(__file__).resolve().parent.parent
README_OPTIONS = re.findall(r"^\| `(--[a-z-]+)` \| `(JATOS_LITE_[A-Z_]+)` \| `?([^|`]+?)`? \|",
                            (ROOT / "README.md").read_text(encoding="utf-8"), re.MULTILINE)
EXAMPLES = {"host": "127.0.0.5", "port": "9123", "admin_port": "9124", "studies": "my_studies", "data": "my_data",
            "api_token": "token-from-somewhere", "threads": "40", "connections": "800", "legacy_links": "True", "browser": "True"}
OTHER_VALUES = {"port": "999", "threads": "999", "connections": "999", "admin_port": "999", "legacy_links": "off", "browser": "off"}  # when a flag wins
SWITCHES = {"legacy_links", "browser"}  # flags without a value (--name / --no-name)


def field_of(env_name: str) -> str:
    return env_name.removeprefix(jatos_lite.ENV_PREFIX).lower()


def test_the_readme_lists_every_command_line_option() -> None:
    listed = {flag for flag, _, _ in README_OPTIONS}
    parsed = {action.option_strings[0] for action in jatos_lite.build_parser()._actions
              if action.option_strings and action.option_strings[0].startswith("--")
              and action.dest not in ("help", "version")}
    assert listed == parsed


@pytest.mark.parametrize("flag, env_name, default", README_OPTIONS)
def test_each_option_comes_from_its_variable_and_the_flag_wins(flag: str, env_name: str, default: str) -> None:
    name = field_of(env_name)
    config = jatos_lite.config_from_env({env_name: EXAMPLES[name]})
    assert str(getattr(config, name)) == EXAMPLES[name]
    documented = {"none": None, "./studies": "studies", "./data": "data", "off": "False", "on": "True"}.get(default,
                                                                                                          default)
    assert (None if getattr(jatos_lite.Config(), name) is None else str(getattr(jatos_lite.Config(), name))) == \
        documented, "the README's default"
    args = jatos_lite.build_parser().parse_args(["serve", flag] + ([] if name in SWITCHES else [EXAMPLES[name]]))
    overridden = jatos_lite.config_from_env({env_name: OTHER_VALUES.get(name, "other")},
                                            **{name: getattr(args, name)})
    assert str(getattr(overridden, name)) == EXAMPLES[name]


def test_a_malformed_variable_is_refused() -> None:
    with pytest.raises(ValueError):
        jatos_lite.config_from_env({"JATOS_LITE_PORT": "ninety"})
    with pytest.raises(ValueError):
        jatos_lite.config_from_env({"JATOS_LITE_UPLOADS_ENABLED": "perhaps"})


def folders(tmp_path: Path) -> list[str]:
    return ["--studies", str(tmp_path / "studies"), "--data", str(tmp_path / "data")]


@pytest.fixture
def lan(monkeypatch: pytest.MonkeyPatch) -> str:
    """The network address participants reach this computer at (lan_addresses is faked)."""
    monkeypatch.setattr(jatos_lite, "lan_addresses", lambda: ["10.1.2.3"])
    return "10.1.2.3"


def test_import_then_links_print_full_urls_that_start_runs(tmp_path: Path, lan: str, capsys) -> None:
    archive = tmp_path / "study.jzip"
    archive.write_bytes(make_jzip(title="CLI study", dir_name="cli_study"))
    assert jatos_lite.main(["import", str(archive), *folders(tmp_path)]) == 0
    assert "Imported study 'CLI study'" in capsys.readouterr().out
    assert jatos_lite.main(["links", "cli_study", "--type", "ps", "--count", "3", "--comment", "Anna",
                            "--data", str(tmp_path / "data")]) == 0
    printed = capsys.readouterr()
    urls = printed.out.split()
    assert len(urls) == 3 and all(url.startswith(f"http://{lan}:{jatos_lite.Config().port}/publix/") for url in urls)
    assert "No jatos-lite runs with the data folder" in printed.err and printed.err.count("\n") == 1
    config = jatos_lite.Config(studies=tmp_path / "studies", data=tmp_path / "data")
    participant = webtest.TestApp(jatos_lite.create_app(config))
    assert participant.get(urllib.parse.urlsplit(urls[0]).path, status=303).location


def test_links_of_an_unknown_study_fail_with_a_message(tmp_path: Path, capsys) -> None:
    jatos_lite.Store(jatos_lite.Config(data=tmp_path / "data").db_path)  # a database with no study
    assert jatos_lite.main(["links", "nothing", "--type", "gm", "--data", str(tmp_path / "data")]) == 1
    assert "nothing" in capsys.readouterr().err


def test_links_refuse_a_worker_type_the_batch_does_not_allow_or_turn_it_on(tmp_path: Path, capsys) -> None:
    """As in JATOS, a batch with allowedWorkerTypes null allows no type: its links would all answer 403."""
    archive = tmp_path / "study.jzip"
    archive.write_bytes(make_jzip(dir_name="closed", batches=[{"title": "Lab", "allowedWorkerTypes": None}]))
    assert jatos_lite.main(["import", str(archive), *folders(tmp_path)]) == 0
    capsys.readouterr()
    assert jatos_lite.main(["links", "closed", "--type", "pm", "--data", str(tmp_path / "data")]) == 1
    printed = capsys.readouterr()
    assert printed.out == "" and "does not allow Personal Multiple links" in printed.err and "--allow" in printed.err
    assert jatos_lite.main(["links", "closed", "--type", "pm", "--allow", "--data", str(tmp_path / "data")]) == 0
    printed = capsys.readouterr()
    assert "Turned on Personal Multiple links in batch 'Lab'" in printed.err
    url = printed.out.split()[0]
    config = jatos_lite.Config(studies=tmp_path / "studies", data=tmp_path / "data")
    participant = webtest.TestApp(jatos_lite.create_app(config))
    assert participant.get(urllib.parse.urlsplit(url).path, status=303).location
    assert jatos_lite.main(["links", "closed", "--type", "pm", "--data", str(tmp_path / "data")]) == 0
    assert "Turned on" not in capsys.readouterr().err, "a type already on is simply used"


def test_import_and_links_work_while_a_server_runs(live_server: LiveServer, capsys) -> None:
    paths = ["--studies", str(live_server.config.studies), "--data", str(live_server.config.data)]
    archive = live_server.config.data / "upload.jzip"
    archive.write_bytes(make_jzip(title="Live", dir_name="live"))
    assert jatos_lite.main(["import", str(archive), *paths]) == 0
    capsys.readouterr()
    assert jatos_lite.main(["links", "live", "--type", "gm", "--data", str(live_server.config.data)]) == 0
    code = capsys.readouterr().out.split()[0].rsplit("/", 1)[1]
    page = urllib.request.urlopen(f"{live_server.url}/publix/{code}", timeout=10)
    assert "/publix/" in page.geturl() and page.status == 200
    assert RemoteLab(live_server).api("GET", "/studies/properties")["data"][0]["title"] == "Live"


def listener_rows(data: Path) -> list[tuple[str]]:
    database = sqlite3.connect(data / "jatos.sqlite")
    try:
        return database.execute("SELECT key FROM settings WHERE key LIKE 'listener:%'").fetchall()
    finally:
        database.close()


def test_links_take_the_running_servers_port_and_a_killed_servers_record_is_dropped(tmp_path: Path, lan: str,
                                                                                   capsys) -> None:
    archive = tmp_path / "study.jzip"
    archive.write_bytes(make_jzip(dir_name="field"))
    assert jatos_lite.main(["import", str(archive), *folders(tmp_path)]) == 0
    links = ["links", "field", "--type", "gm", "--data", str(tmp_path / "data")]
    port = free_port()
    server = Started(tmp_path, port)
    try:
        capsys.readouterr()
        assert jatos_lite.main(links) == 0
        printed = capsys.readouterr()
        assert printed.out.startswith(f"http://{lan}:{port}/publix/") and printed.err == ""
        assert server.stop()[0] == 0
        assert listener_rows(tmp_path / "data") == [], "a clean stop removes the record"
        server = Started(tmp_path, port)
        server.process.kill()  # no chance to remove its record
        server.process.communicate()
        assert len(listener_rows(tmp_path / "data")) == 1
        assert jatos_lite.main(links) == 0
        printed = capsys.readouterr()
        assert printed.out.startswith(f"http://{lan}:{jatos_lite.Config().port}/publix/")
        assert "No jatos-lite runs with the data folder" in printed.err
        assert listener_rows(tmp_path / "data") == [], "the record of a server that is gone is removed"
    finally:
        server.kill()


@pytest.mark.parametrize("command, options", [
    ("links", {"-h", "--data", "--type", "--count", "--batch", "--comment", "--allow"}),
    ("token", {"-h", "--data", "--name"}),
])
def test_a_commands_help_lists_only_the_options_it_uses(command: str, options: set, capsys) -> None:
    with pytest.raises(SystemExit):
        jatos_lite.main([command, "--help"])
    shown = set(re.findall(r"^  (-[-\w]+)", capsys.readouterr().out, re.MULTILINE))
    assert shown == options


def test_export_writes_data_or_metadata_as_csv_for_excel(tmp_path: Path, capsys) -> None:
    archive = tmp_path / "study.jzip"
    archive.write_bytes(make_jzip(dir_name="csv_study"))
    assert jatos_lite.main(["import", str(archive), *folders(tmp_path)]) == 0
    config = jatos_lite.Config(studies=tmp_path / "studies", data=tmp_path / "data")
    browser = webtest.TestApp(jatos_lite.create_app(config))
    capsys.readouterr()
    assert jatos_lite.main(["links", "csv_study", "--type", "gm", "--data", str(config.data)]) == 0
    link = capsys.readouterr().out.split()[0]
    base = browser.get(urllib.parse.urlsplit(link).path, status=303).follow().request.path.rsplit("/", 1)[0]
    browser.post(f"{base}/resultData", "wort,rt\nMärchen,350\n".encode(), headers={"Content-Type": "text/plain"})
    output = tmp_path / "data.csv"
    assert jatos_lite.main(["export", "csv_study", "-o", str(output), "--csv", "data", "--excel", "--semicolon",
                            *folders(tmp_path)]) == 0
    table = output.read_bytes()
    assert table.startswith(b"\xef\xbb\xbf") and table.decode("utf-8-sig").splitlines()[1].endswith(";Märchen;350")
    assert jatos_lite.main(["export", "csv_study", "-o", str(output), "--csv", "metadata", *folders(tmp_path)]) == 0
    assert output.read_text(encoding="utf-8").startswith("Quota reached,Result ID,")
    capsys.readouterr()
    assert jatos_lite.main(["export", "csv_study", "-o", str(tmp_path / "x.zip"), "--excel", *folders(tmp_path)]) == 1
    assert capsys.readouterr().err == "jatos-lite: --excel and --semicolon shape a CSV export: add --csv data or " \
                                      "--csv metadata.\n"
    assert not (tmp_path / "x.zip").exists()


def test_a_minted_token_opens_the_api(tmp_path: Path, capsys) -> None:
    assert jatos_lite.main(["token", "--name", "jatosR", "--data", str(tmp_path / "data")]) == 0
    token = capsys.readouterr().out.strip()
    api = webtest.TestApp(jatos_lite.create_app(jatos_lite.Config(studies=tmp_path / "studies",
                                                                  data=tmp_path / "data")))
    assert api.get("/jatos/api/v1/admin/token", headers={"Authorization": f"Bearer {token}"}).json["data"]
    api.get("/jatos/api/v1/admin/token", headers=AUTH, status=401)


def test_the_module_runs_as_a_script() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "jatos_lite.py"), "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == f"jatos-lite {jatos_lite.__version__}"


@pytest.fixture
def lab_with_a_result(tmp_path: Path) -> jatos_lite.Config:
    """Folders holding one study with one finished run: data and an uploaded file."""
    config = jatos_lite.Config(studies=tmp_path / "studies", data=tmp_path / "data", api_token="t" * 20)
    app = webtest.TestApp(jatos_lite.create_app(config))
    token = {"Authorization": "Bearer " + "t" * 20}
    study_id = app.post("/jatos/api/v1/studies", make_jzip(title="Exported", dir_name="exported"),
                        headers={**token, "Content-Type": "application/zip"}).json["data"]["id"]
    code = app.post_json(f"/jatos/api/v1/studies/{study_id}/studyCodes", {"type": "gm"}, headers=token).json["data"][0]
    page = app.get(f"/publix/{code}", status=303).follow()
    base = page.request.path.rsplit("/", 1)[0]
    app.post(base + "/resultData", b"answers", headers={"Content-Type": "text/plain"})
    app.post(base + "/files/photo.bin", upload_files=[("file", "photo.bin", b"\x00\x01" * 500)])
    return config


def test_export_writes_the_results_archive(lab_with_a_result: jatos_lite.Config, tmp_path: Path, capsys) -> None:
    target = tmp_path / "results.zip"
    paths = ["--studies", str(lab_with_a_result.studies), "--data", str(lab_with_a_result.data)]
    assert jatos_lite.main(["export", "exported", "-o", str(target), *paths]) == 0
    with zipfile.ZipFile(target) as archive:
        names = archive.namelist()
        assert names[-1] == "metadata.json" and "apiVersion" not in json.loads(archive.read("metadata.json"))
        assert [archive.read(n) for n in names if n.endswith("data.txt")] == [b"answers"]
        assert [archive.read(n) for n in names if n.endswith("photo.bin")] == [b"\x00\x01" * 500]


def test_export_study_writes_an_archive_that_imports_elsewhere(lab_with_a_result: jatos_lite.Config,
                                                               tmp_path: Path, capsys) -> None:
    target = tmp_path / "study.jzip"
    paths = ["--studies", str(lab_with_a_result.studies), "--data", str(lab_with_a_result.data)]
    assert jatos_lite.main(["export-study", "exported", "-o", str(target), *paths]) == 0
    assert jatos_lite.main(["import", str(target), *folders(tmp_path / "elsewhere")]) == 0
    assert "Imported study 'Exported'" in capsys.readouterr().out


def test_backup_while_a_server_runs_holds_database_files_and_studies(live_server: LiveServer, tmp_path: Path) -> None:
    lab = RemoteLab(live_server)
    study_id = lab.import_study(make_jzip(title="Backed up", dir_name="backed_up"))
    urllib.request.urlopen(f"{live_server.url}/publix/{lab.code(study_id)}", timeout=10).read()
    target = tmp_path / "backup.zip"
    paths = ["--studies", str(live_server.config.studies), "--data", str(live_server.config.data)]
    assert jatos_lite.main(["backup", "-o", str(target), *paths]) == 0
    with zipfile.ZipFile(target) as archive:
        names = set(archive.namelist())
        assert "studies/backed_up/c1.html" in names
        (tmp_path / "restored.sqlite").write_bytes(archive.read("data/jatos.sqlite"))
    restored = sqlite3.connect(tmp_path / "restored.sqlite")
    assert restored.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert restored.execute("SELECT COUNT(*) FROM study_results").fetchone()[0] == 1
    restored.close()


def test_tokens_are_created_listed_and_revoked(tmp_path: Path, capsys) -> None:
    data_folder = ["--data", str(tmp_path / "data")]
    assert jatos_lite.main(["token", "create", "--name", "analysis script", *data_folder]) == 0
    token = capsys.readouterr().out.strip()
    assert jatos_lite.main(["token", "list", *data_folder]) == 0
    listed = capsys.readouterr().out
    assert "active" in listed and "analysis script" in listed and token not in listed
    token_id = listed.split()[0]
    assert jatos_lite.main(["token", "revoke", token_id, *data_folder]) == 0
    assert "revoked" in (jatos_lite.main(["token", "list", *data_folder]) or capsys.readouterr().out)
    api = webtest.TestApp(jatos_lite.create_app(jatos_lite.Config(studies=tmp_path / "studies",
                                                                  data=tmp_path / "data")))
    api.get("/jatos/api/v1/admin/token", headers={"Authorization": f"Bearer {token}"}, status=401)
    assert jatos_lite.main(["token", "revoke", "999", *data_folder]) == 1


def test_the_banner_names_the_sign_in_link_every_lan_address_and_the_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    served: dict = {}
    monkeypatch.setattr(jatos_lite, "serve_until_stopped", lambda server: served.update(vars(server.adj)))
    monkeypatch.setattr(jatos_lite, "lan_addresses", lambda: ["192.168.4.20", "10.0.0.7"])
    port, admin_port = free_port(), free_port()
    assert jatos_lite.main(["serve", *folders(tmp_path), "--port", str(port), "--admin-port", str(admin_port)]) == 0
    out = capsys.readouterr().out
    assert f"http://localhost:{admin_port}/jatos/login?token=jap_" in out  # the admin port, this computer only
    for address in ("192.168.4.20", "10.0.0.7"):
        assert f"http://{address}:{port}/publix/run" in out
    assert str((tmp_path / "data").resolve()) in out and str((tmp_path / "studies").resolve()) in out
    assert "Example study link:" in out
    listening = {(sockaddr[0], sockaddr[1]) for *_, sockaddr in served["listen"]}
    assert listening == {("0.0.0.0", port), ("127.0.0.1", admin_port)}  # participants everywhere, admin here only
    assert served["threads"] == jatos_lite.Config().threads and served["asyncore_use_poll"] is True
    assert served["connection_limit"] == jatos_lite.Config().connections

@pytest.mark.parametrize("command", [["links", "1", "--type", "gm"], ["export", "1", "-o", "{out}.zip"],
                                     ["export-study", "1", "-o", "{out}.jzip"], ["backup", "-o", "{out}.zip"]])
def test_a_command_on_a_folder_without_a_database_says_so_and_makes_none(
        command: list[str], tmp_path: Path, capsys) -> None:
    """Run in the wrong folder, a command that reads what a server made says so in one line,
    instead of creating an empty database there and answering that the study doesn't exist."""
    arguments = [word.format(out=tmp_path / "out") for word in command]
    assert jatos_lite.main([*arguments, "--data", str(tmp_path / "data")]) == 1
    assert not list(tmp_path.glob("out.*"))
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("jatos-lite: There is no database in") and "\n" not in printed
    assert not (tmp_path / "data" / "jatos.sqlite").exists()
