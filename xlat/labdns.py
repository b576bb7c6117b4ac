"""A name server for the lab: Debian's dnsmasq serving test zones (NAPTR, SRV, AAAA, A
records) from one namespace, and the ``/etc/netns/<ns>/resolv.conf`` that points
another namespace at it. ``ip netns exec <ns>`` bind-mounts that file over
/etc/resolv.conf, so ``xlat run`` started there finds the server the way a daemon
finds its DNS. Used by the RFC 3263 and TLS end-to-end tests and by the bench's DNS
figure; the records are dnsmasq options (``--naptr-record``, ``--srv-host``,
``--host-record``) the caller gives.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from xlat.addr import IPAddress

NETNS_ETC = Path("/etc/netns")
_QUERY_LINE = re.compile(r"\b(?:query|auth)\[\w+\] ")


def authoritative(zone: str, ttl: int) -> list[str]:
    """dnsmasq options that make it the authoritative server of ``zone``: answers carry
    ``ttl``, and negative ones (NXDOMAIN, no record of that type) the zone's SOA with
    ``ttl`` as its negative TTL (RFC 2308 §5), so a resolver caches them too. Without
    these (``--local=/zone/``) dnsmasq answers NODATA with no SOA, which RFC 2308 says
    not to cache."""
    return [f"--auth-zone={zone}", f"--auth-ttl={ttl}",
            f"--auth-soa=1,hostmaster.{zone},1200,180,1209600"]


class Dnsmasq:
    """dnsmasq in namespace ``ns`` (None: this one) on ``address``:``port`` with
    ``records`` (more dnsmasq options), logging every query to ``log``. With ``zone``,
    authoritative for it (see ``authoritative``); else records declared with
    ``--local=/domain/`` answered with TTL ``ttl``. ``stop()`` ends it (idempotent)."""

    def __init__(self, ns: str | None, address: IPAddress, records: Sequence[str], log: Path,
                 *, port: int = 53, zone: str | None = None, ttl: int = 0) -> None:
        self.log = log
        served = [f"--auth-server=ns.{zone},{address}", *authoritative(zone, ttl)] \
            if zone else [f"--local-ttl={ttl}"]
        argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", "--bind-interfaces", f"--listen-address={address}",
                f"--port={port}", "--pid-file=", "--log-queries", "--log-facility=-",
                *served, *records]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv] if ns else argv,
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited: {log.read_text()}")

    def queries(self) -> int:
        """How many queries it has been asked so far (from its log)."""
        return len(_QUERY_LINE.findall(self.log.read_text(errors="replace")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def __enter__(self) -> Dnsmasq:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def resolv_conf(ns: str, server: IPAddress) -> Iterator[Path]:
    """``/etc/netns/<ns>/resolv.conf`` naming ``server`` for the block; removed after
    (and ``/etc/netns`` too if this made it and nothing else is in it)."""
    directory = NETNS_ETC / ns
    made_parent = not NETNS_ETC.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        path = directory / "resolv.conf"
        path.write_text(f"nameserver {server}\n")
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if made_parent:
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()
