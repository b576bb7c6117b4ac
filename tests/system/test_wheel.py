"""The wheel, installed into a fresh venv away from the checkout, finds its kernel
program and nft ruleset as package data and runs."""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path

import pytest
from pkgsupport import REPO, copy_source, require, run

pytestmark = pytest.mark.system


def test_wheel_runs_outside_the_checkout(tmp_path: Path) -> None:
    require("root (xlat check compiles and loads the BPF program)", os.geteuid() == 0)
    require("/usr/bin/python3 (Debian's, for bcc and nftables)", Path("/usr/bin/python3").exists())
    src = copy_source(tmp_path / "src")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", src)
    (wheel,) = (tmp_path / "dist").glob("xlat-*.whl")
    venv = tmp_path / "venv"
    run("/usr/bin/python3", "-m", "venv", "--system-site-packages", venv)
    run(venv / "bin/pip", "install", "-q", wheel, timeout=600)
    away = tmp_path / "elsewhere"  # no checkout here or above
    away.mkdir()

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    # the version, then which signalling cores it runs (compiled or pure Python)
    assert run(venv / "bin/xlat", "--version", cwd=away).stdout.startswith(f"xlat {version}, ")

    # in a scratch network and mount namespace, set up as a router would be: forwarding
    # on and a bpffs at /sys/fs/bpf (nothing here changes the host's)
    script = ("mount -t bpf bpf /sys/fs/bpf && sysctl -qw net.ipv4.ip_forward=1 "
              f"net.ipv6.conf.all.forwarding=1 && exec {venv}/bin/xlat check -j")
    checks = json.loads(run("unshare", "--net", "--mount", "sh", "-c", script, cwd=away).stdout)
    by_name = {c["check"]: c for c in checks}
    site = str(venv / "lib")
    # the program and the ruleset came from the venv's package data, not from the checkout
    assert by_name["bpf program"]["ok"], by_name["bpf program"]
    assert by_name["bpf program"]["detail"].startswith(site), by_name["bpf program"]
    assert by_name["nft table inet xlat"]["ok"], by_name["nft table inet xlat"]
    assert by_name["nft table inet xlat"]["detail"].startswith(site)
    assert all(c["ok"] for c in checks), checks
