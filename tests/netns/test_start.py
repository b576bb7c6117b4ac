"""``xlat run`` as a new user starts it: under ``ip netns exec`` with no bpffs mounted,
and failing closed — one line, exit 3, nothing changed in the kernel — whenever the
kernel path cannot come up; ``--datapath auto`` is the only way to the Python relay."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_daemon import XLAT, Gateway, launch, recv_from, udp

from xlat.addr import Endpoint
from xlat.lab import GW4, GW6, V4_HOST, V6_HOST, Lab

pytestmark = pytest.mark.netns

A = Endpoint.parse(f"[{V6_HOST}]:40000")
B = Endpoint.parse(f"{V4_HOST}:50000")
IP_RECVTTL, IP_TTL = 12, 2  # linux/in.h (Python's socket module lacks IP_RECVTTL)
SETPRIV_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
SETPRIV_NO_BPF = ("setpriv", "--inh-caps=-all", "--bounding-set=-bpf,-perfmon,-sys_admin")


def argv(control: Path, *extra: str, prefix: Sequence[str] = ()) -> list[str]:
    """``xlat run`` with the lab's media addresses and nothing else pinned down: no
    --bpffs (the default /sys/fs/bpf/xlat), no --interface unless ``extra`` has one, no
    SIP unless ``extra`` has --sip-listen."""
    sip = () if "--sip-listen" in extra else ("--sip-listen", "none")
    return [*prefix, *XLAT, "--control", str(control), "run", "--media-v4", str(GW4),
            "--media-v6", str(GW6), *sip, "--ports", "30000-30099",
            "--state-dir", str(control.parent / "state"), *extra]


def start(lab: Lab, tmp: Path, *extra: str, name: str = "xlat") -> Gateway:
    control = tmp / f"{name}.sock"
    return launch(lab, argv(control, *extra), control, tmp / f"{name}.log")


def refused(lab: Lab, tmp: Path, *extra: str, prefix: Sequence[str] = ()) -> tuple[int, str]:
    """Run a start that must fail; (exit status, stderr)."""
    proc = lab.exec(lab.gw, argv(tmp / "refused.sock", "--log-level", "warning", *extra,
                                 prefix=prefix),
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def our_filters(lab: Lab, ifname: str) -> str:
    out = lab.run(lab.gw, ["tc", "filter", "show", "dev", ifname, "ingress"])
    return "\n".join(line for line in out.splitlines() if " xlat " in f"{line} ")


def nft_tables(lab: Lab) -> list[dict]:
    out = json.loads(lab.run(lab.gw, ["nft", "-j", "list", "tables"]))["nftables"]
    return [o["table"] for o in out if "table" in o]


def ttl_received(sock: socket.socket) -> tuple[bytes, int]:
    """One datagram and the TTL it arrived with (IP_RECVTTL)."""
    data, ancdata, _, _ = sock.recvmsg(2048, socket.CMSG_SPACE(4))
    (level, kind, value), = ancdata
    assert (level, kind) == (socket.IPPROTO_IP, IP_TTL)
    return data, int.from_bytes(value[:4], "little")


def test_ip_netns_exec_with_no_bpffs_relays_in_the_kernel(lab: Lab, tmp_path: Path) -> None:
    # `ip netns exec` gives xlat a fresh /sys, with nothing mounted at /sys/fs/bpf
    assert "bpf" not in lab.run(lab.gw, ["stat", "-f", "-c", "%T", "/sys/fs/bpf"])
    gw = start(lab, tmp_path)
    try:
        log = gw.log.read_text()
        assert "mounted a bpf filesystem at /sys/fs/bpf (/sys/fs/bpf/xlat was on none)" in log
        assert "media relayed by ebpf" in log
        stats = gw.json("stats")
        assert isinstance(stats, dict) and stats["datapath"] == "ebpf"
        for ifname in ("gw6", "gw4"):
            assert "direct-action" in our_filters(lab, ifname)
        relay_a, _, _ = gw.add(str(A), str(B))
        with udp(lab.v6, A) as a, udp(lab.v4, B) as b:
            a.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 64)
            b.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
            a.sendto(b"rtp", (str(relay_a.host), relay_a.port))
            assert ttl_received(b) == (b"rtp", 63)  # hop limit 64, minus our hop
        forwarded = gw.json("stats")["forwarded"]  # type: ignore[index]
        assert forwarded["ebpf"]["packets"] == 1
    finally:
        gw.stop()
    assert gw.proc.returncode == 0, gw.log.read_text()
    assert our_filters(lab, "gw6") == "" and nft_tables(lab) == []


@pytest.fixture
def down_interface(lab: Lab) -> str:
    """A veth pair in the gateway, left down (removed with the lab)."""
    lab.run(lab.gw, ["ip", "link", "add", "xdown0", "type", "veth", "peer", "name", "xdown1"])
    return "xdown0"


def pin_foreign_map(lab: Lab) -> Path:
    """A `flows` map of another layout pinned where xlat pins its own; its directory."""
    pin_dir = lab.bpffs / "xlat"
    pin_dir.mkdir()
    create = f"bpftool map create {pin_dir / 'flows'} type hash key 20 value 64 entries 16"
    subprocess.run([*create.split(), "name", "flows"], check=True)
    return pin_dir


@pytest.fixture
def foreign_pin(lab: Lab) -> Path:
    return pin_foreign_map(lab)


CASES = {
    "typo in --interface": (
        ("--interface", "gw6", "--interface", "gw44"), (),
        "eBPF datapath: no interface 'gw44' in this network namespace (there are: gw4, gw6"
        ", xdown0, xdown1); fix: --interface"),
    "interface down": (
        ("--interface", "gw6", "--interface", "xdown0"), (),
        "eBPF datapath: interface xdown0 is down; fix: ip link set xdown0 up, or leave it "
        "out of --interface"),
    "not root": (
        (), SETPRIV_NOBODY,
        "eBPF datapath: not root (uid 65534): lacking CAP_NET_ADMIN, CAP_BPF or "
        "CAP_SYS_ADMIN, CAP_PERFMON or CAP_SYS_ADMIN, CAP_SYS_ADMIN; fix: run xlat as root"),
    "capabilities dropped": (
        (), SETPRIV_NO_BPF,
        "eBPF datapath: root without all capabilities (uid 0): lacking CAP_BPF or "
        "CAP_SYS_ADMIN, CAP_PERFMON or CAP_SYS_ADMIN, CAP_SYS_ADMIN; fix: run xlat as root"),
    "pinned map of another layout": (
        ("--bpffs", "LAB_BPFFS"), (),
        "eBPF datapath: pinned map LAB_BPFFS/flows has {'map_type': '1', 'key_size': "
        "'20', 'value_size': '64'"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_kernel_path_that_cannot_come_up_stops_the_start(
    case: str, lab: Lab, tmp_path: Path, down_interface: str
) -> None:
    extra, prefix, message = CASES[case]
    bpffs = lab.bpffs / "xlat"
    if "LAB_BPFFS" in extra:
        pin_foreign_map(lab)
    extra = tuple(str(bpffs) if a == "LAB_BPFFS" else a for a in extra)
    message = message.replace("LAB_BPFFS", str(bpffs))
    try:
        rc, err = refused(lab, tmp_path, *extra, prefix=prefix)
    finally:
        for pin in bpffs.glob("*"):
            pin.unlink()
    lines = err.strip().splitlines()
    print(f"\n{case}: exit {rc}: {err.strip()}")
    assert rc == 3
    assert len(lines) == 1 and message in lines[0] and "fix" in lines[0], err
    # nothing changed in the kernel: no filter, no table, no new pin
    assert our_filters(lab, "gw6") == "" and our_filters(lab, "gw4") == ""
    assert nft_tables(lab) == []


def test_datapath_auto_falls_back_to_sockets_with_a_warning(
    lab: Lab, tmp_path: Path, foreign_pin: Path
) -> None:
    try:
        gw = start(lab, tmp_path, "--datapath", "auto", "--bpffs", str(foreign_pin))
        try:
            log = gw.log.read_text()
            assert "!!! --datapath auto: the eBPF datapath is unavailable (pinned map" in log
            assert "media relayed by userspace" in log
            stats = gw.json("stats")
            assert isinstance(stats, dict) and stats["datapath"] == "userspace"
            assert our_filters(lab, "gw6") == ""
            relay_a, _, _ = gw.add(str(A), str(B))
            time.sleep(0.1)
            with udp(lab.v6, A) as a, udp(lab.v4, B) as b:
                a.sendto(b"through python", (str(relay_a.host), relay_a.port))
                assert recv_from(b)[0] == b"through python"
            assert gw.json("stats")["forwarded"]["userspace"]["packets"] == 1  # type: ignore
        finally:
            gw.stop()
    finally:
        for pin in foreign_pin.glob("*"):
            pin.unlink()


def test_check_names_missing_privileges_first(lab: Lab) -> None:
    proc = lab.exec(lab.gw, [*SETPRIV_NOBODY, *XLAT, "check"], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    first = out.splitlines()[0]
    assert first.startswith("FAIL privileges: not root (uid 65534): lacking CAP_NET_ADMIN")
    assert proc.returncode == 1 and "missing: privileges" in err
    assert all("fix" in line for line in out.splitlines() if line.startswith("FAIL"))


def test_check_passes_as_root_and_says_what_relays(lab: Lab) -> None:
    out = lab.run(lab.gw, [*XLAT, "check"])
    assert "FAIL" not in out, out
    assert "ok   kernel headers: headers " in out
    assert "ok   bpffs: /sys/fs/bpf/xlat is not on a bpf filesystem: xlat run mounts " \
           "one at /sys/fs/bpf" in out
    assert "ok   datapath: ebpf relays media" in out
