"""The `jatos-lite` command: options from flags and `JATOS_LITE_*` variables as the README's
table says, and `import`, `links` and `token` on the same folders, also while a server runs."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import webtest

import jatos_lite
from conftest import AUTH, LiveServer, RemoteLab, make_jzip

ROOT = Path(__file__).resolve().parent.parent
README_OPTIONS = re.findall(r"^\| `(--[a-z-]+)` \| `(JATOS_LITE_[A-Z_]+)` \| `?([^|`]+?)`? \|",
                            (ROOT / "README.md").read_text(encoding="utf-8"), re.MULTILINE)
EXAMPLES = {"host": "127.0.0.5", "port": "9123", "studies": "my_studies", "data": "my_data",
            "api_token": "token-from-somewhere", "threads": "40"}


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
    documented = {"none": None, "./studies": "studies", "./data": "data"}.get(default, default)
    assert (None if getattr(jatos_lite.Config(), name) is None else str(getattr(jatos_lite.Config(), name))) == \
        documented, "the README's default"
    args = jatos_lite.build_parser().parse_args(["serve", flag, EXAMPLES[name]])
    overridden = jatos_lite.config_from_env({env_name: "999" if name in ("port", "threads") else "other"},
                                            **{name: getattr(args, name)})
    assert str(getattr(overridden, name)) == EXAMPLES[name]


def test_a_malformed_variable_is_refused() -> None:
    with pytest.raises(ValueError):
        jatos_lite.config_from_env({"JATOS_LITE_PORT": "ninety"})
    with pytest.raises(ValueError):
        jatos_lite.config_from_env({"JATOS_LITE_UPLOADS_ENABLED": "perhaps"})


def folders(tmp_path: Path) -> list[str]:
    return ["--studies", str(tmp_path / "studies"), "--data", str(tmp_path / "data")]


def test_import_then_links_print_full_urls_that_start_runs(tmp_path: Path, capsys) -> None:
    archive = tmp_path / "study.jzip"
    archive.write_bytes(make_jzip(title="CLI study", dir_name="cli_study"))
    assert jatos_lite.main(["import", str(archive), *folders(tmp_path)]) == 0
    assert "Imported study 'CLI study'" in capsys.readouterr().out
    assert jatos_lite.main(["links", "cli_study", "--type", "ps", "--count", "3", "--comment", "Anna",
                            "--host", "10.1.2.3", "--port", "9999", *folders(tmp_path)]) == 0
    urls = capsys.readouterr().out.split()
    assert len(urls) == 3 and all(url.startswith("http://10.1.2.3:9999/publix/") for url in urls)
    config = jatos_lite.Config(studies=tmp_path / "studies", data=tmp_path / "data")
    participant = webtest.TestApp(jatos_lite.create_app(config))
    assert participant.get(urllib.parse.urlsplit(urls[0]).path, status=303).location


def test_links_of_an_unknown_study_fail_with_a_message(tmp_path: Path, capsys) -> None:
    assert jatos_lite.main(["links", "nothing", "--type", "gm", *folders(tmp_path)]) == 1
    assert "nothing" in capsys.readouterr().err


def test_import_and_links_work_while_a_server_runs(live_server: LiveServer, capsys) -> None:
    paths = ["--studies", str(live_server.config.studies), "--data", str(live_server.config.data)]
    archive = live_server.config.data / "upload.jzip"
    archive.write_bytes(make_jzip(title="Live", dir_name="live"))
    assert jatos_lite.main(["import", str(archive), *paths]) == 0
    capsys.readouterr()
    assert jatos_lite.main(["links", "live", "--type", "gm", "--host", "127.0.0.1", *paths]) == 0
    code = capsys.readouterr().out.split()[0].rsplit("/", 1)[1]
    page = urllib.request.urlopen(f"{live_server.url}/publix/{code}", timeout=10)
    assert "/publix/" in page.geturl() and page.status == 200
    assert RemoteLab(live_server).api("GET", "/studies/properties")["data"][0]["title"] == "Live"


def test_a_minted_token_opens_the_api(tmp_path: Path, capsys) -> None:
    assert jatos_lite.main(["token", "--name", "jatosR", *folders(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    api = webtest.TestApp(jatos_lite.create_app(jatos_lite.Config(studies=tmp_path / "studies",
                                                                  data=tmp_path / "data")))
    assert api.get("/jatos/api/v1/admin/token", headers={"Authorization": f"Bearer {token}"}).json["data"]
    api.get("/jatos/api/v1/admin/token", headers=AUTH, status=401)


def test_the_module_runs_as_a_script() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "jatos_lite.py"), "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == f"jatos-lite {jatos_lite.__version__}"
