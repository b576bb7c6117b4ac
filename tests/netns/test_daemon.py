"""The daemon as a user runs it: ``xlat run`` in the lab's gateway namespace, the CLI
over the control socket, real UDP from the phones' namespaces through the kernel."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xlat.addr import Endpoint
from xlat.host import LOCK_DIR
from xlat.lab import GW4, GW6, V4_HOST, V6_HOST, Lab, in_netns

pytestmark = pytest.mark.netns

XLAT = [sys.executable, "-m", "xlat.cli"]


@dataclass
class Gateway:
    """A running ``xlat run`` and a CLI pointed at it."""

    lab: Lab
    control: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [*XLAT, "--control", str(self.control), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"xlat {' '.join(args)}: {r.stderr}\n{self.log.read_text()}")
        return r

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "-j").stdout)

    def add(self, a: str, b: str, *extra: str) -> tuple[Endpoint, Endpoint, str]:
        s = self.json("session", "add", "--peer-a", a, "--peer-b", b, *extra)
        assert isinstance(s, dict)
        return Endpoint.parse(s["legs"][0]["relay"]), Endpoint.parse(s["legs"][1]["relay"]), s["id"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def launch(lab: Lab, argv: list[str], control: Path, log: Path, *, timeout: float = 60,
           env: dict[str, str] | None = None) -> Gateway:
    """Start ``argv`` (an ``xlat run``) in the gateway namespace, output to ``log``, and
    wait until its control socket is there."""
    proc = lab.exec(lab.gw, argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                    env=None if env is None else {**os.environ, **env})
    gw = Gateway(lab, control, proc, log)
    deadline = time.monotonic() + timeout
    while not control.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            gw.stop()
            raise AssertionError(f"daemon did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return gw


def start_gateway(lab: Lab, tmp: Path, *extra: str, name: str = "xlat",
                  env: dict[str, str] | None = None) -> Gateway:
    """``xlat run`` on the lab's media addresses and bpffs, with this test's own crash
    journal and no SIP unless ``extra`` has --sip-listen."""
    control = tmp / f"{name}.sock"
    sip = () if "--sip-listen" in extra else ("--sip-listen", "none")
    argv = [*XLAT, "--control", str(control), "run", "--media-v4", str(GW4),
            "--media-v6", str(GW6), "--bpffs", str(lab.bpffs),
            "--state-dir", str(tmp / "state"),  # the crash journal: not /var/lib/xlat
            *sip, "--ports", "30000-30099", "--log-level", "debug", *extra]
    return launch(lab, argv, control, tmp / f"{name}.log", env=env)


@pytest.fixture(params=["ebpf", "userspace"])
def gateway(request: pytest.FixtureRequest, lab: Lab, tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(lab, tmp_path, "--datapath", request.param)
    try:
        yield gw
    finally:
        gw.stop()


def udp(ns: str, bind: Endpoint) -> socket.socket:
    """A UDP socket bound in a lab namespace."""
    with in_netns(ns):
        s = socket.socket(
            socket.AF_INET6 if bind.family == 6 else socket.AF_INET, socket.SOCK_DGRAM
        )
    s.bind((str(bind.host), bind.port))
    s.settimeout(2.0)
    return s


def recv_from(s: socket.socket) -> tuple[bytes, Endpoint]:
    data, addr = s.recvfrom(4096)
    return data, Endpoint.parse(
        f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
    )


def silent(s: socket.socket, wait: float = 0.5) -> bool:
    s.settimeout(wait)
    try:
        s.recvfrom(4096)
    except TimeoutError:
        return True
    return False


A = Endpoint.parse(f"[{V6_HOST}]:40000")
B = Endpoint.parse(f"{V4_HOST}:50000")


def test_manual_relay_crosses_families_both_ways(gateway: Gateway) -> None:
    relay_a, relay_b, sid = gateway.add(str(A), str(B))
    assert relay_a.family == 6 and relay_b.family == 4
    for rtcp in (0, 1):
        a = udp(gateway.lab.v6, Endpoint(A.host, A.port + rtcp))
        b = udp(gateway.lab.v4, Endpoint(B.host, B.port + rtcp))
        with a, b:
            a.sendto(b"rtp from a %d" % rtcp, (str(relay_a.host), relay_a.port + rtcp))
            assert recv_from(b) == (
                b"rtp from a %d" % rtcp,
                Endpoint(relay_b.host, relay_b.port + rtcp),
            )
            b.sendto(b"answer from b", (str(relay_b.host), relay_b.port + rtcp))
            assert recv_from(a) == (b"answer from b", Endpoint(relay_a.host, relay_a.port + rtcp))
    flows = gateway.json("flow", "list")
    assert isinstance(flows, list) and len(flows) == 4
    assert {f["session"] for f in flows} == {sid}
    assert all(f["packets"] == 1 for f in flows), flows
    by_match = {f["match"]: f for f in flows}
    assert by_match[str(relay_a)]["to"] == str(B) and by_match[str(relay_b)]["to"] == str(A)
    (listed,) = gateway.json("session", "list")  # type: ignore[misc]
    assert listed["id"] == sid and listed["state"] == "active" and listed["packets"] == 4


def test_session_del_stops_forwarding_at_once(gateway: Gateway) -> None:
    relay_a, _, sid = gateway.add(str(A), str(B))
    with udp(gateway.lab.v6, A) as a, udp(gateway.lab.v4, B) as b:
        a.sendto(b"1", (str(relay_a.host), relay_a.port))
        assert recv_from(b)[0] == b"1"
        gateway.cli("session", "del", sid)
        a.sendto(b"2", (str(relay_a.host), relay_a.port))
        assert silent(b)
        a.sendto(b"3", (str(relay_a.host), relay_a.port))  # the guard has caught up by now
        assert silent(b)
    assert gateway.json("session", "list") == []
    drops = gateway.json("stats")["drops"]  # type: ignore[index]
    assert drops["unallocated"]["packets"] >= 1  # the nft guard dropped and counted it


def test_idle_timeout_frees_flows_set_elements_and_ports(gateway: Gateway) -> None:
    relay_a, _, _ = gateway.add(str(A), str(B), "--timeout", "2")
    with udp(gateway.lab.v6, A) as a, udp(gateway.lab.v4, B) as b:
        a.sendto(b"x", (str(relay_a.host), relay_a.port))
        assert recv_from(b)[0] == b"x"
        # only sockets need their ports admitted: with eBPF alone the range stays closed
        sockets = "userspace" in gateway.json("stats")["datapath"]  # type: ignore[index]
        admitted = [(str(GW6), relay_a.port), (str(GW6), relay_a.port + 1)] if sockets else []
        # the nft guard is updated in batches (datapath.GUARD_DELAY): wait for the batch
        deadline = time.monotonic() + 2
        while nft_elements(gateway.lab, "relay6") != admitted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert nft_elements(gateway.lab, "relay6") == admitted
        deadline = time.monotonic() + 5
        while gateway.json("session", "list") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert time.monotonic() < deadline, "session did not expire within 3 s of its timeout"
        assert gateway.json("flow", "list") == []
        assert nft_elements(gateway.lab, "relay6") == []
        stats = gateway.json("stats")
        assert isinstance(stats, dict)
        assert stats["ports"]["ipv4"]["in_use"] == 0 and stats["ports"]["ipv6"]["in_use"] == 0
        a.sendto(b"late", (str(relay_a.host), relay_a.port))
        assert silent(b)


def nft_elements(lab: Lab, set_name: str) -> list[tuple[str, int]]:
    out = subprocess.run(
        ["ip", "netns", "exec", lab.gw, "nft", "-j", "list", "set", "inet", "xlat", set_name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    elems: list[tuple[str, int]] = []
    for item in json.loads(out)["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
            addr, port = val["concat"]
            elems.append((addr, port))
    return sorted(elems)


def test_media_survives_sigkill_until_idle_timeout(lab: Lab, tmp_path: Path) -> None:
    gw = start_gateway(lab, tmp_path, "--datapath", "ebpf")
    try:
        relay_a, _, _ = gw.add(str(A), str(B), "--timeout", "2")
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait()
        with udp(lab.v6, A) as a, udp(lab.v4, B) as b:
            for i in range(5):  # the kernel keeps relaying with no daemon at all
                a.sendto(b"%d" % i, (str(relay_a.host), relay_a.port))
                assert recv_from(b)[0] == b"%d" % i
                time.sleep(0.3)
            time.sleep(2.5)  # quiet for longer than the idle timeout
            a.sendto(b"after", (str(relay_a.host), relay_a.port))
            assert silent(b)
        # a new daemon starts over the leftovers (pinned maps, filters, table)
        gw2 = start_gateway(lab, tmp_path, "--datapath", "ebpf", name="second")
        gw2.stop()
        assert gw2.proc.returncode == 0, gw2.log.read_text()
    finally:
        gw.stop()


def test_ten_thousand_packets_counted_in_the_kernel_only(lab: Lab, tmp_path: Path) -> None:
    # with the fallback relay bound too: it must see none of what the kernel relays
    gw = start_gateway(lab, tmp_path, "--datapath", "ebpf", "--fallback-relay",
                       "--rate-limit", "0")
    try:
        relay_a, _, _ = gw.add(str(A), str(B))
        with udp(lab.v6, A) as a, udp(lab.v4, B) as b:
            b.settimeout(5)
            got = 0
            for i in range(10_000):
                a.sendto(b"p", (str(relay_a.host), relay_a.port))
                if i % 64 == 63:  # stay under the sink's queue
                    while got < i - 256:
                        b.recvfrom(64)
                        got += 1
        stats = gw.json("stats")
        assert isinstance(stats, dict)
        forwarded = stats["forwarded"]
        assert forwarded["ebpf"]["packets"] == 10_000
        assert forwarded["userspace"]["packets"] == 0
    finally:
        gw.stop()


def test_second_daemon_on_same_interfaces_refuses(lab: Lab, tmp_path: Path) -> None:
    gw = start_gateway(lab, tmp_path)
    try:
        second = lab.exec(
            lab.gw,
            [
                *XLAT,
                "--control",
                str(tmp_path / "other.sock"),
                "run",
                "--media-v4",
                str(GW4),
                "--bpffs",
                str(lab.bpffs),
                "--sip-listen",
                "none",
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        _, err = second.communicate(timeout=30)
        assert second.returncode == 3
        assert b"already served by a running xlat" in err
        again = subprocess.run(
            [*XLAT, "--control", str(gw.control), "run", "--media-v4", str(GW4)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert again.returncode == 3 and "another xlat is running" in again.stderr
    finally:
        gw.stop()
    netns = os.stat(f"/run/netns/{lab.gw}").st_ino
    assert not list(LOCK_DIR.glob(f"net{netns}-*.lock"))  # a clean stop leaves no lock file
