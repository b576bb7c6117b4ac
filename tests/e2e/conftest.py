"""Fixtures of the SIP end-to-end tests: one lab with ``xlat run`` in its gateway
namespace (started as a user would, ``ip netns exec <gw> xlat run …``) for the whole
module, the phones, and a NAT64 (Debian's tayga) in front of an IPv6-only phone.

Outside CI a missing prerequisite (root, sipp, tayga) skips; under ``CI=true`` it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from xlat.demo import Gateway, Phone, start_gateway
from xlat.lab import HOST_IF, LAB_RUN_DIR, V4_HOST, V6_HOST, Lab, in_netns, write_sysctl
from xlat.sip.auth import ha1

DELETE_DELAY = 2.0  # seconds a BYE'd session lingers here: long enough to see it "deleting"
DOMAIN = "xlat.test"
# A network-specific prefix (RFC 6052 §2.2), not 64:ff9b::/96: Debian's tayga 0.9.2 refuses
# to use the well-known prefix for non-global IPv4 like the lab's 203.0.113.0/24 (§3.1).
NAT64_PREFIX = IPv6Network("2001:db8:46::/96")


def require(what: str, ok: bool) -> None:
    """Skip (fail under CI=true) when a prerequisite is missing."""
    if not ok:
        message = f"e2e prerequisite missing: {what}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


# The registrar's users (--users): every phone name the tests use, one password. SIPp
# 3.6 answers only MD5 and only the first challenge, hence algorithms = ["MD5"].
USERS = ("alice", "bob", "reg4", "reg6", "multi")
PASSWORD = "xlat-e2e-password"
AUTH = ("-ap", PASSWORD)  # SIPp's password for a challenge; the user is its -s


def write_users(path: Path) -> None:
    lines = [f'realm = "{DOMAIN}"', 'algorithms = ["MD5"]', "[users]"]
    lines += [f'{u} = {{ MD5 = "{ha1("MD5", u, DOMAIN, PASSWORD)}" }}' for u in USERS]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require("root", os.geteuid() == 0)
    require("sipp", shutil.which("sipp") is not None)
    lab = Lab(f"xs-{os.urandom(3).hex()}")
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def gateway(lab: Lab) -> Iterator[Gateway]:
    """``xlat run`` with SIP on both families, serving DOMAIN, told our NAT64's prefix
    (a config-file setting) and a short delete delay."""
    config = LAB_RUN_DIR / lab.tag / "xlat.toml"
    config.write_text(f'nat64-prefix = ["{NAT64_PREFIX}"]\n')
    users = LAB_RUN_DIR / lab.tag / "users.toml"
    write_users(users)
    gw = start_gateway(lab, "-c", str(config), "--domain", DOMAIN, "--users", str(users),
                       "--delete-delay", f"{DELETE_DELAY:g}", "--ports", "30000-30199",
                       "--log-level", "debug")
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def alice6(lab: Lab) -> Phone:
    """An IPv6-only phone."""
    return Phone(lab.v6, V6_HOST, "alice")


@pytest.fixture
def bob4(lab: Lab) -> Phone:
    """An IPv4-only phone."""
    return Phone(lab.v4, V4_HOST, "bob")


@pytest.fixture
def phones(alice6: Phone, bob4: Phone) -> dict[int, Phone]:
    """The phone of each family."""
    return {6: alice6, 4: bob4}


# ---- NAT64 -------------------------------------------------------------------------------

NAT64_LINK = IPv6Network("2001:db8:64::/64")  # between the NAT64 box and the phone
NAT64_POOL = IPv4Network("203.0.113.128/25")  # IPv4 addresses tayga gives the phone
TAYGA_IF = "nat64"
TAYGA_V6 = IPv6Address("2001:db8:64:ffff::1")  # its own, for ICMPv6 errors it sends


@dataclass(frozen=True)
class Nat64:
    """An IPv6-only phone in namespace ``phone.ns`` whose IPv4 world is behind tayga,
    which runs in the IPv4 host's namespace (answering ARP for its pool there)."""

    phone: Phone
    prefix: IPv6Network


@pytest.fixture(scope="module")
def nat64(lab: Lab) -> Iterator[Nat64]:
    require("tayga", shutil.which("tayga") is not None)
    ns = f"xlat-{lab.tag}-n64"
    router, phone_addr = NAT64_LINK[1], NAT64_LINK[2]
    workdir = LAB_RUN_DIR / lab.tag / "tayga"
    tayga: subprocess.Popen[bytes] | None = None
    try:
        netns.create(ns)
        _link_phone(lab, ns, router, phone_addr)
        tayga = _start_tayga(lab, workdir)
        yield Nat64(Phone(ns, phone_addr, "carol"), NAT64_PREFIX)
    finally:
        if tayga is not None:
            tayga.terminate()
            tayga.wait(timeout=10)
        with in_netns(lab.v4), IPRoute() as ipr:
            for ifname in (TAYGA_IF, "n64"):
                for idx in ipr.link_lookup(ifname=ifname):
                    ipr.link("del", index=idx)
        netns.remove(ns)


def _link_phone(lab: Lab, ns: str, router: IPv6Address, phone: IPv6Address) -> None:
    """veth ``n64`` in the IPv4 host's namespace <-> ``eth0`` in ``ns``."""
    with in_netns(ns), IPRoute() as ipr:
        write_sysctl("net.ipv6.conf.all.accept_dad", 0)
        write_sysctl("net.ipv6.conf.default.accept_dad", 0)
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    with in_netns(lab.v4), IPRoute() as ipr:
        write_sysctl("net.ipv6.conf.default.accept_dad", 0)
        ipr.link("add", ifname="n64", kind="veth", peer="n64-phone")
        (peer,) = ipr.link_lookup(ifname="n64-phone")
        ipr.link("set", index=peer, net_ns_fd=ns, ifname=HOST_IF)
        (idx,) = ipr.link_lookup(ifname="n64")
        ipr.addr("add", index=idx, address=str(router), prefixlen=NAT64_LINK.prefixlen)
        ipr.link("set", index=idx, state="up")
        write_sysctl("net.ipv6.conf.all.forwarding", 1)
        write_sysctl("net.ipv4.ip_forward", 1)
        write_sysctl(f"net.ipv4.conf.{HOST_IF}.proxy_arp", 1)
    with in_netns(ns), IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=HOST_IF)
        ipr.addr("add", index=idx, address=str(phone), prefixlen=NAT64_LINK.prefixlen)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst="default", gateway=str(router))


def _start_tayga(lab: Lab, workdir: Path) -> subprocess.Popen[bytes]:
    """tayga (stateless NAT64, RFC 6145/6052) in the IPv4 host's namespace."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "tayga.conf"
    conf.write_text(
        f"tun-device {TAYGA_IF}\n"
        f"ipv4-addr {NAT64_POOL[1]}\n"
        f"ipv6-addr {TAYGA_V6}\n"
        f"prefix {NAT64_PREFIX}\n"
        f"dynamic-pool {NAT64_POOL}\n"
        f"data-dir {workdir}\n"
    )
    lab.run(lab.v4, ["tayga", "--mktun", "-c", str(conf)])
    with in_netns(lab.v4), IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=TAYGA_IF)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst=str(NAT64_POOL), oif=idx)
        ipr.route("add", dst=str(NAT64_PREFIX), oif=idx)
    log = (workdir / "tayga.log").open("wb")
    proc = lab.exec(lab.v4, ["tayga", "-d", "-c", str(conf)], stdout=log,
                    stderr=subprocess.STDOUT)
    time.sleep(0.3)
    if proc.poll() is not None:
        raise RuntimeError(f"tayga exited: {(workdir / 'tayga.log').read_text()}")
    return proc


# ---- TLS: a CA made by the test ------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """A certificate (PEM chain: leaf) and its key, issued by ``ca``."""

    cert: Path
    key: Path
    ca: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def make_ca(directory: Path, name: str = "xlat test CA") -> tuple[Path, Path]:
    """A self-signed CA (EC P-256, valid two days): (certificate, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def issue(directory: Path, ca: tuple[Path, Path], stem: str, names: list[str]) -> Certificate:
    """A server certificate for ``names`` (DNS names and IP addresses, as
    subjectAltName: RFC 5922 §7.1) signed by ``ca``."""
    key, csr, cert = directory / f"{stem}.key", directory / f"{stem}.csr", directory / f"{stem}.pem"
    ext = directory / f"{stem}.ext"
    sans = ",".join(f"IP:{n}" if _is_ip(n) else f"DNS:{n}" for n in names)
    ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return Certificate(cert, key, ca[0])


def _is_ip(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True
