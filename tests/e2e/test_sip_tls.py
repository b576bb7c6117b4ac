"""SIP over TLS (RFC 3261 §26, RFC 5630, RFC 5922) through the asyncio edge, with
certificates from a CA the test makes (openssl): a TLS phone calls through the
gateway to a TLS server named by DNS; its certificate is checked against our CA and
the name of the target domain; one the CA did not sign makes the call fail with
one clear log line. In the lab, with SIPp phones behind TLS shims: an IPv6 phone over
TLS calls an IPv4 phone over UDP, and an IPv4 phone over TLS calls
``sips:alice@example.org``, which dnsmasq resolves (NAPTR SIPS+D2T, SRV, AAAA) to an
IPv6 phone reached over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import shutil
import socket
import ssl
import threading
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import pytest
from conftest import Certificate, issue, make_ca, require
from test_sip_calls import assert_kernel_carried, assert_media_both_ways, assert_own_family

from xlat.addr import Endpoint
from xlat.demo import Phone, place_call, start_gateway
from xlat.lab import GW4, GW6, V4_HOST, V4_HOST2, V6_HOST, Lab, in_netns
from xlat.labdns import Dnsmasq, resolv_conf
from xlat.media.ports import RelayPortPool
from xlat.media.session import SessionManager
from xlat.sip.dns import Query
from xlat.sip.message import SipRequest, make_response, parse_message
from xlat.sip.proxy import ProxyConfig, SipProxy
from xlat.sip.transport import start_sip
from xlat.sip.uri import SipUri

pytestmark = pytest.mark.e2e

SRTP_SDP = (
    b"v=0\r\no=- 7 7 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/SAVP 0\r\n"
    b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 "
    b"inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz|2^20|1:4\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def read_message(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    return head + await reader.readexactly(length)


def invite(uri: str, port: int) -> bytes:
    headers = [
        ("Via", f"SIP/2.0/TLS 127.0.0.1:{port};branch=z9hG4bKtls1;rport"),
        ("Max-Forwards", "70"), ("From", "<sip:alice@127.0.0.1>;tag=a1"), ("To", f"<{uri}>"),
        ("Call-ID", f"tls-{port}@127.0.0.1"), ("CSeq", "1 INVITE"),
        ("Contact", f"<sip:alice@127.0.0.1:{port};transport=tls>"),
        ("Content-Type", "application/sdp"),
    ]
    return SipRequest("INVITE", SipUri.parse(uri), headers, SRTP_SDP).to_bytes()


async def tls_call(gw_cert: Certificate, callee_cert: Certificate, ca: Path) -> tuple[
        list[bytes], bytes | None]:
    """A TLS caller -> gateway (TLS listener) -> ``sips:`` route to pbx.test (a TLS
    server with ``callee_cert``). Returns what the caller got and what the callee got."""
    loop = asyncio.get_running_loop()
    sip4, tls4 = Endpoint.parse(f"127.0.0.1:{free_port()}"), Endpoint.parse(
        f"127.0.0.1:{free_port()}")
    callee_port = free_port()
    media = SessionManager(pools={4: RelayPortPool(IPv4Address("127.0.0.1"), 31200, 31299)})
    proxy = SipProxy(ProxyConfig(sip={4: sip4}, tls={4: tls4}, routes=(
        ("*", SipUri.parse(f"sips:pbx.test:{callee_port}")),)), media, random.Random(3))
    proxy.dns.store(Query("pbx.test", "A"), [ip_address("127.0.0.1")], 300, loop.time())
    proxy.dns.store(Query("pbx.test", "AAAA"), [], 300, loop.time())
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(gw_cert.cert, gw_cert.key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    server = await start_sip(proxy, [sip4], ("udp",), more=[("tls", tls4)],
                             tls_server=server_ctx, tls_client=client_ctx)
    callee_got: asyncio.Future[bytes] = loop.create_future()

    async def callee(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await read_message(reader)
        callee_got.set_result(data)
        request = parse_message(data)
        assert isinstance(request, SipRequest)
        ok = make_response(request, 200, None, "b1", [("Contact", "<sip:bob@127.0.0.1>")])
        writer.write(ok.to_bytes())
        await writer.drain()
        await asyncio.sleep(1)

    callee_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    callee_ctx.load_cert_chain(callee_cert.cert, callee_cert.key)
    callee_server = await asyncio.start_server(callee, "127.0.0.1", callee_port, ssl=callee_ctx)
    caller_ctx = ssl.create_default_context(cafile=str(ca))
    reader, writer = await asyncio.open_connection("127.0.0.1", tls4.port, ssl=caller_ctx,
                                                   server_hostname="127.0.0.1")
    port = writer.get_extra_info("sockname")[1]
    writer.write(invite("sips:bob@pbx.test", port))
    got: list[bytes] = []
    try:
        while not got or got[-1].startswith(b"SIP/2.0 1"):
            got.append(await asyncio.wait_for(read_message(reader), 8))
        forwarded = callee_got.result() if callee_got.done() else None
    finally:
        writer.close()
        callee_server.close()
        server.close()
    return got, forwarded


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Certificate]:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory / "ca")
    rogue = make_ca(directory / "rogue", "not our CA")
    return {
        "gw": issue(directory, ca, "gw", ["127.0.0.1"]),
        "pbx": issue(directory, ca, "pbx", ["pbx.test"]),
        "wrong-name": issue(directory, ca, "other", ["other.test"]),
        "rogue": issue(directory, rogue, "rogue", ["pbx.test"]),
    }


def test_tls_call_through_the_gateway_keeps_srtp_and_checks_the_server(
        pki: dict[str, Certificate]) -> None:
    got, forwarded = asyncio.run(tls_call(pki["gw"], pki["pbx"], pki["gw"].ca))
    assert [m[:12] for m in got] == [b"SIP/2.0 100 ", b"SIP/2.0 200 "]  # over its connection
    assert forwarded is not None
    request = parse_message(forwarded)
    assert isinstance(request, SipRequest)
    assert str(request.uri) == "sips:bob@pbx.test"  # a route is a next hop
    assert request.get_all("Via")[0].startswith("SIP/2.0/TLS 127.0.0.1:")
    assert all(";transport=tls" in rr for rr in request.get_all("Record-Route"))
    # SRTP crosses untouched: the key and the secure profile, byte for byte
    crypto = [line for line in SRTP_SDP.split(b"\r\n") if line.startswith(b"a=crypto")]
    assert crypto[0] in request.body.split(b"\r\n")
    assert b"RTP/SAVP 0\r\n" in request.body


@pytest.mark.parametrize("cert", ["rogue", "wrong-name"])
def test_untrusted_server_certificate_fails_the_call_with_one_clear_line(
        pki: dict[str, Certificate], cert: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="xlat.sip.transport"):
        got, forwarded = asyncio.run(tls_call(pki["gw"], pki[cert], pki["gw"].ca))
    assert forwarded is None
    assert [m[:12] for m in got] == [b"SIP/2.0 100 ", b"SIP/2.0 503 "]
    lines = [r.getMessage() for r in caplog.records if "not trusted" in r.getMessage()]
    assert len(lines) == 1 and "pbx.test" in lines[0], caplog.text


# ---- in the lab: an IPv6 phone over TLS calls an IPv4 phone over UDP -----------------------


class TlsShim:
    """TLS for a SIPp phone (Debian's SIPp has none): every TCP connection accepted in
    namespace ``ns`` on ``listen`` is carried to ``upstream``. With ``ca``, the
    connection to upstream is TLS, its certificate checked against ``ca`` for
    ``server_name`` (a TLS caller: SIPp connects to us in plain TCP); with ``serve``,
    the accepted connections are TLS with that certificate and upstream is plain TCP
    (a TLS callee: SIPp listens on upstream). ``peer_cert``: upstream's certificate;
    ``sni``: the server names the TLS clients asked for; ``error``: the first failure."""

    def __init__(self, ns: str, listen: Endpoint, upstream: Endpoint, *, ca: Path | None = None,
                 server_name: str | None = None, serve: Certificate | None = None) -> None:
        self.ns, self.upstream, self.server_name = ns, upstream, server_name
        self.client = ssl.create_default_context(cafile=str(ca)) if ca else None
        self.server: ssl.SSLContext | None = None
        self.sni: list[str | None] = []
        if serve is not None:
            self.server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.server.load_cert_chain(serve.cert, serve.key)
            self.server.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        family = socket.AF_INET6 if listen.family == 6 else socket.AF_INET
        with in_netns(ns):
            self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((str(listen.host), listen.port))
        self.sock.listen(4)
        self.sock.settimeout(20)
        self.peer_cert: dict[str, object] | None = None
        self.error: BaseException | None = None
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed (or nobody came within the timeout)
                return
            thread = threading.Thread(target=self._carry, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _carry(self, accepted: socket.socket) -> None:
        try:
            if self.server is not None:
                accepted.settimeout(10)
                accepted = self.server.wrap_socket(accepted, server_side=True)
                accepted.settimeout(None)
            with in_netns(self.ns):
                out = socket.create_connection((str(self.upstream.host), self.upstream.port), 5)
            if self.client is not None:
                out = self.client.wrap_socket(out, server_hostname=self.server_name)
                self.peer_cert = out.getpeercert()
            out.settimeout(None)
            back = threading.Thread(target=_pump, args=(out, accepted), daemon=True)
            back.start()
            _pump(accepted, out)
            back.join(5)
        except BaseException as exc:
            self.error = self.error or exc

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)
        for thread in self.threads:
            thread.join(5)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def lab_cert(pki: dict[str, Certificate], stem: str, names: list[str]) -> Certificate:
    """A certificate for ``names`` (lab hosts), from the test CA."""
    ca = pki["gw"].ca
    return issue(ca.parent, (ca, ca.with_suffix(".key")), stem, names)


def test_ipv6_phone_over_tls_calls_ipv4_phone_over_udp(
        lab: Lab, pki: dict[str, Certificate], tmp_path: Path) -> None:
    cert = lab_cert(pki, "lab-gw", [str(GW6), "gw.test"])
    tls6 = Endpoint(GW6, 5061)
    gateway = start_gateway(lab, "--sip-listen", f"tls:{tls6}", "--tls-cert", str(cert.cert),
                            "--tls-key", str(cert.key), "--tls-ca", str(cert.ca),
                            "--ports", "30400-30599", "--delete-delay", "1")
    alice = Phone(lab.v6, V6_HOST, "alice", tcp=True)
    bob = Phone(lab.v4, V4_HOST, "bob")
    shim = TlsShim(lab.v6, Endpoint(V6_HOST, 5071), tls6, ca=cert.ca, server_name=str(GW6))
    try:
        kernel_before = gateway.forwarded().get("ebpf", 0)
        record = place_call(gateway, alice, bob, bob.uri, tmp_path,
                            remote=Endpoint(V6_HOST, 5071))
    finally:
        shim.close()
        gateway.stop()
    assert shim.error is None and shim.peer_cert, shim.error
    assert record.ok, record.explain()
    assert_own_family(record, alice, bob)
    invite = record.uas.received("INVITE")[0]
    # RFC 5658 double Record-Route: the UDP/IPv4 entry faces bob, the TLS/IPv6 one alice
    assert invite.values("record-route") == [f"<sip:{GW4}:5060;lr;r2=on>",
                                             f"<sip:[{GW6}]:5061;transport=tls;lr;r2=on>"]
    assert invite.values("via")[0].startswith("SIP/2.0/UDP ")
    assert_media_both_ways(record)
    assert_kernel_carried(record, kernel_before)


# ---- in the lab: an IPv4 phone over TLS calls sips:alice@example.org, found by DNS ---------

DNS_SERVER = V4_HOST2  # dnsmasq in the IPv4 host's namespace, port 53
ORG_RECORDS = [  # example.org: NAPTR SIPS+D2T -> SRV _sips._tcp -> AAAA of the IPv6 phone
    "--local=/example.org/",
    "--naptr-record=example.org,10,10,S,SIPS+D2T,,_sips._tcp.example.org",
    "--srv-host=_sips._tcp.example.org,alice.example.org,5061,10,0",
    f"--host-record=alice.example.org,{V6_HOST}",
]


def test_ipv4_phone_over_tls_calls_sips_uri_of_an_ipv6_phone_found_by_dns(
        lab: Lab, pki: dict[str, Certificate], tmp_path: Path) -> None:
    """bob (IPv4, TLS) calls ``sips:alice@example.org``; the gateway finds alice with
    NAPTR SIPS+D2T -> SRV _sips._tcp -> AAAA at dnsmasq (through its namespace's
    resolv.conf), reaches her over TLS with the certificate checked for
    ``example.org`` (RFC 5922 §4: the domain, not the SRV target), and the call's
    media crosses in the kernel."""
    require("dnsmasq", shutil.which("dnsmasq") is not None)
    cert = lab_cert(pki, "lab-gw46", [str(GW4), str(GW6)])
    phone_cert = lab_cert(pki, "alice-org", ["example.org", str(V6_HOST)])
    tls4, tls6 = Endpoint(GW4, 5061), Endpoint(GW6, 5061)
    bob = Phone(lab.v4, V4_HOST, "bob", tcp=True)
    alice = Phone(lab.v6, V6_HOST, "alice", tcp=True)  # SIPp on TCP 5060, TLS front on 5061
    with Dnsmasq(lab.v4, DNS_SERVER, ORG_RECORDS, tmp_path / "dnsmasq.log") as dns_server, \
            resolv_conf(lab.gw, DNS_SERVER):
        gateway = start_gateway(lab, "--sip-listen", f"tls:{tls4}", "--sip-listen",
                                f"tls:{tls6}", "--tls-cert", str(cert.cert), "--tls-key",
                                str(cert.key), "--tls-ca", str(cert.ca),
                                "--ports", "30600-30799", "--delete-delay", "1")
        caller_side = TlsShim(lab.v4, Endpoint(V4_HOST, 5071), tls4, ca=cert.ca,
                              server_name=str(GW4))
        callee_side = TlsShim(lab.v6, Endpoint(V6_HOST, 5061), Endpoint(V6_HOST, alice.port),
                              serve=phone_cert)
        try:
            kernel_before = gateway.forwarded().get("ebpf", 0)
            record = place_call(gateway, bob, alice, "sips:alice@example.org", tmp_path,
                                uas="uas_tls.xml", keys={"tls_port": "5061"},
                                remote=Endpoint(V4_HOST, 5071))
        finally:
            caller_side.close()
            callee_side.close()
            gateway.stop()
        asked = dns_server.log.read_text()
    assert caller_side.error is None and callee_side.error is None, (caller_side.error,
                                                                     callee_side.error)
    assert record.ok, record.explain()
    assert "query[NAPTR] example.org" in asked and "query[SRV] _sips._tcp.example.org" in asked
    assert callee_side.sni and set(callee_side.sni) == {"example.org"}  # SNI: the domain
    assert_own_family(record, bob, alice)
    invite = record.uas.received("INVITE")[0]
    assert invite.start.split()[1] == "sips:alice@example.org"  # the R-URI stays
    assert invite.values("via")[0].startswith(f"SIP/2.0/TLS [{GW6}]:5061")
    # RFC 5658 double Record-Route, both TLS: the IPv6 entry faces alice, the IPv4 one bob
    assert invite.values("record-route") == [f"<sip:[{GW6}]:5061;transport=tls;lr;r2=on>",
                                             f"<sip:{GW4}:5061;transport=tls;lr;r2=on>"]
    assert [m.method for m in record.uas.received()] == ["INVITE", "ACK", "BYE"]
    assert_media_both_ways(record)
    assert_kernel_carried(record, kernel_before)
