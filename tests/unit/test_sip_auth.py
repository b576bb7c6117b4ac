"""Digest authentication core (RFC 3261 §22, RFC 7616, RFC 8760) and the users file."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from xlat.sip.auth import (
    NONCE_LIFETIME,
    Credentials,
    DigestAuth,
    UsersError,
    UsersFile,
    Verdict,
    digest_response,
    ha1,
    parse_users,
)

# RFC 7616 §3.9.1: the same request answered with MD5 and with SHA-256
VECTOR = {"nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", "nc": "00000001",
          "cnonce": "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", "qop": "auth",
          "method": "GET", "uri": "/dir/index.html"}


@pytest.mark.parametrize(("algorithm", "expected"), [
    ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
    ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
])
def test_rfc7616_test_vectors(algorithm: str, expected: str) -> None:
    h = ha1(algorithm, "Mufasa", "http-auth@example.org", "Circle of Life")
    assert digest_response(algorithm, h, **VECTOR) == expected


CREDS = Credentials("r.example", {"bob": {"MD5": ha1("MD5", "bob", "r.example", "pw")}})


def auth() -> DigestAuth:
    return DigestAuth(lambda: CREDS, b"s" * 32, random.Random(1))


def answer(challenge: str, user: str = "bob", password: str = "pw", nc: str = "00000001",
           uri: str = "sip:r.example", **override: str) -> str:
    nonce = challenge.split('nonce="')[1].split('"')[0]
    params = {"username": user, "realm": "r.example", "nonce": nonce, "uri": uri,
              "algorithm": "MD5", "cnonce": "abc", "qop": "auth", "nc": nc}
    params["response"] = digest_response("MD5", ha1("MD5", user, "r.example", password),
                                         nonce=nonce, nc=nc, cnonce="abc", qop="auth",
                                         method="REGISTER", uri=uri)
    params.update(override)
    return "Digest " + ", ".join(f'{k}="{v}"' for k, v in params.items())


def test_check_accepts_the_right_answer_once() -> None:
    a = auth()
    challenge = a.challenge(10.0)[1]
    good = answer(challenge)
    assert a.check([good], "REGISTER", 20.0).verdict is Verdict.OK
    assert a.check([good], "REGISTER", 21.0).verdict is Verdict.FAILED
    assert a.check([answer(challenge, nc="00000002")], "REGISTER", 22.0).verdict is Verdict.OK


@pytest.mark.parametrize(("values", "verdict"), [
    ([], Verdict.MISSING),
    (['Digest realm="other.example", username="bob"'], Verdict.MISSING),
    (["Basic Ym9iOnB3"], Verdict.MISSING),
    (['Digest realm="r.example", username="bob", username="eve"'], Verdict.MISSING),
    (['Digest realm="r.example" junk'], Verdict.MISSING),
    (['Digest realm="r.example", username="bob"'], Verdict.FAILED),  # parts missing
])
def test_check_without_usable_credentials(values: list[str], verdict: Verdict) -> None:
    assert auth().check(values, "REGISTER", 0.0).verdict is verdict


@pytest.mark.parametrize("spoil", [
    {"password": "guess"}, {"user": "mallory"}, {"response": "0" * 32},
    {"nonce": "1.2.3"}, {"qop": "auth-int"}, {"nc": "zz"}, {"algorithm": "SHA-512-256"},
])
def test_check_refuses_what_is_wrong(spoil: dict[str, str]) -> None:
    a = auth()
    challenge = a.challenge(0.0)[1]
    kwargs = {k: v for k, v in spoil.items() if k in ("password", "user", "uri")}
    override = {k: v for k, v in spoil.items() if k not in kwargs}
    value = answer(challenge, **kwargs, **override)
    assert a.check([value], "REGISTER", 1.0).verdict is Verdict.FAILED


def test_only_the_algorithms_offered_are_accepted() -> None:
    both = {a: ha1(a, "bob", "r.example", "pw") for a in ("MD5", "SHA-256")}
    a = DigestAuth(lambda: Credentials("r.example", {"bob": both}, ("SHA-256",)), b"s" * 32,
                   random.Random(1))
    (challenge,) = a.challenge(0.0)
    assert "algorithm=SHA-256" in challenge
    md5 = answer(challenge)  # a downgrade to MD5, which the operator left out
    assert a.check([md5], "REGISTER", 1.0).verdict is Verdict.FAILED


def test_an_old_nonce_is_stale_and_a_forged_one_fails() -> None:
    a = auth()
    value = answer(a.challenge(0.0)[1])
    late = a.check([value], "REGISTER", NONCE_LIFETIME + 1)
    assert late.verdict is Verdict.STALE
    other = DigestAuth(lambda: CREDS, b"t" * 32, random.Random(1))  # another secret
    assert other.check([value], "REGISTER", 1.0).verdict is Verdict.FAILED
    assert all("stale=true" in c for c in a.challenge(0.0, stale=True))


def test_users_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    md5 = ha1("MD5", "bob", "r.example", "pw")
    path.write_text(f'realm = "r.example"\n[users]\nbob = {{ MD5 = "{md5}" }}\n')
    users = UsersFile(path)
    assert set(users().users) == {"bob"}
    sha = ha1("SHA-256", "carol", "r.example", "pw")
    path.write_text(f'realm = "r.example"\n[users]\nbob = {{ MD5 = "{md5}" }}\n'
                    f'carol = {{ SHA-256 = "{sha}" }}\n')
    os.utime(path, ns=(1, 1))
    assert set(users().users) == {"bob", "carol"}
    path.write_text("realm = \n")  # broken: the last good contents stay
    os.utime(path, ns=(2, 2))
    assert set(users().users) == {"bob", "carol"}


@pytest.mark.parametrize(("text", "error"), [
    (b"\xff", "utf-8"),
    (b"users = {}", "realm must be a non-empty string"),
    (b'realm = "r"\nusers = 5', "users must be a table"),
    (b'realm = "r"\n[users]\nbob = "pw"', "users.bob must be a table"),
    (b'realm = "r"\n[users]\nbob = { SHA1 = "00" }', "unknown algorithm 'SHA1'"),
    (b'realm = "r"\n[users]\nbob = { MD5 = "00" }', "users.bob.MD5 must be 32 hex digits"),
    (b'realm = "r"\nextra = 1', "unknown keys ['extra']"),
    (b'realm = "r"\nalgorithms = ["MD5", "MD5"]', "algorithms must be a list"),
    (b'realm = "r"\nalgorithms = []', "algorithms must be a list"),
])
def test_a_bad_users_file_is_one_error_naming_the_entry(text: bytes, error: str) -> None:
    with pytest.raises(UsersError, match=r"users\.toml") as info:
        parse_users(text, "users.toml")
    assert error in str(info.value)
