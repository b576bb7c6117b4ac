"""The namespace lab: an IPv6 host, the gateway and an IPv4 host, wired with veths.

::

    xlat-{tag}-v6              xlat-{tag}-gw                     xlat-{tag}-v4
    eth0 2001:db8:6::2/64 ---- gw6 2001:db8:6::1/64
         2001:db8:6::3/64      gw4 203.0.113.1/24   ---- eth0 203.0.113.2/24
                                                              203.0.113.3/24

The end hosts route everything via the gateway; the gateway forwards both families
(needed by ``bpf_fib_lookup``) and accepts packets that carry its own addresses as
source (the pass-to-stack path). IPv6 DAD is off so addresses work at once.
Used by the netns tests, ``xlat lab`` and the demo. Built with pyroute2 (netlink);
only ``exec`` (``ip netns exec``) and ``checksum_offload_off`` (ethtool) run programs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from xlat.addr import IPAddress

LAB_RUN_DIR = Path("/run/xlat-lab")
HOST_IF = "eth0"  # the end hosts' interface
GW6_IF = "gw6"  # gateway, IPv6 side
GW4_IF = "gw4"  # gateway, IPv4 side

GW6 = IPv6Address("2001:db8:6::1")
V6_HOST = IPv6Address("2001:db8:6::2")
V6_HOST2 = IPv6Address("2001:db8:6::3")
GW4 = IPv4Address("203.0.113.1")
V4_HOST = IPv4Address("203.0.113.2")
V4_HOST2 = IPv4Address("203.0.113.3")
PREFIX6 = 64
PREFIX4 = 24

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    """The lab could not be built; the message names the step."""


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with the calling thread in network namespace ``name``.

    Sockets (and netlink handles) created inside stay in that namespace after the block;
    /proc/sys/net opened inside is that namespace's. Restores the thread's namespace.
    """
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        netns.setns(name, flags=0)
        yield
    finally:
        netns.setns(saved, flags=0)
        os.close(saved)


def write_sysctl(key: str, value: str | int) -> None:
    """Set ``net.x.y`` in the calling thread's network namespace."""
    Path("/proc/sys", *key.split(".")).write_text(f"{value}\n")


def new_namespace(name: str) -> None:
    """Create network namespace ``name`` with loopback up and IPv6 DAD off."""
    netns.create(name)
    with in_netns(name):
        write_sysctl("net.ipv6.conf.all.accept_dad", 0)
        write_sysctl("net.ipv6.conf.default.accept_dad", 0)
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


class Lab:
    """Three namespaces ``xlat-{tag}-v6|gw|v4``; ``up()`` builds, ``down()`` removes."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.v6 = f"xlat-{tag}-v6"
        self.gw = f"xlat-{tag}-gw"
        self.v4 = f"xlat-{tag}-v4"
        self.bpffs = LAB_RUN_DIR / tag / "bpf"

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.v6, self.gw, self.v4)

    # ---- building -----------------------------------------------------------------

    def up(self) -> None:
        """Build the lab from scratch (leftovers of the same tag are removed first)."""
        self.down()
        try:
            for ns in self.namespaces:
                new_namespace(ns)
            self._wire(GW6_IF, self.v6)
            self._wire(GW4_IF, self.v4)
            self._gateway()
            self._host(self.v6, [V6_HOST, V6_HOST2], PREFIX6, GW6)
            self._host(self.v4, [V4_HOST, V4_HOST2], PREFIX4, GW4)
            self._mount_bpffs()
        except (OSError, NetlinkError) as e:
            self.down()
            raise LabError(f"lab {self.tag}: {e}") from e

    def _wire(self, gw_if: str, host_ns: str) -> None:
        """veth ``gw_if`` in the gateway, its peer as ``eth0`` in ``host_ns``."""
        peer = f"{gw_if}-{self.tag}"[:15]
        with in_netns(self.gw), IPRoute() as ipr:
            ipr.link("add", ifname=gw_if, kind="veth", peer=peer)
            (idx,) = ipr.link_lookup(ifname=peer)
            ipr.link("set", index=idx, net_ns_fd=host_ns, ifname=HOST_IF)

    def _gateway(self) -> None:
        with in_netns(self.gw):
            write_sysctl("net.ipv4.ip_forward", 1)
            write_sysctl("net.ipv6.conf.all.forwarding", 1)
            for conf in ("all", "default", GW6_IF, GW4_IF):
                write_sysctl(f"net.ipv4.conf.{conf}.rp_filter", 0)
                write_sysctl(f"net.ipv4.conf.{conf}.accept_local", 1)
            for ifname in (GW6_IF, GW4_IF):
                write_sysctl(f"net.ipv6.conf.{ifname}.accept_dad", 0)
            with IPRoute() as ipr:
                self._address(ipr, GW6_IF, [GW6], PREFIX6)
                self._address(ipr, GW4_IF, [GW4], PREFIX4)

    def _host(self, ns: str, addrs: Sequence[IPAddress], prefix: int, gateway: IPAddress) -> None:
        with in_netns(ns):
            write_sysctl(f"net.ipv6.conf.{HOST_IF}.accept_dad", 0)
            with IPRoute() as ipr:
                self._address(ipr, HOST_IF, addrs, prefix)
                ipr.route("add", dst="default", gateway=str(gateway))

    @staticmethod
    def _address(ipr: IPRoute, ifname: str, addrs: Sequence[IPAddress], prefix: int) -> None:
        (idx,) = ipr.link_lookup(ifname=ifname)
        for a in addrs:
            ipr.addr("add", index=idx, address=str(a), prefixlen=prefix)
        ipr.link("set", index=idx, state="up")

    def _mount_bpffs(self) -> None:
        """A bpffs outside /sys: ``ip netns exec`` remounts /sys, but inherits /run."""
        self.bpffs.mkdir(parents=True, exist_ok=True)
        if _libc.mount(b"bpf", str(self.bpffs).encode(), b"bpf", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount -t bpf {self.bpffs}: {os.strerror(err)}")

    # ---- teardown -----------------------------------------------------------------

    def down(self) -> None:
        """Remove everything ``up()`` made; missing pieces are fine. Never raises."""
        if self.bpffs.exists():
            _libc.umount2(str(self.bpffs).encode(), MNT_DETACH)
        shutil.rmtree(LAB_RUN_DIR / self.tag, ignore_errors=True)
        for ns in self.namespaces:
            with contextlib.suppress(OSError):
                netns.remove(ns)

    # ---- using --------------------------------------------------------------------

    def exec(self, ns: str, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``ns`` (``ip netns exec``)."""
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kw)

    def run(self, ns: str, argv: Sequence[str]) -> str:
        """Run ``argv`` in ``ns`` to completion; returns stdout, raises LabError on failure."""
        proc = self.exec(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=30)
        if proc.returncode != 0:
            raise LabError(f"{' '.join(argv)} in {ns}: {err.strip()}")
        return out

    def in_netns(self, ns: str) -> contextlib.AbstractContextManager[None]:
        """See the module-level ``in_netns``."""
        return in_netns(ns)

    def links(self) -> list[tuple[str, str]]:
        """Every lab veth end as (namespace, interface)."""
        return [(self.v6, HOST_IF), (self.gw, GW6_IF), (self.gw, GW4_IF), (self.v4, HOST_IF)]

    def checksum_offload_off(self) -> None:
        """Turn tx checksum offload off on every lab veth, so packets carry complete
        checksums on the wire (CHECKSUM_PARTIAL ones look bad to a capture)."""
        for ns, ifname in self.links():
            self.run(ns, ["ethtool", "-K", ifname, "tx", "off"])

    def mac(self, ns: str, ifname: str) -> str:
        """The MAC address of ``ifname`` in ``ns``."""
        with in_netns(ns), IPRoute() as ipr:
            (link,) = ipr.get_links(ifname=ifname)
            return str(link.get_attr("IFLA_ADDRESS"))
