"""Registrar and location service for the gateway's own domains (RFC 3261 §10.3).

Pure: requests in, responses out, time passed in as ``now``. The gateway's domains
(its addresses and each ``--domain``) are aliases of one another, so an address of
record is keyed by its user part alone (Kamailio's ``use_domain=0``): a phone that
registers as ``sip:bob@[2001:db8:6::1]`` is reached by calling ``sip:bob@203.0.113.1``.

Bindings survive a daemon crash: each changed address of record is handed out by
``drain_records`` (``on_change`` says there is one) for the daemon's journal
(xlat/state.py), and ``restore`` takes them back after a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xlat.addr import Endpoint
from xlat.sip.message import NameAddr, SipRequest, SipResponse, make_response
from xlat.sip.uri import SipUri

__all__ = ["Binding", "Registrar", "RegistrarError"]

MAX_LAPSED = 65536  # users remembered as "registered once, expired since"
log = logging.getLogger(__name__)


class RegistrarError(Exception):
    """A REGISTER the registrar refuses; ``status`` and ``headers`` make the reply."""

    def __init__(
        self, status: int, reason: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, tuple(headers)


@dataclass(frozen=True, slots=True)
class Binding:
    """One contact of an address of record. ``source``/``transport``: where the
    REGISTER came from (a TCP-registered phone is reached over that connection)."""

    contact: NameAddr
    uri: SipUri
    q: float
    expires_at: float
    call_id: str
    cseq: int
    source: Endpoint
    transport: str

    def expires_in(self, now: float) -> int:
        return max(0, round(self.expires_at - now))

    def record(self) -> dict[str, Any]:
        """JSON-able, for ``from_record`` (``expires_at`` in monotonic seconds)."""
        return {"contact": str(self.contact), "q": self.q, "expires_at": self.expires_at,
                "call_id": self.call_id, "cseq": self.cseq, "source": str(self.source),
                "transport": self.transport}

    @classmethod
    def from_record(cls, d: Mapping[str, Any], shift: float = 0.0) -> Binding:
        """Raises ValueError (or KeyError, TypeError) on a record that does not decode."""
        contact = NameAddr.parse(str(d["contact"]))
        if not isinstance(contact.uri, SipUri):
            raise ValueError(f"contact {contact} is not a SIP URI")
        return cls(contact=contact, uri=contact.uri, q=float(d["q"]),
                   expires_at=float(d["expires_at"]) + shift, call_id=str(d["call_id"]),
                   cseq=int(d["cseq"]), source=Endpoint.parse(str(d["source"])),
                   transport=str(d["transport"]))


class Registrar:
    """Bindings per user. ``min_expires``/``max_expires`` bound what phones ask for
    (§10.3 step 7: 423 below the minimum, the maximum silently)."""

    def __init__(
        self, default_expires: int = 3600, min_expires: int = 60, max_expires: int = 86400
    ) -> None:
        self.default_expires = default_expires
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.on_change: Callable[[], None] | None = None
        self._bindings: dict[str, list[Binding]] = {}
        # Users whose every binding expired (not removed by a REGISTER): calls to them
        # get 480, not 404 (RFC 3261 §21.4.18). Bounded: oldest first out.
        self._lapsed: dict[str, None] = {}
        self._dirty: set[str] = set()  # keys changed by a REGISTER since drain_records()

    @staticmethod
    def key(uri: SipUri | str) -> str | None:
        """The location-service key of an AOR or Request-URI: its user part."""
        return uri.user if isinstance(uri, SipUri) else None

    def register(
        self, request: SipRequest, *, source: Endpoint, transport: str, now: float, to_tag: str
    ) -> SipResponse:
        """Process a REGISTER (§10.3 steps 5-8); the 200 lists the current contacts.
        Refusals come back as responses too (400, 423)."""
        try:
            self._update(request, source, transport, now)
        except RegistrarError as exc:
            return make_response(request, exc.status, exc.reason, to_tag, exc.headers)
        key = self.key(request.to.uri)
        assert key is not None
        contacts = [
            f"{b.contact};expires={b.expires_in(now)}" for b in self.lookup(key, now=now)
        ]
        extra = [("Contact", c) for c in contacts]
        return make_response(request, 200, None, to_tag, extra)

    def lookup(self, key: str, *, now: float) -> list[Binding]:
        """Live bindings of a user, highest q first (ties: most recent first)."""
        stored = self._bindings.get(key, [])
        live = [b for b in stored if b.expires_at > now]
        if live:
            self._bindings[key] = live
        else:
            self._bindings.pop(key, None)
            if stored:
                self._lapsed[key] = None
                if len(self._lapsed) > MAX_LAPSED:
                    del self._lapsed[next(iter(self._lapsed))]
        return sorted(live, key=lambda b: (-b.q, -b.expires_at))

    def lapsed(self, key: str, *, now: float) -> bool:
        """A user with no live binding whose last bindings expired by themselves."""
        return not self.lookup(key, now=now) and key in self._lapsed

    def binding(self, uri: SipUri, *, now: float) -> Binding | None:
        """The live binding whose contact is exactly ``uri`` (an in-dialog request to a
        registered phone), if any."""
        key = self.key(uri)
        found = self.lookup(key, now=now) if key else []
        if not found:  # the usual case: a phone that did not register here
            return None
        text = str(uri)
        return next((b for b in found if str(b.uri) == text), None)

    def _update(self, request: SipRequest, source: Endpoint, transport: str, now: float) -> None:
        key = self.key(request.to.uri)
        if key is None:
            raise RegistrarError(404, "No user in the address of record")
        call_id, (cseq, _) = request.call_id, request.cseq
        self._lapsed.pop(key, None)
        header_expires = request.get("Expires")
        current = {str(b.uri): b for b in self.lookup(key, now=now)}
        if request.wildcard_contact:
            if header_expires is None or int(header_expires) != 0:
                raise RegistrarError(400, "Contact: * needs Expires: 0")
            self._check_order(current.values(), call_id, cseq)
            self._bindings.pop(key, None)
            self._changed(key)
            return
        for contact in request.contacts:
            if not isinstance(contact.uri, SipUri):
                raise RegistrarError(400, f"Unsupported contact URI {contact.uri}")
            expires = self._expires(contact, header_expires)
            uri_key = str(contact.uri)
            old = current.get(uri_key)
            if old is not None:
                self._check_order([old], call_id, cseq)
            if expires == 0:
                current.pop(uri_key, None)
                continue
            params = {k: v for k, v in contact.params.items() if k != "expires"}
            stored = NameAddr(contact.uri, contact.display, params)
            current[uri_key] = Binding(
                contact=stored,
                uri=contact.uri,
                q=self._q(contact),
                expires_at=now + expires,
                call_id=call_id,
                cseq=cseq,
                source=source,
                transport=transport,
            )
        self._bindings[key] = list(current.values())
        self._changed(key)

    # ---- crash journal ---------------------------------------------------------------

    def drain_records(self) -> list[tuple[str, list[dict[str, Any]] | None]]:
        """(key, its bindings as records) of every key a REGISTER changed since the last
        call; None for a key left without bindings. Expired bindings need no record:
        ``restore`` drops them."""
        dirty, self._dirty = self._dirty, set()
        out: list[tuple[str, list[dict[str, Any]] | None]] = []
        for key in dirty:
            bindings = self._bindings.get(key)
            out.append((key, [b.record() for b in bindings] if bindings else None))
        return out

    def restore(self, items: Mapping[str, Sequence[Mapping[str, Any]]], *, now: float,
                shift: float = 0.0) -> int:
        """Take back journaled bindings (times moved by ``shift``); expired ones and
        records that do not decode are left out. Returns how many bindings are live."""
        restored = 0
        for key, records in items.items():
            live = []
            if not isinstance(records, list):
                log.warning("journaled bindings of %r not restored: not a list", key)
                records = []
            for d in records:
                try:
                    binding = Binding.from_record(d, shift)
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("journaled binding of %r not restored: %s", key, exc)
                    continue
                if binding.expires_at > now:
                    live.append(binding)
            if live:
                self._bindings[key] = live
                restored += len(live)
            self._dirty.add(key)
        self._changed(None)
        return restored

    def _changed(self, key: str | None) -> None:
        if key is not None:
            self._dirty.add(key)
        if self.on_change is not None:
            self.on_change()

    def _expires(self, contact: NameAddr, header: str | None) -> int:
        """§10.2.1.1: the contact's expires parameter, else the Expires header, else
        the default; zero unregisters; over the maximum is cut to it."""
        value = contact.params.get("expires", header)
        if value is None:
            return min(self.default_expires, self.max_expires)
        if not value.isascii() or not value.isdigit():
            raise RegistrarError(400, f"Bad expires value {value!r}")
        expires = int(value)
        if 0 < expires < self.min_expires:
            raise RegistrarError(
                423, "Interval Too Brief", [("Min-Expires", str(self.min_expires))]
            )
        return min(expires, self.max_expires)

    @staticmethod
    def _q(contact: NameAddr) -> float:
        value = contact.params.get("q")
        if value is None:
            return 1.0
        try:
            q = float(value)
        except ValueError:
            raise RegistrarError(400, f"Bad q value {value!r}") from None
        if not 0.0 <= q <= 1.0:
            raise RegistrarError(400, f"Bad q value {value!r}")
        return q

    @staticmethod
    def _check_order(bindings: Iterable[Binding], call_id: str, cseq: int) -> None:
        """§10.3 step 7: the same Call-ID with a CSeq not above the stored one is an
        old or reordered REGISTER."""
        for b in bindings:
            if b.call_id == call_id and cseq <= b.cseq:
                raise RegistrarError(400, "Out-of-order REGISTER (CSeq not above the last)")
