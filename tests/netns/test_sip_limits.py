"""The per-source SIP rate limit against real SIPp traffic: a trunk that is a route
target places 500 calls/s through ``xlat run`` and none of its packets is dropped; an
unknown source at the same rate is cut to the default budget."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest
from test_start import start

from xlat.lab import GW4, GW6, V4_HOST, V4_HOST2, V6_HOST, Lab

pytestmark = pytest.mark.netns

SCENARIOS = Path(__file__).resolve().parents[2] / "bench" / "sip"  # the bench's UAC/UAS
UAS_PORT = 5080
RATE = 500  # calls/s
SECONDS = 2


def sipp_calls(lab: Lab, tmp: Path, source: str, timeout: int) -> dict[str, int]:
    """RATE calls/s for SECONDS from ``source`` (in the v4 host) to xlat's IPv4 SIP
    address; SIPp's final counts."""
    stats = tmp / f"uac-{source}.csv"
    argv = ["sipp", f"{GW4}:5060", "-sf", str(SCENARIOS / "uac.xml"), "-i", source,
            "-p", "5070", "-mi", source, "-mp", "6000", "-r", str(RATE),
            "-m", str(RATE * SECONDS), "-l", "100000", "-nostdin", "-recv_timeout", "4000",
            "-timeout", f"{timeout}s", "-trace_stat", "-stf", str(stats)]
    lab.exec(lab.v4, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
             stderr=subprocess.DEVNULL).wait(timeout=timeout + 30)
    with stats.open(newline="") as f:
        last = list(csv.DictReader(f, delimiter=";"))[-1]
    return {"ok": int(last["SuccessfulCall(C)"]), "failed": int(last["FailedCall(C)"])}


def test_a_trunk_at_500_calls_per_second_is_not_limited_a_stranger_is(
    lab: Lab, tmp_path: Path
) -> None:
    if shutil.which("sipp") is None:
        pytest.skip("needs sipp (apt-get install sip-tester)")
    uas = lab.exec(lab.v6, ["sipp", "-sf", str(SCENARIOS / "uas.xml"), "-i", str(V6_HOST),
                            "-p", str(UAS_PORT), "-mi", str(V6_HOST), "-mp", "7000",
                            "-nostdin", "-l", "100000"],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    # the trunk is a route target (calls for trunk.test go to it); a PBX on the IPv6
    # side takes everything else; default sip_rate (200 packets/s per source)
    gw = start(lab, tmp_path, "--sip-listen", f"{GW4}:5060", "--sip-listen", f"[{GW6}]:5060",
               "--ports", "20000-29999",
               "--route", f"trunk.test=sip:{V4_HOST}:5070",
               "--route", f"*=sip:[{V6_HOST}]:{UAS_PORT}", "--delete-delay", "0",
               "--log-level", "info")
    try:
        assert f"exempt: {V4_HOST}/32, {V6_HOST}/128" in gw.log.read_text()
        trunk = sipp_calls(lab, tmp_path, str(V4_HOST), timeout=SECONDS + 20)
        limited = gw.json("stats")["drops"]["sip_rate_limited"]["packets"]  # type: ignore
        print(f"\ntrunk {V4_HOST}: {trunk}, sip_rate_limited {limited}")
        assert limited == 0
        assert trunk == {"ok": RATE * SECONDS, "failed": 0}
        stranger = sipp_calls(lab, tmp_path, str(V4_HOST2), timeout=SECONDS + 6)
        limited = gw.json("stats")["drops"]["sip_rate_limited"]["packets"]  # type: ignore
        print(f"stranger {V4_HOST2}: {stranger}, sip_rate_limited {limited}")
        assert limited > RATE  # more than a second's worth of its calls cut
        assert stranger["ok"] < RATE * SECONDS
    finally:
        gw.stop()
        uas.terminate()
        uas.wait(timeout=10)
