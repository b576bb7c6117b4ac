"""A real SIPp call through ``xlat run`` across ``kill -9`` of the daemon and a restart.

The call's RTP keeps flowing while no daemon runs (the kernel path needs none); the new
daemon adopts the call from its journal; the BYE after the restart ends the session and
frees its ports. A registration made before the crash still routes a call after it.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import AUTH, DELETE_DELAY, DOMAIN, NAT64_PREFIX, Nat64, write_users

from xlat.addr import Endpoint, parse_ip
from xlat.demo import (
    GW_SIP,
    CallRecord,
    Gateway,
    Phone,
    Sipp,
    addresses_in,
    place_call,
    start_gateway,
    wait_gone,
)
from xlat.lab import GW4, Lab

pytestmark = pytest.mark.e2e

CALL_MS = 6000  # the callee hangs up after this much media
KILL_AT = 2.0  # seconds into the call


@pytest.fixture
def gateway(lab: Lab, tmp_path: Path) -> Iterator[Gateway]:
    """Defaults, but for a short delete delay and a state directory of this test's own."""
    gw = start_gateway(lab, *options(tmp_path), directory=tmp_path / "gw")
    try:
        yield gw
    finally:
        gw.stop()  # whichever daemon runs on its paths now


def options(tmp_path: Path) -> list[str]:
    config = tmp_path / "xlat.toml"  # as conftest's gateway: told our NAT64's prefix
    config.write_text(f'nat64-prefix = ["{NAT64_PREFIX}"]\n')
    users = tmp_path / "users.toml"  # as conftest's gateway: its registrar's users
    write_users(users)
    return ["-c", str(config), "--users", str(users), "--domain", DOMAIN,
            "--delete-delay", f"{DELETE_DELAY:g}", "--state-dir", str(tmp_path / "state"),
            "--log-level", "debug"]


def crash_and_restart(gw: Gateway, tmp_path: Path) -> None:
    """``kill -9`` the daemon, start the next one on the same control socket and state
    directory (``gw`` names both: it talks to the new daemon from then on)."""
    pid = gw.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    gw.stop()  # reaps it
    gw.control.unlink()  # left by the dead daemon; the next one creates its own once ready
    (gw.dir / "xlat.log").rename(gw.dir / "xlat-killed.log")
    start_gateway(gw.lab, *options(tmp_path), directory=gw.dir)


def rtp_packets(flows: dict[str, dict[str, Any]]) -> list[int]:
    return [f["packets"] for f in flows.values() if Endpoint.parse(f["match"]).port % 2 == 0]


def test_call_across_kill_9_and_restart_ends_with_its_bye(
        gateway: Gateway, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    call_across_a_crash(gateway, alice6, bob4, tmp_path)


def test_callee_bye_after_restart_reaches_a_caller_behind_nat64(
        gateway: Gateway, nat64: Nat64, bob4: Phone, tmp_path: Path) -> None:
    """carol (IPv6 only, behind tayga) did not register: the callee's BYE reaches her only
    through the NAT64 flow her INVITE came over, which the journal kept."""
    gw_via_nat64 = Endpoint(parse_ip(str(nat64.prefix[int(GW4)])), GW_SIP[4].port)
    call_across_a_crash(gateway, nat64.phone, bob4, tmp_path, remote=gw_via_nat64)
    assert "1 NAT64 flow(s) from the journal" in gateway.log.read_text()


def test_reinvites_after_restart_hold_and_resume_the_adopted_call(
        gateway: Gateway, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    """The caller's hold and resume re-INVITEs come after the restart: they find the call
    and keep its relay ports; its BYE ends it."""
    record = call_across_a_crash(gateway, alice6, bob4, tmp_path,
                                 scenarios=("uac_hold.xml", "uas_hold.xml"))
    sdp_at_callee = [m.body for m in record.uas.received() if m.method == "INVITE" and m.body]
    assert len(sdp_at_callee) == 3 and "a=sendonly" in sdp_at_callee[1]
    assert len({addresses_in(b)[0] for b in sdp_at_callee}) == 1  # the same relay
    assert len({re.findall(r"m=audio (\d+)", b)[0] for b in sdp_at_callee}) == 1


def call_across_a_crash(gateway: Gateway, caller: Phone, callee: Phone, tmp_path: Path,
                        remote: Endpoint | None = None,
                        scenarios: tuple[str, str] = ("uac_callee_bye.xml", "uas_bye.xml"),
                        ) -> CallRecord:
    """A call with CALL_MS of media before its end (by default the callee hangs up); the
    daemon is killed KILL_AT seconds into the call and restarted."""
    at_kill: dict[str, list[int]] = {}

    def on_sample(elapsed: float, flows: list[dict[str, Any]]) -> None:
        if elapsed >= KILL_AT and not at_kill:
            at_kill["rtp"] = rtp_packets({f["match"]: f for f in flows})
            crash_and_restart(gateway, tmp_path)

    record = place_call(gateway, caller, callee, callee.uri, tmp_path / "call",
                        uac=scenarios[0], uas=scenarios[1], pause_ms=CALL_MS,
                        timeout=CALL_MS / 1000 + 15, on_sample=on_sample, remote=remote)

    assert at_kill, "the call ended before the daemon was killed"
    assert record.ok, record.explain()  # the BYE after the restart got its 200
    log = gateway.log.read_text()
    assert "adopted 1 session(s) from the journal" in log, log
    assert "4 flow(s) adopted as they are, 0 installed, 0 stale removed" in log, log
    # RTP both ways for the whole call (50 packets/s per direction), counted on from
    # before the crash: not one flow was reinstalled
    after = rtp_packets(record.flows)
    assert len(after) == 2 and all(a > k > 0 for a, k in zip(after, at_kill["rtp"],
                                                              strict=True)), (at_kill, after)
    assert min(after) >= 0.9 * 50 * CALL_MS / 1000, after
    # the BYE ended the session (delete delay) and freed its ports
    assert {s["state"] for s in record.sessions} == {"deleting"}, record.sessions
    assert wait_gone(gateway, record.call_id, DELETE_DELAY + 4) is not None
    assert gateway.flows([s["id"] for s in record.sessions]) == []
    ports = gateway.json("stats")["ports"]
    assert ports["ipv4"]["in_use"] == 0 and ports["ipv6"]["in_use"] == 0
    return record


def test_registration_survives_kill_9(gateway: Gateway, lab: Lab, alice6: Phone,
                                      bob4: Phone, tmp_path: Path) -> None:
    registrant = replace(bob4, user="reg4")
    register = Sipp(lab, registrant, "register.xml", tmp_path, "register",
                    remote=GW_SIP[4], keys={"domain": DOMAIN}, timeout=10, options=AUTH)
    assert register.wait() == 0, register.explain()
    crash_and_restart(gateway, tmp_path)
    assert "restored 1 registration(s)" in gateway.log.read_text()

    record = place_call(gateway, alice6, registrant, f"sip:reg4@{DOMAIN}", tmp_path / "call",
                        uac="uac_auth.xml", uac_options=AUTH)

    assert record.ok, record.explain()
    invite = record.uas.received("INVITE")[0]
    assert str(registrant.host) in invite.start.split()[1]  # routed to its registered Contact
