"""The daemon's configuration: a TOML file, then command-line options on top.

The file is ``/etc/xlat/xlat.toml`` when it exists and ``-c FILE`` is not given. Its
keys are spelled as the long options of ``xlat run`` (``timeout``, ``rate-limit``,
``media-v4``, ``route``, …); a few keys exist in the file only (``sip-rate``,
``nat64-prefix``, ``ng-interfaces``). ``etc/xlat.toml`` lists every key with its default.

Loading collects every problem — unknown keys (with a "did you mean"), wrong types,
values out of range, cross-key rules — before raising one ``ConfigError`` that holds
them all, one ``SOURCE: KEY: reason`` line each, so an operator fixes a file in one
pass. The underscore spellings of xlat 0.1 (``idle_timeout``, ``sip_rate``,
``port_min``, …) still load, each with a deprecation warning.

``build`` is the one entry point (``xlat run``, ``xlat config check``); ``reload``
re-reads the file a running daemon was started with, under the same options.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlat.addr import AddressError, Endpoint, IPAddress, parse_ip
from xlat.eventloop import LOOPS
from xlat.media.datapath import Latch

DEFAULT_FILE = Path("/etc/xlat/xlat.toml")
DEFAULT_CONTROL = Path("/run/xlat/control.sock")
DEFAULT_BPFFS = Path("/sys/fs/bpf/xlat")
DEFAULT_STATE_DIR = Path("/var/lib/xlat")  # systemd's StateDirectory=xlat
SIP_PORT = 5060
DNS_PORT = 53
SIP_TRANSPORTS = ("udp", "tcp", "tls")  # prefixes of --sip-listen entries
MAX_FILE = 1 << 20  # bytes; the shipped file is ~6 KiB, a megabyte is no config file
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# RFC 6052 §2.2: the prefix lengths an IPv4-embedded IPv6 address may use
NAT64_PREFIX_LENGTHS = (32, 40, 48, 56, 64, 96)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration: where (the file, or None for the
    command line), which key (as written there), and why."""

    source: str | None
    key: str | None
    reason: str

    def __str__(self) -> str:
        return ": ".join(p for p in (self.source, self.key, self.reason) if p)


class ConfigError(ValueError):
    """A configuration that cannot be used; ``problems`` lists everything wrong, and
    the message is one line per problem."""

    def __init__(self, problems: str | Iterable[Problem]) -> None:
        self.problems = (
            [Problem(None, None, problems)] if isinstance(problems, str) else list(problems)
        )
        super().__init__("\n".join(map(str, self.problems)))


@dataclass(frozen=True)
class Route:
    """``DOMAIN|*=sip:HOST:PORT``: requests for DOMAIN go to that next hop."""

    domain: str  # host name, IP literal (IPv6 bracketed) or "*"
    target: str  # sip: URI of the next hop

    @classmethod
    def parse(cls, text: str) -> Route:
        domain, sep, target = text.partition("=")
        domain, target = domain.strip(), target.strip()
        if not sep or not domain or not target.startswith(("sip:", "sips:")):
            raise ConfigError(f"route must be DOMAIN|*=sip:HOST:PORT, got {text!r}")
        if domain.startswith("[") != domain.endswith("]"):
            raise ConfigError(f"route domain {domain!r}: unbalanced brackets")
        if ":" in domain and not domain.startswith("["):
            raise ConfigError(f"route domain {domain!r}: write IPv6 literals in brackets")
        return cls(domain.lower(), target)


@dataclass(frozen=True)
class Config:
    """Everything ``xlat run`` needs. Defaults follow DESIGN.md's CLI section; the
    ``KEYS`` table below says which file key / option sets each field."""

    media_v4: tuple[ipaddress.IPv4Address, ...] = ()
    media_v6: tuple[ipaddress.IPv6Address, ...] = ()
    interfaces: tuple[str, ...] = ()  # empty: every non-loopback interface that is up
    port_min: int = 30000
    port_max: int = 39999
    sip_listen: tuple[Endpoint, ...] | None = None  # None: port 5060 on each media address
    # --sip-listen entries with a transport prefix ("tls:[::]:5061"): that transport only
    sip_listen_only: tuple[tuple[str, Endpoint], ...] = ()
    tls_cert: Path | None = None  # our certificate chain (PEM), needed to listen on TLS
    tls_key: Path | None = None
    tls_ca: Path | None = None  # CAs that server certificates must chain to (default: system)
    dns_servers: tuple[Endpoint, ...] = ()  # empty: /etc/resolv.conf's
    prefer_family: int = 6  # of a name with AAAA and A records, the family tried first
    domains: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()
    ng_listen: Endpoint | None = None
    ng_interfaces: dict[str, int] = field(default_factory=lambda: {"v4": 4, "v6": 6})
    metrics_listen: Endpoint | None = None
    allow_remote_control: bool = False  # NG / metrics on a non-loopback address
    datapath: str = "ebpf"  # "ebpf" | "userspace" | "auto" (ebpf, else userspace)
    fallback_relay: bool = False  # ebpf: also bind relay sockets for packets passed up
    delete_delay: float = 10.0
    idle_timeout: float = 60.0
    latch: Latch = Latch.LEARN
    rate_limit_pps: int = 2000  # per flow; a forged SDP cannot aim a flood anywhere
    sip_rate: int = 200  # SIP packets/s per IPv4 source or IPv6 /64 (untrusted sources)
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # no SIP rate limit
    nat64_prefixes: tuple[str, ...] = ("64:ff9b::/96",)
    keep_datapath: bool = False
    bpffs: Path = DEFAULT_BPFFS
    control: Path = DEFAULT_CONTROL
    state_dir: Path = DEFAULT_STATE_DIR  # the crash journal (xlat/state.py)
    log_level: str = "info"
    log_format: str = "text"
    event_loop: str = "auto"  # "auto" (uvloop where installed) | "uvloop" | "asyncio"
    users: Path | None = None  # registrar credentials file: turns the local registrar on
    registrar_upstream: str | None = None  # sip: URI: REGISTER goes there (RFC 3327 Path)
    # where it came from, for ``reload`` and for the warnings ``xlat run`` logs
    source: Path | None = field(default=None, compare=False)
    options: tuple[tuple[str, Any], ...] = field(default=(), compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def media(self) -> tuple[IPAddress, ...]:
        return (*self.media_v4, *self.media_v6)

    def sip_endpoints(self) -> tuple[Endpoint, ...]:
        """Every SIP listen endpoint, of any transport."""
        return tuple(dict.fromkeys(ep for _, ep in self.sip_listeners()))

    def sip_listeners(self) -> tuple[tuple[str, Endpoint], ...]:
        """(transport, endpoint) of every SIP listener: UDP and TCP on each plain
        ``--sip-listen`` entry, then the entries with a transport prefix. With no plain,
        ``udp:`` or ``tcp:`` entry, UDP and TCP listen on port 5060 of each media
        address (``tls:`` entries add to that)."""
        if self.sip_listen is not None:
            plain = self.sip_listen
        elif any(t != "tls" for t, _ in self.sip_listen_only):
            plain = ()
        else:
            plain = tuple(Endpoint(a, SIP_PORT) for a in self.media)
        return (*((t, ep) for ep in plain for t in ("udp", "tcp")), *self.sip_listen_only)


# ---- value parsers: a value as TOML or click gives it -> the field's value ----------
# Each raises _Bad with the reason; the caller adds the source and the key.


class _Bad(ValueError):
    pass


_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "a table"}


def _kind(value: Any) -> str:
    return next((name for t, name in _TOML_TYPES.items() if isinstance(value, t)),
                type(value).__name__)


def _want(what: str, value: Any) -> _Bad:
    return _Bad(f"expects {what}, got {_kind(value)} ({value!r})")


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _want("a string", value)
    return value


def _strings(value: Any) -> tuple[str, ...]:
    """A string or an array of strings (a repeated option)."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not all(isinstance(v, str) for v in items):
        raise _want("a string or an array of strings", value)
    return tuple(items)


def _number(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _want("a number of seconds", value)
        if not math.isfinite(value) or value < low or (low_open and value == low) \
                or value > high:
            low_text = f"> {low:g}" if low_open else f">= {low:g}"
            raise _Bad(f"must be {low_text} and <= {high:g}, got {value!r}")
        return float(value)

    return parse


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _want("an integer", value)
        if not low <= value <= high:
            raise _Bad(f"must be {low}-{high}, got {value}")
        return value

    return parse


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _want("true or false", value)
    return value


def _choice(*names: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _string(value)
        if text not in names:
            raise _Bad(f"must be {', '.join(names[:-1])} or {names[-1]}, got {text!r}")
        return text

    return parse


def _path(value: Any) -> Path:
    path = Path(_string(value))
    if not path.is_absolute():
        raise _Bad(f"must be an absolute path, got {value!r}")
    return path


def parse_ports(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit():
        raise _Bad(f"must be MIN-MAX, got {text!r}")
    low, high = int(lo), int(hi)
    if not 1024 <= low < high <= 65535:
        raise _Bad(f"{text}: need 1024 <= MIN < MAX <= 65535")
    return low, high


def _ports(value: Any) -> tuple[int, int]:
    return parse_ports(_string(value))


def parse_media(text: str, version: int) -> IPAddress:
    try:
        addr = parse_ip(text)
    except AddressError as e:
        raise _Bad(str(e)) from None
    if addr.version != version:
        raise _Bad(f"{text} is not an IPv{version} address")
    if addr.is_unspecified or addr.is_multicast:
        raise _Bad(f"{text} cannot be a media address")
    return addr


def _media(version: int) -> Callable[[Any], tuple[IPAddress, ...]]:
    return lambda value: tuple(parse_media(v, version) for v in _strings(value))


def parse_listen(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except AddressError as e:
        raise _Bad(str(e)) from None


def _sip_listen(value: Any) -> tuple[tuple[Endpoint, ...] | None,
                                     tuple[tuple[str, Endpoint], ...]]:
    """``--sip-listen`` entries: plain ``A:P`` (UDP and TCP) and ``udp:|tcp:|tls:A:P``;
    ``none`` alone turns SIP off. Returns (plain entries or None, prefixed entries)."""
    items = _strings(value)
    if items == ("none",):
        return (), ()
    plain: list[Endpoint] = []
    only: list[tuple[str, Endpoint]] = []
    for item in items:
        prefix, sep, rest = item.partition(":")
        if sep and prefix.lower() in SIP_TRANSPORTS:
            only.append((prefix.lower(), parse_listen(rest)))
        else:
            plain.append(parse_listen(item))
    return (tuple(plain) if plain else None), tuple(only)


def _dns_servers(value: Any) -> tuple[Endpoint, ...]:
    """``ADDR`` or ``ADDR:PORT`` each (IPv6 bracketed when a port follows)."""
    out = []
    for text in _strings(value):
        try:
            out.append(Endpoint(parse_ip(text), DNS_PORT))
        except AddressError:
            out.append(parse_listen(text))
    return tuple(out)


def _family(value: Any) -> int:
    return int(_choice("ipv6", "ipv4")(value).removeprefix("ipv"))


def _file(value: Any) -> Path:
    path = Path(_string(value))
    if not path.is_file():
        raise _Bad(f"{path}: no such file")
    return path


def _listen(value: Any) -> Endpoint | None:
    text = _string(value)
    return None if text == "none" else parse_listen(text)


def _routes(value: Any) -> tuple[Route, ...]:
    try:
        return tuple(Route.parse(v) for v in _strings(value))
    except ConfigError as e:
        raise _Bad(str(e)) from None


def _interfaces(value: Any) -> tuple[str, ...]:
    names = _strings(value)
    for name in names:  # IFNAMSIZ is 16 with the NUL
        if not 0 < len(name) <= 15 or "/" in name or any(c.isspace() for c in name):
            raise _Bad(f"{name!r} is not an interface name")
    return names


def _domains(value: Any) -> tuple[str, ...]:
    names = _strings(value)
    for name in names:
        if not name or any(c.isspace() or c in "@;:/" for c in name.strip("[]")):
            raise _Bad(f"{name!r} is not a domain name")
    return tuple(n.lower() for n in names)


def _nat64(value: Any) -> tuple[str, ...]:
    prefixes = _strings(value)
    for text in prefixes:
        try:
            net = ipaddress.IPv6Network(text)
        except ValueError as e:
            raise _Bad(f"{text!r}: {e}") from None
        if net.prefixlen not in NAT64_PREFIX_LENGTHS:
            raise _Bad(f"{text}: RFC 6052 prefixes are /32, /40, /48, /56, /64 or /96")
    return prefixes


def _trusted(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``ADDR`` or ``ADDR/LEN`` each (host bits must be zero)."""
    out = []
    for text in _strings(value):
        try:
            out.append(ipaddress.ip_network(text.strip()))
        except ValueError as e:
            raise _Bad(f"{text!r}: {e}") from None
    return tuple(out)


def _ng_interfaces(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise _want('a table of NAME = 4 or 6 (e.g. { v4 = 4, v6 = 6, wan = 4 })', value)
    for name, family in value.items():
        if isinstance(family, bool) or family not in (4, 6):
            raise _Bad(f"{name}: expects 4 or 6, got {family!r}")
    return {"v4": 4, "v6": 6, **value}


def _users(value: Any) -> Path:
    """A registrar users file, read and checked now (xlat/sip/auth.py's format)."""
    from xlat.sip.auth import UsersError, parse_users

    path = _file(value)
    try:
        parse_users(path.read_bytes(), str(path))
    except OSError as e:
        raise _Bad(f"{path}: {e.strerror or e}") from None
    except UsersError as e:
        raise _Bad(str(e)) from None
    return path


def _registrar_uri(value: Any) -> str:
    from xlat.sip.uri import SipUri

    text = _string(value)
    try:
        uri = SipUri.parse(text)
    except ValueError as e:
        raise _Bad(str(e)) from None
    if uri.host_ip is None:
        raise _Bad(f"{text!r}: the host must be an IP literal")
    return text


def _latch(value: Any) -> Latch:
    return Latch[_choice("off", "learn", "strict")(value).upper()]


@dataclass(frozen=True)
class Key:
    """One setting: its name in the file and as ``--NAME`` option (``cli``), the Config
    field it sets, and how its value is read."""

    name: str
    field: str
    parse: Callable[[Any], Any]
    cli: bool = True


KEYS: dict[str, Key] = {k.name: k for k in (
    Key("media-v4", "media_v4", _media(4)),
    Key("media-v6", "media_v6", _media(6)),
    Key("interface", "interfaces", _interfaces),
    Key("ports", "ports", _ports),  # sets port_min and port_max
    Key("sip-listen", "sip_listen", _sip_listen),  # sets sip_listen and sip_listen_only
    Key("tls-cert", "tls_cert", _file),
    Key("tls-key", "tls_key", _file),
    Key("tls-ca", "tls_ca", _file),
    Key("dns-server", "dns_servers", _dns_servers),
    Key("prefer-family", "prefer_family", _family),
    Key("domain", "domains", _domains),
    Key("route", "routes", _routes),
    Key("ng-listen", "ng_listen", _listen),
    Key("ng-interfaces", "ng_interfaces", _ng_interfaces, cli=False),
    Key("metrics-listen", "metrics_listen", _listen),
    Key("allow-remote-control", "allow_remote_control", _boolean),
    Key("datapath", "datapath", _choice("ebpf", "userspace", "auto")),
    Key("fallback-relay", "fallback_relay", _boolean),
    Key("delete-delay", "delete_delay", _number(0, 3600)),
    Key("timeout", "idle_timeout", _number(0, 86400, low_open=True)),
    Key("latch", "latch", _latch),
    Key("rate-limit", "rate_limit_pps", _integer(0, 10_000_000)),
    Key("sip-rate", "sip_rate", _integer(1, 1_000_000), cli=False),
    Key("trusted", "trusted", _trusted),
    Key("nat64-prefix", "nat64_prefixes", _nat64, cli=False),
    Key("keep-datapath", "keep_datapath", _boolean),
    Key("bpffs", "bpffs", _path),
    Key("state-dir", "state_dir", _path),
    Key("log-level", "log_level", _choice(*LOG_LEVELS)),
    Key("log-format", "log_format", _choice(*LOG_FORMATS)),
    Key("event-loop", "event_loop", _choice(*LOOPS)),
    Key("users", "users", _users),
    Key("registrar-upstream", "registrar_upstream", _registrar_uri),
)}
CLI_ONLY = {"control": "control"}  # the global --control: clients never read the file

# xlat 0.1 spellings (its Config field names) -> the key now; they load with a warning
_OLD_NAMES = {k.field: k.name for k in KEYS.values() if k.field != k.name}
_OLD_NAMES |= {k.name.replace("-", "_"): k.name for k in KEYS.values() if "-" in k.name}
_OLD_PORTS = {"port_min": _integer(1024, 65535), "port_max": _integer(1024, 65535)}


def default_file() -> Path | None:
    """The file ``xlat run`` reads when not given ``-c``: DEFAULT_FILE, if present."""
    return DEFAULT_FILE if DEFAULT_FILE.exists() else None


def build(file: Path | None = None, *, control: Path | None = None, **options: Any) -> Config:
    """The Config of ``xlat run -c file`` with ``options`` (keyword = key name with
    ``_`` for ``-``; None and empty tuples mean "not given") on top. Raises ConfigError
    listing every problem."""
    problems: list[Problem] = []
    warnings: list[str] = []
    values: dict[str, Any] = {}
    origin: dict[str, tuple[str | None, str]] = {}  # field -> (source, key as written)

    def put(source: str | None, written: str, key: Key | None, value: Any) -> None:
        target = key.field if key is not None else written
        try:
            values[target] = (key.parse if key is not None else _OLD_PORTS[written])(value)
        except _Bad as e:
            problems.append(Problem(source, written, str(e)))
            return
        origin[target] = (source, written)

    if file is not None:
        source = str(file)
        for written, value in _read(file, problems).items():
            key = KEYS.get(written)
            if key is None and written in _OLD_NAMES:
                key = KEYS[_OLD_NAMES[written]]
                warnings.append(f"{source}: {written}: deprecated spelling, write "
                                f"{key.name!r}")
            elif key is None and written in _OLD_PORTS:
                warnings.append(f"{source}: {written}: deprecated, write ports = \"MIN-MAX\"")
            elif key is None:
                problems.append(Problem(source, written, _unknown(written)))
                continue
            put(source, written, key, value)
    given = {k: v for k, v in options.items() if v is not None and v != ()}
    for name, value in given.items():
        key = KEYS.get(name.replace("_", "-"))
        if key is None or not key.cli:
            raise TypeError(f"build() got an unknown option {name!r}")  # a caller's bug
        put(None, f"--{key.name}", key, value)
    if control is not None:
        values["control"] = control
    if "ports" in values:
        values["port_min"], values["port_max"] = values.pop("ports")
        origin["port_min"] = origin["port_max"] = origin.pop("ports")
    if "sip_listen" in values:
        values["sip_listen"], values["sip_listen_only"] = values["sip_listen"]
    cfg_source = str(file) if file is not None else None
    if not problems:
        problems += _cross_checks(values, origin, cfg_source)
    if problems:
        raise ConfigError(problems)
    return Config(**values, source=file, warnings=tuple(warnings),
                  options=tuple(sorted(given.items())))


def reload(cfg: Config) -> Config:
    """Read again the file ``cfg`` came from, with the same command-line options on top
    (SIGHUP). Raises ConfigError; ``cfg`` stays as it was."""
    return build(cfg.source, control=cfg.control, **dict(cfg.options))


def _read(file: Path, problems: list[Problem]) -> dict[str, Any]:
    """The file's top-level table; a file that cannot be read or parsed is one problem."""
    source = str(file)
    try:
        with file.open("rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        problems.append(Problem(source, None, e.strerror or str(e)))
        return {}
    if len(data) > MAX_FILE:
        problems.append(Problem(source, None, f"larger than {MAX_FILE} bytes"))
        return {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        problems.append(Problem(source, None, f"not UTF-8 text (line {line}, byte "
                                              f"{data[e.start]:#04x}): TOML files are UTF-8"))
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problems.append(Problem(source, None, f"not valid TOML: {e}"))
        return {}


def _unknown(name: str) -> str:
    known = [*KEYS, *_OLD_NAMES, *_OLD_PORTS]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not close:
        return "unknown key"
    hint = _OLD_NAMES.get(close[0], close[0])
    return f"unknown key, did you mean {hint!r}?"


def _cross_checks(values: Mapping[str, Any], origin: Mapping[str, tuple[str | None, str]],
                  file: str | None) -> list[Problem]:
    """Rules between keys, each problem placed where the offending value was written."""
    out: list[Problem] = []

    def where(name: str, default_key: str) -> tuple[str | None, str]:
        return origin.get(name, (file, default_key))

    if not values.get("media_v4") and not values.get("media_v6"):
        out.append(Problem(*where("media_v4", "media-v4"),
                           "no media address: set media-v4 and/or media-v6 (or the options "
                           "--media-v4/--media-v6)"))
    if "port_min" in values or "port_max" in values:
        low = values.get("port_min", Config.port_min)
        high = values.get("port_max", Config.port_max)
        if not low < high:
            out.append(Problem(*where("port_min", "ports"), f"{low}-{high}: need MIN < MAX"))
    if any(t == "tls" for t, _ in values.get("sip_listen_only", ())) and not (
            values.get("tls_cert") and values.get("tls_key")):
        out.append(Problem(*where("sip_listen", "sip-listen"),
                           "a tls: listener needs tls-cert and tls-key"))
    if ("tls_cert" in values) != ("tls_key" in values):
        out.append(Problem(*where("tls_cert" if "tls_cert" in values else "tls_key",
                                  "tls-cert"), "tls-cert and tls-key go together"))
    if values.get("users") is not None and values.get("registrar_upstream") is not None:
        out.append(Problem(*where("registrar_upstream", "registrar-upstream"),
                           "a local registrar (users) or an upstream one, not both"))
    if not values.get("allow_remote_control"):
        for name in ("ng_listen", "metrics_listen"):
            ep = values.get(name)
            if ep is not None and not ep.host.is_loopback:
                out.append(Problem(*where(name, name.replace("_", "-")),
                                   f"{ep} is not a loopback address: set "
                                   f"allow-remote-control = true to serve it there"))
    return out

