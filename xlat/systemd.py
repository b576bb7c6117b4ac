"""The service manager's notification protocol (sd_notify(3)), without libsystemd.

A unit with ``Type=notify`` hands its service ``$NOTIFY_SOCKET``, a unix datagram
socket (a path, or ``@name`` in the abstract namespace); each datagram is a set of
newline-separated ``KEY=VALUE`` assignments: ``READY=1``, ``RELOADING=1``,
``STOPPING=1``, ``STATUS=…``, ``WATCHDOG=1``. With ``WatchdogSec=`` it also sets
``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the process meant): a service that sends no
``WATCHDOG=1`` for that long is killed and, with ``Restart=on-failure``, restarted.
Outside systemd the variables are unset and every call here does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def notify(*assignments: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``KEY=VALUE`` lines to the service manager; False when there is none.
    Never raises for a missing or vanished socket: the daemon's work does not
    depend on being watched."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or not assignments:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError:
        return False
    return True


def watchdog_period(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between two ``WATCHDOG=1``: half of ``$WATCHDOG_USEC`` (sd_watchdog_enabled
    advises pinging at half the timeout), or None when no watchdog is asked of this
    process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
