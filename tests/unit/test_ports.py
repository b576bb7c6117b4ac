from ipaddress import IPv4Address, IPv6Address

import pytest

from xlat.addr import Endpoint
from xlat.media.ports import PortsExhausted, RelayPortPool

V4 = IPv4Address("203.0.113.1")


def test_pairs_are_even_rtp_and_cover_the_range() -> None:
    pool = RelayPortPool(V4, 30001, 30010)
    ports = [pool.allocate(0.0).port for _ in range(pool.capacity)]
    assert ports == [30002, 30004, 30006, 30008]  # 30010 has no odd partner in range
    assert all(p % 2 == 0 for p in ports)


def test_exhaustion_raises_with_family_and_release_quarantines() -> None:
    pool = RelayPortPool(IPv6Address("2001:db8::1"), 40000, 40003, quarantine=5.0)
    a = pool.allocate(0.0)
    b = pool.allocate(0.0)
    with pytest.raises(PortsExhausted) as exc:
        pool.allocate(0.0)
    assert exc.value.family == 6
    pool.release(a, now=10.0)
    with pytest.raises(PortsExhausted):
        pool.allocate(14.9)  # still resting
    assert pool.allocate(15.0) == a
    assert pool.in_use == 2 and b.port != a.port


def test_freed_pair_is_reused_last() -> None:
    pool = RelayPortPool(V4, 30000, 30007, quarantine=0.0)
    first = pool.allocate(0.0)
    pool.release(first, 0.0)
    assert [pool.allocate(1.0).port for _ in range(4)] == [30002, 30004, 30006, 30000]


def test_claim_marks_a_pair_used_and_rejects_foreign_ones() -> None:
    pool = RelayPortPool(V4, 30000, 30007)
    pool.claim(Endpoint(V4, 30004))
    assert 30004 not in [pool.allocate(0.0).port for _ in range(3)]
    with pytest.raises(ValueError):
        pool.claim(Endpoint(V4, 30005))


def test_range_without_a_pair_is_rejected() -> None:
    with pytest.raises(ValueError):
        RelayPortPool(V4, 30001, 30002)
