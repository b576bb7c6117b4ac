"""A real attacker's tools against ``xlat run`` in the namespace lab, while legitimate
SIPp calls go on: SIPVicious (Debian ``sipvicious``) ``svmap`` finds the gateway,
``svwar`` tries to enumerate extensions with REGISTER, OPTIONS and INVITE, ``svcrack``
guesses a registered user's password. The gateway runs as ``make demo``'s does plus
``--users`` (conftest.py). Bounded: a fixed dictionary, a fixed password range, and
at most MAX_CALLS legitimate calls.

What must hold: every legitimate call completes (>= 99 %), the daemon's RSS grows by
less than 20 MB and is back within a few MB after the scan, svwar's result does not
tell a real extension from an invented one, svcrack finds no password, and nothing
the scanners sent bound a contact.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import AUTH, DOMAIN, USERS

from xlat.demo import GW_SIP, Gateway, Phone, Sipp, place_call
from xlat.lab import V4_HOST2, V6_HOST2, Lab
from xlat.sip.uri import format_host

MIN_CALLS, MAX_CALLS = 20, 40  # legitimate calls during the scans
REAL = [u for u in USERS if u != "multi"]  # extensions that exist (reg4 is registered)
FAKE = [f"{n}" for n in range(100, 140)] + ["admin", "nobody", "test"]


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def scan(lab: Lab, ns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return lab.exec(ns, argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def found_extensions(output: str) -> set[str]:
    """The extensions in svwar's result table (``| 101 | reqauth |``)."""
    names = set(REAL) | set(FAKE)
    return {cell for line in output.splitlines() if line.startswith("|")
            for cell in (c.strip() for c in line.strip("|").split("|")) if cell in names}


@pytest.mark.skipif(shutil.which("svwar") is None, reason="sipvicious not installed")
def test_sipvicious_learns_nothing_while_calls_go_on(gateway: Gateway, lab: Lab, alice6: Phone,
                                                     bob4: Phone, tmp_path: Path) -> None:
    pid = gateway.pid()
    assert pid is not None
    registrant = replace(bob4, user="reg4", port=5070, media_port=6100)
    register = Sipp(lab, registrant, "register.xml", tmp_path, "register", remote=GW_SIP[4],
                    keys={"domain": DOMAIN}, timeout=10, options=AUTH)
    assert register.wait() == 0, register.explain()
    place_call(gateway, alice6, bob4, bob4.uri, tmp_path, name="warmup")  # warm caches
    rss_before = rss_kib(pid)

    dictionary = tmp_path / "extensions.txt"
    dictionary.write_text("\n".join(REAL + FAKE) + "\n")
    gw4, gw6 = str(GW_SIP[4].host), str(GW_SIP[6].host)
    v4 = ["-x", str(V4_HOST2)]  # what the scanner writes in its Via and Contact
    v6 = ["-6", "-x", f"[{V6_HOST2}]"]  # bracketed, so its Via parses (RFC 5118)
    war = ["--force", "-d", str(dictionary), "-m"]
    scanners = {
        "svmap4": (lab.v4, ["svmap", *v4, f"{gw4}/32"]),
        "svmap6": (lab.v6, ["svmap", *v6, gw6]),
        "svwar-register": (lab.v4, ["svwar", *v4, *war, "REGISTER", gw4]),
        "svwar-options": (lab.v4, ["svwar", *v4, *war, "OPTIONS", gw4]),
        "svwar-invite6": (lab.v6, ["svwar", *v6, *war, "INVITE", gw6]),
        "svwar-register6": (lab.v6, ["svwar", *v6, *war, "REGISTER", gw6]),
        "svcrack": (lab.v4, ["svcrack", *v4, "-u", "reg4", "-r", "100000-100300", gw4]),
    }
    # each from its own address and port: the phones' SIPp bind port 5060 here too
    procs = {name: scan(lab, ns, [argv[0], "-P", str(15060 + i), "-b",
                                  str(V6_HOST2 if ns == lab.v6 else V4_HOST2), *argv[1:]],
                        tmp_path / f"{name}.out")
             for i, (name, (ns, argv)) in enumerate(scanners.items())}
    calls, peak = [], rss_before
    started = time.monotonic()
    try:
        while len(calls) < MAX_CALLS and (any(p.poll() is None for p in procs.values())
                                          or len(calls) < MIN_CALLS):
            calls.append(place_call(gateway, alice6, bob4, bob4.uri, tmp_path,
                                    name=f"call{len(calls)}", pause_ms=300))
            peak = max(peak, rss_kib(pid))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
            p.wait(timeout=10)
    scan_seconds = time.monotonic() - started
    outputs = {name: (tmp_path / f"{name}.out").read_text(errors="replace") for name in procs}

    completed = sum(c.ok for c in calls)
    print(f"\nscan {scan_seconds:.0f} s: {completed}/{len(calls)} legitimate calls completed; "
          f"RSS {rss_before} kB before, peak {peak} kB")
    assert completed >= 0.99 * len(calls), next(c.explain() for c in calls if not c.ok)
    # svwar: whatever it reports, it reports for invented names alike
    for name in ("svwar-register", "svwar-options", "svwar-invite6", "svwar-register6"):
        found = found_extensions(outputs[name])
        assert found in (set(), set(REAL) | set(FAKE)), f"{name} told them apart:\n" \
            f"{outputs[name]}"
    assert "reg4" not in re.sub(r"(?m)^.*svcrack.*-u reg4.*$", "", outputs["svcrack"]) \
        or "could not" in outputs["svcrack"].lower(), outputs["svcrack"]
    # nothing the scanners sent took over an extension
    time.sleep(1.0)
    record = place_call(gateway, bob4, registrant, f"sip:reg4@{DOMAIN}", tmp_path,
                        name="after", uac="uac_auth.xml", uac_options=AUTH)
    assert record.ok, record.explain()
    invite = record.uas.received("INVITE")[0]
    assert format_host(registrant.host) in invite.start  # still the real phone's contact

    time.sleep(5.0)  # the scanners' transactions time out (Timer J/H: 32 s at most)
    rss_after = rss_kib(pid)
    print(f"RSS {rss_after} kB after the scan")
    assert peak - rss_before < 20 * 1024
    assert rss_after - rss_before < 8 * 1024
    assert os.path.exists(f"/proc/{pid}")  # still the same daemon


JUNK_SECONDS = 10.0


def test_a_sip_junk_flood_does_not_stop_the_calls(gateway: Gateway, lab: Lab, alice6: Phone,
                                                  bob4: Phone, tmp_path: Path) -> None:
    """Garbage at the SIP port as fast as one Python sender goes, for JUNK_SECONDS, from
    another host of the callee's network, while legitimate calls go on."""
    import socket
    import threading

    from xlat.lab import in_netns

    rng = os.urandom
    branch = rng(8).hex().encode()
    junk = [rng(n) for n in (40, 200, 900, 1400)] + [
        b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.3;branch=z9hG4bK" + branch
        + b"\r\n\r\n"]
    sent = [0]
    stop = threading.Event()

    def flood() -> None:
        with in_netns(lab.v4):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((str(V4_HOST2), 0))
        dest = (str(GW_SIP[4].host), GW_SIP[4].port)
        with s:
            while not stop.is_set():
                for packet in junk:
                    try:
                        s.sendto(packet, dest)
                        sent[0] += 1
                    except OSError:
                        pass

    pid = gateway.pid()
    assert pid is not None
    rss_before = rss_kib(pid)
    sender = threading.Thread(target=flood, daemon=True)
    started = time.monotonic()
    sender.start()
    calls = []
    try:
        while time.monotonic() - started < JUNK_SECONDS:
            calls.append(place_call(gateway, alice6, bob4, bob4.uri, tmp_path,
                                    name=f"junk{len(calls)}", pause_ms=300))
    finally:
        stop.set()
        sender.join(timeout=5)
    elapsed = time.monotonic() - started
    completed = sum(c.ok for c in calls)
    drops = gateway.json("stats")["drops"]
    print(f"\njunk flood: {sent[0]} datagrams in {elapsed:.1f} s ({sent[0] / elapsed:,.0f}/s), "
          f"{completed}/{len(calls)} calls completed, RSS {rss_before} -> {rss_kib(pid)} kB, "
          f"nft sip_rate_limited drops {drops['sip_rate_limited']['packets']}")
    assert completed >= 0.99 * len(calls), next(c.explain() for c in calls if not c.ok)
    assert rss_kib(pid) - rss_before < 20 * 1024
    assert gateway.pid() == pid and gateway.json("stats")["sessions"] >= 0  # still serving
