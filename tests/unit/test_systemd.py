"""sd_notify(3) as xlat speaks it, to a real unix datagram socket standing where
systemd's would be."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from xlat import systemd


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    yield sock
    sock.close()


def test_notify_sends_one_datagram_of_newline_separated_assignments(
    manager: socket.socket,
) -> None:
    env = {"NOTIFY_SOCKET": manager.getsockname()}
    assert systemd.notify("READY=1", "STATUS=datapath ebpf+nft", environ=env)
    assert manager.recv(4096) == b"READY=1\nSTATUS=datapath ebpf+nft"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"xlat-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert systemd.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_outside_systemd_or_to_a_vanished_socket_does_nothing(tmp_path: Path) -> None:
    assert not systemd.notify("READY=1", environ={})
    assert not systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})


@pytest.mark.parametrize(("env", "period"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),  # half the timeout
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_period(env: dict[str, str], period: float | None) -> None:
    assert systemd.watchdog_period(env) == period
