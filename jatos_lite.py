"""jatos-lite: run JATOS studies on one laptop, no internet needed.

A single-module server that speaks JATOS's participant protocol ("publix") and the
JATOS API v1, so studies written for JATOS run unchanged and scripts written for JATOS
fetch their results unchanged. Data lives in one SQLite file (WAL mode) plus a folder
of uploaded result files.

Quick start::

    pip install . && jatos-lite          # serves ./studies and ./data on port 9000

Embedding::

    import jatos_lite
    app = jatos_lite.create_app(jatos_lite.Config(studies=Path("studies"), data=Path("data")))

The file is cut into sections in data-flow order; each uses only what stands above it:
config, errors and small helpers, storage, study log, study model, sign-in and tokens,
groups and the channel event log, study flow, channels, archives, web, CLI.

Where a change goes:
- a new route: a handler (a plain function of a Call) in the Web section's part for its
  kind, and a row in ROUTES, which also documents an API route for /openapi.yaml;
- what a route does lives below the Web section, in plain functions of a database
  transaction (`db`), testable without HTTP;
- a new state rule: STUDY_RESULT_MOVES or COMPONENT_RESULT_MOVES (study flow), which
  set_state, the one writer of a result's state, enforces;
- a new limit or timing: a field of Config.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import csv
import dataclasses
import datetime
import email.utils
import errno
import functools
import hashlib
import heapq
import hmac
import html
import io
import ipaddress
import itertools
import json
import logging
import mimetypes
import os
import re
import secrets
import select
import shutil
import socket
import sqlite3
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Generator, Iterable, Iterator, NamedTuple

import bottle
import jsonpatch
import jsonpointer
import waitress.channel
import waitress.parser
import waitress.server
import waitress.task
import waitress.wasyncore

__version__ = "0.1.0"
JATOS_VERSION = "3.10.5"
API_VERSION = "1.1.0"

log = logging.getLogger("jatos_lite")

###############################################################################
# Config
###############################################################################

ENV_PREFIX = "JATOS_LITE_"
BODY_MARGIN = 1_000_000  # room for a multipart upload's headers, and for an upload refused without parsing it


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the server can be told. Built from defaults < environment < CLI flags."""

    host: str = "0.0.0.0"
    port: int = 9000
    studies: Path = Path("studies")
    data: Path = Path("data")
    api_token: str | None = None
    # A channel poll waiting for news takes no thread (it waits with its connection: GuardedChannel),
    # so the threads are for requests being worked on; fewer threads spend less CPU time on
    # switching between them (bench/channels_scale.py, README).
    threads: int = 32
    # Every page of a channel study keeps about two connections open (its poll and its sends); the
    # server holds at most 2/5 of this many polls, and warns near that.
    connections: int = 4000
    max_result_data: int = 5_000_000
    max_upload: int = 30_000_000
    max_uploads_per_run: int = 50_000_000
    max_archive: int = 2_000_000_000  # a study archive or study assets file (the admin's uploads)
    max_request_body: int = 32_000_000  # any other request (at least max_upload + 1 MB)
    max_uploads_per_batch: int = 2_000_000_000  # files of all runs of a batch's links anyone can start again
    max_query_string: int = 10_000  # a run's stored URL query (as JSON)
    max_session: int = 1_000_000  # a batch or group session (as JSON)
    min_free_disk: int = 200_000_000  # writes are refused (507) when the data folder's disk has less free
    id_cookie_limit: int = 10
    uploads_enabled: bool = True
    # The admin page, sign-in and the admin session answer only at this port, on admin_host: study
    # pages (another origin) can then neither read the admin's CSRF token nor use the session.
    # None: one port serves everything (embedding, tests); `serve` takes the port after `port`.
    admin_port: int | None = None
    admin_host: str = "127.0.0.1"
    legacy_links: bool = False  # pre-3.7 links naming a personal worker or General Single: see legacy_start
    poll_hold_seconds: float = 20.0  # the longest a channel poll waits for news
    presence_timeout_seconds: float = 30.0  # a page not heard of this long has left its channels
    sweep_interval_seconds: float = 2.0  # how often the hub looks for pages that left
    recent_events_bytes: int = 2_000_000  # the hub's memory of recent channel events (their JSON size)
    connections_per_address: int = 200  # one device (a tablet opens about six) cannot take every connection
    header_timeout_seconds: float = 10.0  # a request whose headers take longer is hung up on
    browser: bool = True  # serve opens the admin page in the default browser (never in CI or without a display)

    @property
    def db_path(self) -> Path:
        return self.data / "jatos.sqlite"

    @property
    def uploads(self) -> Path:
        return self.data / "result_uploads"

    @property
    def tmp(self) -> Path:
        return self.data / "tmp"

    @property
    def body_limit(self) -> int:
        """The largest body of any request but an archive or study assets upload."""
        return max(self.max_request_body, self.max_upload + BODY_MARGIN)


def _parse_bool(text: str) -> bool:
    if text.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if text.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _field_parser(field: dataclasses.Field) -> Callable[[str], Any]:
    kind = str(field.type)
    if kind in ("int", "int | None"):
        return int
    if kind == "float":
        return float
    if kind == "bool":
        return _parse_bool
    if kind == "Path":
        return Path
    return str


def config_from_env(env: dict[str, str] | None = None, **overrides: Any) -> Config:
    """A Config from `JATOS_LITE_<NAME>` variables, then explicit overrides (CLI flags)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Config):
        text = env.get(ENV_PREFIX + field.name.upper())
        if text not in (None, ""):
            try:
                values[field.name] = _field_parser(field)(text)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{field.name.upper()}={text!r} is not a valid {field.type}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(**values)


###############################################################################
# Errors and small helpers
###############################################################################


class JatosError(Exception):
    """A request that cannot be served: HTTP status, a message for people, an API code."""

    API_CODES = {400: "INVALID_REQUEST", 401: "AUTH_ERROR", 403: "FORBIDDEN", 404: "NOT_FOUND",
                 409: "CONFLICT", 413: "TOO_LARGE", 415: "WRONG_CONTENT_TYPE", 500: "UNEXPECTED_ERROR"}

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or self.API_CODES.get(status, "UNSPECIFIED")


class CommittedError(JatosError):
    """An error whose bookkeeping (e.g. the quotaReached flags) is committed before it is answered."""


MAX_ID = 2**63 - 1  # SQLite's largest integer


def parse_id(text: str) -> int | None:
    """A number (ID, cursor, version) from a URL, query, body or cookie, or None: ASCII digits only
    (str.isdigit() also accepts '²', which int() refuses) and no larger than SQLite stores."""
    if not re.fullmatch(r"[0-9]{1,19}", text):
        return None
    number = int(text)
    return number if number <= MAX_ID else None


def now_ms() -> int:
    return int(time.time() * 1000)


def new_uuid() -> str:
    return str(uuid.uuid4())


_ALNUM = string.ascii_letters + string.digits


def random_alnum(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


MAX_TEXT_LENGTH = 255  # JATOS's columns for titles, names and messages (UTF-16 code units)
MAX_NAME_BYTES = 255  # the longest file or folder name file systems store
CHUNK_BYTES = 1 << 20  # files are read, copied and streamed in pieces of this size


def java_length(text: str) -> int:
    """Length in UTF-16 code units, as Java counts it."""
    return len(text.encode("utf-16-le")) // 2


def truncate_message(text: str | None) -> str | None:
    """JATOS keeps at most MAX_TEXT_LENGTH UTF-16 code units of a message (never splitting a character)."""
    if text is None:
        return None
    out, units = [], 0
    for char in text:
        units += 2 if ord(char) > 0xFFFF else 1
        if units > MAX_TEXT_LENGTH:
            break
        out.append(char)
    return "".join(out)


def latin1_sha256(text: str) -> str:
    """JATOS's hash of a text: SHA-256 over its Latin-1 bytes ('?' for anything else)."""
    return hashlib.sha256(text.encode("latin-1", "replace")).hexdigest()


def description_hash(description: str | None) -> str | None:
    return latin1_sha256(description) if description else None


def human_bytes(n: int) -> str:
    """Decimal units with one half-up rounded digit, exactly like JATOS (1500 -> '1.5 kB')."""
    if n < 1000:
        return f"{n} B"
    prefixes = "kMGTPE"
    index = 0
    while n >= 999_950 and index < len(prefixes) - 1:
        n //= 1000
        index += 1
    tenths = (n + 50) // 100  # n / 1000 in tenths, rounded half up (integers: Decimal took 3x as long)
    return f"{tenths // 10}.{tenths % 10} {prefixes[index]}B"


def duration_text(start_ms: int | None, end_ms: int | None) -> str | None:
    """'HH:MM:SS', or 'D:HH:MM:SS' with unpadded days; None while the run has no end."""
    if start_ms is None or end_ms is None:
        return None
    seconds = max(0, (end_ms - start_ms) // 1000)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    clock = "%02d:%02d:%02d" % (hours, *divmod(rest, 60))  # quicker than an f-string's three format specs
    return f"{days}:{clock}" if days else clock


def timestamp_for_filename() -> str:
    return datetime.datetime.now().strftime("%Y%m%d%H%M%S")


def load_json(text: str | bytes) -> Any:
    """json.loads, where text nested deeper than Python's stack allows is invalid JSON (a ValueError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


HOSTNAME_LOOKUP_SECONDS = 1.0  # macOS can take 5-35 s to look up its own name on a network without DNS


def _addresses_of_this_host() -> list[str]:
    """The addresses this computer's name resolves to, or none if the look-up takes too long."""
    found: list[str] = []

    def look_up() -> None:
        with contextlib.suppress(OSError):
            found.extend(str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))

    worker = threading.Thread(target=look_up, name="jatos-lite-hostname", daemon=True)
    worker.start()
    worker.join(HOSTNAME_LOOKUP_SECONDS)
    return [] if worker.is_alive() else found


def _routed_address() -> str | None:
    """The address this computer's traffic to other networks leaves from (its default route)."""
    with contextlib.suppress(OSError):
        # connect() on UDP sends nothing; it only asks the routing table which address is ours.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            return str(probe.getsockname()[0])
    return None


_SIOCGIFADDR = {"linux": 0x8915, "darwin": 0xC0206921}  # the ioctl asking an interface's IPv4 address


def _interface_addresses() -> dict[str, str]:
    """{IPv4 address: interface name} of this computer's interfaces, where the system tells
    (Linux, macOS); elsewhere empty."""
    request, found = _SIOCGIFADDR.get(sys.platform), dict[str, str]()
    if request is None:
        return found
    import fcntl

    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                answer = fcntl.ioctl(probe.fileno(), request, struct.pack("40s", name.encode()[:15]))
                found[socket.inet_ntoa(answer[20:24])] = name  # struct ifreq: name, then a sockaddr_in
    return found


# Adapters of containers, virtual machines and VPNs, which the devices on the lab's network cannot
# reach: by interface name, and by the networks they take by default (or link-local: no network).
VIRTUAL_INTERFACES = re.compile(r"docker|veth|br-|virbr|vboxnet|vmnet|utun|tun|tap|wg|tailscale|zt|lxcbr|lxdbr|"
                                r"podman|cni|flannel|cali")
VIRTUAL_NETWORKS = tuple(ipaddress.ip_network(network) for network in (
    "169.254.0.0/16",  # link-local: an adapter that found no network
    "172.17.0.0/16",  # Docker's default bridge
    "192.168.56.0/24",  # VirtualBox's default host-only network
    "100.64.0.0/10",  # shared address space: Tailscale and other overlay VPNs
))


def is_virtual_adapter(address: str, interface: str | None) -> bool:
    if interface is not None and VIRTUAL_INTERFACES.match(interface):
        return True
    return any(ipaddress.ip_address(address) in network for network in VIRTUAL_NETWORKS)


def lan_addresses() -> list[str]:
    """IPv4 addresses other devices on the local network can reach this machine at: the one of
    the default route first, then the others in order; those of virtual adapters (containers,
    virtual machines, VPNs) only when there is no other."""
    interfaces, routed = _interface_addresses(), _routed_address()
    found = {a for a in {*_addresses_of_this_host(), *interfaces, routed}
             if a is not None and not a.startswith("127.") and a != "0.0.0.0"}
    reachable = [a for a in found if not is_virtual_adapter(a, interfaces.get(a))]
    return sorted(reachable or found, key=lambda a: (a != routed, ipaddress.ip_address(a)))


def base_urls(config: Config, port: int | None = None) -> list[str]:
    """The addresses participants' devices can open this server at: each network address it
    listens on (or localhost when it has none). `port`: the one a request came in on."""
    port = port or config.port
    if config.host not in ("0.0.0.0", ""):
        return [f"http://{config.host}:{port}"]
    return [f"http://{address}:{port}" for address in lan_addresses()] or [f"http://localhost:{port}"]


def minify_json_text(text: Any, what: str) -> str | None:
    """Stored form of a study/component/batch input: minified JSON text, key order kept."""
    if text is None:
        return None
    if not isinstance(text, str):
        return to_json(text)
    if text.strip() == "":
        return None
    try:
        value = load_json(text)
    except ValueError as exc:
        raise JatosError(400, f"Error in field '{what}' - invalid JSON: {exc}", "VALIDATION_ERROR")
    return to_json(value)


def parse_json_text(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# One encoder for every answer and stored JSON text: json.dumps builds a new one per call when
# given options, a tenth of a busy channel poll's time.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def to_json(value: Any) -> str:
    return _JSON_ENCODER.encode(value)


# File names JATOS refuses (formats-and-api.md §4.3), plus names Windows cannot store.
_BAD_NAME_CHARS = set("`*?\"\\/,<>|:~!§$%&^°\x00")
_WINDOWS_DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}


def is_portable_name(name: str) -> bool:
    """True for a single file or folder name that JATOS accepts and every OS can store."""
    if not name or name in (".", "..") or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return False
    if any(c in _BAD_NAME_CHARS or c.isspace() or ord(c) < 32 for c in name):
        return False
    if name.endswith("."):
        return False
    return name.split(".")[0].upper() not in _WINDOWS_DEVICE_NAMES


_BAD_PATH_CHARS = set('\\<>:"|?*')


def confined_path(root: Path, relative: str) -> Path | None:
    """`root/relative` if `relative` is a clean relative path that stays inside root, else None.

    The path is normalised *before* it is checked, so `a/../../b` and encoded variants
    cannot escape; symlinks pointing out of root are refused too.
    """
    if any(c in _BAD_PATH_CHARS or ord(c) < 32 or ord(c) == 127 for c in relative):
        return None
    parts: list[str] = []
    for part in PurePosixPath(relative).parts:
        if part in ("", ".", "/"):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(part)
    if relative.startswith("/") or not parts:
        return None
    candidate = root.joinpath(*parts)
    try:
        if not candidate.resolve().is_relative_to(root.resolve()):
            return None
    except OSError:
        return None
    return candidate


def write_file_durably(target: Path, chunks: Iterable[bytes]) -> int:
    """Write to a temp file beside target, fsync, rename over target. Returns the size."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        replace_patiently(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)
    return size


REPLACE_ATTEMPTS = 8  # with growing pauses, about 3 s in all


def replace_patiently(source: str | Path, target: str | Path) -> None:
    """os.replace, tried again for a few seconds where Windows refuses it because another program
    (an antivirus scanner, the server sending that very file) has the target open."""
    for attempt in range(REPLACE_ATTEMPTS):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if attempt == REPLACE_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def move_folder(source: Path, target: Path) -> None:
    """Move a folder by renaming it (replace_patiently), so that it moves whole or not at all:
    shutil.move's copy-then-delete, which a file in use on Windows stops half-way, is left only
    for a move to another drive."""
    try:
        replace_patiently(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise JatosError(409, f"The folder {source} could not be moved ({exc.strerror}): close the programs "
                                  "that have files of it open and try again. Nothing was changed.") from None
        shutil.move(str(source), str(target))


def portability_problem(root: Path, target: Path) -> str | None:
    """Why a new file at `target` (inside `root`) could not be kept as it is on Windows or macOS:
    a name Windows reserves, or a name that differs from an existing one only in case (one file
    there). None if there is no such problem."""
    folder = root
    for part in target.relative_to(root).parts:
        if part.split(".")[0].upper() in _WINDOWS_DEVICE_NAMES:
            return f"'{part}' is a name Windows reserves for a device: choose another name."
        if folder.is_dir():
            twin = next((p.name for p in folder.iterdir() if p.name != part and p.name.lower() == part.lower()), None)
            if twin is not None:
                return (f"'{part}' differs from the existing '{twin}' only in case; Windows and macOS keep one "
                        "file for both: use the existing name or another one.")
        folder = folder / part
    return None


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":
        return  # Windows cannot open a directory for fsync; NTFS journals the rename.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_chunks(fileobj: Any, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    while True:
        chunk = fileobj.read(size)
        if not chunk:
            return
        yield chunk


def digested(chunks: Iterable[bytes], digest: Any) -> Iterator[bytes]:
    """The chunks unchanged, each fed to `digest` (a hashlib object) on its way."""
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


DISK_CHECK_SECONDS = 1.0


class FreeSpace:
    """The free space on the data folder's disk, against a floor. Every write asks, so the
    system is asked at most once a second."""

    def __init__(self, folder: Path, floor: int):
        self.folder, self.floor = folder, floor
        self._lock = threading.Lock()
        self._asked = -DISK_CHECK_SECONDS
        self._free = 0

    def bytes(self) -> int:
        now = time.monotonic()
        with self._lock:
            if now - self._asked >= DISK_CHECK_SECONDS:
                self._free, self._asked = shutil.disk_usage(self.folder).free, now
            return self._free

    def warning(self) -> str | None:
        """What to tell the researcher when the disk is below the floor."""
        free = self.bytes()
        if free >= self.floor:
            return None
        return (f"The disk of the data folder has only {human_bytes(free)} free (less than "
                f"{human_bytes(self.floor)}): participants' data, files and sessions are refused until you free space.")

    def check(self) -> None:
        """Refuse a participant's write (507) while the disk is below the floor."""
        if self.bytes() < self.floor:
            log.warning("refused a write: %s free on the data folder's disk", human_bytes(self._free))
            raise JatosError(507, "The server's disk is full: your data could not be stored. "
                                  "Please tell the researcher.")


RESOURCE_FOLDER = "jatos_lite_files"  # where pip installs jatos.js, admin.html and the example beside the module


class ClientFile(NamedTuple):
    """A file the server ships (jatos.js, admin.html, the example study's files), as bytes."""

    body: bytes
    etag: str
    modified: float


def command_name() -> str:
    """How its user starts this jatos-lite's commands: `python FILE.pyz` from a zipapp."""
    archive = Path(__file__).parent
    return f"python {archive.name}" if archive.is_file() else "jatos-lite"


@functools.cache
def client_file(relative: str) -> ClientFile:
    """A shipped file, read beside this module through its loader, so that it is found in a
    checkout, inside a zipapp (.pyz) and, in RESOURCE_FOLDER, where pip installs it. Read once
    per process. A missing one is a JatosError that says what to do."""
    here = Path(__file__).parent
    for path in (here / relative, here / RESOURCE_FOLDER / relative):
        with contextlib.suppress(OSError):
            body = __loader__.get_data(str(path))
            return ClientFile(body, f'"{hashlib.sha256(body).hexdigest()[:20]}"', time.time())
    raise JatosError(500, f"{relative} is missing from this jatos-lite ({here}): install it again "
                          "(pip install . in its folder) or use a complete jatos-lite.pyz.")


###############################################################################
# Storage
###############################################################################

# Each entry migrates the schema from version i to i+1 (PRAGMA user_version).
MIGRATIONS: list[str] = [
    """
    CREATE TABLE studies (
        id INTEGER PRIMARY KEY,
        uuid TEXT NOT NULL UNIQUE,
        title TEXT NOT NULL,
        description TEXT,
        dir_name TEXT NOT NULL UNIQUE COLLATE NOCASE,
        comments TEXT,
        study_input TEXT,
        end_redirect_url TEXT,
        study_entry_msg TEXT,
        active INTEGER NOT NULL DEFAULT 1,
        locked INTEGER NOT NULL DEFAULT 0,
        group_study INTEGER NOT NULL DEFAULT 0,
        linear_study INTEGER NOT NULL DEFAULT 0,
        allow_preview INTEGER NOT NULL DEFAULT 0,
        created INTEGER NOT NULL
    );
    CREATE TABLE components (
        id INTEGER PRIMARY KEY,
        study_id INTEGER NOT NULL REFERENCES studies(id),
        uuid TEXT NOT NULL UNIQUE,
        position INTEGER NOT NULL,
        title TEXT NOT NULL,
        html_file_path TEXT,
        reloadable INTEGER NOT NULL DEFAULT 0,
        active INTEGER NOT NULL DEFAULT 1,
        comments TEXT,
        component_input TEXT
    );
    CREATE INDEX components_by_study ON components(study_id, position);
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        study_id INTEGER NOT NULL REFERENCES studies(id),
        uuid TEXT NOT NULL UNIQUE,
        position INTEGER NOT NULL,
        title TEXT NOT NULL,
        active INTEGER NOT NULL DEFAULT 1,
        max_active_members INTEGER,
        max_total_members INTEGER,
        max_total_workers INTEGER,
        allowed_worker_types TEXT NOT NULL DEFAULT '[]',
        comments TEXT,
        batch_input TEXT,
        session_data TEXT NOT NULL DEFAULT '{}',
        session_version INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX batches_by_study ON batches(study_id, position);
    CREATE TABLE workers (
        id INTEGER PRIMARY KEY,
        type TEXT NOT NULL,
        comment TEXT,
        mturk_worker_id TEXT
    );
    CREATE INDEX workers_by_mturk_id ON workers(mturk_worker_id COLLATE NOCASE, type)
        WHERE mturk_worker_id IS NOT NULL;
    INSERT INTO workers(id, type) VALUES (1, 'Jatos');
    CREATE TABLE batch_workers (
        batch_id INTEGER NOT NULL REFERENCES batches(id),
        worker_id INTEGER NOT NULL REFERENCES workers(id),
        PRIMARY KEY (batch_id, worker_id)
    ) WITHOUT ROWID;
    CREATE TABLE study_links (
        code TEXT PRIMARY KEY,
        batch_id INTEGER NOT NULL REFERENCES batches(id),
        worker_type TEXT NOT NULL,
        worker_id INTEGER REFERENCES workers(id),
        active INTEGER NOT NULL DEFAULT 1,
        created INTEGER NOT NULL
    );
    CREATE INDEX study_links_by_batch ON study_links(batch_id, worker_type, worker_id);
    CREATE INDEX study_links_by_worker ON study_links(worker_id);
    CREATE TABLE study_results (
        id INTEGER PRIMARY KEY,
        uuid TEXT NOT NULL UNIQUE,
        study_code TEXT,
        study_id INTEGER NOT NULL REFERENCES studies(id),
        batch_id INTEGER NOT NULL REFERENCES batches(id),
        worker_id INTEGER NOT NULL REFERENCES workers(id),
        state TEXT NOT NULL,
        start_date INTEGER NOT NULL,
        end_date INTEGER,
        last_seen_date INTEGER,
        study_session_data TEXT,
        url_query_parameters TEXT NOT NULL DEFAULT '{}',
        confirmation_code TEXT,
        message TEXT,
        quota_reached INTEGER NOT NULL DEFAULT 0,
        group_result_id INTEGER
    );
    CREATE INDEX study_results_by_study ON study_results(study_id);
    CREATE INDEX study_results_by_batch ON study_results(batch_id);
    CREATE INDEX study_results_by_worker ON study_results(worker_id);
    CREATE INDEX study_results_by_group ON study_results(group_result_id);
    CREATE TABLE component_results (
        id INTEGER PRIMARY KEY,
        study_result_id INTEGER NOT NULL REFERENCES study_results(id),
        component_id INTEGER NOT NULL REFERENCES components(id),
        state TEXT NOT NULL,
        start_date INTEGER NOT NULL,
        end_date INTEGER,
        data TEXT,
        data_size INTEGER NOT NULL DEFAULT 0,
        message TEXT,
        quota_reached INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX component_results_by_run ON component_results(study_result_id);
    CREATE INDEX component_results_by_component ON component_results(component_id);
    CREATE TABLE applied_requests (
        study_result_id INTEGER NOT NULL,
        request_id TEXT NOT NULL,
        status INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (study_result_id, request_id)
    ) WITHOUT ROWID;
    CREATE TABLE api_tokens (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        creation_date INTEGER NOT NULL,
        expires_after INTEGER,
        active INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE admin_sessions (
        token_hash TEXT PRIMARY KEY,
        csrf_token TEXT NOT NULL,
        created INTEGER NOT NULL,
        jatos_run TEXT,
        run_component_uuid TEXT
    ) WITHOUT ROWID;
    """,
    """
    CREATE TABLE group_results (
        id INTEGER PRIMARY KEY,
        batch_id INTEGER NOT NULL REFERENCES batches(id),
        state TEXT NOT NULL,
        start_date INTEGER NOT NULL,
        end_date INTEGER,
        session_data TEXT DEFAULT '{}',
        session_version INTEGER NOT NULL DEFAULT 1,
        active_member_count INTEGER NOT NULL DEFAULT 0,
        history_member_count INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX group_results_by_batch ON group_results(batch_id, state);
    ALTER TABLE study_results ADD COLUMN history_group_result_id INTEGER;
    CREATE INDEX study_results_by_history_group ON study_results(history_group_result_id);
    CREATE TABLE channel_conns (
        id TEXT PRIMARY KEY,
        open_id TEXT UNIQUE,
        study_result_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        close_reason TEXT,
        last_seen REAL NOT NULL,
        last_cseq INTEGER NOT NULL DEFAULT 0,
        opened_at REAL NOT NULL,
        closed_at REAL
    ) WITHOUT ROWID;
    CREATE INDEX channel_conns_by_run ON channel_conns(study_result_id, kind, state);
    CREATE INDEX channel_conns_by_state ON channel_conns(state, last_seen);
    CREATE TABLE channel_conn_scopes (
        conn TEXT NOT NULL,
        scope TEXT NOT NULL,
        from_id INTEGER NOT NULL,
        to_id INTEGER
    );
    CREATE INDEX channel_conn_scopes_by_conn ON channel_conn_scopes(conn);
    CREATE INDEX channel_conn_scopes_by_scope ON channel_conn_scopes(scope, to_id);
    CREATE TABLE channel_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        scope TEXT NOT NULL,
        recipient TEXT,
        exclude TEXT,
        payload TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX channel_events_by_scope ON channel_events(scope, id);
    CREATE INDEX channel_events_by_created ON channel_events(created);
    """,
    # The study log (section "Study log"); studies that exist already start theirs with the
    # entry JATOS writes when it finds a study without a log.
    """
    CREATE TABLE study_log (
        id INTEGER PRIMARY KEY,
        log TEXT NOT NULL,
        entry TEXT NOT NULL
    );
    CREATE INDEX study_log_by_log ON study_log(log);
    INSERT INTO study_log(log, entry) SELECT uuid, json_object(
        'msg', 'Could not find a study log although the study already exists. Create a new one.',
        'timestamp', CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER),
        'studyUuid', uuid, 'hashFunction', 'SHA-256') FROM studies ORDER BY id
    """,
    # An admin session ends with the token it was signed in with (its SHA-256 is kept); sessions
    # from before never expired and are ended here.
    """
    DELETE FROM admin_sessions;
    ALTER TABLE admin_sessions ADD COLUMN sign_in_token TEXT NOT NULL DEFAULT ''
    """,
    # The page that opened a channel conn: a page reopening its own channel is no second tab.
    """
    ALTER TABLE channel_conns ADD COLUMN page TEXT
    """,
]


@dataclasses.dataclass(frozen=True)
class ChannelEvent:
    """A row of channel_events as appended (the message not yet serialised)."""

    id: int
    scope: str
    recipient: str | None
    exclude: str | None
    message: dict
    size: int  # of the message as JSON


class Db:
    """One connection inside one transaction, with short query helpers. It also notes what
    the commit hooks must hear: the channel events appended, and whether a channel conn was
    opened, moved, closed or deleted."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.appended_events: list[ChannelEvent] = []
        self.conns_changed = False

    def one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        return self.conn.execute(sql, args).fetchone()

    def all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self.conn.execute(sql, args).fetchall()

    def value(self, sql: str, *args: Any) -> Any:
        row = self.conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def run(self, sql: str, *args: Any) -> int:
        return self.conn.execute(sql, args).rowcount

    def insert(self, sql: str, *args: Any) -> int:
        return self.conn.execute(sql, args).lastrowid


class _Batch:
    """Write transactions of several requests that share one COMMIT (group commit)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests = 0
        self.events: list[ChannelEvent] = []
        self.conns_changed = False
        self.broken: BaseException | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def wait(self) -> None:
        """Until the batch is committed; raises if the COMMIT failed (then nothing of it was stored)."""
        self.done.wait()
        if self.error is not None:
            raise JatosError(503, f"The database could not store this request ({self.error}); nothing of it "
                                  "was saved. Please try again.")


class Store:
    """The SQLite database: WAL mode, synchronous=FULL, group commit for writes, a small
    connection pool for reads.

    Writers of this process take turns on one connection: each request's changes run in a
    SAVEPOINT inside a transaction that the last writer in the queue commits (or the one
    that finds the batch full or old), so one COMMIT and fsync serve every writer that
    queued meanwhile. A request is answered only after the COMMIT that contains its
    changes. The queue is a Python lock, not SQLite's busy handler, whose sleeps of up to
    100 ms would delay a waiting writer long after the lock is free. BEGIN IMMEDIATE still
    takes SQLite's lock, so several processes may share the file (the CLI while a server
    runs, or several servers).
    The pool, not one connection per thread, bounds memory and descriptors: a server has
    dozens of threads, and each connection keeps its own page cache,
    parsed schema and three open files.
    """

    MAX_CONNECTIONS = 64
    BATCH_MAX_REQUESTS = 100
    BATCH_MAX_SECONDS = 0.01

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._idle: list[sqlite3.Connection] = []
        self._opened: list[sqlite3.Connection] = []
        self._opened_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)
        self.on_commit: list[Callable[[list[ChannelEvent], bool], None]] = []
        self._write_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queued = 0  # writers waiting for the write lock or holding it
        self._batch: _Batch | None = None
        self._writer: sqlite3.Connection | None = None
        # ids of the events of the batch being committed, from before its COMMIT until the hooks have it
        self.committing_events: frozenset[int] = frozenset()
        self._local = threading.local()
        self._migrate()

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextlib.contextmanager
    def _borrowed(self) -> Iterator[sqlite3.Connection]:
        """A pooled connection for one transaction; the most recently used first (warm cache)."""
        with self._slots:
            with self._opened_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = self.connect()
                conn.execute("PRAGMA query_only=ON")  # reads only: every write goes through tx()
                with self._opened_lock:
                    self._opened.append(conn)
            try:
                yield conn
            finally:
                if conn.in_transaction:  # a failed COMMIT: never hand on an open transaction
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                with self._opened_lock:
                    self._idle.append(conn)

    def close(self) -> None:
        """Fold the write-ahead log back into the database file and close every connection, so
        that after a clean stop jatos.sqlite alone holds everything."""
        with self._opened_lock:
            opened, self._opened, self._idle = self._opened, [], []
        with self._write_lock:
            if self._writer is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                opened.append(self._writer)
                self._writer = None
        for conn in opened:
            conn.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[Db]:
        """A write transaction: committed before the block's caller goes on, also when the
        block raises CommittedError; rolled back on any other exception."""
        if getattr(self._local, "writing", False):
            raise RuntimeError("A write transaction inside another one would wait for itself")
        batch = self._join_batch()
        committed_error = None
        try:
            conn = self._writer
            conn.execute("SAVEPOINT request")
            db = Db(conn)
            try:
                yield db
            except CommittedError as error:
                committed_error = error
            except BaseException as error:
                self._roll_back_request(conn, batch, error)
                raise
            conn.execute("RELEASE request")
            batch.events += db.appended_events
            batch.conns_changed |= db.conns_changed
        finally:
            self._leave_batch(batch)
        batch.wait()
        if committed_error is not None:
            raise committed_error

    def _join_batch(self) -> _Batch:
        """Queue for the write lock; the first writer of a batch begins its transaction."""
        with self._queue_lock:
            self._queued += 1
        self._write_lock.acquire()
        self._local.writing = True
        if self._batch is None:
            try:
                if self._writer is None:
                    self._writer = self.connect()
                self._writer.execute("BEGIN IMMEDIATE")
            except BaseException:
                self._leave_queue()
                self._local.writing = False
                self._write_lock.release()
                raise
            self._batch = _Batch()
        return self._batch

    @staticmethod
    def _roll_back_request(conn: sqlite3.Connection, batch: _Batch, error: BaseException) -> None:
        try:
            conn.execute("ROLLBACK TO request")
            conn.execute("RELEASE request")
        except sqlite3.Error:  # SQLite rolled the whole transaction back itself (disk full, I/O error)
            batch.broken = error

    def _leave_batch(self, batch: _Batch) -> None:
        """Commit the batch if no writer is queued behind this one, or it is full or old."""
        batch.requests += 1
        try:
            if (self._leave_queue() or batch.requests >= self.BATCH_MAX_REQUESTS
                    or time.monotonic() - batch.started >= self.BATCH_MAX_SECONDS or batch.broken):
                self._batch = None
                self._commit(batch)
        finally:
            self._local.writing = False
            self._write_lock.release()

    def _leave_queue(self) -> bool:
        """Leave the writers' queue; True if it is empty now."""
        with self._queue_lock:
            self._queued -= 1
            return self._queued == 0

    def _commit(self, batch: _Batch) -> None:
        conn = self._writer
        try:
            if batch.broken is not None or not conn.in_transaction:
                raise sqlite3.OperationalError(f"the transaction was lost: {batch.broken}")
            self.committing_events = frozenset(event.id for event in batch.events)
            conn.execute("COMMIT")
        except BaseException as error:
            batch.error = error
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            log.error("A batch of %d write transactions failed: %s", batch.requests, error)
        else:
            self._announce(batch)
        finally:
            self.committing_events = frozenset()
            batch.done.set()

    def _announce(self, batch: _Batch) -> None:
        """Tell the commit hooks, in commit order (still under the write lock)."""
        for hook in self.on_commit:
            try:
                hook(batch.events, batch.conns_changed)
            except Exception:
                log.exception("A commit hook failed (the data is committed)")

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        """One read statement, outside a transaction: a single statement sees one consistent state."""
        with self._borrowed() as conn:
            return conn.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Db]:
        """A read transaction: one consistent view of the data, no write lock taken."""
        with self._borrowed() as conn:
            conn.execute("BEGIN")
            try:
                yield Db(conn)
            finally:
                conn.execute("COMMIT")

    def _migrate(self) -> None:
        conn = self.connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                conn.execute("ROLLBACK")
                raise RuntimeError(f"{self.path} was written by a newer jatos-lite (schema {version})")
            for index in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[index].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version={len(MIGRATIONS)}")
            conn.execute("COMMIT")
        finally:
            conn.close()


###############################################################################
# Study log
###############################################################################
# JATOS's audit log of a study (its StudyLogger): one JSON object a line, oldest first, each
# with a message and a timestamp; stored result data and uploaded files are logged with their
# SHA-256. Here an entry is a row, inserted in the transaction of the change it records. A
# study's log is keyed by the study's UUID; deleting the study retires the log (key
# <uuid>_<ms>, as JATOS renames the file), which stays in the database.

STUDY_LOG_USER = "Admin"  # the name of JATOS's admin user, the one user jatos-lite has
STUDY_LOG_CUT = "--- Log is cut here. Download it to get the whole file. ---"
RESULTS_EXPORTED = ("Exported results (files and/or data)",)
DATA_EXPORTED = ("Exported result data", "Exported result data to file")  # JATOS's plain-text export logs both


@functools.cache
def servers_mac() -> str:
    """This machine's MAC address as JATOS writes it in a log's first entry (01-23-45-67-89-AB)."""
    return "-".join(f"{byte:02X}" for byte in uuid.getnode().to_bytes(6, "big"))


def _insert_log_entry(db: Db, log_key: str, entry: dict[str, Any]) -> None:
    """JATOS writes its logs in ISO-8859-1 with '?' for other characters; escaping the rest
    keeps a line ASCII, the same bytes in either encoding."""
    latin1 = {key: value.encode("latin-1", "replace").decode("latin-1") if isinstance(value, str) else value
              for key, value in entry.items()}
    db.run("INSERT INTO study_log(log, entry) VALUES (?, ?)", log_key, json.dumps(latin1, separators=(",", ":")))


def log_study_event(db: Db, study_uuid: str, msg: str, by_user: bool = False, **fields: Any) -> None:
    """One entry in JATOS's key order: msg, the fields, userName if a researcher did it, timestamp."""
    user = {"userName": STUDY_LOG_USER} if by_user else {}
    _insert_log_entry(db, study_uuid, {"msg": msg, **fields, **user, "timestamp": now_ms()})


def log_description_hash(db: Db, study_uuid: str, description: str | None) -> None:
    # JATOS writes the hash as a string, and a missing one as "null"
    log_study_event(db, study_uuid, "Study description changed", by_user=True,
                    studyDescriptionHash=description_hash(description) or "null")


def start_study_log(db: Db, study_uuid: str, description: str | None) -> None:
    """A new study's log: JATOS's initial entry, 'Created study' and the description's hash."""
    _insert_log_entry(db, study_uuid, {"msg": "Initial entry", "timestamp": now_ms(), "studyUuid": study_uuid,
                                       "serversMac": servers_mac(), "hashFunction": "SHA-256"})
    log_study_event(db, study_uuid, "Created study", by_user=True)
    if description:
        log_description_hash(db, study_uuid, description)


def retire_study_log(db: Db, study_uuid: str) -> None:
    log_study_event(db, study_uuid, "Last entry of the study log", studyUuid=study_uuid)
    db.run("UPDATE study_log SET log = ? WHERE log = ?", f"{study_uuid}_{now_ms()}", study_uuid)


def log_for_studies(db: Db, study_uuids: Iterable[str], *messages: str) -> None:
    """The same researcher's entries in several studies' logs (result exports and deletions)."""
    for study_uuid in study_uuids:
        for msg in messages:
            log_study_event(db, study_uuid, msg, by_user=True)


def study_uuid_of(db: Db, study_id: int) -> str:
    return db.value("SELECT uuid FROM studies WHERE id = ?", study_id)


###############################################################################
# Study model: studies, components, batches, workers, study links
###############################################################################

WORKER_TYPE_LABELS = {"Jatos": "Jatos", "PersonalSingle": "Personal Single",
                      "PersonalMultiple": "Personal Multiple", "GeneralSingle": "General Single",
                      "GeneralMultiple": "General Multiple", "MT": "MTurk", "MTSandbox": "MTurk Sandbox"}
# The order JATOS's HashSet gives allowedWorkerTypes; tests.html compares it literally.
WORKER_TYPE_ORDER = ("PersonalSingle", "Jatos", "GeneralMultiple", "GeneralSingle", "PersonalMultiple", "MT")
WORKER_TYPE_ALIASES = {"jatos": "Jatos", "ja": "Jatos", "personalsingle": "PersonalSingle",
                       "ps": "PersonalSingle", "personalmultiple": "PersonalMultiple",
                       "pm": "PersonalMultiple", "generalsingle": "GeneralSingle", "gs": "GeneralSingle",
                       "generalmultiple": "GeneralMultiple", "gm": "GeneralMultiple", "mturk": "MT",
                       "mt": "MT", "mturksandbox": "MTSandbox", "mts": "MTSandbox"}
SINGLE_TYPES = ("PersonalSingle", "GeneralSingle")
OPEN_TYPES = ("GeneralSingle", "GeneralMultiple", "MT", "MTSandbox")  # links that make a new worker for anyone
MTURK_TYPES = ("MT", "MTSandbox")
JATOS_WORKER_ID = 1
ADMIN_USER = {"id": 1, "username": "admin"}
MAX_STUDY_CODES = 10_000  # personal study codes made by one request
API_TOKEN_SECONDS = 3600  # JATOS's jatos.api.tokens.apiGeneration.expiresAfter
MAX_TOKEN_SECONDS = 100 * 365 * 86400  # the longest lifetime a token may be given (0: never expires)
SIGN_IN_TOKEN_NAME = "sign-in link"  # the token of the printed admin link, a new one at every start
RESERVED_DIR_NAMES = {"jatos", "publix", "public", "assets", "study_assets_root", "study_assets"}
_HTML_FILE_PATH = re.compile(r"^[\w\d_-][\w\d/_-]*\.[\w\d_-]+$", re.ASCII)
_HTML_MARKUP = re.compile(r"<\s*/?\s*[A-Za-z!][^>]*>")


def ordered_worker_types(types: Iterable[str]) -> list[str]:
    present = set(types)
    return [t for t in WORKER_TYPE_ORDER if t in present]


def worker_type_from_alias(text: str) -> str:
    found = WORKER_TYPE_ALIASES.get(str(text).strip().lower())
    if found is None:
        raise JatosError(400, f"Unknown worker type: {text}")
    return found


def _invalid(what: str, key: str, reason: str) -> JatosError:
    return JatosError(400, f"{what} is invalid: Error in field '{key}' - {reason}", "VALIDATION_ERROR")


def _check_text(what: str, key: str, value: Any, required: bool = False, max_length: int | None = MAX_TEXT_LENGTH) -> None:
    if value is None:
        if required:
            raise _invalid(what, key, "missing")
        return
    if not isinstance(value, str):
        raise _invalid(what, key, "must be a string")
    if required and not value.strip():
        raise _invalid(what, key, "must not be blank")
    if max_length is not None and java_length(value) > max_length:
        raise _invalid(what, key, f"longer than {max_length} characters")
    if _HTML_MARKUP.search(value):
        raise _invalid(what, key, "no HTML allowed")


def _check_bool(what: str, key: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise _invalid(what, key, "must be true or false")


def validate_dir_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise _invalid("Study", "dirName", "missing")
    if java_length(name) > MAX_TEXT_LENGTH or not is_portable_name(name) or name.lower() in RESERVED_DIR_NAMES:
        raise _invalid("Study", "dirName", f"'{name}' is not a valid folder name")
    return name


def study_fields(data: dict) -> dict:
    """The study columns from a JATOS study object (archive `data` or API body), validated."""
    for key in ("title", "description", "comments", "endRedirectUrl"):
        _check_text("Study", key, data.get(key), required=(key == "title"),
                    max_length=MAX_TEXT_LENGTH if key == "title" else None)
    _check_text("Study", "studyEntryMsg", data.get("studyEntryMsg"), max_length=None)
    if len((data.get("studyEntryMsg") or "").encode("utf-8")) > 1000:
        raise _invalid("Study", "studyEntryMsg", "longer than 1000 bytes")
    for key in ("groupStudy", "linearStudy", "allowPreview", "active"):
        _check_bool("Study", key, data.get(key))
    study_input = data["studyInput"] if data.get("studyInput") is not None else data.get("jsonData")
    return {
        "title": data["title"],
        "description": data.get("description"),
        "comments": data.get("comments"),
        "study_input": minify_json_text(study_input, "studyInput"),
        "end_redirect_url": data.get("endRedirectUrl"),
        "study_entry_msg": data.get("studyEntryMsg"),
        "group_study": bool(data.get("groupStudy") or False),
        "linear_study": bool(data.get("linearStudy") or False),
        "allow_preview": bool(data.get("allowPreview") or False),
    }


def component_fields(data: dict) -> dict:
    for key in ("title", "comments"):
        _check_text("Component", key, data.get(key), required=(key == "title"),
                    max_length=MAX_TEXT_LENGTH if key == "title" else None)
    path = data.get("htmlFilePath")
    if path not in (None, ""):
        if not isinstance(path, str) or len(path) > MAX_TEXT_LENGTH or not _HTML_FILE_PATH.match(path):
            raise _invalid("Component", "htmlFilePath", f"'{path}' is not a valid HTML file path")
    for key in ("reloadable", "active"):
        _check_bool("Component", key, data.get(key))
    component_input = data["componentInput"] if data.get("componentInput") is not None else data.get("jsonData")
    return {
        "title": data["title"],
        "html_file_path": path or None,
        "reloadable": bool(data.get("reloadable") or False),
        "active": data.get("active") is not False,
        "comments": data.get("comments"),
        "component_input": minify_json_text(component_input, "componentInput"),
    }


def _check_limit(key: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _invalid("Batch", key, "must be empty or a number of at least 1")


def batch_fields(data: dict) -> dict:
    for key in ("title", "comments"):
        _check_text("Batch", key, data.get(key), required=(key == "title"),
                    max_length=MAX_TEXT_LENGTH if key == "title" else None)
    _check_bool("Batch", "active", data.get("active"))
    for key in ("maxActiveMembers", "maxTotalMembers", "maxTotalWorkers"):
        _check_limit(key, data.get(key))
    if (data.get("maxActiveMembers") and data.get("maxTotalMembers")
            and data["maxTotalMembers"] < data["maxActiveMembers"]):
        raise _invalid("Batch", "maxTotalMembers", "must not be smaller than maxActiveMembers")
    types = data.get("allowedWorkerTypes") or []
    if not isinstance(types, list):
        raise _invalid("Batch", "allowedWorkerTypes", "must be a list")
    allowed = []
    for name in types:
        found = WORKER_TYPE_ALIASES.get(str(name).lower())
        if found is None or found == "MTSandbox" or str(name) == "MTSandbox":
            raise _invalid("Batch", "allowedWorkerTypes", f"unknown worker type '{name}'")
        allowed.append(found)
    batch_input = data["batchInput"] if data.get("batchInput") is not None else data.get("jsonData")
    return {
        "title": data["title"],
        "active": data.get("active") is not False,
        "max_active_members": data.get("maxActiveMembers"),
        "max_total_members": data.get("maxTotalMembers"),
        "max_total_workers": data.get("maxTotalWorkers"),
        "allowed_worker_types": to_json(ordered_worker_types(allowed)),
        "comments": data.get("comments"),
        "batch_input": minify_json_text(batch_input, "batchInput"),
    }


def _insert_row(db: Db, table: str, fields: dict) -> int:
    names = ", ".join(fields)
    marks = ", ".join("?" for _ in fields)
    return db.insert(f"INSERT INTO {table} ({names}) VALUES ({marks})", *fields.values())


def _update_row(db: Db, table: str, row_id: int, fields: dict) -> None:
    if fields:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        db.run(f"UPDATE {table} SET {assignments} WHERE id = ?", *fields.values(), row_id)


def insert_study(db: Db, fields: dict, uuid_: str, dir_name: str, active: bool = True) -> int:
    study_id = _insert_row(db, "studies", {**fields, "uuid": uuid_, "dir_name": dir_name,
                                           "active": active, "created": now_ms()})
    start_study_log(db, uuid_, fields["description"])
    return study_id


def insert_component(db: Db, study_id: int, fields: dict, uuid_: str | None = None) -> int:
    position = (db.value("SELECT MAX(position) FROM components WHERE study_id = ?", study_id) or 0) + 1
    return _insert_row(db, "components", {**fields, "study_id": study_id, "uuid": uuid_ or new_uuid(),
                                          "position": position})


def insert_batch(db: Db, study_id: int, fields: dict, uuid_: str | None = None) -> int:
    position = (db.value("SELECT MAX(position) FROM batches WHERE study_id = ?", study_id) or 0) + 1
    batch_id = _insert_row(db, "batches", {**fields, "study_id": study_id, "uuid": uuid_ or new_uuid(),
                                           "position": position})
    db.run("INSERT INTO batch_workers(batch_id, worker_id) VALUES (?, ?)", batch_id, JATOS_WORKER_ID)
    return batch_id


def add_batch(db: Db, study_id: int, fields: dict) -> int:
    """A researcher's new batch (POST /studies/{id}/batches); a study's first batches are not logged."""
    batch_id = insert_batch(db, study_id, fields)
    log_study_event(db, study_uuid_of(db, study_id), "Created batch", by_user=True, batchId=batch_id)
    return batch_id


DEFAULT_BATCH = {"title": "Default", "allowedWorkerTypes": ["PersonalSingle", "PersonalMultiple"]}

# The keys the API accepts in study, component and batch bodies (strict: others are refused).
STUDY_KEYS = {"title", "description", "active", "groupStudy", "linearStudy", "allowPreview", "dirName", "comments",
              "studyInput", "jsonData", "endRedirectUrl", "studyEntryMsg"}
COMPONENT_KEYS = {"title", "htmlFilePath", "reloadable", "active", "comments", "componentInput", "jsonData"}
BATCH_KEYS = {"title", "active", "maxActiveMembers", "maxTotalMembers", "maxTotalWorkers", "allowedWorkerTypes",
              "comments", "batchInput", "jsonData"}


def strict_body(body: Any, keys: set[str], what: str) -> dict:
    """A request body that must be a JSON object with only the given keys."""
    if not isinstance(body, dict):
        raise JatosError(400, f"The {what} must be a JSON object", "INVALID_JSON")
    unknown = set(body) - keys
    if unknown:
        raise JatosError(400, f"Unknown field '{sorted(unknown)[0]}'", "INVALID_JSON")
    return body


def _merged(current: dict, changes: dict, input_key: str) -> dict:
    """A stored object with a partial update applied; the legacy `jsonData` name counts as the input."""
    merged = {**current, **changes}
    if "jsonData" in changes and input_key not in changes:
        merged[input_key] = changes["jsonData"]
    merged.pop("jsonData", None)
    return merged


def log_description_change(db: Db, study: sqlite3.Row, description: str | None) -> None:
    if (description or None) != (study["description"] or None):
        log_description_hash(db, study["uuid"], description)


def update_study(db: Db, studies_root: Path, study: sqlite3.Row, changes: dict) -> None:
    """PATCH /studies/{id}/properties: validated like a new study; a new dirName renames the folder."""
    current = {**study_object(db, study), "studyInput": study["study_input"]}
    merged = _merged(current, changes, "studyInput")
    fields = {**study_fields(merged), "active": merged["active"] is not False}
    dir_name = validate_dir_name(merged["dirName"])
    if dir_name != study["dir_name"]:
        if _dir_taken(db, studies_root, dir_name, except_study=study["id"]) or (studies_root / dir_name).exists():
            raise JatosError(403, f"A study assets folder '{dir_name}' exists already.")
        try:
            (studies_root / study["dir_name"]).rename(studies_root / dir_name)
        except FileNotFoundError:
            (studies_root / dir_name).mkdir(parents=True)
        except OSError as exc:
            raise JatosError(409, f"Couldn't rename the study assets folder: {exc.strerror}")
        fields["dir_name"] = dir_name
    _update_row(db, "studies", study["id"], fields)
    log_description_change(db, study, fields["description"])


def update_component(db: Db, studies_root: Path, component: sqlite3.Row, changes: dict, rename_file: bool) -> None:
    """PATCH /components/{id}; `htmlFileRename` moves the HTML file along with the new path."""
    current = {**component_object(component), "componentInput": component["component_input"]}
    fields = component_fields(_merged(current, changes, "componentInput"))
    old, new = component["html_file_path"], fields["html_file_path"]
    if rename_file and old and new and old != new:
        folder = studies_root / db.value("SELECT dir_name FROM studies WHERE id = ?", component["study_id"])
        source, target = confined_path(folder, old), confined_path(folder, new)
        if source is None or target is None or not source.is_file() or target.exists():
            raise JatosError(400, f"Couldn't rename {old} to {new}: no such file, or the new name is taken.")
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
    _update_row(db, "components", component["id"], fields)


def patch_component(db: Db, studies_root: Path, component: sqlite3.Row, body: Any) -> None:
    """PATCH /components/{id}: the component keys, plus `htmlFileRename` and (jatos-lite) `position`."""
    body = strict_body(body, COMPONENT_KEYS | {"htmlFileRename", "position"}, "component")
    changes = {key: value for key, value in body.items() if key not in ("htmlFileRename", "position")}
    update_component(db, studies_root, component, changes, body.get("htmlFileRename") is True)
    if "position" in body:
        move_to_position(db, "components", component, body["position"])


def move_to_position(db: Db, table: str, row: sqlite3.Row, position: Any) -> None:
    """Put a component or batch at `position` (1-based) among its study's, shifting the others."""
    siblings = [r["id"] for r in db.all(f"SELECT id FROM {table} WHERE study_id = ? ORDER BY position",
                                         row["study_id"])]
    if isinstance(position, bool) or not isinstance(position, int) or not 1 <= position <= len(siblings):
        raise JatosError(400, f"Position must be a number from 1 to {len(siblings)}")
    siblings.remove(row["id"])
    siblings.insert(position - 1, row["id"])
    renumber(db, table, siblings)


def renumber(db: Db, table: str, ids: list[int]) -> None:
    for position, row_id in enumerate(ids, start=1):
        db.run(f"UPDATE {table} SET position = ? WHERE id = ?", position, row_id)


def update_batch(db: Db, batch: sqlite3.Row, changes: dict) -> None:
    current = {**batch_object(batch), "batchInput": batch["batch_input"]}
    _update_row(db, "batches", batch["id"], batch_fields(_merged(current, changes, "batchInput")))


def find_row(db: Db, table: str, noun: str, key: Any, names: tuple[str, ...] = ("uuid",),
             belongs: Callable[[sqlite3.Row], bool] = lambda row: True, within: str = "") -> sqlite3.Row:
    """A row by numeric ID or by one of its `names` columns (the API accepts either), else 404.
    A row that does not `belong` (e.g. to the study asked about) is not found either."""
    text = str(key).strip()
    number = parse_id(text)
    if number is not None:
        row = db.one(f"SELECT * FROM {table} WHERE id = ?", number)
    else:
        row = db.one(f"SELECT * FROM {table} WHERE " + " OR ".join(f"{name} = ?" for name in names),
                     *[text] * len(names)) if names else None
    if row is None or not belongs(row):
        raise JatosError(404, f"{noun} {text} doesn't exist{within}.")
    return row


def find_study(db: Db, key: Any) -> sqlite3.Row:
    return find_row(db, "studies", "Study", key, ("uuid", "dir_name"))


def find_batch(db: Db, key: Any, study_id: int | None = None) -> sqlite3.Row:
    if study_id is None:
        return find_row(db, "batches", "Batch", key)
    return find_row(db, "batches", "Batch", key, belongs=lambda row: row["study_id"] == study_id,
                    within=" in this study")


def find_component(db: Db, key: Any) -> sqlite3.Row:
    return find_row(db, "components", "Component", key)


def default_batch(db: Db, study_id: int) -> sqlite3.Row:
    return db.one("SELECT * FROM batches WHERE study_id = ? ORDER BY position LIMIT 1", study_id)


def components_of(db: Db, study_id: int) -> list[sqlite3.Row]:
    return db.all("SELECT * FROM components WHERE study_id = ? ORDER BY position", study_id)


def batches_of(db: Db, study_id: int) -> list[sqlite3.Row]:
    return db.all("SELECT * FROM batches WHERE study_id = ? ORDER BY position", study_id)


def dir_owner(db: Db, name: str) -> int | None:
    """The study whose assets folder is `name`."""
    return db.value("SELECT id FROM studies WHERE dir_name = ?", name)


def _dir_taken(db: Db, studies_root: Path, name: str, except_study: int | None = None) -> bool:
    """Whether a study other than `except_study` has the folder name, or, when no study is
    excepted (a new one), a folder of that name exists."""
    owner = dir_owner(db, name)
    if owner is not None:
        return owner != except_study
    return (studies_root / name).exists() and except_study is None


def free_dir_name(db: Db, studies_root: Path, wanted: str) -> str:
    """`wanted`, or `wanted_2`, `wanted_3`, ... whichever is neither a folder nor a study's."""
    if not _dir_taken(db, studies_root, wanted):
        return wanted
    n = 2
    while _dir_taken(db, studies_root, f"{wanted}_{n}"):
        n += 1
    return f"{wanted}_{n}"


def create_study(db: Db, studies_root: Path, body: dict, rename_assets: bool) -> int:
    """A new study from its JSON properties, with a default batch and an empty assets folder.
    jatos-lite: a folder in studies/ that no study uses yet becomes the new study's assets."""
    study_uuid = new_uuid()
    fields = study_fields(body)
    dir_name = validate_dir_name(body.get("dirName") or study_uuid)
    if dir_owner(db, dir_name) is not None:
        if not rename_assets:
            raise JatosError(403, f"A study assets folder '{dir_name}' exists already.")
        dir_name = free_dir_name(db, studies_root, dir_name)
    study_id = insert_study(db, fields, study_uuid, dir_name, active=body.get("active") is not False)
    insert_batch(db, study_id, batch_fields(DEFAULT_BATCH))
    (studies_root / dir_name).mkdir(parents=True, exist_ok=True)
    return study_id


def new_study_code(db: Db) -> str:
    """11 alphanumeric characters from `secrets` (62^11, about 65 bits)."""
    while True:
        code = random_alnum(11)
        if db.value("SELECT 1 FROM study_links WHERE code = ?", code) is None:
            return code


def _insert_link(db: Db, batch_id: int, worker_type: str, worker_id: int | None) -> str:
    code = new_study_code(db)
    db.run("INSERT INTO study_links(code, batch_id, worker_type, worker_id, created) VALUES (?, ?, ?, ?, ?)",
           code, batch_id, worker_type, worker_id, now_ms())
    return code


def add_worker(db: Db, worker_type: str, batch_id: int, comment: str | None = None,
               mturk_worker_id: str | None = None) -> int:
    worker_id = db.insert("INSERT INTO workers(type, comment, mturk_worker_id) VALUES (?, ?, ?)",
                          worker_type, comment, mturk_worker_id)
    db.run("INSERT OR IGNORE INTO batch_workers(batch_id, worker_id) VALUES (?, ?)", batch_id, worker_id)
    return worker_id


def study_links_for(db: Db, batch: sqlite3.Row, worker_type: str, amount: int = 1,
                    comment: str | None = None) -> list[str]:
    """Study codes as JATOS hands them out: new personal workers with a link each, or the one
    shared link of a general/MTurk type (created on first use)."""
    if comment is not None and not isinstance(comment, str):
        raise JatosError(400, "Parameter 'comment' must be text")
    if worker_type in ("PersonalSingle", "PersonalMultiple"):
        if not 1 <= amount <= MAX_STUDY_CODES:
            raise JatosError(400, f"amount must be between 1 and {MAX_STUDY_CODES}")
        return [_insert_link(db, batch["id"], worker_type, add_worker(db, worker_type, batch["id"], comment))
                for _ in range(amount)]
    if worker_type in ("GeneralSingle", "GeneralMultiple", "MT"):
        code = db.value("SELECT code FROM study_links WHERE batch_id = ? AND worker_type = ? "
                        "ORDER BY created LIMIT 1", batch["id"], worker_type)
        return [code or _insert_link(db, batch["id"], worker_type, None)]
    if worker_type == "Jatos":
        return [jatos_link(db, batch)]
    raise JatosError(400, f"Study codes of type {worker_type} cannot be generated")


def jatos_link(db: Db, batch: sqlite3.Row) -> str:
    code = db.value("SELECT code FROM study_links WHERE batch_id = ? AND worker_type = 'Jatos'", batch["id"])
    return code or _insert_link(db, batch["id"], "Jatos", JATOS_WORKER_ID)


def study_code_object(db: Db, code: str) -> dict:
    link = db.one("SELECT l.*, w.comment FROM study_links l LEFT JOIN workers w ON w.id = l.worker_id "
                  "WHERE l.code = ?", code)
    if link is None:
        raise JatosError(404, f"Study code {code} doesn't exist.")
    return {"studyCode": code, "batchId": link["batch_id"], "type": link["worker_type"],
            "comment": link["comment"], "active": bool(link["active"]),
            "studyLinkPath": f"/publix/{code}", "studyEntryPath": f"/publix/run?code={code}"}


def set_study_code_active(db: Db, code: str, active: bool) -> None:
    if not db.run("UPDATE study_links SET active = ? WHERE code = ?", active, code):
        raise JatosError(404, f"Study code {code} doesn't exist.")


def study_links_of(db: Db, study_id: int) -> list[dict]:
    """Every study link of a study (the JATOS GUI's study links page)."""
    rows = db.all("SELECT l.*, w.comment FROM study_links l JOIN batches b ON b.id = l.batch_id "
                  "LEFT JOIN workers w ON w.id = l.worker_id WHERE b.study_id = ? "
                  "ORDER BY b.position, l.created, l.rowid", study_id)  # rowid: in the order made
    return [{"code": r["code"], "type": r["worker_type"], "batchId": r["batch_id"], "comment": r["comment"],
             "active": bool(r["active"]), "workerId": r["worker_id"]} for r in rows]


def component_object(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "uuid": row["uuid"], "title": row["title"], "htmlFilePath": row["html_file_path"],
            "reloadable": bool(row["reloadable"]), "active": bool(row["active"]), "comments": row["comments"],
            "componentInput": parse_json_text(row["component_input"])}


def batch_object(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "uuid": row["uuid"], "title": row["title"], "active": bool(row["active"]),
            "maxActiveMembers": row["max_active_members"], "maxTotalMembers": row["max_total_members"],
            "maxTotalWorkers": row["max_total_workers"],
            "allowedWorkerTypes": json.loads(row["allowed_worker_types"]), "comments": row["comments"],
            "batchInput": parse_json_text(row["batch_input"])}


def study_object(db: Db, row: sqlite3.Row, with_components: bool = False, with_batches: bool = False) -> dict:
    """A study as the JATOS API shows it (formats-and-api.md §3.5.1)."""
    components = components_of(db, row["id"])
    batches = batches_of(db, row["id"])
    return {
        "id": row["id"], "uuid": row["uuid"], "title": row["title"], "description": row["description"],
        "descriptionHash": description_hash(row["description"]), "locked": bool(row["locked"]),
        "active": bool(row["active"]), "groupStudy": bool(row["group_study"]),
        "linearStudy": bool(row["linear_study"]), "allowPreview": bool(row["allow_preview"]),
        "dirName": row["dir_name"], "comments": row["comments"],
        "studyInput": parse_json_text(row["study_input"]), "endRedirectUrl": row["end_redirect_url"],
        "studyEntryMsg": row["study_entry_msg"],
        "components": [component_object(c) if with_components else {"id": c["id"], "uuid": c["uuid"]}
                       for c in components],
        "batches": [batch_object(b) if with_batches else {"id": b["id"], "uuid": b["uuid"]} for b in batches],
        "members": [ADMIN_USER],
    }


###############################################################################
# Sign-in and tokens
###############################################################################
# API tokens in JATOS's format, of which only the SHA-256 is stored, and the admin page's
# sessions: a signed-in browser holds a random secret in an HttpOnly cookie, and a change
# it asks for must also carry the session's CSRF token in a header.

ADMIN_SESSION_SECONDS = 7 * 86400


@dataclasses.dataclass
class AdminSession:
    """A signed-in researcher (admin page session): what JATOS keeps in its Play session."""

    token_hash: str
    csrf_token: str
    jatos_run: str | None = None
    run_component_uuid: str | None = None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def mint_api_token(db: Db, name: str, expires_after: int | None = None) -> tuple[int, str]:
    """A new token in JATOS's format: 'jap_' + 31 random characters + 6-character MD5 checksum.
    Only its SHA-256 is stored; the plain token is returned once."""
    body = random_alnum(31)
    token = f"jap_{body}{hashlib.md5(body.encode()).hexdigest()[:6]}"
    token_id = db.insert("INSERT INTO api_tokens(name, token_hash, creation_date, expires_after) VALUES (?, ?, ?, ?)",
                         name, hash_secret(token), now_ms(), expires_after)
    return token_id, token


def token_metadata(row: sqlite3.Row | dict) -> dict:
    created, expires_after = row["creation_date"], row["expires_after"]
    expiration = created + expires_after * 1000 if expires_after and expires_after > 0 else 0
    return {"id": row["id"], "name": row["name"], "creationDate": created, "expiresAfter": expires_after,
            "expirationDate": expiration, "isExpired": bool(expiration and expiration < now_ms()),
            "active": bool(row["active"]), "username": ADMIN_USER["username"], "userId": ADMIN_USER["id"],
            "roles": ["USER", "ADMIN"]}


def _caller(name: str) -> dict:
    return token_metadata({"id": 0, "name": name, "creation_date": 0, "expires_after": None, "active": True})


SESSION_CALLER = _caller("admin session")  # what an API call made with the admin page's session is


def check_api_token(db: Db, config: Config, token: str) -> dict | None:
    """The token's metadata if it is valid and active (the fixed --api-token counts too)."""
    if config.api_token and hmac.compare_digest(token.encode(), config.api_token.encode()):
        return _caller("--api-token")
    if not token.startswith("jap_") or len(token) != 41:
        return None
    body, checksum = token[4:35], token[35:]
    if not hmac.compare_digest(hashlib.md5(body.encode()).hexdigest()[:6], checksum):
        return None
    row = _live_token(db, hash_secret(token))
    return None if row is None else token_metadata(row)


def _live_token(db: Db, token_hash: str) -> sqlite3.Row | None:
    """The stored token with this hash if it is active and not expired."""
    row = db.one("SELECT * FROM api_tokens WHERE token_hash = ?", token_hash)
    return None if row is None or not row["active"] or token_metadata(row)["isExpired"] else row


def find_token(db: Db, token_id: str) -> sqlite3.Row:
    """A token made for scripts (the sign-in link's token is not one), else 404."""
    return find_row(db, "api_tokens", "Token", token_id, names=(),
                    belongs=lambda row: row["name"] != SIGN_IN_TOKEN_NAME)


def list_api_tokens(db: Db) -> list[dict]:
    return [token_metadata(row) for row in
            db.all("SELECT * FROM api_tokens WHERE name <> ? ORDER BY id", SIGN_IN_TOKEN_NAME)]


def create_api_token(db: Db, name: Any, expires_after: Any) -> dict:
    """A named token's metadata with the token itself, which is shown only this once."""
    if not isinstance(name, str) or not name.strip() or name == SIGN_IN_TOKEN_NAME:
        raise JatosError(400, "A token needs a 'name'", "INVALID_REQUEST")
    if not isinstance(expires_after, int) or isinstance(expires_after, bool) \
            or not 0 <= expires_after <= MAX_TOKEN_SECONDS:
        raise JatosError(400, f"'expiresAfter' is a number of seconds up to {MAX_TOKEN_SECONDS} (0: never)",
                         "INVALID_REQUEST")
    token_id, secret = mint_api_token(db, name.strip(), expires_after or None)
    return {**token_metadata(db.one("SELECT * FROM api_tokens WHERE id = ?", token_id)), "token": secret}


def set_token_active(db: Db, token_id: str, active: bool) -> int:
    row = find_token(db, token_id)
    db.run("UPDATE api_tokens SET active = ? WHERE id = ?", active, row["id"])
    return row["id"]


def delete_api_token(db: Db, token_id: str) -> None:
    db.run("DELETE FROM api_tokens WHERE id = ?", find_token(db, token_id)["id"])


def new_sign_in_token(db: Db) -> str:
    """A token for this server start's sign-in link, valid for ADMIN_SESSION_SECONDS. Earlier
    ones keep working until they expire: another server on the same data folder may have
    printed them (expired ones are cleared away here)."""
    db.run("DELETE FROM api_tokens WHERE name = ? AND expires_after > 0 AND creation_date + expires_after * 1000 < ?",
           SIGN_IN_TOKEN_NAME, now_ms())
    return mint_api_token(db, SIGN_IN_TOKEN_NAME, ADMIN_SESSION_SECONDS)[1]


def open_admin_session(db: Db, sign_in_token: str) -> str:
    """A new admin session made with a valid `sign_in_token`; returns the secret its browser keeps
    in the session cookie. Expired sessions are cleared away."""
    db.run("DELETE FROM admin_sessions WHERE created <= ?", now_ms() - ADMIN_SESSION_SECONDS * 1000)
    secret = secrets.token_urlsafe(32)
    db.run("INSERT INTO admin_sessions(token_hash, csrf_token, created, sign_in_token) VALUES (?, ?, ?, ?)",
           hash_secret(secret), secrets.token_urlsafe(24), now_ms(), hash_secret(sign_in_token))
    return secret


def admin_session_of(db: Db, config: Config, secret: str | None) -> AdminSession | None:
    """The session of this cookie secret while it lasts: ADMIN_SESSION_SECONDS from sign-in, and
    only as long as its sign-in token is valid (deactivating, deleting or letting it expire ends it)."""
    if not secret:
        return None
    row = db.one("SELECT * FROM admin_sessions WHERE token_hash = ? AND created > ?", hash_secret(secret),
                 now_ms() - ADMIN_SESSION_SECONDS * 1000)
    if row is None or not _sign_in_token_valid(db, config, row["sign_in_token"]):
        return None
    return AdminSession(row["token_hash"], row["csrf_token"], row["jatos_run"], row["run_component_uuid"])


def _sign_in_token_valid(db: Db, config: Config, token_hash: str) -> bool:
    if config.api_token and hmac.compare_digest(token_hash, hash_secret(config.api_token)):
        return True
    return _live_token(db, token_hash) is not None


def end_admin_session(db: Db, session: AdminSession) -> None:
    db.run("DELETE FROM admin_sessions WHERE token_hash = ?", session.token_hash)


def csrf_matches(session: AdminSession, header: str) -> bool:
    return hmac.compare_digest(header, session.csrf_token)


def start_test_run(db: Db, session: AdminSession, component_uuid: str | None) -> None:
    """Remember in the session that its browser's next Jatos-worker run is a researcher's test
    run of the whole study, or of one component."""
    db.run("UPDATE admin_sessions SET jatos_run = ?, run_component_uuid = ? WHERE token_hash = ?",
           "RUN_COMPONENT_START" if component_uuid else "RUN_STUDY", component_uuid, session.token_hash)


###############################################################################
# Groups and the channel event log
###############################################################################
# Every change a channel must hear about is appended to channel_events inside the
# transaction that made it; the global event id is the cursor pages poll with
# (channels.md §7). A "conn" is one page's batch or group channel.

GROUP_CLEANER_MESSAGE = "Inactive group member was forced to leave its group."


def batch_scope(batch_id: int) -> str:
    return f"b:{batch_id}"


def group_scope(group_id: int) -> str:
    return f"g:{group_id}"


def last_event_id(db: Db) -> int:
    """The highest event id ever handed out (ids are never reused, even after pruning)."""
    return db.value("SELECT seq FROM sqlite_sequence WHERE name = 'channel_events'") or 0


def append_event(db: Db, scope: str, message: dict, recipient: str | None = None,
                 exclude: str | None = None) -> int:
    payload = to_json(message)
    event_id = db.insert("INSERT INTO channel_events(scope, recipient, exclude, payload, created) "
                         "VALUES (?, ?, ?, ?, ?)", scope, recipient, exclude, payload, time.time())
    db.appended_events.append(ChannelEvent(event_id, scope, recipient, exclude, message, len(payload)))
    return event_id


def open_conn(db: Db, sr_id: int, kind: str) -> sqlite3.Row | None:
    return db.one("SELECT * FROM channel_conns WHERE study_result_id = ? AND kind = ? AND state = 'open'", sr_id, kind)


def conn_scope(db: Db, conn_id: str) -> str | None:
    return db.value("SELECT scope FROM channel_conn_scopes WHERE conn = ? AND to_id IS NULL", conn_id)


def _end_conn_scope(db: Db, conn_id: str) -> None:
    db.conns_changed = True
    db.run("UPDATE channel_conn_scopes SET to_id = ? WHERE conn = ? AND to_id IS NULL", last_event_id(db), conn_id)


def listen(db: Db, conn_id: str, scope: str) -> None:
    """From now on the conn receives the events of `scope` (and none before)."""
    db.conns_changed = True
    db.run("INSERT INTO channel_conn_scopes(conn, scope, from_id) VALUES (?, ?, ?)", conn_id, scope,
           last_event_id(db))


def group_row(db: Db, group_id: int) -> sqlite3.Row:
    return db.one("SELECT * FROM group_results WHERE id = ?", group_id)


def find_group(db: Db, group_id: str) -> sqlite3.Row:
    return find_row(db, "group_results", "Group", group_id, names=())


def group_message(db: Db, group: sqlite3.Row, action: str | None, member_id: int | None = None,
                  with_session: bool = False) -> dict:
    """A group action message (channels.md §2.3) with members and channels as they are now."""
    members = [str(r[0]) for r in db.all("SELECT id FROM study_results WHERE group_result_id = ? ORDER BY id",
                                         group["id"])]
    channels = [str(r[0]) for r in db.all(
        "SELECT c.study_result_id FROM channel_conns c JOIN channel_conn_scopes s ON s.conn = c.id "
        "WHERE s.scope = ? AND s.to_id IS NULL AND c.state = 'open' ORDER BY c.study_result_id",
        group_scope(group["id"]))]
    message: dict[str, Any] = {} if action is None else {"action": action}
    if member_id is not None:
        message["memberId"] = str(member_id)
    message.update({"groupResultId": str(group["id"]), "groupState": group["state"], "members": members,
                    "channels": channels, "sessionVersion": group["session_version"]})
    if with_session:
        message["sessionData"] = json.loads(group["session_data"] or "{}")
    return message


def close_conn(db: Db, conn: sqlite3.Row, reason: str, terminate: bool) -> None:
    """Close a conn in the one safe order: termination message to it (when the server closes
    it), mark it closed, stop its scope, then tell the other group members."""
    scope = conn_scope(db, conn["id"])
    if terminate and scope is not None:
        append_event(db, scope, {"action": "CLOSED"}, recipient=conn["id"])
    db.run("UPDATE channel_conns SET state = 'closed', close_reason = ?, closed_at = ? WHERE id = ?",
           reason, time.time(), conn["id"])
    db.conns_changed = True
    _end_conn_scope(db, conn["id"])
    if conn["kind"] == "group" and scope is not None:
        group = group_row(db, int(scope[2:]))
        append_event(db, scope, group_message(db, group, "CLOSED", conn["study_result_id"]))


def group_candidate(db: Db, batch: sqlite3.Row, except_group: int | None = None) -> sqlite3.Row | None:
    """The open group a newcomer joins: the fullest STARTED group with room, oldest first."""
    return db.one(
        "SELECT * FROM group_results WHERE batch_id = ? AND state = 'STARTED' AND id IS NOT ? "
        "AND (? IS NULL OR active_member_count < ?) "
        "AND (? IS NULL OR active_member_count + history_member_count < ?) "
        "ORDER BY active_member_count DESC, history_member_count DESC, id LIMIT 1",
        batch["id"], except_group, batch["max_active_members"], batch["max_active_members"],
        batch["max_total_members"], batch["max_total_members"])


def _finish_group_if_done(db: Db, group_id: int, batch: sqlite3.Row) -> None:
    group = group_row(db, group_id)
    if (group["active_member_count"] == 0 and batch["max_total_members"] is not None
            and group["history_member_count"] >= batch["max_total_members"]):
        db.run("UPDATE group_results SET state = 'FINISHED', end_date = ?, session_data = NULL WHERE id = ?",
               now_ms(), group_id)


def join_group(db: Db, sr: sqlite3.Row, batch: sqlite3.Row) -> sqlite3.Row:
    """Make the run an active member of a group (choosing or creating it) and tell the group."""
    group = group_candidate(db, batch)
    if group is None:
        group_id = db.insert("INSERT INTO group_results(batch_id, state, start_date) VALUES (?, 'STARTED', ?)",
                             batch["id"], now_ms())
    else:
        group_id = group["id"]
    db.run("UPDATE group_results SET active_member_count = active_member_count + 1 WHERE id = ?", group_id)
    db.run("UPDATE study_results SET group_result_id = ? WHERE id = ?", group_id, sr["id"])
    group = group_row(db, group_id)
    append_event(db, group_scope(group_id), group_message(db, group, "JOINED", sr["id"]))
    return group


def leave_group(db: Db, sr: sqlite3.Row) -> None:
    """The run leaves its group for good (leave, end, abort, eviction, cleaner)."""
    group_id = db.value("SELECT group_result_id FROM study_results WHERE id = ?", sr["id"])
    if group_id is None:
        return
    batch = db.one("SELECT * FROM batches WHERE id = ?", sr["batch_id"])
    db.run("UPDATE study_results SET group_result_id = NULL, history_group_result_id = ? WHERE id = ?",
           group_id, sr["id"])
    db.run("UPDATE group_results SET active_member_count = active_member_count - 1, "
           "history_member_count = history_member_count + 1 WHERE id = ?", group_id)
    _finish_group_if_done(db, group_id, batch)
    conn = open_conn(db, sr["id"], "group")
    if conn is not None:
        close_conn(db, conn, "left", terminate=True)
    append_event(db, group_scope(group_id), group_message(db, group_row(db, group_id), "LEFT", sr["id"]))


def move_to_group(db: Db, sr: sqlite3.Row, batch: sqlite3.Row, target: sqlite3.Row) -> None:
    """Reassign: the run leaves its group's active members (not counted in its history) and
    joins `target`; its open conn, if any, follows it without being closed."""
    old_id = sr["group_result_id"]
    db.run("UPDATE group_results SET active_member_count = active_member_count - 1 WHERE id = ?", old_id)
    db.run("UPDATE group_results SET active_member_count = active_member_count + 1 WHERE id = ?", target["id"])
    db.run("UPDATE study_results SET group_result_id = ? WHERE id = ?", target["id"], sr["id"])
    _finish_group_if_done(db, old_id, batch)
    conn = open_conn(db, sr["id"], "group")
    exclude = conn["id"] if conn is not None else None
    old_group = group_row(db, old_id)
    if conn is not None:
        _end_conn_scope(db, conn["id"])
        append_event(db, group_scope(old_id), group_message(db, old_group, "CLOSED", sr["id"]), exclude=exclude)
    append_event(db, group_scope(old_id), group_message(db, old_group, "LEFT", sr["id"]), exclude=exclude)
    new_scope = group_scope(target["id"])
    target = group_row(db, target["id"])
    if conn is not None:
        listen(db, conn["id"], new_scope)
        append_event(db, new_scope, group_message(db, target, "OPENED", sr["id"], with_session=True),
                     recipient=conn["id"])
        append_event(db, new_scope, group_message(db, target, "OPENED", sr["id"]), exclude=exclude)
    append_event(db, new_scope, group_message(db, target, "JOINED", sr["id"]), exclude=exclude)


###############################################################################
# Study flow: who may start, component order, result data, files, end and abort
###############################################################################

SR_DONE = ("FINISHED", "ABORTED", "FAIL")
CR_OPEN = ("STARTED", "DATA_RETRIEVED")
CR_DONE = ("FINISHED", "ABORTED", "FAIL", "RELOADED")
# The moves a result's state may make (publix-http.md §9); set_state refuses every other. A
# repeated initData re-enters DATA_RETRIEVED. Done component results still move in two cases,
# as in JATOS: a forbidden component start fails the run's last one whatever its state, and
# an abort makes every one of the run ABORTED (the current one is ABORTED already).
STUDY_RESULT_MOVES: dict[str, frozenset[str]] = {
    "PRE": frozenset({"STARTED", "FINISHED", "FAIL", "ABORTED"}),
    "STARTED": frozenset({"DATA_RETRIEVED", "FINISHED", "FAIL", "ABORTED"}),
    "DATA_RETRIEVED": frozenset({"DATA_RETRIEVED", "FINISHED", "FAIL", "ABORTED"}),
    "FINISHED": frozenset(), "ABORTED": frozenset(), "FAIL": frozenset(),
}
COMPONENT_RESULT_MOVES: dict[str, frozenset[str]] = {
    "STARTED": frozenset({"DATA_RETRIEVED", "FINISHED", "RELOADED", "FAIL", "ABORTED"}),
    "DATA_RETRIEVED": frozenset({"DATA_RETRIEVED", "FINISHED", "RELOADED", "FAIL", "ABORTED"}),
    "RESULTDATA_POSTED": frozenset(),  # JATOS's enum still has it; nothing sets it
    "FINISHED": frozenset({"FAIL", "ABORTED"}), "RELOADED": frozenset({"FAIL", "ABORTED"}),
    "FAIL": frozenset({"FAIL", "ABORTED"}), "ABORTED": frozenset({"ABORTED"}),
}
RESULT_MOVES = {"study_results": STUDY_RESULT_MOVES, "component_results": COMPONENT_RESULT_MOVES}
JATOS_RUNS = ("RUN_STUDY", "RUN_COMPONENT_START", "RUN_COMPONENT_FINISHED")
EVICTION_MESSAGE = "Closed by JATOS: Too many unfinished studies open in the same browser."
LAST_SEEN_THRESHOLD_MS = 30_000
COOKIE_MAX_AGE = 864_000_000  # 10 000 days, as JATOS
ID_COOKIE_PREFIX = "JATOS_ID_"
GENERAL_SINGLE_COOKIE = "JATOS_GENERALSINGLE_UUIDS"
_ID_COOKIE_REQUIRED = ("workerId", "workerType", "batchId", "studyId", "studyResultId", "studyResultUuid",
                       "studyAssets", "urlBasePath", "creationTime")
_ID_COOKIE_NUMERIC = ("batchId", "componentId", "componentPos", "componentResultId", "creationTime", "studyId",
                      "studyResultId", "workerId")
_ID_COOKIE_RUN_COLUMNS = {"studyResultId": "id", "studyResultUuid": "uuid", "workerId": "worker_id",
                          "batchId": "batch_id", "studyId": "study_id"}


@dataclasses.dataclass
class Redirect:
    location: str


@dataclasses.dataclass
class Run:
    """One study result with the rows it belongs to."""

    sr: sqlite3.Row
    study: sqlite3.Row
    batch: sqlite3.Row
    worker: sqlite3.Row

    @property
    def done(self) -> bool:
        return self.sr["state"] in SR_DONE

    @property
    def worker_type(self) -> str:
        return self.worker["type"]


def cookie_header(name: str, value: str, max_age: int, http_only: bool = False,
                  same_site: str | None = None) -> str:
    """A Set-Cookie value written by hand: JATOS's ID cookie value holds '=' and '&', which
    http.cookies would wrap in quotes that jatos.js cannot parse."""
    expires = "Thu, 01 Jan 1970 00:00:00 GMT" if max_age <= 0 else time.strftime(
        "%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + max_age))
    header = f"{name}={value}; Max-Age={max(max_age, 0)}; Expires={expires}; Path=/"
    if http_only:
        header += "; HttpOnly"
    if same_site:
        header += f"; SameSite={same_site}"
    return header


def parse_cookie_header(header: str) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


def _parse_id_cookie(name: str, value: str) -> dict[str, str] | None:
    """The fields of a JATOS ID cookie, or None if it is malformed (publix-http.md §5.2)."""
    if not name.upper().startswith(ID_COOKIE_PREFIX) or parse_id(name[len(ID_COOKIE_PREFIX):]) is None:
        return None
    fields: dict[str, str] = {}
    for pair in value.split("&"):
        if pair.count("=") != 1:
            return None
        key, raw = pair.split("=")
        fields[key] = urllib.parse.unquote_plus(raw)
    for key in _ID_COOKIE_REQUIRED:
        if fields.get(key, "null").strip() in ("", "null"):
            return None
    for key in _ID_COOKIE_NUMERIC:
        if fields.get(key, "null") != "null" and parse_id(fields[key]) is None:
            return None
    if fields.get("jatosRun") not in JATOS_RUNS:
        fields["jatosRun"] = "null"
    return fields


def cookie_secret(db: Db) -> bytes:
    """This installation's key for signing cookies, made on first use and kept in the database."""
    secret = db.value("SELECT value FROM settings WHERE key = 'cookie_secret'")
    if secret is None:
        secret = secrets.token_hex(32)
        db.run("INSERT INTO settings(key, value) VALUES ('cookie_secret', ?)", secret)
    return bytes.fromhex(secret)


def general_single_entry(secret: bytes, study_uuid: str, worker_id: int) -> str:
    """One entry of the General Single cookie: JATOS's `{studyUuid}={workerId}`, signed. JATOS's own
    entry is forgeable (the study UUID is in every initData, worker IDs are sequential) and would
    hand anyone another participant's run."""
    mac = hmac.new(secret, f"{study_uuid}={worker_id}".encode(), hashlib.sha256).hexdigest()[:32]
    return f"{study_uuid}={worker_id}.{mac}"


def _signed_worker(entry: str, secret: bytes) -> tuple[str, int] | None:
    """The (study UUID, worker ID) of a General Single cookie entry this server signed, else None."""
    study_uuid, _, signed = entry.partition("=")
    worker_id = parse_id(signed.partition(".")[0])
    if worker_id is None:
        return None
    expected = general_single_entry(secret, study_uuid, worker_id)
    return (study_uuid, worker_id) if hmac.compare_digest(entry.encode(), expected.encode()) else None


class Browser:
    """The participant's browser as its cookies show it; collects the cookies to send back."""

    def __init__(self, cookie_header_text: str, limit: int):
        self.limit = limit
        self.cookies = parse_cookie_header(cookie_header_text or "")
        self.id_cookies: dict[int, dict[str, str]] = {}
        self.outgoing: dict[str, str] = {}
        for name, value in self.cookies.items():
            if not name.lower().startswith("jatos_id"):
                continue
            fields = _parse_id_cookie(name, value)
            if fields is None:
                self.outgoing[name] = cookie_header(name, "", 0)
            else:
                self.id_cookies[int(name[len(ID_COOKIE_PREFIX):])] = fields

    def has_study_assets(self, db: Db, dir_name: str) -> bool:
        """Whether an ID cookie names a run of the study whose assets folder is `dir_name`, as the
        database has it: a made-up cookie reads no study's files."""
        return any(fields["studyAssets"] == dir_name and db.value(
            "SELECT 1 FROM study_results sr JOIN studies s ON s.id = sr.study_id "
            "WHERE sr.id = ? AND sr.uuid = ? AND s.dir_name = ?", sr_id, fields["studyResultUuid"], dir_name)
            for sr_id, fields in self.id_cookies.items())

    def write_id_cookie(self, run: Run, component: sqlite3.Row | None = None, cr_id: int | None = None,
                        jatos_run: str | None = None) -> None:
        sr_id = run.sr["id"]
        if sr_id not in self.id_cookies and len(self.id_cookies) >= self.limit:
            raise JatosError(500, "Can't generate a new ID cookie due to max number is reached. This can happen "
                                  "if multiple study runs are started at the same time in the same browser.")
        fields = {
            "batchId": run.batch["id"], "componentId": component["id"] if component else None,
            "componentPos": component["position"] if component else None, "componentResultId": cr_id,
            "creationTime": now_ms(), "studyAssets": run.study["dir_name"], "urlBasePath": "/",
            "jatosRun": jatos_run, "studyId": run.study["id"], "studyResultId": sr_id,
            "studyResultUuid": run.sr["uuid"], "workerId": run.worker["id"], "workerType": run.worker_type,
        }
        text = {key: "null" if value is None else str(value) for key, value in fields.items()}
        value = "&".join(f"{key}={urllib.parse.quote_plus(v) if key == 'studyAssets' else v}"
                         for key, v in text.items())
        self.id_cookies[sr_id] = text
        self.outgoing[f"{ID_COOKIE_PREFIX}{sr_id}"] = cookie_header(f"{ID_COOKIE_PREFIX}{sr_id}", value,
                                                                   COOKIE_MAX_AGE)

    def delete_id_cookie(self, sr_id: int) -> None:
        if self.id_cookies.pop(sr_id, None) is not None:
            name = f"{ID_COOKIE_PREFIX}{sr_id}"
            self.outgoing[name] = cookie_header(name, "", 0)

    def least_recent_run(self) -> int:
        return min(self.id_cookies, key=lambda sr_id: int(self.id_cookies[sr_id]["creationTime"]))

    def drop_forged_id_cookies(self, db: Db) -> None:
        """Forget (and expire) every ID cookie that does not name its run as the database has it:
        the per-browser limit ends the runs the cookies name, so a made-up cookie could end anyone's."""
        runs = {row["id"]: row for row in db.all("SELECT id, uuid, worker_id, batch_id, study_id FROM study_results "
                                                 "WHERE id IN (SELECT value FROM json_each(?))",
                                                 to_json(list(self.id_cookies)))}
        for sr_id, fields in list(self.id_cookies.items()):
            run = runs.get(sr_id)
            if run is None or any(fields[key] != str(run[column]) for key, column in _ID_COOKIE_RUN_COLUMNS.items()):
                self.delete_id_cookie(sr_id)

    def general_single_workers(self, study_uuid: str, secret: bytes) -> list[int]:
        """The workers the General Single cookie names for the study. Entries this server did not sign
        (forged, or JATOS's unsigned format) grant nothing and are dropped from the cookie."""
        entries = [entry for entry in self.cookies.get(GENERAL_SINGLE_COOKIE, "").split("&") if entry]
        checked = [(entry, _signed_worker(entry, secret)) for entry in entries]
        signed = [entry for entry, named in checked if named]
        if len(signed) < len(entries):
            self._write_general_single("&".join(signed))
        return [named[1] for _, named in checked if named and named[0] == study_uuid]

    def remember_general_single(self, study_uuid: str, worker_id: int, secret: bytes) -> None:
        old = self.cookies.get(GENERAL_SINGLE_COOKIE, "")
        entry = general_single_entry(secret, study_uuid, worker_id)
        self._write_general_single(f"{old}&{entry}" if old else entry)

    def _write_general_single(self, value: str) -> None:
        self.cookies[GENERAL_SINGLE_COOKIE] = value
        self.outgoing[GENERAL_SINGLE_COOKIE] = cookie_header(GENERAL_SINGLE_COOKIE, value,
                                                             COOKIE_MAX_AGE if value else 0,
                                                             http_only=True, same_site="Lax")


def _row(db: Db, table: str, row_id: int) -> sqlite3.Row:
    return db.one(f"SELECT * FROM {table} WHERE id = ?", row_id)


def _run_of(db: Db, sr: sqlite3.Row) -> Run:
    return Run(sr, _row(db, "studies", sr["study_id"]), _row(db, "batches", sr["batch_id"]),
               _row(db, "workers", sr["worker_id"]))


def load_run(db: Db, sr_uuid: str) -> Run:
    if sr_uuid == "undefined":
        raise JatosError(403, "Error getting study result UUID")
    sr = db.one("SELECT * FROM study_results WHERE uuid = ?", sr_uuid)
    if sr is None:
        raise JatosError(400, f"Study result {sr_uuid} doesn't exist.")
    return _run_of(db, sr)


def _checked_run(db: Db, sr_uuid: str, comp_uuid: str) -> tuple[Run, sqlite3.Row]:
    """The "run checks" shared by component start, initData, result data, log and upload."""
    run = load_run(db, sr_uuid)
    if comp_uuid == "undefined":
        raise JatosError(403, "Error getting component UUID")
    component = db.one("SELECT * FROM components WHERE uuid = ? AND study_id = ?", comp_uuid, run.study["id"])
    if component is None:
        raise JatosError(404, f"Component {comp_uuid} doesn't exist.")
    if run.done:
        raise JatosError(403, f"Study run is already finished (study result {run.sr['id']})")
    if not component["active"]:
        raise JatosError(403, f"Component {component['id']} is not active.")
    return run, component


def check_type_allowed(batch: sqlite3.Row, worker_type: str) -> None:
    """403 unless the batch allows workers of this type (MTurk's sandbox counts as MTurk)."""
    needed = "MT" if worker_type in MTURK_TYPES else worker_type
    if needed not in json.loads(batch["allowed_worker_types"]):
        raise JatosError(403, f"It's not allowed to run this study (ID: {batch['study_id']}) in this batch "
                              f"(ID: {batch['id']}) with a worker of type \"{WORKER_TYPE_LABELS[worker_type]}\".")


def authorise_do(db: Db, run: Run, session: AdminSession | None) -> None:
    """JATOS's "do" check: may this worker go on working on this study in this batch?"""
    worker, study, batch = run.worker, run.study, run.batch
    if worker["type"] == "Jatos":
        if session is None:
            raise JatosError(403, f"Worker {worker['id']} is not allowed to do study {study['id']}.")
        return
    check_type_allowed(batch, worker["type"])
    if worker["type"] in SINGLE_TYPES and db.value(
            "SELECT 1 FROM study_results WHERE worker_id = ? AND study_id = ? AND state IN (?, ?, ?)",
            worker["id"], study["id"], *SR_DONE):
        raise JatosError(403, "Study can be done only once.")


def _authorise_start(db: Db, run: Run, session: AdminSession | None) -> None:
    study, batch, worker = run.study, run.batch, run.worker
    if not study["active"]:
        raise JatosError(403, f"The study (ID: {study['id']}) was deactivated by an admin.")
    if not batch["active"]:
        raise JatosError(403, f"The batch (ID: {batch['id']}) is inactive.")
    if worker["type"] in SINGLE_TYPES:
        first = db.value("SELECT state FROM study_results WHERE worker_id = ? ORDER BY id LIMIT 1", worker["id"])
        if first is not None and first != "PRE":
            raise JatosError(403, "Study can be done only once.")
    if batch["max_total_workers"] is not None:
        count = db.value("SELECT COUNT(*) FROM batch_workers WHERE batch_id = ?", batch["id"])
        if count > batch["max_total_workers"]:
            raise JatosError(403, f"For the batch (ID: {batch['id']}) the maximum number of workers is "
                                  "already reached.")
    authorise_do(db, run, session)


def _create_run(db: Db, run: Run, code: str) -> Run:
    state = "PRE" if run.study["allow_preview"] and run.worker_type in SINGLE_TYPES else "STARTED"
    now = now_ms()
    sr_id = db.insert("INSERT INTO study_results(uuid, study_code, study_id, batch_id, worker_id, state, "
                      "start_date, last_seen_date, study_session_data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '{}')",
                      new_uuid(), code, run.study["id"], run.batch["id"], run.worker["id"], state, now, now)
    log_study_event(db, run.study["uuid"], f"Started study run with {WORKER_TYPE_LABELS[run.worker_type]} worker",
                    batchId=run.batch["id"], studyCode=code, workerId=run.worker["id"])
    return dataclasses.replace(run, sr=_row(db, "study_results", sr_id))


def _write_state(db: Db, table: str, what: str, old_states: Iterable[str], new_state: str,
                 columns: dict[str, Any], where: str, *args: Any) -> int:
    """The one UPDATE that changes a result's state, refused unless each old state may move to
    the new one; `columns` are written in the same statement. Returns how many rows moved."""
    old_states = tuple(old_states)
    for old in old_states:
        if new_state not in RESULT_MOVES[table].get(old, ()):
            raise JatosError(500, f"Illegal state change of {what}: {old} -> {new_state}")
    assignments = "".join(f", {name} = ?" for name in columns)
    marks = ", ".join("?" * len(old_states))
    return db.run(f"UPDATE {table} SET state = ?{assignments} WHERE {where} AND state IN ({marks})",
                  new_state, *columns.values(), *args, *old_states)


def set_state(db: Db, table: str, row: sqlite3.Row, new_state: str, **columns: Any) -> None:
    """Move one study or component result, as this transaction read it, to `new_state` and
    write `columns` (end_date, message ...) with it."""
    what = f"{table.replace('_results', ' result')} {row['id']}"
    if _write_state(db, table, what, (row["state"],), new_state, columns, "id = ?", row["id"]) != 1:
        raise JatosError(500, f"The state of {what} is no longer {row['state']}")


def set_component_states(db: Db, sr_id: int, old_states: Iterable[str], new_state: str, **columns: Any) -> None:
    """Move every component result of a run that is in one of `old_states` to `new_state`."""
    _write_state(db, "component_results", f"the component results of study result {sr_id}", old_states,
                 new_state, columns, "study_result_id = ?", sr_id)


def current_cr(db: Db, sr_id: int) -> sqlite3.Row | None:
    """The run's last component result, if it is still open."""
    last = db.one("SELECT * FROM component_results WHERE study_result_id = ? ORDER BY id DESC LIMIT 1", sr_id)
    return last if last is not None and last["state"] not in CR_DONE else None


def _close_run(db: Db, run: Run, state: str, message: str | None, **columns: Any) -> None:
    """End a run that is not done yet (end, eviction, group cleaner, abort) in `state`: its current
    component result ends in the same state, its other open ones FINISHED; it leaves its group."""
    now = now_ms()
    current = current_cr(db, run.sr["id"])
    if current is not None:
        set_state(db, "component_results", current, state, end_date=now, message=None)
    set_component_states(db, run.sr["id"], CR_OPEN, "FINISHED", end_date=now)
    set_state(db, "study_results", run.sr, state, message=truncate_message(message), end_date=now,
              last_seen_date=now, study_session_data=None, **columns)
    leave_group(db, run.sr)


def _finish_run(db: Db, run: Run, successful: bool, message: str | None) -> None:
    """End a run that is not done yet as FINISHED or FAIL (end, eviction, group cleaner)."""
    code = new_uuid() if successful and run.worker_type in MTURK_TYPES else None
    _close_run(db, run, "FINISHED" if successful else "FAIL", message, confirmation_code=code)


def _make_room(db: Db, browser: Browser) -> None:
    """Evict the least recently used run of this browser while its ID cookies are at the limit."""
    while len(browser.id_cookies) >= browser.limit:
        sr_id = browser.least_recent_run()
        sr = db.one("SELECT * FROM study_results WHERE id = ?", sr_id)
        if sr is not None and sr["state"] not in SR_DONE:
            abandoned = _run_of(db, sr)
            _finish_run(db, abandoned, False, EVICTION_MESSAGE)
            log_study_event(db, abandoned.study["uuid"], "Finish abandoned study", workerId=sr["worker_id"])
        browser.delete_id_cookie(sr_id)


def _last_run_of(db: Db, worker_id: int) -> sqlite3.Row | None:
    return db.one("SELECT * FROM study_results WHERE worker_id = ? ORDER BY id DESC LIMIT 1", worker_id)


@dataclasses.dataclass
class _Start:
    """What a run start works with: the link and the request's browser, query and session."""

    db: Db
    link: sqlite3.Row
    run: Run  # with sr=None until the study result exists
    query: dict[str, str]
    browser: Browser
    session: AdminSession | None

    def with_worker(self, worker_id: int) -> _Start:
        return dataclasses.replace(self, run=dataclasses.replace(self.run, worker=_row(self.db, "workers",
                                                                                        worker_id)))

    def new_run(self) -> Run:
        _authorise_start(self.db, self.run, self.session)
        _make_room(self.db, self.browser)
        return _create_run(self.db, self.run, self.link["code"])

    def resume_or_new(self) -> Run:
        """Single workers: the run in preview (PRE) continues; the first visit creates it."""
        _authorise_start(self.db, self.run, self.session)
        last = _last_run_of(self.db, self.run.worker["id"])
        if last is None:
            _make_room(self.db, self.browser)
            return _create_run(self.db, self.run, self.link["code"])
        if last["id"] not in self.browser.id_cookies:
            _make_room(self.db, self.browser)
        return dataclasses.replace(self.run, sr=last)


def _start_personal_single(start: _Start) -> tuple[Run, str | None]:
    return start.resume_or_new(), None


def _start_fixed_worker(start: _Start) -> tuple[Run, str | None]:
    return start.new_run(), None


def _general_single_worker(start: _Start, secret: bytes) -> int | None:
    """The General Single worker of this batch that the browser's signed cookie names for the study
    (several: the newest, as JATOS)."""
    named = start.browser.general_single_workers(start.run.study["uuid"], secret)
    return start.db.value("SELECT MAX(w.id) FROM workers w JOIN batch_workers b ON b.worker_id = w.id "
                          "WHERE b.batch_id = ? AND w.type = 'GeneralSingle' "
                          "AND w.id IN (SELECT value FROM json_each(?))", start.run.batch["id"], to_json(named))


def _start_general_single(start: _Start) -> tuple[Run, str | None]:
    db, study = start.db, start.run.study
    secret = cookie_secret(db)
    worker_id = _general_single_worker(start, secret)
    if worker_id is None:
        worker_id = add_worker(db, "GeneralSingle", start.run.batch["id"])
        run = start.with_worker(worker_id).new_run()
        start.browser.remember_general_single(study["uuid"], worker_id, secret)
        return run, None
    start = start.with_worker(worker_id)
    _authorise_start(db, start.run, start.session)
    last = _last_run_of(db, worker_id)
    if last is None:
        raise JatosError(403, "This study was run in this browser already. Although JATOS couldn't find the "
                              "study result.")
    if last["id"] not in start.browser.id_cookies:
        _make_room(db, start.browser)
        start.browser.remember_general_single(study["uuid"], worker_id, secret)
    return dataclasses.replace(start.run, sr=last), None


def _start_general_multiple(start: _Start) -> tuple[Run, str | None]:
    return start.with_worker(add_worker(start.db, "GeneralMultiple", start.run.batch["id"])).new_run(), None


def _start_mturk(start: _Start) -> tuple[Run, str | None]:
    query, study = start.query, start.run.study
    if query.get("assignmentId") == "ASSIGNMENT_ID_NOT_AVAILABLE":
        raise JatosError(400, f"No preview available for study {study['id']}.")
    mturk_id = (query.get("workerId") or "").strip()
    if not mturk_id:
        raise JatosError(400, "MTurk's workerId is missing in the query parameters.")
    worker_type = "MTSandbox" if "sandbox" in query.get("turkSubmitTo", "").lower() else "MT"
    worker_id = start.db.value("SELECT id FROM workers WHERE mturk_worker_id = ? COLLATE NOCASE AND type = ? "
                               "ORDER BY id LIMIT 1", mturk_id, worker_type)
    if worker_id is None:
        worker_id = add_worker(start.db, worker_type, start.run.batch["id"], mturk_worker_id=mturk_id)
    return start.with_worker(worker_id).new_run(), None


def _start_jatos(start: _Start) -> tuple[Run, str | None]:
    session = start.session
    if session is None:
        raise JatosError(403, "No user signed in")
    start = start.with_worker(JATOS_WORKER_ID)
    _authorise_start(start.db, start.run, session)
    if session.jatos_run is None:
        raise JatosError(403, "This study or component was never started in JATOS.")
    if session.jatos_run not in JATOS_RUNS:
        raise JatosError(400, "Malformed session parameter 'jatos_run'")
    if session.jatos_run == "RUN_COMPONENT_FINISHED":
        raise JatosError(403, "This study was never started in JATOS.")
    target = (session.run_component_uuid or "unknown") if session.jatos_run == "RUN_COMPONENT_START" else None
    _make_room(start.db, start.browser)
    return _create_run(start.db, start.run, start.link["code"]), target


_STARTERS: dict[str, Callable[[_Start], tuple[Run, str | None]]] = {
    "PersonalSingle": _start_personal_single, "PersonalMultiple": _start_fixed_worker,
    "GeneralSingle": _start_general_single, "GeneralMultiple": _start_general_multiple,
    "MT": _start_mturk, "MTSandbox": _start_mturk, "Jatos": _start_jatos,
}


def first_active_component(db: Db, study_id: int) -> sqlite3.Row | None:
    return db.one("SELECT * FROM components WHERE study_id = ? AND active = 1 ORDER BY position LIMIT 1", study_id)


def start_run(db: Db, code: str, query: dict[str, str], browser: Browser,
              session: AdminSession | None, max_query: int) -> Redirect:
    """GET /publix/{code}: start (or resume) a study run and send the browser to its first component."""
    if len(to_json(query).encode()) > max_query:
        raise JatosError(400, f"The link's query string is longer than {human_bytes(max_query)}.")
    link = db.one("SELECT * FROM study_links WHERE code = ?", code)
    if link is None:
        raise JatosError(400, "No valid study link")
    if not link["active"]:
        raise JatosError(403, "This study link is inactive")
    starter = _STARTERS.get(link["worker_type"])
    if starter is None:
        raise JatosError(400, "Unknown worker type")
    batch = _row(db, "batches", link["batch_id"])
    worker = _row(db, "workers", link["worker_id"]) if link["worker_id"] else None
    blank = Run(None, _row(db, "studies", batch["study_id"]), batch, worker)  # type: ignore[arg-type]
    browser.drop_forged_id_cookies(db)
    run, target = starter(_Start(db, link, blank, query, browser, session))
    db.run("UPDATE study_results SET url_query_parameters = ? WHERE id = ?", to_json(query), run.sr["id"])
    jatos_run = session.jatos_run if run.worker_type == "Jatos" and session else None
    browser.write_id_cookie(run, jatos_run=jatos_run)
    if target is None:
        first = first_active_component(db, run.study["id"])
        if first is None:
            raise JatosError(404, f"The study with ID {run.study['id']} has no active components.")
        target = first["uuid"]
    return Redirect(f"/publix/{run.sr['uuid']}/{target}/start")


# Old links that anyone could make up: walking a worker ID finds the codes of personal links just
# handed out, and General Single links were made even where the batch forbids them (issue #16).
_GUARDED_LEGACY_PARAMS = {"PersonalSingle": "personalSingleWorkerId", "PersonalMultiple": "personalMultipleWorkerId",
                          "GeneralSingle": "generalSingle"}


def legacy_start(db: Db, study_id_text: str, query: dict[str, str], legacy_links: bool) -> Redirect:
    """GET /publix/{studyId}/start?batchId=...: a pre-3.7 run link, turned into a study link. Links
    naming a personal worker or General Single are refused unless `legacy_links` switches them on."""
    study_id, batch_id = parse_id(study_id_text), parse_id(query.get("batchId", ""))
    if study_id is None or batch_id is None:
        raise JatosError(400, "Bad request: studyId and batchId must be numbers")
    batch = db.one("SELECT * FROM batches WHERE id = ? AND study_id = ?", batch_id, study_id)
    if batch is None:
        raise JatosError(400, "Unknown study or batch")
    worker_type = _legacy_worker_type(query)
    param = _GUARDED_LEGACY_PARAMS.get(worker_type)
    if param is not None and not legacy_links:
        raise JatosError(403, f"Old JATOS links with '{param}' are switched off on this server. The researcher "
                              "can switch them on by starting jatos-lite with --legacy-links "
                              "(or JATOS_LITE_LEGACY_LINKS=on), or hand out a new study link instead.")
    check_type_allowed(batch, worker_type)
    if worker_type in ("PersonalSingle", "PersonalMultiple"):
        code = _legacy_personal_link(db, batch, worker_type, query[param])
    else:
        code = study_links_for(db, batch, worker_type)[0]
    return Redirect(f"/publix/{code}?{urllib.parse.urlencode(query)}")


def _legacy_worker_type(query: dict[str, str]) -> str:
    for worker_type, param in _GUARDED_LEGACY_PARAMS.items():
        if param in query:
            return worker_type
    if "generalMultiple" in query:
        return "GeneralMultiple"
    if "workerId" in query and "assignmentId" in query:
        return "MT"  # the sandbox is told apart at run start, from turkSubmitTo
    if query.get("mode") == "requester-preview":
        raise JatosError(400, "You cannot start a study from a MTurk requester preview")
    raise JatosError(400, "Unknown worker type")


def _legacy_personal_link(db: Db, batch: sqlite3.Row, worker_type: str, worker_id_text: str) -> str:
    worker_id = parse_id(worker_id_text.strip())
    if worker_id is None:
        raise JatosError(400, "Couldn't parse worker ID from URL query string")
    worker = _row(db, "workers", worker_id)
    if worker is None:
        raise JatosError(400, f"Unknown worker {worker_id_text}")
    if worker["type"] != worker_type:
        raise JatosError(400, f"Worker not of type {worker_type}")
    if db.value("SELECT 1 FROM batch_workers WHERE batch_id = ? AND worker_id = ?", batch["id"], worker["id"]) is None:
        raise JatosError(400, "Worker doesn't belong to batch")
    code = db.value("SELECT code FROM study_links WHERE batch_id = ? AND worker_id = ?", batch["id"], worker["id"])
    return code or _insert_link(db, batch["id"], worker_type, worker["id"])


def _end_component_result(db: Db, cr: sqlite3.Row, state: str, message: str | None) -> None:
    set_state(db, "component_results", cr, state, end_date=now_ms(), message=truncate_message(message))


def _begin_component(db: Db, run: Run, component: sqlite3.Row, message: str | None) -> str | None:
    """JATOS's startComponent rules (§6.2). Returns why it is forbidden, or None once the new
    component result exists."""
    last = db.one("SELECT * FROM component_results WHERE study_result_id = ? ORDER BY id DESC LIMIT 1",
                  run.sr["id"])
    if last is not None:
        last_component = _row(db, "components", last["component_id"])
        study = run.study
        if study["linear_study"] and last_component["position"] > component["position"]:
            _end_component_result(db, last, "FAIL", message)
            return (f"Study '{study['title']}' (ID: {study['id']}) allows only linear study flow. But component "
                    f"{last_component['id']} attempted to start component {component['id']}. The study is finished.")
        if last["component_id"] == component["id"]:
            first = first_active_component(db, study["id"])
            preview_reload = run.sr["state"] == "PRE" and first is not None and first["id"] == component["id"]
            if not (component["reloadable"] or preview_reload):
                _end_component_result(db, last, "FAIL", message)
                return (f"It's not allowed to reload this component (ID: {component['id']}). "
                        f"Study (ID: {study['id']}) is finished.")
            if last["state"] not in CR_DONE:
                _end_component_result(db, last, "RELOADED", message)
        elif last["state"] not in CR_DONE:
            _end_component_result(db, last, "FINISHED", message)
    db.insert("INSERT INTO component_results(study_result_id, component_id, state, start_date) "
              "VALUES (?, ?, 'STARTED', ?)", run.sr["id"], component["id"], now_ms())
    return None


def _end_redirect(run: Run, reason: str) -> Redirect:
    return Redirect(f"/publix/{run.sr['uuid']}/end?successful=false&message={urllib.parse.quote_plus(reason)}")


def component_html(studies_root: Path, study: sqlite3.Row, component: sqlite3.Row) -> Path:
    path = confined_path(studies_root / study["dir_name"], component["html_file_path"] or "")
    if path is None or not path.is_file():
        raise JatosError(404, f"HTML file '{component['html_file_path']}' in study assets '{study['dir_name']}' "
                              "couldn't be found. Please change this in the component's properties.")
    return path


def start_component(db: Db, studies_root: Path, sr_uuid: str, comp_uuid: str, message: str | None,
                    browser: Browser, session: AdminSession | None) -> Path | Redirect:
    """GET /publix/{sr}/{comp}/start: the component's HTML file, or where to go instead."""
    run, component = _checked_run(db, sr_uuid, comp_uuid)
    browser.drop_forged_id_cookies(db)
    jatos_run = None
    if run.worker_type == "Jatos":
        cookie = browser.id_cookies.get(run.sr["id"])
        if cookie is None:
            raise JatosError(400, f"Couldn't find cookie for study result ID {run.sr['id']}. "
                                  "Are cookies allowed in your browser?")
        authorise_do(db, run, session)
        jatos_run = None if cookie["jatosRun"] == "null" else cookie["jatosRun"]
        if jatos_run == "RUN_COMPONENT_FINISHED":
            last = db.value("SELECT component_id FROM component_results WHERE study_result_id = ? "
                            "ORDER BY id DESC LIMIT 1", run.sr["id"])
            if last is not None and last != component["id"]:
                return Redirect(f"/publix/{run.sr['uuid']}/end")
        elif jatos_run == "RUN_COMPONENT_START":
            jatos_run = "RUN_COMPONENT_FINISHED"
    reason = _begin_component(db, run, component, message)
    if reason is not None:
        return _end_redirect(run, reason)
    first = first_active_component(db, run.study["id"])
    if run.sr["state"] == "PRE" and first["id"] != component["id"]:
        set_state(db, "study_results", run.sr, "STARTED", last_seen_date=now_ms())
    path = component_html(studies_root, run.study, component)
    browser.write_id_cookie(run, component, current_cr(db, run.sr["id"])["id"], jatos_run)
    return path


def init_data(db: Db, sr_uuid: str, comp_uuid: str, session: AdminSession | None) -> dict | Redirect:
    """GET /publix/{sr}/{comp}/initData: everything jatos.js fills its variables from (§7)."""
    run, component = _checked_run(db, sr_uuid, comp_uuid)
    authorise_do(db, run, session)
    cr = current_cr(db, run.sr["id"])
    if cr is None:
        reason = _begin_component(db, run, component, None)
        if reason is not None:
            return _end_redirect(run, reason)
        cr = current_cr(db, run.sr["id"])
    if run.sr["state"] != "PRE":
        set_state(db, "study_results", run.sr, "DATA_RETRIEVED", last_seen_date=now_ms())
    set_state(db, "component_results", cr, "DATA_RETRIEVED")
    study, batch = run.study, run.batch
    return {
        "studySessionData": run.sr["study_session_data"],
        "studyProperties": {
            "id": study["id"], "uuid": study["uuid"], "title": study["title"],
            "description": study["description"], "locked": bool(study["locked"]),
            "groupStudy": bool(study["group_study"]), "linearStudy": bool(study["linear_study"]),
            "allowPreview": bool(study["allow_preview"]), "dirName": study["dir_name"],
            "studyInput": study["study_input"], "jsonData": study["study_input"],
            "descriptionHash": description_hash(study["description"]),
        },
        "batchProperties": {
            "id": batch["id"], "title": batch["title"], "maxActiveMembers": batch["max_active_members"],
            "maxTotalMembers": batch["max_total_members"], "maxTotalWorkers": batch["max_total_workers"],
            "allowedWorkerTypes": ordered_worker_types(json.loads(batch["allowed_worker_types"])),
            "batchInput": batch["batch_input"], "jsonData": batch["batch_input"],
        },
        "componentList": [{"id": c["id"], "uuid": c["uuid"], "title": c["title"], "active": bool(c["active"]),
                           "reloadable": bool(c["reloadable"]), "position": c["position"]}
                          for c in components_of(db, study["id"])],
        "componentProperties": {
            "id": component["id"], "uuid": component["uuid"], "title": component["title"],
            "htmlFilePath": component["html_file_path"], "reloadable": bool(component["reloadable"]),
            "componentInput": component["component_input"], "jsonData": component["component_input"],
        },
        "urlQueryParameters": json.loads(run.sr["url_query_parameters"]),
        "studyCode": run.sr["study_code"],
    }


def _touch_last_seen(db: Db, sr_id: int) -> None:
    now = now_ms()
    db.run("UPDATE study_results SET last_seen_date = ? WHERE id = ? AND "
           "(last_seen_date IS NULL OR last_seen_date < ?)", now, sr_id, now - LAST_SEEN_THRESHOLD_MS)


def heartbeat(db: Db, sr_uuid: str) -> None:
    run = load_run(db, sr_uuid)
    db.run("UPDATE study_results SET last_seen_date = ? WHERE id = ?", now_ms(), run.sr["id"])


def set_study_session(db: Db, sr_uuid: str, text: str | None, session: AdminSession | None) -> None:
    run = load_run(db, sr_uuid)
    authorise_do(db, run, session)
    db.run("UPDATE study_results SET study_session_data = ? WHERE id = ?", text, run.sr["id"])


def _flag_quota(db: Db, sr_id: int, cr_id: int | None) -> None:
    db.run("UPDATE study_results SET quota_reached = 1 WHERE id = ?", sr_id)
    if cr_id is not None:
        db.run("UPDATE component_results SET quota_reached = 1 WHERE id = ?", cr_id)


def write_result_data(db: Db, max_size: int, sr_uuid: str, comp_uuid: str, body: bytes, append: bool,
                      session: AdminSession | None) -> None:
    """PUT (replace) or POST (append) result data of the run's current component result.
    Appending is done in SQL: the stored data is never read back into Python."""
    run, component = _checked_run(db, sr_uuid, comp_uuid)
    authorise_do(db, run, session)
    cr = current_cr(db, run.sr["id"])
    if cr is None:
        raise JatosError(403, "Impossible to put result data to component result")
    if not body:
        raise JatosError(400, "Result data empty")
    size = len(body)
    if size + (cr["data_size"] if append else 0) > max_size:
        _flag_quota(db, run.sr["id"], cr["id"])
        raise CommittedError(413, f"Result data size exceeds allowed {human_bytes(max_size)}. "
                                  "Consider using result files instead.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise JatosError(400, "Result data must be UTF-8 text")
    if append:
        db.run("UPDATE component_results SET data = COALESCE(data, '') || ?, data_size = data_size + ? "
               "WHERE id = ?", text, size, cr["id"])
    else:
        db.run("UPDATE component_results SET data = ?, data_size = ? WHERE id = ?", text, size, cr["id"])
    _touch_last_seen(db, run.sr["id"])
    # the hash of this request's data, as JATOS logs it (not of the whole data appended so far)
    log_study_event(db, run.study["uuid"], "Appended component result data" if append
                    else "Replaced component result data", componentUuid=component["uuid"],
                    workerId=run.worker["id"], dataHash=latin1_sha256(text))


def write_study_log(db: Db, sr_uuid: str, comp_uuid: str, text: str | None, session: AdminSession | None) -> None:
    run, component = _checked_run(db, sr_uuid, comp_uuid)
    authorise_do(db, run, session)
    if not text:
        raise JatosError(400, "Log message empty")
    log.info("study log: %s (study result %s, batch %s, study %s, component %s, worker %s)",
             " ".join(text.split()), run.sr["id"], run.batch["id"], run.study["id"], component["id"],
             run.worker["id"])


def run_uploads(config: Config, sr_id: int) -> Path:
    return config.uploads / str(sr_id)


def _uploads_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _open_runs_uploads_size(db: Db, config: Config, batch_id: int) -> int:
    """The files of a batch's runs whose links anyone can start again and again."""
    sr_ids = db.all("SELECT sr.id FROM study_results sr JOIN workers w ON w.id = sr.worker_id "
                    "WHERE sr.batch_id = ? AND w.type IN (SELECT value FROM json_each(?))",
                    batch_id, to_json(OPEN_TYPES))
    return sum(_uploads_size(run_uploads(config, row[0])) for row in sr_ids)


def _check_upload_quotas(db: Db, config: Config, run: Run, cr_id: int, size: int) -> None:
    """JATOS's limits per file and per run, and jatos-lite's per batch for runs anyone can start."""
    if size > config.max_upload:
        _flag_quota(db, run.sr["id"], cr_id)
        raise CommittedError(413, "File size too large")
    if _uploads_size(run_uploads(config, run.sr["id"])) + size > config.max_uploads_per_run:
        _flag_quota(db, run.sr["id"], None)
        raise CommittedError(413, "Reached max file size limit per study run")
    if run.worker_type in OPEN_TYPES and \
            _open_runs_uploads_size(db, config, run.batch["id"]) + size > config.max_uploads_per_batch:
        _flag_quota(db, run.sr["id"], None)
        raise CommittedError(413, "Reached max file size limit of this batch's study links")


@dataclasses.dataclass
class Upload:
    """An uploaded result file: its size, and its content unless it was too large to read."""

    size: int
    file: Any


def store_result_file(db: Db, config: Config, sr_uuid: str, comp_uuid: str, filename: str,
                      upload: Upload | None, session: AdminSession | None) -> None:
    """POST /publix/{sr}/{comp}/files/{filename}: checks in JATOS's order (§8.5), then a durable write."""
    run, component = _checked_run(db, sr_uuid, comp_uuid)
    if not config.uploads_enabled:
        raise JatosError(403, "File upload not allowed. Contact your admin.")
    authorise_do(db, run, session)
    cr = current_cr(db, run.sr["id"])
    if cr is None:
        raise JatosError(403, "Impossible to upload result file to component result")
    if upload is None:
        raise JatosError(400, "Missing file")
    _check_upload_quotas(db, config, run, cr["id"], upload.size)
    if not is_portable_name(filename):
        raise JatosError(400, "Bad filename")
    digest = hashlib.sha256()
    try:
        write_file_durably(run_uploads(config, run.sr["id"]) / str(cr["id"]) / filename,
                           digested(read_chunks(upload.file), digest))
    except OSError as exc:
        log.error("upload of %s for study result %s failed: %s", filename, run.sr["id"], exc)
        raise JatosError(400, "File upload failed")
    _touch_last_seen(db, run.sr["id"])
    log_study_event(db, run.study["uuid"], "Uploaded file", componentUuid=component["uuid"],
                    workerId=run.worker["id"], fileHash=digest.hexdigest(), fileName=filename)


def find_result_file(db: Db, config: Config, sr_uuid: str, filename: str, component_id: str | None,
                     session: AdminSession | None) -> Path:
    """GET /publix/{sr}/files/{filename}: the newest upload of that name in this run."""
    run = load_run(db, sr_uuid)
    authorise_do(db, run, session)
    sql, args = "SELECT id FROM component_results WHERE study_result_id = ?", [run.sr["id"]]
    if component_id is not None:
        component = _checked_download_component(db, run, component_id)
        sql, args = sql + " AND component_id = ?", args + [component["id"]]
    for (cr_id,) in db.all(sql + " ORDER BY id DESC", *args):
        path = confined_path(run_uploads(config, run.sr["id"]) / str(cr_id), filename)
        if path is not None and path.is_file():
            return path
    raise JatosError(404, f"Result file not found: {filename}")


def _checked_download_component(db: Db, run: Run, component_id: str) -> sqlite3.Row:
    study_id = run.study["id"]
    number = parse_id(component_id)
    if number is None:
        raise JatosError(400, f"componentId must be a number, not '{component_id}'")
    component = _row(db, "components", number)
    if component is None:
        raise JatosError(404, f"An component with ID {component_id} of study {study_id} doesn't exist.")
    if component["study_id"] != study_id:
        raise JatosError(400, f"There is no study with ID {study_id} that has a component with ID {component_id}.")
    if not component["active"]:
        raise JatosError(403, f"Component with ID {component_id} in study with ID {study_id} is not active.")
    return component


def end_run(db: Db, sr_uuid: str, successful: bool, message: str | None, browser: Browser,
            session: AdminSession | None) -> Run:
    """GET /publix/{sr}/end: finish the run (once) and forget its ID cookie."""
    run = load_run(db, sr_uuid)
    authorise_do(db, run, session)
    if not run.done:
        _finish_run(db, run, successful, message)
    browser.delete_id_cookie(run.sr["id"])
    log_study_event(db, run.study["uuid"], "Finished study run", workerId=run.worker["id"])
    return _run_of(db, _row(db, "study_results", run.sr["id"]))


def abort_run(db: Db, config: Config, sr_uuid: str, message: str | None, browser: Browser,
              session: AdminSession | None) -> Run:
    """GET /publix/{sr}/abort: end the run as ABORTED and delete all its result data and files."""
    run = load_run(db, sr_uuid)
    authorise_do(db, run, session)
    sr_id = run.sr["id"]
    if not run.done:
        _close_run(db, run, "ABORTED", message)
        set_component_states(db, sr_id, CR_DONE, "ABORTED", data=None, data_size=0)
        db.run("DELETE FROM applied_requests WHERE study_result_id = ?", sr_id)
        shutil.rmtree(run_uploads(config, sr_id), ignore_errors=True)
    browser.delete_id_cookie(sr_id)
    log_study_event(db, run.study["uuid"], "Aborted study run", workerId=run.worker["id"])
    return _run_of(db, _row(db, "study_results", sr_id))


def end_redirect_url(template: str, query: dict[str, str], confirmation_code: str | None) -> str:
    """Fill `[name]` placeholders from the run's URL query parameters (unknown: 'undefined')."""
    url = template
    for name in dict.fromkeys(re.findall(r"\[(.*?)\]", template)):
        value = query.get(urllib.parse.unquote(name))
        url = url.replace(f"[{name}]", "undefined" if value is None else urllib.parse.quote_plus(value))
    if confirmation_code:
        url += ("&" if "?" in url else "?") + f"confirmationCode={confirmation_code}"
    return url


def end_page(db: Db, studies_root: Path, sr_uuid: str) -> Redirect | Path | None:
    """GET /publix/{sr}/final/endPage.html: the end redirect, the study's own endPage.html, or
    None for the default page."""
    sr = db.one("SELECT * FROM study_results WHERE uuid = ?", sr_uuid)
    if sr is None:
        raise JatosError(400, f"A study result {sr_uuid} doesn't exist.")
    if sr["state"] not in SR_DONE:
        raise JatosError(400, f"The study result {sr_uuid} isn't finished yet.")
    study = _row(db, "studies", sr["study_id"])
    if (study["end_redirect_url"] or "").strip():
        return Redirect(end_redirect_url(study["end_redirect_url"].strip(), json.loads(sr["url_query_parameters"]),
                                         sr["confirmation_code"]))
    page = studies_root / study["dir_name"] / "endPage.html"
    return page if page.is_file() else None


def start_researcher_run(db: Db, session: AdminSession, study_key: str, batch_key: str | None,
                         component_key: str | None) -> str:
    """The Jatos-worker study code for a signed-in researcher's test run of a study, or of
    one of its components."""
    study = find_study(db, study_key)
    batch = find_batch(db, batch_key, study["id"]) if batch_key else default_batch(db, study["id"])
    component_uuid = None
    if component_key:
        component = db.one("SELECT * FROM components WHERE study_id = ? AND (id = ? OR uuid = ?)",
                           study["id"], component_key, component_key)
        if component is None:
            raise JatosError(404, f"Component {component_key} doesn't exist.")
        component_uuid = component["uuid"]
    start_test_run(db, session, component_uuid)
    return jatos_link(db, batch)


def replay_or_apply(db: Db, sr_uuid: str, request_id: str | None, apply: Callable[[], str]) -> str:
    """Exactly-once writes: a request id already applied for this run answers the original
    body without doing anything; a new one is applied and remembered in the same transaction."""
    if not request_id:
        return apply()
    if len(request_id) > 128 or not request_id.isprintable():
        raise JatosError(400, "Malformed X-Request-Id")
    sr_id = db.value("SELECT id FROM study_results WHERE uuid = ?", sr_uuid)
    if sr_id is not None:
        body = db.value("SELECT body FROM applied_requests WHERE study_result_id = ? AND request_id = ?",
                        sr_id, request_id)
        if body is not None:
            return body
    body = apply()
    db.run("INSERT INTO applied_requests(study_result_id, request_id, status, body) VALUES (?, ?, 200, ?)",
           sr_id, request_id, body)
    return body


###############################################################################
# Channels: batch and group channels over HTTP long-polling
###############################################################################
# The semantics are JATOS's WebSocket channels (channels.md §1-§6); the transport is a
# conn per page and channel, sends with a client sequence number, and one multiplexed
# long-poll per page that returns the conn's events after its cursor (§7).

# (The poll hold, presence timeout, sweep interval and memory size are fields of Config.)
LAST_SEEN_REFRESH_SECONDS = 5.0
SEEN_WRITE_SECONDS = 0.5  # how often the hub writes the last_seen of the conns polls saw
GROUP_CLEANER_INTERVAL_SECONDS = 60.0
GROUP_MEMBER_IDLE_MS = 90_000
EVENT_RETENTION_SECONDS = 600.0
MAX_EVENTS_PER_POLL = 500
# How long the hub trusts the conn rows a poll read: a conn change of this process forgets them
# at once, one of another process (which only the database shows) is seen after this long.
POLLED_CONN_MEMORY_SECONDS = 1.0
WATCH_INTERVAL_SECONDS = 0.025  # how often the hub looks for other processes' commits
WATCH_ERROR_PAUSE_SECONDS = 1.0
HELD_POLLS_PER_BROWSER = 4
CROWDED_SHARE = 0.8  # of the held-poll limit: the server warns, and the admin page shows it
HELD_POLLS_PER_RUN = 2  # a run's page holds one; a reloaded page's old poll may not have ended yet
PARKING_KEY = "jatos_lite.parking"  # a request's Parking in its WSGI environment (from GuardedChannel)
POLL_RETRY_AFTER_MS = 1000  # a poll released to make room asks its page to wait before the next


@dataclasses.dataclass(frozen=True)
class SessionWords:
    """The batch and group channels name the same things differently (channels.md §2.1)."""

    table: str
    action_id: str
    patches: str
    version: str
    versioning: str


BATCH_SESSION = SessionWords("batches", "id", "patches", "version", "versioning")
GROUP_SESSION = SessionWords("group_results", "sessionActionId", "sessionPatches", "sessionVersion",
                             "sessionVersioning")


def _channel_run(db: Db, sr_uuid: str, session: AdminSession | None) -> Run:
    """Checks shared by the channel endpoints (§1.1), refusing runs that are already done."""
    run = load_run(db, sr_uuid)
    authorise_do(db, run, session)
    if run.done:
        raise JatosError(403, f"Study run is already finished (study result {run.sr['id']})")
    return run


def _group_run(db: Db, sr_uuid: str, session: AdminSession | None, first_group_only: bool) -> Run:
    run = _channel_run(db, sr_uuid, session)
    if not run.study["group_study"]:
        raise JatosError(403, f"Study {run.study['id']} is not a group study.")
    if first_group_only and run.sr["history_group_result_id"] is not None:
        raise JatosError(403, "This study run left its group already; it cannot join another one.")
    return run


def _batch_snapshot(db: Db, batch_id: int) -> dict:
    batch = db.one("SELECT session_data, session_version FROM batches WHERE id = ?", batch_id)
    return {"action": "OPENED", "data": json.loads(batch["session_data"] or "{}"), "version": batch["session_version"]}


def _reopened(db: Db, run: Run, kind: str, open_id: str | None) -> dict | None:
    """A repeated open request (lost response): the same conn, a fresh snapshot, no side effects."""
    if not open_id:
        return None
    conn = db.one("SELECT * FROM channel_conns WHERE open_id = ? AND study_result_id = ? AND kind = ? "
                  "AND state = 'open'", open_id, run.sr["id"], kind)
    if conn is None:
        return None
    if kind == "batch":
        snapshot = _batch_snapshot(db, run.batch["id"])
    else:
        group = group_row(db, int(conn_scope(db, conn["id"])[2:]))
        snapshot = group_message(db, group, "OPENED", run.sr["id"], with_session=True)
    cursor = last_event_id(db)
    return {"conn": conn["id"], "cursor": cursor, "events": [{"id": cursor, "msg": snapshot}]}


def _new_conn(db: Db, run: Run, kind: str, open_id: str | None, page: str | None) -> str:
    """A new conn, replacing the run's open one. Only a conn of another page (a second tab)
    hears the termination CLOSED, which makes jatos.js call the run invalid; a page's own
    earlier conn (an open it gave up on, arriving late) closes quietly."""
    old = open_conn(db, run.sr["id"], kind)
    if old is not None:
        if page is not None and old["page"] == page:
            close_conn(db, old, "reopened", terminate=False)
        else:
            close_conn(db, old, "superseded", terminate=True)
    if open_id and db.value("SELECT 1 FROM channel_conns WHERE open_id = ?", open_id):
        open_id = None
    conn_id = secrets.token_hex(16)
    now = time.time()
    db.run("INSERT INTO channel_conns(id, open_id, study_result_id, kind, state, last_seen, opened_at, page) "
           "VALUES (?, ?, ?, ?, 'open', ?, ?, ?)", conn_id, open_id, run.sr["id"], kind, now, now, page)
    return conn_id


def _opened(conn_id: str, event_id: int, message: dict) -> dict:
    return {"conn": conn_id, "cursor": event_id, "events": [{"id": event_id, "msg": message}]}


def open_batch_channel(db: Db, sr_uuid: str, open_id: str | None, session: AdminSession | None,
                       page: str | None = None) -> dict:
    """POST /publix/{sr}/batch/open: a new batch conn whose first event is OPENED with the session."""
    run = _channel_run(db, sr_uuid, session)
    again = _reopened(db, run, "batch", open_id)
    if again is not None:
        return again
    conn_id = _new_conn(db, run, "batch", open_id, page)
    scope = batch_scope(run.batch["id"])
    listen(db, conn_id, scope)
    opened = _batch_snapshot(db, run.batch["id"])
    return _opened(conn_id, append_event(db, scope, opened, recipient=conn_id), opened)


def join_group_channel(db: Db, sr_uuid: str, open_id: str | None, session: AdminSession | None,
                       page: str | None = None) -> dict:
    """POST /publix/{sr}/group/join: join a group if not a member yet, then open a group conn."""
    run = _group_run(db, sr_uuid, session, first_group_only=True)
    again = _reopened(db, run, "group", open_id)
    if again is not None:
        return again
    group_id = run.sr["group_result_id"] or join_group(db, run.sr, run.batch)["id"]
    conn_id = _new_conn(db, run, "group", open_id, page)
    scope = group_scope(group_id)
    listen(db, conn_id, scope)
    group = group_row(db, group_id)
    opened = group_message(db, group, "OPENED", run.sr["id"], with_session=True)
    event_id = append_event(db, scope, opened, recipient=conn_id)
    append_event(db, scope, group_message(db, group, "OPENED", run.sr["id"]), exclude=conn_id)
    return _opened(conn_id, event_id, opened)


def reassign_group(db: Db, sr_uuid: str, session: AdminSession | None) -> bool:
    """GET /publix/{sr}/group/reassign: True if moved to another group, False if there is none."""
    run = _group_run(db, sr_uuid, session, first_group_only=True)
    if run.sr["group_result_id"] is None:
        return False
    target = group_candidate(db, run.batch, except_group=run.sr["group_result_id"])
    if target is None:
        return False
    move_to_group(db, run.sr, run.batch, target)
    return True


def leave_group_of(db: Db, sr_uuid: str, session: AdminSession | None) -> None:
    """GET /publix/{sr}/group/leave (a no-op for a run that is not in a group)."""
    leave_group(db, _group_run(db, sr_uuid, session, first_group_only=False).sr)


def own_conn(db: Db, sr_uuid: str, conn_id: str) -> sqlite3.Row:
    """The run's conn, with its open scope (if any) as column `scope`."""
    conn = db.one("SELECT c.*, cs.scope FROM channel_conns c JOIN study_results s ON s.id = c.study_result_id "
                  "LEFT JOIN channel_conn_scopes cs ON cs.conn = c.id AND cs.to_id IS NULL "
                  "WHERE c.id = ? AND s.uuid = ?", conn_id, sr_uuid)
    if conn is None:
        raise JatosError(404, f"Channel {conn_id} doesn't exist for study result {sr_uuid}.")
    return conn


def _open_own_conn(db: Db, sr_uuid: str, conn_id: str) -> sqlite3.Row:
    conn = own_conn(db, sr_uuid, conn_id)
    if conn["state"] != "open":
        raise JatosError(410, f"Channel {conn_id} is closed ({conn['close_reason']}).")
    return conn


def session_too_large(max_session: int) -> str:
    return f"The session would be larger than {human_bytes(max_session)}: the change was refused."


def _apply_patches(data: Any, patches: list) -> Any:
    """RFC 6902, all or nothing, with JATOS's rule that a first 'remove /' clears the session."""
    first = patches[0]
    if first.get("op") == "remove" and first.get("path") == "/":
        return {}
    return jsonpatch.apply_patch(data, patches)


def _session_patch(db: Db, words: SessionWords, row_id: int, scope: str, conn_id: str, frame: dict,
                   context: dict, max_session: int) -> None:
    """One session patch, serialised with every other write of the scope (§3.3)."""
    row = db.one(f"SELECT session_data, session_version FROM {words.table} WHERE id = ?", row_id)
    version = row["session_version"]
    action_id = frame.get(words.action_id)
    patches = frame.get(words.patches)

    def answer(action: str, answered_version: int) -> None:
        append_event(db, scope, {"action": action, **context, words.version: answered_version,
                                 words.action_id: action_id}, recipient=conn_id)

    if not isinstance(action_id, int) or isinstance(action_id, bool):
        append_event(db, scope, {"action": "ERROR", "errorMsg": f"Session patch without a numeric "
                                 f"'{words.action_id}'", **context}, recipient=conn_id)
        return
    if not isinstance(patches, list) or not patches or not all(isinstance(p, dict) for p in patches):
        return answer("SESSION_FAIL", version)
    if frame.get(words.versioning, True) is not False and frame.get(words.version) != version:
        return answer("SESSION_FAIL", version)
    try:
        data = _apply_patches(json.loads(row["session_data"] or "{}"), patches)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, KeyError, IndexError, TypeError,
            ValueError, AttributeError, RecursionError):  # RecursionError: data nested deeper than the stack
        return answer("SESSION_FAIL", version)
    text = to_json(data)
    if len(text.encode()) > max_session:
        append_event(db, scope, {"action": "ERROR", "errorMsg": session_too_large(max_session), **context},
                     recipient=conn_id)
        return answer("SESSION_FAIL", version)
    db.run(f"UPDATE {words.table} SET session_data = ?, session_version = ? WHERE id = ?",
           text, version + 1, row_id)
    append_event(db, scope, {"action": "SESSION", words.patches: patches, words.version: version + 1})
    answer("SESSION_ACK", version + 1)


def _batch_frame(db: Db, conn: sqlite3.Row, scope: str, frame: Any, max_session: int) -> None:
    def reply(message: dict) -> None:
        append_event(db, scope, message, recipient=conn["id"])

    if not isinstance(frame, dict):
        return reply({"action": "ERROR", "errorMsg": "Malformed message"})
    if "heartbeat" in frame:
        return reply({"heartbeat": "pong"})
    if frame.get("action") != "SESSION":
        return reply({"action": "ERROR", "errorMsg": f"Unknown action {frame.get('action')}"})
    _session_patch(db, BATCH_SESSION, int(scope[2:]), scope, conn["id"], frame, {}, max_session)


def _group_conn_of_member(db: Db, scope: str, member: str) -> str | None:
    sr_id = parse_id(member)
    if sr_id is None:
        return None
    return db.value("SELECT c.id FROM channel_conns c JOIN channel_conn_scopes s ON s.conn = c.id "
                    "WHERE c.study_result_id = ? AND c.kind = 'group' AND c.state = 'open' AND s.scope = ? "
                    "AND s.to_id IS NULL", sr_id, scope)


def _group_frame(db: Db, conn: sqlite3.Row, scope: str, frame: Any, max_session: int) -> None:
    group_id = scope[2:]

    def reply(message: dict) -> None:
        append_event(db, scope, message, recipient=conn["id"])

    if not isinstance(frame, dict):
        return reply({"action": "ERROR", "errorMsg": "Malformed message", "groupResultId": group_id})
    if "heartbeat" in frame:
        return reply({"heartbeat": "pong"})
    action = frame.get("action")
    if action == "SESSION":
        group = group_row(db, int(group_id))
        return _session_patch(db, GROUP_SESSION, group["id"], scope, conn["id"], frame,
                              {"groupResultId": group_id, "groupState": group["state"]}, max_session)
    if action == "FIXED":
        db.run("UPDATE group_results SET state = 'FIXED' WHERE id = ?", int(group_id))
        return reply({"action": "FIXED", "groupResultId": group_id, "groupState": "FIXED",
                      "sessionVersion": group_row(db, int(group_id))["session_version"]})
    if action is not None:
        return reply({"action": "ERROR", "errorMsg": f"Unknown action {action}", "groupResultId": group_id})
    forwarded = {"msg": frame["msg"]} if "msg" in frame else {}
    if "recipient" not in frame:
        append_event(db, scope, forwarded, exclude=conn["id"])
        return
    recipient = str(frame["recipient"])
    target = _group_conn_of_member(db, scope, recipient)
    if target is None:
        return reply({"action": "ERROR", "errorMsg": f"Recipient {recipient} isn't member of this group.",
                      "groupResultId": group_id})
    append_event(db, scope, {"recipient": recipient, **forwarded}, recipient=target)


def channel_send(db: Db, sr_uuid: str, conn_id: str, cseq: Any, frames: Any, max_session: int) -> None:
    """POST .../channels/{conn}/send: apply frames in order, exactly once per sequence number."""
    conn = _open_own_conn(db, sr_uuid, conn_id)
    if not isinstance(cseq, int) or isinstance(cseq, bool) or not isinstance(frames, list):
        raise JatosError(400, "A send needs a numeric 'cseq' and a list of 'frames'")
    if cseq <= conn["last_cseq"]:
        return
    if cseq != conn["last_cseq"] + 1:
        raise JatosError(409, f"Frames must be sent in order: expected cseq {conn['last_cseq'] + 1}")
    handle = _batch_frame if conn["kind"] == "batch" else _group_frame
    for frame in frames:
        handle(db, conn, conn["scope"], frame, max_session)
    db.run("UPDATE channel_conns SET last_cseq = ?, last_seen = ? WHERE id = ?", cseq, time.time(), conn_id)


def channel_ping(db: Db, sr_uuid: str, conn_id: str) -> None:
    _open_own_conn(db, sr_uuid, conn_id)
    db.run("UPDATE channel_conns SET last_seen = ? WHERE id = ?", time.time(), conn_id)


def channel_close(db: Db, sr_uuid: str, conn_id: str) -> None:
    conn = own_conn(db, sr_uuid, conn_id)
    if conn["state"] == "open":
        close_conn(db, conn, "client", terminate=False)


def _state_of_scope(db: Db, scope: str) -> dict:
    """The whole state of a batch or group channel as one message without an action: pages
    take it over silently (a resync)."""
    if scope.startswith("b:"):
        snapshot = _batch_snapshot(db, int(scope[2:]))
        return {"data": snapshot["data"], "version": snapshot["version"]}
    return group_message(db, group_row(db, int(scope[2:])), None, with_session=True)


def _resync(db: Db, conn: sqlite3.Row) -> dict:
    """A conn whose cursor fell behind pruning gets the whole state at once (no callbacks fire)."""
    message = _state_of_scope(db, conn_scope(db, conn["id"]))
    cursor = last_event_id(db)
    return {"cursor": cursor, "events": [{"id": cursor, "msg": message}]}


def session_object(db: Db, words: SessionWords, row_id: int, as_text: bool) -> dict:
    """GET /batches/{id}/session and /groups/{id}/session (formats-and-api.md §3.4.8)."""
    row = db.one(f"SELECT session_data, session_version FROM {words.table} WHERE id = ?", row_id)
    text = row["session_data"] or "{}"
    return {"version": row["session_version"], "sessionData": text if as_text else json.loads(text)}


def replace_session(db: Db, words: SessionWords, row_id: int, data: Any, expected_version: int | None,
                    max_session: int) -> int:
    """A researcher's edit of a whole session: applied only on the version it was made from
    (default: the current one); open channels take the new state over as a resync."""
    version = db.value(f"SELECT session_version FROM {words.table} WHERE id = ?", row_id)
    if expected_version is not None and expected_version != version:
        kind = "Batch" if words is BATCH_SESSION else "Group"
        raise JatosError(403, f"{kind} session version conflict", "FORBIDDEN")
    text = to_json(data)
    if len(text.encode()) > max_session:
        raise JatosError(413, session_too_large(max_session), "INVALID_REQUEST")
    db.run(f"UPDATE {words.table} SET session_data = ?, session_version = ? WHERE id = ?",
           text, version + 1, row_id)
    scope = batch_scope(row_id) if words is BATCH_SESSION else group_scope(row_id)
    append_event(db, scope, _state_of_scope(db, scope))
    return version + 1


def group_object(db: Db, group: sqlite3.Row) -> dict:
    """A group as GET /batches/{id}/groups shows it."""
    def members(column: str) -> list[int]:
        return [r[0] for r in db.all(f"SELECT id FROM study_results WHERE {column} = ? ORDER BY id", group["id"])]

    return {"id": group["id"], "groupState": group["state"], "groupSessionVersion": group["session_version"],
            "activeMemberCount": group["active_member_count"], "historyMemberCount": group["history_member_count"],
            "startDate": group["start_date"], "endDate": group["end_date"],
            "activeMemberList": members("group_result_id"), "historyMemberList": members("history_group_result_id"),
            "resultCount": group["active_member_count"] + group["history_member_count"]}


_CONN_EVENTS = f"""
    SELECT e.id, e.payload FROM channel_conn_scopes s JOIN channel_events e ON e.scope = s.scope
    WHERE s.conn = ? AND e.id > ? AND e.id > s.from_id AND (s.to_id IS NULL OR e.id <= s.to_id)
      AND (e.recipient IS NULL OR e.recipient = ?) AND (e.exclude IS NULL OR e.exclude <> ?)
    ORDER BY e.id LIMIT {MAX_EVENTS_PER_POLL}
"""


def conn_events(db: Db, sr_uuid: str, conn_id: str, cursor: int) -> dict:
    """What a poll answers for one conn: events after `cursor`, or that it is closed."""
    conn = own_conn(db, sr_uuid, conn_id)
    pruned = int(db.value("SELECT value FROM settings WHERE key = 'events_pruned_upto'") or 0)
    if cursor < pruned and conn["state"] == "open":
        return _resync(db, conn)
    rows = db.all(_CONN_EVENTS, conn_id, cursor, conn_id, conn_id)
    if rows:
        return {"cursor": rows[-1]["id"], "events": [{"id": r["id"], "msg": json.loads(r["payload"])} for r in rows]}
    if conn["state"] != "open":
        return {"closed": conn["close_reason"]}
    return {"cursor": cursor, "events": []}


_POLLED_CONNS = """
    SELECT c.id, c.state, c.last_seen, s.scope, s.from_id,
           (SELECT value FROM settings WHERE key = 'events_pruned_upto') AS pruned,
           (SELECT seq FROM sqlite_sequence WHERE name = 'channel_events') AS last_event
    FROM channel_conns c JOIN study_results r ON r.id = c.study_result_id
    LEFT JOIN channel_conn_scopes s ON s.conn = c.id AND s.to_id IS NULL
    WHERE c.id IN (SELECT value FROM json_each(?)) AND r.uuid = ?
"""


def memory_can_answer(conn: sqlite3.Row | None, cursor: int) -> bool:
    """Whether the events a conn gets after `cursor` are all in its open scope (and not pruned):
    then the hub's memory can pick them. A conn's earlier scopes all ended before its open
    scope began, so a cursor from that beginning on needs none of them."""
    return (conn is not None and conn["state"] == "open" and conn["scope"] is not None
            and conn["from_id"] <= cursor and cursor >= int(conn["pruned"] or 0))


def polled_conns(rows: Iterable[sqlite3.Row]) -> tuple[dict[str, sqlite3.Row], dict[str, str], list[str]]:
    """Rows of _POLLED_CONNS as: the conns by id, each conn's open scope ('' if none), and the
    open conns whose last_seen is old enough to be written again."""
    conns = {row["id"]: row for row in rows}
    due = time.time() - LAST_SEEN_REFRESH_SECONDS
    return (conns, {c: row["scope"] or "" for c, row in conns.items()},
            [c for c, row in conns.items() if row["state"] == "open" and row["last_seen"] < due])


def refresh_conns(db: Db, conn_ids: list[str]) -> None:
    """A poll showed their page is there: the conns are seen now."""
    db.run("UPDATE channel_conns SET last_seen = ? WHERE state = 'open' AND id IN (SELECT value FROM json_each(?))",
           time.time(), to_json(conn_ids))


def sweep_channels(db: Db, now: float, stale_seconds: float) -> None:
    """Close conns whose page has not polled for `stale_seconds`, and prune old events."""
    for conn in db.all("SELECT * FROM channel_conns WHERE state = 'open' AND last_seen < ?", now - stale_seconds):
        close_conn(db, conn, "stale", terminate=False)
    pruned = db.value("SELECT MAX(id) FROM channel_events WHERE created < ?", now - EVENT_RETENTION_SECONDS)
    if pruned:
        db.run("DELETE FROM channel_events WHERE id <= ?", pruned)
        db.run("INSERT OR REPLACE INTO settings(key, value) VALUES ('events_pruned_upto', ?)", str(pruned))


def clean_idle_group_members(db: Db) -> None:
    """JATOS's group cleaner: members not seen for 90 s and without an open group conn leave
    their group, and their run ends as FAIL."""
    idle = db.all("SELECT * FROM study_results sr WHERE group_result_id IS NOT NULL AND last_seen_date < ? "
                  "AND state NOT IN (?, ?, ?) AND NOT EXISTS (SELECT 1 FROM channel_conns c "
                  "WHERE c.study_result_id = sr.id AND c.kind = 'group' AND c.state = 'open')",
                  now_ms() - GROUP_MEMBER_IDLE_MS, *SR_DONE)
    for sr in idle:
        _finish_run(db, _run_of(db, sr), False, GROUP_CLEANER_MESSAGE)


def _delivered_to(conn_id: str, scope: str, event: ChannelEvent) -> bool:
    """Whether a conn listening on `scope` gets the event."""
    return event.scope == scope and event.recipient in (None, conn_id) and event.exclude != conn_id


@dataclasses.dataclass
class HeldPoll:
    """A poll between its arrival and its answer: what it waits for, and its answer so far."""

    sr_uuid: str
    wanted: list[tuple[str, int]]  # (conn id, cursor)
    deadline: float  # time.monotonic() when the hold ends
    generation: int  # the hub's generation its answer is from
    conn_changes: int  # the hub's conn_changes its answer is from
    answer: dict
    scopes: dict[str, str]  # conn id -> the scope whose events change its answer
    seen: list[str]  # conns whose last_seen is due to be written
    ticket: int = -1


class PollParked(BaseException):
    """Raised by a poll that waits without a thread, up to GuardedChannel.service, which leaves
    the request to its connection. A BaseException, so that bottle's and waitress's `except
    Exception` (answering 500) let it pass."""


class Parking:
    """A connection's way to hold its poll without a worker thread (GuardedChannel): `resume`
    queues the connection for a worker thread again, and the poll then continues its HeldPoll."""

    def __init__(self, channel: Any):
        self.channel = channel
        self.held: HeldPoll | None = None
        self.give_up: Callable[[int], None] = lambda ticket: None

    def resume(self) -> None:
        self.channel.server.add_task(self.channel)

    def end(self) -> None:
        """The request is answered or its connection closed: a ticket it still has is given up."""
        if self.held is not None:
            self.give_up(self.held.ticket)
            self.held = None


class ChannelHub:
    """Wakes the held polls of a channel scope when events were appended to it, in this process
    (commit hook) or another one (PRAGMA data_version, checked often); limits how many
    polls are held; runs the periodic channel maintenance.

    It also keeps the latest events this process committed, so that a woken poll can answer
    without reading the database: the memory holds every event with an id in
    (recent_from, recent_upto]. Events of another process leave a gap in the ids, or are
    found by the watcher; either empties the memory, and polls read the database again.
    Likewise it keeps, for a second, the conn rows an arriving poll read.
    """

    def __init__(self, store: Store, max_held: int, config: Config | None = None):
        self.store = store
        self.max_held = max_held
        self.config = config or Config()
        self._crowded = False  # warned that held polls near max_held
        self.generation = 0
        self._scope_generation: dict[str, int] = {}
        self._lock = threading.Lock()
        self._held: dict[int, tuple[str, tuple[str | None, str], int]] = {}  # ticket -> (browser, (run, page), order)
        # ("page", (run, page)), ("run", run) and ("browser", browser) -> their tickets in _held, oldest first
        self._held_in: dict[tuple[str, Any], dict[int, None]] = collections.defaultdict(dict)
        self._released: set[int] = set()
        self._waiting: dict[int, tuple[dict[str, str], Callable[[], None]]] = {}  # ticket -> (conn -> scope, wake-up)
        self._parked_until: list[tuple[float, int]] = []  # a heap of (deadline, ticket) of parked polls
        self._waiting_on: dict[str, set[int]] = collections.defaultdict(set)  # scope -> tickets in _waiting
        self._announced: set[int] = set()  # events of our own commits the watcher need not wake for
        self._recent: collections.deque[ChannelEvent] = collections.deque()
        self._recent_in: dict[str, collections.deque[ChannelEvent]] = {}  # the same events, by scope
        self._recent_bytes = 0
        self._recent_from = 0
        self._recent_upto = 0
        # (run, conn) -> (conn_changes when read, monotonic time read, _POLLED_CONNS row)
        self._polled: dict[tuple[str, str], tuple[int, float, sqlite3.Row]] = {}
        self.conn_changes = 0  # how many commits opened, moved, closed or deleted conns
        self._seen: dict[str, str] = {}  # conn -> run: conns polls saw whose last_seen is to be written
        self._seen_written = 0.0
        self._tickets = itertools.count()
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()
        self._maintenance_due = 0.0
        self._cleaning_due = time.time() + GROUP_CLEANER_INTERVAL_SECONDS
        store.on_commit.append(self.notify)

    def notify(self, events: list[ChannelEvent], conns_changed: bool) -> None:
        """(A commit hook, called in commit order.) Keep the events and wake the polls held on
        their scopes."""
        if not events and not conns_changed:
            return
        with self._lock:
            self.conn_changes += conns_changed
            if not events:
                return
            if self._watcher is not None:
                self._announced.update(event.id for event in events)
            self._remember(events)
            self._wake({event.scope for event in events}, None if conns_changed else events)

    def _remember(self, events: list[ChannelEvent]) -> None:
        """(Under the lock.) Events of one commit, ids ascending."""
        if events[0].id != self._recent_upto + 1:  # another process committed events in between
            self._forget_upto(events[0].id - 1)
        self._recent.extend(events)
        for event in events:
            self._recent_in.setdefault(event.scope, collections.deque()).append(event)
        self._recent_bytes += sum(event.size for event in events)
        self._recent_upto = events[-1].id
        while self._recent_bytes > self.config.recent_events_bytes:
            dropped = self._recent.popleft()
            in_scope = self._recent_in[dropped.scope]
            in_scope.popleft()
            if not in_scope:
                del self._recent_in[dropped.scope]
            self._recent_bytes -= dropped.size
            self._recent_from = dropped.id

    def _forget_upto(self, event_id: int) -> None:
        """(Under the lock.) From now on the memory can answer only for events after `event_id`.
        Another process committed: the conn rows polls read may be stale too."""
        self._polled.clear()
        self._recent.clear()
        self._recent_in.clear()
        self._recent_bytes = 0
        self._recent_from = self._recent_upto = max(event_id, self._recent_upto)

    def recent_answer(self, cursors: dict[str, tuple[str, int]], conn_changes: int, known_upto: int = 0) -> dict | None:
        """What a poll's conns (id -> (scope, cursor)) get from memory, or None if only the
        database can tell: a conn changed since the poll read it, a cursor is outside the memory,
        or the memory lacks events up to `known_upto` (committed by another process)."""
        with self._lock:
            if conn_changes != self.conn_changes or known_upto > self._recent_upto or not all(
                    self._recent_from <= cursor <= self._recent_upto for _, cursor in cursors.values()):
                return None
            return {conn_id: self._events_for(conn_id, scope, cursor) for conn_id, (scope, cursor) in cursors.items()}

    def poll_from_memory(self, sr_uuid: str, wanted: list[tuple[str, int]], conn_changes: int
                         ) -> tuple[dict, dict[str, str], list[str]] | None:
        """A poll's first answer from the memory (and at most one query): each conn's answer, its scope, and
        the conns whose last_seen is due to be written; None when only the database can tell."""
        conns, scopes, due = polled_conns(self._polled_rows(sr_uuid, [c for c, _ in wanted]))
        if not all(memory_can_answer(conns.get(conn_id), cursor) for conn_id, cursor in wanted):
            return None
        known_upto = max(conn["last_event"] or 0 for conn in conns.values())
        answer = self.recent_answer({c: (scopes[c], cursor) for c, cursor in wanted}, conn_changes, known_upto)
        return None if answer is None else (answer, scopes, due)

    def _polled_rows(self, sr_uuid: str, conn_ids: list[str]) -> list[sqlite3.Row]:
        """The _POLLED_CONNS rows of a poll's conns, read again only when a conn of this process
        changed since, or after POLLED_CONN_MEMORY_SECONDS (a page polls many times a second in
        a busy group). The rows' last event id and pruning mark may be older than the
        database's; both only grow, and the memory is checked against the ids it holds."""
        now = time.monotonic()
        with self._lock:
            known = [self._polled.get((sr_uuid, conn_id)) for conn_id in conn_ids]
            if all(self._still_valid(k, now) for k in known):
                return [k[2] for k in known]
            changes = self.conn_changes  # read before the query: a change committed meanwhile makes the rows stale
        rows = self.store.query(_POLLED_CONNS, to_json(conn_ids), sr_uuid)
        with self._lock:
            self._polled.update(((sr_uuid, row["id"]), (changes, now, row)) for row in rows)
        return rows

    def _still_valid(self, known: tuple[int, float, sqlite3.Row] | None, now: float) -> bool:
        """(Under the lock.) Whether remembered conn rows may still be used."""
        return known is not None and known[0] == self.conn_changes and now - known[1] < POLLED_CONN_MEMORY_SECONDS

    def mark_seen(self, sr_uuid: str, conn_ids: list[str]) -> None:
        """A poll showed the conns' page is there. The watcher writes their last_seen, many at a
        time (_write_seen), so that no poll waits for the write lock."""
        with self._lock:
            self._seen.update(dict.fromkeys(conn_ids, sr_uuid))

    def _write_seen(self) -> None:
        """Write the last_seen of the conns polls saw, and forget their rows, which a conn change
        does not (their last_seen is older now than the database's)."""
        with self._lock:
            seen, self._seen = self._seen, {}
        if seen:
            with self.store.tx() as db:
                refresh_conns(db, list(seen))
            with self._lock:
                for conn_id, sr_uuid in seen.items():
                    self._polled.pop((sr_uuid, conn_id), None)

    def _events_for(self, conn_id: str, scope: str, cursor: int) -> dict:
        newer = itertools.takewhile(lambda event: event.id > cursor, reversed(self._recent_in.get(scope, ())))
        events = [{"id": e.id, "msg": e.message} for e in newer if _delivered_to(conn_id, scope, e)]
        events = events[::-1][:MAX_EVENTS_PER_POLL]
        return {"cursor": events[-1]["id"] if events else cursor, "events": events}

    def _wake(self, scopes: set[str], events: list[ChannelEvent] | None = None) -> None:
        """(Under the lock.) Only the polls waiting on these scopes wake, not every held thread;
        given the events, only those with an event for one of their conns (a broadcast does
        not wake its sender's poll)."""
        self.generation += 1
        self._scope_generation.update(dict.fromkeys(scopes, self.generation))
        tickets = set().union(*(self._waiting_on.get(scope, ()) for scope in scopes))
        for ticket in tickets:
            conns = self._waiting[ticket][0]
            if events is None:
                wakes = not scopes.isdisjoint(conns.values())
            else:
                wakes = any(_delivered_to(conn_id, scope, event)
                            for event in events for conn_id, scope in conns.items())
            if wakes:
                self._fire(ticket)

    def _release(self, ticket: int) -> None:
        """(Under the lock.) Answer a held poll at once."""
        self._released.add(ticket)
        self._fire(ticket)

    def _await(self, ticket: int, generation: int, conns: dict[str, str], wake_up: Callable[[], None]) -> bool:
        """(Under the lock.) Have `wake_up` called once when a scope of `conns` (id -> scope) gets
        events after `generation`, or the ticket is released; False when that has happened already."""
        if ticket in self._released or self._news(generation, conns):
            return False
        self._waiting[ticket] = (conns, wake_up)
        for scope in conns.values():
            self._waiting_on[scope].add(ticket)
        return True

    def _fire(self, ticket: int) -> None:
        """(Under the lock.) Wake the poll up, at most once per wait."""
        wake_up = self._stop_waiting(ticket)
        if wake_up is not None:
            wake_up()

    def _stop_waiting(self, ticket: int) -> Callable[[], None] | None:
        """(Under the lock.) Forget a poll's wait; its wake-up, if it was waiting."""
        waiting = self._waiting.pop(ticket, None)
        if waiting is None:
            return None
        for scope in waiting[0].values():
            tickets = self._waiting_on[scope]
            tickets.discard(ticket)
            if not tickets:
                del self._waiting_on[scope]
        return waiting[1]

    def _news(self, generation: int, conns: dict[str, str]) -> bool:
        return any(self._scope_generation.get(scope, 0) > generation for scope in conns.values())

    def _watch(self) -> None:
        """Wakes polls for events other processes appended, and runs the maintenance even
        when no page polls (the group cleaner must still remove members of closed tabs)."""
        conn = self.store.connect()
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        seen = last_event_id(Db(conn))
        while not self._stopping.wait(WATCH_INTERVAL_SECONDS):
            try:
                self._resume_overdue()
                version, seen = self._wake_for_new_events(conn, version, seen)
                self._write_seen_when_due()
                self.maintain()
            except sqlite3.Error:
                log.exception("channel watcher: database error (retrying)")
                time.sleep(WATCH_ERROR_PAUSE_SECONDS)
        conn.close()
        with contextlib.suppress(sqlite3.Error):
            self._write_seen()

    def _write_seen_when_due(self) -> None:
        now = time.monotonic()
        if now - self._seen_written >= SEEN_WRITE_SECONDS:
            self._seen_written = now
            self._write_seen()

    def stop(self) -> None:
        """End the watcher and answer every held poll (an embedding application or a test
        shutting its server down)."""
        self._stopping.set()
        with self._lock:
            for ticket in self._held:
                self._release(ticket)
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def _wake_for_new_events(self, conn: sqlite3.Connection, version: int, seen: int) -> tuple[int, int]:
        """Any commit changes data_version, ours too; the events it added tell which scopes to wake."""
        current = conn.execute("PRAGMA data_version").fetchone()[0]
        if current == version:
            return version, seen
        rows = conn.execute("SELECT id, scope FROM channel_events WHERE id > ? ORDER BY id", (seen,)).fetchall()
        if rows:
            with self._lock:
                foreign = {row["scope"] for row in rows if not self._ours(row["id"])}
                self._announced = {event_id for event_id in self._announced if event_id > rows[-1]["id"]}
                if foreign:
                    self._forget_upto(rows[-1]["id"])
                    self._wake(foreign)
            seen = rows[-1]["id"]
        return current, seen

    def _ours(self, event_id: int) -> bool:
        """(Under the lock.) Whether this process committed the event. Our commit is visible
        before its hook has told us of it (notify): in that gap its ids are the store's
        committing_events, which is read first, since it is emptied only after the hook."""
        return event_id in self.store.committing_events or event_id in self._announced

    def start_watching(self) -> None:
        with self._lock:
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="jatos-lite-channel-watcher", daemon=True)
                self._watcher.start()

    @contextlib.contextmanager
    def hold(self, browser: str, page: str, number: int | None = None, run: str | None = None) -> Iterator[int]:
        """A ticket to hold a poll. Taking it releases (answers at once) the page's earlier poll,
        the run's oldest beyond two and the browser's oldest beyond four (browsers open about six
        connections per server, and the page's data requests need some), and the server's oldest
        when it holds its maximum. A page is named by the client, so it counts only within its
        run, and the browser key is a cookie the client may leave out: the run's share is what
        keeps one participant from pushing out the others' polls.
        A page's polls are ordered by the number it gives them, else by arrival: a poll the page
        aborted can reach the server after its successor, and is then answered at once itself."""
        ticket = self._take_ticket(browser, page, number, run)
        try:
            yield ticket
        finally:
            self._drop_ticket(ticket)

    def _take_ticket(self, browser: str, page: str, number: int | None, run: str | None) -> int:
        key = (run, page)
        with self._lock:
            ticket = next(self._tickets)
            order = ticket if number is None else number
            overtaken = any(self._held[held][2] > order for held in self._held_in.get(("page", key), ()))
            if overtaken:
                self._released.add(ticket)
            else:
                self._make_room(browser, key)
            self._held[ticket] = (browser, key, order)
            for group in self._groups_of(ticket):
                self._held_in[group][ticket] = None
        return ticket

    def _groups_of(self, ticket: int) -> list[tuple[str, Any]]:
        """(Under the lock.) The groups of held polls a ticket counts in."""
        browser, key, _ = self._held[ticket]
        return [("page", key), ("browser", browser)] + ([("run", key[0])] if key[0] is not None else [])

    def _drop_ticket(self, ticket: int) -> None:
        with self._lock:
            if ticket in self._held:
                for group in self._groups_of(ticket):
                    tickets = self._held_in[group]
                    del tickets[ticket]
                    if not tickets:
                        del self._held_in[group]
                del self._held[ticket]
            self._released.discard(ticket)
            self._stop_waiting(ticket)

    def _make_room(self, browser: str, key: tuple[str | None, str]) -> None:
        """(Under the lock.) Release what a new held poll of the page `key` (run, page) replaces
        or pushes out."""
        for held in list(self._held_in.get(("page", key), ())):
            self._release(held)
        if key[0] is not None:
            self._release_oldest(("run", key[0]), HELD_POLLS_PER_RUN)
        self._release_oldest(("browser", browser), HELD_POLLS_PER_BROWSER)
        holding = len(self._held) - len(self._released)  # every released ticket is still held until its poll ends
        if holding >= self.max_held:
            self._release(next(t for t in self._held if t not in self._released))
            holding -= 1
        self._note_crowding(holding + 1)

    def _release_oldest(self, group: tuple[str, Any], most: int) -> None:
        """(Under the lock.) Release the group's oldest held poll when it holds `most`."""
        holding = [t for t in self._held_in.get(group, ()) if t not in self._released]
        if len(holding) >= most:
            self._release(holding[0])

    def _note_crowding(self, held: int) -> None:
        """(Under the lock.) Warn once when held polls near the limit, again only after they fell
        well below it."""
        if not self._crowded and held >= self.max_held * CROWDED_SHARE:
            self._crowded = True
            log.warning("%d of at most %d pages are waiting for channel news: near the limit, pages wait "
                        "longer. Start jatos-lite with more --connections (now %d).", held, self.max_held,
                        self.config.connections)
        elif self._crowded and held < self.max_held * CROWDED_SHARE / 2:
            self._crowded = False

    def capacity(self) -> dict:
        """How many pages hold a channel poll, against the most that can, with advice when near it."""
        with self._lock:
            held = len(self._held)
        near = held >= self.max_held * CROWDED_SHARE
        advice = (f"{held} of at most {self.max_held} pages are connected to channels: near the limit, pages "
                  f"wait longer for messages. Restart jatos-lite with more connections, e.g. --connections "
                  f"{self.config.connections * 2}.") if near else None
        return {"connectedPages": held, "maxConnectedPages": self.max_held, "capacityWarning": advice}

    def wait(self, ticket: int, generation: int, conns: dict[str, str], timeout: float) -> bool:
        """Until the scope of one of `conns` (id -> scope) got events after `generation` (True),
        the ticket is released or the timeout passed (False), holding this thread."""
        wake_up = threading.Event()
        with self._lock:
            waiting = self._await(ticket, generation, conns, wake_up.set)
        if waiting:
            wake_up.wait(timeout)
        with self._lock:
            self._stop_waiting(ticket)
            return self._news(generation, conns)

    def released(self, ticket: int) -> bool:
        return ticket in self._released

    def _forget_old_polled(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._polled = {key: known for key, known in self._polled.items() if self._still_valid(known, now)}

    def poll(self, sr_uuid: str, wanted: list[tuple[str, int]], browser: str, page: str, number: int | None,
             hold_seconds: float, parking: Parking | None = None) -> dict:
        """The answer to a page's poll for its conns (id, cursor): at once when there is news,
        else when news comes, the hold ends, or the poll must make room (then with retryAfter).
        With `parking`, a poll waits without a thread: PollParked leaves the request to its
        connection, and the poll runs again (continuing its HeldPoll) when it is woken."""
        self.start_watching()
        held = parking.held if parking is not None else None
        if held is None:
            held = self._begin_poll(sr_uuid, wanted, hold_seconds)
            held.ticket = self._take_ticket(browser, page, number, sr_uuid)
            if held.seen:  # the page is there now (not necessarily when the answer leaves); most polls write nothing
                self.mark_seen(sr_uuid, held.seen)
        try:
            answer = self._answer_when_due(held, parking)
        except PollParked:
            raise
        except BaseException:
            self._drop_ticket(held.ticket)
            raise
        self._drop_ticket(held.ticket)
        return answer

    def _begin_poll(self, sr_uuid: str, wanted: list[tuple[str, int]], hold_seconds: float) -> HeldPoll:
        generation, conn_changes = self.generation, self.conn_changes
        # read first: a poll for conns that are not the run's is refused before it can push anyone out
        answer, scopes, seen = self.poll_from_memory(sr_uuid, wanted, conn_changes) \
            or self._poll_database(sr_uuid, wanted)
        return HeldPoll(sr_uuid, wanted, time.monotonic() + hold_seconds, generation, conn_changes,
                        answer, scopes, seen)

    def _answer_when_due(self, held: HeldPoll, parking: Parking | None) -> dict:
        while True:
            answer = held.answer
            news = any("closed" in a or a["events"] for a in answer.values())
            remaining = held.deadline - time.monotonic()
            if not news and self.released(held.ticket):
                answer["retryAfter"] = POLL_RETRY_AFTER_MS
            if news or "retryAfter" in answer or remaining <= 0:
                return answer
            if parking is None:
                self.wait(held.ticket, held.generation, held.scopes, remaining)
            elif self._park(held, parking):
                raise PollParked()
            self._catch_up(held)

    def _park(self, held: HeldPoll, parking: Parking) -> bool:
        """Leave the poll to its connection until news, its release or its deadline (False: it
        came already)."""
        with self._lock:
            if not self._await(held.ticket, held.generation, held.scopes, parking.resume):
                return False
            parking.held, parking.give_up = held, self._drop_ticket
            heapq.heappush(self._parked_until, (held.deadline, held.ticket))
            return True

    def _catch_up(self, held: HeldPoll) -> None:
        """A woken poll's answer now."""
        held.generation = self.generation
        cursors = {c: (held.scopes[c], held.answer[c]["cursor"]) for c in held.scopes}
        answer = self.recent_answer(cursors, held.conn_changes)
        if answer is None:
            held.conn_changes = self.conn_changes
            answer, held.scopes, _ = self._poll_database(held.sr_uuid, held.wanted)  # a held page is seen at its next poll
        held.answer = answer

    def _resume_overdue(self) -> None:
        """Wake the parked polls whose hold has ended."""
        now = time.monotonic()
        with self._lock:
            while self._parked_until and self._parked_until[0][0] <= now:
                self._fire(heapq.heappop(self._parked_until)[1])

    def _poll_database(self, sr_uuid: str, wanted: list[tuple[str, int]]) -> tuple[dict, dict[str, str], list[str]]:
        """Each conn's answer, the scope whose events would change it, and the conns whose
        last_seen is due to be written."""
        with self.store.snapshot() as db:
            answer = {conn_id: conn_events(db, sr_uuid, conn_id, cursor) for conn_id, cursor in wanted}
            _, scopes, due = polled_conns(db.all(_POLLED_CONNS, to_json([c for c, _ in wanted]), sr_uuid))
            return answer, scopes, due

    def maintain(self) -> None:
        now = time.time()
        if now < self._maintenance_due:
            return
        self._maintenance_due = now + self.config.sweep_interval_seconds
        self._forget_old_polled()
        with self.store.tx() as db:
            sweep_channels(db, now, self.config.presence_timeout_seconds)
            if now >= self._cleaning_due:
                self._cleaning_due = now + GROUP_CLEANER_INTERVAL_SECONDS
                clean_idle_group_members(db)


###############################################################################
# Archives: study archive import, results export (streamed), results deletion
###############################################################################

IMPORT_FLAG_DEFAULTS = {"keepProperties": False, "keepAssets": False, "keepCurrentAssetsName": True,
                        "renameAssets": True}
MAX_ARCHIVE_ENTRIES = 100_000


@dataclasses.dataclass
class StudyArchive:
    """An unpacked .jzip: the parsed .jas description and the folder holding the assets."""

    data: dict
    assets: Path
    legacy: bool  # version 0/2 archives from JATOS 1.x have no batches


def _archive_error(message: str) -> JatosError:
    return JatosError(400, message, "IMPORT_EXPORT_ERROR")


def _entry_parts(info: zipfile.ZipInfo) -> list[str]:
    name = info.filename
    if not info.flag_bits & 0x800:  # no UTF-8 flag: zipfile decoded cp437; many zippers wrote UTF-8 anyway
        with contextlib.suppress(UnicodeError):
            name = name.encode("cp437").decode("utf-8")
    return [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]


def _read_jas(raw: bytes) -> tuple[dict, bool]:
    try:
        document = load_json(raw.decode("utf-8-sig"))
    except (UnicodeError, ValueError) as exc:
        raise JatosError(400, f"File is not a valid JATOS study: {exc}", "VALIDATION_ERROR")
    if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
        raise JatosError(400, "File is not a valid JATOS study", "VALIDATION_ERROR")
    version = str(document.get("version"))
    if version not in ("0", "2", "3"):
        raise JatosError(400, f"Unsupported study archive version {document.get('version')!r}", "VALIDATION_ERROR")
    return document["data"], version != "3"


def _check_name_clashes(entries: list[tuple[zipfile.ZipInfo, list[str]]]) -> None:
    """A name that is a file in one entry and a folder in another (a/b and a/b/c) cannot be unpacked,
    and names that differ only in case (Stim.png, stim.png) are one file on Windows and macOS."""
    files = {tuple(parts) for info, parts in entries if not info.is_dir()}
    folders = {tuple(parts[:end]) for info, parts in entries for end in range(1, len(parts) + info.is_dir())}
    clashes = files & folders
    if clashes:
        raise _archive_error(f"The archive has a file and a folder both named {'/'.join(min(clashes))}")
    seen: dict[tuple[str, ...], tuple[str, ...]] = {}
    for name in sorted(files | folders):
        twin = seen.setdefault(tuple(part.lower() for part in name), name)
        if twin != name:
            raise _archive_error(f"The archive has both '{'/'.join(twin)}' and '{'/'.join(name)}', which differ only "
                                 "in case: Windows and macOS keep one file for both. Rename one (and the references "
                                 "to it) and export the study again.")


def unpack_study_archive(source: Any, target: Path, max_bytes: int) -> StudyArchive:
    """Unzip a study archive into `target`, refusing entries that escape it and zip bombs."""
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise _archive_error("Unpacking ZIP archive failed")
    with archive:
        entries = [(info, _entry_parts(info)) for info in archive.infolist()]
        entries = [(info, parts) for info, parts in entries if parts and parts[0] != "__MACOSX"]
        if len(entries) > MAX_ARCHIVE_ENTRIES or sum(info.file_size for info, _ in entries) > max_bytes:
            raise JatosError(413, "The study archive is too large when unpacked", "TOO_LARGE")
        descriptions = [info for info, parts in entries if len(parts) == 1 and not info.is_dir()
                        and parts[0].endswith("jas")]
        if len(descriptions) != 1:
            raise JatosError(400, "File is not a valid JATOS study", "VALIDATION_ERROR")
        folders = {parts[0] for info, parts in entries if len(parts) > 1 or info.is_dir()}
        if len(folders) > 1:
            raise _archive_error("The archive has more than one folder at its top level")
        _check_name_clashes(entries)
        data, legacy = _read_jas(archive.read(descriptions[0]))
        assets = target / "assets"
        assets.mkdir(parents=True)
        for info, parts in entries:
            if parts[0] not in folders or len(parts) < 2:
                continue
            destination = confined_path(assets, "/".join(parts[1:]))
            if destination is None or ".." in parts:
                raise _archive_error(f"Illegal name in archive: {info.filename}")
            if info.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as src, open(destination, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK_BYTES)
            except (zipfile.BadZipFile, zlib.error, OSError) as exc:
                raise _archive_error(f"Unpacking ZIP archive failed at {info.filename}: {exc}")
    return StudyArchive(data, assets, legacy)


def _move_assets_in(uploaded: Path, studies_root: Path, name: str, trash: Path) -> None:
    """Put the uploaded assets folder at studies_root/name, moving what was there to trash."""
    target, old = studies_root / name, trash / "old_assets"
    replacing = target.exists()
    if replacing:
        move_folder(target, old)
    studies_root.mkdir(parents=True, exist_ok=True)
    try:
        move_folder(uploaded, target)
    except JatosError:
        if replacing:
            move_folder(old, target)  # the import fails whole: the old files stay where they were
        raise


def _merge_components(db: Db, study_id: int, components: list[tuple[str, dict]]) -> None:
    """Re-import: the file's order wins; known UUIDs are updated in place (keeping their results),
    components missing from the file are kept, deactivated, at the end."""
    existing = {c["uuid"]: c for c in components_of(db, study_id)}
    position = 0
    for uuid_, fields in components:
        position += 1
        if uuid_ in existing:
            _update_row(db, "components", existing.pop(uuid_)["id"], {**fields, "position": position})
        else:
            _insert_row(db, "components", {**fields, "study_id": study_id, "uuid": uuid_, "position": position})
    for component in existing.values():
        position += 1
        _update_row(db, "components", component["id"], {"active": False, "position": position})


def import_study(db: Db, config: Config, archive: StudyArchive, flags: dict[str, bool], trash: Path
                 ) -> tuple[int, bool]:
    """Create or overwrite the study of an unpacked archive (formats-and-api.md §1.5).
    Returns (study id, created)."""
    data = archive.data
    study_uuid = str(data.get("uuid") or new_uuid())
    fields = study_fields(data)
    components = [(str(c.get("uuid") or new_uuid()), component_fields(c))
                  for c in data.get("componentList") or [] if isinstance(c, dict)]
    batches = [] if archive.legacy else [(b.get("uuid"), batch_fields(b))
                                          for b in data.get("batchList") or [] if isinstance(b, dict)]
    uploaded_dir = validate_dir_name(data.get("dirName") or study_uuid)
    existing = db.one("SELECT * FROM studies WHERE uuid = ?", study_uuid)
    for uuid_, _ in components:
        owner = db.value("SELECT study_id FROM components WHERE uuid = ?", uuid_)
        if owner is not None and (existing is None or owner != existing["id"]):
            raise JatosError(403, f"Component {uuid_} has the same UUID as a component of another study.")
    if existing is not None:
        return _overwrite_study(db, config, existing, archive, fields, components, uploaded_dir, flags, trash), False
    if _dir_taken(db, config.studies, uploaded_dir):
        if not flags["renameAssets"]:
            raise JatosError(403, f"A study assets folder '{uploaded_dir}' exists already.")
        uploaded_dir = free_dir_name(db, config.studies, uploaded_dir)
    study_id = insert_study(db, fields, study_uuid, uploaded_dir, active=data.get("active") is not False)
    for uuid_, component in components:
        insert_component(db, study_id, component, uuid_)
    for uuid_, batch in batches or [(None, batch_fields(DEFAULT_BATCH))]:
        clash = uuid_ is not None and db.value("SELECT 1 FROM batches WHERE uuid = ?", uuid_)
        insert_batch(db, study_id, batch, None if clash else uuid_)
    _move_assets_in(archive.assets, config.studies, uploaded_dir, trash)
    return study_id, True


def _overwrite_study(db: Db, config: Config, study: sqlite3.Row, archive: StudyArchive, fields: dict,
                     components: list[tuple[str, dict]], uploaded_dir: str, flags: dict[str, bool],
                     trash: Path) -> int:
    if study["locked"]:
        raise JatosError(403, f"Study {study['id']} is locked.", "STUDY_LOCKED")
    dir_name = study["dir_name"]
    if not flags["keepAssets"]:
        if not flags["keepCurrentAssetsName"]:
            if _dir_taken(db, config.studies, uploaded_dir, except_study=study["id"]):
                raise JatosError(403, f"A study assets folder '{uploaded_dir}' exists already.")
            dir_name = uploaded_dir
    if not flags["keepProperties"]:
        _update_row(db, "studies", study["id"], {**fields, "dir_name": dir_name})
        log_description_change(db, study, fields["description"])
        _merge_components(db, study["id"], components)
    elif dir_name != study["dir_name"]:
        _update_row(db, "studies", study["id"], {"dir_name": dir_name})
    if not flags["keepAssets"]:
        old = config.studies / study["dir_name"]
        if old.exists() and dir_name != study["dir_name"]:
            move_folder(old, trash / "old_assets")
        _move_assets_in(archive.assets, config.studies, dir_name, trash)
    return study["id"]


def import_study_file(store: Store, config: Config, source: Any, flags: dict[str, bool] | None = None
                      ) -> tuple[int, bool]:
    """Import a .jzip (path or binary file object): unpack, validate, then one transaction."""
    flags = {**IMPORT_FLAG_DEFAULTS, **(flags or {})}
    config.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=config.tmp) as tmp:
        archive = unpack_study_archive(source, Path(tmp), config.max_archive)
        trash = Path(tmp) / "trash"
        trash.mkdir()
        with store.tx() as db:
            return import_study(db, config, archive, flags, trash)


# --- study archive export -------------------------------------------------------
# formats-and-api.md §1.8: what real JATOS imports. Every batch is written (JATOS writes only
# the first, but imports several), so an export re-imports into the same study.

def study_jas(db: Db, study: sqlite3.Row) -> dict:
    """The .jas document of a study, keys in JATOS 3.10's order, inputs under both names."""
    components = [{"uuid": c["uuid"], "title": c["title"], "htmlFilePath": c["html_file_path"],
                   "reloadable": bool(c["reloadable"]), "active": bool(c["active"]), "comments": c["comments"],
                   "componentInput": c["component_input"], "jsonData": c["component_input"]}
                  for c in components_of(db, study["id"])]
    batches = [{key: value for key, value in batch_object(b).items() if key != "id"}
               | {"batchInput": b["batch_input"], "jsonData": b["batch_input"]}
               for b in batches_of(db, study["id"])]
    return {"version": "3", "data": {
        "uuid": study["uuid"], "title": study["title"], "description": study["description"],
        "groupStudy": bool(study["group_study"]), "linearStudy": bool(study["linear_study"]),
        "allowPreview": bool(study["allow_preview"]), "dirName": study["dir_name"], "comments": study["comments"],
        "studyInput": study["study_input"], "jsonData": study["study_input"],
        "endRedirectUrl": study["end_redirect_url"], "studyEntryMsg": study["study_entry_msg"],
        "componentList": components, "batchList": batches}}


def _asset_entries(root: Path, dir_name: str) -> Iterator[tuple[str, Iterable[bytes]]]:
    """Every folder (so empty ones survive) and file of a study's assets, as archive entries."""
    yield f"{dir_name}/", []
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if confined_path(root, relative) is None:
            continue
        if path.is_dir():
            yield f"{dir_name}/{relative}/", []
        elif path.is_file():
            yield f"{dir_name}/{relative}", _file_chunks(path)


def study_archive(config: Config, jas: dict) -> Iterator[bytes]:
    """A .jzip of a study (its .jas document and its assets), produced while it is sent."""
    dir_name = jas["data"]["dirName"]
    entries = itertools.chain([(f"{dir_name}.jas", [to_json(jas).encode("utf-8")])],
                              _asset_entries(config.studies / dir_name, dir_name))
    return zip_stream(entries)


# --- result selection ---------------------------------------------------------

_VALUES = "(SELECT value FROM json_each(?))"
SELECTORS = {  # query parameter -> (JSON body key, SQL condition on a run `sr` or a component result `cr`)
    "studyId": ("studyIds", f"sr.study_id IN {_VALUES}"),
    "studyUuid": ("studyUuids", f"sr.study_id IN (SELECT id FROM studies WHERE uuid IN {_VALUES})"),
    "componentId": ("componentIds", f"cr.component_id IN {_VALUES}"),
    "componentUuid": ("componentUuids", f"cr.component_id IN (SELECT id FROM components WHERE uuid IN {_VALUES})"),
    "studyResultId": ("studyResultIds", f"sr.id IN {_VALUES}"),
    "componentResultId": ("componentResultIds", f"cr.id IN {_VALUES}"),
    "batchId": ("batchIds", f"sr.batch_id IN {_VALUES}"),
    "groupId": ("groupIds", f"COALESCE(sr.group_result_id, sr.history_group_result_id) IN {_VALUES}"),
    "workerId": ("workerIds", f"sr.worker_id IN {_VALUES}"),  # jatos-lite: JATOS's worker results page as a selector
}
COMPONENT_SELECTORS = ("componentId", "componentUuid", "componentResultId")  # the rest select whole runs


@dataclasses.dataclass(frozen=True)
class Selection:
    """The results a request selects (formats-and-api.md §3.4.1), kept as its selectors'
    values so that it is evaluated by the query that reads the results, never as a list of
    IDs. jatos-lite: run selectors (study, study result, batch, group, worker) select whole
    runs, also runs without component results (JATOS never shows those); component
    selectors select component results, and their runs with only those."""

    values: dict[str, frozenset]  # selector (query parameter) -> IDs or UUIDs; unknown ones match nothing

    def select(self, columns: str, joins: str = "", component_results_only: bool = False) -> tuple[str, list]:
        """`SELECT columns` over the selected runs `sr` and component results `cr` (plus
        `joins`), ending in its WHERE condition, so a caller may add `AND ...` and ORDER BY;
        and its arguments. A run without component results comes as one row with `cr`'s
        columns NULL, unless `component_results_only`. With component selectors alone the
        component results are joined as such, so that their indexes can be used."""
        terms = [(param, SELECTORS[param][1]) for param in SELECTORS if self.values.get(param)]
        runs = not component_results_only and any(param not in COMPONENT_SELECTORS for param, _ in terms)
        where = " OR ".join(condition for _, condition in terms) or "0"
        return (f"SELECT {columns} FROM study_results sr {'LEFT JOIN' if runs else 'JOIN'} component_results cr "
                f"ON cr.study_result_id = sr.id {joins} WHERE ({where})",
                [to_json(sorted(self.values[param], key=str)) for param, _ in terms])

    def studies(self) -> tuple[str, list]:
        """`SELECT id, uuid` of the studies the selection reaches, by ID, and its arguments."""
        sql, args = self.select("1")
        return f"SELECT s.id, s.uuid FROM studies s WHERE EXISTS ({sql} AND sr.study_id = s.id) ORDER BY s.id", args


def _ids_from_text(text: str) -> list[int]:
    """'1-10, 12' -> [1..10, 12]; JATOS's comma-separated IDs and inclusive ranges."""
    ids: list[int] = []
    for element in text.split(","):
        element = element.strip()
        if not element:
            continue
        low, sep, high = element.partition("-")
        start, stop = parse_id(low.strip()), parse_id(high.strip()) if sep else None
        if start is None or (sep and stop is None):
            raise JatosError(400, f"Invalid ID list: {text}", "INVALID_REQUEST")
        if stop is None:
            ids.append(start)
            continue
        if stop - start > 1_000_000:
            raise JatosError(400, f"Range too large: {element}", "INVALID_REQUEST")
        ids.extend(range(start, stop + 1))
    return ids


def _selector_values(param: str, value: Any) -> list:
    if value is None:
        return []
    if param.endswith("Uuid"):
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            raise JatosError(400, f"{SELECTORS[param][0]} takes UUID strings", "INVALID_REQUEST")
        return values
    if isinstance(value, str):
        return _ids_from_text(value)
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise JatosError(400, f"{SELECTORS[param][0]} takes IDs", "INVALID_REQUEST")
    return values


def parse_selection(query: list[tuple[str, str]], body: Any) -> Selection:
    """The union of query-string and JSON-body selectors (formats-and-api.md §3.4.1)."""
    selection: dict[str, set] = {param: set() for param in SELECTORS}
    for key, value in query:
        if key in SELECTORS:
            if key.endswith("Uuid"):
                selection[key].add(value)
            elif parse_id(value.strip()) is not None:
                selection[key].add(parse_id(value.strip()))
    if body is not None and not isinstance(body, dict):
        raise JatosError(400, "The request body must be a JSON object", "INVALID_JSON")
    by_body_key = {body_key: param for param, (body_key, _) in SELECTORS.items()}
    for key, value in (body or {}).items():
        if key not in by_body_key:
            raise JatosError(400, f"Unknown field '{key}'", "INVALID_JSON")
        selection[by_body_key[key]].update(_selector_values(by_body_key[key], value))
    return Selection({param: frozenset(values) for param, values in selection.items()})


def selection_of(param: str, *values: int | str) -> Selection:
    """One selector's selection, e.g. selection_of("studyId", 3)."""
    return Selection({param: frozenset(values)})


def text_matcher(text: str, regex: bool, case_sensitive: bool) -> Callable[[str], bool]:
    """Whether a text contains `text` (or, as a regular expression, matches it somewhere)."""
    if regex:
        try:
            pattern = re.compile(text, 0 if case_sensitive else re.IGNORECASE)
        except re.error as exc:
            raise JatosError(400, f"Invalid regular expression: {exc}", "INVALID_REQUEST")
        return lambda haystack: pattern.search(haystack) is not None
    if case_sensitive:
        return lambda haystack: text in haystack
    folded = text.casefold()
    return lambda haystack: folded in haystack.casefold()


def search_result_data(conn: sqlite3.Connection, selection: Selection, matches: Callable[[str], bool]) -> list[int]:
    """jatos-lite: the selected component results whose data matches (the admin page's filter)."""
    sql, args = selection.select("cr.id, cr.data", component_results_only=True)
    rows = conn.execute(sql + " AND cr.data IS NOT NULL ORDER BY cr.id", args)
    return [cr_id for cr_id, data in rows if matches(data)]


# --- results export -----------------------------------------------------------

_METADATA_COLUMNS = """
    s.id AS study_id, s.uuid AS study_uuid, s.title AS study_title,
    sr.id AS sr_id, sr.uuid AS sr_uuid, sr.study_code, w.comment AS worker_comment,
    sr.start_date AS sr_start, sr.end_date AS sr_end, sr.last_seen_date, sr.state AS sr_state,
    sr.message AS sr_message, sr.url_query_parameters, sr.worker_id, w.type AS worker_type,
    sr.batch_id, b.uuid AS batch_uuid, b.title AS batch_title,
    COALESCE(sr.group_result_id, sr.history_group_result_id) AS group_id,
    sr.confirmation_code, sr.quota_reached AS sr_quota, w.mturk_worker_id,
    cr.id AS cr_id, cr.component_id, c.uuid AS component_uuid, cr.start_date AS cr_start,
    cr.end_date AS cr_end, cr.state AS cr_state, cr.data_size, cr.quota_reached AS cr_quota,
    cr.message AS cr_message, c.title AS component_title"""
_EXPORT_JOINS = ("LEFT JOIN components c ON c.id = cr.component_id JOIN studies s ON s.id = sr.study_id "
                 "JOIN workers w ON w.id = sr.worker_id JOIN batches b ON b.id = sr.batch_id")


def _export_rows(conn: sqlite3.Connection, selection: Selection, columns: str = _METADATA_COLUMNS) -> Iterator[Any]:
    """The selection's rows as named tuples, streamed: one per component result and one
    (`cr_id` None) per run without any, study after study and in each by run and component
    result ID. A query per study reads the study's runs in the order of their index, so
    SQLite never sorts."""
    sql, args = selection.select(columns, _EXPORT_JOINS)
    for study_id, _ in conn.execute(*selection.studies()).fetchall():
        yield from _named_rows(conn.execute(sql + " AND sr.study_id = ? ORDER BY sr.id, cr.id", [*args, study_id]))


def result_path(sr_id: int, cr_id: int) -> str:
    return f"study_result_{sr_id}/comp-result_{cr_id}"


def _named_rows(cursor: sqlite3.Cursor) -> Iterator[Any]:
    """A cursor's rows as named tuples (row.sr_id): an export reads up to 30 columns of each
    row, and a sqlite3.Row looks each name up along its columns (a dict costs more to make)."""
    cursor.row_factory = None
    return map(collections.namedtuple("ExportRow", [column[0] for column in cursor.description])._make, cursor)


class _UploadedFiles:
    """The uploaded files of component results, asked for run after run (the export's rows
    come ordered by run). The uploads folder is listed once: when it holds at most
    `most_runs` run folders, runs not among them are known to have no files; otherwise
    each run's folder is listed, once. Either way no paths and stats per component result."""

    def __init__(self, config: Config, most_runs: int = 10_000):
        self.config = config
        self.root = str(config.uploads)  # run_uploads as text: a Path per run would cost more than the listing
        self.runs = self._runs_with_uploads(most_runs)
        self.sr_id: int | None = None
        self.folders: set[str] = set()

    def _runs_with_uploads(self, most: int) -> set[str] | None:
        """The names of the run folders, or None when there are more than `most`."""
        try:
            with os.scandir(self.root) as listing:
                names = set(itertools.islice((entry.name for entry in listing), most + 1))
        except FileNotFoundError:
            return set()
        return names if len(names) <= most else None

    def __call__(self, sr_id: int, cr_id: int) -> list[Path]:
        if sr_id != self.sr_id:
            self.sr_id, self.folders = sr_id, set()
            if self.runs is None or str(sr_id) in self.runs:
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    self.folders = set(os.listdir(os.path.join(self.root, str(sr_id))))
        if str(cr_id) not in self.folders:
            return []
        folder = run_uploads(self.config, sr_id) / str(cr_id)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".upload-"))


_json_text = json.encoder.encode_basestring  # a JSON string exactly as to_json writes one (ensure_ascii off)


def _json_scalar(value: Any) -> str:
    """A column's value (text, integer or NULL) exactly as to_json writes it, without the
    encoder to_json sets up for every call."""
    if value is None:
        return "null"
    if value.__class__ is str:
        return _json_text(value)
    return str(value) if value.__class__ is int else to_json(value)


def _json_bool(value: Any) -> str:
    return "true" if value else "false"


def _files_json(files: list[Path]) -> str:
    if not files:  # most component results
        return ""
    sizes = [(path.name, path.stat().st_size) for path in files]
    return ",".join('{"filename":%s,"size":%d,"sizeHumanReadable":"%s"}' % (
        _json_text(name), size, human_bytes(size)) for name, size in sizes)


def _component_result_json(row: Any, files: list[Path], details: bool = False) -> str:
    """One component result's metadata, written with templates rather than built as a dict
    (it is done for every row); tests compare it with JATOS's field order."""
    size = row.data_size
    data = '{"size":%d,"sizeHumanReadable":"%s"%s}' % (
        size, human_bytes(size), ',"filename":"data.txt"' if size == 0 else "")  # JATOS's quirk, on purpose
    more = (',"componentTitle":%s,"message":%s' % (_json_scalar(row.component_title), _json_scalar(row.cr_message))
            if details else "")
    return ('{"id":%d,"componentId":%d,"componentUuid":%s,"startDate":%s,"endDate":%s,"duration":%s,'
            '"componentState":%s,"path":"/%s","data":%s,"files":[%s],"isQuotaReached":%s%s}') % (
        row.cr_id, row.component_id, _json_text(row.component_uuid), _json_scalar(row.cr_start),
        _json_scalar(row.cr_end), _json_scalar(duration_text(row.cr_start, row.cr_end)),
        _json_text(row.cr_state), result_path(row.sr_id, row.cr_id), data, _files_json(files),
        _json_bool(row.cr_quota), more)


def _study_result_json(row: Any, component_results: str, details: bool = False) -> str:
    """One study result's metadata around its component results' JSON; optional fields only when JATOS writes them."""
    parts = ['{"id":%d,"uuid":%s,"studyCode":%s' % (row.sr_id, _json_text(row.sr_uuid),
                                                      _json_scalar(row.study_code))]
    if row.worker_comment:
        parts.append(',"comment":' + _json_scalar(row.worker_comment))
    parts.append(',"startDate":%s,"endDate":%s,"duration":%s,"lastSeenDate":%s,"studyState":%s' % (
        _json_scalar(row.sr_start), _json_scalar(row.sr_end),
        _json_scalar(duration_text(row.sr_start, row.sr_end)), _json_scalar(row.last_seen_date),
        _json_text(row.sr_state)))
    if row.sr_message:
        parts.append(',"message":' + _json_scalar(row.sr_message))
    query = row.url_query_parameters
    query = json.loads(query) if query and query != "{}" else None
    if query:
        parts.append(',"urlQueryParameters":' + to_json(query))
    parts.append(',"workerId":%d,"workerType":%s,"batchId":%d,"batchUuid":%s,"batchTitle":%s,"groupId":%s' % (
        row.worker_id, _json_text(row.worker_type), row.batch_id, _json_text(row.batch_uuid),
        _json_text(row.batch_title), _json_scalar(row.group_id)))
    if row.confirmation_code is not None:
        parts.append(',"confirmationCode":' + _json_scalar(row.confirmation_code))
    if details:
        parts.append(',"mturkWorkerId":' + _json_scalar(row.mturk_worker_id))
    parts.append(',"isQuotaReached":%s,"componentResults":[%s]}' % (_json_bool(row.sr_quota), component_results))
    return "".join(parts)


def _by_run(rows: Iterable[Any]) -> Iterator[list[Any]]:
    """Consecutive rows of the same study result, one run at a time (the cursor streams)."""
    group: list[Any] = []
    for row in rows:
        if group and group[-1].sr_id != row.sr_id:
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def metadata_chunks(conn: sqlite3.Connection, config: Config, selection: Selection, api_call: bool,
                    details: bool = False) -> Iterator[str]:
    """The results metadata JSON (§2.6), one study result at a time (a run without component
    results with `"componentResults": []`); `details` (jatos-lite, for the admin page) adds
    each component's title and message and the MTurk worker ID."""
    yield '{"apiVersion":"%s","data":[' % API_VERSION if api_call else '{"data":['
    rows = _export_rows(conn, selection)
    files = _UploadedFiles(config)
    first_study = True
    study_id = None
    for sr_rows in _by_run(rows):
        head = sr_rows[0]
        if head.study_id != study_id:
            if study_id is not None:
                yield "]}"
            yield ("" if first_study else ",") + to_json(
                {"studyId": head.study_id, "studyUuid": head.study_uuid, "studyTitle": head.study_title}
            )[:-1] + ',"studyResults":['
            first_study, study_id, first_sr = False, head.study_id, True
        component_results = ",".join(_component_result_json(row, files(row.sr_id, row.cr_id), details)
                                     for row in sr_rows if row.cr_id is not None)
        yield ("" if first_sr else ",") + _study_result_json(head, component_results, details)
        first_sr = False
    if study_id is not None:
        yield "]}"
    yield "]}"


ZIP64_LIMIT = 0xFFFFFFFF
DIRECTORY_SPILL_BYTES = 4 << 20  # past this, a ZIP's central directory waits in a temporary file
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_DATA_DESCRIPTOR = struct.Struct("<IIII")
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
_ZIP64_OFFSET = struct.Struct("<HHQ")


def _dos_time(moment: time.struct_time) -> tuple[int, int]:
    """(time, date) as ZIP headers store them."""
    return (moment.tm_hour << 11 | moment.tm_min << 5 | moment.tm_sec // 2,
            max(moment.tm_year - 1980, 0) << 9 | moment.tm_mon << 5 | moment.tm_mday)


def _gathered(pieces: Iterable[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Small pieces joined into chunks of about `size` bytes (fewer, larger writes)."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        if len(buffer) >= size:
            yield bytes(buffer)
            buffer.clear()
    yield bytes(buffer)


def zip_stream(entries: Iterable[tuple[str, Iterable[bytes]]], spill_bytes: int = DIRECTORY_SPILL_BYTES
               ) -> Iterator[bytes]:
    """A deflated ZIP produced while it is sent, in pieces of about 1 MiB: each entry's
    sizes and CRC follow its data (a data descriptor), and the central directory, about 90
    bytes per entry, is held in memory up to `spill_bytes` and in a temporary file beyond,
    so memory stays the same however many entries there are. ZIP64 end records when there
    are 65,535 entries or more, or the archive passes 4 GiB; a single entry must stay under
    4 GiB (uploads and result data are far smaller)."""
    return _gathered(_zip_pieces(entries, spill_bytes))


def _deflated(chunks: Iterable[bytes]) -> Generator[bytes, None, tuple[int, int, int]]:
    """An entry's data deflated (level 6, as zipfile); returns (CRC, size, deflated size)."""
    compressor, crc, size, packed_size = zlib.compressobj(6, zlib.DEFLATED, -15), 0, 0, 0
    for chunk in chunks:
        crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        packed = compressor.compress(chunk)
        if packed:
            packed_size += len(packed)
            yield packed
    packed = compressor.flush()
    yield packed
    return crc, size, packed_size + len(packed)


def _zip_pieces(entries: Iterable[tuple[str, Iterable[bytes]]], spill_bytes: int) -> Iterator[bytes]:
    dos_time, dos_date = _dos_time(time.localtime())
    offset = count = 0
    with tempfile.SpooledTemporaryFile(spill_bytes) as directory:
        for name, chunks in entries:
            encoded = name.encode("utf-8")
            header = _LOCAL_HEADER.pack(0x04034B50, 20, 0x0808, 8, dos_time, dos_date, 0, 0, 0, len(encoded), 0)
            yield header + encoded
            crc, size, packed_size = yield from _deflated(chunks)
            if size >= ZIP64_LIMIT or packed_size >= ZIP64_LIMIT:
                raise JatosError(500, f"{name} is too large for this archive (4 GiB per file)")
            yield _DATA_DESCRIPTOR.pack(0x08074B50, crc, packed_size, size)
            extra = _ZIP64_OFFSET.pack(1, 8, offset) if offset >= ZIP64_LIMIT else b""
            directory.write(_CENTRAL_HEADER.pack(
                0x02014B50, 45 if extra else 20, 45 if extra else 20, 0x0808, 8, dos_time, dos_date, crc,
                packed_size, size, len(encoded), len(extra), 0, 0, 0, 0, min(offset, ZIP64_LIMIT)) + encoded + extra)
            offset += _LOCAL_HEADER.size + len(encoded) + packed_size + _DATA_DESCRIPTOR.size
            count += 1
        directory_size = directory.tell()
        directory.seek(0)
        yield from read_chunks(directory, 1 << 16)  # small pieces: _gathered copies each into its buffer
    yield from _zip_end(count, offset, directory_size)


def _zip_end(count: int, offset: int, directory_size: int) -> Iterator[bytes]:
    """The end of central directory record, with ZIP64 records before it when needed."""
    if count >= 0xFFFF or offset >= ZIP64_LIMIT or directory_size >= ZIP64_LIMIT:
        yield struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, directory_size, offset)
        yield struct.pack("<IIQI", 0x07064B50, 0, offset + directory_size, 1)
        yield struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, ZIP64_LIMIT, ZIP64_LIMIT, 0)
    else:
        yield struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, directory_size, offset, 0)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as source:
        yield from read_chunks(source)


def _result_entries(conn: sqlite3.Connection, config: Config, selection: Selection, with_data: bool,
                    with_files: bool) -> Iterator[tuple[str, Iterable[bytes]]]:
    # only the IDs and the data: reading the metadata's 30 columns too made this 2.4 times as slow
    columns = "sr.id AS sr_id, cr.id AS cr_id" + (", cr.data AS data" if with_data else "")
    files = _UploadedFiles(config)
    for row in _export_rows(conn, selection, columns):
        sr_id, cr_id = row.sr_id, row.cr_id
        if cr_id is None:
            continue
        if with_files:
            for path in files(sr_id, cr_id):
                yield f"{result_path(sr_id, cr_id)}/files/{path.name}", _file_chunks(path)
        if with_data and row.data is not None:
            yield f"{result_path(sr_id, cr_id)}/data.txt", (row.data.encode("utf-8"),)


def results_archive(store: Store, config: Config, selection: Selection, api_call: bool = True) -> Iterator[bytes]:
    """The JATOS results archive (§2.7): files and data.txt per component result, metadata.json last."""
    conn = store.connect()
    try:
        metadata = (chunk.encode("utf-8") for chunk in metadata_chunks(conn, config, selection, api_call))
        entries = itertools.chain(_result_entries(conn, config, selection, with_data=True, with_files=True),
                                  [("metadata.json", metadata)])
        yield from zip_stream(entries)
    finally:
        conn.close()


def results_zip(store: Store, config: Config, selection: Selection, with_data: bool, with_files: bool
                ) -> Iterator[bytes]:
    """Data-only (§2.4) or files-only (§2.5) ZIP."""
    conn = store.connect()
    try:
        yield from zip_stream(_result_entries(conn, config, selection, with_data, with_files))
    finally:
        conn.close()


def results_metadata(store: Store, config: Config, selection: Selection, api_call: bool,
                     details: bool = False) -> Iterator[bytes]:
    conn = store.connect()
    try:
        for chunk in metadata_chunks(conn, config, selection, api_call, details):
            yield chunk.encode("utf-8")
    finally:
        conn.close()


METADATA_CSV_COLUMNS = ["Quota reached", "Result ID", "UUID", "Study code", "Start time", "End time", "Last seen",
                        "Duration", "Batch", "Batch ID", "Worker ID", "Type", "MTurk worker ID",
                        "MTurk confirmation code", "Group ID", "Files", "State", "Message"]


class CsvStyle(NamedTuple):
    """How a CSV export is written: for Excel, UTF-8 with a byte order mark (without it, Excel on
    Windows reads UTF-8 as the local code page and garbles umlauts), and `;` as the separator
    where Excel expects it (European locales, whose decimal separator is the comma)."""

    bom: bool = False
    delimiter: str = ","

    @classmethod
    def chosen(cls, excel: bool, semicolon: bool) -> CsvStyle:
        """The style the API's excel/semicolon flags and the CLI's --excel/--semicolon ask for."""
        return cls(excel, ";" if semicolon else ",")


def csv_chunks(header: list[str], row_groups: Iterable[list[list[Any]]], style: CsvStyle = CsvStyle()
               ) -> Iterator[bytes]:
    """CSV in UTF-8, one chunk per group of rows, so a stream holds one group at a time."""
    buffer = io.StringIO()
    if style.bom:
        buffer.write("\ufeff")
    writer = csv.writer(buffer, delimiter=style.delimiter)
    writer.writerow(header)
    for rows in row_groups:
        writer.writerows(rows)
        yield buffer.getvalue().encode("utf-8")
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue().encode("utf-8")


def _csv_time(ms: int | None, empty: str) -> str:
    return empty if ms is None else datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _metadata_csv_row(files: _UploadedFiles, rows: list[Any]) -> list[Any]:
    """One study result as the JATOS results table shows it (§2.8), times in the server's local time."""
    head = rows[0]
    names = [path.name for row in rows for path in files(row.sr_id, row.cr_id)]  # none for a run without any
    return [str(bool(head.sr_quota)).lower(), head.sr_id, head.sr_uuid, head.study_code or "none",
            _csv_time(head.sr_start, "never"), _csv_time(head.sr_end, "not yet"),
            _csv_time(head.last_seen_date, "never"), duration_text(head.sr_start, head.sr_end) or "not yet",
            head.batch_title, head.batch_id, head.worker_id, head.worker_type,
            head.mturk_worker_id or "none", head.confirmation_code or "none", head.group_id or "none",
            " ".join(names) or "none", head.sr_state, head.sr_message or "none"]


def results_metadata_csv(store: Store, config: Config, selection: Selection, style: CsvStyle = CsvStyle()
                         ) -> Iterator[bytes]:
    """jatos-lite: the results metadata as CSV, one row per study result, streamed."""
    conn = store.connect()
    try:
        files = _UploadedFiles(config)
        yield from csv_chunks(METADATA_CSV_COLUMNS, (
            [_metadata_csv_row(files, sr_rows)] for sr_rows in _by_run(_export_rows(conn, selection))), style)
    finally:
        conn.close()


def results_plain_text(store: Store, selection: Selection) -> Iterator[bytes]:
    """All selected data, one component result after another, each followed by a newline (§2.3)."""
    conn = store.connect()
    try:
        sql, args = selection.select("cr.data", component_results_only=True)
        for (data,) in conn.execute(sql + " AND cr.data IS NOT NULL ORDER BY cr.id", args):
            yield (data + "\n").encode("utf-8")
    finally:
        conn.close()


def _log_array_pieces(entries: Iterable[tuple[str]], limit: int) -> Iterator[bytes]:
    """JATOS's view of a log: a JSON array of the entries, newest first, cut after `limit`."""
    yield b"["
    for index, (entry,) in enumerate(entries):
        piece = to_json(STUDY_LOG_CUT) if index == limit else entry
        yield (("," if index else "") + piece).encode("utf-8")
        if index == limit:
            break
    yield b"]"


def study_log_stream(store: Store, study_uuid: str, entry_limit: int | None) -> Iterator[bytes]:
    """A study's log: without `entry_limit` the file JATOS keeps (a newline before each entry,
    oldest first); with it, the JSON array (a negative limit means the whole log)."""
    conn = store.connect()
    try:
        if entry_limit is None:
            rows = conn.execute("SELECT entry FROM study_log WHERE log = ? ORDER BY id", (study_uuid,))
            pieces: Iterable[bytes] = (("\n" + entry).encode("utf-8") for (entry,) in rows)
        else:
            rows = conn.execute("SELECT entry FROM study_log WHERE log = ? ORDER BY id DESC LIMIT ?",
                                (study_uuid, entry_limit + 1 if entry_limit >= 0 else -1))
            pieces = _log_array_pieces(rows, entry_limit)
        yield from _gathered(pieces)
    finally:
        conn.close()


CSV_ID_COLUMNS = ["studyResultId", "componentResultId", "componentId", "workerId", "batchId"]


def data_rows(data: str) -> list[dict[str, Any]]:
    """The rows of result data that is a table: CSV with a header line (jsPsych's .csv(),
    appended chunks may repeat the header), or JSON arrays of flat objects (lab.js; appends
    one after another). Anything else has no rows."""
    text = data.strip()
    if not text:
        return []
    if text[0] in "[{":
        return _json_rows(text)
    lines = text.splitlines()
    header = lines[0]
    body = "\n".join(line for line in lines[1:] if line != header)
    with contextlib.suppress(csv.Error):
        return list(csv.DictReader(io.StringIO(header + "\n" + body)))
    return []


def _json_rows(text: str) -> list[dict[str, Any]]:
    decoder, rows, position = json.JSONDecoder(), [], 0
    while position < len(text):
        try:
            value, position = decoder.raw_decode(text, position)
        except (ValueError, RecursionError):  # nested deeper than Python's stack: not a table either
            return []
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values()) for v in values):
            return []
        rows += values
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
    return rows


def _csv_value(value: Any) -> Any:
    """JSON's spelling for JSON's values: null is empty, booleans are true/false."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def results_csv(store: Store, selection: Selection, style: CsvStyle = CsvStyle()) -> Iterator[bytes]:
    """jatos-lite: tabular result data of the selection merged into one CSV, the JATOS IDs in
    the leading columns and the union of the data's columns after them (first seen first).
    Two passes over the rows, so memory holds the column names, not the data."""
    conn = store.connect()
    sql, args = selection.select("cr.study_result_id, cr.id, cr.component_id, sr.worker_id, sr.batch_id, cr.data",
                                 component_results_only=True)
    sql += " AND cr.data IS NOT NULL ORDER BY cr.id"
    try:
        columns: dict[str, None] = {}
        for row in conn.execute(sql, args):
            for record in data_rows(row[5]):
                columns.update(dict.fromkeys(record))
        data_columns = [c for c in columns if c not in CSV_ID_COLUMNS]
        yield from csv_chunks(CSV_ID_COLUMNS + data_columns, (
            [list(row[:5]) + [_csv_value(record.get(c)) for c in data_columns] for record in data_rows(row[5])]
            for row in conn.execute(sql, args)), style)
    finally:
        conn.close()


def result_file(db: Db, config: Config, filename: str, cr_id_text: str | None) -> Path:
    """GET /results/files/{filename}: one uploaded file, an export the study log records."""
    cr_id = parse_id(cr_id_text or "")
    if cr_id is None:
        raise JatosError(400, "componentResultId is required and must be a number")
    sr_id = db.value("SELECT study_result_id FROM component_results WHERE id = ?", cr_id)
    path = None if sr_id is None else confined_path(run_uploads(config, sr_id) / cr_id_text, filename)
    if path is None or not path.is_file():
        raise JatosError(404, f"Result file not found: {filename}")
    log_for_studies(db, studies_of_results(db, selection_of("componentResultId", cr_id)), "Exported single result file")
    return path


def studies_of_results(db: Db, selection: Selection) -> list[str]:
    """The UUIDs of the studies the selected results belong to."""
    sql, args = selection.studies()
    return [row["uuid"] for row in db.all(sql, *args)]


def _remove_runs(db: Db, config: Config, sr_ids: list[int]) -> None:
    """Study results with everything they hold: component results, uploads, applied
    requests and channel connections."""
    if not sr_ids:
        return
    ids = to_json(sr_ids)
    conns = "SELECT id FROM channel_conns WHERE study_result_id IN (SELECT value FROM json_each(?))"
    db.conns_changed = True
    db.run(f"DELETE FROM channel_conn_scopes WHERE conn IN ({conns})", ids)
    for table, column in (("channel_conns", "study_result_id"), ("applied_requests", "study_result_id"),
                          ("component_results", "study_result_id"), ("study_results", "id")):
        db.run(f"DELETE FROM {table} WHERE {column} IN (SELECT value FROM json_each(?))", ids)
    for sr_id in sr_ids:
        shutil.rmtree(run_uploads(config, sr_id), ignore_errors=True)


def delete_results(db: Db, config: Config, cr_ids: list[int]) -> list[int]:
    """Delete component results with their files, and every study result left empty."""
    ids = to_json(cr_ids)
    pairs = db.all("SELECT id, study_result_id FROM component_results WHERE id IN (SELECT value FROM json_each(?))",
                   ids)
    db.run("DELETE FROM component_results WHERE id IN (SELECT value FROM json_each(?))", ids)
    for cr_id, sr_id in pairs:
        shutil.rmtree(run_uploads(config, sr_id) / str(cr_id), ignore_errors=True)
    _remove_runs(db, config, [row[0] for row in db.all(
        "SELECT id FROM study_results sr WHERE id IN (SELECT value FROM json_each(?)) "
        "AND NOT EXISTS (SELECT 1 FROM component_results WHERE study_result_id = sr.id) ORDER BY id",
        to_json(sorted({sr_id for _, sr_id in pairs})))])
    return [cr_id for cr_id, _ in pairs]


def delete_selected_results(db: Db, config: Config, selection: Selection) -> tuple[list[int], int]:
    """DELETE of selected results: the component results (as delete_results) and the selected
    runs that have none; their studies' logs say so. Returns the deleted component results'
    IDs and how many runs without component results went."""
    studies = studies_of_results(db, selection)
    sql, args = selection.select("sr.id")
    empty_runs = [row[0] for row in db.all(sql + " AND cr.id IS NULL", *args)]
    sql, args = selection.select("cr.id", component_results_only=True)
    deleted = delete_results(db, config, [row[0] for row in db.all(sql + " ORDER BY cr.id", *args)])
    _remove_runs(db, config, empty_runs)
    log_for_studies(db, studies, "Removed result data and files")
    return deleted, len(empty_runs)


def delete_runs(db: Db, config: Config, where: str, *args: Any) -> None:
    """Delete the study results matching `where` (SQL over study_results) with everything they hold."""
    _remove_runs(db, config, [row[0] for row in db.all(f"SELECT id FROM study_results WHERE {where}", *args)])


def delete_batch_rows(db: Db, config: Config, batch_id: int) -> None:
    """A batch with its results, groups, study links and personal workers."""
    study_uuid = db.value("SELECT s.uuid FROM studies s JOIN batches b ON b.study_id = s.id WHERE b.id = ?",
                          batch_id)
    delete_runs(db, config, "batch_id = ?", batch_id)
    log_study_event(db, study_uuid, "Removed result data and files", by_user=True)
    workers = [r[0] for r in db.all("SELECT worker_id FROM study_links WHERE batch_id = ? AND worker_id IS NOT NULL "
                                    "AND worker_id <> ?", batch_id, JATOS_WORKER_ID)]
    db.run("DELETE FROM study_links WHERE batch_id = ?", batch_id)
    db.run("DELETE FROM batch_workers WHERE batch_id = ?", batch_id)
    db.run("DELETE FROM workers WHERE id IN (SELECT value FROM json_each(?)) "
           "AND id NOT IN (SELECT worker_id FROM study_results)", to_json(workers))
    db.run("DELETE FROM group_results WHERE batch_id = ?", batch_id)
    db.run("DELETE FROM batches WHERE id = ?", batch_id)
    log_study_event(db, study_uuid, "Removed batch", by_user=True, batchId=batch_id)


def delete_batch(db: Db, config: Config, batch: sqlite3.Row) -> None:
    """DELETE /batches/{id}: any batch but the study's first (its default batch)."""
    if batch["id"] == default_batch(db, batch["study_id"])["id"]:
        raise JatosError(403, "The default batch of a study can't be deleted.")
    delete_batch_rows(db, config, batch["id"])
    renumber(db, "batches", [row["id"] for row in batches_of(db, batch["study_id"])])


def delete_component(db: Db, config: Config, component: sqlite3.Row) -> None:
    """DELETE /components/{id}: the component and its results (runs left empty go too)."""
    delete_results(db, config, [r[0] for r in db.all("SELECT id FROM component_results WHERE component_id = ?",
                                                      component["id"])])
    db.run("DELETE FROM components WHERE id = ?", component["id"])
    renumber(db, "components", [r["id"] for r in components_of(db, component["study_id"])])
    log_study_event(db, study_uuid_of(db, component["study_id"]), "Removed result data and files", by_user=True)


def delete_study_rows(db: Db, config: Config, study: sqlite3.Row) -> None:
    """DELETE /studies/{id}, the database part: batches, results, components, the study.
    The caller removes the assets folder after the commit."""
    for batch in batches_of(db, study["id"]):
        delete_batch_rows(db, config, batch["id"])
    delete_runs(db, config, "study_id = ?", study["id"])
    db.run("DELETE FROM components WHERE study_id = ?", study["id"])
    db.run("DELETE FROM studies WHERE id = ?", study["id"])
    log_study_event(db, study["uuid"], "Removed study", by_user=True)
    retire_study_log(db, study["uuid"])


###############################################################################
# Web: the route table and its handlers (publix, study assets and jatos.js, admin, JATOS API v1)
###############################################################################

MAX_JSON_BODY = 10_000_000  # an API body (study properties, selections, sessions)
MAX_LOG_BODY = 100_000  # a jatos.log line
MAX_OPEN_BODY = 10_000  # opening a channel
FAVICON_CACHE_SECONDS = 86400
CONFIRMATION_COOKIE_SECONDS = 86400
SESSION_COOKIE = "JATOS_LITE_SESSION"
BROWSER_COOKIE = "JATOS_LITE_BROWSER"
API_PREFIX = "/jatos/api/v1"
_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em;line-height:1.5}}
button{{font-size:1.5em;padding:.2em 1em}} input{{font-size:1.2em}} .error{{color:#a00}}</style>
</head><body>{body}</body></html>"""


def html_page(title: str, body: str) -> str:
    """A minimal page; `body` must already be escaped."""
    return _PAGE.format(title=html.escape(title), body=body)


def content_type_for(path: Path | str) -> str:
    guessed = mimetypes.guess_type(str(path), strict=False)[0]
    if str(path).endswith((".js", ".mjs")):
        return "application/javascript"
    return guessed or "application/octet-stream"


def _flag(query: dict[str, str], name: str, default: bool) -> bool:
    text = query.get(name)
    if text is None:
        return default
    try:
        return _parse_bool(text)
    except ValueError:
        raise JatosError(400, f"Bad request: '{name}' must be true or false")


def _query() -> dict[str, str]:
    """The query string's parameters, first value of each, decoded as UTF-8."""
    return dict(reversed(_query_pairs()))


def _query_pairs() -> list[tuple[str, str]]:
    return urllib.parse.parse_qsl(bottle.request.environ.get("QUERY_STRING", ""), keep_blank_values=True)


def _cookie_header() -> str:
    """The Cookie header, read from the environ: bottle's header dict keeps itself in the
    environ it refers to, a reference cycle per request that only the garbage collector
    frees (whose pauses then hold every thread). UTF-8 as bottle reads it."""
    return bottle.request.environ.get("HTTP_COOKIE", "").encode("latin-1").decode("utf-8")


def _wants_html() -> bool:
    accept = bottle.request.get_header("Accept", "") or ""
    return any(part.split(";")[0].strip().lower() == "text/html" for part in accept.split(","))


def _is_ajax() -> bool:
    return bottle.request.get_header("X-Requested-With") == "XMLHttpRequest"


def _redirect(location: str) -> str:
    bottle.response.status = 303
    bottle.response.set_header("Location", location)
    return ""


def _read_body(limit: int) -> bytes:
    """At most `limit` bytes of the request body (one more tells that it was longer)."""
    length = bottle.request.content_length
    if length <= 0:
        return b""
    return bottle.request.environ["wsgi.input"].read(min(length, limit + 1))


def _text_body(limit: int) -> str | None:
    raw = _read_body(limit)
    if not raw:
        return None
    if len(raw) > limit:
        raise JatosError(413, f"Request body exceeds {human_bytes(limit)}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JatosError(400, "The request body is not valid UTF-8 text")


def _json_body(limit: int = MAX_JSON_BODY, required: bool = False) -> Any:
    text = _text_body(limit)
    if text is None or not text.strip():
        if required:
            raise JatosError(400, "A JSON body is required", "INVALID_JSON")
        return None
    try:
        return load_json(text)
    except ValueError as exc:
        raise JatosError(400, f"Malformed JSON: {exc}", "INVALID_JSON")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive of a single 'bytes=' range; raises 416 when unsatisfiable."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    else:
        start, end = max(size - int(last), 0), size - 1
    if start > end or start >= size:
        bottle.response.set_header("Content-Range", f"bytes */{size}")
        raise JatosError(416, "Requested range not satisfiable")
    return start, end


def _range_chunks(source: Any, remaining: int) -> Iterator[bytes]:
    with source:
        while remaining > 0:
            chunk = source.read(min(remaining, CHUNK_BYTES))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk


def send_file(path: Path, content_type: str | None = None, disposition: str = "inline",
              cache_control: str | None = None) -> Any:
    """A file as the response body, with Range support (video in Safari needs it). A file that
    may be kept (`cache_control` without no-store) carries an ETag and Last-Modified, and a
    browser that still has this version is answered 304 without the body."""
    response = bottle.response
    info = path.stat()
    size = info.st_size
    response.content_type = content_type or content_type_for(path)
    quoted = urllib.parse.quote(path.name)
    response.set_header("Content-Disposition", f"{disposition}; filename*=UTF-8''{quoted}")
    response.set_header("Accept-Ranges", "bytes")
    if cache_control:
        response.set_header("Cache-Control", cache_control)
        if "no-store" not in cache_control and _still_fresh(f'"{info.st_mtime_ns:x}-{info.st_size:x}"', info.st_mtime):
            response.status = 304
            return ""
    byte_range = _parse_range(bottle.request.get_header("Range", ""), size) if size else None
    source = open(path, "rb")
    if byte_range is None:
        response.set_header("Content-Length", str(size))
        return source
    start, end = byte_range
    source.seek(start)
    response.status = 206
    response.set_header("Content-Range", f"bytes {start}-{end}/{size}")
    response.set_header("Content-Length", str(end - start + 1))
    return _range_chunks(source, end - start + 1)


def send_client_file(relative: str, content_type: str, cache_control: str) -> Any:
    """A file the server ships (client_file), from memory, with the validators send_file gives."""
    shipped = client_file(relative)
    bottle.response.content_type = content_type
    bottle.response.set_header("Cache-Control", cache_control)
    if _still_fresh(shipped.etag, shipped.modified):
        bottle.response.status = 304
        return ""
    bottle.response.set_header("Content-Length", str(len(shipped.body)))
    return shipped.body


def _still_fresh(tag: str, modified: float) -> bool:
    """Set a file's validators; True if the request's conditional headers match them."""
    bottle.response.set_header("ETag", tag)
    bottle.response.set_header("Last-Modified", email.utils.formatdate(modified, usegmt=True))
    wanted = bottle.request.get_header("If-None-Match")
    if wanted is not None:
        return tag in (part.strip() for part in wanted.split(",")) or wanted.strip() == "*"
    since = bottle.request.get_header("If-Modified-Since")
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return since is not None and int(modified) <= email.utils.parsedate_to_datetime(since).timestamp()
    return False


def _error_page(message: str) -> str:
    return html_page("JATOS", f"<h1>A problem occurred:</h1><p class=\"error\">{html.escape(message)}</p>")


def envelope(data: Any = None, message: str | None = None) -> str:
    body: dict[str, Any] = {"apiVersion": API_VERSION}
    if message is not None:
        body["message"] = message
    if data is not None or message is None:
        body["data"] = data
    bottle.response.content_type = "application/json"
    return to_json(body)


def _render_error(exc: JatosError) -> str:
    """The one place errors become responses: API envelope, HTML page or plain text."""
    bottle.response.status = exc.status
    bottle.response.set_header("Cache-Control", "no-store")
    request = bottle.request
    level = logging.WARNING if exc.status >= 500 else logging.INFO
    log.log(level, "%s %s -> %s %s", request.method, request.fullpath, exc.status, exc.message)
    if request.path.startswith(API_PREFIX):
        bottle.response.content_type = "application/json"
        return to_json({"apiVersion": API_VERSION, "error": {"code": exc.code, "message": exc.message}})
    if _wants_html():
        bottle.response.content_type = "text/html; charset=utf-8"
        return _error_page(exc.message)
    bottle.response.content_type = "text/plain; charset=utf-8"
    return exc.message


def _catch_jatos_errors(callback: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except JatosError as exc:
            return _render_error(exc)
        except UnicodeDecodeError:  # bottle decodes header values as UTF-8 when they are read
            return _render_error(JatosError(400, "A request header or the body is not valid UTF-8."))
    return wrapper


def _security_headers() -> None:
    """The headers JATOS's Play filters add to every answer (publix-http.md §11.3); no
    X-Content-Type-Options, because study assets may rely on sniffing."""
    bottle.response.set_header("X-Frame-Options", "SAMEORIGIN")
    bottle.response.set_header("Referrer-Policy", "origin-when-cross-origin, strict-origin-when-cross-origin")
    bottle.response.set_header("X-XSS-Protection", "1; mode=block")
    bottle.response.set_header("X-Permitted-Cross-Domain-Policies", "master-only")


def _entry_page(db: Db, code: str | None, query: dict[str, str]) -> str:
    """GET /publix/run: the study entry page (publix-http.md §4.2), parameters re-encoded."""
    if not code:
        body = ("<h1>Start a study</h1><form id=\"f\"><input id=\"code\" minlength=\"11\" maxlength=\"11\" "
                "required autofocus> <button>&#9654;</button></form><script>document.getElementById('f')"
                ".onsubmit=function(e){e.preventDefault();location.href='/publix/'+encodeURIComponent("
                "document.getElementById('code').value.trim())+'" + html.escape(
                    "?" + urllib.parse.urlencode(query), quote=True).replace("'", "%27") + "';};</script>")
        return html_page("JATOS", body)
    link = db.one("SELECT * FROM study_links WHERE code = ?", code)
    if link is None:
        return html_page("JATOS", "<p class=\"error\">No valid study code</p>")
    if link["worker_type"] == "PersonalSingle" and db.value(
            "SELECT 1 FROM study_results WHERE study_code = ? AND state != 'PRE'", code):
        return html_page("JATOS", "<p class=\"error\">This study link is valid only once.</p>")
    study = db.one("SELECT s.* FROM studies s JOIN batches b ON b.study_id = s.id WHERE b.id = ?", link["batch_id"])
    message = study["study_entry_msg"] or "Press \u25b6 to start the experiment"
    target = f"/publix/{urllib.parse.quote(code)}?{urllib.parse.urlencode(query)}"
    return html_page("JATOS", "<p>" + html.escape(message).replace("\n", "<br>") + "</p>"
                     f"<p><a href=\"{html.escape(target)}\"><button>&#9654;</button></a></p>")


def _query_number(query: dict[str, str], key: str, default: int) -> int:
    number = parse_id(query.get(key, ""))
    return default if number is None else number


def _multi_frame_page(code: str, query: dict[str, str]) -> str:
    """GET /publix/runx: several runs of one link side by side in iframes."""
    frames = _query_number(query, "frames", 2)
    h_split = max(1, _query_number(query, "hSplit", 2))
    v_split = max(1, _query_number(query, "vSplit", 1))
    delay = _query_number(query, "delay", 50)
    rest = urllib.parse.urlencode({k: v for k, v in query.items() if k not in ("code", "frames", "hSplit",
                                                                               "vSplit", "delay")})
    base = f"/publix/{urllib.parse.quote(code)}"
    script = (f"var n={frames},done=0,base={json.dumps(base)},rest={json.dumps(rest)};"
              "function onIframeComplete(frameId,studyId){if(++done>=n)location.href='/jatos/'+studyId;}"
              "for(let i=1;i<=n;i++)setTimeout(function(){var f=document.createElement('iframe');"
              "f.src=base+'?frameId='+i+(rest?'&'+rest:'');document.getElementById('grid').appendChild(f);},"
              f"(i-1)*{delay});")
    style = (f"#grid{{display:grid;grid-template-columns:repeat({h_split},1fr);grid-template-rows:"
             f"repeat({v_split},1fr);height:100vh;gap:4px}}iframe{{width:100%;height:100%;border:1px solid #ccc}}"
             "body{margin:0}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>JATOS</title><style>{style}</style>"
            f"</head><body><div id=\"grid\"></div><script>{script}</script></body></html>")


# --- the OpenAPI document of the API (GET /openapi.yaml) ------------------------------------
# Exactly the routes create_app registers under API_PREFIX (a test holds the two together);
# request bodies are named by their keys only. Served as JSON, which is also YAML.

_BINARY = {"type": "string", "format": "binary"}
_TEXT = {"schema": {"type": "string"}}
_ENVELOPE_ANSWER = {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
_ZIP_ANSWER = {"application/zip": {"schema": _BINARY}}
_FILE_ANSWER = {"application/octet-stream": {"schema": _BINARY}}


def _query_parameter(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "schema": schema, "description": description}


def _flag_parameter(name: str, default: bool, description: str) -> dict:
    return _query_parameter(name, {"type": "boolean", "default": default}, description)


def _selector_parameter(name: str) -> dict:
    what = ("component results" if name in COMPONENT_SELECTORS
            else "whole study results, also those without component results (jatos-lite)")
    item = {"type": "string" if name.endswith("Uuid") else "integer"}
    return _query_parameter(name, {"type": "array", "items": item}, f"Selects {what}; repeat the parameter for several")


_PATH_PARAMETERS = {
    "study_id": "The study's ID or UUID",
    "key": "The component's or batch's ID or UUID; a group's ID",
    "batch_id": "The batch's ID or UUID",
    "token_id": "The API token's ID",
    "user_id": "The user's ID (jatos-lite has one user, 1)",
    "code": "A study code",
    "filepath": "A path inside the study's assets folder ('/' may stay unencoded)",
    "filename": "The name of an uploaded result file",
}
OPENAPI_PARAMETERS = {
    **{name: {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": text}
       for name, text in _PATH_PARAMETERS.items()},
    **{name: _selector_parameter(name) for name in SELECTORS},
    **{name: _flag_parameter(name, default, "Study import flag (formats-and-api.md §1.5)")
       for name, default in IMPORT_FLAG_DEFAULTS.items()},
    "withComponentProperties": _flag_parameter("withComponentProperties", False, "Components as full objects"),
    "withBatchProperties": _flag_parameter("withBatchProperties", False, "Batches as full objects"),
    "flatten": _flag_parameter("flatten", False, "A flat list of the files instead of a tree"),
    "download": _flag_parameter("download", True, "As an attachment"),
    "textDownload": _flag_parameter("download", False, "With asPlainText: as an attachment"),
    "logDownload": _flag_parameter("download", True, "The log file; false: a JSON array, newest first"),
    "entryLimit": _query_parameter("entryLimit", {"type": "integer", "default": -1},
                                   "With download=false: at most this many entries (-1: all)"),
    "asText": _flag_parameter("asText", False, "The session data as a JSON string"),
    "version": _query_parameter("version", {"type": "integer"}, "Replace only if the session still has it"),
    "asPlainText": _flag_parameter("asPlainText", False, "The data as plain text instead of a ZIP"),
    "isApiCall": _flag_parameter("isApiCall", True, "Wrap the metadata in the API envelope"),
    "format": _query_parameter("format", {"type": "string", "enum": ["csv"]}, "jatos-lite: as CSV"),
    "excel": _flag_parameter("excel", False, "jatos-lite, with format=csv: UTF-8 with a byte order mark, so that "
                                             "Excel shows accented letters right"),
    "semicolon": _flag_parameter("semicolon", False, "jatos-lite, with format=csv: ';' between values, as Excel "
                                                     "expects it in European languages"),
    "details": _flag_parameter("details", False, "jatos-lite: with components' titles and messages and the "
                                                 "MTurk worker ID (the admin page's table)"),
    "text": _query_parameter("text", {"type": "string"}, "The text to look for"),
    "regex": _flag_parameter("regex", False, "The text is a regular expression"),
    "caseSensitive": _flag_parameter("caseSensitive", False, "Upper and lower case differ"),
    "componentResultId": {**_query_parameter("componentResultId", {"type": "integer"},
                                             "The component result the file belongs to"), "required": True},
    "type": _query_parameter("type", {"type": "string"}, "Worker type of the study codes: ps, pm, gs, gm, mt, jatos"),
    "batchId": _query_parameter("batchId", {"type": "integer"}, "Their batch (default: the first)"),
    "comment": _query_parameter("comment", {"type": "string"}, "A comment for new personal workers"),
    "amount": _query_parameter("amount", {"type": "integer", "default": 1}, "How many personal study codes"),
}


def _object_body(properties: dict[str, dict], required: Iterable[str] = ()) -> dict:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _keys_body(keys: Iterable[str], required: Iterable[str] = ()) -> dict:
    return _object_body({key: {} for key in sorted(keys)}, required)


def _multipart_body(part: str) -> dict:
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [part], "properties": {part: _BINARY}}}}}


_ACTIVE_BODY = _object_body({"active": {"type": "boolean"}}, ["active"])
_SESSION_BODY = {"description": "The new session data", "content": {"application/json": {"schema": {}}}}
_ARCHIVE_BODY = {"required": True, "content": {
    **_multipart_body("study")["content"],
    **{media_type: {"schema": _BINARY} for media_type in ("application/zip", "application/octet-stream")}}}
_SELECTION_BODY = {"content": {"application/json": {"schema": {"type": "object", "properties": {
    body_key: {"oneOf": [{"type": "array", "items": {"type": "string" if param.endswith("Uuid") else "integer"}},
                         {"type": "string", "description": "IDs and ranges: '1-10,12'"}]}
    for param, (body_key, _) in SELECTORS.items()}}}}}


def _operation(summary: str, *query: str, body: dict | None = None, answer: dict | None = None,
               statuses: tuple[str, ...] = ("200",), **extra: Any) -> dict:
    """One operation: query parameters by their OPENAPI_PARAMETERS names, answers in the
    envelope unless `answer` says otherwise, every error in the error envelope."""
    operation: dict[str, Any] = {"summary": summary, **extra}
    if query:
        operation["parameters"] = [{"$ref": f"#/components/parameters/{name}"} for name in query]
    if body is not None:
        operation["requestBody"] = body
    success = {"description": "Success", "content": answer or _ENVELOPE_ANSWER}
    operation["responses"] = {**{status: success for status in statuses},
                              "default": {"$ref": "#/components/responses/Error"}}
    return operation


# --- Web: how a route runs ----------------------------------------------------------------
# A route is a row of ROUTES (at the end of this section): method, path, handler, kind and
# transaction. A handler is a plain function of a Call and the path's parameters. The
# route's kind says what runs around every handler of that kind:
#   plain   nothing more (jatos.js, study assets, the admin page, sign-in)
#   publix  a participant's request: no-store, the browser's ID cookies read and the
#           changed ones sent back once the handler succeeded
#   api     the JATOS API: the caller's token or admin session checked first (a change
#           made with the session cookie also needs the CSRF header)
# The transaction: "write" (the handler runs in a write transaction, committed before the
# answer leaves), "read" (in a read snapshot) or None (the handler takes its own, e.g.
# after reading a request body, so that no writer waits while a body is read). Every kind
# answers a returned Redirect with 303.


class Call:
    """One request as its handler sees it: the app's config, store and hub, the route's
    transaction (`db`), the API caller (`token`), and the request's query and cookies,
    parsed when first used."""

    def __init__(self, app: bottle.Bottle):
        self.config: Config = app.config["jatos_lite.config"]
        self.store: Store = app.config["jatos_lite.store"]
        self.hub: ChannelHub = app.config["jatos_lite.hub"]
        self.free_space: FreeSpace = app.config["jatos_lite.free_space"]
        self.db: Db = None  # type: ignore[assignment]  # set when the route takes a transaction
        self.token: dict = {}

    @functools.cached_property
    def query(self) -> dict[str, str]:
        return _query()

    @functools.cached_property
    def browser(self) -> Browser:
        return Browser(_cookie_header(), self.config.id_cookie_limit)

    def admin(self, db: Db | None = None) -> AdminSession | None:
        """The signed-in researcher whose browser this is (their test runs), if any."""
        return admin_session_of(db or self.db, self.config, _cookie_value(SESSION_COOKIE))

    def cookies_to_send(self) -> Iterable[str]:
        return self.__dict__["browser"].outgoing.values() if "browser" in self.__dict__ else ()


class Route(NamedTuple):
    method: str
    path: str
    handler: Callable[..., Any]
    kind: str = "plain"
    tx: str | None = None
    doc: dict | None = None  # an API route's OpenAPI operation
    place: str = "any"  # "participant" or "admin": the one listener that serves it (publix: participant)


@contextlib.contextmanager
def _route_transaction(call: Call, tx: str | None) -> Iterator[None]:
    if tx is None:
        yield
        return
    with call.store.tx() if tx == "write" else call.store.snapshot() as db:
        call.db = db
        yield


def _plain(call: Call, tx: str | None, run: Callable[[Call], Any]) -> Any:
    with _route_transaction(call, tx):
        return run(call)


def _publix(call: Call, tx: str | None, run: Callable[[Call], Any]) -> Any:
    bottle.response.set_header("Cache-Control", "no-store")  # a handler serving a file may say otherwise
    with _route_transaction(call, tx):
        answer = run(call)
    for header in call.cookies_to_send():
        bottle.response.add_header("Set-Cookie", header)
    return answer


def _api(call: Call, tx: str | None, run: Callable[[Call], Any]) -> Any:
    if tx is None:
        with call.store.snapshot() as db:
            call.token = authenticate(db, call.config)
        return run(call)
    with _route_transaction(call, tx):
        call.token = authenticate(call.db, call.config)
        return run(call)


_KINDS = {"plain": _plain, "publix": _publix, "api": _api}


class RouteKinds:
    """The bottle plugin that runs each route's handler with its Call, inside its kind."""

    name = "jatos_lite_route_kinds"
    api = 2

    def apply(self, handler: Callable, route: bottle.Route) -> Callable:
        around, tx = _KINDS[route.config["kind"]], route.config["tx"]
        place = "participant" if route.config["kind"] == "publix" else route.config["place"]

        def callback(**params: Any) -> Any:
            call = Call(route.app)
            _check_listener(call.config, place)
            answer = around(call, tx, lambda call: handler(call, **params))
            return _redirect(answer.location) if isinstance(answer, Redirect) else answer
        return callback


def is_admin_port(config: Config, port: int | str | None) -> bool:
    """Whether a request to this port reached the admin listener (always, when there is only one)."""
    return not config.admin_port or str(port) == str(config.admin_port)


def on_admin_listener(config: Config) -> bool:
    return is_admin_port(config, bottle.request.environ.get("SERVER_PORT"))


def _origin(port: int) -> str:
    """This server at another of its ports, by the host name the request used."""
    return f"http://{bottle.request.urlparts.hostname or 'localhost'}:{port}"


def _check_listener(config: Config, place: str) -> None:
    if not config.admin_port or place == "any":
        return
    admin = on_admin_listener(config)
    if place == "admin" and not admin:
        raise JatosError(404, f"The admin page and sign-in are at http://localhost:{config.admin_port}/jatos/ "
                              "on the computer running jatos-lite.")
    if place == "participant" and admin:
        raise JatosError(404, f"Study pages are served at port {config.port}, not at the admin port.")


def _cookie_value(name: str) -> str | None:
    return parse_cookie_header(_cookie_header()).get(name)


def authenticate(db: Db, config: Config) -> dict:
    """Bearer token, or the admin session cookie (state changes then need the CSRF header)."""
    request = bottle.request
    return api_caller(db, config, Credentials(
        request.get_header("Authorization", "") or "", _cookie_value(SESSION_COOKIE),
        _csrf_header(), request.method not in ("GET", "HEAD"),
        on_admin_listener(config)))


def _csrf_header() -> str:
    return bottle.request.get_header("X-CSRF-Token", "") or ""


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a request shows to be let into the API."""
    authorization: str  # the Authorization header
    session_secret: str | None  # the admin session cookie
    csrf: str  # the X-CSRF-Token header
    changes: bool  # the request changes something (not GET or HEAD)
    admin_listener: bool  # it came to the admin port (or the only port)


def api_caller(db: Db, config: Config, shown: Credentials) -> dict:
    """The caller's token metadata, or a JatosError saying why it isn't let in."""
    if "Bearer" in shown.authorization:
        metadata = check_api_token(db, config, shown.authorization.replace("Bearer", "", 1).strip())
        if metadata is None:
            raise JatosError(401, "Invalid api token", "INVALID_API_TOKEN")
        return metadata
    if not shown.admin_listener:  # a study page's script has the session cookie too
        raise JatosError(401, f"Send 'Authorization: Bearer <token>'; the admin page's session counts only at "
                              f"port {config.admin_port}", "AUTH_ERROR")
    session = admin_session_of(db, config, shown.session_secret)
    if session is None:
        raise JatosError(401, "Not signed in: send 'Authorization: Bearer <token>'", "AUTH_ERROR")
    if shown.changes:
        check_csrf(session, shown.csrf)
    return SESSION_CALLER


def check_csrf(session: AdminSession, header: str) -> None:
    """A change asked for with the session cookie carries the CSRF header (cross-site pages can't send it)."""
    if not csrf_matches(session, header):
        raise JatosError(403, "Missing or wrong X-CSRF-Token header", "FORBIDDEN")


def signed_in(session: AdminSession | None) -> AdminSession:
    if session is None:
        raise JatosError(401, "Please sign in with the link printed when jatos-lite started.")
    return session


def _unmatched(error: bottle.HTTPError) -> str:
    """Bottle's own 404 and 405 (no route), answered like every other error."""
    request = bottle.request
    return _render_error(JatosError(error.status_code if error.status_code == 405 else 404,
                                    f"Requested page {request.method} {request.fullpath} couldn't be found."))


def _crashed(error: bottle.HTTPError) -> str:
    log.error("internal error during %s %s", bottle.request.method, bottle.request.fullpath,
              exc_info=error.exception)
    return _render_error(JatosError(500, f"Internal JATOS error during {bottle.request.method} "
                                         f"{bottle.request.fullpath}. Check logs to get more information."))


def _json_answer(value: Any) -> str:
    bottle.response.content_type = "application/json"
    return to_json(value)


def _request_id() -> str | None:
    return bottle.request.get_header("X-Request-Id")


# --- Web: publix, starting and ending runs --------------------------------------------------

def ping(call: Call) -> str:
    bottle.response.content_type = "text/plain; charset=utf-8"
    return "pong"


def no_favicon(call: Call) -> str:
    """Browsers ask for it on every page; an empty answer keeps a 404 out of study consoles."""
    bottle.response.status = 204
    bottle.response.set_header("Cache-Control", f"max-age={FAVICON_CACHE_SECONDS}")
    return ""


def publix_entry_page(call: Call) -> str:
    return _entry_page(call.db, call.query.get("code"), call.query)


def publix_multi_frame(call: Call) -> Any:
    code = call.query.get("code", "").strip()
    if not code:
        raise JatosError(400, "Invalid study code")
    if _query_number(call.query, "frames", 2) <= 1:
        return Redirect(f"/publix/{urllib.parse.quote(code)}")
    return _multi_frame_page(code, call.query)


def publix_legacy_start(call: Call, study_id: str) -> Redirect:
    return legacy_start(call.db, study_id, call.query, call.config.legacy_links)


def publix_start(call: Call, code: str) -> Redirect:
    call.free_space.check()
    return start_run(call.db, code, call.query, call.browser, call.admin(), call.config.max_query_string)


def publix_end(call: Call, sr: str) -> Any:
    successful = _flag(call.query, "successful", True)
    run = end_run(call.db, sr, successful, call.query.get("message"), call.browser, call.admin())
    code = run.sr["confirmation_code"]
    if _is_ajax():
        bottle.response.content_type = "text/plain; charset=utf-8"
        return code if run.worker_type in MTURK_TYPES and code else ""
    if run.worker_type == "Jatos":
        return Redirect(f"/jatos/{run.study['id']}")
    if not successful:
        bottle.response.content_type = "text/html; charset=utf-8"
        return _error_page(call.query.get("message") or "The study was finished unsuccessfully.")
    suffix = f"?confirmationCode={code}" if code else ""
    return Redirect(f"/publix/{run.sr['uuid']}/final/endPage.html{suffix}")


def publix_abort(call: Call, sr: str) -> Any:
    run = abort_run(call.db, call.config, sr, call.query.get("message"), call.browser, call.admin())
    if _is_ajax():
        return ""
    if run.worker_type == "Jatos":
        return Redirect(f"/jatos/{run.study['id']}")
    return html_page("JATOS", "<h1>Cancelled Study</h1><p>All submitted data were deleted.</p>")


def publix_end_page(call: Call, sr: str) -> Any:
    page = end_page(call.db, call.config.studies, sr)
    if isinstance(page, Redirect):
        return page
    code = call.query.get("confirmationCode")
    if page is not None:
        if code:
            bottle.response.add_header("Set-Cookie", cookie_header("JATOS_CONFIRMATION_CODE",
                                                                   urllib.parse.quote(code), CONFIRMATION_COOKIE_SECONDS))
        return send_file(page, "text/html; charset=utf-8")
    if code:
        text = (f"<p>Confirmation code: <b>{html.escape(code)}</b></p><p>(Copy and paste the confirmation "
                "code to Amazon Mechanical Turk.)</p>")
    else:
        text = "<p>This study is finished. Thank you for your participation.</p>"
    return html_page("JATOS", text)


# --- Web: publix, inside a run ----------------------------------------------------------------

def publix_component_start(call: Call, sr: str, comp: str) -> Any:
    page = start_component(call.db, call.config.studies, sr, comp, call.query.get("message"), call.browser,
                           call.admin())
    if isinstance(page, Redirect):
        return page
    return send_file(page, "text/html; charset=utf-8", cache_control="no-cache, no-store")


def publix_init_data(call: Call, sr: str, comp: str) -> Any:
    data = init_data(call.db, sr, comp, call.admin())
    return data if isinstance(data, Redirect) else _json_answer(data)


def publix_heartbeat(call: Call, sr: str) -> str:
    heartbeat(call.db, sr)
    return ""


def publix_study_session(call: Call, sr: str) -> str:
    call.free_space.check()
    text = _text_body(call.config.max_result_data)
    with call.store.tx() as db:
        replay_or_apply(db, sr, _request_id(), lambda: set_study_session(db, sr, text, call.admin(db)) or "")
    return ""


def publix_result_data(call: Call, sr: str, comp: str, append: bool) -> str:
    call.free_space.check()
    raw = _read_body(call.config.max_result_data)
    with call.store.tx() as db:
        replay_or_apply(db, sr, _request_id(), lambda: write_result_data(
            db, call.config.max_result_data, sr, comp, raw, append, call.admin(db)) or "")
    return ""


def publix_log(call: Call, sr: str, comp: str) -> str:
    text = _text_body(MAX_LOG_BODY)
    with call.store.tx() as db:
        replay_or_apply(db, sr, _request_id(), lambda: write_study_log(db, sr, comp, text, call.admin(db)) or "")
    return ""


def _uploaded_file(max_upload: int) -> Upload | None:
    """The request's multipart part 'file', or only its size when it is far too large to parse."""
    request = bottle.request
    if request.content_length > max_upload + BODY_MARGIN:
        return Upload(request.content_length, None)
    if not (request.content_type or "").startswith("multipart/form-data"):
        return None
    part = request.files.get("file")
    if part is None:
        return None
    upload = Upload(part.file.seek(0, io.SEEK_END), part.file)
    part.file.seek(0)
    return upload


def publix_upload(call: Call, sr: str, comp: str, filename: str) -> str:
    call.free_space.check()
    upload = _uploaded_file(call.config.max_upload)
    with call.store.tx() as db:
        body = replay_or_apply(db, sr, _request_id(), lambda: store_result_file(
            db, call.config, sr, comp, filename, upload, call.admin(db)) or "File uploaded")
    bottle.response.content_type = "text/plain; charset=utf-8"
    return body


def publix_download(call: Call, sr: str, filename: str) -> Any:
    path = find_result_file(call.db, call.config, sr, filename, call.query.get("componentId"), call.admin())
    return send_file(path, content_type_for(path), "attachment", "no-store")


def publix_component_asset(call: Call, sr: str, comp: str, file: str) -> Any:
    if file in ("jatos.js", "jatos.min.js") or "jatos-publix" in file:
        return jatos_js(call) if file == "jatos.js" or file.endswith("jatos-publix/javascripts/jatos.js") \
            else _not_found(file)
    sr_row = call.db.one("SELECT * FROM study_results WHERE uuid = ?", sr)
    if sr_row is None:
        raise JatosError(400, f"A study result {sr} doesn't exist.")
    dir_name = call.db.value("SELECT dir_name FROM studies WHERE id = ?", sr_row["study_id"])
    if confined_path(call.config.studies / dir_name, file) is None:  # not even into another study's folder
        _not_found(file)
    end_page_asset = comp == "final" and sr_row["state"] in SR_DONE
    return study_asset(call, f"{dir_name}/{file}", check_cookie=not end_page_asset)


# --- Web: publix, batch and group channels over HTTP long-polling ------------------------------

def publix_websocket_refused(call: Call, sr: str) -> str:
    raise JatosError(400, "jatos-lite carries batch and group channels over HTTP: open them with POST.")


def publix_open_channel(call: Call, sr: str, opener: Callable[..., dict]) -> str:
    body = _json_body(MAX_OPEN_BODY)
    body = body if isinstance(body, dict) else {}
    open_id, page = body.get("openId"), body.get("page")
    with call.store.tx() as db:
        opened = opener(db, sr, str(open_id) if open_id else None, call.admin(db), page=str(page) if page else None)
    return _json_answer(opened)


def publix_group_reassign(call: Call, sr: str) -> str:
    moved = reassign_group(call.db, sr, call.admin())
    bottle.response.status = 200 if moved else 204
    return ""


def publix_group_leave(call: Call, sr: str) -> str:
    leave_group_of(call.db, sr, call.admin())
    return ""


def _poll_request(pairs: list[tuple[str, str]]) -> list[tuple[str, int]]:
    wanted = []
    for key, value in pairs:
        if key == "c":
            conn_id, _, cursor = value.partition(":")
            number = parse_id(cursor)
            if not conn_id or number is None:
                raise JatosError(400, f"Malformed poll parameter c={value} (expected conn:cursor)")
            wanted.append((conn_id, number))
    if not wanted or len(wanted) > 4:
        raise JatosError(400, "A poll names one to four channels: c=conn:cursor")
    return wanted


def _browser_key() -> str:
    """The browser's random key for sharing out held polls (a cookie, set when missing)."""
    key = _cookie_value(BROWSER_COOKIE) or ""
    if not re.fullmatch(r"[0-9a-f]{32}", key):
        key = secrets.token_hex(16)
        bottle.response.add_header("Set-Cookie", cookie_header(BROWSER_COOKIE, key, COOKIE_MAX_AGE,
                                                               http_only=True, same_site="Lax"))
    return key


def publix_channel_poll(call: Call, sr: str) -> str:
    pairs = _query_pairs()
    wanted, query = _poll_request(pairs), dict(reversed(pairs))
    wait_text = query.get("wait", "")
    longest = call.config.poll_hold_seconds
    hold = min(float(wait_text), longest) if re.fullmatch(r"\d+(\.\d+)?", wait_text) else longest
    page = query.get("page") or " ".join(sorted(c for c, _ in wanted))
    number = parse_id(query.get("n", ""))
    parking = bottle.request.environ.get(PARKING_KEY)
    return _json_answer(call.hub.poll(sr, wanted, _browser_key(), page, number, hold, parking))


def publix_channel_send(call: Call, sr: str, conn: str) -> str:
    call.free_space.check()
    body = _json_body(call.config.max_result_data, required=True)
    if not isinstance(body, dict):
        raise JatosError(400, "A send is a JSON object with 'cseq' and 'frames'")
    with call.store.tx() as db:
        channel_send(db, sr, conn, body.get("cseq"), body.get("frames"), call.config.max_session)
    return _json_answer({"cseq": body.get("cseq")})


def publix_channel_ping(call: Call, sr: str, conn: str) -> str:
    channel_ping(call.db, sr, conn)
    return _json_answer({"heartbeat": "pong"})


def publix_channel_close(call: Call, sr: str, conn: str) -> str:
    channel_close(call.db, sr, conn)
    bottle.response.status = 204
    return ""


# --- Web: study assets and jatos.js -----------------------------------------------------------

def _not_found(path: str) -> Any:
    raise JatosError(404, f"Resource '{path}' couldn't be found.")


def study_asset(call: Call, relative: str, check_cookie: bool = True) -> Any:
    path = confined_path(call.config.studies, relative)
    if path is None:
        _not_found(relative)
    dir_name = path.relative_to(call.config.studies).parts[0]
    if check_cookie and not call.browser.has_study_assets(call.db, dir_name):
        raise JatosError(403, f"You tried to access the file {relative} but it seems you have no access rights.")
    if not path.is_file():
        _not_found(relative)
    return send_file(path, cache_control="private, no-cache")  # private as in JATOS; kept, but revalidated


def jatos_js(call: Call) -> Any:
    # private as in JATOS (§11.2), and revalidated, so a new jatos-lite's jatos.js is used at once
    return send_client_file("jatos.js", "application/javascript; charset=utf-8", "private, no-cache")


# --- Web: the admin page, sign-in and researcher test runs (Jatos worker) ------------------------

def admin_login(call: Call) -> Redirect:
    token = call.query.get("token", "")
    if check_api_token(call.db, call.config, token) is None:
        raise JatosError(401, "Invalid or expired sign-in token.")
    secret = open_admin_session(call.db, token)
    bottle.response.add_header("Set-Cookie", cookie_header(SESSION_COOKIE, secret, ADMIN_SESSION_SECONDS,
                                                           http_only=True, same_site="Lax"))
    return Redirect("/jatos/")


def admin_logout(call: Call) -> str:
    """jatos-lite: sign out (POST with the CSRF header); the session ends and its cookie is cleared."""
    session = signed_in(call.admin())
    check_csrf(session, _csrf_header())
    end_admin_session(call.db, session)
    bottle.response.add_header("Set-Cookie", cookie_header(SESSION_COOKIE, "", 0, http_only=True, same_site="Lax"))
    return envelope(message="Signed out")


def admin_home(call: Call) -> Any:
    return send_client_file("admin.html", "text/html; charset=utf-8", "no-cache")


def admin_study_page(call: Call, study_id: str) -> Redirect:
    """Where a researcher's test run ends: the study on the admin page."""
    origin = "" if on_admin_listener(call.config) else _origin(call.config.admin_port)
    return Redirect(f"{origin}/jatos/#/studies/{urllib.parse.quote(study_id)}")


def admin_test_run(call: Call, study_id: str) -> Redirect:
    """A researcher's test run (Jatos worker) of the whole study or of one component."""
    code = start_researcher_run(call.db, signed_in(call.admin()), study_id, call.query.get("batchId"),
                                call.query.get("componentId"))
    return Redirect(f"{_origin(call.config.port) if call.config.admin_port else ''}/publix/{code}")


def admin_csrf_token(call: Call) -> str:
    """jatos-lite: the signed-in admin page learns its CSRF token here, and whether the disk is filling up."""
    return envelope({"signedIn": True, "csrfToken": signed_in(call.admin()).csrf_token,
                     "freeDiskBytes": call.free_space.bytes(), "diskWarning": call.free_space.warning()})


def api_server_status(call: Call) -> str:
    """jatos-lite: what the admin page shows about the server: free disk, pages connected to channels."""
    return envelope({"freeDiskBytes": call.free_space.bytes(), "diskWarning": call.free_space.warning(),
                     **call.hub.capacity()})


def api_addresses(call: Call) -> str:
    """jatos-lite: the addresses study links can be built from: this computer (localhost), then
    each network address the server listens on, with the participants' port."""
    port = call.config.port if call.config.admin_port else bottle.request.urlparts.port or call.config.port
    local = [{"url": f"http://localhost:{port}", "network": False}] if call.config.host in (
        "0.0.0.0", "", "127.0.0.1", "localhost") else []
    return envelope(local + [{"url": url, "network": True} for url in base_urls(call.config, port)
                             if not url.startswith("http://localhost:")])


@functools.cache
def _openapi_text() -> str:
    return json.dumps(openapi_document(), indent=2)


def openapi_yaml(call: Call) -> str:
    """The API's description; public, as JATOS serves its own. JSON text is YAML too."""
    bottle.response.content_type = "text/yaml"  # JATOS's type
    return _openapi_text()


def openapi_json(call: Call) -> str:
    bottle.response.content_type = "application/json"
    return _openapi_text()


# --- Web: JATOS API v1, tokens -------------------------------------------------------------------

def _check_user(user_id: str) -> None:
    if user_id != str(ADMIN_USER["id"]):
        raise JatosError(404, f"User {user_id} doesn't exist.", "NOT_FOUND")


def api_caller_token(call: Call) -> str:
    return envelope(call.token)


def api_tokens(call: Call, user_id: str) -> str:
    _check_user(user_id)
    return envelope(list_api_tokens(call.db))


def api_token_create(call: Call, user_id: str) -> str:
    """As JATOS: tokens made through the API expire after an hour, unless (jatos-lite)
    `expiresAfter` says otherwise in seconds (0: never)."""
    _check_user(user_id)
    body = strict_body(_json_body(required=True), {"name", "expiresAfter"}, "token")
    created = create_api_token(call.db, body.get("name"), body.get("expiresAfter", API_TOKEN_SECONDS))
    bottle.response.status = 201
    return envelope(created)


def api_token(call: Call, token_id: str) -> str:
    return envelope(token_metadata(find_token(call.db, token_id)))


def api_token_activate(call: Call, token_id: str) -> str:
    active = _active_flag(_json_body(required=True))
    return envelope({"id": set_token_active(call.db, token_id, active), "active": active})


def api_token_delete(call: Call, token_id: str) -> str:
    delete_api_token(call.db, token_id)
    return envelope(message="Token deleted successfully")


def _active_flag(body: Any) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("active"), bool):
        raise JatosError(400, 'Send {"active": true} or {"active": false}', "INVALID_REQUEST")
    return body["active"]


# --- Web: JATOS API v1, studies, components, batches ------------------------------------------------

def _study_answer(db: Db, study_id: int, created: bool) -> str:
    bottle.response.status = 201 if created else 200
    return envelope(study_object(db, _row(db, "studies", study_id)))


def api_studies_post(call: Call) -> str:
    """An archive upload imports a study; a JSON body creates one."""
    if (bottle.request.content_type or "").split(";")[0].strip().lower() == "application/json":
        body = strict_body(_json_body(required=True), STUDY_KEYS, "study")
        rename_assets = _flag(call.query, "renameAssets", True)
        with call.store.tx() as db:
            return _study_answer(db, create_study(db, call.config.studies, body, rename_assets), True)
    return api_study_import(call)


def api_study_import(call: Call) -> str:
    flags = {name: _flag(call.query, name, default) for name, default in IMPORT_FLAG_DEFAULTS.items()}
    study_id, created = import_study_file(call.store, call.config, _uploaded_archive(call.config), flags)
    with call.store.snapshot() as db:
        return _study_answer(db, study_id, created)


def _uploaded_archive(config: Config) -> Any:
    """The study archive in the request: a multipart part 'study' or the whole body."""
    request = bottle.request
    content_type = (request.content_type or "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        part = request.files.get("study")
        source = part.file if part is not None else None
    elif content_type in ("", "application/zip", "application/jzip", "application/octet-stream",
                          "application/x-zip-compressed"):
        source = request.body if request.content_length > 0 else None
    else:
        raise JatosError(415, f"Wrong content type {content_type}: send a .jzip", "WRONG_CONTENT_TYPE")
    if source is None:
        raise JatosError(400, "Missing study archive", "MISSING_FILE")
    if request.content_length > config.max_archive:
        raise JatosError(413, "The study archive is too large", "TOO_LARGE")
    return source


def _with_parts(query: dict[str, str]) -> tuple[bool, bool]:
    return _flag(query, "withComponentProperties", False), _flag(query, "withBatchProperties", False)


def api_studies(call: Call) -> str:
    with_parts = _with_parts(call.query)
    return envelope([study_object(call.db, row, *with_parts)
                     for row in call.db.all("SELECT * FROM studies ORDER BY id")])


def api_study(call: Call, study_id: str) -> str:
    return envelope(study_object(call.db, find_study(call.db, study_id), *_with_parts(call.query)))


def api_study_update(call: Call, study_id: str) -> str:
    study = find_study(call.db, study_id)
    update_study(call.db, call.config.studies, study, strict_body(_json_body(required=True), STUDY_KEYS, "study"))
    return envelope(study_object(call.db, _row(call.db, "studies", study["id"])))


def api_study_delete(call: Call, study_id: str) -> str:
    with call.store.tx() as db:
        study = find_study(db, study_id)
        delete_study_rows(db, call.config, study)
    shutil.rmtree(call.config.studies / study["dir_name"], ignore_errors=True)  # only once the rows are gone
    return envelope(message="Study deleted successfully")


def api_study_export(call: Call, study_id: str) -> Any:
    study = find_study(call.db, study_id)
    jas = study_jas(call.db, study)
    bottle.response.content_type = "application/zip"
    bottle.response.set_header("Content-Disposition", f'attachment; filename="jatos_study_{study["uuid"]}.jzip"')
    return study_archive(call.config, jas)


def api_study_log(call: Call, study_id: str) -> Any:
    """As JATOS: the log file by default; `download=false`: a JSON array, newest first, of
    at most `entryLimit` entries (default -1: all)."""
    study_uuid = find_study(call.db, study_id)["uuid"]
    if _flag(call.query, "download", True):
        bottle.response.content_type = "application/octet-stream"
        bottle.response.set_header("Content-Disposition", f'attachment; filename="jatos_studylog_{study_uuid}.log"')
        return study_log_stream(call.store, study_uuid, None)
    limit = call.query.get("entryLimit", "-1")
    if not re.fullmatch(r"-?[0-9]{1,18}", limit):
        raise JatosError(400, "Bad request: 'entryLimit' must be a number")
    bottle.response.content_type = "application/x-ndjson"  # JATOS's type, though the body is one JSON array
    return study_log_stream(call.store, study_uuid, int(limit))


class StudyPart(NamedTuple):
    """What the API needs to list, create, read, change and delete a study's components or batches."""

    table: str
    noun: str
    keys: set[str]
    fields: Callable[[dict], dict]
    to_object: Callable[[sqlite3.Row], dict]
    find: Callable[[Db, str], sqlite3.Row]
    insert: Callable[[Db, int, dict], int]
    update: Callable[[Db, Path, sqlite3.Row, Any], None]
    delete: Callable[[Db, Config, sqlite3.Row], None]


COMPONENTS = StudyPart("components", "component", COMPONENT_KEYS, component_fields, component_object,
                       find_component, insert_component, patch_component, delete_component)
BATCHES = StudyPart("batches", "batch", BATCH_KEYS, batch_fields, batch_object, find_batch, add_batch,
                    lambda db, studies, row, body: update_batch(db, row, strict_body(body, BATCH_KEYS, "batch")),
                    delete_batch)


def api_parts(part: StudyPart, call: Call, study_id: str) -> str:
    rows = call.db.all(f"SELECT * FROM {part.table} WHERE study_id = ? ORDER BY position",
                       find_study(call.db, study_id)["id"])
    return envelope([part.to_object(row) for row in rows])


def api_part_create(part: StudyPart, call: Call, study_id: str) -> str:
    study = find_study(call.db, study_id)
    row_id = part.insert(call.db, study["id"], part.fields(strict_body(_json_body(required=True), part.keys,
                                                                       part.noun)))
    return envelope(part.to_object(_row(call.db, part.table, row_id)))


def api_part(part: StudyPart, call: Call, key: str) -> str:
    return envelope(part.to_object(part.find(call.db, key)))


def api_part_update(part: StudyPart, call: Call, key: str) -> str:
    row = part.find(call.db, key)
    part.update(call.db, call.config.studies, row, _json_body(required=True))
    return envelope(part.to_object(_row(call.db, part.table, row["id"])))


def api_part_delete(part: StudyPart, call: Call, key: str) -> str:
    part.delete(call.db, call.config, part.find(call.db, key))
    return envelope(message=f"{part.noun.capitalize()} deleted successfully")


# --- Web: JATOS API v1, study assets (formats-and-api.md §3.6) --------------------------------------

def _assets_folder(call: Call, study_id: str) -> Path:
    return call.config.studies / find_study(call.db, study_id)["dir_name"]


def _asset_path(folder: Path, filepath: str) -> Path:
    path = confined_path(folder, filepath)
    if path is None:
        raise JatosError(400, f"Invalid file path '{filepath}'", "CLIENT_ERROR")
    return path


def _existing_asset(call: Call, study_id: str, filepath: str) -> Path:
    path = _asset_path(_assets_folder(call, study_id), filepath)
    if not path.is_file():
        raise JatosError(404, f"File '{filepath}' doesn't exist.", "NOT_FOUND")
    return path


def _asset_node(root: Path, path: Path) -> dict:
    info = path.stat()
    node = {"name": path.name, "path": path.relative_to(root).as_posix(),
            "type": "directory" if path.is_dir() else "file" if path.is_file() else "other",
            "creation": int(info.st_ctime * 1000), "lastModified": int(info.st_mtime * 1000),
            "size": info.st_size}
    if path.is_file():
        with open(path, "rb") as source:
            node["checksum"] = functools.reduce(lambda value, chunk: zlib.adler32(chunk, value),
                                                read_chunks(source), 1)
    elif path.is_dir():
        node["content"] = [_asset_node(root, child) for child in sorted(path.iterdir())]
    return node


def api_assets_structure(call: Call, study_id: str) -> str:
    folder = _assets_folder(call, study_id)
    if _flag(call.query, "flatten", False):
        return envelope([_asset_node(folder, path) for path in sorted(folder.rglob("*")) if path.is_file()])
    return envelope(_asset_node(folder, folder))


def api_asset_download(call: Call, study_id: str, filepath: str) -> Any:
    path = _existing_asset(call, study_id, filepath)
    return send_file(path, content_type_for(path), "attachment")


def api_asset_upload(call: Call, study_id: str, filepath: str = "") -> str:
    folder = _assets_folder(call, study_id)
    part = bottle.request.files.get("studyAssetsFile") if (bottle.request.content_type or "").startswith(
        "multipart/form-data") else None
    if part is None:
        raise JatosError(400, "Send the file as multipart part 'studyAssetsFile'", "MISSING_FILE")
    target = _asset_path(folder, filepath + part.raw_filename if filepath in ("", "/") or filepath.endswith("/")
                         else filepath)
    if target.is_dir():
        raise JatosError(400, f"'{filepath}' is a directory", "FILE_ALREADY_EXISTS")
    problem = portability_problem(folder, target)
    if problem:
        raise JatosError(400, problem, "CLIENT_ERROR")
    existed = target.is_file()
    write_file_durably(target, read_chunks(part.file))
    bottle.response.status = 200 if existed else 201
    return envelope(message="File overwritten successfully" if existed else "File uploaded successfully")


def api_asset_delete(call: Call, study_id: str, filepath: str) -> str:
    _existing_asset(call, study_id, filepath).unlink()
    return envelope(message="File deleted successfully")


# --- Web: JATOS API v1, study codes, sessions, groups --------------------------------------------

def api_study_codes(call: Call, study_id: str) -> str:
    if bottle.request.method == "GET" and call.token is SESSION_CALLER:
        raise JatosError(403, "Signed in with the admin page, make study codes with POST (and X-CSRF-Token)",
                         "FORBIDDEN")
    study = find_study(call.db, study_id)
    body = _json_body() if bottle.request.method == "POST" else None
    params = {**(body if isinstance(body, dict) else {}), **call.query}
    if not params.get("type"):
        raise JatosError(400, "Parameter 'type' is required")
    worker_type = worker_type_from_alias(params["type"])
    batch = find_batch(call.db, params["batchId"], study["id"]) if params.get("batchId") not in (None, "") \
        else default_batch(call.db, study["id"])
    try:
        amount = int(params.get("amount") or 1)
    except (TypeError, ValueError, OverflowError):
        raise JatosError(400, "Parameter 'amount' must be a number")
    return envelope(study_links_for(call.db, batch, worker_type, amount, params.get("comment")))


def api_study_code(call: Call, code: str) -> str:
    return envelope(study_code_object(call.db, code))


def api_study_code_update(call: Call, code: str) -> str:
    set_study_code_active(call.db, code, _active_flag(_json_body(required=True)))
    return envelope(study_code_object(call.db, code))


def api_study_links(call: Call, study_id: str) -> str:
    """jatos-lite: every study link of a study (the JATOS GUI's study links page)."""
    return envelope(study_links_of(call.db, find_study(call.db, study_id)["id"]))


class SessionOwner(NamedTuple):
    words: SessionWords
    find: Callable[[Db, str], sqlite3.Row]
    noun: str


BATCH_SESSIONS = SessionOwner(BATCH_SESSION, find_batch, "Batch")
GROUP_SESSIONS = SessionOwner(GROUP_SESSION, find_group, "Group")


def _expected_version(query: dict[str, str]) -> int | None:
    text = query.get("version")
    if text in (None, ""):
        return None
    version = parse_id(text)
    if version is None:
        raise JatosError(400, "Parameter 'version' must be a number")
    return version


def api_session(owner: SessionOwner, call: Call, key: str) -> str:
    return envelope(session_object(call.db, owner.words, owner.find(call.db, key)["id"],
                                   _flag(call.query, "asText", False)))


def api_session_replace(owner: SessionOwner, call: Call, key: str) -> str:
    body = _json_body()
    version = replace_session(call.db, owner.words, owner.find(call.db, key)["id"], {} if body is None else body,
                              _expected_version(call.query), call.config.max_session)
    return envelope({"version": version}, f"{owner.noun} session updated successfully")


def api_batch_groups(call: Call, batch_id: str) -> str:
    batch = find_batch(call.db, batch_id)
    return envelope([group_object(call.db, g) for g in
                     call.db.all("SELECT * FROM group_results WHERE batch_id = ? ORDER BY id", batch["id"])])


# --- Web: JATOS API v1, results ---------------------------------------------------------------------

def _selected_results(call: Call, exported: tuple[str, ...] = ()) -> Selection:
    """The request's selection; an export says so in its studies' logs."""
    body = _json_body() if "json" in (bottle.request.content_type or "") else None
    selection = parse_selection(_query_pairs(), body)
    if exported:
        with call.store.tx() as db:
            log_for_studies(db, studies_of_results(db, selection), *exported)
    return selection


def _download(kind: str, extension: str) -> None:
    bottle.response.set_header("Content-Disposition",
                               f'attachment; filename="jatos_results_{kind}{timestamp_for_filename()}.{extension}"')


def _csv_style(query: dict[str, str]) -> CsvStyle:
    """excel=true: with a byte order mark, so that Excel reads UTF-8; semicolon=true: `;` between values."""
    return CsvStyle.chosen(_flag(query, "excel", False), _flag(query, "semicolon", False))


def api_results(call: Call) -> Any:
    selection = _selected_results(call, RESULTS_EXPORTED)
    bottle.response.content_type = "application/zip"
    _download("", "zip")
    return results_archive(call.store, call.config, selection, _flag(call.query, "isApiCall", True))


def api_results_metadata(call: Call) -> Any:
    style = _csv_style(call.query)
    selection = _selected_results(call)
    if call.query.get("format") == "csv":
        bottle.response.content_type = "text/csv; charset=utf-8"
        _download("metadata_", "csv")
        return results_metadata_csv(call.store, call.config, selection, style)
    bottle.response.content_type = "application/json"
    if _flag(call.query, "download", True):
        _download("metadata_", "json")
    return results_metadata(call.store, call.config, selection, _flag(call.query, "isApiCall", True),
                            _flag(call.query, "details", False))


def api_results_data(call: Call) -> Any:
    query = call.query
    as_text = query.get("format") != "csv" and _flag(query, "asPlainText", False)
    style = _csv_style(query)
    selection = _selected_results(call, DATA_EXPORTED if as_text else RESULTS_EXPORTED)
    if query.get("format") == "csv":
        bottle.response.content_type = "text/csv; charset=utf-8"
        _download("data_", "csv")
        return results_csv(call.store, selection, style)
    if as_text:
        bottle.response.content_type = "text/plain; charset=UTF-8"
        if _flag(query, "download", False):
            _download("data_", "txt")
        return results_plain_text(call.store, selection)
    bottle.response.content_type = "application/zip"
    _download("data_", "zip")
    return results_zip(call.store, call.config, selection, with_data=True, with_files=False)


def api_results_files(call: Call) -> Any:
    selection = _selected_results(call, RESULTS_EXPORTED)
    bottle.response.content_type = "application/zip"
    _download("files_", "zip")
    return results_zip(call.store, call.config, selection, with_data=False, with_files=True)


def api_results_search(call: Call) -> str:
    """jatos-lite: the component results among the selected whose data contains `text`."""
    matches = text_matcher(call.query.get("text", ""), _flag(call.query, "regex", False),
                           _flag(call.query, "caseSensitive", False))
    selection = _selected_results(call)
    with call.store.snapshot() as db:
        return envelope(search_result_data(db.conn, selection, matches))


def api_results_delete(call: Call) -> str:
    """JATOS's answer, the deleted component results' IDs; jatos-lite: a message counts the
    deleted runs that had no component results, if there were any."""
    selection = _selected_results(call)
    with call.store.tx() as db:
        deleted, empty_runs = delete_selected_results(db, call.config, selection)
    noun = "study result" if empty_runs == 1 else "study results"
    return envelope(deleted, f"Deleted {empty_runs} {noun} without component results" if empty_runs else None)


def api_result_file(call: Call, filename: str) -> Any:
    path = result_file(call.db, call.config, filename, call.query.get("componentResultId"))
    return send_file(path, content_type_for(path), "attachment")


# --- Web: the route table ------------------------------------------------------------------------
# Every route the app serves, in matching order (bottle tries a path's patterns in this order,
# so a specific pattern stands before a general one such as <comp>/<file:path>). API routes
# carry their OpenAPI operation; the document at /openapi.yaml is built from this table.

_SELECTORS = tuple(SELECTORS)


def _results_doc(summary: str, method: str, query: tuple[str, ...], answer: dict) -> dict:
    return _operation(summary, *_SELECTORS, *query, answer=answer,
                      body=_SELECTION_BODY if method == "POST" else None)


def _results_delete_doc(method: str) -> dict:
    return _operation("Delete the selected component results (and study results left empty) and study results "
                      "without component results", *_SELECTORS,
                      body=_SELECTION_BODY, deprecated=method == "PUT")


_METADATA_ANSWER = {**_ENVELOPE_ANSWER, "text/csv": _TEXT}
_DATA_ANSWER = {**_ZIP_ANSWER, "text/plain": _TEXT, "text/csv": _TEXT}
_DATA_QUERY = ("asPlainText", "textDownload", "format", "excel", "semicolon")
_METADATA_QUERY = ("download", "isApiCall", "format", "excel", "semicolon", "details")
_STUDY_CODES_QUERY = ("type", "batchId", "comment", "amount")

ROUTES: tuple[Route, ...] = (
    Route("GET", "/ping", ping),
    Route("GET", "/favicon.ico", no_favicon),
    # publix: starting and ending runs
    Route("GET", "/publix/run", publix_entry_page, "publix", "read"),
    Route("GET", "/publix/runx", publix_multi_frame, "publix"),
    Route("GET", "/publix/<study_id>/start", publix_legacy_start, "publix", "write"),
    Route("GET", "/publix/<code>", publix_start, "publix", "write"),
    Route("GET", "/publix/<sr>/end", publix_end, "publix", "write"),
    Route("GET", "/publix/<sr>/abort", publix_abort, "publix", "write"),
    Route("GET", "/publix/<sr>/final/endPage.html", publix_end_page, "publix", "read"),
    # publix: channels
    Route("GET", "/publix/<sr>/group/join", publix_websocket_refused, "publix"),
    Route("GET", "/publix/<sr>/batch/open", publix_websocket_refused, "publix"),
    Route("POST", "/publix/<sr>/batch/open", functools.partial(publix_open_channel, opener=open_batch_channel),
          "publix"),
    Route("POST", "/publix/<sr>/group/join", functools.partial(publix_open_channel, opener=join_group_channel),
          "publix"),
    Route("GET", "/publix/<sr>/group/reassign", publix_group_reassign, "publix", "write"),
    Route("GET", "/publix/<sr>/group/leave", publix_group_leave, "publix", "write"),
    Route("GET", "/publix/<sr>/channels/poll", publix_channel_poll, "publix"),
    Route("POST", "/publix/<sr>/channels/<conn>/send", publix_channel_send, "publix"),
    Route("POST", "/publix/<sr>/channels/<conn>/ping", publix_channel_ping, "publix", "write"),
    Route("POST", "/publix/<sr>/channels/<conn>/close", publix_channel_close, "publix", "write"),
    # publix: inside a run
    Route("GET", "/publix/<sr>/files/<filename:path>", publix_download, "publix", "read"),
    Route("POST", "/publix/<sr>/studySessionData", publix_study_session, "publix"),
    Route("POST", "/publix/<sr>/heartbeat", publix_heartbeat, "publix", "write"),
    Route("GET", "/publix/<sr>/<comp>/start", publix_component_start, "publix", "write"),
    Route("GET", "/publix/<sr>/<comp>/initData", publix_init_data, "publix", "write"),
    Route("PUT", "/publix/<sr>/<comp>/resultData", functools.partial(publix_result_data, append=False), "publix"),
    Route("POST", "/publix/<sr>/<comp>/resultData", functools.partial(publix_result_data, append=True), "publix"),
    Route("POST", "/publix/<sr>/<comp>/log", publix_log, "publix"),
    Route("POST", "/publix/<sr>/<comp>/files/<filename:path>", publix_upload, "publix"),
    Route("GET", "/publix/<sr>/<comp>/<file:path>", publix_component_asset, "publix", "read"),
    # study assets and jatos.js
    Route("GET", "/study_assets_root/<relative:path>", study_asset, tx="read", place="participant"),
    Route("GET", "/study_assets/<relative:path>", study_asset, tx="read", place="participant"),
    Route("GET", "/assets/javascripts/jatos.js", jatos_js, place="participant"),
    Route("GET", "/assets/lib/jatos-publix/javascripts/jatos.js", jatos_js, place="participant"),
    # the admin page, sign-in, test runs
    Route("GET", "/jatos/login", admin_login, tx="write", place="admin"),
    Route("POST", "/jatos/logout", admin_logout, tx="write", place="admin"),
    Route("GET", "/jatos/", admin_home, place="admin"),
    Route("GET", "/jatos/<study_id>", admin_study_page),
    Route("GET", "/jatos/<study_id>/run", admin_test_run, tx="write", place="admin"),
    Route("GET", "/openapi.yaml", openapi_yaml),
    Route("GET", "/openapi.json", openapi_json),
    # JATOS API v1: tokens
    Route("GET", "/jatos/api/v1/admin/token", api_caller_token, "api", "read",
          _operation("The calling token's metadata")),
    Route("GET", "/jatos/api/v1/users/<user_id>/tokens", api_tokens, "api", "read", _operation("All API tokens")),
    Route("POST", "/jatos/api/v1/users/<user_id>/tokens", api_token_create, "api", "write", _operation(
        "Create an API token; the token is in the answer only this once (expiresAfter: seconds, 0: never)",
        body=_object_body({"name": {"type": "string"}, "expiresAfter": {"type": "integer"}}, ["name"]),
        statuses=("201",))),
    Route("GET", "/jatos/api/v1/tokens/<token_id>", api_token, "api", "read",
          _operation("One API token's metadata")),
    Route("PATCH", "/jatos/api/v1/tokens/<token_id>", api_token_activate, "api", "write",
          _operation("Activate or deactivate an API token", body=_ACTIVE_BODY)),
    Route("DELETE", "/jatos/api/v1/tokens/<token_id>", api_token_delete, "api", "write",
          _operation("Delete an API token")),
    Route("GET", "/jatos/api/v1/admin/session", admin_csrf_token, "plain", "read", _operation(
        "jatos-lite: the admin page's CSRF token and the data disk's free space (session cookie only)",
        security=[{"adminSession": []}]), place="admin"),
    Route("GET", "/jatos/api/v1/admin/status", api_server_status, "api", None, _operation(
        "jatos-lite: free disk space and how many pages are connected to channels, with warnings")),
    Route("GET", "/jatos/api/v1/admin/addresses", api_addresses, "api", None, _operation(
        "jatos-lite: the addresses study links can be built from (this computer, each network address)")),
    # JATOS API v1: studies
    Route("POST", "/jatos/api/v1/studies", api_studies_post, "api", None, _operation(
        "Import a study archive (.jzip), or create a study from a JSON body", *IMPORT_FLAG_DEFAULTS,
        body={"required": True, "content": {**_ARCHIVE_BODY["content"],
                                             **_keys_body(STUDY_KEYS, ["title"])["content"]}},
        statuses=("201", "200"))),
    Route("POST", "/jatos/api/v1/study", api_study_import, "api", None, _operation(
        "Import a study archive (deprecated: use POST /studies)", *IMPORT_FLAG_DEFAULTS, body=_ARCHIVE_BODY,
        statuses=("201", "200"), deprecated=True)),
    Route("GET", "/jatos/api/v1/studies/properties", api_studies, "api", "read",
          _operation("All studies", "withComponentProperties", "withBatchProperties")),
    Route("GET", "/jatos/api/v1/studies/<study_id>/properties", api_study, "api", "read",
          _operation("One study", "withComponentProperties", "withBatchProperties")),
    Route("PATCH", "/jatos/api/v1/studies/<study_id>/properties", api_study_update, "api", "write",
          _operation("Change a study's properties", body=_keys_body(STUDY_KEYS))),
    Route("DELETE", "/jatos/api/v1/studies/<study_id>", api_study_delete, "api", None,
          _operation("Delete a study with its assets and results")),
    Route("GET", "/jatos/api/v1/studies/<study_id>/log", api_study_log, "api", "read", _operation(
        "The study log", "logDownload", "entryLimit",
        answer={**_FILE_ANSWER, "application/x-ndjson": {"schema": {"type": "array", "items": {}}}})),
    # JATOS API v1: study assets
    Route("GET", "/jatos/api/v1/studies/<study_id>/assets/structure", api_assets_structure, "api", "read",
          _operation("The study assets as a tree", "flatten")),
    Route("GET", "/jatos/api/v1/studies/<study_id>/assets/<filepath:path>", api_asset_download, "api", "read",
          _operation("Download a study assets file", answer=_FILE_ANSWER)),
    Route("POST", "/jatos/api/v1/studies/<study_id>/assets", api_asset_upload, "api", "read", _operation(
        "Upload a file to the top of the study assets", body=_multipart_body("studyAssetsFile"),
        statuses=("201", "200"))),
    Route("POST", "/jatos/api/v1/studies/<study_id>/assets/<filepath:path>", api_asset_upload, "api", "read",
          _operation("Upload a study assets file (a path ending in '/': into that folder)",
                     body=_multipart_body("studyAssetsFile"), statuses=("201", "200"))),
    Route("DELETE", "/jatos/api/v1/studies/<study_id>/assets/<filepath:path>", api_asset_delete, "api", "read",
          _operation("Delete a study assets file")),
    Route("GET", "/jatos/api/v1/studies/<study_id>", api_study_export, "api", "read",
          _operation("Export the study archive (.jzip)", answer=_ZIP_ANSWER)),
    # JATOS API v1: components and batches
    Route("GET", "/jatos/api/v1/studies/<study_id>/components", functools.partial(api_parts, COMPONENTS), "api",
          "read", _operation("A study's components")),
    Route("POST", "/jatos/api/v1/studies/<study_id>/components", functools.partial(api_part_create, COMPONENTS),
          "api", "write", _operation("Add a component", body=_keys_body(COMPONENT_KEYS, ["title"]))),
    Route("GET", "/jatos/api/v1/components/<key>", functools.partial(api_part, COMPONENTS), "api", "read",
          _operation("One component")),
    Route("PATCH", "/jatos/api/v1/components/<key>", functools.partial(api_part_update, COMPONENTS), "api",
          "write", _operation("Change a component (htmlFileRename; jatos-lite: position)",
                              body=_keys_body(COMPONENT_KEYS | {"htmlFileRename", "position"}))),
    Route("DELETE", "/jatos/api/v1/components/<key>", functools.partial(api_part_delete, COMPONENTS), "api",
          "write", _operation("Delete a component and its results")),
    Route("GET", "/jatos/api/v1/studies/<study_id>/batches", functools.partial(api_parts, BATCHES), "api", "read",
          _operation("A study's batches")),
    Route("POST", "/jatos/api/v1/studies/<study_id>/batches", functools.partial(api_part_create, BATCHES), "api",
          "write", _operation("Add a batch", body=_keys_body(BATCH_KEYS, ["title"]))),
    Route("GET", "/jatos/api/v1/batches/<key>", functools.partial(api_part, BATCHES), "api", "read",
          _operation("One batch")),
    Route("PATCH", "/jatos/api/v1/batches/<key>", functools.partial(api_part_update, BATCHES), "api", "write",
          _operation("Change a batch", body=_keys_body(BATCH_KEYS))),
    Route("DELETE", "/jatos/api/v1/batches/<key>", functools.partial(api_part_delete, BATCHES), "api", "write",
          _operation("Delete a batch and its results")),
    # JATOS API v1: study codes, sessions, groups
    Route("GET", "/jatos/api/v1/studies/<study_id>/studyCodes", api_study_codes, "api", "write", _operation(
        "Study codes (deprecated: use POST)", *_STUDY_CODES_QUERY, deprecated=True)),
    Route("POST", "/jatos/api/v1/studies/<study_id>/studyCodes", api_study_codes, "api", "write", _operation(
        "Get or generate study codes", *_STUDY_CODES_QUERY,
        body={**_keys_body(["type", "batchId", "comment", "amount"]), "required": False})),
    Route("GET", "/jatos/api/v1/studyCodes/<code>", api_study_code, "api", "read", _operation("One study code")),
    Route("GET", "/jatos/api/v1/batches/<key>/session", functools.partial(api_session, BATCH_SESSIONS), "api",
          "read", _operation("A batch session", "asText")),
    Route("PATCH", "/jatos/api/v1/batches/<key>/session", functools.partial(api_session_replace, BATCH_SESSIONS),
          "api", "write", _operation("Replace a batch session", "version", body=_SESSION_BODY)),
    Route("GET", "/jatos/api/v1/groups/<key>/session", functools.partial(api_session, GROUP_SESSIONS), "api",
          "read", _operation("A group session", "asText")),
    Route("PATCH", "/jatos/api/v1/groups/<key>/session", functools.partial(api_session_replace, GROUP_SESSIONS),
          "api", "write", _operation("Replace a group session", "version", body=_SESSION_BODY)),
    Route("GET", "/jatos/api/v1/batches/<batch_id>/groups", api_batch_groups, "api", "read",
          _operation("A batch's groups")),
    Route("PATCH", "/jatos/api/v1/studyCodes/<code>", api_study_code_update, "api", "write",
          _operation("Activate or deactivate a study code", body=_ACTIVE_BODY)),
    Route("GET", "/jatos/api/v1/studies/<study_id>/studyLinks", api_study_links, "api", "read",
          _operation("jatos-lite: all study links of a study")),
    # JATOS API v1: results (each export and the deletion take their own transactions)
    Route("GET", "/jatos/api/v1/results", api_results, "api", None, _results_doc(
        "The results archive (data, files, metadata)", "GET", ("isApiCall",), _ZIP_ANSWER)),
    Route("POST", "/jatos/api/v1/results", api_results, "api", None, _results_doc(
        "The results archive (data, files, metadata)", "POST", ("isApiCall",), _ZIP_ANSWER)),
    Route("GET", "/jatos/api/v1/results/metadata", api_results_metadata, "api", None, _results_doc(
        "The results metadata", "GET", _METADATA_QUERY, _METADATA_ANSWER)),
    Route("POST", "/jatos/api/v1/results/metadata", api_results_metadata, "api", None, _results_doc(
        "The results metadata", "POST", _METADATA_QUERY, _METADATA_ANSWER)),
    Route("GET", "/jatos/api/v1/results/data", api_results_data, "api", None, _results_doc(
        "The result data as a ZIP, plain text or (jatos-lite) CSV", "GET", _DATA_QUERY, _DATA_ANSWER)),
    Route("POST", "/jatos/api/v1/results/data", api_results_data, "api", None, _results_doc(
        "The result data as a ZIP, plain text or (jatos-lite) CSV", "POST", _DATA_QUERY, _DATA_ANSWER)),
    Route("GET", "/jatos/api/v1/results/files", api_results_files, "api", None, _results_doc(
        "The uploaded result files as a ZIP", "GET", (), _ZIP_ANSWER)),
    Route("POST", "/jatos/api/v1/results/files", api_results_files, "api", None, _results_doc(
        "The uploaded result files as a ZIP", "POST", (), _ZIP_ANSWER)),
    Route("GET", "/jatos/api/v1/results/search", api_results_search, "api", None, _results_doc(
        "jatos-lite: the selected component results whose data contains a text", "GET",
        ("text", "regex", "caseSensitive"), _ENVELOPE_ANSWER)),
    Route("POST", "/jatos/api/v1/results/delete", api_results_delete, "api", None, _results_delete_doc("POST")),
    Route("PUT", "/jatos/api/v1/results/delete", api_results_delete, "api", None, _results_delete_doc("PUT")),
    Route("GET", "/jatos/api/v1/results/files/<filename:path>", api_result_file, "api", "write", _operation(
        "One uploaded result file", "componentResultId", answer=_FILE_ANSWER)),
)


# The admin's uploads, which may be as large as max_archive: every other body is held to the
# config's body_limit before waitress reads it (BodyLimitParser).
_ARCHIVE_ROUTES = re.compile(r"/jatos/api/v1/(studies|study|studies/[^/]+/assets(/.*)?)")


def takes_archive(method: str, path: str) -> bool:
    return method == "POST" and _ARCHIVE_ROUTES.fullmatch(path) is not None


def may_send_archive(app: bottle.Bottle, headers: dict[str, str], port: int) -> bool:
    """Whether a request's headers (as waitress names them) would let it into the API at this
    port: only then may its body be as large as an archive, before anything of it is read."""
    config, store = app.config["jatos_lite.config"], app.config["jatos_lite.store"]
    shown = Credentials(headers.get("AUTHORIZATION", ""),
                        parse_cookie_header(headers.get("COOKIE", "")).get(SESSION_COOKIE),
                        headers.get("X_CSRF_TOKEN", ""), True, is_admin_port(config, port))
    try:
        with store.snapshot() as db:
            api_caller(db, config, shown)
    except JatosError:
        return False
    return True


def openapi_document() -> dict:
    """The OpenAPI 3.0 description of the API routes in ROUTES, with the envelopes and auth as
    components."""
    paths: dict[str, dict] = {}
    for route in ROUTES:
        if route.doc is None:
            continue
        path = re.sub(r"<(\w+)(?::\w+)?>", r"{\1}", route.path)
        entry = paths.setdefault(path, {})
        names = re.findall(r"{(\w+)}", path)
        if names:
            entry["parameters"] = [{"$ref": f"#/components/parameters/{name}"} for name in names]
        entry[route.method.lower()] = route.doc
    error = {"type": "object", "required": ["code", "message"],
             "properties": {"code": {"type": "string", "example": "NOT_FOUND"}, "message": {"type": "string"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "jatos-lite API", "version": API_VERSION,
                 "description": f"The part of JATOS's API v1 (JATOS {JATOS_VERSION}) that jatos-lite serves, "
                                "plus a few routes of its own (marked 'jatos-lite')."},
        "security": [{"bearerAuth": []}, {"adminSession": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API token (jap_...)"},
                "adminSession": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE,
                                 "description": "The admin page's session; changes also send X-CSRF-Token"}},
            "schemas": {
                "Envelope": {"type": "object", "required": ["apiVersion"], "properties": {
                    "apiVersion": {"type": "string", "example": API_VERSION}, "message": {"type": "string"},
                    "data": {}}},
                "ErrorEnvelope": {"type": "object", "required": ["apiVersion", "error"], "properties": {
                    "apiVersion": {"type": "string", "example": API_VERSION}, "error": error}}},
            "responses": {"Error": {"description": "Failed; the status says why (400, 401, 403, 404, 409, 413, 415)",
                                    "content": {"application/json": {
                                        "schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}}},
            "parameters": OPENAPI_PARAMETERS,
        },
    }


def create_app(config: Config | None = None, store: Store | None = None) -> bottle.Bottle:
    """The WSGI application: publix protocol, study assets, jatos.js, admin sign-in and API."""
    config = config or Config()
    store = store or Store(config.db_path)
    config.studies.mkdir(parents=True, exist_ok=True)
    config.uploads.mkdir(parents=True, exist_ok=True)
    app = bottle.Bottle(catchall=True)
    app.config["jatos_lite.config"] = config
    app.config["jatos_lite.store"] = store
    app.config["jatos_lite.hub"] = ChannelHub(store, max(4, config.threads * 4 // 5), config)
    app.config["jatos_lite.free_space"] = FreeSpace(config.data, config.min_free_disk)
    app.install(_catch_jatos_errors)
    app.install(RouteKinds())
    app.add_hook("after_request", _security_headers)
    for route in ROUTES:
        app.route(route.path, route.method, route.handler, kind=route.kind, tx=route.tx, place=route.place)
    app.error_handler.update({404: _unmatched, 405: _unmatched, 500: _crashed})
    return app




###############################################################################
# CLI
###############################################################################

EXAMPLE_DIR = "jatos_lite_example"
EXAMPLE_STUDY = {
    "uuid": "5d1b7a5e-0c4f-4a57-9d2e-6a8f2f3c9b10",
    "title": "jatos-lite example",
    "description": "A two-component study that shows result data, appended data, the study session and a "
                   "result file travelling from one component to the next.",
    "dirName": EXAMPLE_DIR,
    "componentList": [
        {"uuid": "0f9e3c1a-7b2d-4e8f-a1c3-5d6e7f809a1b", "title": "Reaction task", "htmlFilePath": "task.html",
         "reloadable": True},
        {"uuid": "3a4b5c6d-1e2f-4a3b-8c9d-0e1f2a3b4c5d", "title": "Thank you", "htmlFilePath": "goodbye.html",
         "reloadable": True},
    ],
    "batchList": [{"uuid": "7c8d9e0f-2a3b-4c5d-9e6f-1a2b3c4d5e6f", "title": "Default",
                   "allowedWorkerTypes": ["PersonalSingle", "PersonalMultiple", "GeneralSingle",
                                          "GeneralMultiple"]}],
}


EXAMPLE_FILES = ("task.html", "goodbye.html", "style.css")


def install_example_study(store: Store, config: Config) -> None:
    """On the first start, register the bundled example study (writing its files if its folder
    is not there). Recorded as installed only once its files could be read, so a jatos-lite that
    lacked them installs it at a later start."""
    try:
        files = {name: client_file(f"studies/{EXAMPLE_DIR}/{name}").body for name in EXAMPLE_FILES}
    except JatosError as missing:
        log.warning("the bundled example study is not installed: %s", missing.message)
        return
    with store.tx() as db:
        if db.value("SELECT value FROM settings WHERE key = 'example_installed'"):
            return
        db.run("INSERT INTO settings(key, value) VALUES ('example_installed', '1')")
        target = config.studies / EXAMPLE_DIR
        if not target.exists():
            target.mkdir(parents=True)
            for name, body in files.items():
                (target / name).write_bytes(body)
        if db.value("SELECT 1 FROM studies WHERE uuid = ? OR dir_name = ?", EXAMPLE_STUDY["uuid"], EXAMPLE_DIR):
            return
        study_id = insert_study(db, study_fields(EXAMPLE_STUDY), EXAMPLE_STUDY["uuid"], EXAMPLE_DIR)
        for component in EXAMPLE_STUDY["componentList"]:
            insert_component(db, study_id, component_fields(component), component["uuid"])
        batch = EXAMPLE_STUDY["batchList"][0]
        insert_batch(db, study_id, batch_fields(batch), batch["uuid"])


# Folders of file-sync clients: they copy SQLite's files one by one and can tear a database apart.
SYNCED_FOLDER_NAMES = {"dropbox", "onedrive", "icloud drive", "iclouddrive", "mobile documents", "cloudstorage",
                       "google drive", "googledrive", "my drive", "box", "box sync", "nextcloud", "owncloud",
                       "pcloud drive", "seafile"}
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "afpfs", "9p", "afs", "ceph", "glusterfs", "fuse.sshfs",
                       "fuse.davfs", "davfs", "fuse.rclone", "fuse.s3fs", "webdav"}


ICLOUD_DRIVE = Path("Library/Mobile Documents/com~apple~CloudDocs")  # inside the home folder, on macOS


def synced_folder(path: Path, home: Path | None = None) -> str | None:
    """The name of a sync client's folder that `path` lies in, if any; also macOS's Desktop and
    Documents when iCloud Drive keeps them (they then appear inside iCloud Drive too)."""
    resolved = Path(path).resolve()
    for part in resolved.parts:
        name = part.lower()
        if name in SYNCED_FOLDER_NAMES or name.startswith("onedrive -") or name.startswith("dropbox ("):
            return part
    home = Path.home() if home is None else home
    for shared in ("Desktop", "Documents"):
        inside = resolved == home / shared or (home / shared) in resolved.parents
        if inside and (home / ICLOUD_DRIVE / shared).is_dir():
            return f"{shared} (kept in iCloud Drive)"
    return None


def network_filesystem(path: Path, mounts: str | None = None) -> str | None:
    """The network file system type `path` is on, if it is on one: /proc/mounts on Linux, the
    drive type on Windows (a UNC path or a mapped network drive); None where it can't be told."""
    resolved = Path(path).resolve()
    if sys.platform == "win32":
        import ctypes

        root = resolved.anchor
        remote = root.startswith("\\\\") or ctypes.windll.kernel32.GetDriveTypeW(root) == 4  # DRIVE_REMOTE
        return "network drive" if remote else None
    if mounts is None:
        mounts = _mount_table()
    best, kind = "", None
    for point, fs_type in _mount_points(mounts):
        inside = resolved == Path(point) or Path(point) in resolved.parents
        if inside and len(point) >= len(best):
            best, kind = point, fs_type
    return kind if kind in NETWORK_FILESYSTEMS else None


def _mount_table() -> str:
    """/proc/mounts on Linux; what `mount` prints on macOS and the BSDs ('' if neither can be read)."""
    with contextlib.suppress(OSError):
        return Path("/proc/mounts").read_text()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["mount"], capture_output=True, text=True, timeout=5).stdout
    return ""


def _mount_points(mounts: str) -> Iterator[tuple[str, str]]:
    """(mount point, file system type) of each line: Linux's 'device point type options ...' or
    macOS's 'device on point (type, options)'."""
    for line in mounts.splitlines():
        mac = re.match(r"^.+? on (/.*) \(([^,)]+)", line)
        if mac:
            yield mac.group(1), mac.group(2).strip()
            continue
        fields = line.split()
        if len(fields) >= 3:
            yield fields[1].replace("\\040", " "), fields[2]


def program_folder(path: Path) -> str | None:
    """The Python installation or Windows folder that `path` lies in, if any."""
    folders = {sys.prefix, sys.base_prefix, os.environ.get("SystemRoot"), os.environ.get("WINDIR")}
    resolved = Path(path).resolve()
    for folder in sorted(f for f in folders if f):
        if resolved == Path(folder).resolve() or Path(folder).resolve() in resolved.parents:
            return folder
    return None


def storage_warnings(data: Path, mounts: str | None = None) -> list[str]:
    """Why the data folder is not a safe place for a SQLite database, if it is not."""
    warnings = []
    synced = synced_folder(data)
    if synced:
        warnings.append(f"The data folder is inside '{synced}', a folder a sync client copies. SQLite databases "
                        "can be corrupted there: use a plain local folder (--data) and back it up instead.")
    system = program_folder(data)
    if system:
        warnings.append(f"The data folder is inside {system}, a folder for programs (jatos-lite was started there, "
                        "e.g. by a double-click or from an administrator's prompt). Stop it and start it from a "
                        "folder of your own, or pass --data.")
    network = network_filesystem(data, mounts)
    if network:
        warnings.append(f"The data folder is on a network file system ({network}). SQLite is not safe there: "
                        "use a folder on this computer's own disk (--data).")
    return warnings


def _resolve_study(store: Store, key: str) -> sqlite3.Row:
    with store.snapshot() as db:
        return find_study(db, key)


LISTENER_KEY = "listener:"  # settings rows: where each running server listens, for `jatos-lite links`
PING_SECONDS = 2.0


def record_listener(store: Store, config: Config) -> str:
    """Note in the database where this server listens, until it stops; returns the row's key."""
    key = LISTENER_KEY + new_uuid()
    with store.tx() as db:
        db.run("INSERT INTO settings(key, value) VALUES (?, ?)", key,
               to_json({"host": config.host, "port": config.port, "started": now_ms()}))
    return key


def running_listener(store: Store) -> dict | None:
    """Where a server on this database listens (the newest that answers), if one runs. The
    record of a server that ended without removing it (killed, a power cut) is removed."""
    with store.snapshot() as db:
        rows = db.all("SELECT key, value FROM settings WHERE key LIKE ?", LISTENER_KEY + "%")
    for key, listener in sorted(((row["key"], json.loads(row["value"])) for row in rows),
                                key=lambda record: -record[1]["started"]):
        if _answers_ping(listener["host"], listener["port"]):
            return listener
        with store.tx() as db:
            db.run("DELETE FROM settings WHERE key = ?", key)
    return None


def _answers_ping(host: str, port: int) -> bool:
    address = "127.0.0.1" if host in ("0.0.0.0", "") else host
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(f"http://{address}:{port}/ping", timeout=PING_SECONDS) as answer:
            return answer.read() == b"pong"
    except (OSError, ValueError):
        return False


def serve(config: Config) -> None:
    """`jatos-lite serve`: listen first (a port in use is one line, and nothing is changed), then
    say where the data is and how to sign in, serve until stopped, and close the database."""
    client_file("jatos.js")  # refuses to start without it
    if config.admin_port is None:
        config = dataclasses.replace(config, admin_port=config.port + 1)
    created = not config.db_path.exists()
    store = Store(config.db_path)
    try:
        app = create_app(config, store)
        server = bind_server(app, config)
        listener = record_listener(store, config)
        with _sigterm_as_interrupt(), contextlib.suppress(KeyboardInterrupt):
            app.config["jatos_lite.hub"].start_watching()
            summary = data_summary(store, created)
            for title in install_bundled_studies(store, config):
                print(f"Imported the study '{title}' this jatos-lite file carries.")
            install_example_study(store, config)
            with store.tx() as db:
                token = new_sign_in_token(db)
            sign_in = f"http://localhost:{config.admin_port or config.port}/jatos/login?token={token}"
            print_banner(store, config, sign_in, summary)
            open_in_browser(sign_in, config)
            serve_until_stopped(server)
        shut_down(server, app)
        with store.tx() as db:
            db.run("DELETE FROM settings WHERE key = ?", listener)
    finally:
        store.close()
    print(f"jatos-lite stopped; data is in {config.data.resolve()}", flush=True)


def data_summary(store: Store, created: bool) -> str:
    if created:
        return "new database, created now"
    with store.snapshot() as db:
        studies = db.value("SELECT COUNT(*) FROM studies")
        results = db.value("SELECT COUNT(*) FROM study_results")
    return f"database reopened: {studies} studies, {results} study results"


def print_banner(store: Store, config: Config, sign_in: str, summary: str) -> None:
    folders = "" if (config.data, config.studies) == (Config.data, Config.studies) else \
        f' --data "{config.data}" --studies "{config.studies}"'
    print(f"jatos-lite {__version__} is running.")
    print(f"  Data:    {config.data.resolve()}  ({summary})")
    print(f"  Studies: {config.studies.resolve()}")
    for warning in storage_warnings(config.data):
        print(f"  WARNING: {warning}")
    print(f"  Admin page (sign in; this link works for {ADMIN_SESSION_SECONDS // 86400} days):  {sign_in}")
    print(f"  API token for scripts (jatosR, curl): run  {command_name()} token create{folders}")
    print("  Participants on this network can use:")
    for url in base_urls(config):
        print(f"    {url}/publix/run")
    with store.snapshot() as db:
        example = db.one("SELECT * FROM studies WHERE uuid = ?", EXAMPLE_STUDY["uuid"])
    if example is not None:
        with store.tx() as db:
            code = study_links_for(db, default_batch(db, example["id"]), "GeneralMultiple")[0]
        print(f"  Example study link:    http://localhost:{config.port}/publix/{code}")
    print("Press Ctrl+C to stop.", flush=True)


def open_in_browser(url: str, config: Config) -> bool:
    """Open the admin page in the default browser, where someone can see it: not when switched
    off, not in CI, not on a Linux without a display."""
    if not config.browser or os.environ.get("CI"):
        return False
    if sys.platform not in ("win32", "darwin") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    import webbrowser

    threading.Thread(target=webbrowser.open, args=(url,), name="jatos-lite-browser", daemon=True).start()
    return True


ADDRESS_IN_USE = {errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)}  # Windows reports 10048
NOT_PERMITTED = {errno.EACCES, getattr(errno, "WSAEACCES", errno.EACCES)}


def bind_server(app: bottle.Bottle, config: Config) -> Any:
    """waitress's server, bound to the port; a port that cannot be had is a JatosError."""
    raise_open_file_limit()
    listen = f"{config.host}:{config.port}" + (f" {config.admin_host}:{config.admin_port}" if config.admin_port else "")
    try:
        return guarded_server(app, config, listen=listen, threads=config.threads, **WAITRESS_OPTIONS,
                              connection_limit=connection_limit(config.connections), max_request_body_size=config.max_archive)
    except OSError as exc:
        if exc.errno in ADDRESS_IN_USE:
            admin = f" (or its admin port {config.admin_port})" if config.admin_port else ""
            raise JatosError(409, f"Port {config.port} is in use{admin}, probably by a jatos-lite that is already running "
                                  f"(open http://localhost:{config.admin_port or config.port}/jatos/). Stop that "
                                  f"one, or start this one with --port {config.port + 2}.") from None
        if exc.errno in NOT_PERMITTED:
            raise JatosError(403, f"This user may not listen on port {config.port}: use a port above 1024 "
                                  "(--port 9000).") from None
        raise JatosError(400, f"Cannot listen on {config.host}:{config.port} ({exc.strerror or exc}): use "
                              "--host 0.0.0.0 (every network) or one of this computer's addresses.") from None


SHUTDOWN_SECONDS = 3.0  # how long answers to held polls and running requests may take to go out at a stop


def serve_until_stopped(server: Any) -> None:
    """waitress's loop (PacedLoop), until Ctrl-C (or SIGTERM) interrupts it."""
    server.asyncore.loop(timeout=server.adj.asyncore_loop_timeout, map=_socket_map(server),
                         use_poll=server.adj.asyncore_use_poll)


def _socket_map(server: Any) -> dict:
    return server._map if hasattr(server, "_map") else server.map


def shut_down(server: Any, app: bottle.Bottle) -> None:
    """Stop accepting, answer the held polls, let running requests finish and their answers out,
    and close every connection."""
    sockets = _socket_map(server)
    for listener in _listeners(server):
        waitress.wasyncore.dispatcher.close(listener)
    app.config["jatos_lite.hub"].stop()
    deadline = time.monotonic() + SHUTDOWN_SECONDS
    while _still_busy(server, sockets) and time.monotonic() < deadline:
        waitress.wasyncore.loop(timeout=0.05, map=sockets, use_poll=server.adj.asyncore_use_poll, count=1)
    server.task_dispatcher.shutdown(timeout=SHUTDOWN_SECONDS)
    waitress.wasyncore.close_all(sockets)


def _still_busy(server: Any, sockets: dict) -> bool:
    tasks = server.task_dispatcher
    return bool(tasks.active_count or tasks.queue or any(getattr(channel, "total_outbufs_len", 0)
                                                         for channel in list(sockets.values())))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a service manager, `kill`) stops the server as Ctrl-C does, where the OS has it."""
    import signal

    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# A full server keeps more than 1024 sockets open (the connection limit is four per thread
# for a few hundred participants' polls and requests): poll() has no such ceiling, select() does.
# Idle connections close after a minute; the clean-up that closes them runs every 2 s, so a
# request whose headers trickle in is hung up on soon after its header timeout.
WAITRESS_OPTIONS = {"asyncore_use_poll": True, "ident": "jatos-lite", "channel_timeout": 60, "cleanup_interval": 2}


class _AddressShares:
    """How many connections each address holds, against a cap per address."""

    def __init__(self, cap: int):
        self.cap = cap
        self.held: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def admit(self, address: str) -> bool:
        with self.lock:
            if self.held[address] >= self.cap:
                return False
            self.held[address] += 1
            return True

    def leave(self, address: str) -> None:
        with self.lock:
            self.held[address] -= 1
            if self.held[address] <= 0:
                del self.held[address]


class BodyLimitParser(waitress.parser.HTTPRequestParser):
    """A request parser that holds the body to its route's limit, decided as soon as the headers
    are in: waitress has one limit for the whole server and buffers a body up to it (on disk
    beyond a few MB) before the application sees the request."""

    parking: Parking | None = None  # set when the request runs (ParkingTask)

    def __init__(self, adj: Any, small_adj: Any, may_send_archive: Callable[[dict[str, str]], bool]):
        super().__init__(adj)
        self.small_adj, self.may_send_archive = small_adj, may_send_archive

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if not (takes_archive(self.command, self.path) and self.may_send_archive(self.headers)):
            self.adj = self.small_adj
        if self.content_length >= self.adj.max_request_body_size:
            log.warning("refused a body of %d bytes to %s %s (limit %d)", self.content_length, self.command,
                        self.path, self.adj.max_request_body_size)


class ParkingTask(waitress.task.WSGITask):
    """waitress's task with the request's Parking in the environment (PARKING_KEY)."""

    def get_environment(self) -> dict:
        environ = super().get_environment()
        if self.request.parking is None:
            self.request.parking = Parking(self.channel)
        environ[PARKING_KEY] = self.request.parking
        return environ


class GuardedChannel(waitress.channel.HTTPChannel):
    """A connection that counts against its address's share, and notes when the request it is
    receiving began, so that one device can neither hold every connection the server accepts
    nor keep connections by sending a header a byte at a time. A channel poll waiting for news
    stays with its connection (Parking) instead of holding a worker thread."""

    counted = False
    headers_since: float | None = None
    task_class = ParkingTask

    def service(self) -> None:
        request = self.requests[0]
        try:
            super().service()
        except PollParked:
            return  # the request stays first in line; the hub queues the connection again when the poll is due
        if request.parking is not None:
            request.parking.end()

    def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any, map: Any = None):
        super().__init__(server, sock, addr, adj, map)
        self.address = str(addr[0] if isinstance(addr, tuple) else addr)
        self.parser_class = functools.partial(BodyLimitParser, small_adj=server.small_adj,
                                              may_send_archive=server.may_send_archive)
        self.counted = server.shares.admit(self.address)
        if not self.counted:
            log.warning("refused a connection from %s: it holds %d already", self.address, server.shares.cap)
            self.will_close = True

    def received(self, data: bytes) -> bool:
        if self.request is None and data:
            self.headers_since = time.monotonic()
        answer = super().received(data)
        if self.request is None or self.request.headers_finished:
            self.headers_since = None
        return answer

    def del_channel(self, map: Any = None) -> None:
        super().del_channel(map)
        if self.counted:
            self.counted = False
            self.server.shares.leave(self.address)


def guarded_server(app: Any, config: Config, **options: Any) -> Any:
    """waitress's server with GuardedChannel connections: a share per address, and requests
    whose headers take longer than the config's header timeout closed at the next clean-up, and
    request bodies held to their route's limit (BodyLimitParser): an archive's larger limit only
    for a caller the API lets in."""
    server = waitress.server.create_server(app, **options)
    shares = _AddressShares(config.connections_per_address)
    for listener in _listeners(server):
        listener.channel_class, listener.shares = GuardedChannel, shares
        listener.small_adj = copy.copy(listener.adj)
        listener.small_adj.max_request_body_size = min(config.body_limit, listener.adj.max_request_body_size)
        listener.may_send_archive = functools.partial(may_send_archive, app, port=listener.effective_port)
        listener.maintenance = functools.partial(_close_slow_headers, listener, listener.maintenance,
                                                 config.header_timeout_seconds)
        listener.handle_accept = functools.partial(_accept_waiting, listener, listener.handle_accept)
    server.asyncore = PacedLoop
    hub = app.config.get("jatos_lite.hub") if isinstance(app, bottle.Bottle) else None
    if hub is not None:  # held polls take no thread here, but a connection each, and their pages one more
        hub.max_held = max(hub.max_held, _listeners(server)[0].adj.connection_limit * 2 // 5)
    return server


class PacedLoop:
    """waitress's event loop with its turns spaced by the number of connections. Each turn asks
    every connection whether it waits to read or write: with thousands of connections (pages
    holding channel polls) a turn per event took most of the CPU time the requests need.
    Measured at 1,000 pages each sending every 5 s (bench/channels_scale.py): the loop held the
    GIL 70% of the time and the server spent 12.6 ms CPU per message; with spaced turns, 6.6 ms.
    A pause is at most three times the turn before it, so where turns are quick (the
    machine not busy) new requests are read sooner: at that step p50 39 -> 20 ms."""

    dispatcher = waitress.wasyncore.dispatcher  # waitress's server reads it from here, like the module

    @staticmethod
    def loop(timeout: float, use_poll: bool = False, map: dict | None = None, count: int | None = None) -> None:
        turn = waitress.wasyncore.poll2 if use_poll and hasattr(select, "poll") else waitress.wasyncore.poll
        for _ in itertools.repeat(None) if count is None else range(count):
            if not map:
                return
            began = time.monotonic()
            turn(timeout, map)
            took = time.monotonic() - began
            pause = min(len(map) * LOOP_SECONDS_PER_CONNECTION - took, took * LOOP_PAUSE_PER_TURN)
            if pause > 0:
                time.sleep(pause)


def _accept_waiting(listener: Any, accept_one: Callable[[], None]) -> None:
    """Accept the connections waiting, not one a turn of the (paced) event loop: a class opening
    its pages at once would wait seconds for the loop, then for TCP to try again."""
    for _ in range(ACCEPTS_PER_TURN):
        connections = len(listener._map)
        if len(listener.active_channels) >= listener.adj.connection_limit:
            return
        accept_one()
        if len(listener._map) == connections:  # none was waiting
            return


def _listeners(server: Any) -> list[Any]:
    """The listening sockets of what waitress.server.create_server made (one, or several in a map)."""
    if hasattr(server, "active_channels"):
        return [server]
    return [s for s in server.map.values() if hasattr(s, "active_channels")]


LOOP_SECONDS_PER_CONNECTION = 20e-6  # the most time between two turns of the event loop, per connection
LOOP_PAUSE_PER_TURN = 3  # ... and a pause at most this many times the turn before it
ACCEPTS_PER_TURN = 100
SELECT_SOCKETS = 500  # select(), waitress's fallback where there is no poll() (Windows), watches at most 512


def connection_limit(wanted: int, has_poll: bool | None = None) -> int:
    """The connections wanted, but no more than select() can watch where waitress has to use it."""
    has_poll = hasattr(select, "poll") if has_poll is None else has_poll
    return wanted if has_poll else min(wanted, SELECT_SOCKETS)


def _close_slow_headers(listener: Any, maintenance: Callable[[float], None], limit: float, now: float) -> None:
    maintenance(now)
    too_old = time.monotonic() - limit
    for channel in list(listener.active_channels.values()):
        if getattr(channel, "headers_since", None) is not None and channel.headers_since < too_old:
            channel.will_close = True


OPEN_FILES_WANTED = 10240  # macOS refuses more (kern.maxfilesperproc), even when its hard limit says infinite


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files towards OPEN_FILES_WANTED where the system has one (not Windows)."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def write_download(chunks: Iterable[bytes], target: Path) -> int:
    """Write a streamed export durably (a broken export never looks finished); on a
    terminal, a running count of what is written. Returns the size."""
    if not sys.stderr.isatty():
        return write_file_durably(target, chunks)

    def counted() -> Iterator[bytes]:
        written = 0
        for chunk in chunks:
            written += len(chunk)
            print(f"\r  {human_bytes(written)} written", end="", file=sys.stderr, flush=True)
            yield chunk
        print(file=sys.stderr)

    return write_file_durably(target, counted())


def export_results(store: Store, config: Config, study_key: str, target: Path, as_csv: str | None = None,
                   style: CsvStyle = CsvStyle()) -> int:
    """`jatos-lite export`: the study's combined results archive (as the GUI exports it), or with
    `as_csv` its merged result data ("data") or its results metadata ("metadata") as CSV."""
    with store.tx() as db:
        study = find_study(db, study_key)
        selection = selection_of("studyId", study["id"])
        if as_csv != "metadata":
            log_for_studies(db, studies_of_results(db, selection), *RESULTS_EXPORTED)
    chunks = (results_csv(store, selection, style) if as_csv == "data" else
              results_metadata_csv(store, config, selection, style) if as_csv == "metadata" else
              results_archive(store, config, selection, api_call=False))
    return write_download(chunks, target)


def csv_style_of(args: argparse.Namespace) -> CsvStyle:
    """`jatos-lite export --csv ... [--excel] [--semicolon]`: how the CSV is written."""
    if (args.excel or args.semicolon) and not args.csv:
        raise JatosError(400, "--excel and --semicolon shape a CSV export: add --csv data or --csv metadata.")
    return CsvStyle.chosen(args.excel, args.semicolon)


def export_study(store: Store, config: Config, study_key: str, target: Path) -> int:
    """`jatos-lite export-study`: the .jzip that JATOS (and jatos-lite) import."""
    with store.snapshot() as db:
        jas = study_jas(db, find_study(db, study_key))
    return write_download(study_archive(config, jas), target)


def backup(store: Store, config: Config, target: Path) -> int:
    """`jatos-lite backup`: one ZIP with a consistent copy of the database (SQLite's online
    backup, safe while a server writes), the uploaded result files and the study folders."""
    with tempfile.TemporaryDirectory(dir=config.data) as scratch:
        copy = Path(scratch) / "jatos.sqlite"
        source, destination = store.connect(), sqlite3.connect(copy)
        try:
            source.backup(destination)
        finally:
            destination.close()
            source.close()
        entries = [("data/jatos.sqlite", _file_chunks(copy))]
        for folder, prefix in ((config.uploads, "data/result_uploads"), (config.studies, "studies")):
            entries += [(f"{prefix}/{path.relative_to(folder).as_posix()}", _file_chunks(path))
                        for path in sorted(folder.rglob("*")) if path.is_file()]
        return write_download(zip_stream(entries), target)


def links_command(store: Store, config: Config, args: argparse.Namespace) -> None:
    """`jatos-lite links`: participant links, printed as full URLs with the address and port of
    the server running on this data folder. A type the batch does not allow is refused (every
    participant would get 403), or with --allow turned on first."""
    study = _resolve_study(store, args.study)
    worker_type = worker_type_from_alias(args.type)
    label = WORKER_TYPE_LABELS[worker_type]
    with store.tx() as db:
        batch = find_batch(db, args.batch, study["id"]) if args.batch else default_batch(db, study["id"])
        allowed = json.loads(batch["allowed_worker_types"])
        where = f"batch '{batch['title']}' (ID {batch['id']})"
        if worker_type not in allowed:
            if not args.allow:
                raise JatosError(403, f"{where} does not allow {label} links, so every participant would be "
                                      "refused. Turn the type on with --allow (or on the admin page's Links tab).")
            update_batch(db, batch, {"allowedWorkerTypes": allowed + [worker_type]})
            print(f"Turned on {label} links in {where}.", file=sys.stderr)
        codes = study_links_for(db, batch, worker_type, args.count, args.comment)
    listener = running_listener(store)
    if listener is None:
        print(f"No jatos-lite runs with the data folder {config.data.resolve()}, so these links take port "
              f"{config.port}: start jatos-lite first to have them with its address and port.", file=sys.stderr)
        listener = {"host": config.host, "port": config.port}
    base = base_urls(dataclasses.replace(config, host=listener["host"]), listener["port"])[0]
    for code in codes:
        print(f"{base}/publix/{code}")


def token_command(store: Store, action: str, name: str, token_id: int | None) -> None:
    """`jatos-lite token create|list|revoke`."""
    with store.tx() as db:
        if action == "create":
            print(mint_api_token(db, name)[1])
        elif action == "list":
            for row in db.all("SELECT * FROM api_tokens ORDER BY id"):
                state = "active" if row["active"] else "revoked"
                print(f"{row['id']:>4}  {state:<8} {_csv_time(row['creation_date'], '')}  {row['name']}")
        elif token_id is None or not db.run("UPDATE api_tokens SET active = 0 WHERE id = ?", token_id):
            raise JatosError(404, f"No API token with ID {token_id} (see 'jatos-lite token list').")


PYZ_DEPENDENCIES = ("bottle", "waitress", "jsonpatch", "jsonpointer")  # all pure Python
PYZ_MAIN = b"import sys\n\nimport jatos_lite\n\nsys.exit(jatos_lite.main())\n"


BUNDLED_STUDIES = "bundled_studies"  # in a pyz built with --with-studies: index.json and a .jzip per study


def existing_store(config: Config) -> Store:
    """The database of a command that reads what a server made: one line, never a new empty
    database, when the data folder is not the one jatos-lite runs with."""
    if not config.db_path.exists():
        raise JatosError(404, f"There is no database in {config.data.resolve()}: run this in the folder you start "
                              "jatos-lite from, or give its --data and --studies.")
    return Store(config.db_path)


def bundled_study_entries(config: Config) -> list[tuple[str, bytes]]:
    """`jatos-lite pyz --with-studies`: each study of the data folder as the .jzip that carries it
    to another computer (properties, components, batches, files; not its results or links),
    and their index."""
    store = existing_store(config)
    try:
        with store.snapshot() as db:
            documents = [study_jas(db, study) for study in db.all("SELECT * FROM studies ORDER BY id")]
        entries = [(f"{BUNDLED_STUDIES}/{jas['data']['uuid']}.jzip", b"".join(study_archive(config, jas)))
                   for jas in documents]
    finally:
        store.close()
    index = [{"uuid": jas["data"]["uuid"], "title": jas["data"]["title"]} for jas in documents]
    return [*entries, (f"{BUNDLED_STUDIES}/index.json", to_json(index).encode("utf-8"))]


def install_bundled_studies(store: Store, config: Config) -> list[str]:
    """At each start of a pyz built with --with-studies: import each study it carries that this
    database never had (by UUID). A study it has is left as it is, and one deleted here stays
    deleted. Returns the titles of those imported now."""
    folder = Path(__file__).parent / BUNDLED_STUDIES
    try:
        index = json.loads(__loader__.get_data(str(folder / "index.json")))
    except OSError:
        return []  # not such a pyz
    imported = []
    for study in index:
        key = f"bundled_study:{study['uuid']}"
        with store.snapshot() as db:
            if db.value("SELECT 1 FROM settings WHERE key = ?", key):
                continue
            present = db.value("SELECT 1 FROM studies WHERE uuid = ?", study["uuid"])
        if not present:
            try:
                import_study_file(store, config, io.BytesIO(__loader__.get_data(str(folder / f"{study['uuid']}.jzip"))))
            except JatosError as refused:
                log.warning("the study '%s' carried in this file was not imported: %s", study["title"], refused.message)
                continue
            imported.append(study["title"])
        with store.tx() as db:
            db.run("INSERT OR IGNORE INTO settings(key, value) VALUES (?, '1')", key)
    return imported


def build_pyz(target: Path, carried: Iterable[tuple[str, bytes]] = ()) -> int:
    """`jatos-lite pyz`: one zipapp (`python jatos-lite.pyz` on any Python >= 3.10, no pip, no
    internet) with this module, the files it ships and its dependencies as installed here,
    their licences included, and the `carried` entries (bundled_study_entries). Works from a
    checkout, an installation or a .pyz. Returns the size."""
    import importlib.metadata

    shipped = ["jatos.js", "admin.html", *(f"studies/{EXAMPLE_DIR}/{name}" for name in EXAMPLE_FILES)]
    entries = [("__main__.py", PYZ_MAIN), ("jatos_lite.py", __loader__.get_data(__file__)), *carried]
    entries += [(name, client_file(name).body) for name in shipped]
    for name in PYZ_DEPENDENCIES:
        files = importlib.metadata.distribution(name).files or []
        entries += [(str(file.as_posix()), file.read_binary()) for file in files
                    if not str(file).startswith("..") and "__pycache__" not in file.parts and file.suffix != ".pyc"]
    archive = io.BytesIO()
    archive.write(b"#!/usr/bin/env python3\n")  # as zipapp writes it: the ZIP's offsets count from after it
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as pyz:
        for name, body in entries:
            pyz.writestr(name, body, zipfile.ZIP_STORED if name.endswith(".jzip") else None)  # ZIPs already
    size = write_file_durably(target, [archive.getvalue()])
    with contextlib.suppress(OSError):
        target.chmod(0o755)  # so that ./jatos-lite.pyz runs it on Linux and macOS
    return size


def _serve_options(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    parser.add_argument("--host", help=f"address to listen on (default {defaults.host}: every network)")
    parser.add_argument("--port", type=int, help=f"port to listen on (default {defaults.port})")
    parser.add_argument("--api-token", dest="api_token", help="one fixed API token, e.g. for scripts and tests")
    parser.add_argument("--threads", type=int,
                        help=f"worker threads (default {defaults.threads}; a channel poll waiting for news takes none)")
    parser.add_argument("--connections", type=int,
                        help=f"connections held open at most (default {defaults.connections}; a page of a batch or "
                             "group study keeps about two)")
    parser.add_argument("--admin-port", dest="admin_port", type=int,
                        help="port of the admin page and sign-in, on this computer only (default: --port + 1; "
                             "0: the participants' port, which lets study pages act as the researcher)")
    parser.add_argument("--legacy-links", dest="legacy_links", action=argparse.BooleanOptionalAction,
                        help="accept old JATOS links /publix/<studyId>/start?... that name a personal worker or "
                             "General Single (default off)")
    parser.add_argument("--browser", action=argparse.BooleanOptionalAction,
                        help="open the admin page in the default browser at start (default on; never in CI or "
                             "without a display)")


def _data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path,
                        help=f"data folder: database and result files (default ./{Config().data})")


def _folder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--studies", type=Path, help=f"study assets folder (default ./{Config().studies})")
    _data_option(parser)


def _csv_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", choices=["data", "metadata"],
                        help="write CSV instead: the tabular result data merged into one table, or one row per run")
    parser.add_argument("--excel", action="store_true",
                        help="with --csv: UTF-8 with a byte order mark, so that Excel shows accented letters right")
    parser.add_argument("--semicolon", action="store_true",
                        help="with --csv: ';' between values, as Excel expects it in European languages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jatos-lite", description="Run JATOS studies on one computer.")
    _folder_options(parser)
    _serve_options(parser)
    parser.add_argument("--version", action="version", version=f"jatos-lite {__version__}")
    commands = parser.add_subparsers(dest="command")
    serve_parser = commands.add_parser("serve", help="run the server (the default command)")
    _folder_options(serve_parser)
    _serve_options(serve_parser)
    import_parser = commands.add_parser("import", help="import a JATOS study archive (.jzip)")
    _folder_options(import_parser)
    import_parser.add_argument("archive", type=Path)
    links_parser = commands.add_parser("links", help="print participant links of a study, with the address and "
                                                     "port of the jatos-lite running on the data folder")
    _data_option(links_parser)
    links_parser.add_argument("study", help="study ID, UUID or folder name")
    links_parser.add_argument("--type", required=True, choices=["ps", "pm", "gs", "gm"],
                              help="Personal Single/Multiple, General Single/Multiple")
    links_parser.add_argument("--count", type=int, default=1, help="how many personal links (default 1)")
    links_parser.add_argument("--batch", help="batch ID (default: the study's first batch)")
    links_parser.add_argument("--comment", help="comment stored with personal links' workers")
    links_parser.add_argument("--allow", action="store_true",
                              help="turn the type on in the batch if it does not allow it (else: refuse)")
    for name, help_text in (("export", "write a study's results archive (data, files, metadata), or with --csv "
                                       "its data or metadata as CSV"),
                            ("export-study", "write a study archive (.jzip) that JATOS imports")):
        export_parser = commands.add_parser(name, help=help_text)
        _folder_options(export_parser)
        export_parser.add_argument("study", help="study ID, UUID or folder name")
        export_parser.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    _csv_options(commands.choices["export"])
    backup_parser = commands.add_parser("backup", help="copy the database, result files and studies into one ZIP "
                                                       "(safe while a server runs)")
    _folder_options(backup_parser)
    backup_parser.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    token_parser = commands.add_parser("token", help="API tokens: create (default; printed once), list, revoke ID")
    _data_option(token_parser)
    token_parser.add_argument("--studies", type=Path, help=argparse.SUPPRESS)  # unused; accepted as before
    token_parser.add_argument("action", nargs="?", choices=["create", "list", "revoke"], default="create")
    token_parser.add_argument("id", nargs="?", type=int, help="the token to revoke")
    token_parser.add_argument("--name", default="command line", help="a name to recognise the token by")
    pyz_parser = commands.add_parser("pyz", help="write jatos-lite as one file that runs with 'python FILE' on any "
                                                 "Python 3.10 or newer, with no installing")
    pyz_parser.add_argument("-o", "--output", type=Path, default=Path("jatos-lite.pyz"),
                            help="file to write (default jatos-lite.pyz)")
    pyz_parser.add_argument("--with-studies", dest="with_studies", action="store_true",
                            help="carry the studies of the data folder (each as a .jzip), imported at its first "
                                 "start where the database does not have them")
    _folder_options(pyz_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `jatos-lite` command. A mistake or a folder it cannot use is one line on stderr that
    says what to do, and exit code 1; an interrupted command exits 130 and leaves no file."""
    args = build_parser().parse_args(argv)
    tolerant_console()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {name: getattr(args, name, None) for name in ("host", "port", "api_token", "threads", "connections", "admin_port",
                                                             "legacy_links", "browser", "studies", "data")}
    try:
        config = config_from_env(**options)
    except ValueError as exc:
        return _failed(f"{exc}: set it right or remove it.")
    try:
        run_command(args, config)
    except JatosError as exc:
        return _failed(exc.message)
    except (OSError, sqlite3.Error) as exc:
        return _failed(failure_message(exc, config))
    except KeyboardInterrupt:
        return _failed("interrupted; no file was written.", 130)
    return 0


def _failed(message: str, code: int = 1) -> int:
    print(f"jatos-lite: {message}", file=sys.stderr, flush=True)
    return code


def tolerant_console() -> None:
    """A console that cannot show a character (Windows' cp1252 and a folder named in Greek) shows
    '?' instead of ending the program."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")


def failure_message(exc: OSError | sqlite3.Error, config: Config) -> str:
    """One line, saying what to do, for a folder, file or database the command cannot use."""
    if isinstance(exc, sqlite3.Error):
        text = str(exc)
        if "readonly" in text or "read-only" in text:
            return (f"The database {config.db_path.resolve()} is read-only. Make it and its folder writable, or "
                    "copy the data folder to a place you can write to and start with --data FOLDER.")
        if "unable to open" in text:
            return (f"Cannot open the database in {config.data.resolve()}: the folder cannot be made or written. "
                    "Choose a folder you can write to with --data FOLDER.")
        return f"The database {config.db_path.resolve()} cannot be used ({text}). Restore it from a backup."
    where = exc.filename if exc.filename is not None else ""
    if isinstance(exc, FileNotFoundError):
        return f"{where} does not exist (relative names start in {Path.cwd()}). Check the name or give a full path."
    if isinstance(exc, PermissionError):
        return (f"No permission to write {where}. Choose folders you can write to (--data, --studies, -o), "
                "or start jatos-lite from a folder of your own.")
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return f"{where}: {exc.strerror}. Give a file name for a file and a folder name for a folder."
    return f"{where}: {exc.strerror or exc}."


def run_command(args: argparse.Namespace, config: Config) -> None:
    if args.command in (None, "serve"):
        serve(config)
    elif args.command == "import":
        store = Store(config.db_path)
        with open(args.archive, "rb") as source:
            study_id, created = import_study_file(store, config, source)
        with store.snapshot() as db:
            study = _row(db, "studies", study_id)
        verb = "Imported" if created else "Updated"
        print(f"{verb} study '{study['title']}' (ID {study_id}) in {config.studies / study['dir_name']}")
    elif args.command == "links":
        links_command(existing_store(config), config, args)
    elif args.command == "token":
        token_command(Store(config.db_path), args.action, args.name, args.id)
    elif args.command in ("export", "export-study"):
        style = csv_style_of(args) if args.command == "export" else None
        store = existing_store(config)
        size = (export_study(store, config, args.study, args.output) if style is None else
                export_results(store, config, args.study, args.output, args.csv, style))
        print(f"Wrote {args.output} ({human_bytes(size)})")
    elif args.command == "pyz":
        carried = bundled_study_entries(config) if args.with_studies else []
        size = build_pyz(args.output, carried)
        count = len(carried) - 1  # and the index
        studies = f" with {count} stud{'y' if count == 1 else 'ies'}" if carried else ""
        print(f"Wrote {args.output} ({human_bytes(size)}){studies}: copy it anywhere and start it with "
              f"'python {args.output.name}'")
    elif args.command == "backup":
        size = backup(existing_store(config), config, args.output)
        print(f"Wrote {args.output} ({human_bytes(size)}): database, result files and studies")


if __name__ == "__main__":
    sys.exit(main())
