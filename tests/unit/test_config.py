import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from xlat.addr import AddressError, Endpoint
from xlat.config import KEYS, Config, ConfigError, Problem, Route, build, reload
from xlat.media.datapath import Latch

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "xlat.toml"
MEDIA = {"media_v4": ("192.0.2.1",)}


def write(tmp_path: Path, text: str | bytes) -> Path:
    f = tmp_path / "xlat.toml"
    f.write_bytes(text.encode() if isinstance(text, str) else text)
    return f


def problems(file: Path | None, **options: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(file, **options)
    assert str(info.value) == "\n".join(map(str, info.value.problems))
    return [str(p) for p in info.value.problems]


def test_cli_options_override_file(tmp_path: Path) -> None:
    f = write(tmp_path, 'media-v4 = ["192.0.2.1"]\nports = "20000-20999"\nlatch = "strict"\n'
                        'delete-delay = 3\nrate-limit = 10\n')
    cfg = build(f, media_v6=("2001:db8::1",), ports="40000-40999", rate_limit=0)
    assert [str(a) for a in cfg.media] == ["192.0.2.1", "2001:db8::1"]
    assert (cfg.port_min, cfg.port_max, cfg.latch, cfg.delete_delay, cfg.rate_limit_pps) == (
        40000, 40999, Latch.STRICT, 3.0, 0)
    assert [str(e) for e in cfg.sip_endpoints()] == ["192.0.2.1:5060", "[2001:db8::1]:5060"]
    assert cfg.source == f and cfg.warnings == ()


def test_keys_are_the_long_option_names(tmp_path: Path) -> None:
    f = write(tmp_path, 'media-v4 = "192.0.2.1"\ntimeout = 30\ninterface = ["eth0", "eth1"]\n'
                        'route = "*=sip:192.0.2.9:5060"\ndomain = "Example.COM"\n'
                        'sip-rate = 5000\nnat64-prefix = "2001:db8:46::/96"\n'
                        'ng-interfaces = { wan = 4 }\nlog-format = "json"\n')
    cfg = build(f)
    assert cfg.idle_timeout == 30.0 and isinstance(cfg.idle_timeout, float)
    assert cfg.interfaces == ("eth0", "eth1")
    assert cfg.routes == (Route("*", "sip:192.0.2.9:5060"),)
    assert cfg.domains == ("example.com",)
    assert (cfg.sip_rate, cfg.nat64_prefixes) == (5000, ("2001:db8:46::/96",))
    assert cfg.ng_interfaces == {"v4": 4, "v6": 6, "wan": 4}
    assert cfg.log_format == "json"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the cases of issue #15: each one line naming file, key and reason
        ('port_min = "x"', ['port_min: expects an integer, got a string (\'x\')']),
        ('idle_timeout = "s"', ["idle_timeout: expects a number of seconds, got a string ('s')"]),
        ('idle_timeout = "thirty"',
         ["idle_timeout: expects a number of seconds, got a string ('thirty')"]),
        ("ng_interfaces = 5", ["ng_interfaces: expects a table of NAME = 4 or 6"]),
        ("bpffs = {a = 1}", ["bpffs: expects a string, got a table ({'a': 1})"]),
        ('log_level = "ck"', ["log_level: must be debug, info, warning or error, got 'ck'"]),
        ("delete_delay = nan", ["delete_delay: must be >= 0 and <= 3600, got nan"]),
        ("timeout = inf", ["timeout: must be > 0 and <= 86400, got inf"]),
        ("timeout = 0", ["timeout: must be > 0 and <= 86400, got 0"]),
        ("timeout = true", ["timeout: expects a number of seconds, got a boolean (True)"]),
        ("rate-limit = 1.5", ["rate-limit: expects an integer, got a number (1.5)"]),
        ('ports = "5-4"', ["ports: 5-4: need 1024 <= MIN < MAX <= 65535"]),
        ('ports = "abc"', ["ports: must be MIN-MAX, got 'abc'"]),
        ("port_min = 40000", ["port_min: 40000-39999: need MIN < MAX"]),
        ('media-v6 = "192.0.2.7"', ["media-v6: 192.0.2.7 is not an IPv6 address"]),
        ('media-v6 = ["::"]', ["media-v6: :: cannot be a media address"]),
        ('route = ["x"]', ["route: route must be DOMAIN|*=sip:HOST:PORT, got 'x'"]),
        ('route = "example.com=192.0.2.9"', ["route: route must be DOMAIN|*=sip:HOST:PORT"]),
        ('latch = "sometimes"', ["latch: must be off, learn or strict, got 'sometimes'"]),
        ('ng-listen = "::1:2223"', ["ng-listen: IPv6 addresses must be bracketed"]),
        ('interface = ["a-name-longer-than-15"]', ["interface: 'a-name-longer-than-15' is not"]),
        ('nat64-prefix = "64:ff9b::/80"', ["nat64-prefix: 64:ff9b::/80: RFC 6052 prefixes"]),
        ('bpffs = "relative/dir"', ["bpffs: must be an absolute path, got 'relative/dir'"]),
        ("ng-interfaces = { lan = 5 }", ["ng-interfaces: lan: expects 4 or 6, got 5"]),
        ('datapath = "dpdk"', ["datapath: must be ebpf, userspace or auto, got 'dpdk'"]),
        ("keep-datapath = 1", ["keep-datapath: expects true or false, got an integer (1)"]),
        # names: typos get a hint, old spellings point at the new one
        ("timout = 30", ["timout: unknown key, did you mean 'timeout'?"]),
        ("idle-timeout = 30", ["idle-timeout: unknown key, did you mean 'timeout'?"]),
        ("rate_limit_ppss = 3", ["rate_limit_ppss: unknown key, did you mean 'rate-limit'?"]),
        ("frobnicate = 1", ["frobnicate: unknown key"]),
        # every problem at once
        ('timout = 3\nlatch = 1\nports = "x"',
         ["timout: unknown key", "latch: expects a string", "ports: must be MIN-MAX"]),
    ],
)
def test_each_problem_is_one_line_naming_file_and_key(tmp_path: Path, text: str,
                                                      expected: list[str]) -> None:
    f = write(tmp_path, 'media-v4 = "192.0.2.1"\n' + text + "\n")
    found = problems(f)
    assert len(found) == len(expected), found
    for line, want in zip(found, expected, strict=True):
        assert line.startswith(f"{f}: {want}"), line


def test_a_file_that_is_not_utf8_is_one_problem(tmp_path: Path) -> None:
    f = write(tmp_path, b'media-v4 = "192.0.2.1"\n# caf\xe9\n')
    assert problems(f) == [f"{f}: not UTF-8 text (line 2, byte 0xe9): TOML files are UTF-8"]


def test_a_file_that_is_not_toml_is_one_problem(tmp_path: Path) -> None:
    f = write(tmp_path, "timeout = = 3\n")
    [line] = problems(f)
    assert line.startswith(f"{f}: not valid TOML: ") and "line 1" in line


def test_an_unreadable_file_is_one_problem(tmp_path: Path) -> None:
    assert problems(tmp_path / "missing.toml") == [
        f"{tmp_path / 'missing.toml'}: No such file or directory"]


def test_old_underscore_keys_load_with_a_warning(tmp_path: Path) -> None:
    f = write(tmp_path, 'media_v4 = ["192.0.2.1"]\nidle_timeout = 20\nsip_rate = 900\n'
                        'nat64_prefixes = ["2001:db8:46::/96"]\nport_min = 20000\n'
                        'port_max = 20999\n')
    cfg = build(f)
    assert (cfg.idle_timeout, cfg.sip_rate, cfg.port_min, cfg.port_max) == (20.0, 900, 20000,
                                                                             20999)
    assert cfg.nat64_prefixes == ("2001:db8:46::/96",)
    assert cfg.warnings == (
        f"{f}: media_v4: deprecated spelling, write 'media-v4'",
        f"{f}: idle_timeout: deprecated spelling, write 'timeout'",
        f"{f}: sip_rate: deprecated spelling, write 'sip-rate'",
        f"{f}: nat64_prefixes: deprecated spelling, write 'nat64-prefix'",
        f'{f}: port_min: deprecated, write ports = "MIN-MAX"',
        f'{f}: port_max: deprecated, write ports = "MIN-MAX"',
    )


def test_command_line_problems_name_the_option() -> None:
    assert problems(None, media_v4=("2001:db8::1",), timeout=float("nan")) == [
        "--media-v4: 2001:db8::1 is not an IPv4 address",
        "--timeout: must be > 0 and <= 86400, got nan",
    ]


def test_no_media_address_is_a_problem(tmp_path: Path) -> None:
    assert problems(None) == [
        "media-v4: no media address: set media-v4 and/or media-v6 (or the options "
        "--media-v4/--media-v6)"]
    f = write(tmp_path, "timeout = 30\n")
    assert problems(f)[0].startswith(f"{f}: media-v4: no media address")


@pytest.mark.parametrize("key", ["ng-listen", "metrics-listen"])
@pytest.mark.parametrize("address", ["192.0.2.1:2223", "0.0.0.0:2223", "[::]:2223"])
def test_remote_listeners_need_an_explicit_opt_in(tmp_path: Path, key: str,
                                                  address: str) -> None:
    f = write(tmp_path, f'media-v4 = "192.0.2.1"\n{key} = "{address}"\n')
    assert problems(f) == [f"{f}: {key}: {address} is not a loopback address: set "
                           "allow-remote-control = true to serve it there"]
    cfg = build(f, allow_remote_control=True)
    assert getattr(cfg, key.replace("-", "_")) == Endpoint.parse(address)
    on_loopback = build(None, **MEDIA, **{key.replace("-", "_"): "[::1]:2223"})
    assert getattr(on_loopback, key.replace("-", "_")) == Endpoint.parse("[::1]:2223")


def test_sip_listen_none_turns_sip_off() -> None:
    cfg = build(None, **MEDIA, sip_listen=("none",))
    assert cfg.sip_endpoints() == ()


def test_reload_reads_the_file_again_under_the_same_options(tmp_path: Path) -> None:
    f = write(tmp_path, 'media-v4 = "192.0.2.1"\nroute = "*=sip:192.0.2.9"\ntimeout = 5\n')
    cfg = build(f, timeout=7.0, domain=("a.example",))
    f.write_text('media-v4 = "192.0.2.1"\nroute = "*=sip:192.0.2.10"\ntimeout = 5\n')
    again = reload(cfg)
    assert again.routes == (Route("*", "sip:192.0.2.10"),)
    assert (again.idle_timeout, again.domains) == (7.0, ("a.example",))
    f.write_text('media-v4 = "192.0.2.1"\ntimeout = "x"\n')
    with pytest.raises(ConfigError, match="timeout: expects a number"):
        reload(cfg)


def test_problem_text() -> None:
    assert str(Problem("/etc/xlat/xlat.toml", "timeout", "bad")) == "/etc/xlat/xlat.toml: " \
        "timeout: bad"
    assert str(Problem(None, "--ports", "bad")) == "--ports: bad"
    assert str(ConfigError("one line")) == "one line"


# ---- the shipped example file ------------------------------------------------------

DEFAULT_LINE = re.compile(r"^# ([a-z][a-z0-9-]*) = (.*)$", re.M)


def test_example_file_parses_and_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    assert tomllib.loads(text) == {}  # everything commented out: the defaults
    documented = {m[1] for m in DEFAULT_LINE.finditer(text)}
    # sip-listen's default (port 5060 of each media address), the TLS files' and the
    # registrar's (none) have no TOML spelling: they are shown by example
    by_example = {"sip-listen", "tls-cert", "tls-key", "tls-ca", "users", "registrar-upstream"}
    assert documented == set(KEYS) - by_example
    for key in by_example:
        assert re.search(rf"^#\s+{key} = ", text, re.M), key


def test_example_file_defaults_are_the_defaults(tmp_path: Path) -> None:
    uncommented = DEFAULT_LINE.sub(r"\1 = \2", EXAMPLE.read_text())
    cfg = build(write(tmp_path, uncommented), **MEDIA)
    assert cfg.warnings == ()
    assert dataclasses.replace(cfg, media_v4=()) == Config()


def test_every_config_field_has_a_key() -> None:
    bookkeeping = {"source", "options", "warnings"}
    set_by_keys = {k.field for k in KEYS.values()} - {"ports"} | {"port_min", "port_max",
                                                                   "control", "sip_listen_only"}
    assert {f.name for f in dataclasses.fields(Config)} - bookkeeping == set_by_keys


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
    with pytest.raises(ConfigError, match="a tls: listener needs tls-cert and tls-key"):
        build(None, media_v4=("192.0.2.1",), sip_listen=("tls:192.0.2.1:5061",))
    with pytest.raises(ConfigError, match="no such file"):
        build(None, media_v4=("192.0.2.1",), tls_ca=str(tmp_path / "missing.pem"))


def test_dns_server_and_prefer_family() -> None:
    cfg = build(None, media_v4=("192.0.2.1",), dns_server=("192.0.2.53", "[2001:db8::53]:5353"),
                prefer_family="ipv4")
    assert [str(e) for e in cfg.dns_servers] == ["192.0.2.53:53", "[2001:db8::53]:5353"]
    assert cfg.prefer_family == 4 and build(None, media_v4=("192.0.2.1",)).prefer_family == 6
    with pytest.raises(ConfigError, match="prefer-family"):
        build(None, media_v4=("192.0.2.1",), prefer_family="ipv5")
