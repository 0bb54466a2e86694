"""What `pip install .` installs: the module once, and beside it only the files it ships
(jatos.js, admin.html, the example study) in jatos_lite_files, where client_file finds them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jatos_lite
from conftest import ROOT

NOT_BUILT = shutil.ignore_patterns(".git", ".ci", "tests", "bench", "data", "build", "dist", "*.egg-info",
                                   "__pycache__", ".pytest_cache", "test-artifacts")


def test_the_wheel_carries_the_module_once_and_only_the_shipped_files(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_BUILT)  # a build writes into the tree it builds
    # no build isolation: the setuptools and wheel installed with the test extras, not the package index
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheel")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "wheel").glob("jatos_lite-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = {name for name in archive.namelist() if ".dist-info/" not in name}
    example = [f"studies/{jatos_lite.EXAMPLE_DIR}/{name}" for name in jatos_lite.EXAMPLE_FILES]
    shipped = ["jatos.js", "admin.html", *example]
    assert names == {"jatos_lite.py", *(f"{jatos_lite.RESOURCE_FOLDER}/{name}" for name in shipped)}
