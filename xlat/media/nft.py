"""The nftables guard: table ``inet xlat`` admits allocated relay ports and nothing else.

The table's rules live in ``nft/xlat.nft`` (the single source; read it first). ``NftGuard``
loads that file in one transaction, fills its configuration sets, and keeps the
``relay4``/``relay6`` sets equal to the installed flows' ``match`` endpoints, each element
timing out ``idle_timeout + grace`` seconds after its last install/refresh — the kernel
closes the ports of a dead daemon by itself. It forwards nothing: ``counters()`` is empty.

Every change is one ``json_cmd`` batch (one netlink transaction). libnftables binds to the
network namespace of the calling thread when the guard is created, and never raises:
every return code is checked and turned into ``NftError``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import shutil
import socket
import string
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xlat.addr import Endpoint, IPAddress, parse_ip
from xlat.media import reasons
from xlat.media.datapath import DropCounter, Flow, FlowCounters

if TYPE_CHECKING:
    from xlat.config import Config

try:
    import nftables
except ImportError:  # reported by check_nft(); NftGuard needs it
    nftables = None

log = logging.getLogger("xlat")
RULESET = Path(str(resources.files("xlat") / "nft" / "xlat.nft"))  # package data (top-level nft/)
FAMILY = "inet"
TABLE = "xlat"
DROP_COUNTERS = tuple(r.name for r in reasons.counted_by("nft"))  # the ruleset's drop counters
# All strangers of a family together (not trusted, not a known peer) get this many times
# the per-source SIP rate: what the daemon parses of a many-source flood stays bounded.
STRANGER_FACTOR = 10
PEER_TIMEOUT = 600  # seconds a known peer stays in peers4/peers6 unless told again
NAMED_COUNTERS = ("to_stack", *DROP_COUNTERS)
_RELAY_SET = {4: "relay4", 6: "relay6"}
_PEER_SET = {4: "peers4", 6: "peers6"}
_CONFIG_SETS = ("media4", "media6", "relay_ports", "sip_listen4", "sip_listen6", "trusted4",
                "trusted6")

JsonCmd = dict[str, Any]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class NftError(RuntimeError):
    """nft refused a batch; the message is nft's own error output."""


class NftGuard:
    """Datapath that only guards: see the module docstring.

    Creating it over an existing ``inet xlat`` (a crashed daemon's leftover) adopts the
    table: its rules and configuration are replaced, its relay elements are kept.
    Raises NftError if the table cannot be loaded, ValueError on a bad argument.
    """

    name = "nft"

    def __init__(
        self,
        media: Sequence[IPAddress],
        port_min: int,
        port_max: int,
        sip_listen: Sequence[Endpoint] = (),
        sip_rate: int = 200,
        grace: float = 5.0,
        trusted: Sequence[IPNetwork] = (),
    ) -> None:
        if nftables is None:
            raise NftError("python3-nftables is not installed")
        if not 0 < port_min <= port_max <= 65535:
            raise ValueError(f"bad relay port range {port_min}-{port_max}")
        if sip_rate <= 0:
            raise ValueError(f"SIP rate must be positive, got {sip_rate}")
        self.grace = grace
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._layout = (tuple(media), port_min, port_max, tuple(sip_listen))
        self._script = load_script(*self._layout, sip_rate, trusted)
        _run_text(self._nft, self._script)

    def reconfigure(self, sip_rate: int, trusted: Sequence[IPNetwork]) -> None:
        """A new SIP rate limit and set of exempt sources (``systemctl reload``): the
        table's rules and configuration sets are replaced in one transaction, its relay
        elements kept."""
        if sip_rate <= 0:
            raise ValueError(f"SIP rate must be positive, got {sip_rate}")
        script = load_script(*self._layout, sip_rate, trusted)
        _run_text(self._nft, script)
        self._script = script

    def install(self, flows: Sequence[Flow]) -> None:
        """Admit each flow's ``match`` for ``idle_timeout + grace`` seconds."""
        self._batch(_cmds("add", _timed(flows, self.grace)))

    def remove(self, matches: Sequence[Endpoint]) -> None:
        """Close the ports. Deleting a missing element fails in nft, so each is added
        first in the same transaction: gone or not, it is absent afterwards."""
        keys = _keys(matches)
        self._batch(_cmds("add", keys) + _cmds("delete", keys))

    def refresh(self, flows: Sequence[Flow]) -> None:
        """Restart the timeouts. Re-adding an element does not reset its timer on every
        kernel, so: add (in case it expired), delete, add — one transaction."""
        add = _cmds("add", _timed(flows, self.grace))
        self._batch(add + _cmds("delete", _keys([f.match for f in flows])) + add)

    def know(self, hosts: Iterable[IPAddress]) -> None:
        """SIP peers the proxy talks to: out of the strangers' shared rate for
        PEER_TIMEOUT seconds (re-adding restarts the timer: delete, add)."""
        by_set: dict[str, list[Any]] = {}
        for host in dict.fromkeys(hosts):
            by_set.setdefault(_PEER_SET[host.version], []).append(str(host))
        timed = {name: [{"elem": {"val": h, "timeout": PEER_TIMEOUT}} for h in elems]
                 for name, elems in by_set.items()}
        self._batch(_cmds("add", timed) + _cmds("delete", by_set) + _cmds("add", timed))

    def counters(self, matches: Sequence[Endpoint] | None = None) -> dict[Endpoint, FlowCounters]:
        """No per-flow counters: the guard forwards nothing."""
        return {}

    def named_counters(self) -> dict[str, DropCounter]:
        """Every named counter of the table (``to_stack`` and the drop reasons)."""
        out = self._json([{"list": {"counters": {"family": FAMILY, "table": TABLE}}}])
        return {
            obj["counter"]["name"]: DropCounter(obj["counter"]["packets"], obj["counter"]["bytes"])
            for obj in out.get("nftables", [])
            if "counter" in obj
        }

    def drops(self) -> dict[str, DropCounter]:
        """The drop counters (``DROP_COUNTERS``: the NFT column of ``bpf/reasons.h``)."""
        named = self.named_counters()
        return {reason: named[reason] for reason in DROP_COUNTERS}

    def elements(self, family: int) -> dict[Endpoint, tuple[float, float]]:
        """The relay set of ``family`` (4 or 6): match -> (timeout, expires) in seconds."""
        cmd = {"list": {"set": {"family": FAMILY, "table": TABLE, "name": _RELAY_SET[family]}}}
        out = self._json([cmd])
        found: dict[Endpoint, tuple[float, float]] = {}
        for obj in out.get("nftables", []):
            for elem in obj.get("set", {}).get("elem", []):
                body = elem["elem"] if isinstance(elem, dict) and "elem" in elem else {"val": elem}
                host, port = body["val"]["concat"]
                found[Endpoint(parse_ip(host), port)] = (
                    body.get("timeout", 0),
                    body.get("expires", 0),
                )
        return found

    def present(self) -> bool:
        """Is the table still there? ``nft flush ruleset`` (every reload of Debian's
        nftables.service) deletes it with everything else."""
        cmd = {"list": {"counter": {"family": FAMILY, "table": TABLE, "name": "to_stack"}}}
        rc, _out, _err = self._nft.json_cmd({"nftables": [cmd]})
        return rc == 0

    def restore(self, flows: Sequence[Flow]) -> None:
        """Re-create the table as it was loaded, with ``flows``' relay elements (the
        ports the userspace relay serves). Its named counters start again from zero."""
        _run_text(self._nft, self._script)
        self.install(flows)

    def close(self, keep: bool) -> None:
        """Delete the table unless ``keep`` (a restarted daemon adopts it)."""
        if not keep:
            table = {"table": {"family": FAMILY, "name": TABLE}}
            self._batch([{"add": table}, {"delete": table}])

    def _batch(self, cmds: list[JsonCmd]) -> None:
        if cmds:
            self._json(cmds)

    def _json(self, cmds: list[JsonCmd]) -> dict[str, Any]:
        rc, out, err = self._nft.json_cmd({"nftables": cmds})
        _check(rc, err)
        return out if isinstance(out, dict) else {}


def trusted_sources(cfg: Config) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Sources the SIP rate limit spares: ``--trusted`` prefixes and every route target
    (a host name is resolved once, now; one that does not resolve is logged)."""
    from xlat.sip.uri import SipUri

    out = list(cfg.trusted)
    for route in cfg.routes:
        host = SipUri.parse(route.target).host.strip("[]")
        try:
            out.append(ipaddress.ip_network(host))
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        except OSError as e:
            log.warning("route target %s does not resolve (%s): its SIP is rate-limited; "
                        "give --trusted for it", host, e)
            continue
        out += [ipaddress.ip_network(str(info[4][0]).partition("%")[0]) for info in infos]
    return list(dict.fromkeys(out))


def load_script(
    media: Iterable[IPAddress],
    port_min: int,
    port_max: int,
    sip_listen: Iterable[Endpoint],
    sip_rate: int,
    trusted: Iterable[IPNetwork] = (),
    ruleset: Path = RULESET,
) -> str:
    """The nft script that (re)creates the table from ``ruleset`` with this configuration:
    flush the rules of a leftover table (elements stay), load the file, refill the
    configuration sets. The SIP rate limit covers the ``sip_listen`` addresses (an
    unspecified host: every address of its family) and spares ``trusted`` sources.
    Raises KeyError if the file uses an unknown placeholder."""
    body = string.Template(ruleset.read_text()).substitute(
        SIP_RATE=sip_rate, STRANGER_RATE=sip_rate * STRANGER_FACTOR)
    t = f"{FAMILY} {TABLE}"
    lines = [f"table {t}", f"flush table {t}", body]
    lines += [f"flush set {t} {name}" for name in _CONFIG_SETS]
    media, listen, trusted = list(media), set(sip_listen), set(trusted)
    config: dict[str, list[str]] = {
        "relay_ports": [f"{port_min}-{port_max}" if port_min < port_max else str(port_min)],
    }
    for family in (4, 6):
        config[f"media{family}"] = [str(a) for a in media if a.version == family]
        ports = {e.port: e.host.is_unspecified for e in listen if e.family == family}
        wildcard = {p for p, any_address in ports.items() if any_address}
        config[f"sip_listen{family}"] = sorted(  # a wildcard covers (overlaps) the others
            [f"{'0.0.0.0/0' if family == 4 else '::/0'} . {p}" for p in wildcard]
            + [f"{e.host} . {e.port}" for e in listen
               if e.family == family and e.port not in wildcard]
        )
        config[f"trusted{family}"] = sorted(str(n) for n in trusted if n.version == family)
    lines += [
        f"add element {t} {name} {{ {', '.join(values)} }}"
        for name, values in config.items()
        if values
    ]
    return "\n".join(lines) + "\n"


def check_nft() -> list[tuple[str, bool, str]]:
    """For ``xlat check``: (what, ok, detail) rows. The table is loaded in dry-run mode,
    so nothing changes in the kernel."""
    nft_path = shutil.which("nft")
    rows = [("nft binary", nft_path is not None,
             nft_path or "not on PATH; fix: apt-get install nftables")]
    if nftables is None:
        return [*rows, ("python3-nftables", False,
                        "import nftables failed; fix: apt-get install python3-nftables")]
    rows.append(("python3-nftables", True, str(Path(nftables.__file__).parent)))
    nft = nftables.Nftables()
    nft.set_dry_run(True)
    try:
        script = load_script([], 30000, 30001, [Endpoint.parse("0.0.0.0:5060")], 200)
        _run_text(nft, script)
    except (OSError, KeyError, NftError) as exc:
        return [*rows, ("nft table inet xlat", False, f"{exc}; fix: run as root "
                        "(CAP_NET_ADMIN) on a kernel with nf_tables")]
    return [*rows, ("nft table inet xlat", True, f"{RULESET} loads (dry run)")]


def _run_text(nft: Any, script: str) -> None:
    rc, _out, err = nft.cmd(script)
    _check(rc, err)


def _timed(flows: Sequence[Flow], grace: float) -> dict[str, list[Any]]:
    """Elements for the flows' matches, by relay set, timing out after idle_timeout +
    grace, in whole seconds rounded up: nft ignores a fractional timeout silently,
    which would leave a permanent element."""
    latest = {f.match: max(1, math.ceil(f.idle_timeout + grace)) for f in flows}
    return _by_set(latest, lambda m, t: {"elem": {"val": _key(m), "timeout": t}})


def _keys(matches: Sequence[Endpoint]) -> dict[str, list[Any]]:
    """Bare elements (no timeout) for the matches, by relay set."""
    return _by_set(dict.fromkeys(matches), lambda m, _: _key(m))


def _by_set(
    items: dict[Endpoint, Any], elem: Callable[[Endpoint, Any], Any]
) -> dict[str, list[Any]]:
    """Group by relay set; one element per match (deleting one twice in a batch fails)."""
    by_set: dict[str, list[Any]] = {}
    for match, value in items.items():
        by_set.setdefault(_RELAY_SET[match.family], []).append(elem(match, value))
    return by_set


def _key(match: Endpoint) -> dict[str, Any]:
    return {"concat": [str(match.host), match.port]}


def _cmds(verb: str, by_set: dict[str, list[Any]]) -> list[JsonCmd]:
    """One ``verb`` command per set (a command names one set)."""
    return [
        {verb: {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": elems}}}
        for name, elems in by_set.items()
    ]


def _check(rc: int, err: str) -> None:
    """Raise NftError with nft's messages (its output spans lines: message, the
    command, a caret line; only the messages are kept)."""
    if rc != 0:
        messages = [line.strip() for line in err.splitlines() if line.startswith("Error")]
        raise NftError("; ".join(messages) or err.strip() or f"nft failed (rc {rc})")
