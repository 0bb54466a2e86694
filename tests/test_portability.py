"""Windows and macOS, simulated on Linux (issue #14 point 5): the open-file limit, select()'s
socket ceiling, a rename refused while another program holds the file, a slow host-name
look-up, names Windows reserves or that differ only in case, and data folders kept in
iCloud Drive or on a network share."""

from __future__ import annotations

import errno
import os
import sys
import time
import types
from pathlib import Path

import pytest
import waitress.wasyncore

import jatos_lite
from conftest import AUTH, Lab, make_jzip

resource = pytest.importorskip("resource")


@pytest.mark.parametrize("soft, hard, wanted", [
    (256, resource.RLIM_INFINITY, 10240),  # macOS: setrlimit(infinity) fails, 10240 is its ceiling
    (1024, 4096, 4096),
    (1024, 1_048_576, 10240),
    (20000, 20000, None),  # high enough already: left alone
])
def test_the_open_file_limit_is_raised_as_far_as_the_system_allows(monkeypatch: pytest.MonkeyPatch, soft: int,
                                                                  hard: int, wanted: int | None) -> None:
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: asked.append(limits))
    jatos_lite.raise_open_file_limit()
    assert asked == ([] if wanted is None else [(wanted, hard)])


def test_without_poll_the_server_accepts_no_more_connections_than_select_watches() -> None:
    assert jatos_lite.connection_limit(4000, has_poll=True) == 4000
    assert jatos_lite.connection_limit(4000, has_poll=False) == jatos_lite.SELECT_SOCKETS < 512
    assert jatos_lite.connection_limit(100, has_poll=False) == 100


def refused_once(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """os.replace refuses its first call as Windows does while another program has the file open."""
    calls: list[object] = []
    replace = os.replace

    def flaky(source: object, target: object) -> None:
        calls.append(target)
        if len(calls) == 1:
            raise PermissionError(13, "The process cannot access the file because it is being used", str(target))
        replace(source, target)

    monkeypatch.setattr(os, "replace", flaky)
    return calls


def test_a_file_held_open_for_a_moment_is_still_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "results.zip"
    target.write_bytes(b"old")
    calls = refused_once(monkeypatch)
    assert jatos_lite.write_file_durably(target, [b"new"]) == 3
    assert target.read_bytes() == b"new" and len(calls) == 2 and not list(tmp_path.glob(".upload-*"))


def test_a_study_folder_held_open_for_a_moment_is_still_replaced_on_reimport(lab: Lab, config: jatos_lite.Config,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_jzip(dir_name="held", files={"a.txt": "one"}, study_uuid="5e1d0000-0000-4000-8000-000000000001")
    lab.import_study(archive)
    calls = refused_once(monkeypatch)
    lab.import_study(make_jzip(dir_name="held", files={"a.txt": "two"},
                               study_uuid="5e1d0000-0000-4000-8000-000000000001"), overwriteStudysProperties=True)
    assert (config.studies / "held" / "a.txt").read_text() == "two" and len(calls) >= 2


def test_a_study_folder_that_stays_in_use_is_left_whole(lab: Lab, config: jatos_lite.Config,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    uuid = "5e1d0000-0000-4000-8000-000000000002"
    lab.import_study(make_jzip(dir_name="busy", files={"a.txt": "one"}, study_uuid=uuid))
    replace = os.replace

    def refuse_the_new_folder(source: object, target: object) -> None:
        if Path(target) == config.studies / "busy" and "old_assets" not in str(source):
            raise PermissionError(13, "in use", str(target))
        replace(source, target)

    monkeypatch.setattr(os, "replace", refuse_the_new_folder)
    monkeypatch.setattr(jatos_lite, "REPLACE_ATTEMPTS", 2)
    answer = lab.import_study(make_jzip(dir_name="busy", files={"a.txt": "two"}, study_uuid=uuid), status=409)
    assert "could not be moved" in str(answer)
    assert (config.studies / "busy" / "a.txt").read_text() == "one"


def test_a_move_to_another_drive_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "a"
    source.mkdir()
    (source / "f.txt").write_text("x")

    def other_drive(source: object, target: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", other_drive)
    monkeypatch.setattr(os, "rename", other_drive)
    jatos_lite.move_folder(source, tmp_path / "b")
    assert (tmp_path / "b" / "f.txt").read_text() == "x" and not source.exists()


def test_a_slow_host_name_look_up_does_not_hold_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jatos_lite.socket, "getaddrinfo", lambda *args: time.sleep(5) or [])
    started = time.monotonic()
    jatos_lite.lan_addresses()
    assert time.monotonic() - started < jatos_lite.HOSTNAME_LOOKUP_SECONDS + 1


def test_participants_get_the_default_routes_address_first_and_no_virtual_adapters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker, VirtualBox, VPNs and link-local addresses are not where tablets reach the laptop."""
    monkeypatch.setattr(jatos_lite, "_addresses_of_this_host", lambda: ["192.168.56.1", "10.8.0.2", "172.17.0.1",
                                                                      "169.254.10.20", "127.0.1.1", "192.168.1.20"])
    monkeypatch.setattr(jatos_lite, "_interface_addresses", lambda: {
        "10.8.0.2": "tun0", "172.18.0.1": "br-5f3c2a", "10.42.0.1": "wlp2s0", "192.168.1.20": "enp3s0"})
    monkeypatch.setattr(jatos_lite, "_routed_address", lambda: "192.168.1.20")
    assert jatos_lite.lan_addresses() == ["192.168.1.20", "10.42.0.1"]
    monkeypatch.setattr(jatos_lite, "_routed_address", lambda: None)
    assert jatos_lite.lan_addresses() == ["10.42.0.1", "192.168.1.20"]
    monkeypatch.setattr(jatos_lite, "_interface_addresses", lambda: {"172.17.0.2": "eth0"})
    monkeypatch.setattr(jatos_lite, "_addresses_of_this_host", lambda: ["172.17.0.2"])
    assert jatos_lite.lan_addresses() == ["172.17.0.2"], "inside a container, its own address is all there is"


def test_this_computers_interfaces_are_found_by_name_where_the_system_tells() -> None:
    found = jatos_lite._interface_addresses()
    if sys.platform in ("linux", "darwin"):
        assert found.get("127.0.0.1", "").startswith("lo")
    else:
        assert found == {}


def upload(lab: Lab, study_id: int, path: str, status: object = "2*") -> dict:
    return lab.client.post(f"/jatos/api/v1/studies/{study_id}/assets/{path}", headers=AUTH, status=status,
                           upload_files=[("studyAssetsFile", "x.bin", b"data")]).json


@pytest.mark.parametrize("path", ["con.txt", "img/AUX", "lpt1/x.png", "nul.tar.gz"])
def test_an_asset_named_like_a_windows_device_is_refused(lab: Lab, path: str) -> None:
    study_id = lab.study()["id"]
    assert "reserves" in str(upload(lab, study_id, path, 400))


def test_an_asset_differing_from_another_only_in_case_is_refused(lab: Lab, config: jatos_lite.Config) -> None:
    study = lab.study(dir_name="cased")
    upload(lab, study["id"], "img/Photo.png")
    assert "only in case" in str(upload(lab, study["id"], "img/photo.png", 400))
    assert "only in case" in str(upload(lab, study["id"], "IMG/other.png", 400))
    upload(lab, study["id"], "img/Photo.png")  # the same name overwrites
    assert sorted(p.name for p in (config.studies / "cased" / "img").iterdir()) == ["Photo.png"]


def test_desktop_and_documents_kept_in_icloud_drive_are_synced_folders(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "Documents" / "lab").mkdir(parents=True)
    (home / "Desktop").mkdir()
    assert jatos_lite.synced_folder(home / "Documents" / "lab", home) is None
    (home / jatos_lite.ICLOUD_DRIVE / "Documents").mkdir(parents=True)
    assert jatos_lite.synced_folder(home / "Documents" / "lab", home) == "Documents (kept in iCloud Drive)"
    assert jatos_lite.synced_folder(home / "Desktop", home) is None


MAC_MOUNT = """/dev/disk3s1s1 on / (apfs, sealed, local, read-only, journaled)
//anna@fileserver/lab on /Volumes/lab (smbfs, nodev, nosuid, mounted by anna)
afp_0TQk1s0@server/share on /Volumes/share (afpfs, nodev, nosuid, mounted by anna)
/dev/disk4s1 on /Volumes/USB STICK (msdos, local, nodev, nosuid, noowners)
"""


@pytest.mark.parametrize("folder, kind", [("/Volumes/lab/data", "smbfs"), ("/Volumes/share", "afpfs"),
                                          ("/Volumes/USB STICK/data", None), ("/Users/anna/data", None)])
def test_network_shares_under_volumes_are_recognised_on_macos(folder: str, kind: str | None) -> None:
    assert jatos_lite.network_filesystem(Path(folder), MAC_MOUNT) == kind


def test_a_data_folder_inside_pythons_installation_is_warned_about() -> None:
    warnings = jatos_lite.storage_warnings(Path(sys.prefix) / "Scripts" / "data", mounts="")
    assert any("a folder for programs" in warning for warning in warnings)
    assert jatos_lite.storage_warnings(Path.home() / "lab" / "data", mounts="") == []


class Idle:
    """A connection that waits for nothing (a held poll): the event loop only asks it."""

    accepting = False

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return False


@pytest.mark.parametrize("turn_seconds", [0.005, 0.08])
def test_the_event_loop_pauses_by_its_connections_and_its_turns(monkeypatch, turn_seconds: float) -> None:
    """Each turn asks every connection what it waits for, so turns are spaced by the number of
    connections (10,000 x LOOP_SECONDS_PER_CONNECTION = 0.2 s here), and a pause is at most
    three times the turn: quick turns come four turns' time apart, slow ones the spacing apart."""
    for turn in ("poll", "poll2"):  # poll2 where the system has poll(), else poll (select)
        monkeypatch.setattr(waitress.wasyncore, turn, lambda timeout, map: time.sleep(turn_seconds))
    connections = {number: Idle() for number in range(10_000)}
    started = time.monotonic()
    jatos_lite.PacedLoop.loop(timeout=0, use_poll=True, map=connections, count=3)
    took = time.monotonic() - started
    spacing = 10_000 * jatos_lite.LOOP_SECONDS_PER_CONNECTION
    least = 3 * min(spacing, turn_seconds * (1 + jatos_lite.LOOP_PAUSE_PER_TURN))
    assert least * 0.9 <= took < least + 0.15


class Listener:
    """A listening socket with `waiting` connections to accept, one per call, as waitress's."""

    def __init__(self, waiting: int, limit: int):
        self.waiting, self._map, self.active_channels = waiting, {}, {}
        self.adj = types.SimpleNamespace(connection_limit=limit)

    def accept_one(self) -> None:
        if self.waiting:
            self.waiting -= 1
            self._map[len(self._map)] = self.active_channels[len(self._map)] = object()


@pytest.mark.parametrize("waiting, limit, accepted", [(30, 100, 30), (30, 10, 10), (500, 1000, 100)])
def test_a_turn_accepts_every_waiting_connection_up_to_the_limit(waiting: int, limit: int, accepted: int) -> None:
    listener = Listener(waiting, limit)
    jatos_lite._accept_waiting(listener, listener.accept_one)
    assert len(listener._map) == accepted == min(waiting, limit, jatos_lite.ACCEPTS_PER_TURN)
