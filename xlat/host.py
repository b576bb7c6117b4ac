"""What the daemon takes from its host: one lock per interface it serves, the file
descriptor limit, the interfaces to attach to by default."""

from __future__ import annotations

import fcntl
import os
import resource
from collections.abc import Sequence
from pathlib import Path

LOCK_DIR = Path("/run/xlat/locks")


class InterfaceBusy(Exception):
    """A live xlat already serves an interface; the message names it and its pid."""


def raise_fd_limit(want: int = 1 << 20) -> int:
    """The userspace relay holds two sockets per RTP/RTCP pair: lift RLIMIT_NOFILE as far
    as the kernel lets root. Returns the limit in force."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def default_interfaces() -> list[str]:
    """Every non-loopback interface that is up, in this network namespace."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [
            link.get_attr("IFLA_IFNAME")
            for link in ipr.get_links()
            if link.get_attr("IFLA_IFNAME") != "lo" and link["flags"] & 1  # IFF_UP
        ]


class InterfaceLocks:
    """One flock per (network namespace, interface): the kernel drops it when the
    holder dies, so only a *live* daemon on the same interfaces blocks a new one. A
    clean stop removes its lock files."""

    def __init__(self, interfaces: Sequence[str]) -> None:
        self.interfaces = interfaces
        self._held: list[tuple[Path, int]] = []

    def acquire(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        netns = os.stat("/proc/self/ns/net").st_ino
        for name in sorted(self.interfaces):  # one order: two starting daemons cannot cross
            path = LOCK_DIR / f"net{netns}-{name}.lock"
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    self.release()
                    raise InterfaceBusy(
                        f"interface {name} is already served by a running xlat (pid {holder})"
                    ) from None
                if _same_file(path, fd):
                    break
                os.close(fd)  # its holder removed it as we locked it: lock the new one
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._held.append((path, fd))

    def release(self) -> None:
        for path, fd in self._held:
            path.unlink(missing_ok=True)  # while still locked: a waiter sees it is stale
            os.close(fd)
        self._held.clear()


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
