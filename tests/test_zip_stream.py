"""The streaming ZIP writer every export uses: what zipfile and Info-ZIP read back, ZIP64 end
records beyond 65,535 entries, UTF-8 names, entries in many chunks, a central directory that
waits in a temporary file once it is large."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tracemalloc
import zipfile
from pathlib import Path

import pytest

import jatos_lite


def written(entries: list[tuple[str, list[bytes]]]) -> bytes:
    return b"".join(jatos_lite.zip_stream(entries))


def read_back(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


@pytest.mark.parametrize("entries", [
    [],
    [("a.txt", [b"hello"]), ("empty.txt", [])],
    [("ordner/ü é.bin", [bytes(range(256)) * 50, b"", b"tail"])],
    [("big.bin", [bytes([n % 251]) * 100_000 for n in range(30)])],
], ids=["empty", "small", "utf-8 name, several chunks", "3 MB in 30 chunks"])
def test_what_is_written_reads_back(entries: list[tuple[str, list[bytes]]]) -> None:
    assert read_back(written(entries)) == [(name, b"".join(chunks)) for name, chunks in entries]


def test_seventy_thousand_entries_get_zip64_end_records(tmp_path: Path) -> None:
    entries = [(f"study_result_{n}/data.txt", [str(n).encode()]) for n in range(70_000)]
    data = written(entries)
    assert b"PK\x06\x06" in data[-200:], "ZIP64 end of central directory"
    assert read_back(data) == [(name, chunks[0]) for name, chunks in entries]
    if shutil.which("unzip"):
        (tmp_path / "many.zip").write_bytes(data)
        assert subprocess.run(["unzip", "-tq", str(tmp_path / "many.zip")], capture_output=True).returncode == 0


def test_the_stream_comes_in_pieces_of_about_a_mebibyte() -> None:
    pieces = list(jatos_lite.zip_stream([(f"f{n}", [os.urandom(1 << 19)] * 2) for n in range(4)]))
    assert len(pieces) > 1 and max(len(piece) for piece in pieces) < 3 << 20


def test_a_large_central_directory_waits_in_a_file_not_in_memory(tmp_path: Path) -> None:
    """70,000 entries with long names make a central directory of about 12 MB; with a spill size
    of 64 KiB the writer's memory stays far below it (held in memory, it alone would pass it),
    and the archive still reads back, with ZIP64 end records."""
    names = (f"study_result_{n}/comp-result_{n}/files/{'long file name ' * 5}{n}.txt" for n in range(70_000))
    tracemalloc.start()
    try:
        with open(tmp_path / "many.zip", "wb") as archive:
            for piece in jatos_lite.zip_stream(((name, [b"data"]) for name in names), spill_bytes=64 << 10):
                archive.write(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with zipfile.ZipFile(tmp_path / "many.zip") as archive:
        infos = archive.infolist()
        assert len(infos) == 70_000 and archive.read(infos[-1]) == b"data" and archive.testzip() is None
        directory = sum(46 + len(info.filename.encode()) for info in infos)
    assert directory > 12_000_000 and peak < directory / 2, (directory, peak)
    with open(tmp_path / "many.zip", "rb") as archive:
        archive.seek(-200, os.SEEK_END)
        assert b"PK\x06\x06" in archive.read(), "ZIP64 end of central directory"
