"""rtpengine's NG control protocol, so that Kamailio's and OpenSIPS's ``rtpengine``
modules can drive xlat as their media relay.

Reference: sipwise/rtpengine docs/ng_control_protocol.md. A request is one UDP
datagram ``<cookie> <bencoded dict>`` whose ``command`` is ``ping``, ``offer``,
``answer``, ``delete``, ``query``, ``list`` or ``statistics``; the reply is
``<cookie> <bencoded dict>`` with ``result`` ``ok`` (or ``pong``), plus ``warning``
when something was ignored, or ``error`` with ``error-reason``. A repeated cookie
(the client retransmitting) gets the reply it already got, not a second action.

``NgCore`` is sans-I/O: ``handle(datagram, source, now)`` returns the reply bytes.
Calls made here are ordinary media sessions (origin ``"ng"``) of the one
``SessionManager``: the same flows, timers and ``xlat session list`` as SIP calls.
``start_ng`` is the asyncio UDP edge.

What xlat does not do — transcoding, recording, ICE, RTCP (de)multiplexing, SRTP
termination — it refuses with an error where ignoring it would hand back an SDP that
promises something nobody delivers, and reports with a ``warning`` where the answer
stays right (docs/kamailio.md lists both).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace as dc_replace

from xlat.addr import AddressError, Endpoint, IPAddress, parse_ip
from xlat.control.bencode import BencodeError, Value, decode, encode
from xlat.media import negotiate
from xlat.media.model import StreamSpec
from xlat.media.negotiate import Description, NegotiationError
from xlat.media.session import CountersLookup, SessionManager, SessionNotFound
from xlat.metrics import LatencyHistogram
from xlat.sdp import SdpInfo

log = logging.getLogger(__name__)

__all__ = ["NgCore", "NgError", "NgServer", "start_ng"]

# rtpengine cookies are short ("5323_1"; Kamailio writes "<pid>_<counter>"): a "cookie"
# longer than this is no cookie, and a datagram without one gets no reply.
MAX_COOKIE = 64
# One reply must fit one UDP datagram: 65,535 - 8 (UDP) - 20 (IPv4) bytes.
MAX_REPLY = 65507
# rtpengine keeps replies for retransmitted cookies 30 s (cookie_cache.c); we bound the
# count too, so a flood of distinct cookies costs memory proportional to this, not time.
CACHE_ENTRIES = 16384
LIST_LIMIT = 32  # rtpengine's default for ``list``

_FAMILIES = {"IP4": 4, "IP6": 6}
_FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}

# Keys each command acts on; any other key is reported as ignored in a warning.
_CALL_KEYS = frozenset({"command", "call-id", "from-tag", "to-tag", "via-branch",
                        "received-from", "supports"})
_SDP_KEYS = _CALL_KEYS | {"sdp", "flags", "replace", "direction", "address-family", "ICE",
                          "rtcp-mux", "media-address", "TOS", "transport-protocol"}
_DELETE_KEYS = _CALL_KEYS | {"flags", "delete-delay"}
_QUERY_KEYS = frozenset({"command", "call-id", "from-tag", "to-tag"})

# Keys asking for media processing that a packet relay does not do: ignoring one would
# return an SDP (or a call) that promises what nobody delivers, so they are errors.
_REFUSED_KEYS = {
    "codec": "codec manipulation (xlat does not transcode)",
    "ptime": "repacketisation (xlat does not transcode)",
    "ptime-reverse": "repacketisation (xlat does not transcode)",
    "T.38": "T.38 gatewaying",
    "media-echo": "media echo",
    "OSRTP": "opportunistic SRTP",
    "sdp-attr": "SDP attribute manipulation",
    "record-call": "call recording",
}
_REFUSED_FLAG_PREFIXES = ("codec-", "transcode-", "T38-", "T.38-", "OSRTP-", "sdp-attr-")
_REFUSED_FLAGS = frozenset({"always-transcode", "allow-transcoding", "single-codec",
                            "reuse-codecs", "no-codec-renegotiation", "strip-extmap",
                            "generate-mid", "generate-RTCP", "inject-DTMF", "detect-DTMF",
                            "record-call"})
# Flags that ask for what xlat always does.
_NOOP_FLAGS = frozenset({"trust-address", "symmetric", "port-latching", "reject-ICE",
                         "original-sendrecv", "unidirectional", "no-redis-update", "force",
                         "reset"})
# ``replace`` items: o= and session c= are always rewritten (sdp.rewrite_sdp).
_NOOP_REPLACE = frozenset({"origin", "session-connection"})


class NgError(Exception):
    """A request answered with ``result: error``; the message is the ``error-reason``."""


def _canon(name: str) -> str:
    """rtpengine: "Spaces in each string may be replaced by hyphens"; we keep hyphens."""
    return name.replace(" ", "-")


class _Request:
    """The decoded dictionary, keys canonicalised, with typed accessors that raise
    NgError naming the key. Collects the warnings for the reply."""

    __slots__ = ("fields", "warnings")

    def __init__(self, fields: dict[str, Value]) -> None:
        self.fields = {_canon(k): v for k, v in fields.items()}
        self.warnings: list[str] = []
        if len(self.fields) != len(fields):
            raise NgError("a key is given twice, with spaces and with hyphens")

    def raw(self, key: str) -> bytes | None:
        value = self.fields.get(key)
        if value is not None and not isinstance(value, bytes):
            raise NgError(f"key {key!r} must be a string")
        return value

    def need_raw(self, key: str) -> bytes:
        value = self.raw(key)
        if not value:
            raise NgError(f"missing key {key!r}" if value is None else f"key {key!r} is empty")
        return value

    def text(self, key: str) -> str | None:
        value = self.raw(key)
        return None if value is None else self._decoded(key, value)

    def need(self, key: str) -> str:
        return self._decoded(key, self.need_raw(key))

    @staticmethod
    def _decoded(key: str, value: bytes) -> str:
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise NgError(f"key {key!r} is not UTF-8") from None

    def texts(self, key: str) -> list[str]:
        """A list of strings; a single string counts as a list of one."""
        value = self.fields.get(key)
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if not isinstance(item, bytes):
                raise NgError(f"key {key!r} must be a list of strings")
            out.append(self._decoded(key, item))
        return out

    def integer(self, key: str) -> int | None:
        value = self.fields.get(key)
        if value is None or isinstance(value, int):
            return value
        if isinstance(value, bytes) and value.lstrip(b"-").isdigit():
            return int(value)
        raise NgError(f"key {key!r} must be an integer")

    def flags(self) -> list[str]:
        return [_canon(f) for f in self.texts("flags")]

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def warn_unknown(self, known: frozenset[str]) -> None:
        unknown = sorted(k for k in self.fields if k not in known)
        if unknown:
            self.warn("ignored unsupported key(s): " + ", ".join(unknown))


def _error(reason: str) -> dict[str, object]:
    return {"result": "error", "error-reason": reason}


def _ok(request: _Request, **fields: object) -> dict[str, object]:
    reply: dict[str, object] = {"result": "ok", **fields}
    if request.warnings:
        reply["warning"] = "; ".join(request.warnings)
    return reply


def _with_host(specs: Sequence[StreamSpec], host: IPAddress) -> list[StreamSpec]:
    """Streams pointed at ``host`` (media-address, SIP-source-address); rejected and
    on-hold (null address) streams stay as they are."""
    out = []
    for spec in specs:
        if spec.peer is None or spec.peer.host.is_unspecified:
            out.append(spec)
            continue
        rtcp = None if spec.rtcp is None else Endpoint(host, spec.rtcp.port)
        out.append(dc_replace(spec, peer=Endpoint(host, spec.peer.port), rtcp=rtcp))
    return out


def _sdp_family(specs: Sequence[StreamSpec], info: SdpInfo) -> int | None:
    for spec in specs:
        if spec.peer is not None:
            return spec.peer.family
    return None if info.origin_address is None else info.origin_address.version


class NgCore:
    """The NG protocol engine over one SessionManager. Sans-I/O; never raises from
    ``handle``: every problem becomes an error reply (or no reply without a cookie).

    ``interfaces`` maps the names ``direction`` may use to IP families. ``counters``
    (optional) gives datapath counters for relay endpoints, for ``query``, ``delete``
    and ``statistics``; without it those report zero packets.
    """

    def __init__(
        self,
        manager: SessionManager,
        *,
        interfaces: Mapping[str, int] | None = None,
        cache_ttl: float = 30.0,
        max_request: int = 65535,
        cache_entries: int = CACHE_ENTRIES,
        counters: CountersLookup | None = None,
    ) -> None:
        self.manager = manager
        self.interfaces = dict(interfaces) if interfaces is not None else {"v4": 4, "v6": 6}
        self.cache_ttl = cache_ttl
        self.max_request = max_request
        self.cache_entries = cache_entries
        self.counters = counters
        self.requests: dict[str, int] = {}  # command -> requests handled
        self.last_command: str | None = None  # of the last ``handle`` (None: cached/invalid)
        self.retransmits = 0
        self._cache: OrderedDict[tuple[str, bytes], tuple[float, bytes]] = OrderedDict()
        self._commands: dict[str, Callable[[_Request, float], dict[str, object]]] = {
            "ping": self._ping,
            "offer": self._offer,
            "answer": self._answer,
            "delete": self._delete,
            "query": self._query,
            "list": self._list,
            "statistics": self._statistics,
        }

    # ---- entry point ----------------------------------------------------------

    def handle(self, datagram: bytes, source: str, now: float) -> bytes | None:
        """Answer one request datagram from ``source`` (``addr:port``) at ``now``."""
        space = datagram.find(b" ", 0, MAX_COOKIE + 1)
        if space <= 0:
            return None  # no cookie: no way to address a reply
        cookie = datagram[:space]
        key = (source, cookie)
        self.last_command = None
        self._expire(now)
        cached = self._cache.get(key)
        if cached is not None:
            self.retransmits += 1
            return cached[1]
        reply = cookie + b" " + self._reply(datagram, space + 1, now)
        self._cache[key] = (now + self.cache_ttl, reply)
        if len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)
        return reply

    def _expire(self, now: float) -> None:
        cache = self._cache
        while cache:
            expires, _ = next(iter(cache.values()))
            if expires > now:
                return
            cache.popitem(last=False)

    def _reply(self, datagram: bytes, start: int, now: float) -> bytes:
        try:
            if len(datagram) > self.max_request:
                raise NgError(f"request of {len(datagram)} bytes exceeds {self.max_request}")
            fields = decode(datagram[start:])
            if not isinstance(fields, dict):
                raise NgError("request is not a dictionary")
            request = _Request(fields)
            command = request.need("command")
            handler = self._commands.get(command)
            if handler is None:
                raise NgError(f"unknown command {command!r}")
            self.requests[command] = self.requests.get(command, 0) + 1
            self.last_command = command
            reply = handler(request, now)
        except BencodeError as e:
            reply = _error(f"malformed bencode: {e}")
        except NgError as e:
            reply = _error(str(e))
        except Exception:  # a bug must cost one request, not the server
            log.exception("NG request failed")
            reply = _error("internal error")
        data = encode(reply)
        if len(data) > MAX_REPLY:
            data = encode(_error(f"reply of {len(data)} bytes does not fit a datagram"))
        return data

    # ---- commands ---------------------------------------------------------------

    def _ping(self, request: _Request, now: float) -> dict[str, object]:
        return {"result": "pong"}

    def _offer(self, request: _Request, now: float) -> dict[str, object]:
        call_id, from_tag = request.need("call-id"), request.need("from-tag")
        sdp = self._streams(request, request.need_raw("sdp"))
        self._check_rtcp_mux(request, sdp.info)
        source_family, toward = self._families(request, sdp.specs, sdp.info)
        try:
            (body,) = negotiate.offer(
                self.manager, sdp, call_id=call_id, from_tag=from_tag,
                to_tag=request.text("to-tag") or None, toward=toward, views=[None],
                now=now, offerer_family=source_family, origin="ng",
            )
        except NegotiationError as e:
            raise NgError(str(e)) from None
        return _ok(request, sdp=body)

    def _answer(self, request: _Request, now: float) -> dict[str, object]:
        call_id, from_tag = request.need("call-id"), request.need("from-tag")
        to_tag = request.need("to-tag")
        sdp = self._streams(request, request.need_raw("sdp"))  # rtcp-mux: as the offer
        if "direction" in request.fields:
            request.warn("direction ignored in answer: the offer chose the interfaces")
        wanted = self._address_family(request)
        offerer = self.manager.family_of(call_id, from_tag)
        if wanted is not None and offerer is not None and wanted != offerer:
            raise NgError(f"address family IP{wanted} contradicts the offer, whose offerer "
                          f"is {_FAMILY_NAMES[offerer]}")
        try:
            body = negotiate.answer(self.manager, sdp, call_id=call_id, from_tag=from_tag,
                                    to_tag=to_tag, view=None, now=now)
        except NegotiationError as e:
            raise NgError(str(e)) from None
        return _ok(request, sdp=body)

    def _delete(self, request: _Request, now: float) -> dict[str, object]:
        request.warn_unknown(_DELETE_KEYS)
        call_id = request.need("call-id")
        from_tag = request.text("from-tag") or None
        to_tag = request.text("to-tag") or None
        flags = request.flags()
        fatal = "fatal" in flags
        others = sorted(f for f in flags if f != "fatal")
        if others:
            request.warn("ignored flag(s): " + ", ".join(others))
        if "via-branch" in request.fields:
            request.warn("via-branch ignored in delete: deletes by call-id and tags")
        delay = request.integer("delete-delay")
        if delay is not None and delay < 0:
            raise NgError("delete-delay must not be negative")
        totals = self.manager.totals(self.manager.find(call_id, from_tag, to_tag), self.counters)
        if not self.manager.delete(call_id, from_tag, to_tag, now=now,
                                   delay=None if delay is None else float(delay)):
            reason = f"unknown call-id {call_id!r}" + (f" or tag {from_tag!r}" if from_tag else "")
            if fatal:
                raise NgError(reason)
            request.warn(reason)
            return _ok(request)
        return _ok(request, totals=totals)  # what Kamailio's $rtpstat reads

    def _query(self, request: _Request, now: float) -> dict[str, object]:
        request.warn_unknown(_QUERY_KEYS)
        try:
            info = self.manager.query(request.need("call-id"), request.text("from-tag") or None,
                                      request.text("to-tag") or None, self.counters)
        except SessionNotFound as e:
            raise NgError(str(e)) from None
        return _ok(request, **info)

    def _list(self, request: _Request, now: float) -> dict[str, object]:
        request.warn_unknown(frozenset({"command", "limit"}))
        limit = request.integer("limit")
        if limit is None:
            limit = LIST_LIMIT
        if limit <= 0:
            raise NgError("limit must be > 0")
        return _ok(request, calls=self.manager.call_ids(limit))

    def _statistics(self, request: _Request, now: float) -> dict[str, object]:
        sessions = self.manager.sessions()
        own = sum(n for (origin, _), n in self.manager.census().items() if origin == "ng")
        ended = self.manager.ended
        totals = self.manager.totals(sessions, self.counters)
        return _ok(request, statistics={
            "currentstatistics": {
                "sessionsown": own,
                "sessionsforeign": len(sessions) - own,
                "sessionstotal": len(sessions),
                "transcodedmedia": 0,  # a packet relay never transcodes
                # counted over the sessions that exist now (ended ones took theirs along)
                "relayedpackets": totals["RTP"]["packets"] + totals["RTCP"]["packets"],
                "relayedbytes": totals["RTP"]["bytes"] + totals["RTCP"]["bytes"],
            },
            "totalstatistics": {
                "managedsessions": len(sessions) + sum(ended.values()),
                "timeoutsessions": ended["idle"],
                "regularterminatedsessions": ended["deleted"],
                "forcedterminatedsessions": ended["removed"] + ended["flushed"],
                "rejectedsessions": ended["ports_exhausted"],
            },
            "controlstatistics": {
                f"total{command}count": self.requests.get(command, 0)
                for command in self._commands
            },
        })

    # ---- offer/answer helpers ---------------------------------------------------

    def _streams(self, request: _Request, body: bytes) -> Description:
        """Validate the SDP-related keys and flags; the SDP, its streams with
        media-address / SIP-source-address applied."""
        request.warn_unknown(_SDP_KEYS | _REFUSED_KEYS.keys())
        for key, what in _REFUSED_KEYS.items():
            if key in request.fields:
                raise NgError(f"{key!r} not supported: {what}")
        ice = request.text("ICE")
        if ice == "default":
            request.warn("ICE=default: ICE attributes removed (xlat is no ICE agent)")
        elif ice not in (None, "remove"):
            raise NgError(f"ICE={ice!r} not supported: xlat is no ICE agent, use ICE=remove")
        extra = [r for r in map(_canon, request.texts("replace")) if r not in _NOOP_REPLACE]
        if extra:
            request.warn("ignored replace item(s): " + ", ".join(sorted(extra)))
        if request.integer("TOS") is not None:
            request.warn("TOS ignored: packets keep their own TOS / traffic class")
        sip_source = self._flags(request)
        try:
            sdp = negotiate.parse(body)
        except NegotiationError as e:
            raise NgError(str(e)) from None
        protocol = request.text("transport-protocol")
        if protocol is not None and any(
            m.proto != protocol for m, s in zip(sdp.info.media, sdp.specs, strict=True) if s.peer
        ):
            raise NgError(f"transport protocol {protocol!r} differs from the SDP's: "
                          "xlat does not convert (no SRTP termination, no AVPF)")
        host = self._media_host(request, sip_source)
        return sdp if host is None else dc_replace(sdp, specs=_with_host(sdp.specs, host))

    def _flags(self, request: _Request) -> bool:
        """Check the ``flags`` list; True if SIP-source-address was asked for."""
        flags = request.flags()
        ignored = []
        for flag in flags:
            if flag in _REFUSED_FLAGS or flag.startswith(_REFUSED_FLAG_PREFIXES):
                raise NgError(f"flag {flag!r} not supported: xlat relays packets as they "
                              "are (no transcoding, recording or SDP generation)")
            if flag not in _NOOP_FLAGS and flag != "SIP-source-address":
                ignored.append(flag)
        if ignored:
            request.warn("ignored flag(s): " + ", ".join(sorted(ignored)))
        return "SIP-source-address" in flags

    def _media_host(self, request: _Request, sip_source: bool) -> IPAddress | None:
        """``media address`` wins, then ``received from`` if SIP-source-address."""
        address = request.text("media-address")
        if address is None and sip_source:
            received = request.texts("received-from")
            if len(received) != 2:
                raise NgError("SIP-source-address needs received-from [family, address]")
            address = received[1]
        if address is None:
            return None
        try:
            return parse_ip(address)
        except AddressError as e:
            raise NgError(str(e)) from None

    def _check_rtcp_mux(self, request: _Request, info: SdpInfo) -> None:
        """xlat forwards RTCP the way the endpoints negotiated it (``accept``); the other
        options are fine only where they would change nothing."""
        muxed = [m.rtcp_mux for m in info.media if m.port != 0]
        for option in request.texts("rtcp-mux"):
            if option == "accept":
                continue
            if option in ("demux", "reject"):
                ok = not any(muxed)
            elif option in ("offer", "require"):
                ok = all(muxed)
            else:
                raise NgError(f"unknown rtcp-mux option {option!r}")
            if not ok:
                raise NgError(f"rtcp-mux {option!r} not supported: xlat does not "
                              "(de)multiplex RTCP; use rtcp-mux-accept")

    def _families(
        self, request: _Request, specs: Sequence[StreamSpec], info: SdpInfo
    ) -> tuple[int | None, int]:
        """(family of the offerer's leg if ``direction`` says, family toward the
        answerer): ``direction``'s second interface or ``address family``, else the
        SDP's own family (same-family relay)."""
        source: int | None = None
        toward: int | None = None
        direction = request.texts("direction")
        if direction:
            if len(direction) != 2:
                raise NgError("direction must name two interfaces")
            try:
                source, toward = (self.interfaces[name] for name in direction)
            except KeyError as e:
                known = ", ".join(sorted(self.interfaces))
                raise NgError(f"unknown interface {e.args[0]!r} (known: {known})") from None
        family = self._address_family(request)
        if family is not None:
            if toward is not None and toward != family:
                raise NgError(f"address family IP{family} contradicts direction {direction}")
            toward = family
        if toward is None:
            toward = _sdp_family(specs, info) or source
        if toward is None:
            raise NgError("no address in the SDP: give direction or address family")
        return source, toward

    @staticmethod
    def _address_family(request: _Request) -> int | None:
        """``address family``: the family of the party the SDP goes to."""
        wanted = request.text("address-family")
        if wanted is None:
            return None
        if wanted not in _FAMILIES:
            raise NgError(f"address family must be IP4 or IP6, not {wanted!r}")
        return _FAMILIES[wanted]


# ---- asyncio edge ------------------------------------------------------------------

# Requests read per wake-up: a burst (16 calls in flight) is answered in one loop turn,
# so the datapath changes of all of them reach the kernel as one batch.
READ_BATCH = 64


class NgServer:
    """A listening NG socket read straight from the event loop (no transport layer: a
    wake-up drains up to READ_BATCH requests); ``address`` is where it is bound."""

    def __init__(self, core: NgCore, sock: socket.socket) -> None:
        self.core = core
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        host, port = sock.getsockname()[:2]
        self.address = Endpoint(parse_ip(host), port)
        self.latency = LatencyHistogram()  # seconds per request, by command
        self._loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _readable(self) -> None:
        now = time.monotonic()
        for _ in range(READ_BATCH):
            try:
                data, addr = self._sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. an ICMP error queued by an earlier reply
                log.warning("NG socket error: %s", e)
                continue
            host, port = str(addr[0]), int(addr[1])
            source = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            started = time.perf_counter()
            reply = self.core.handle(data, source, now)
            if self.core.last_command is not None:
                self.latency.observe(self.core.last_command, time.perf_counter() - started)
            if reply is not None:
                try:
                    self._sock.sendto(reply, addr)
                except OSError as e:  # the client retransmits; the cache answers it
                    log.warning("NG reply to %s not sent: %s", source, e)


async def start_ng(core: NgCore, listen: Endpoint) -> NgServer:
    """Serve ``core`` on UDP ``listen`` (port 0: any free port), one reply per request."""
    family = socket.AF_INET6 if listen.family == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((str(listen.host), listen.port))
    except OSError:
        sock.close()
        raise
    return NgServer(core, sock)
