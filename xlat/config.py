"""The daemon's configuration: TOML file values overridden by command-line options."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from xlat.addr import AddressError, Endpoint, IPAddress, parse_ip
from xlat.media.datapath import Latch

DEFAULT_CONTROL = Path("/run/xlat/control.sock")
DEFAULT_BPFFS = Path("/sys/fs/bpf/xlat")
SIP_PORT = 5060
DNS_PORT = 53
SIP_TRANSPORTS = ("udp", "tcp", "tls")  # prefixes of --sip-listen entries


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names it."""


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
    """Everything ``xlat run`` needs. Defaults follow DESIGN.md's CLI section."""

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
    datapath: str = "ebpf"  # "ebpf" | "userspace"
    fallback_relay: bool = False  # ebpf: also bind relay sockets for packets passed up
    delete_delay: float = 10.0
    idle_timeout: float = 60.0
    latch: Latch = Latch.LEARN
    rate_limit_pps: int = 2000  # per flow; a forged SDP cannot aim a flood anywhere
    sip_rate: int = 200  # SIP packets/s per IPv4 source or IPv6 /64
    nat64_prefixes: tuple[str, ...] = ("64:ff9b::/96",)
    keep_datapath: bool = False
    bpffs: Path = DEFAULT_BPFFS
    control: Path = DEFAULT_CONTROL
    log_level: str = "info"

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

    def validate(self) -> Config:
        if not self.media:
            raise ConfigError("no media address: give --media-v4 and/or --media-v6")
        if not (1024 <= self.port_min < self.port_max <= 65535):
            raise ConfigError(f"--ports {self.port_min}-{self.port_max}: need 1024 <= MIN < MAX")
        if self.datapath not in ("ebpf", "userspace"):
            raise ConfigError(f"datapath must be ebpf or userspace, not {self.datapath!r}")
        for value, name in ((self.delete_delay, "delete-delay"), (self.idle_timeout, "timeout")):
            if value < 0:
                raise ConfigError(f"{name} must not be negative")
        tls = any(t == "tls" for t, _ in self.sip_listen_only)
        if tls and (self.tls_cert is None or self.tls_key is None):
            raise ConfigError("--sip-listen tls:... needs --tls-cert and --tls-key")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        for path in (self.tls_cert, self.tls_key, self.tls_ca):
            if path is not None and not path.is_file():
                raise ConfigError(f"{path}: no such file")
        return self


def parse_ports(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit():
        raise ConfigError(f"ports must be MIN-MAX, got {text!r}")
    return int(lo), int(hi)


def parse_media(text: str, version: int) -> IPAddress:
    try:
        addr = parse_ip(text)
    except AddressError as e:
        raise ConfigError(str(e)) from None
    if addr.version != version:
        raise ConfigError(f"{text} is not an IPv{version} address")
    return addr


def parse_sip_listen(items: list[str]) -> tuple[tuple[Endpoint, ...] | None,
                                               tuple[tuple[str, Endpoint], ...]]:
    """``--sip-listen`` entries: plain ``A:P`` (UDP and TCP) and ``udp:|tcp:|tls:A:P``;
    ``none`` alone turns SIP off."""
    if items == ["none"]:
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


def parse_dns_server(text: str) -> Endpoint:
    """``ADDR`` or ``ADDR:PORT`` (IPv6 bracketed when a port follows)."""
    try:
        return Endpoint(parse_ip(text), DNS_PORT)
    except AddressError:
        return parse_listen(text)


def parse_family(value: Any) -> int:
    text = str(value).lower().removeprefix("ipv")
    if text not in ("4", "6"):
        raise ConfigError(f"prefer-family must be ipv4 or ipv6, not {value!r}")
    return int(text)


def parse_listen(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except AddressError as e:
        raise ConfigError(str(e)) from None


def build(file: Path | None = None, **options: Any) -> Config:
    """Config from an optional TOML file, then non-None ``options`` (strings as the
    CLI takes them) on top. Raises ConfigError naming the bad value."""
    raw: dict[str, Any] = {}
    if file is not None:
        try:
            raw = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{file}: {e}") from None
    raw.update({k.replace("-", "_"): v for k, v in options.items() if v not in (None, ())})
    known = ({f.name for f in fields(Config)} | {"ports"}) - {"sip_listen_only"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        kw[key] = _convert(key, value)
    if "ports" in kw:
        kw["port_min"], kw["port_max"] = kw.pop("ports")
    if "sip_listen" in kw:
        kw["sip_listen"], kw["sip_listen_only"] = kw["sip_listen"]
    return Config(**kw).validate()


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _convert(key: str, value: Any) -> Any:
    match key:
        case "media_v4":
            return tuple(parse_media(str(v), 4) for v in _as_list(value))
        case "media_v6":
            return tuple(parse_media(str(v), 6) for v in _as_list(value))
        case "ports":
            return parse_ports(str(value))
        case "sip_listen":
            return parse_sip_listen([str(v) for v in _as_list(value)])
        case "dns_servers":
            return tuple(parse_dns_server(str(v)) for v in _as_list(value))
        case "prefer_family":
            return parse_family(value)
        case "tls_cert" | "tls_key" | "tls_ca":
            return Path(value)
        case "ng_listen":
            return None if value == "none" else parse_listen(str(value))
        case "routes":
            return tuple(Route.parse(str(v)) for v in _as_list(value))
        case "interfaces" | "domains" | "nat64_prefixes":
            return tuple(str(v) for v in _as_list(value))
        case "bpffs" | "control":
            return Path(value)
        case "latch":
            try:
                return Latch[str(value).upper()]
            except KeyError:
                raise ConfigError(f"latch must be off, learn or strict, not {value!r}") from None
        case "ng_interfaces":
            return {str(k): int(v) for k, v in dict(value).items()}
        case "delete_delay" | "idle_timeout":
            return float(value)
        case "port_min" | "port_max" | "rate_limit_pps" | "sip_rate":
            return int(value)
        case _:
            return value
