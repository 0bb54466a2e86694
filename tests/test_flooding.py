"""One device on the lab network cannot make the server unreachable for the others: each
address holds at most its share of connections, and a request whose headers trickle in a
byte at a time is hung up on."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

import jatos_lite
from conftest import free_port

OTHER_DEVICE = "127.0.0.2"  # another loopback address: a second device, as the server sees it


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[jatos_lite.Config, int]]:
    """The server as `serve` runs it, with a small share per address and a short header timeout."""
    config = jatos_lite.Config(studies=tmp_path / "studies", data=tmp_path / "data", threads=4,
                               connections_per_address=20, header_timeout_seconds=1.0)
    app = jatos_lite.create_app(config)
    port = free_port()
    server = jatos_lite.guarded_server(app, config, host="127.0.0.1", port=port, threads=config.threads,
                                       connection_limit=100, **jatos_lite.WAITRESS_OPTIONS)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield config, port
    server.close()
    app.config["jatos_lite.hub"].stop()


def slow_header(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: lab\r\nX-Slow: ")
    return sock


def ping_from(address: str, port: int) -> float:
    """Seconds until GET /ping is answered from `address`."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=3, source_address=(address, 0)) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        answer = b""
        while b"pong" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert b"200 OK" in answer and b"pong" in answer
    return time.monotonic() - started


def other_device_available() -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((OTHER_DEVICE, 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not other_device_available(), reason="no second loopback address (not Linux)")
def test_a_slow_header_flood_from_one_address_leaves_the_server_to_the_others(guarded) -> None:
    _, port = guarded
    flood = [slow_header(port) for _ in range(150)]  # more than the connection limit (100)
    try:
        for _ in range(3):
            for sock in flood:
                try:
                    sock.send(b"x")
                except OSError:
                    pass  # hung up on: over the address's share
            assert ping_from(OTHER_DEVICE, port) < 1.0
            time.sleep(0.3)
    finally:
        for sock in flood:
            sock.close()


def test_a_request_whose_headers_trickle_in_is_hung_up_on(guarded) -> None:
    config, port = guarded
    sock = slow_header(port)
    deadline = time.monotonic() + config.header_timeout_seconds + 2 * jatos_lite.WAITRESS_OPTIONS["cleanup_interval"] + 2
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            sock.send(b"x")
            sock.settimeout(0.2)
            closed = sock.recv(100) == b""
        except socket.timeout:
            pass
        except OSError:
            closed = True
    sock.close()
    assert closed, "the connection was still open after the header timeout"


def test_each_address_holds_at_most_its_share(guarded) -> None:
    config, port = guarded
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(config.connections_per_address + 5)]
    try:
        time.sleep(0.5)
        refused = 0
        for sock in held:
            sock.settimeout(0.5)
            try:
                if sock.recv(10) == b"":
                    refused += 1
            except socket.timeout:
                pass
            except OSError:
                refused += 1
        assert refused == 5
    finally:
        for sock in held:
            sock.close()
