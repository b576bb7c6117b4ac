"""The lab demo behind ``xlat lab up|call|down|demo``, and the helpers the e2e tests share.

``up`` builds the namespace lab (xlat.lab) and starts ``xlat run`` in its gateway
namespace the way a user would (``ip netns exec <gw> xlat run …``), detached, with
its control socket, log and pid file under ``/run/xlat-lab/<tag>/``. ``call`` places
one real call: a SIPp UAS in the IPv4 host (sip:bob@203.0.113.2) and a SIPp UAC in the
IPv6 host calling it through the gateway's IPv6 SIP address, both streaming a PCMU
tone. What each phone saw comes from SIPp's ``-trace_msg`` logs; the kernel counters
come from ``xlat flow list -j``. The SIPp scenarios live in tests/e2e/sipp/.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from xlat.addr import Endpoint, IPAddress
from xlat.lab import GW4, GW6, LAB_RUN_DIR, V4_HOST, V6_HOST, Lab, LabError
from xlat.sip.headers import canonical_name
from xlat.sip.message import SipRequest, SipResponse, parse_message

SIPP_DIR = Path(__file__).resolve().parent.parent / "tests" / "e2e" / "sipp"
SIP_PORT = 5060
GW_SIP = {4: Endpoint(GW4, SIP_PORT), 6: Endpoint(GW6, SIP_PORT)}
TONE = "tone.pcmu"  # the file name the scenarios' rtp_stream actions play
PCMU_RATE = 8000  # samples/s (RFC 3551 §4.5.14)
TONE_AMPLITUDE = 8000  # of 32767: about -12 dBFS
DEMO_DELETE_DELAY = 2.0  # seconds a BYE'd session lingers in the demo (default 10)
START_TIMEOUT = 90.0  # compiling the eBPF program takes a while on a busy machine


class DemoError(RuntimeError):
    """The lab, the daemon or a phone failed; the message says which and why."""


# ---- audio -----------------------------------------------------------------------------


def ulaw(sample: int) -> int:
    """One 16-bit linear sample as a G.711 mu-law byte (ITU-T G.711, bias 0x84)."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = (magnitude >> 7).bit_length() - 1
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | exponent << 4 | mantissa) & 0xFF


def write_tone(path: Path, seconds: float = 1.0, hz: float = 440.0) -> Path:
    """A raw 8 kHz PCMU sine tone, the format SIPp's ``rtp_stream`` plays (payload 0)."""
    samples = (round(TONE_AMPLITUDE * math.sin(2 * math.pi * hz * i / PCMU_RATE))
               for i in range(round(seconds * PCMU_RATE)))
    path.write_bytes(bytes(ulaw(s) for s in samples))
    return path


# ---- the gateway daemon ------------------------------------------------------------------


def xlat_command() -> list[str]:
    """How a user runs xlat: the ``xlat`` script next to this interpreter."""
    script = Path(sys.executable).with_name("xlat")
    return [str(script)] if script.exists() else [sys.executable, "-m", "xlat.cli"]


@dataclass(frozen=True)
class Gateway:
    """An ``xlat run`` in a lab's gateway namespace; its files live in ``dir``."""

    lab: Lab
    dir: Path

    @property
    def control(self) -> Path:
        return self.dir / "control.sock"

    @property
    def log(self) -> Path:
        return self.dir / "xlat.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "xlat.pid"

    def cli(self, *args: str) -> str:
        """Run ``xlat --control <ours> ARGS``; raises DemoError with its stderr."""
        r = subprocess.run([*xlat_command(), "--control", str(self.control), *args],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise DemoError(f"xlat {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def json(self, *args: str) -> Any:
        """``cli(*args, "-j")`` decoded."""
        return json.loads(self.cli(*args, "-j"))

    def sessions(self, call_id: str) -> list[dict[str, Any]]:
        """``session list -j`` entries of one call."""
        return [s for s in self.json("session", "list") if s.get("call_id") == call_id]

    def flows(self, session_ids: Sequence[str]) -> list[dict[str, Any]]:
        """``flow list -j`` entries of the given sessions."""
        return [f for f in self.json("flow", "list") if f["session"] in session_ids]

    def forwarded(self) -> dict[str, int]:
        """Packets forwarded per datapath (``ebpf`` = the kernel), summed over the flows
        that exist now: a flow's count leaves the sum with the flow."""
        return {k: v["packets"] for k, v in self.json("stats")["forwarded"].items()}

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def pid(self) -> int | None:
        """The daemon's pid if the pid file names a live ``xlat run``."""
        try:
            pid = int(self.pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if b"run" in cmdline and any(b"xlat" in a for a in cmdline) else None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. A stopped daemon is fine."""
        pid = self.pid()
        if pid is not None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if _wait_gone(pid, wait):
                    break
        self.pidfile.unlink(missing_ok=True)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit (reaping it if it is our child)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:  # not our child: probe it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def start_gateway(lab: Lab, *options: str, directory: Path | None = None) -> Gateway:
    """Start ``ip netns exec <gw> xlat --control … run --media-v4 … --media-v6 … --bpffs …
    OPTIONS`` detached, and return once its control socket exists (the daemon opens it
    last, when it is ready). Raises DemoError with the log if it does not get there."""
    gw = Gateway(lab, directory or LAB_RUN_DIR / lab.tag)
    gw.dir.mkdir(parents=True, exist_ok=True)
    argv = [*xlat_command(), "--control", str(gw.control), "run",
            "--media-v4", str(GW4), "--media-v6", str(GW6), "--bpffs", str(lab.bpffs),
            "--state-dir", str(gw.dir / "state"),  # the lab's journal goes with the lab
            *options]
    with gw.log.open("wb") as log:
        proc = lab.exec(lab.gw, argv, stdin=subprocess.DEVNULL, stdout=log,
                        stderr=subprocess.STDOUT, start_new_session=True)
    gw.pidfile.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while not gw.control.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            gw.stop()
            raise DemoError(f"xlat run did not start (exit {proc.poll()}):\n{gw.log_tail()}")
        time.sleep(0.1)
    return gw


# ---- SIPp phones and what they saw -----------------------------------------------------------


@dataclass(frozen=True)
class Phone:
    """A SIPp user agent: the namespace it runs in, its address and SIP user."""

    ns: str
    host: IPAddress
    user: str
    port: int = SIP_PORT
    media_port: int = 6000
    tcp: bool = False

    @property
    def family(self) -> int:
        return self.host.version

    @property
    def uri(self) -> str:
        """``sip:user@host`` with the host as a URI writes it."""
        host = f"[{self.host}]" if self.family == 6 else str(self.host)
        return f"sip:{self.user}@{host}"


@dataclass(frozen=True)
class Message:
    """One SIP message as a SIPp phone logged it (``-trace_msg``): sent or received,
    parsed by ``xlat.sip.message`` like any message the proxy reads."""

    sent: bool
    transport: str
    text: str  # as logged, line ends as "\n"
    at: float  # when SIPp logged it (time.time() seconds; SIPp writes local time)

    @functools.cached_property
    def sip(self) -> SipRequest | SipResponse:
        """The message parsed (SIPp sends CRLF line ends; its log has "\n")."""
        return parse_message(self.text.replace("\n", "\r\n").encode())

    @property
    def start(self) -> str:
        return self.text.partition("\n")[0].rstrip()

    @property
    def body(self) -> str:
        return self.sip.body.decode(errors="replace").replace("\r\n", "\n").strip()

    @property
    def is_request(self) -> bool:
        return isinstance(self.sip, SipRequest)

    @property
    def method(self) -> str:
        """The request's method, or the method a response answers (from CSeq)."""
        return self.sip.method if isinstance(self.sip, SipRequest) else self.sip.cseq[1]

    @property
    def status(self) -> int | None:
        return self.sip.status if isinstance(self.sip, SipResponse) else None

    def header_lines(self, *names: str) -> list[str]:
        """The header lines named (full or compact names), in order, unfolded."""
        keys = {canonical_name(n) for n in names}
        return [f"{h.name}: {h.value}" for h in self.sip.headers if h.key in keys]

    def values(self, name: str) -> list[str]:
        """Every value of header ``name``; list headers are split at their commas."""
        return self.sip.get_all(name)


_SEPARATOR = re.compile(r"^-{20,} (\S+ \S+)\n(TCP|UDP) message (sent|received).*\n\n",
                        re.MULTILINE)


def read_trace(path: Path) -> list[Message]:
    """The messages of a SIPp ``-message_file``, in order."""
    text = path.read_text(errors="replace").replace("\r\n", "\n")
    pieces = _SEPARATOR.split(text)  # [before, when, transport, direction, message, …]
    return [
        Message(sent=direction == "sent", transport=transport,
                # up to the next separator; what SIPp adds after the body is cut off
                # at Content-Length by the parser
                text=re.split(r"^-{20,}", message, flags=re.MULTILINE)[0].lstrip("\n"),
                at=datetime.strptime(when, "%Y-%m-%d %H:%M:%S.%f").timestamp())
        for when, transport, direction, message in zip(
            pieces[1::4], pieces[2::4], pieces[3::4], pieces[4::4], strict=True)
    ]


_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.]+)\]")
_BARE_V6_PARAM = re.compile(r"(?:received|maddr)=([0-9A-Fa-f]*:[0-9A-Fa-f:.]+)")
_V4 = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.])")
_SDP_ADDRESS = re.compile(r"IN IP[46] (\S+)")


def addresses_in(text: str) -> list[IPAddress]:
    """IP literals in a header value or SDP line: bracketed IPv6, unbracketed IPv6 in
    ``received=``/``maddr=`` and SDP ``IN IP6``, dotted IPv4."""
    found: list[str] = []
    for pattern in (_BRACKETED, _BARE_V6_PARAM, _SDP_ADDRESS):
        found += pattern.findall(text)
        text = pattern.sub(" ", text)
    found += _V4.findall(text)
    out: list[IPAddress] = []
    for literal in found:
        with contextlib.suppress(ValueError):
            out.append(ipaddress.ip_address(literal))
    return out


def routed_fields(msg: Message) -> list[tuple[str, str]]:
    """(field, text) for what the phone that received ``msg`` must route to or send
    media to: a request's Request-URI, top Via (where responses go), first
    Record-Route entry (the UAS's first route) and Route entries; a response's last
    Record-Route entry (the UAC's first route); Contact (the remote target); the SDP's
    ``c=``, ``o=`` and ``a=rtcp`` lines."""
    fields: list[tuple[str, str]] = []
    rr = msg.values("record-route")
    if msg.is_request:
        fields.append(("Request-URI", msg.start.split()[1]))
        fields += [("Via", v) for v in msg.values("via")[:1]]
        fields += [("Record-Route", r) for r in rr[:1]]
        fields += [("Route", r) for r in msg.values("route")]
    else:
        fields += [("Record-Route", r) for r in rr[-1:]]
    fields += [("Contact", c) for c in msg.values("contact")]
    fields += [("SDP", line) for line in msg.body.splitlines()
               if line.startswith(("c=", "o=", "a=rtcp:"))]
    return fields


def foreign_addresses(messages: Sequence[Message], family: int) -> list[str]:
    """Every routed field (see ``routed_fields``) of a received message that holds an
    address not of ``family``, as ``"<start line> | <field>: <text>"``."""
    return [
        f"{msg.start} | {what}: {text}"
        for msg in messages if not msg.sent
        for what, text in routed_fields(msg)
        if any(a.version != family for a in addresses_in(text))
    ]


class Sipp:
    """One SIPp process (``-m 1``) for ``phone`` in its lab namespace, run in ``workdir``
    (which must hold the tone), logging every message to ``<workdir>/<name>.msg``."""

    def __init__(self, lab: Lab, phone: Phone, scenario: str, workdir: Path, name: str, *,
                 remote: Endpoint | None = None, keys: Mapping[str, str] | None = None,
                 pause_ms: int = 1000, timeout: float = 15.0, call_id: str | None = None,
                 options: Sequence[str] = ()) -> None:
        self.phone, self.name, self.workdir = phone, name, workdir
        argv = ["sipp", "-sf", str(SIPP_DIR / scenario), "-s", phone.user,
                "-i", str(phone.host), "-p", str(phone.port),
                "-mi", str(phone.host), "-mp", str(phone.media_port),
                "-t", "t1" if phone.tcp else "u1", "-m", "1", "-d", str(pause_ms),
                "-timeout", f"{timeout:g}s", "-timeout_error", "-nostdin",
                "-trace_msg", "-message_file", str(self.message_file),
                "-trace_err", "-error_file", str(workdir / f"{name}.err"), *options]
        if call_id is not None:
            argv += ["-cid_str", call_id]
        for key, value in (keys or {}).items():
            argv += ["-key", key, value]
        if remote is not None:
            argv.append(str(remote))
        with (workdir / f"{name}.out").open("wb") as out:
            self.proc = lab.exec(phone.ns, argv, cwd=workdir, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT)
        self.timeout = timeout

    @property
    def message_file(self) -> Path:
        return self.workdir / f"{self.name}.msg"

    def wait(self) -> int:
        """SIPp's exit code (0: the call went through the whole scenario)."""
        try:
            return self.proc.wait(timeout=self.timeout + 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def messages(self) -> list[Message]:
        return read_trace(self.message_file) if self.message_file.exists() else []

    def received(self, method: str | None = None, status: int | None = None) -> list[Message]:
        """Received messages, optionally only requests ``method`` / responses ``status``."""
        return self._select(False, method, status)

    def sent(self, method: str | None = None, status: int | None = None) -> list[Message]:
        """Sent messages, filtered as ``received`` does."""
        return self._select(True, method, status)

    def _select(self, sent: bool, method: str | None, status: int | None) -> list[Message]:
        return [m for m in self.messages() if m.sent == sent
                and (method is None or (m.is_request and m.method == method))
                and (status is None or m.status == status)]

    def explain(self) -> str:
        """What went wrong, for an assertion message: errors and the message log."""
        parts = [f"--- {self.name} (exit {self.proc.returncode})"]
        for suffix in (".err", ".msg"):
            with contextlib.suppress(OSError):
                parts.append((self.workdir / f"{self.name}{suffix}").read_text(errors="replace"))
        return "\n".join(parts)


# ---- a call through the gateway ----------------------------------------------------------------


Sample = Callable[[float, list[dict[str, Any]]], None]  # (seconds into the call, flows)


@dataclass
class CallRecord:
    """A finished call: both phones, and what the gateway showed while it was up."""

    call_id: str
    uac: Sipp
    uas: Sipp
    sessions: list[dict[str, Any]] = field(default_factory=list)  # last non-empty sample
    flows: dict[str, dict[str, Any]] = field(default_factory=dict)  # by match, last sample
    kernel: int = 0  # most packets the eBPF datapath showed forwarded while the call was up

    @property
    def ended(self) -> float:
        """When (time.time()) the caller logged its last message (the BYE's 200, or the
        ACK of a failed call)."""
        return self.uac.messages()[-1].at

    @property
    def ok(self) -> bool:
        return self.uac.proc.returncode == 0 and self.uas.proc.returncode == 0

    def explain(self) -> str:
        return f"{self.uac.explain()}\n{self.uas.explain()}"

    def sample(self, gw: Gateway, elapsed: float, on_sample: Sample | None) -> None:
        """Note the call's sessions and flows as the gateway lists them now."""
        sessions = gw.sessions(self.call_id)
        if sessions:
            self.sessions = sessions
            flows = gw.flows([s["id"] for s in sessions])
            self.flows.update({f["match"]: f for f in flows})
            self.kernel = max(self.kernel, gw.forwarded().get("ebpf", 0))
            if on_sample is not None:
                on_sample(elapsed, flows)

    def packets(self) -> dict[str, int]:
        """RTP+RTCP packets per direction, ``"v6->v4"`` etc., from the flows seen."""
        out: dict[str, int] = {}
        for f in self.flows.values():
            if f["to"] is None:
                continue
            key = f"v{Endpoint.parse(f['match']).family}->v{Endpoint.parse(f['to']).family}"
            out[key] = out.get(key, 0) + f["packets"]
        return out


def place_call(gw: Gateway, caller: Phone, callee: Phone, ruri: str, workdir: Path, *,
               name: str = "call", uac: str = "uac.xml", uas: str = "uas.xml",
               remote: Endpoint | None = None, pause_ms: int = 1000,
               keys: Mapping[str, str] | None = None, timeout: float = 15.0,
               every: float = 0.25, on_sample: Sample | None = None,
               uac_options: Sequence[str] = ()) -> CallRecord:
    """Run scenario ``uas`` for ``callee`` and ``uac`` for ``caller`` (sending to
    ``remote``, default the gateway's SIP address of the caller's family) with
    ``-key ruri RURI``; while the UAC runs, sample the call's sessions and kernel flows
    every ``every`` seconds (``on_sample(elapsed, flows)`` sees each sample).
    ``uac_options``: more SIPp options for the caller (``-ap`` for its password)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / TONE).exists():
        write_tone(workdir / TONE)
    call_id = f"{name}-{os.urandom(4).hex()}@xlat.test"
    all_keys = {"ruri": ruri, **(keys or {})}
    callee_proc = Sipp(gw.lab, callee, uas, workdir, f"{name}-uas", keys=all_keys,
                       pause_ms=pause_ms, timeout=timeout)
    time.sleep(0.2)  # let it bind; the INVITE is retransmitted anyway
    caller_proc = Sipp(gw.lab, caller, uac, workdir, f"{name}-uac", keys=all_keys,
                       remote=remote or GW_SIP[caller.family], pause_ms=pause_ms,
                       timeout=timeout, call_id=call_id, options=uac_options)
    record = CallRecord(call_id, caller_proc, callee_proc)
    started = time.monotonic()
    try:
        while caller_proc.proc.poll() is None:
            record.sample(gw, time.monotonic() - started, on_sample)
            time.sleep(every)
        record.sample(gw, time.monotonic() - started, None)  # final counts, in the delete delay
    finally:
        if caller_proc.wait() != 0:
            callee_proc.proc.terminate()  # the call failed: do not wait for its timeout
        callee_proc.wait()
    return record


def wait_gone(gw: Gateway, call_id: str, timeout: float) -> float | None:
    """When (time.time()) the call's sessions were seen gone from ``session list``, or
    None if they were still there after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while gw.sessions(call_id):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return time.time()


# ---- xlat lab up | call | down | demo ------------------------------------------------------------


def up(tag: str = "demo") -> None:
    """Build the lab ``tag`` (removing what a previous run left) and start ``xlat run``
    in its gateway namespace. Raises DemoError if either fails."""
    down(tag)
    lab = Lab(tag)
    try:
        lab.up()
    except LabError as e:
        raise DemoError(str(e)) from e
    try:
        gw = start_gateway(lab, "--delete-delay", f"{DEMO_DELETE_DELAY:g}")
    except BaseException:
        lab.down()
        raise
    print(f"lab {tag}:  {lab.v6} [{V6_HOST}]  --  {lab.gw} [{GW6}] [{GW4}]  --  "
          f"{lab.v4} [{V4_HOST}]")
    print(f"xlat run (pid {gw.pid()}) in {lab.gw}: SIP on {GW_SIP[6]} and {GW_SIP[4]}, "
          f"delete delay {DEMO_DELETE_DELAY:g} s")
    print(f"  control {gw.control}\n  log     {gw.log}\n"
          f"  try:    xlat --control {gw.control} session list")


def down(tag: str = "demo") -> None:
    """Stop the lab's daemon (SIGTERM, then SIGKILL) and remove the lab. Never raises
    on leftovers: whatever is missing is skipped."""
    lab = Lab(tag)
    try:
        Gateway(lab, LAB_RUN_DIR / tag).stop()
    except Exception as e:
        print(f"xlat lab down: stopping the daemon: {e}", file=sys.stderr)
    lab.down()


def call(tag: str = "demo", seconds: float = 5) -> bool:
    """One call from an IPv6 phone to an IPv4 phone through the running lab ``tag``;
    prints the kernel counters, the signalling path, the SDP before/after and a
    verdict line. True when every check passed."""
    lab = Lab(tag)
    gw = Gateway(lab, LAB_RUN_DIR / tag)
    if gw.pid() is None or not gw.control.exists():
        raise DemoError(f"no lab {tag!r} running: start it with `xlat lab up`")
    if shutil.which("sipp") is None:
        raise DemoError("sipp not found (Debian package sip-tester)")
    alice = Phone(lab.v6, V6_HOST, "alice")
    bob = Phone(lab.v4, V4_HOST, "bob")
    workdir = gw.dir / f"call-{time.strftime('%H%M%S')}"
    print(f"== {alice.uri} ({alice.ns}) calls {bob.uri} ({bob.ns}) through "
          f"{GW_SIP[6]}: {seconds:g} s of a 440 Hz PCMU tone each way")
    print(f"-- kernel flows while the call is up (xlat --control {gw.control} flow list -j)")
    before = gw.forwarded().get("ebpf", 0)
    record = place_call(gw, alice, bob, bob.uri, workdir, name="demo",
                        pause_ms=round(seconds * 1000), timeout=seconds + 15,
                        every=1.0, on_sample=_print_flows)
    for session in record.sessions:
        print(f"-- session {session['id']} (xlat session list -j): origin {session['origin']}, "
              + "  ".join(f"{leg['peer']} <-> {leg['relay']}" for leg in session["legs"]))
    if not record.ok:
        print(record.explain())
    _print_path(record)
    gone = wait_gone(gw, record.call_id, DEMO_DELETE_DELAY + 5)
    return _verdict(record, record.kernel - before, None if gone is None else gone - record.ended)


def demo() -> int:
    """``make demo``: down, up, call, down (always). Exit code 0 when the call passed."""
    try:
        up()
        return 0 if call() else 1
    except Exception as e:
        print(f"xlat lab demo: {e}", file=sys.stderr)
        return 1
    finally:
        down()


def _print_flows(elapsed: float, flows: list[dict[str, Any]]) -> None:
    print(f"   t={elapsed:4.1f}s " + "  ".join(
        f"{f['match']}->{f['to'] or '?'} {f['packets']}p" for f in flows
        if Endpoint.parse(f["match"]).port % 2 == 0))  # RTP; RTCP rides on port+1


_SHOWN = ("via", "record-route", "route", "contact")


def _print_path(record: CallRecord) -> None:
    """The INVITE and the 200 OK on both sides, then the SDP before and after."""
    uac, uas = record.uac, record.uas
    legs = [
        ("INVITE as it left alice", uac.sent("INVITE")),
        ("INVITE as it reached bob", uas.received("INVITE")),
        ("200 OK as it left bob", uas.sent(status=200)[:1]),
        ("200 OK as it reached alice", uac.received(status=200)[:1]),
    ]
    for title, msgs in legs:
        print(f"-- {title}")
        if not msgs:
            print("   (none)")
            continue
        print(f"   {msgs[0].start}")
        for line in msgs[0].header_lines(*_SHOWN):
            print(f"   {line}")
    for title, (a, b) in (("offer", (legs[0][1], legs[1][1])),
                          ("answer", (legs[2][1], legs[3][1]))):
        print(f"-- SDP {title}: before | after the gateway")
        left = a[0].body.splitlines() if a else []
        right = b[0].body.splitlines() if b else []
        width = max((len(x) for x in left), default=0)
        for i in range(max(len(left), len(right))):
            x = left[i] if i < len(left) else ""
            y = right[i] if i < len(right) else ""
            print(f"   {x:<{width}} {'|' if x == y else '>'} {y}")


def _verdict(record: CallRecord, kernel: int, gone: float | None) -> bool:
    leaks = {
        "alice (IPv6)": foreign_addresses(record.uac.messages(), 6),
        "bob (IPv4)": foreign_addresses(record.uas.messages(), 4),
    }
    for who, found in leaks.items():
        for leak in found:
            print(f"!! {who} saw another family's address: {leak}")
    packets = record.packets()
    checks = {
        "call completed (INVITE/200/ACK ... BYE/200)": record.ok,
        "each phone saw only its own family in what it routes or sends media to":
            not any(leaks.values()),
        f"media both ways (v6->v4 {packets.get('v6->v4', 0)} packets, v4->v6 "
        f"{packets.get('v4->v6', 0)} packets), {kernel} of them forwarded by the kernel":
            packets.get("v6->v4", 0) > 0 and packets.get("v4->v6", 0) > 0
            and kernel >= 0.9 * sum(packets.values()),
        f"session gone after BYE + delete delay ({DEMO_DELETE_DELAY:g} s)"
        + ("" if gone is None else f": after {gone:.1f} s"): gone is not None,
    }
    for what, ok in checks.items():
        print(f"   [{'ok' if ok else 'FAIL'}] {what}")
    passed = all(checks.values())
    print(f"verdict: {'PASS' if passed else 'FAIL'}")
    return passed
