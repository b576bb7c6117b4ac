"""Fixtures for tests on the real kernel: a lab (xlat/lab.py) per test module.

These tests need root. They skip without it, except under ``CI=true``, where they must
run (and fail if they cannot).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from xlat.lab import Lab


def _lab(prefix: str, checksum_offload: bool = True) -> Iterator[Lab]:
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("needs root (network namespaces, eBPF)")
    lab = Lab(f"{prefix}{os.urandom(3).hex()}")
    try:
        lab.up()
        if not checksum_offload:
            lab.checksum_offload_off()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def ebpf_lab() -> Iterator[Lab]:
    """One lab per test module, tx checksum offload off (we validate checksums)."""
    yield from _lab("xk-", checksum_offload=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab for one test."""
    yield from _lab("xt")
