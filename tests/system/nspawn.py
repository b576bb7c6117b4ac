"""A clean Debian tree booted under a real systemd with ``systemd-nspawn --boot``, for
the package test: the tree, cached, and one booted machine in a lab namespace.

The tree is debootstrapped once from the Debian mirror into ``build/nspawn/`` with the
package's dependencies already in it (so installing the ``.deb`` needs no network) and
kept while the package list stays the same. Machines boot it with
``--volatile=overlay``: everything a test writes goes to a tmpfs and the cached tree
stays as debootstrap left it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from pkgsupport import REPO, run

CACHE = REPO / "build" / "nspawn"
SUITE = "bookworm"
MIRROR = os.environ.get("XLAT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# what a Debian router has besides the package's own dependencies
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps")
# the host's downloads, reused when they are the versions the mirror has
APT_ARCHIVES = Path("/var/cache/apt/archives")
# a clean environment for commands in the machine (the host's PATH may name a pyenv)
MACHINE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "SYSTEMD_PAGER": "", "TERM": "dumb"}


def dependencies(deb: Path) -> list[str]:
    """The package names a ``.deb``'s Depends needs (the first of each alternative)."""
    names = set(BASE_PACKAGES)
    for clause in run("dpkg-deb", "-f", deb, "Depends").stdout.split(","):
        first = clause.split("|")[0].split()[0]  # "python3-click (>= 8.1)" -> the name
        names.add(first.split(":")[0])  # "python3:any" -> "python3"
    return sorted(names)


def debian_tree(packages: Sequence[str]) -> Path:
    """The cached tree with ``packages`` installed; debootstrapped when missing or when
    it was made for other packages (a few minutes; then instant)."""
    tree = CACHE / SUITE
    stamp = CACHE / f"{SUITE}.packages"
    wanted = "\n".join([MIRROR, *packages]) + "\n"
    if tree.is_dir() and stamp.exists() and stamp.read_text() == wanted:
        return tree
    stamp.unlink(missing_ok=True)
    shutil.rmtree(tree, ignore_errors=True)
    partial = CACHE / f"{SUITE}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for deb in APT_ARCHIVES.glob("*.deb"):
        with contextlib.suppress(OSError):  # present already, or another file system
            os.link(deb, debs / deb.name)
    run("debootstrap", "--variant=minbase", f"--cache-dir={debs}",
        "--include=" + ",".join(packages), SUITE, partial, MIRROR, timeout=1800)
    partial.rename(tree)  # only a finished tree is ever used
    stamp.write_text(wanted)
    return tree


class Machine:
    """One ``systemd-nspawn --boot`` of ``tree`` in network namespace ``netns``; ``run``
    executes a command inside it (``nsenter`` into its PID 1: the host has no machined)."""

    def __init__(self, tree: Path, name: str, netns: str, options: Sequence[str],
                 log: Path) -> None:
        self.tree, self.name, self.netns, self.log = tree, name, netns, log
        self.options = options  # more systemd-nspawn options: --bind=..., --bind-ro=...
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 120) -> str:
        """Boot and wait until systemd says it is up; returns is-system-running's word."""
        argv = ["systemd-nspawn", "--quiet", "--boot", f"--directory={self.tree}",
                "--volatile=overlay", f"--machine={self.name}",
                # no machined and no systemd to ask for a scope: stay in this cgroup
                "--register=no", "--keep-unit",
                f"--network-namespace-path=/run/netns/{self.netns}",
                # every capability to the container, so the unit's own set is what's tested
                "--capability=all",
                # nspawn's own seccomp filter refuses bpf() to the services of the machine
                # (a router's systemd has no such filter); let it through
                "--system-call-filter=bpf",
                "--console=passive", *self.options]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"systemd-nspawn did not start:\n{self.log.read_text()}")
            self.leader = self._init_pid()
            time.sleep(0.05)
        while True:  # the machine's /run/systemd/private appears a moment after PID 1
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=max(1.0, deadline - time.monotonic()))
            if state.stdout.strip() in ("running", "degraded"):
                return state.stdout.strip()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"machine did not boot: {state.stdout}{state.stderr}\n"
                                     f"{self.log.read_text()}")
            time.sleep(0.2)

    def _init_pid(self) -> int:
        """The machine's PID 1 as the host sees it: the child of nspawn in another PID
        namespace (nspawn's first child, which sets up the mounts, is in ours), or 0."""
        assert self.proc is not None
        ours = os.readlink("/proc/self/ns/pid")
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/ns/pid") != ours:
                        return int(pid)
        return 0

    def run(self, *argv: str, check: bool = True, timeout: float = 120,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        # every namespace of PID 1 but the user one (this kernel may have none)
        enter = ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net",
                 "--pid", "--cgroup", "--root", "--wd"]
        proc = subprocess.run([*enter, *argv], input=stdin, capture_output=True, text=True,
                              timeout=timeout, env=MACHINE_ENV)
        if check:
            assert proc.returncode == 0, (f"in {self.name}: {' '.join(argv)} exited "
                                          f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def poweroff(self) -> None:
        """Shut the machine down (SIGTERM to nspawn: an orderly halt), or kill it; never
        raises. Its mounts and tmpfs die with its mount namespace."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
