"""LinkPolicy (xlat/media/netwatch.py): link events in, attach/forget out."""

from __future__ import annotations

from xlat.media.netwatch import Attach, Forget, LinkEvent, LinkPolicy


def test_a_named_interface_recreated_with_a_new_ifindex_is_attached_again() -> None:
    policy = LinkPolicy(["gw4"], {"gw4": 3})
    assert policy.event(LinkEvent("gw4", 3, up=True, gone=True)) == (
        "gw4 (ifindex 3) vanished", Forget("gw4", 3))
    assert policy.event(LinkEvent("gw4", 7, up=False)) == (
        "gw4 appeared (ifindex 7, down)", None)  # down: like at start-up, not yet
    assert policy.event(LinkEvent("gw4", 7, up=True)) == ("gw4 is up", Attach("gw4", 7))
    assert policy.attached == {"gw4": 7}
    assert policy.event(LinkEvent("gw4", 7, up=True)) == (None, None)  # nothing new


def test_a_missed_dellink_still_gets_the_new_ifindex_attached() -> None:
    policy = LinkPolicy(["ppp0"], {"ppp0": 5})
    assert policy.event(LinkEvent("ppp0", 9, up=True)) == (
        "ppp0 re-created (ifindex 5 -> 9)", Attach("ppp0", 9))


def test_interfaces_not_named_are_only_logged() -> None:
    policy = LinkPolicy(["gw4"], {"gw4": 3})
    assert policy.event(LinkEvent("eth9", 11, up=True)) == (
        "eth9 appeared (ifindex 11, up)", None)
    assert policy.event(LinkEvent("eth9", 11, up=True, gone=True)) == ("eth9 vanished", None)


def test_default_set_follows_every_interface_but_loopback() -> None:
    policy = LinkPolicy(None, {"gw6": 2})
    assert policy.event(LinkEvent("wg0", 12, up=True))[1] == Attach("wg0", 12)
    assert policy.event(LinkEvent("lo", 1, up=True))[1] is None
    assert policy.event(LinkEvent("wg0", 12, up=False, gone=True))[1] == Forget("wg0", 12)


def test_going_down_keeps_the_filter() -> None:
    policy = LinkPolicy(None, {"gw6": 2})
    assert policy.event(LinkEvent("gw6", 2, up=False)) == ("gw6 is down", None)
    assert policy.attached == {"gw6": 2}


def test_reconcile_reports_only_what_needs_doing() -> None:
    policy = LinkPolicy(["gw4", "gw6"], {"gw4": 3, "gw6": 2})
    dump = [LinkEvent("lo", 1, up=True), LinkEvent("gw6", 2, up=True),
            LinkEvent("gw4", 8, up=True)]
    assert policy.reconcile(dump) == [("gw4 re-created (ifindex 3 -> 8)", Attach("gw4", 8))]
    assert policy.reconcile([LinkEvent("gw4", 8, up=True)]) == [
        ("gw6 (ifindex 2) vanished", Forget("gw6", 2))]
