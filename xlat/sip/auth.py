"""SIP Digest authentication (RFC 3261 §22 with RFC 7616's hashes, as RFC 8760 updates
SIP): challenges out, credentials checked, against a users file of hashed HA1 values.

The core (`DigestAuth`) is sans-I/O: time comes in as ``now`` and the nonce secret is
given to it. A nonce is ``<time>.<salt>.<HMAC-SHA-256(secret, time.salt.realm)>``: the
server keeps no table of the nonces it issued, yet can tell its own from a forged one
and an old one (``stale=true``, §22.4 / RFC 7616 §3.3) from a fresh one. The only
state is the last nonce-count seen per nonce, bounded, so a captured Authorization
cannot be replayed (RFC 7616 §3.4.5, qop=auth).

`UsersFile` is the edge: it reads the credentials file (TOML)::

    realm = "xlat.test"
    algorithms = ["SHA-256", "MD5"]   # optional: what the challenges offer, in this order
    [users]
    alice = { SHA-256 = "<hex of SHA-256(alice:xlat.test:password)>", MD5 = "<hex>" }

and reads it again when its modification time or size changes, so users can be
added without a restart (``xlat user hash`` prints such a line).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import random
import re
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# RFC 8760 §2.4: a server offering several algorithms sends one challenge per
# algorithm, the most preferred first; SHA-256 is the one it adds, MD5 stays for the
# phones that know nothing else (RFC 8760 §3: "MD5 ... for backward compatibility").
ALGORITHMS: Mapping[str, Callable[[bytes], hashlib._Hash]] = {
    "SHA-256": hashlib.sha256,
    "MD5": hashlib.md5,
}
PREFERENCE = ("SHA-256", "MD5")
NONCE_LIFETIME = 300.0  # seconds a nonce is accepted; a phone re-registers far less often
MAX_HEADER = 4096  # an Authorization header is a few hundred bytes: refuse before parsing
MAX_NONCES = 65536  # nonce-counts remembered (oldest forgotten first): replays of older
#                     nonces fail anyway once NONCE_LIFETIME has passed
_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]+)\s*(?:,|$)')
_HEX_RE = re.compile(r"[0-9a-f]+")
_DUMMY_HA1 = {name: "0" * len(h(b"").hexdigest()) for name, h in ALGORITHMS.items()}


class UsersError(ValueError):
    """A users file that cannot be used; the message names the file and the entry."""


def ha1(algorithm: str, user: str, realm: str, password: str) -> str:
    """RFC 7616 §3.4.2: H(username ":" realm ":" password), lower-case hex."""
    return _hash(algorithm, f"{user}:{realm}:{password}")


def digest_response(algorithm: str, ha1_hex: str, *, nonce: str, nc: str, cnonce: str,
                    qop: str, method: str, uri: str) -> str:
    """RFC 7616 §3.4.1 with qop=auth: KD(HA1, nonce:nc:cnonce:qop:H(method:uri))."""
    ha2 = _hash(algorithm, f"{method}:{uri}")
    return _hash(algorithm, f"{ha1_hex}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def _hash(algorithm: str, text: str) -> str:
    return ALGORITHMS[algorithm](text.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Credentials:
    """The users one realm knows: user -> algorithm -> HA1 (lower-case hex), and the
    algorithms challenges offer, preferred first (only these are accepted: no
    downgrade to one the operator left out). Some UAs read only the first challenge
    and know only MD5 (SIPp 3.6: "authentication must use MD5"): for them the file
    says ``algorithms = ["MD5"]``."""

    realm: str
    users: Mapping[str, Mapping[str, str]]
    algorithms: tuple[str, ...] = PREFERENCE


def parse_users(data: bytes, source: str) -> Credentials:
    """A users file's bytes -> Credentials. Raises UsersError naming ``source``."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UsersError(f"{source}: {e}") from None
    realm = doc.get("realm")
    if not isinstance(realm, str) or not realm:
        raise UsersError(f"{source}: realm must be a non-empty string")
    table = doc.get("users", {})
    if not isinstance(table, dict):
        raise UsersError(f"{source}: users must be a table")
    users: dict[str, dict[str, str]] = {}
    for user, hashes in table.items():
        if not isinstance(hashes, dict) or not hashes:
            raise UsersError(f"{source}: users.{user} must be a table of algorithm = HA1")
        for algorithm, value in hashes.items():
            width = len(_DUMMY_HA1.get(algorithm, ""))
            if algorithm not in ALGORITHMS:
                raise UsersError(f"{source}: users.{user}: unknown algorithm {algorithm!r} "
                                 f"(one of {', '.join(PREFERENCE)})")
            if not isinstance(value, str) or len(value) != width or not _HEX_RE.fullmatch(
                    value.lower()):
                raise UsersError(f"{source}: users.{user}.{algorithm} must be {width} hex "
                                 "digits")
        users[user] = {a: v.lower() for a, v in hashes.items()}
    algorithms = doc.get("algorithms", list(PREFERENCE))
    if not isinstance(algorithms, list) or not algorithms or len(set(algorithms)) != len(
            algorithms) or not set(algorithms) <= set(ALGORITHMS):
        raise UsersError(f"{source}: algorithms must be a list of {', '.join(PREFERENCE)}")
    unknown = sorted(set(doc) - {"realm", "users", "algorithms"})
    if unknown:
        raise UsersError(f"{source}: unknown keys {unknown}")
    return Credentials(realm, users, tuple(algorithms))


class UsersFile:
    """The credentials file, read again when it changes (mtime or size). A change that
    does not parse is logged and the last good contents stay in force."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self._current = parse_users(path.read_bytes(), str(path))  # first read: errors raise

    def _stat(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size

    def __call__(self) -> Credentials:
        try:
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                self._current = parse_users(self.path.read_bytes(), str(self.path))
                log.info("users file %s re-read: %d users", self.path,
                         len(self._current.users))
        except (OSError, UsersError) as e:
            log.error("users file not re-read, keeping the last good one: %s", e)
        return self._current


class Verdict(enum.Enum):
    OK = "ok"
    MISSING = "missing"  # no credentials for our realm: challenge
    STALE = "stale"  # right password, expired nonce: challenge with stale=true
    FAILED = "failed"  # wrong, unknown user, replayed, forged: challenge again


@dataclass(frozen=True)
class Result:
    verdict: Verdict
    user: str | None = None


class DigestAuth:
    """Challenges and checks Digest credentials for one realm (see the module
    docstring). ``credentials`` is called for the current users (a `UsersFile`, or a
    constant in tests); ``secret`` keys the nonces; ``rng`` salts them."""

    def __init__(self, credentials: Callable[[], Credentials], secret: bytes,
                 rng: random.Random) -> None:
        if len(secret) < 16:
            raise ValueError("the nonce secret must be at least 16 bytes")
        self._credentials = credentials
        self._secret = secret
        self._rng = rng
        self._counts: OrderedDict[str, int] = OrderedDict()

    @property
    def realm(self) -> str:
        return self._credentials().realm

    def challenge(self, now: float, *, stale: bool = False) -> list[str]:
        """One WWW-/Proxy-Authenticate value per algorithm offered, preferred first."""
        nonce = self._nonce(now)
        creds = self._credentials()
        realm = _quote(creds.realm)
        tail = ", stale=true" if stale else ""
        return [f'Digest realm="{realm}", nonce="{nonce}", algorithm={a}, qop="auth"{tail}'
                for a in creds.algorithms]

    def check(self, values: list[str], method: str, now: float) -> Result:
        """Check the Authorization / Proxy-Authorization values of a request: the one
        for our realm (§22.3: others are for someone else) against the users file.
        A user that does not exist fails exactly as a wrong password does, after the
        same work (no enumeration by answer or by time). The digest-uri is not
        compared with the Request-URI (RFC 7616 §3.4.6 says SHOULD): proxies on the
        way rewrite the Request-URI and SIPp sends its next hop there; the uri is
        inside the hashed answer and each nonce-count is accepted once, so a captured
        answer cannot be used again for anything."""
        creds = self._credentials()
        params = None
        for value in values:
            candidate = _parse_digest(value)
            if candidate is not None and candidate.get("realm") == creds.realm:
                params = candidate
                break
        if params is None:
            return Result(Verdict.MISSING)
        user = params.get("username", "")
        algorithm = params.get("algorithm", "MD5")  # RFC 7616 §3.3: absent means MD5
        needed = ("nonce", "uri", "response", "cnonce", "nc", "qop")
        if algorithm not in creds.algorithms or any(k not in params for k in needed) \
                or params["qop"] != "auth" or not re.fullmatch(r"[0-9a-fA-F]{8}", params["nc"]):
            return Result(Verdict.FAILED, user)
        known = creds.users.get(user, {}).get(algorithm)
        expected = digest_response(
            algorithm, known or _DUMMY_HA1[algorithm], nonce=params["nonce"], nc=params["nc"],
            cnonce=params["cnonce"], qop="auth", method=method, uri=params["uri"])
        good = _same(expected, params["response"].lower()) and known is not None
        if not good:
            return Result(Verdict.FAILED, user)
        issued = self._issued(params["nonce"])
        if issued is None:
            return Result(Verdict.FAILED, user)
        if not 0 <= now - issued <= NONCE_LIFETIME:
            return Result(Verdict.STALE, user)
        if not self._count(params["nonce"], int(params["nc"], 16)):
            return Result(Verdict.FAILED, user)  # a replay
        return Result(Verdict.OK, user)

    # ---- nonces ----------------------------------------------------------------------

    def _nonce(self, now: float) -> str:
        stamp = f"{int(now * 1000):x}.{self._rng.getrandbits(64):016x}"
        return f"{stamp}.{self._mac(stamp)}"

    def _mac(self, stamp: str) -> str:
        msg = f"{stamp}.{self.realm}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:32]

    def _issued(self, nonce: str) -> float | None:
        """When we issued ``nonce`` (seconds), None if we did not."""
        stamp, _, mac = nonce.rpartition(".")
        if not _same(self._mac(stamp), mac):
            return None
        millis = stamp.split(".", 1)[0]
        return int(millis, 16) / 1000

    def _count(self, nonce: str, nc: int) -> bool:
        """RFC 7616 §3.4.5: each nonce-count is used once, increasing."""
        last = self._counts.get(nonce, 0)
        if nc <= last:
            return False
        self._counts[nonce] = nc
        self._counts.move_to_end(nonce)
        while len(self._counts) > MAX_NONCES:
            self._counts.popitem(last=False)
        return True


def _same(ours: str, theirs: str) -> bool:
    """Constant-time comparison of our hex digest with a client's text (which may hold
    any character: compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(ours.encode(), theirs.encode("utf-8", "surrogateescape"))


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _parse_digest(value: str) -> dict[str, str] | None:
    """``Digest k=v, k="v", ...`` -> params (quoted values unquoted), None when it is
    not a Digest credential or does not parse."""
    if len(value) > MAX_HEADER:
        return None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None:
            return None
        name, raw = m.group(1).lower(), m.group(2)
        if name in params:
            return None  # RFC 7616 §3.4: each parameter at most once
        params[name] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        pos = m.end()
    return params
