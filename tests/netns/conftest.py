"""Fixtures for tests on the real kernel: a lab (xlat/lab.py) per test module.

These tests need root. They skip without it, except under ``CI=true``, where they must
run (and fail if they cannot).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from xlat.lab import Lab


@pytest.fixture(scope="module")
def ebpf_lab() -> Iterator[Lab]:
    """One lab per test module, tx checksum offload off (we validate checksums)."""
    if os.geteuid() != 0 and os.environ.get("CI") != "true":
        pytest.skip("needs root (network namespaces, eBPF)")
    lab = Lab(f"xk-{os.urandom(3).hex()}")
    try:
        lab.up()
        lab.checksum_offload_off()
        yield lab
    finally:
        lab.down()
