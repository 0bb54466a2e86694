"""Lab mode at start: warn when the data folder is somewhere SQLite is not safe (a sync
client's folder, a network file system)."""

from __future__ import annotations

from pathlib import Path

import pytest

import jatos_lite
from conftest import free_port

MOUNTS = """/dev/sda1 / ext4 rw,relatime 0 0
server:/export /mnt/lab nfs4 rw 0 0
//nas/share /mnt/nas\\040share cifs rw 0 0
/dev/sdb1 /mnt/lab/local ext4 rw 0 0
"""


@pytest.mark.parametrize("folder", ["Dropbox/exp/data", "OneDrive - Uni Wien/data", "Library/Mobile Documents/data",
                                    "Google Drive/My Drive/data", "Nextcloud/data"])
def test_synced_folders_are_named(tmp_path: Path, folder: str) -> None:
    """A data folder inside a sync client's folder gets a warning naming that folder."""
    warnings = jatos_lite.storage_warnings(tmp_path / folder, mounts="")
    assert len(warnings) == 1 and "sync client" in warnings[0]


@pytest.mark.parametrize("folder, kind", [("/mnt/lab/data", "nfs4"), ("/mnt/nas share/data", "cifs"),
                                          ("/mnt/lab/local/data", None), ("/home/me/data", None),
                                          ("/mnt/labx/data", None)])
def test_network_file_systems_are_told_by_the_closest_mount(folder: str, kind: str | None) -> None:
    """The mount point nearest the folder decides; an escaped space in a mount point is understood."""
    assert jatos_lite.network_filesystem(Path(folder), MOUNTS) == kind


def test_a_local_folder_gets_no_warning(tmp_path: Path) -> None:
    assert jatos_lite.storage_warnings(tmp_path / "data", mounts="/dev/sda1 / ext4 rw 0 0\n") == []


def test_the_banner_prints_the_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`jatos-lite serve` prints the warning with the addresses, before serving."""
    monkeypatch.setattr(jatos_lite, "serve_until_stopped", lambda server: None)
    data = tmp_path / "Dropbox" / "data"
    jatos_lite.main(["serve", "--data", str(data), "--studies", str(tmp_path / "studies"), "--port", str(free_port()),
                     "--admin-port", str(free_port())])
    out = capsys.readouterr().out
    assert "WARNING: The data folder is inside 'Dropbox'" in out
    assert "/jatos/login?token=" in out
