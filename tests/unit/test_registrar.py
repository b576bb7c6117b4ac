"""The registrar and location service (RFC 3261 §10.3), with a fake clock."""

from __future__ import annotations

from xlat.addr import Endpoint
from xlat.sip.message import SipRequest
from xlat.sip.registrar import Registrar
from xlat.sip.uri import SipUri

SOURCE = Endpoint.parse("203.0.113.2:5060")


def register(
    contacts: list[str], *, cseq: int = 1, call_id: str = "reg-1", expires: str | None = None
) -> SipRequest:
    headers = [
        ("Via", "SIP/2.0/UDP 203.0.113.2:5060;branch=z9hG4bK1"),
        ("From", "<sip:bob@gw.example>;tag=1"),
        ("To", "<sip:bob@gw.example>"),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} REGISTER"),
    ]
    headers += [("Contact", c) for c in contacts]
    if expires is not None:
        headers.append(("Expires", expires))
    return SipRequest("REGISTER", SipUri.parse("sip:gw.example"), headers)


def test_register_lists_contacts_and_lookup_orders_by_q() -> None:
    reg = Registrar()
    ok = reg.register(register(["<sip:bob@203.0.113.2>;q=0.4", "<sip:bob@203.0.113.3:5070>"]),
                      source=SOURCE, transport="udp", now=0.0, to_tag="t")
    assert ok.status == 200 and ok.to.tag == "t"
    assert ok.get_all("Contact") == ["<sip:bob@203.0.113.3:5070>;expires=3600",
                                     "<sip:bob@203.0.113.2>;q=0.4;expires=3600"]
    found = reg.lookup("bob", now=10.0)
    assert [str(b.uri) for b in found] == ["sip:bob@203.0.113.3:5070", "sip:bob@203.0.113.2"]
    assert found[0].source == SOURCE and found[0].transport == "udp"


def test_expiry_per_contact_header_default_and_cap() -> None:
    reg = Registrar(default_expires=600, min_expires=60, max_expires=1200)
    reg.register(register(["<sip:bob@203.0.113.2>;expires=100", "<sip:bob@203.0.113.3>"],
                          expires="900"), source=SOURCE, transport="udp", now=0.0, to_tag="t")
    assert [b.expires_in(0.0) for b in reg.lookup("bob", now=0.0)] == [900, 100]
    assert [str(b.uri) for b in reg.lookup("bob", now=100.0)] == ["sip:bob@203.0.113.3"]
    assert reg.lookup("bob", now=900.0) == []
    reg.register(register(["<sip:bob@203.0.113.2>"], call_id="reg-2", expires="99999"),
                 source=SOURCE, transport="udp", now=1000.0, to_tag="t")
    assert reg.lookup("bob", now=1000.0)[0].expires_in(1000.0) == 1200


def test_too_brief_is_423_with_min_expires() -> None:
    reg = Registrar(min_expires=60)
    resp = reg.register(register(["<sip:bob@203.0.113.2>;expires=10"]), source=SOURCE,
                        transport="udp", now=0.0, to_tag="t")
    assert resp.status == 423 and resp.get("Min-Expires") == "60"
    assert reg.lookup("bob", now=0.0) == []


def test_unregister_one_and_wildcard() -> None:
    reg = Registrar()
    reg.register(register(["<sip:bob@203.0.113.2>", "<sip:bob@203.0.113.3>"]), source=SOURCE,
                 transport="tcp", now=0.0, to_tag="t")
    reg.register(register(["<sip:bob@203.0.113.2>;expires=0"], cseq=2), source=SOURCE,
                 transport="tcp", now=1.0, to_tag="t")
    assert [str(b.uri) for b in reg.lookup("bob", now=1.0)] == ["sip:bob@203.0.113.3"]
    bad = reg.register(register(["*"], cseq=3), source=SOURCE, transport="tcp", now=2.0,
                       to_tag="t")
    assert bad.status == 400  # "*" needs Expires: 0
    ok = reg.register(register(["*"], cseq=3, expires="0"), source=SOURCE, transport="tcp",
                      now=2.0, to_tag="t")
    assert ok.status == 200 and ok.get_all("Contact") == []
    assert reg.lookup("bob", now=2.0) == []


def test_out_of_order_register_is_refused_and_changes_nothing() -> None:
    reg = Registrar()
    reg.register(register(["<sip:bob@203.0.113.2>"], cseq=5), source=SOURCE, transport="udp",
                 now=0.0, to_tag="t")
    old = reg.register(register(["<sip:bob@203.0.113.2>;expires=0"], cseq=4), source=SOURCE,
                       transport="udp", now=1.0, to_tag="t")
    assert old.status == 400
    assert len(reg.lookup("bob", now=1.0)) == 1
    # a query (no Contact) just lists the bindings
    query = reg.register(register([], cseq=6), source=SOURCE, transport="udp", now=2.0,
                         to_tag="t")
    assert query.get_all("Contact") == ["<sip:bob@203.0.113.2>;expires=3598"]


def test_aor_key_is_the_user_part() -> None:
    assert Registrar.key(SipUri.parse("sip:bob@[2001:db8:6::1]:5060")) == "bob"
    assert Registrar.key("tel:+15551234") is None
    reg = Registrar()
    no_user = register(["<sip:x@203.0.113.2>"])
    no_user.set("To", "<sip:gw.example>")
    resp = reg.register(no_user, source=SOURCE, transport="udp", now=0.0, to_tag="t")
    assert resp.status == 404
