"""``systemctl reload xlat`` (SIGHUP): the configuration file read again, its routes,
trusted sources and SIP rate limit applied — in table inet xlat too — while a live call
keeps relaying in the kernel; a file that does not load changes nothing."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from test_daemon import A, B, Gateway, recv_from, start_gateway, udp

from xlat.lab import GW4, Lab

pytestmark = pytest.mark.netns


def nft_set(gw: Gateway, name: str) -> list[str]:
    out = json.loads(gw.lab.run(gw.lab.gw, ["nft", "-j", "list", "set", "inet", "xlat", name]))
    (body,) = [o["set"] for o in out["nftables"] if "set" in o]
    return [e["prefix"]["addr"] + "/" + str(e["prefix"]["len"]) if isinstance(e, dict)
            else e for e in body.get("elem", [])]


def sip_rate(gw: Gateway) -> int:
    out = gw.lab.run(gw.lab.gw, ["nft", "list", "chain", "inet", "xlat", "input"])
    (line,) = [x for x in out.splitlines() if "ip saddr != @trusted4 update @sip4" in x]
    return int(line.split("limit rate over ")[1].split("/")[0])


def reload(gw: Gateway, mark: str) -> list[str]:
    """SIGHUP, then the log lines from ``mark`` on, once the reload has finished."""
    start = len(gw.lines())
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        new = gw.lines()[start:]
        if any(mark in line for line in new):
            return new
        time.sleep(0.05)
    raise AssertionError(f"no {mark!r} after SIGHUP:\n{gw.log.read_text()}")


def test_sighup_applies_routes_trusted_and_rate_and_keeps_the_call(lab: Lab,
                                                                    tmp_path: Path) -> None:
    conf = tmp_path / "xlat.toml"
    conf.write_text('sip-rate = 200\ntrusted = []\n')
    gw = start_gateway(lab, tmp_path, "-c", str(conf), "--sip-listen", f"{GW4}:5060")
    try:
        assert nft_set(gw, "trusted4") == [] and sip_rate(gw) == 200
        relay_a, _, sid = gw.add(str(A), str(B))
        with udp(lab.v6, A) as a, udp(lab.v4, B) as b:
            a.sendto(b"before", (str(relay_a.host), relay_a.port))
            assert recv_from(b)[0] == b"before"

            conf.write_text('sip-rate = 300\ntrusted = ["198.51.100.0/24"]\n'
                            'route = ["*=sip:192.0.2.50:5060"]\nng-listen = "127.0.0.1:2299"\n')
            lines = reload(gw, "reloaded:")
            assert any("reloaded: routes, sip_rate, trusted" in x for x in lines), lines
            assert any("ng_listen changed; that takes a restart" in x for x in lines), lines
            # the new route target is exempt too
            assert sorted(nft_set(gw, "trusted4")) == ["192.0.2.50", "198.51.100.0/24"]
            assert sip_rate(gw) == 300

            a.sendto(b"after", (str(relay_a.host), relay_a.port))  # same flow, kernel path
            assert recv_from(b)[0] == b"after"
            (flow,) = [f for f in gw.json("flow", "list")  # type: ignore[union-attr]
                       if f["match"] == str(relay_a)]
            assert flow["packets"] == 2 and flow["session"] == sid

            conf.write_text('sip-rate = "fast"\n')  # does not load: nothing changes
            lines = reload(gw, "reload failed")
            assert any("running configuration kept" in x and "sip-rate" in x for x in lines)
            assert sip_rate(gw) == 300
    finally:
        gw.stop()
