"""The ``.deb`` (``make deb``) installed into a clean Debian tree booted under a real
systemd (``systemd-nspawn --boot``), run as an operator runs it: ``systemctl start``,
``/metrics``, ``journalctl -p err``, ``systemctl reload`` and ``systemctl restart``
during a call whose media the kernel relays.

The machine lives in the gateway namespace of a lab (xlat/lab.py), so the lab's end
hosts send media through it; it gets the host's kernel headers (``/lib/modules``,
``/usr/src``) and a bpffs at ``/sys/fs/bpf`` as a router has at boot. The Debian tree
is debootstrapped once into ``build/nspawn/`` (about 1.5 min; see nspawn.py) and
reused. ``XLAT_SKIP_NSPAWN=1`` skips this module, saying so; nothing else does
(outside CI, a missing tool or root skips as in pkgsupport.require).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from nspawn import CACHE, Machine, debian_tree, dependencies
from pkgsupport import REPO, copy_source, require, run
from prometheus_client.parser import text_string_to_metric_families

from xlat.addr import Endpoint
from xlat.lab import GW4, GW6, V4_HOST, V6_HOST, Lab, in_netns

pytestmark = pytest.mark.system

CONFIG = "/etc/xlat/xlat.toml"
METRICS = "127.0.0.1:9260"
SETTINGS = f'media-v4 = "{GW4}"\nmedia-v6 = "{GW6}"\nmetrics-listen = "{METRICS}"\n'
BAD_ROUTE = 'route = ["example.org"]\n'  # no "=sip:HOST:PORT"
A = Endpoint.parse(f"[{V6_HOST}]:40000")  # the IPv6 phone's media
B = Endpoint.parse(f"{V4_HOST}:50000")  # the IPv4 phone's media
STREAM_PPS = 100
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require("root (namespaces, systemd-nspawn, eBPF)", os.geteuid() == 0)
    lab = Lab(f"xn-{os.urandom(3).hex()}")
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def machine(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """The package built from this checkout, installed in a booted machine, and
    /etc/xlat/xlat.toml edited as the operator would; xlat not started yet."""
    if os.environ.get("XLAT_SKIP_NSPAWN") == "1":
        pytest.skip("XLAT_SKIP_NSPAWN=1: the .deb under systemd-nspawn was not tested")
    for tool in ("systemd-nspawn", "debootstrap", "dpkg-buildpackage", "nsenter"):
        require(tool, shutil.which(tool) is not None)
    tmp = tmp_path_factory.mktemp("deb")
    src = copy_source(tmp / "src")
    run("bash", src / "scripts/build-deb.sh", cwd=src, timeout=600)
    (deb,) = (src / "dist").glob("xlat_*.deb")
    tree = debian_tree(dependencies(deb))
    kernel = os.uname().release
    m = Machine(tree, f"xlat-{lab.tag}", lab.gw, log=tmp / "machine.log", options=[
        f"--bind-ro={deb.parent}:/mnt/xlat",
        # bcc compiles against the running kernel's headers: the host's, not the tree's
        f"--bind-ro=/lib/modules/{kernel}", "--bind-ro=/usr/src",
        # the bpffs a router's systemd mounts at boot (nspawn gives a read-only /sys)
        f"--bind={lab.bpffs}:/sys/fs/bpf",
        # the host's package lists and the tree's package cache: the machine has no
        # network, the host fetches what it installs (peers_installed)
        "--bind-ro=/var/lib/apt/lists", f"--bind-ro={CACHE / 'debs'}:/mnt/debs",
    ])
    try:
        m.boot()
        m.run("apt-get", "install", "-y", "-q", f"/mnt/xlat/{deb.name}", timeout=300)
        m.run("tee", "-a", CONFIG, stdin=SETTINGS)
        yield m
    finally:
        m.poweroff()


def systemctl(m: Machine, *args: str) -> None:
    """``systemctl ARGS``; when it fails, the assertion shows the unit's journal."""
    r = m.run("systemctl", *args, check=False)
    assert r.returncode == 0, (f"systemctl {' '.join(args)}: {r.stderr}\n" + m.run(
        "journalctl", "-u", "xlat", "-n", "40", "--no-pager", check=False).stdout)


def service(m: Machine) -> dict[str, str]:
    props = m.run("systemctl", "show", "xlat", "-p",
                  "Type,ActiveState,SubState,MainPID,NRestarts,UnitFileState").stdout
    return dict(line.split("=", 1) for line in props.splitlines())


def xlat_json(m: Machine, *args: str) -> object:
    return json.loads(m.run("xlat", "-j", *args).stdout)


def metrics(m: Machine) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET /metrics in the machine (curl on the router), parsed by prometheus_client."""
    body = m.run("python3", "-c", "import sys, urllib.request; sys.stdout.write(urllib."
                 f"request.urlopen('http://{METRICS}/metrics').read().decode())").stdout
    return {f.name: [(s.labels, s.value) for s in f.samples]
            for f in text_string_to_metric_families(body)}


def flow_packets(m: Machine) -> dict[str, int]:
    """Packets the kernel counted per flow (its map), by the flow's match."""
    flows = xlat_json(m, "flow", "list")
    assert isinstance(flows, list)
    return {f["match"]: f["packets"] for f in flows}


def test_start_reaches_active_through_notify_metrics_and_errors_in_the_journal(
        machine: Machine) -> None:
    m = machine
    assert service(m)["UnitFileState"] == "disabled"  # configured first, then enabled
    m.run("xlat", "config", "check")
    systemctl(m, "enable", "--now", "xlat")  # returns once READY=1 came
    state = service(m)
    assert (state["Type"], state["ActiveState"], state["SubState"]) == \
        ("notify", "active", "running"), state

    families = metrics(m)
    ((info, _),) = families["xlat_info"]
    assert info["version"] == VERSION and "ebpf" in info["datapath"].split("+"), info
    assert dict((lbl["family"], v) for lbl, v in families["xlat_relay_port_pairs"]) == \
        {"ipv4": 5000, "ipv6": 5000}, families["xlat_relay_port_pairs"]  # ports 30000-39999

    # a route without its target, then `systemctl reload`: refused, logged at err, and
    # the daemon runs on with the configuration it had
    m.run("tee", "-a", CONFIG, stdin=BAD_ROUTE)
    systemctl(m, "reload", "xlat")
    errors = m.run("journalctl", "-u", "xlat", "-p", "err", "-o", "cat", "--no-pager").stdout
    assert "reload failed, running configuration kept" in errors, errors
    assert "example.org" in errors, errors
    assert service(m)["ActiveState"] == "active"
    r = m.run("xlat", "config", "check", check=False)
    assert r.returncode == 1 and "route" in r.stdout + r.stderr, r
    # put the file right again: what the restart test starts from
    m.run("sed", "-i", f"/^{BAD_ROUTE.strip()}$/d".replace("[", r"\[").replace("]", r"\]"),
          CONFIG)
    m.run("xlat", "config", "check")


@dataclass
class Stream:
    """STREAM_PPS numbered packets A -> relay; the numbers B received."""

    sender: socket.socket
    receiver: socket.socket
    to: Endpoint
    sent: int = 0
    got: set[int] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def send(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            self.sender.sendto(self.sent.to_bytes(4, "big"), (str(self.to.host), self.to.port))
            self.sent += 1
            time.sleep(max(0.0, start + self.sent / STREAM_PPS - time.monotonic()))

    def receive(self) -> None:
        self.receiver.settimeout(0.2)
        while not self.stop.is_set():
            try:
                self.got.add(int.from_bytes(self.receiver.recv(64)[:4], "big"))
            except TimeoutError:
                continue


def udp(ns: str, bind: Endpoint) -> socket.socket:
    with in_netns(ns):
        s = socket.socket(socket.AF_INET6 if bind.family == 6 else socket.AF_INET,
                          socket.SOCK_DGRAM)
    s.bind((str(bind.host), bind.port))
    s.settimeout(2.0)
    return s


def test_systemctl_restart_keeps_a_manual_session_relaying_in_the_kernel(
        machine: Machine, lab: Lab) -> None:
    m = machine
    systemctl(m, "start", "xlat")
    before_pid = service(m)["MainPID"]
    s = xlat_json(m, "session", "add", "--peer-a", str(A), "--peer-b", str(B))
    assert isinstance(s, dict)
    relay_a = Endpoint.parse(s["legs"][0]["relay"])
    with udp(lab.v6, A) as a, udp(lab.v4, B) as b:
        for i in range(5):
            a.sendto(b"before %d" % i, (str(relay_a.host), relay_a.port))
            assert b.recv(64) == b"before %d" % i
        counted = flow_packets(m)[str(relay_a)]
        assert counted == 5
        stream = Stream(a, b, relay_a)
        threads = [threading.Thread(target=f) for f in (stream.send, stream.receive)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            started = time.monotonic()
            systemctl(m, "restart", "xlat")  # returns once the new daemon is ready
            restart = time.monotonic() - started
            time.sleep(1.0)
        finally:
            stream.stop.set()
            for t in threads:
                t.join()
    lost = stream.sent - len(stream.got)
    print(f"\n{STREAM_PPS} pps across systemctl restart: sent {stream.sent}, lost {lost}; "
          f"restart took {restart:.2f} s")
    after = service(m)
    assert after["ActiveState"] == "active" and after["MainPID"] != before_pid, after
    assert [x["id"] for x in xlat_json(m, "session", "list")] == [s["id"]]  # type: ignore[union-attr]
    # the same kernel flow counted on through the restart: it was never reinstalled
    assert flow_packets(m)[str(relay_a)] == counted + len(stream.got)
    assert lost <= 1  # the last one may still be in flight when the stream stops
    forwarded = dict((lbl["datapath"], v) for lbl, v in metrics(m)["xlat_forwarded_packets"])
    assert forwarded["ebpf"] >= counted + len(stream.got), forwarded


PEERS = ("kamailio", "rtpengine-daemon", "dnsmasq")


def install_offline(m: Machine, names: Sequence[str]) -> None:
    """``apt-get install PACKAGES`` in the machine, which has no network: the host
    downloads (``apt-get download``, into the tree's package cache) what is not there."""
    packages = ["--no-install-recommends", *names]  # as setup.sh installs the peers
    plan = m.run("apt-get", "install", "-s", "-qq", *packages).stdout
    wanted = [f"{name}={version}" for name, version in
              re.findall(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) ", plan, re.M)]
    run("apt-get", "download", "-q", *wanted, cwd=CACHE / "debs", timeout=600,
        env=dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin"))
    files = m.run("apt-get", "install", "-qq", "--print-uris", *packages).stdout
    m.run("cp", *(f"/mnt/debs/{line.split()[1]}" for line in files.splitlines()),
          "/var/cache/apt/archives/")
    m.run("apt-get", "install", "-y", "-q", "--no-download", *packages, timeout=600)


def test_setup_stops_and_disables_the_services_debian_starts_with_the_test_peers(
        machine: Machine) -> None:
    """What scripts/setup.sh runs after installing test peers (scripts/quiet-peers.sh)."""
    m = machine
    systemctl(m, "stop", "xlat")  # it holds :5060 on the gateway's addresses
    install_offline(m, PEERS)
    running = {u for u in ("kamailio", "rtpengine-daemon", "dnsmasq")
               if m.run("systemctl", "is-active", "-q", u, check=False).returncode == 0}
    assert running == {"kamailio", "rtpengine-daemon", "dnsmasq"}  # Debian started them
    listening = m.run("ss", "-Hlntup").stdout
    assert ":5060 " in listening and ":2223 " in listening, listening
    out = m.run("bash", "-s", "--", *PEERS,
                stdin=(REPO / "scripts/quiet-peers.sh").read_text()).stdout
    for unit in running:
        assert f"stopping and disabling {unit}.service" in out, out
    units = m.run("systemctl", "list-unit-files", "--no-legend", "kamailio.service",
                  "rtpengine*.service", "dnsmasq.service").stdout
    assert units and all(line.split()[1] in ("disabled", "alias")  # rtpengine.service
                         for line in units.splitlines()), units
    listening = m.run("ss", "-Hlntup").stdout
    assert ":5060 " not in listening and ":2223 " not in listening, listening
    assert m.run("bash", "-s", "--", *PEERS,  # idempotent: nothing left to do
                 stdin=(REPO / "scripts/quiet-peers.sh").read_text()).stdout == ""
