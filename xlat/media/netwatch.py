"""Interfaces come and go: netlink link events keep the eBPF program on the right ones.

On a router, interfaces vanish and are re-created with a new ifindex (ppp, WireGuard,
VLANs, a veth of a restarted container), and a tc filter dies with its device.
``LinkPolicy`` is the sans-I/O core: link events in, what to do out — attach the
program to a wanted interface that appeared, came up, or came back with a new ifindex;
forget one that vanished. Wanted are the ``--interface`` names, or, with none given,
every non-loopback interface that is up (as at start-up). ``LinkWatcher`` is the edge:
a thread on a netlink socket bound to RTMGRP_LINK (messages parsed by pyroute2) that
feeds the policy and carries
out its actions on the ``EbpfDatapath`` (whose next-hop caches are invalidated on each
change, so no flow keeps sending to a gone ifindex). Each event is logged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger("xlat.netwatch")

IFF_UP = 0x1
POLL = 0.5  # seconds the watcher thread waits for events before checking for stop
RCVBUF = 1 << 20  # bytes: a burst of link events (many VLANs at once) fits


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """One RTM_NEWLINK (``gone`` False) or RTM_DELLINK."""

    name: str
    index: int
    up: bool
    gone: bool = False


@dataclass(frozen=True, slots=True)
class Attach:
    name: str
    index: int


@dataclass(frozen=True, slots=True)
class Forget:
    name: str
    index: int


Action = Attach | Forget


class LinkPolicy:
    """What a link event means for the datapath (see the module doc).

    ``wanted``: interface names, or None for every non-loopback interface that is up.
    ``attached``: name -> ifindex the program is on now (kept up to date here).
    ``event()`` returns (a line for the log or None, an action or None).
    """

    def __init__(self, wanted: Sequence[str] | None, attached: dict[str, int]) -> None:
        self.wanted = None if wanted is None else frozenset(wanted)
        self.attached = dict(attached)
        # name -> (ifindex, up), for the log; attached ones were up when attached
        self._seen: dict[str, tuple[int, bool]] = {n: (i, True) for n, i in attached.items()}

    def _wants(self, name: str) -> bool:
        return name != "lo" if self.wanted is None else name in self.wanted

    def event(self, ev: LinkEvent) -> tuple[str | None, Action | None]:
        before = self._seen.get(ev.name)
        if ev.gone:
            self._seen.pop(ev.name, None)
            if self.attached.get(ev.name) == ev.index:
                del self.attached[ev.name]
                return f"{ev.name} (ifindex {ev.index}) vanished", Forget(ev.name, ev.index)
            return (None if before is None else f"{ev.name} vanished"), None
        self._seen[ev.name] = (ev.index, ev.up)
        if before is None:
            what = f"{ev.name} appeared (ifindex {ev.index}, {'up' if ev.up else 'down'})"
        elif before[0] != ev.index:
            what = f"{ev.name} re-created (ifindex {before[0]} -> {ev.index})"
        elif before[1] != ev.up:
            what = f"{ev.name} is {'up' if ev.up else 'down'}"
        else:
            what = None  # another attribute changed
        if not (ev.up and self._wants(ev.name)) or self.attached.get(ev.name) == ev.index:
            return what, None
        self.attached[ev.name] = ev.index
        return what or f"{ev.name} (ifindex {ev.index})", Attach(ev.name, ev.index)

    def reconcile(self, links: Iterable[LinkEvent]) -> list[tuple[str | None, Action | None]]:
        """A full dump of the links: the actions for what changed since ``attached`` was
        true, including attached interfaces that are no longer there (links that need
        nothing are only remembered)."""
        links = list(links)
        present = {ev.name for ev in links}
        out = [self.event(ev) for ev in links]
        for name, index in list(self.attached.items()):
            if name not in present:
                out.append(self.event(LinkEvent(name, index, up=False, gone=True)))
        return [(what, action) for what, action in out if action is not None]


def link_event(msg: Any) -> LinkEvent | None:
    """A pyroute2 link message as a LinkEvent (None for anything else)."""
    kind = msg.get("event")
    name = msg.get_attr("IFLA_IFNAME")
    if kind not in ("RTM_NEWLINK", "RTM_DELLINK") or name is None:
        return None
    return LinkEvent(str(name), int(msg["index"]), bool(msg["flags"] & IFF_UP),
                     gone=kind == "RTM_DELLINK")


class LinkWatcher:
    """The thread that applies ``LinkPolicy`` to ``datapath`` (an EbpfDatapath:
    ``attached``, ``attach_link(name, index)``, ``link_gone(name)``)."""

    def __init__(self, datapath: Any, wanted: Sequence[str] | None) -> None:
        self.datapath = datapath
        self.policy = LinkPolicy(wanted, datapath.attached)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xlat-netwatch", daemon=True)

    def start(self) -> None:
        """Start the thread. It binds to link events, then reconciles with a dump, so a
        change made before the bind is not missed either. pyroute2's synchronous API
        (the dump) runs its own event loop: it stays in the thread."""
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        # A plain netlink socket, parsed datagram by datagram: pyroute2's IPRoute.get()
        # behind select() kept messages it had read in its own queue until the next
        # datagram arrived, which delayed or lost link events.
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.bind((0, RTMGRP_LINK))  # before the dump: no event falls in between
            sock.settimeout(POLL)
            self._reconcile()
            marshal = MarshalRtnl()
            while not self._stop.is_set():
                try:
                    data = sock.recv(RCVBUF)
                except TimeoutError:
                    continue
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        log.warning("link events overflowed the socket: re-reading all links")
                        self._reconcile()
                    else:
                        log.exception("reading link events failed")
                        self._stop.wait(POLL)
                    continue
                for msg in marshal.parse(data):
                    ev = link_event(msg)
                    if ev is not None:
                        self._apply(*self.policy.event(ev))

    def _reconcile(self) -> None:
        with IPRoute() as ipr:
            dump = [ev for ev in map(link_event, ipr.get_links()) if ev is not None]
        for what, action in self.policy.reconcile(dump):
            self._apply(what, action)

    def _apply(self, what: str | None, action: Action | None) -> None:
        if action is None:
            if what is not None:
                log.info("link %s", what)
            return
        try:
            if isinstance(action, Attach):
                self.datapath.attach_link(action.name, action.index)
                log.info("link %s: eBPF program attached", what)
            else:
                self.datapath.link_gone(action.name)
                log.warning("link %s: its filter is gone with it; cached next hops are "
                            "looked up again", what)
        except Exception:
            log.exception("link %s: updating the datapath failed", what)
            with contextlib.suppress(KeyError):  # retried on the link's next event
                del self.policy.attached[action.name]
