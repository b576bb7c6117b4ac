"""The kernel datapath: ``bpf/xlat.c`` at TC ingress, flows in pinned BPF maps.

bcc compiles and loads the program (``BPF.SCHED_CLS``); pyroute2 attaches it as a
direct-action ``bpf`` filter named ``xlat`` on the clsact ingress hook of each media
interface. Two maps are pinned under ``bpffs`` so a restarted daemon adopts live flows:
``flows`` (hash: relay address:port -> rewrite, latching, rate cap, soft state,
counters) and ``reasons`` (per-CPU packets/bytes per reason a packet was not forwarded).
The C headers are the single source of the layouts (bcc's generated Key/Leaf), the
reason slots (``bpf/reasons.h``, read by ``xlat.media.reasons``) and the flag bits (``bpf/maps.h``).

Everything runs in the caller's network namespace (``ip netns exec <gw> xlat run``).
Bringing it up fails closed, in an order that changes nothing in the kernel before the
last step can fail: privileges and interfaces (``require``), a bpffs (``mount_bpffs``),
compile and verify (``EbpfDatapath(..., attach=False)``), and only then the tc filters
(``attach``). Every error names its cause and its fix in one line.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import functools
import os
import platform
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xlat.addr import Endpoint
from xlat.media import reasons
from xlat.media.datapath import DropCounter, Flow, FlowCounters, Latch

# Package data (top-level bpf/, shipped as xlat/bpf): bcc compiles a file path whose
# #includes sit beside it, so this is a real directory, never a zip member.
BPF_DIR = Path(str(resources.files("xlat") / "bpf"))
BPF_SOURCE = BPF_DIR / "xlat.c"
DEFAULT_BPFFS = Path("/sys/fs/bpf/xlat")
BPFFS_ROOT = Path("/sys/fs/bpf")  # where systemd (and Cilium) mount the bpf filesystem
MODULES = Path("/lib/modules")
# bpf/xlat.c needs bpf_redirect_neigh() with a next hop (5.10) and BPF_F_NO_PREALLOC
# hashes with batch operations: headers older than this cannot build it
MIN_HEADERS = (5, 10)
PROG_NAME = "xlat"  # function name in xlat.c and TCA_BPF_NAME of our filters
MAP_NAMES = ("flows", "reasons")

TC_INGRESS = 0xFFFFFFF2  # clsact ingress hook (TC_H_CLSACT:TC_H_MIN_INGRESS)
TC_EGRESS = 0xFFFFFFF3
TC_PRIO = 0xC0DE  # where a fresh filter goes; leftovers are replaced where they are
TC_HANDLE = 1
BPF_FS_MAGIC = 0xCAFE4A11
IFF_UP = 0x1
# capability bits (linux/capability.h) the kernel path needs
CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
BATCH_DUMP = 4096  # entries per BPF_MAP_LOOKUP_BATCH call
_V4_MAPPED = bytes(10) + b"\xff\xff"
_BATCH_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, 524)  # 524: kernel ENOTSUPP

_libc = ct.CDLL(None, use_errno=True)


class EbpfError(RuntimeError):
    """The kernel side refused something; the message says what and where."""


class BpffsError(EbpfError):
    """The pin directory is not on a bpf filesystem."""


class PinnedMapMismatch(EbpfError):
    """A pinned map left by another xlat version has a different layout."""


class PrivilegeError(EbpfError):
    """The process lacks root or a capability the kernel path needs."""


class InterfaceError(EbpfError):
    """An interface to attach to is missing or down."""


class HeadersError(EbpfError):
    """The kernel headers bcc compiles against are missing or unusable."""


class ProgramError(EbpfError):
    """bpf/xlat.c did not compile, or the verifier refused it."""


# ---- what the C headers say ----------------------------------------------------------


@functools.cache
def _flag(name: str) -> int:
    """A ``#define FLOW_F_*`` value from ``bpf/maps.h``."""
    m = re.search(rf"#define\s+{name}\s+(0x[0-9a-fA-F]+|\d+)", (BPF_DIR / "maps.h").read_text())
    if m is None:
        raise EbpfError(f"{name} not defined in {BPF_DIR / 'maps.h'}")
    return int(m[1], 0)


def _latch_flags(latch: Latch) -> int:
    """``flow_value.flags`` for a latch mode."""
    if latch is Latch.OFF:
        return 0
    return _flag("FLOW_F_LEARN" if latch is Latch.LEARN else "FLOW_F_STRICT")


# ---- small kernel helpers ------------------------------------------------------------


def is_bpffs(path: Path) -> bool:
    """Is ``path`` (or, if missing, its nearest existing parent) on a bpf filesystem?"""
    while not path.exists():
        path = path.parent
    buf = ct.create_string_buffer(256)  # struct statfs; f_type is the first long
    if _libc.statfs(str(path).encode(), buf) != 0:
        return False
    return ct.c_long.from_buffer(buf).value == BPF_FS_MAGIC


def effective_capabilities(status: Path = Path("/proc/self/status")) -> int:
    """The CapEff bit mask of this process."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def missing_capabilities(mount: bool, caps: int | None = None) -> list[str]:
    """What the kernel path needs and ``caps`` (default: this process's CapEff) lacks:
    tc filters and nftables need CAP_NET_ADMIN; loading the program CAP_BPF and
    CAP_PERFMON (the verifier's checks for unprivileged pointer use), each covered by
    CAP_SYS_ADMIN; mounting a bpffs (``mount``) CAP_SYS_ADMIN."""
    have = effective_capabilities() if caps is None else caps
    needs = [("CAP_NET_ADMIN",), ("CAP_BPF", "CAP_SYS_ADMIN"), ("CAP_PERFMON", "CAP_SYS_ADMIN")]
    if mount:
        needs.append(("CAP_SYS_ADMIN",))
    missing = [
        " or ".join(alternatives)
        for alternatives in needs
        if not any(have >> CAPABILITIES[c] & 1 for c in alternatives)
    ]
    return list(dict.fromkeys(missing))


def privilege_problem(mount: bool) -> str | None:
    """One line naming what is missing and how to get it, or None."""
    missing = missing_capabilities(mount)
    if not missing:
        return None
    who = "not root" if os.geteuid() != 0 else "root without all capabilities"
    return (f"{who} (uid {os.geteuid()}): lacking {', '.join(missing)}; fix: run xlat as "
            "root, or give it these capabilities (systemd: AmbientCapabilities=)")


def _version_tuple(release: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def kernel_headers(release: str | None = None, modules: Path = MODULES) -> tuple[bool, str]:
    """Can bcc compile bpf/xlat.c against /lib/modules/RELEASE/{build,source}? (ok,
    detail with the fix when not ok). Headers of another release than the running
    kernel are usable when they are not older than MIN_HEADERS and not newer than the
    kernel (the program uses only uapi that is stable since then; the verifier checks
    the rest): Debian's linux-headers-amd64 on a newer kernel is such a case."""
    release = release or platform.release()
    build, source = modules / release / "build", modules / release / "source"
    fix = (f"apt-get install linux-headers-amd64 and link {build} to "
           "/usr/src/linux-headers-*-amd64 and source to the -common tree (make setup does)")
    for path in (build, source):
        try:
            path.stat()
        except FileNotFoundError:
            return False, f"{path} missing; fix: {fix}"
        except OSError as e:  # e.g. EACCES under a unit with ProtectKernelModules=yes
            return False, f"{path}: {e.strerror}; fix: let xlat read /lib/modules and /usr/src"
    uts = build / "include" / "generated" / "utsrelease.h"
    try:
        m = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts.read_text())
    except OSError as e:
        return False, f"{uts}: {e.strerror}, not a prepared header tree; fix: {fix}"
    if m is None:
        return False, f"{uts} names no UTS_RELEASE; fix: {fix}"
    headers = m[1]
    got, running = _version_tuple(headers), _version_tuple(release)
    if got < MIN_HEADERS:
        return False, (f"headers {headers} are older than "
                       f"{'.'.join(map(str, MIN_HEADERS))}, which bpf/xlat.c needs; fix: {fix}")
    if got > running:
        return False, (f"headers {headers} are newer than the running kernel {release}; "
                       f"fix: install the headers of {release} and link them at {build}")
    if headers == release:
        return True, f"headers {headers} match the running kernel ({build})"
    return True, (f"headers {headers} for running kernel {release}: usable (>= "
                  f"{'.'.join(map(str, MIN_HEADERS))}, not newer than the kernel)")


def mount_bpffs(pin_dir: Path) -> Path | None:
    """Make ``pin_dir`` be on a bpf filesystem: mount one at /sys/fs/bpf when the pin
    directory is under it and it is not a bpffs (as systemd and Cilium do), else at the
    pin directory itself. Returns the mount point, or None when nothing was needed.
    Inside ``ip netns exec`` the mount is private to that process's mount namespace."""
    if is_bpffs(pin_dir):
        return None
    target = BPFFS_ROOT if pin_dir.is_relative_to(BPFFS_ROOT) else pin_dir
    if target == BPFFS_ROOT and is_bpffs(BPFFS_ROOT):  # pin_dir is another mount below
        target = pin_dir
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BpffsError(f"cannot create {target} for a bpffs: {e.strerror}; fix: "
                         "--bpffs DIR on a writable file system") from None
    if _libc.mount(b"bpf", str(target).encode(), b"bpf", 0, b"mode=0700") != 0:
        err = ct.get_errno()
        raise BpffsError(f"mount -t bpf bpf {target}: {os.strerror(err)}; fix: run as root "
                         f"(CAP_SYS_ADMIN), or mount one there first") from None
    return target


def resolve_interfaces(ipr: Any, names: Sequence[str]) -> dict[str, int]:
    """name -> ifindex of each interface, which must exist and be up."""
    links = {link.get_attr("IFLA_IFNAME"): link for link in ipr.get_links()}
    out = {}
    for name in names:
        link = links.get(name)
        if link is None:
            there = ", ".join(sorted(n for n in links if n != "lo")) or "none"
            raise InterfaceError(f"no interface {name!r} in this network namespace (there "
                                 f"are: {there}); fix: --interface")
        if not link["flags"] & IFF_UP:
            raise InterfaceError(f"interface {name} is down; fix: ip link set {name} up, "
                                 "or leave it out of --interface")
        out[name] = int(link["index"])
    return out


def require(interfaces: Sequence[str], pin_dir: Path) -> None:
    """What must hold before anything is compiled or changed in the kernel: privileges
    (with CAP_SYS_ADMIN if a bpffs must be mounted), interfaces that exist and are up,
    usable kernel headers. Raises the EbpfError subclass naming the first problem."""
    problem = privilege_problem(mount=not is_bpffs(pin_dir))
    if problem:
        raise PrivilegeError(problem)
    with IPRoute() as ipr:
        resolve_interfaces(ipr, interfaces)
    ok, detail = kernel_headers()
    if not ok:
        raise HeadersError(f"kernel headers: {detail}")


def _fdinfo(fd: int) -> dict[str, str]:
    lines = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


@functools.lru_cache(maxsize=4096)
def _addr16(host: IPv4Address | IPv6Address) -> bytes:
    """16-byte map form: IPv6 as is, IPv4 v4-mapped."""
    return _V4_MAPPED + host.packed if host.version == 4 else host.packed


def _endpoint(addr: Any, port_be: int) -> Endpoint:
    raw = bytes(addr)
    port = socket.ntohs(port_be)
    if raw.startswith(_V4_MAPPED):
        return Endpoint(IPv4Address(raw[12:]), port)
    return Endpoint(IPv6Address(raw), port)


def _counters(value: Any) -> FlowCounters:
    return FlowCounters(
        packets=value.packets,
        bytes=value.bytes,
        last_seen=value.last_seen_ns / 1e9,
        to=_endpoint(value.dst_addr, value.dst_port),
    )


@functools.lru_cache(maxsize=65536)
def _key_bytes(ep: Endpoint) -> bytes:
    """``struct flow_key`` of an endpoint: address, port (network order), zero pad."""
    return _addr16(ep.host) + ep.port.to_bytes(2, "big") + bytes(2)


def _set_endpoint(value: Any, addr_field: str, port_field: str, ep: Endpoint) -> None:
    ct.memmove(getattr(value, addr_field), _addr16(ep.host), 16)
    setattr(value, port_field, socket.htons(ep.port))


# ---- the datapath ----------------------------------------------------------------------


class EbpfDatapath:
    """``Datapath`` on the kernel's TC ingress hook (see the module doc).

    ``interfaces``: where media arrives (clsact ingress of each). ``bpffs``: pin
    directory, created if missing, on a mounted bpf filesystem. Adopts pinned maps of the
    same layout and replaces its own leftover filters (hitless restart).
    """

    behind_guard = False  # TC ingress: it redirects before netfilter sees the packet
    close_blocks = True  # detaching uses pyroute2

    def __init__(
        self,
        interfaces: Sequence[str],
        bpffs: Path = DEFAULT_BPFFS,
        name: str = "ebpf",
        attach: bool = True,
    ) -> None:
        from bcc import BPF  # Debian's python3-bpfcc; imported here so `xlat check` can say

        self.name = name
        self.bpffs = Path(bpffs)
        if not is_bpffs(self.bpffs):
            raise BpffsError(f"{self.bpffs} is not on a bpf filesystem; fix: mount -t bpf "
                             f"bpf {self.bpffs} (xlat run mounts one itself)")
        self._lock = threading.Lock()  # pyroute2 handle: the daemon's and netwatch's threads
        self._ipr = IPRoute()
        self._attached: dict[str, int] = {}  # name -> ifindex our filter is on
        try:
            self._wanted = resolve_interfaces(self._ipr, interfaces)
            self.bpffs.mkdir(parents=True, exist_ok=True)
            pinned = {m for m in MAP_NAMES if (self.bpffs / m).exists()}
            self._bpf = compile_program(self.bpffs)
        except BaseException:
            self._ipr.close()
            raise
        try:
            self._flows = self._bpf[b"flows"]
            self._reasons = self._bpf[b"reasons"]
            self._epoch = self._bpf[b"link_epoch"]
            self._check_layout()
            self._fn = load_program(self._bpf, BPF.SCHED_CLS)
            if attach:
                self.attach()
        except BaseException:
            self._bpf.cleanup()
            for map_name in set(MAP_NAMES) - pinned:  # a failed start leaves no new pin
                (self.bpffs / map_name).unlink(missing_ok=True)
            self._ipr.close()
            raise

    def attach(self) -> None:
        """Put the program on every interface given to the constructor."""
        for name, idx in self._wanted.items():
            self.attach_link(name, idx)

    @property
    def attached(self) -> dict[str, int]:
        """name -> ifindex of the interfaces our filter is on."""
        return dict(self._attached)

    def attach_link(self, name: str, index: int) -> None:
        """Attach to interface ``name`` (now ``index``): a new interface, or one
        re-created with a new ifindex, whose old next hops are then looked up again."""
        with self._lock:
            self._attach(index)
            self._attached[name] = index
        self.next_link_epoch()

    def link_gone(self, name: str) -> None:
        """Interface ``name`` vanished (its filter with it): forget it, and have every
        flow look its next hop up again, so none is sent to the gone ifindex."""
        with self._lock:
            self._attached.pop(name, None)
        self.next_link_epoch()

    def next_link_epoch(self) -> None:
        """Invalidate every cached next hop (bpf/fib.h): the next packet of each flow
        does a fresh bpf_fib_lookup."""
        key = self._epoch.Key(0)
        self._epoch[key] = self._epoch.Leaf((self._epoch[key].value + 1) & 0xFF)

    # ---- Datapath protocol ----------------------------------------------------------

    def install(self, flows: Sequence[Flow]) -> None:
        """Add or replace flows in one batch. A replaced flow keeps packets/bytes/
        last_seen (read just before; packets counted in between are lost) but restarts
        latching and its rate bucket. Installing counts as activity for the idle timer.
        The daemon keeps no copy of the keys: whether a flow exists is asked of the map
        (one plain lookup syscall per flow, then one batch update)."""
        from bcc.libbcc import lib

        if not flows:
            return
        now = time.monotonic_ns()
        keys = (self._flows.Key * len(flows))()
        values = (self._flows.Leaf * len(flows))()
        old = self._flows.Leaf()
        fd = self._flows.map_fd
        for i, flow in enumerate(flows):
            keys[i] = self._key(flow.match)
            values[i] = self._value(flow, now)
            value = values[i]  # a view into the array
            if lib.bpf_lookup_elem(fd, ct.byref(keys[i]), ct.byref(old)) == 0:
                value.packets, value.bytes = old.packets, old.bytes
                value.last_seen_ns = old.last_seen_ns
        self._update_batch(keys, values)

    def remove(self, matches: Sequence[Endpoint]) -> None:
        """Delete flows in one batch; unknown matches are ignored. Forwarding stops at
        once (the next packet misses the map)."""
        if not matches:
            return
        keys = (self._flows.Key * len(matches))(*(self._key(m) for m in matches))
        self._delete_batch(keys)

    def refresh(self, flows: Sequence[Flow]) -> None:
        """Nothing to do: the kernel's soft state is refreshed by the traffic itself
        (last_seen_ns), and a flow without traffic is meant to expire."""

    def counters(self, matches: Sequence[Endpoint] | None = None) -> dict[Endpoint, FlowCounters]:
        """What the kernel counted per flow and where it sends now: for ``matches`` (one
        lookup each, or one dump when they are many), or for every flow (``None``).
        Unknown matches are left out."""
        if matches is None or len(matches) > BATCH_DUMP:
            wanted = None if matches is None else set(matches)
            entries = ((_endpoint(k.addr, k.port), v) for k, v in self._dump())
            return {m: _counters(v) for m, v in entries if wanted is None or m in wanted}
        from bcc.libbcc import lib

        out = {}
        value = self._flows.Leaf()
        for match in matches:
            if lib.bpf_lookup_elem(self._flows.map_fd, ct.byref(self._key(match)),
                                   ct.byref(value)) == 0:
                out[match] = _counters(value)
        return out

    def drops(self) -> dict[str, DropCounter]:
        """Every reason but ``forwarded``, summed over CPUs (zeros included)."""
        out = {}
        for i, reason in enumerate(reasons.counted_by("ebpf")):
            if reason.name == "forwarded":
                continue
            per_cpu = self._reasons.getvalue(self._reasons.Key(i))
            out[reason.name] = DropCounter(
                packets=sum(c.packets for c in per_cpu), bytes=sum(c.bytes for c in per_cpu)
            )
        return out

    def forwarded(self) -> DropCounter:
        """Packets/bytes redirected by the kernel, summed over CPUs."""
        per_cpu = self._reasons.getvalue(self._reasons.Key(0))
        return DropCounter(sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))

    def close(self, keep: bool) -> None:
        """``keep``: leave filters attached and maps pinned, so media keeps flowing
        until a restarted daemon adopts them. Otherwise detach our filters (and clsact,
        when nothing else uses it) and unpin the maps."""
        try:
            if not keep:
                for idx in self._attached.values():
                    self._detach(idx)
                for map_name in MAP_NAMES:
                    (self.bpffs / map_name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # not empty, or a mount point
                    self.bpffs.rmdir()
        finally:
            self._bpf.cleanup()
            self._ipr.close()

    # ---- measuring --------------------------------------------------------------------

    def test_run(self, frame: bytes, repeat: int = 1) -> tuple[int, int, bytes]:
        """Run the program on ``frame`` (Ethernet) with BPF_PROG_TEST_RUN, in the
        caller's netns (FIB lookups use its routes; the redirect is not carried out).
        ``repeat`` runs reuse the same, already rewritten, packet.
        Returns (TC_ACT_* verdict, mean duration in ns as the kernel measured it,
        frame out). Counters and flows are updated as for real traffic.
        """
        return prog_test_run(self._fn.fd, frame, repeat)

    # ---- maps ---------------------------------------------------------------------------

    def _check_layout(self) -> None:
        """bcc adopts a pinned map whatever its layout: compare it with the C types."""
        for map_name in MAP_NAMES:
            table = self._bpf[map_name.encode()]
            leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: one CPU's value
            want = {
                "map_type": str(table.ttype),
                "key_size": str(ct.sizeof(table.Key)),
                "value_size": str(ct.sizeof(leaf)),
                "max_entries": str(table.max_entries),
            }
            info = _fdinfo(table.map_fd)
            got = {k: info.get(k, "?") for k in want}
            if got != want:
                raise PinnedMapMismatch(
                    f"pinned map {self.bpffs / map_name} has {got}, this xlat needs {want}; "
                    f"fix: stop the xlat that uses it, or rm {self.bpffs / map_name}"
                )
        if self._reasons.max_entries != len(reasons.counted_by("ebpf")):
            raise EbpfError(
                f"reasons.h lists {len(reasons.counted_by('ebpf'))} eBPF reasons, the map has "
                f"{self._reasons.max_entries}: parse error in reasons.h"
            )

    def _key(self, ep: Endpoint) -> Any:
        return self._flows.Key.from_buffer_copy(_key_bytes(ep))

    def _value(self, flow: Flow, now_ns: int) -> Any:
        if flow.source.family != flow.to.family:
            raise ValueError(
                f"flow {flow.match}: source {flow.source} and to {flow.to} differ in family"
            )
        if flow.latch is Latch.STRICT and flow.expect is None:
            raise ValueError(f"flow {flow.match}: strict latching needs `expect`")
        v = self._flows.Leaf()
        v.family = flow.to.family
        _set_endpoint(v, "src_addr", "src_port", flow.source)
        _set_endpoint(v, "dst_addr", "dst_port", flow.to)
        if flow.expect is not None:
            _set_endpoint(v, "expect_addr", "expect_port", flow.expect)
        if flow.reverse is not None:
            _set_endpoint(v.reverse, "addr", "port", flow.reverse)
        v.flags = _latch_flags(flow.latch)
        v.rate_pps = flow.rate_limit_pps
        v.idle_timeout_ns = int(flow.idle_timeout * 1e9)
        v.installed_ns = now_ns
        return v

    def _update_batch(self, keys: Any, values: Any) -> None:
        from bcc.libbcc import lib

        count = ct.c_uint32(len(keys))
        if lib.bpf_update_batch(self._flows.map_fd, keys, values, ct.byref(count)) == 0:
            return
        err = ct.get_errno()
        if err not in _BATCH_UNSUPPORTED:
            raise EbpfError(f"flow map update ({len(keys)} flows): {os.strerror(err)}")
        for i in range(count.value, len(keys)):  # kernels without batch operations
            self._flows[keys[i]] = values[i]

    def _delete_batch(self, keys: Any) -> None:
        """BPF_MAP_DELETE_BATCH stops at the first missing key: skip it, go on."""
        from bcc.libbcc import lib

        start = 0
        size = ct.sizeof(self._flows.Key)
        while start < len(keys):
            count = ct.c_uint32(len(keys) - start)
            ptr = ct.byref(keys, start * size)
            if lib.bpf_delete_batch(self._flows.map_fd, ptr, ct.byref(count)) == 0:
                return
            err = ct.get_errno()
            if err == errno.ENOENT:
                start += count.value + 1
            elif err in _BATCH_UNSUPPORTED and count.value == 0:
                for k in keys[start:]:
                    with contextlib.suppress(KeyError):
                        del self._flows[k]
                return
            else:
                raise EbpfError(f"flow map delete: {os.strerror(err)}")

    def _dump(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value) of the flow map, BATCH_DUMP at a time (copies)."""
        from bcc.libbcc import lib

        keys = (self._flows.Key * BATCH_DUMP)()
        values = (self._flows.Leaf * BATCH_DUMP)()
        token, next_token = ct.c_uint32(), ct.c_uint32()
        first = True
        while True:
            count = ct.c_uint32(BATCH_DUMP)
            res = lib.bpf_lookup_batch(
                self._flows.map_fd,
                None if first else ct.byref(token),
                ct.byref(next_token),
                keys,
                values,
                ct.byref(count),
            )
            err = ct.get_errno()
            if res != 0 and err in _BATCH_UNSUPPORTED and first:
                yield from list(self._flows.items())
                return
            for i in range(count.value):
                yield (
                    type(keys[i]).from_buffer_copy(keys[i]),
                    type(values[i]).from_buffer_copy(values[i]),
                )
            if res != 0:
                if err == errno.ENOENT:
                    return
                raise EbpfError(f"flow map dump: {os.strerror(err)}")
            token.value, first = next_token.value, False

    # ---- tc -----------------------------------------------------------------------------

    def _filters(self, idx: int, parent: int) -> list[Any]:
        """The real filters (not the per-prio chain headers) on one hook."""
        return [
            m
            for m in self._ipr.get_filters(index=idx, parent=parent)
            if m.get_attr("TCA_OPTIONS") is not None
        ]

    def _ours(self, idx: int) -> list[tuple[int, int]]:
        """(prio, handle) of our filters on the ingress hook, by TCA_BPF_NAME."""
        out = []
        for m in self._filters(idx, TC_INGRESS):
            bpf_name = m.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_NAME") or ""
            if m.get_attr("TCA_KIND") == "bpf" and bpf_name.split(":")[0] == PROG_NAME:
                out.append((m["info"] >> 16, m["handle"]))
        return out

    def _attach(self, idx: int) -> None:
        """Put our program on ``idx``'s ingress: replace a leftover of ours in place
        (no gap in forwarding), else add one; extra leftovers are deleted."""
        try:
            self._ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise EbpfError(f"clsact on ifindex {idx}: {e}") from e
        spec = dict(
            fd=self._fn.fd, name=PROG_NAME, parent=TC_INGRESS, classid=1, direct_action=True
        )
        ours = self._ours(idx)
        try:
            if ours:
                prio, handle = ours.pop(0)
                self._ipr.tc("replace-filter", "bpf", idx, handle, prio=prio, **spec)
            else:
                self._ipr.tc("add-filter", "bpf", idx, TC_HANDLE, prio=TC_PRIO, **spec)
            for prio, handle in ours:
                self._ipr.tc("del-filter", "bpf", idx, handle, prio=prio, parent=TC_INGRESS)
        except NetlinkError as e:
            raise EbpfError(f"attaching {PROG_NAME} to ifindex {idx}: {e}") from e

    def _detach(self, idx: int) -> None:
        """Delete our filters; delete clsact only if no other filter is left on it."""
        with contextlib.suppress(NetlinkError):  # interface gone: nothing left to do
            for prio, handle in self._ours(idx):
                self._ipr.tc("del-filter", "bpf", idx, handle, prio=prio, parent=TC_INGRESS)
            if not self._filters(idx, TC_INGRESS) and not self._filters(idx, TC_EGRESS):
                self._ipr.tc("del", "clsact", idx)


def compile_program(pin_dir: Path | None) -> Any:
    """bcc's BPF object for bpf/xlat.c (maps pinned in ``pin_dir``; private if None)."""
    from bcc import BPF

    try:
        return BPF(src_file=str(BPF_SOURCE).encode(), cflags=_cflags(pin_dir))
    except Exception as e:  # bcc raises plain Exception; clang printed the details
        raise ProgramError(f"{BPF_SOURCE} does not compile ({e}); fix: check the kernel "
                           "headers with `xlat check`") from None


def load_program(bpf: Any, prog_type: int) -> Any:
    """Load (verify) the ``xlat`` function as ``prog_type``."""
    try:
        return bpf.load_func(PROG_NAME.encode(), prog_type)
    except Exception as e:  # bcc printed the verifier log
        if "Permission denied" in str(e) or "Operation not permitted" in str(e):
            raise PrivilegeError(f"the kernel refused to load {PROG_NAME} ({e}); fix: run "
                                 "as root with CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)"
                                 ) from None
        raise ProgramError(f"the verifier refused {PROG_NAME} ({e}; its log is above); "
                           "fix: `xlat check`, or report it with that log") from None


def _cflags(pin_dir: Path | None) -> list[str]:
    flags = [f"-I{BPF_DIR}"]
    if pin_dir is not None:
        flags.append(f'-DXLAT_PIN_DIR="{pin_dir}"')
    return flags


# ---- BPF_PROG_TEST_RUN --------------------------------------------------------------------


class _TestRunOpts(ct.Structure):
    """libbpf's struct bpf_test_run_opts (libbpf >= 0.8 layout)."""

    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


def prog_test_run(prog_fd: int, frame: bytes, repeat: int) -> tuple[int, int, bytes]:
    """BPF_PROG_TEST_RUN of program ``prog_fd`` on ``frame``, as ``EbpfDatapath.test_run``
    says; usable on any tc program (e.g. a baseline for what test_run itself costs)."""
    libbpf = ct.CDLL("libbpf.so.1", use_errno=True)
    data_in = ct.create_string_buffer(frame, len(frame))
    data_out = ct.create_string_buffer(len(frame) + 256)
    opts = _TestRunOpts(sz=ct.sizeof(_TestRunOpts), repeat=repeat)
    opts.data_in = ct.cast(data_in, ct.c_void_p)
    opts.data_size_in = len(frame)
    opts.data_out = ct.cast(data_out, ct.c_void_p)
    opts.data_size_out = len(data_out)
    if libbpf.bpf_prog_test_run_opts(prog_fd, ct.byref(opts)) != 0:
        raise EbpfError(f"BPF_PROG_TEST_RUN: {os.strerror(ct.get_errno())}")
    return opts.retval, opts.duration, data_out.raw[: opts.data_size_out]
