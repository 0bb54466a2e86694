"""One file to carry (issue #14 point 1): the shipped files (jatos.js, admin.html, the example
study) are read through the module's loader, from the checkout and from inside the zipapp that
`jatos-lite pyz` writes; that zipapp runs on a Python with none of the dependencies installed,
from another folder, and serves the example study to its end in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import jatos_lite
from conftest import ROOT, Started, folders, free_port, make_jzip


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python with nothing installed (a venv without pip or system site-packages)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    assert subprocess.run([str(python), "-I", "-c", "import bottle"], capture_output=True).returncode != 0
    return str(python)


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("build") / "jatos-lite.pyz"
    assert jatos_lite.main(["pyz", "-o", str(target)]) == 0
    return target


def isolated_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "JATOS_LITE_"))}


def test_the_checkout_serves_its_own_files() -> None:
    for name in ("jatos.js", "admin.html", "studies/jatos_lite_example/task.html"):
        assert jatos_lite.client_file(name).body == (ROOT / name).read_bytes()


def test_the_pyz_runs_on_a_python_without_the_dependencies(pyz: Path, bare_python: str, tmp_path: Path) -> None:
    done = subprocess.run([bare_python, "-I", str(pyz), "--version"], cwd=tmp_path, env=isolated_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == f"jatos-lite {jatos_lite.__version__}", done.stderr
    again = subprocess.run([bare_python, "-I", str(pyz), "pyz", "-o", "copy.pyz"], cwd=tmp_path, env=isolated_env(),
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and (tmp_path / "copy.pyz").stat().st_size > 100_000, again.stderr


def test_the_pyz_serves_the_example_study_to_its_end(pyz: Path, bare_python: str, tmp_path: Path, chromium) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = Started(tmp_path, free_port(), command=[bare_python, "-I", str(pyz)], env=isolated_env())
    try:
        js = urllib.request.urlopen(f"{server.url}/assets/javascripts/jatos.js", timeout=10).read()
        assert js == (ROOT / "jatos.js").read_bytes()
        sign_in = next(word for word in server.banner.split() if "/jatos/login?token=" in word)
        assert f"run  python {pyz.name} token create" in server.banner  # there is no jatos-lite command here
        page = chromium.new_context().new_page()
        page.goto(sign_in.replace("localhost", "127.0.0.1"))
        assert page.title() and page.content().count("\n") > 50  # admin.html, not a one-line stand-in
        link = next(word for word in server.banner.split() if "/publix/" in word and "run" not in word)
        page.goto(link.replace("localhost", "127.0.0.1"))
        for _ in range(3):
            page.click("#go.green", timeout=10_000)
        page.click("#finish", timeout=10_000)
        page.wait_for_url("**/endPage.html", timeout=10_000)
        assert server.stop(signal.SIGINT)[0] == 0
    finally:
        server.kill()
    database = sqlite3.connect(tmp_path / "data" / "jatos.sqlite")
    assert database.execute("SELECT state FROM study_results").fetchall() == [("FINISHED",)]
    database.close()


def test_a_pyz_with_studies_brings_them_to_an_empty_folder_once(bare_python: str, tmp_path: Path, capsys) -> None:
    """Built with --with-studies, the pyz imports the studies it carries at its first start, with
    their components, batches and files; a study deleted there does not come back."""
    lab_pc, laptop = tmp_path / "lab_pc", tmp_path / "laptop"
    archive = tmp_path / "study.jzip"
    archive.write_bytes(make_jzip(title="Carried", dir_name="carried", files={"stimuli/Äpfel.png": b"png"},
                                  batches=[{"title": "Wave 1"}, {"title": "Wave 2"}]))
    assert jatos_lite.main(["import", str(archive), *folders(lab_pc)]) == 0
    target = tmp_path / "carry.pyz"
    assert jatos_lite.main(["pyz", "--with-studies", "-o", str(target), *folders(lab_pc)]) == 0
    assert "with 1 study:" in capsys.readouterr().out
    laptop.mkdir()
    server = Started(laptop, free_port(), command=[bare_python, "-I", str(target)], env=isolated_env())
    try:
        assert "Imported the study 'Carried'" in server.banner
        studies = json.loads(server.api("GET", "/studies/properties?withBatchProperties=true"))["data"]
        carried = next(study for study in studies if study["title"] == "Carried")
        assert [batch["title"] for batch in carried["batches"]] == ["Wave 1", "Wave 2"]
        assert (laptop / "studies" / "carried" / "stimuli" / "Äpfel.png").read_bytes() == b"png"
        server.api("DELETE", f"/studies/{carried['id']}")
        assert server.stop()[0] == 0
        server = Started(laptop, free_port(), command=[bare_python, "-I", str(target)], env=isolated_env())
        assert "Imported" not in server.banner
        studies = json.loads(server.api("GET", "/studies/properties"))["data"]
        assert "Carried" not in [study["title"] for study in studies]
    finally:
        server.kill()


def test_a_pyz_with_studies_needs_their_database(tmp_path: Path, capsys) -> None:
    assert jatos_lite.main(["pyz", "--with-studies", "-o", str(tmp_path / "x.pyz"), *folders(tmp_path)]) == 1
    assert "There is no database in" in capsys.readouterr().err and not (tmp_path / "x.pyz").exists()


def test_a_jatos_lite_without_jatos_js_refuses_to_start(tmp_path: Path) -> None:
    shutil.copy(ROOT / "jatos_lite.py", tmp_path / "jatos_lite.py")
    done = subprocess.run([sys.executable, str(tmp_path / "jatos_lite.py"), "--port", str(free_port()),
                           *folders(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("jatos-lite: jatos.js is missing") and done.stderr.count("\n") == 1


def test_the_example_is_installed_at_a_later_start_when_its_files_were_missing(
        config: jatos_lite.Config, store: jatos_lite.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = jatos_lite.client_file

    def without_the_example(relative: str) -> jatos_lite.ClientFile:
        if relative.startswith("studies/"):
            raise jatos_lite.JatosError(500, f"{relative} is missing")
        return shipped(relative)

    monkeypatch.setattr(jatos_lite, "client_file", without_the_example)
    jatos_lite.install_example_study(store, config)
    with store.snapshot() as db:
        assert db.value("SELECT COUNT(*) FROM studies") == 0
    monkeypatch.setattr(jatos_lite, "client_file", shipped)
    jatos_lite.install_example_study(store, config)
    with store.snapshot() as db:
        assert db.value("SELECT COUNT(*) FROM studies") == 1
    assert (config.studies / jatos_lite.EXAMPLE_DIR / "task.html").is_file()

