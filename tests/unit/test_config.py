from pathlib import Path

import pytest

from xlat.addr import AddressError, Endpoint
from xlat.config import ConfigError, Route, build
from xlat.media.datapath import Latch


def test_cli_options_override_file(tmp_path: Path) -> None:
    f = tmp_path / "xlat.toml"
    f.write_text('media_v4 = ["192.0.2.1"]\nports = "20000-20999"\nlatch = "strict"\n'
                 'delete_delay = 3\n')
    cfg = build(f, media_v6=("2001:db8::1",), ports="40000-40999")
    assert [str(a) for a in cfg.media] == ["192.0.2.1", "2001:db8::1"]
    assert (cfg.port_min, cfg.port_max, cfg.latch, cfg.delete_delay) == (40000, 40999,
                                                                         Latch.STRICT, 3.0)
    assert [str(e) for e in cfg.sip_endpoints()] == ["192.0.2.1:5060", "[2001:db8::1]:5060"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "no media address"),
        ({"media_v4": ("2001:db8::1",)}, "not an IPv4 address"),
        ({"media_v4": ("192.0.2.1",), "ports": "5-4"}, "MIN < MAX"),
        ({"media_v4": ("192.0.2.1",), "ports": "abc"}, "MIN-MAX"),
        ({"media_v4": ("192.0.2.1",), "route": ("x",)}, "unknown setting"),
        ({"media_v4": ("192.0.2.1",), "routes": ("example.com=192.0.2.9",)}, "sip:"),
        ({"media_v4": ("192.0.2.1",), "latch": "sometimes"}, "latch"),
        ({"media_v4": ("192.0.2.1",), "ng_listen": "::1:2223"}, "bracketed"),
    ],
)
def test_bad_values_name_what_is_wrong(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(None, **options)


def test_sip_listen_none_turns_sip_off() -> None:
    cfg = build(None, media_v4=("192.0.2.1",), sip_listen=("none",))
    assert cfg.sip_endpoints() == ()


def test_route_parsing() -> None:
    assert Route.parse("*=sip:192.0.2.50:5060") == Route("*", "sip:192.0.2.50:5060")
    assert Route.parse("[2001:DB8::1]=sip:[2001:db8::9]").domain == "[2001:db8::1]"
    with pytest.raises(ConfigError, match="brackets"):
        Route.parse("2001:db8::1=sip:x")


def test_endpoint_strings_round_trip() -> None:
    for text in ("192.0.2.1:30000", "[2001:db8::1]:30000"):
        assert str(Endpoint.parse(text)) == text
    for bad in ("2001:db8::1:5", "192.0.2.1", "host:5060", "192.0.2.1:70000"):
        with pytest.raises(AddressError):
            Endpoint.parse(bad)


def test_sip_listen_transport_prefixes_and_tls_files(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    cfg = build(None, media_v4=("192.0.2.1",), sip_listen=("tls:[2001:db8::1]:5061",),
                tls_cert=str(cert), tls_key=str(key))
    # tls: adds to the default UDP/TCP listeners
    assert [(t, str(e)) for t, e in cfg.sip_listeners()] == [
        ("udp", "192.0.2.1:5060"), ("tcp", "192.0.2.1:5060"), ("tls", "[2001:db8::1]:5061")]
    cfg = build(None, media_v4=("192.0.2.1",), sip_listen=("udp:192.0.2.1:5070", "[::]:5080"))
    assert [(t, str(e)) for t, e in cfg.sip_listeners()] == [
        ("udp", "[::]:5080"), ("tcp", "[::]:5080"), ("udp", "192.0.2.1:5070")]
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        build(None, media_v4=("192.0.2.1",), sip_listen=("tls:192.0.2.1:5061",))
    with pytest.raises(ConfigError, match="no such file"):
        build(None, media_v4=("192.0.2.1",), tls_ca=str(tmp_path / "missing.pem"))


def test_dns_server_and_prefer_family() -> None:
    cfg = build(None, media_v4=("192.0.2.1",), dns_servers=("192.0.2.53", "[2001:db8::53]:5353"),
                prefer_family="ipv4")
    assert [str(e) for e in cfg.dns_servers] == ["192.0.2.53:53", "[2001:db8::53]:5353"]
    assert cfg.prefer_family == 4 and build(None, media_v4=("192.0.2.1",)).prefer_family == 6
    with pytest.raises(ConfigError, match="prefer-family"):
        build(None, media_v4=("192.0.2.1",), prefer_family="ipv5")
