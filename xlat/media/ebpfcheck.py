"""What ``xlat check`` reports for the eBPF datapath: privileges, bcc, kernel headers,
bpffs, forwarding sysctls, and that bpf/xlat.c compiles, verifies and attaches (in a
throw-away network namespace, touching nothing else)."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from xlat.media.ebpf import (
    BPF_SOURCE,
    BPFFS_ROOT,
    DEFAULT_BPFFS,
    PROG_NAME,
    TC_HANDLE,
    TC_INGRESS,
    TC_PRIO,
    EbpfError,
    ProgramError,
    compile_program,
    effective_capabilities,
    is_bpffs,
    kernel_headers,
    load_program,
    privilege_problem,
)


def check_kernel(bpffs: Path = DEFAULT_BPFFS) -> list[tuple[str, bool, str]]:
    """What ``xlat check`` reports for the eBPF datapath: (feature, ok, detail), the
    privileges first; every failing detail ends with its fix. Touches nothing outside
    a throw-away network namespace."""
    problem = privilege_problem(mount=not is_bpffs(bpffs))
    caps = f"CapEff {effective_capabilities():016x}"
    results = [("privileges", problem is None, problem or f"uid {os.geteuid()}, {caps}")]
    try:
        import bcc
    except ImportError as e:
        return [*results,
                ("bcc", False, f"cannot import bcc ({e}); fix: apt-get install python3-bpfcc")]
    results.append(("bcc", True, f"python3-bpfcc at {Path(bcc.__file__).parent}"))
    headers_ok, detail = kernel_headers()
    results.append(("kernel headers", headers_ok, detail))
    if is_bpffs(bpffs):
        results.append(("bpffs", True, f"{bpffs} is on a bpf filesystem"))
    else:
        results.append(("bpffs", True, f"{bpffs} is not on a bpf filesystem: xlat run mounts "
                        f"one at {BPFFS_ROOT if bpffs.is_relative_to(BPFFS_ROOT) else bpffs}"))
    for key, path in (
        ("ipv4 forwarding", "net/ipv4/ip_forward"),
        ("ipv6 forwarding", "net/ipv6/conf/all/forwarding"),
    ):
        sysctl = path.replace("/", ".")
        try:
            value = Path("/proc/sys", path).read_text().strip()
        except OSError as e:
            results.append((key, False, f"{sysctl}: {e.strerror}; fix: run in a network "
                            "namespace with /proc/sys mounted"))
            continue
        results.append((key, value == "1", f"{sysctl} = {value} (bpf_fib_lookup needs 1)"
                        + ("" if value == "1" else f"; fix: sysctl -w {sysctl}=1")))
    if problem is None and headers_ok:
        results.extend(_check_program())
    return results


def _check_program() -> list[tuple[str, bool, str]]:
    """Compile and load xlat.c with private maps, then attach it to clsact on the
    loopback of a temporary network namespace."""
    from bcc import BPF

    try:
        bpf = compile_program(None)
    except ProgramError as e:
        return [("bpf program", False, str(e))]
    try:
        fn = load_program(bpf, BPF.SCHED_CLS)
    except EbpfError as e:
        bpf.cleanup()
        return [("bpf program", False, str(e))]
    results = [("bpf program", True, f"{BPF_SOURCE} compiles and passes the verifier")]
    ns = f"xlat-check-{uuid.uuid4().hex[:8]}"
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        netns.create(ns)
        netns.setns(ns, flags=0)
        with IPRoute() as ipr:
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.tc("add", "clsact", lo)
            ipr.tc(
                "add-filter",
                "bpf",
                lo,
                TC_HANDLE,
                fd=fn.fd,
                name=PROG_NAME,
                parent=TC_INGRESS,
                classid=1,
                direct_action=True,
                prio=TC_PRIO,
            )
        results.append(("clsact", True, "direct-action bpf filter attaches on clsact ingress"))
    except (OSError, NetlinkError) as e:
        results.append(("clsact", False, f"clsact/bpf filter in a scratch netns: {e}; fix: "
                        "a kernel with CONFIG_NET_CLS_BPF and CONFIG_NET_SCH_INGRESS"))
    finally:
        netns.setns(saved, flags=0)
        os.close(saved)
        with contextlib.suppress(OSError):
            netns.remove(ns)
        bpf.cleanup()
    return results
