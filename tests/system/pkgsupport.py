"""Helpers of the packaging tests: the wheel and the Debian package, built from this
checkout and installed where no checkout is.

Outside CI a missing prerequisite (root, dpkg-buildpackage, debootstrap, systemd-nspawn)
skips; under ``CI=true`` it fails, as in tests/e2e.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What a wheel or source package is built from (the same list as debian/source: the
# package data are the top-level bpf/ and nft/ trees the xlat/bpf, xlat/nft links name).
SOURCE = ("pyproject.toml", "setup.py", "README.md", "Makefile", "xlat", "bpf", "nft", "systemd",
          "debian", "docs", "etc", "scripts")


def require(what: str, ok: bool) -> None:
    """Skip (fail under CI=true) when a prerequisite is missing."""
    if not ok:
        message = f"packaging prerequisite missing: {what}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def copy_source(dest: Path) -> Path:
    """The checkout's build inputs, copied (symlinks kept), so a build never writes
    build/ or egg-info into the tree the other tests run from."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in SOURCE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so",
                                                          "_compiled.json"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def run(*cmd: str | Path, cwd: Path | None = None, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure the assertion shows its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc
