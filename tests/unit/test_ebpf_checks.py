"""The start-up checks of xlat/media/ebpf.py that need no kernel: which capabilities
are missing, and whether a header tree can build bpf/xlat.c."""

from __future__ import annotations

from pathlib import Path

import pytest

from xlat.media.ebpf import CAPABILITIES, kernel_headers, missing_capabilities


def caps(*names: str) -> int:
    return sum(1 << CAPABILITIES[n] for n in names)


def test_sys_admin_with_net_admin_is_enough_without_mounting() -> None:
    assert missing_capabilities(mount=False, caps=caps("CAP_NET_ADMIN", "CAP_SYS_ADMIN")) == []


def test_bpf_and_perfmon_replace_sys_admin_until_a_bpffs_must_be_mounted() -> None:
    have = caps("CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON")
    assert missing_capabilities(mount=False, caps=have) == []
    assert missing_capabilities(mount=True, caps=have) == ["CAP_SYS_ADMIN"]


def test_nothing_at_all_names_every_need_once() -> None:
    assert missing_capabilities(mount=True, caps=0) == [
        "CAP_NET_ADMIN", "CAP_BPF or CAP_SYS_ADMIN", "CAP_PERFMON or CAP_SYS_ADMIN",
        "CAP_SYS_ADMIN",
    ]


def header_tree(modules: Path, release: str, uts: str | None) -> None:
    build = modules / release / "build"
    (build / "include" / "generated").mkdir(parents=True)
    (modules / release / "source").mkdir()
    if uts is not None:
        (build / "include" / "generated" / "utsrelease.h").write_text(
            f'#define UTS_RELEASE "{uts}"\n')


@pytest.mark.parametrize(("uts", "ok", "says"), [
    ("6.18.44-fc", True, "match the running kernel"),
    ("6.1.0-57-amd64", True, "usable (>= 5.10, not newer than the kernel)"),
    ("5.4.0-1", False, "older than 5.10"),
    ("6.19.0", False, "newer than the running kernel 6.18.44-fc"),
])
def test_headers_of_another_release(tmp_path: Path, uts: str, ok: bool, says: str) -> None:
    header_tree(tmp_path, "6.18.44-fc", uts)
    got_ok, detail = kernel_headers("6.18.44-fc", modules=tmp_path)
    assert got_ok is ok and says in detail
    assert ok or "fix:" in detail


def test_missing_headers_say_how_to_get_them(tmp_path: Path) -> None:
    ok, detail = kernel_headers("6.18.44-fc", modules=tmp_path)
    assert not ok
    assert detail.startswith(f"{tmp_path}/6.18.44-fc/build missing; fix: apt-get install")


def test_unprepared_tree_is_refused(tmp_path: Path) -> None:
    header_tree(tmp_path, "6.18.44-fc", None)
    ok, detail = kernel_headers("6.18.44-fc", modules=tmp_path)
    assert not ok and "not a prepared header tree; fix:" in detail
