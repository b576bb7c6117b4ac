"""Fuzz targets: every parser and dispatcher that takes outside input, one function each.

A target takes one input (bytes) and returns normally for anything the code under test
handles: a parse error of its own type, an error reply, a dropped datagram. It raises
for everything else: any other exception, a property that does not hold (an untouched
byte that changed, a 400 that does not parse, state that keeps growing), or an
exception the code caught and logged (``log.exception``: a bug turned into an error
reply is still a bug). The atheris driver (fuzz.py) and the smoke test
(test_fuzz_smoke.py) both call them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from xlat.addr import Endpoint
from xlat.config import Config, ConfigError, build
from xlat.control import bencode
from xlat.control.api import Registry
from xlat.control.ng import NgCore
from xlat.media.datapath import CompositeDatapath, FakeDatapath
from xlat.media.negotiate import stream_specs
from xlat.media.ports import RelayPortPool
from xlat.media.session import SessionManager
from xlat.sdp import SdpError, parse_sdp, rewrite_sdp
from xlat.sip.auth import ALGORITHMS, Credentials, DigestAuth, ha1
from xlat.sip.errors import SipParseError
from xlat.sip.malformed import error_response
from xlat.sip.message import StreamFramer, parse_message
from xlat.sip.proxy import ProxyConfig, SipProxy
from xlat.sip.uri import SipUri

GW4 = Endpoint.parse("203.0.113.1:5060")
GW6 = Endpoint.parse("[2001:db8:6::1]:5060")
SOURCES = (Endpoint.parse("203.0.113.2:5060"), Endpoint.parse("[2001:db8:6::2]:5060"),
           Endpoint.parse("198.51.100.7:41000"))
REALM = "gw.example"
CREDENTIALS = Credentials(REALM, {"bob": {a: ha1(a, "bob", REALM, "pw") for a in ALGORITHMS}})
MAX_STATE = 5000  # transactions/sessions one target may hold: the timers must reclaim them


class CaughtBug(AssertionError):
    """The code under test logged an exception it caught."""


class _RaiseOnLoggedException(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            raise CaughtBug(f"{record.name}: {record.getMessage()}") from record.exc_info[1]


@contextlib.contextmanager
def logged_exceptions_raise() -> Iterator[None]:
    """While inside: an exception xlat's code catches and logs is raised as CaughtBug,
    and xlat's log is quiet (the fuzzer runs millions of inputs)."""
    root = logging.getLogger("xlat")
    handler = _RaiseOnLoggedException()
    saved = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


def _media() -> SessionManager:
    manager = SessionManager({4: RelayPortPool(GW4.host, 30000, 30999),
                              6: RelayPortPool(GW6.host, 30000, 30999)},
                             idle_timeout=60.0, delete_delay=1.0, rng=random.Random(1))
    datapath = FakeDatapath()

    composite = CompositeDatapath([datapath])  # as the daemon drives it
    manager.on_change = lambda: composite.apply(manager.drain())
    return manager


# ---- SIP parser --------------------------------------------------------------------------


def sip_parser(data: bytes) -> None:
    """parse_message, StreamFramer, error_response. Properties: a message that parses
    writes back as a prefix of its input (the body is cut to Content-Length); the
    framer agrees with the datagram parser; the reply to one that does not parse
    parses itself."""
    try:
        msg = parse_message(data)
    except SipParseError as exc:
        reply = error_response(data, exc, "t")
        if reply is not None:
            again = parse_message(reply.to_bytes())
            assert again.to_bytes() == reply.to_bytes()
    else:
        out = msg.to_bytes()
        assert data.startswith(out), (out, data)
        if msg.get("Content-Length") is not None and not data.startswith((b"\r", b"\n")):
            try:
                framed = StreamFramer().feed(data)
            except SipParseError:
                return
            assert framed and framed[0].to_bytes() == out


# ---- the proxy's receive path ---------------------------------------------------------------


class _Proxy:
    def __init__(self) -> None:
        self.now = 0.0
        self.media = _media()
        self.proxy = SipProxy(ProxyConfig(
            sip={4: GW4, 6: GW6}, domains=("gw.example",), users=lambda: CREDENTIALS,
            auth_secret=b"k" * 32, routes=(("pbx.example", SipUri.parse("sip:203.0.113.9")),),
        ), self.media, random.Random(2))


_proxy: _Proxy | None = None


def proxy_receive(data: bytes) -> None:
    """One datagram into a long-lived proxy (registrar with Digest on, a route), then
    the clock steps 1 s and its timers and the media timers run (a fake clock: no
    sleep). The first byte picks the source and transport. State must stay bounded:
    what the fuzzer opens, the timers close."""
    global _proxy
    if _proxy is None:
        _proxy = _Proxy()
    p = _proxy
    if not data:
        return
    source = SOURCES[data[0] % len(SOURCES)]
    local = GW4 if source.family == 4 else GW6
    transport = "tcp" if data[0] & 0x80 else "udp"
    sends = p.proxy.receive(data[1:], source, local, transport, p.now)
    for send in sends:
        parse_message(send.data)  # everything the proxy sends parses
    p.now += 1.0
    p.proxy.handle_timer(p.now)
    p.media.expire(p.now, lambda matches: {})
    assert p.proxy.transactions < MAX_STATE
    assert len(p.media.sessions()) < MAX_STATE


# ---- SDP --------------------------------------------------------------------------------------


def sdp(data: bytes) -> None:
    """parse_sdp + stream_specs + rewrite_sdp. Properties: with no relay and ICE kept,
    the rewrite is the identity; with a relay per stream, the result parses, each
    live stream points at its relay (a held one stays null, in the relay's family)
    and no line is added or lost."""
    try:
        info = parse_sdp(data)
    except SdpError:
        return
    stream_specs(info)
    n = len(info.media)
    assert rewrite_sdp(data, [None] * n, remove_ice=False) == data
    for host in (GW4.host, GW6.host):
        relays = [Endpoint(host, 30000 + 2 * i) for i in range(n)]
        out = rewrite_sdp(data, relays, remove_ice=False)
        again = parse_sdp(out)
        for before, after, relay in zip(info.media, again.media, relays, strict=True):
            if before.port != 0:
                held = before.address is not None and before.address.is_unspecified
                assert after.port == relay.port and after.address is not None
                assert after.address.is_unspecified if held else after.address == relay.host
                assert after.address.version == host.version
            else:
                assert after.port == 0
        assert out.count(b"\n") == data.count(b"\n")


# ---- NG -----------------------------------------------------------------------------------------


_ng: tuple[NgCore, SessionManager, list[float]] | None = None


def ng(data: bytes) -> None:
    """One datagram into a long-lived NgCore. It never raises, never logs a caught
    exception; every reply is ``cookie SP bencode``; sessions and the reply cache stay
    bounded (the fuzzer's offers are reclaimed by the media timers as the clock
    steps)."""
    global _ng
    if _ng is None:
        manager = _media()
        _ng = (NgCore(manager), manager, [0.0])
    core, manager, clock = _ng
    # a new source port each time: the reply cache (keyed by source and cookie) would
    # otherwise answer most inputs from the first one with the same cookie
    source = f"127.0.0.1:{int(clock[0]) % 65536}"
    reply = core.handle(data, source, clock[0])
    if reply is not None:
        _, _, body = reply.partition(b" ")
        assert isinstance(bencode.decode(body), dict)
    clock[0] += 1.0
    manager.expire(clock[0], lambda matches: {})
    assert len(manager.sessions()) < MAX_STATE


# ---- the control socket ------------------------------------------------------------------------


_registry: Registry | None = None


def control(data: bytes) -> None:
    """One request line into the daemon's own command registry (no datapath: the
    sessions it adds live in the media layer only). Every line gets one reply,
    ``ok`` true or false, and a bad one names what is wrong."""
    global _registry
    if _registry is None:
        from xlat.daemon import Daemon

        daemon = Daemon(Config(media_v4=(ipaddress.IPv4Address("192.0.2.10"),),
                               media_v6=(ipaddress.IPv6Address("2001:db8::10"),)))
        daemon.manager.on_change = daemon.manager.drain  # no event loop, no datapath
        _registry = daemon._registry()
        _registry._commands.pop("exit")  # it stops the event loop the fuzzer does not run
        _registry.dispatch({"cmd": "session.flush"})
    reply = _registry.handle(data)
    assert reply["ok"] in (True, False)
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and reply["error"]
    if len(data) % 64 == 0:
        _registry.dispatch({"cmd": "session.flush"})  # bounded: flush now and then


# ---- the config loader ---------------------------------------------------------------------------


_config_dir: Path | None = None


def config(data: bytes) -> None:
    """A config file's bytes through the loader ``xlat run -c`` uses: a Config or one
    ConfigError, nothing else."""
    global _config_dir
    if _config_dir is None:
        _config_dir = Path(tempfile.mkdtemp(prefix="xlat-fuzz-"))
    path = _config_dir / "xlat.toml"
    path.write_bytes(data)
    with contextlib.suppress(ConfigError):
        build(path, media_v4=("192.0.2.1",))


# ---- Digest credentials -----------------------------------------------------------------


_auth = DigestAuth(lambda: CREDENTIALS, b"k" * 32, random.Random(3))


def digest(data: bytes) -> None:
    """Authorization header values (one per line) through the Digest check: a
    verdict, never an exception; without the password it is never OK."""
    values = data.decode("utf-8", "surrogateescape").split("\n")
    result = _auth.check(values, "REGISTER", 10.0)
    assert result.verdict.name != "OK"


TARGETS: dict[str, Callable[[bytes], None]] = {
    "sip_parser": sip_parser,
    "proxy_receive": proxy_receive,
    "sdp": sdp,
    "ng": ng,
    "control": control,
    "config": config,
    "digest": digest,
}
# The seed corpora: a directory per target here, plus the unit tests' fixture sets.
FUZZ_DIR = Path(__file__).resolve().parent
SEEDS: dict[str, list[Path]] = {
    name: [FUZZ_DIR / "corpus" / name] for name in TARGETS
}
SEEDS["sip_parser"] += [FUZZ_DIR.parent / "unit" / "sip_torture" / "valid",
                        FUZZ_DIR.parent / "unit" / "sip_torture" / "invalid"]
SEEDS["sdp"] += [FUZZ_DIR.parent / "unit" / "sdp_fixtures"]

