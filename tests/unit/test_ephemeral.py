"""The pure part of xlat/media/ephemeral.py: the ip_local_reserved_ports text."""

from __future__ import annotations

from pathlib import Path

import pytest

from xlat.media.ephemeral import ReservedPorts, parse_ranges, release, reserve


def test_parse_ranges_reads_the_sysctl_format() -> None:
    assert parse_ranges("8080,30000-39999\n") == [(8080, 8080), (30000, 39999)]
    assert parse_ranges("\n") == []
    with pytest.raises(ValueError):
        parse_ranges("80-x")


def test_reserve_on_nothing_adds_the_range() -> None:
    assert reserve("", 30000, 39999) == ("30000-39999", [(30000, 39999)])


def test_reserve_keeps_and_merges_what_was_there() -> None:
    text, added = reserve("8080,35000-45000", 30000, 39999)
    assert text == "8080,30000-45000"
    assert added == [(30000, 34999)]  # 35000-39999 was reserved before us
    assert release(text, added) == "8080,35000-45000"


def test_release_takes_out_only_what_was_added() -> None:
    text, added = reserve("31000,32000-32010", 30000, 39999)
    assert added == [(30000, 30999), (31001, 31999), (32011, 39999)]
    assert release(text, added) == "31000,32000-32010"


def test_nothing_added_when_already_reserved() -> None:
    assert reserve("1024-65535", 30000, 39999) == ("1024-65535", [])


def test_reserved_ports_restores_the_file(tmp_path: Path) -> None:
    sysctl = tmp_path / "ip_local_reserved_ports"
    sysctl.write_text("8080\n")
    reserved = ReservedPorts(30000, 30099, sysctl)
    assert sysctl.read_text() == "8080,30000-30099\n"
    sysctl.write_text("8080,9000,30000-30099\n")  # someone else reserved 9000 meanwhile
    reserved.close()
    assert sysctl.read_text() == "8080,9000\n"
