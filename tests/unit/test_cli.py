"""The CLI's error contract, run as a user runs it: one line on stderr, exit 2 for
usage and 1 otherwise."""

import subprocess
import sys
from pathlib import Path

import pytest

XLAT = [sys.executable, "-m", "xlat.cli"]


def xlat(*args: str, control: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*XLAT, "--control", str(control), *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(
    "args",
    [
        ("session", "add", "--peer-a", "2001:db8::1:5", "--peer-b", "192.0.2.1:4"),
        ("session", "add", "--peer-a", "192.0.2.1:4"),
        ("session", "add", "--peer-a", "192.0.2.1:4", "--peer-b", "192.0.2.2:4", "--timeout",
         "-1"),
        ("frobnicate",),
        ("run", "--datapath", "dpdk"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    r = xlat(*args, control=tmp_path / "none.sock")
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("xlat: error: ")


@pytest.mark.parametrize("args", [("session", "list", "-j"), ("stats",), ("flow", "list")])
def test_no_daemon_exits_1_with_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    r = xlat(*args, control=tmp_path / "none.sock")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"xlat: cannot reach xlat at {tmp_path / 'none.sock'}: No such file or directory"]


def test_run_rejects_bad_config_in_one_line(tmp_path: Path) -> None:
    r = xlat("run", "--media-v4", "2001:db8::1", control=tmp_path / "c.sock")
    assert r.returncode == 1
    assert r.stderr.strip() == "xlat: 2001:db8::1 is not an IPv4 address"
