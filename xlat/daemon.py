"""``xlat run``: the asyncio daemon that wires signalling, sessions and datapath.

Start-up order: refuse if a live daemon holds the control socket or an
interface; attach the datapath; start SIP and NG; open the control socket last,
so a client that can connect talks to a daemon that is ready. Shutdown undoes it
in reverse and removes tc filters and the nft table unless ``keep_datapath``.

Crash safety: sessions, registrar bindings and NAT64 flows are journaled
(xlat/state.py) in the state directory, in the same loop turn as the datapath batch
and before it, so the journal never knows less about kernel flows than the kernel. A
daemon started over a journal (after a crash, or a ``--keep-datapath`` stop) restores
its sessions, leaves the kernel flows they explain as they are (counters, latched
addresses) and removes only the flows no session explains. A start that fails after
adopting calls leaves them (kernel state and journal) to the next daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from xlat import eventloop, state, systemd
from xlat.addr import Endpoint
from xlat.config import Config, ConfigError
from xlat.control.api import ControlError, ControlServer, Registry, listening
from xlat.host import InterfaceBusy, InterfaceLocks, default_interfaces, raise_fd_limit
from xlat.media import reasons
from xlat.media.datapath import CompositeDatapath, FlowCounters, Forwarder
from xlat.media.model import State
from xlat.media.ports import RelayPortPool
from xlat.media.session import MediaSession, SessionManager

if TYPE_CHECKING:
    from xlat.media.nft import NftGuard
    from xlat.sip.proxy import SipProxy

log = logging.getLogger("xlat")

TABLE_CHECK = 1.0  # seconds between checks that table inet xlat is still there
# Sessions one expiry pass looks at before the loop serves signalling again: a mass
# expiry (10k calls idle at once) becomes many short passes, not one long stall.
EXPIRY_BATCH = 100
JOURNAL_SYNC = 1.0  # seconds between fdatasyncs of the journal (for power loss)
# What SIGHUP (``systemctl reload``) applies: where requests go and the limits new
# calls get. Live calls keep their timers and caps; the rest needs a restart.
RELOADABLE = ("domains", "routes", "nat64_prefixes", "idle_timeout", "delete_delay",
              "latch", "rate_limit_pps", "log_level", "trusted", "sip_rate")
# What the SIP rate limit in table inet xlat is built from (route targets are exempt)
GUARD_CONFIG = ("routes", "trusted", "sip_rate")


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    STARTUP_FAILURE = 3


class StartupError(Exception):
    """The daemon cannot start; the message says why in one line."""


class Daemon:
    """One gateway: see the module docstring."""

    def __init__(self, config: Config, loader: Callable[[], Config] | None = None) -> None:
        self.config = config
        self._loader = loader  # reads the configuration again, for SIGHUP
        self.keep_datapath = config.keep_datapath
        self.started = time.monotonic()
        self.datapath = CompositeDatapath([])  # forwarders + nft guard, once attached
        self.manager = SessionManager(
            {
                4: [RelayPortPool(a, config.port_min, config.port_max) for a in config.media_v4],
                6: [RelayPortPool(a, config.port_min, config.port_max) for a in config.media_v6],
            },
            idle_timeout=config.idle_timeout,
            delete_delay=config.delete_delay,
            latch=config.latch,
            rate_limit_pps=config.rate_limit_pps,
        )
        self.manager.on_change = self._schedule_flush
        self.manager.on_end = self._summarize
        # media of ended calls by family direction ("v6->v4"): [packets, bytes]
        self.ended_media: dict[str, list[int]] = {}
        self._flush_pending = False
        self.nft_guard: NftGuard | None = None  # table inet xlat, once started
        self._reload_task: asyncio.Task[None] | None = None  # a reload still in progress
        self._closers: list[Any] = []  # async-closable servers, closed in reverse
        self.sip: Any = None  # the SipServer, the NgServer: read by metrics
        self.ng: Any = None
        self.version = _version()
        self._control: ControlServer | None = None
        self._locks: InterfaceLocks | None = None
        self._ebpf_problem: Exception | None = None  # --datapath auto: why not eBPF
        self._reserved: Any = None  # ephemeral.ReservedPorts while we run
        self._links: Any = None  # netwatch.LinkWatcher (eBPF only)
        self._table_task: asyncio.Task[None] | None = None
        self.table_restored = 0  # times table inet xlat was re-created after a flush
        self._should_exit = asyncio.Event()
        self._syncer: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None  # fires at _expiry_at
        self._expiry_at = 0.0  # uvloop's call_at handles have no when()
        self._ready = False  # start() completed
        self.journal = state.Journal()
        self._journal_files = state.JournalFiles(config.state_dir,
                                                 state.journal_name(config.control))
        self._saved = state.Replay()  # what the previous daemon journaled, until adopted
        self._clock_shift = 0.0
        self._proxy: SipProxy | None = None
        self._compaction: asyncio.Future[None] | None = None  # its slow part, in a thread

    # ---- lifecycle --------------------------------------------------------------

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (a second SIGINT exits at once)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        watchdog: asyncio.Task[None] | None = None
        try:
            await self.start()
            status = f"media relayed by {self.media_relay}, control {self.config.control}"
            log.info("xlat ready: %s", status)
            systemd.notify("READY=1", f"STATUS={status}")
            period = systemd.watchdog_period()
            if period is not None:
                watchdog = asyncio.create_task(self._watchdog(period))
            await self._should_exit.wait()
        finally:
            systemd.notify("STOPPING=1")
            if watchdog is not None:
                watchdog.cancel()
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _watchdog(self, period: float) -> None:
        """WATCHDOG=1 from the event loop itself: a loop stuck for WatchdogSec gets
        the daemon killed and restarted (its calls adopted)."""
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(period)

    def reload(self) -> None:
        """SIGHUP: read the configuration again and apply RELOADABLE fields: new
        requests and calls see them, live calls keep what they were set up with. A
        file that does not load changes nothing."""
        if self._loader is None:
            log.warning("SIGHUP: no configuration to reload")
            return
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = self._loader()
        except ConfigError as e:
            log.error("reload failed, running configuration kept: %s", e)
            systemd.notify("READY=1")
            return
        old = self.config
        changed = [f.name for f in fields(Config) if getattr(new, f.name) != getattr(old, f.name)]
        fixed = [name for name in changed if name not in RELOADABLE]
        if fixed:
            log.warning("reload: %s changed; that takes a restart", ", ".join(fixed))
        self.config = cfg = replace(old, **{n: getattr(new, n) for n in changed
                                            if n in RELOADABLE})
        manager = self.manager
        manager.idle_timeout, manager.delete_delay = cfg.idle_timeout, cfg.delete_delay
        manager.latch, manager.rate_limit_pps = cfg.latch, cfg.rate_limit_pps
        logging.getLogger().setLevel(cfg.log_level.upper())
        if self.sip is not None:
            from xlat.sip.transport import proxy_config

            self.sip.proxy.reconfigure(proxy_config(cfg))
        applied = ", ".join(n for n in changed if n in RELOADABLE) or "no change"
        if self.nft_guard is not None and set(changed) & set(GUARD_CONFIG):
            self._reload_task = asyncio.create_task(self._reload_guard(cfg, applied))
            return
        log.info("reloaded: %s", applied)
        systemd.notify("READY=1")

    async def _reload_guard(self, cfg: Config, applied: str) -> None:
        """The SIP rate limit's exempt sources (route targets are looked up again) and
        rate, replaced in table inet xlat; then READY=1."""
        from xlat.media.nft import trusted_sources

        assert self.nft_guard is not None
        try:
            trusted = await asyncio.to_thread(trusted_sources, cfg)
            await asyncio.to_thread(self.nft_guard.reconfigure, cfg.sip_rate, trusted)
        except Exception as e:  # the table keeps its previous limit
            log.error("reload: SIP rate limit in table inet xlat not updated: %s", e)
        else:
            log.info("SIP rate limit %d packets/s per source; exempt: %s", cfg.sip_rate,
                     ", ".join(map(str, trusted)) or "none")
        log.info("reloaded: %s", applied)
        systemd.notify("READY=1")

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._should_exit.is_set() and sig == signal.SIGINT:
            log.warning("second SIGINT: exiting now")
            os._exit(ExitCode.FAILURE)
        log.info("%s: shutting down", signal.Signals(sig).name)
        self._should_exit.set()

    def request_exit(self) -> None:
        self._should_exit.set()

    async def start(self) -> None:
        cfg = self.config
        if listening(cfg.control):
            raise StartupError(f"another xlat is running on {cfg.control}")
        # pyroute2's synchronous API runs its own event loop: keep it off ours
        interfaces = list(cfg.interfaces) or await asyncio.to_thread(default_interfaces)
        if not interfaces:
            raise StartupError("no interface to attach to (none is up)")
        if cfg.datapath != "userspace":  # first: a missing privilege fails nothing before it
            from xlat.media.ebpf import EbpfError, require

            try:
                await asyncio.to_thread(require, interfaces, cfg.bpffs)
            except EbpfError as e:
                if cfg.datapath == "ebpf":
                    raise StartupError(f"eBPF datapath: {e}") from None
                self._ebpf_problem = e
        self._locks = InterfaceLocks(interfaces)
        try:
            self._locks.acquire()
        except InterfaceBusy as e:
            raise StartupError(str(e)) from None
        log.debug("file descriptor limit %d", raise_fd_limit())
        self._load_journal()
        await self._attach_datapath(interfaces)
        self._adopt()
        await self._start_signalling()
        self._start_journal()
        self._syncer = asyncio.create_task(self._sync_journal())
        self._arm_expiry()
        self._control = ControlServer(self._registry(), cfg.control)
        await self._control.start()
        # Start-up objects never die: keep them out of every collection, and collect
        # young objects less often (a call's transactions free themselves by refcount).
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        self._ready = True

    async def stop(self) -> None:
        # a start that failed after adopting live calls must not end them
        keep = self.keep_datapath or (not self._ready and bool(self.manager.sessions()))
        if self._control is not None:
            await self._control.close()
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
        if self._expiry is not None:
            self._expiry.cancel()
        for server in reversed(self._closers):
            try:
                result = server.close()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("closing %s failed", type(server).__name__)
        if self._table_task is not None:
            self._table_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._table_task
        if self._links is not None:
            await asyncio.to_thread(self._links.close)
        self.datapath.flush_guard()
        if self._compaction is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._compaction)
        self._close_journal(keep)
        await self.datapath.close(keep)
        if self._reserved is not None:
            try:
                self._reserved.close()
            except OSError as e:
                log.warning("could not give back the reserved relay ports: %s", e)
        if self._locks is not None:
            self._locks.release()
        log.info("stopped%s", " (kernel state kept for the next daemon)" if keep else "")

    # ---- datapath -----------------------------------------------------------------

    async def _attach_datapath(self, interfaces: list[str]) -> None:
        """Bring up what relays media, failing closed: with ``--datapath ebpf`` a kernel
        path that cannot come up stops the start before anything in the kernel changed
        (see ebpf.py for the order); only ``--datapath auto`` falls back to sockets."""
        from xlat.media.nft import NftError, NftGuard, trusted_sources

        cfg = self.config
        ebpf = None
        problem = self._ebpf_problem
        if cfg.datapath != "userspace" and problem is None:
            try:
                ebpf = await asyncio.to_thread(self._prepare_ebpf, interfaces)
            except Exception as e:  # EbpfError, or ImportError: no python3-bpfcc
                if cfg.datapath == "ebpf":
                    raise StartupError(f"eBPF datapath: {e}") from None
                problem = e
        if problem is not None:
            log.warning("!!! --datapath auto: the eBPF datapath is unavailable (%s): the "
                        "userspace relay moves every media packet through Python !!!", problem)
        forwarders: list[Forwarder] = [] if ebpf is None else [ebpf]
        if ebpf is None or cfg.fallback_relay:
            from xlat.media.userspace import UserspaceRelay

            forwarders.append(UserspaceRelay())
        trusted = await asyncio.to_thread(trusted_sources, cfg)
        log.info("SIP rate limit %d packets/s per source on %s; exempt: %s", cfg.sip_rate,
                 ", ".join(map(str, cfg.sip_endpoints())) or "no listener",
                 ", ".join(map(str, trusted)) or "none")
        try:
            guard = NftGuard(cfg.media, cfg.port_min, cfg.port_max,
                             sip_listen=cfg.sip_endpoints(), sip_rate=cfg.sip_rate,
                             trusted=trusted)
        except NftError as e:
            if ebpf is not None:  # nothing attached yet; pins left as they were
                await asyncio.to_thread(ebpf.close, True)
            raise StartupError(f"nftables table inet xlat: {e}; fix: `xlat check`") from None
        self.datapath = CompositeDatapath(forwarders, guard,
                                          asyncio.get_running_loop().call_later)
        self.nft_guard = guard
        if ebpf is not None:
            await asyncio.to_thread(ebpf.attach)
            from xlat.media.netwatch import LinkWatcher

            self._links = LinkWatcher(ebpf, cfg.interfaces or None)
            self._links.start()
        self._table_task = asyncio.create_task(self._watch_table(guard))
        log.info("datapath attached to %s: media relayed by %s", ", ".join(interfaces),
                 self.media_relay)
        from xlat.media.ephemeral import ReservedPorts

        try:
            self._reserved = ReservedPorts(cfg.port_min, cfg.port_max)
            log.info("relay ports %d-%d kept from ephemeral use (ip_local_reserved_ports)",
                     cfg.port_min, cfg.port_max)
        except (OSError, ValueError) as e:
            log.warning("cannot reserve the relay ports from ephemeral use (%s): a reply to "
                        "a socket on a media address may be dropped as unallocated", e)

    async def _watch_table(self, guard: Any) -> None:
        """Re-create table inet xlat within TABLE_CHECK of its deletion (``nft flush
        ruleset``, which every reload of Debian's nftables.service runs), with the
        configuration and the relay ports of the flows the userspace relay serves."""
        while True:
            await asyncio.sleep(TABLE_CHECK)
            try:
                if guard.present():
                    continue
                admitted = [] if not self.datapath.admits else [
                    f for s in self.manager.sessions() for f in self.manager.flows(s)]
                guard.restore(admitted)
            except Exception:
                log.exception("re-creating table inet xlat failed")
                continue
            self.table_restored += 1
            log.warning("table inet xlat was deleted (nft flush ruleset?): re-created it with "
                        "%d relay port(s) admitted (%d time(s) so far)", len(admitted),
                        self.table_restored)

    def _prepare_ebpf(self, interfaces: list[str]) -> Any:
        """Mount a bpffs if needed, compile and verify: everything but attaching (the
        start-up checks, ebpf.require, have passed)."""
        from xlat.media import ebpf

        mounted = ebpf.mount_bpffs(self.config.bpffs)
        if mounted is not None:
            log.info("mounted a bpf filesystem at %s (%s was on none)", mounted,
                     self.config.bpffs)
        return ebpf.EbpfDatapath(interfaces, self.config.bpffs, attach=False)

    @property
    def media_relay(self) -> str:
        """Which datapath relays media: ``ebpf`` (the kernel), ``userspace`` (Python), or
        ``ebpf+userspace`` (the kernel, sockets for what it passes up)."""
        return self.datapath.name

    # ---- crash journal and adoption --------------------------------------------------

    def _load_journal(self) -> None:
        """Read what the previous daemon journaled (before anything in the kernel
        changes: an unusable state directory stops the start)."""
        files = self._journal_files
        try:
            self._saved = files.load()
        except OSError as e:
            raise StartupError(f"state directory {files.directory}: {e.strerror or e} "
                               "(give a writable --state-dir)") from None
        if self._saved.torn or self._saved.skipped:
            log.warning("journal %s: dropped %d torn and %d unreadable record(s)",
                        files.log_path, self._saved.torn, self._saved.skipped)
        self._clock_shift = state.clock_shift(self._saved.table("meta").get("clock"),
                                              state.boot_id(), time.monotonic(), time.time())

    def _adopt(self) -> None:
        """Take over what a previous daemon left: its journaled sessions, and its kernel
        flows. A flow a session explains is left as it is (no reinstall: its counters
        and what latching learnt survive); one it lacks is installed; the rest is stale
        and removed."""
        flows = self.manager.restore(self._saved.table("session").values(), self._now(),
                                     self._clock_shift)
        self.datapath.adopt(flows)
        if self.manager.sessions():
            log.info("adopted %d session(s) from the journal", len(self.manager.sessions()))

    def _adopt_signalling(self, proxy: SipProxy) -> None:
        """Journaled registrations and NAT64 flows go back into the proxy before SIP is
        served."""
        self._proxy = proxy
        proxy.on_change = proxy.registrar.on_change = self._schedule_flush
        now = self._now()
        bindings = proxy.registrar.restore(self._saved.table("binding"), now=now,
                                           shift=self._clock_shift)
        flows = proxy.restore(self._saved.table("nat64_flow"), now=now, shift=self._clock_shift)
        if bindings or flows:
            log.info("restored %d registration(s), %d NAT64 flow(s) from the journal",
                     bindings, flows)

    def _start_journal(self) -> None:
        """Journal what this daemon starts with (the adopted state) as a fresh snapshot."""
        self.journal.put("meta", "clock",
                         state.clock(state.boot_id(), time.monotonic(), time.time()))
        self._journal_changes()
        try:
            self._journal_files.start(self.journal)
        except OSError as e:
            raise StartupError(f"state directory {self._journal_files.directory}: "
                               f"{e.strerror or e}") from None
        self._saved = state.Replay()

    def _journal_changes(self) -> None:
        """Move what changed since the last call into the journal: sessions, registrar
        bindings, NAT64 flows (each owner hands out its changed entries, None = gone)."""
        self.journal.update("session", self.manager.drain_records())
        if self._proxy is not None:
            self.journal.update("binding", self._proxy.registrar.drain_records())
            self.journal.update("nat64_flow", self._proxy.drain_records())

    def _write_journal(self) -> None:
        self._journal_changes()
        try:
            slow = self._journal_files.write(self.journal)
        except OSError as e:  # disk full: keep serving, the next write tries again
            log.error("journal %s not written: %s", self._journal_files.log_path, e)
            return
        if slow is not None:  # a compaction: its fsync and renames off the loop
            self._compaction = asyncio.get_running_loop().run_in_executor(None, slow)
            self._compaction.add_done_callback(self._compacted)

    def _compacted(self, done: asyncio.Future[None]) -> None:
        failed = done.cancelled() or done.exception() is not None
        if failed and not done.cancelled():
            log.error("journal %s not compacted: %s", self._journal_files.snapshot_path,
                      done.exception())
        self._journal_files.compacted(failed)

    def _close_journal(self, keep: bool) -> None:
        """Journal the last changes. Without ``keep`` the calls end with the datapath:
        their sessions leave the journal (registrations stay); files with nothing left
        are removed."""
        if not self._journal_files.started:
            return
        self._journal_changes()
        if not keep:
            self.journal.drop("session")
        worth = any(self.journal.count(t) for t in ("session", "binding", "nat64_flow"))
        try:
            self._journal_files.close(self.journal if worth else None)
        except OSError as e:
            log.error("journal %s not saved: %s", self._journal_files.snapshot_path, e)
            return
        if worth:
            log.info("journaled %d session(s), %d registration(s) in %s",
                     self.journal.count("session"), self.journal.count("binding"),
                     self._journal_files.directory)

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Hand the changes queued during this loop turn to the datapath (the forwarders
        at once, the nft guard batched: CompositeDatapath) and re-arm media expiry."""
        self._flush_pending = False
        self._write_journal()  # first: the journal never knows less than the kernel
        self.datapath.apply(self.manager.drain())
        self._arm_expiry()

    def _summarize(self, session: MediaSession, reason: str, now: float) -> None:
        """One line per ended session (its flows still hold their counters): how long it
        lasted, packets and bytes each way (A = the offerer or peer A), why it ended."""
        try:
            ways = self.manager.each_way(session, self.datapath.counters)
        except Exception:  # a datapath that cannot be read must not keep a call alive
            log.exception("counters of session %s unreadable", session.id)
            ways = {}
        fam_a, fam_b = session.families
        for way, directed in (("a->b", f"v{fam_a}->v{fam_b}"), ("b->a", f"v{fam_b}->v{fam_a}")):
            total = self.ended_media.setdefault(directed, [0, 0])
            total[0] += ways.get(way, (0, 0))[0]
            total[1] += ways.get(way, (0, 0))[1]
        summary = {"origin": session.origin, "reason": reason,
                   "duration": round(now - session.created, 3),
                   "families": f"v{fam_a}/v{fam_b}",
                   **{way: {"packets": p, "bytes": b} for way, (p, b) in ways.items()}}
        a, b = ways.get("a->b", (0, 0)), ways.get("b->a", (0, 0))
        log.info("%s session ended (%s) after %.1f s: A->B %d packets %d bytes, "
                 "B->A %d packets %d bytes", session.origin, reason, summary["duration"],
                 *a, *b, extra={"call_id": session.call_id, "session": session.id,
                                "call": summary})

    def _now(self) -> float:
        """The one clock of signalling and media: CLOCK_MONOTONIC, the clock of the loop's
        time() (SIP timers run on it) and of the kernel's last_seen. Not the running
        loop's own method: control commands are also served where no loop runs."""
        return time.monotonic()

    def _arm_expiry(self) -> None:
        """Make the loop call ``_expire`` at the manager's next deadline, as the SIP edge
        arms its timers. One armed at or before it stays (firing early finds nothing
        due, and re-arms)."""
        deadline = self.manager.next_deadline()
        if deadline is None:
            return
        if self._expiry is not None:
            if self._expiry_at <= deadline:
                return
            self._expiry.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a command served with no loop running: run() arms it
            return
        self._expiry = loop.call_at(deadline, self._expire, deadline)
        self._expiry_at = deadline

    def _expire(self, scheduled: float) -> None:
        """End what is due, EXPIRY_BATCH at a time: with more due the next deadline is
        past, and the loop serves what waits before the next pass."""
        self._expiry = None
        try:
            self.manager.expire(max(scheduled, self._now()), self.datapath.counters,
                                limit=EXPIRY_BATCH)
        except Exception:  # a bug here must not stop every later expiry
            log.exception("expiry sweep failed")
        self._arm_expiry()

    async def _sync_journal(self) -> None:
        """fdatasync the journal every JOURNAL_SYNC (for power loss)."""
        while True:
            await asyncio.sleep(JOURNAL_SYNC)
            try:
                await asyncio.to_thread(self._journal_files.sync)
            except OSError as e:
                log.error("journal %s not synced: %s", self._journal_files.log_path, e)

    # ---- signalling -----------------------------------------------------------------

    async def _start_signalling(self) -> None:
        cfg = self.config
        if cfg.ng_listen is not None:
            from xlat.control.ng import NgCore, start_ng

            core = NgCore(self.manager, interfaces=cfg.ng_interfaces,
                          counters=self.datapath.counters)
            self.ng = await start_ng(core, cfg.ng_listen)
            self._closers.append(self.ng)
            log.info("NG control listening on udp %s", cfg.ng_listen)
        if cfg.sip_endpoints():
            from xlat.sip.transport import TlsSetupError, start_proxy

            try:
                self.sip = await start_proxy(cfg, self.manager, self._adopt_signalling)
                if self.nft_guard is not None:  # known peers leave the strangers' rate
                    self.sip.tell_peers = self.nft_guard.know
            except TlsSetupError as e:
                raise StartupError(str(e)) from None
            self._closers.append(self.sip)
            log.info("SIP listening on %s", ", ".join(map(str, cfg.sip_endpoints())))
        if cfg.metrics_listen is not None:
            from xlat.metrics import start_metrics

            try:
                metrics = await start_metrics(self, cfg.metrics_listen)
            except OSError as e:
                raise StartupError(f"metrics-listen {cfg.metrics_listen}: "
                                   f"{e.strerror or e}") from None
            self._closers.append(metrics)
            log.info("metrics on http://%s/metrics", metrics.address)

    # ---- control commands -------------------------------------------------------------

    def _registry(self) -> Registry:
        reg = Registry()
        reg.add("version", lambda: {"version": self.version, "pid": os.getpid()})
        reg.add("session.list", self._session_list)
        reg.add("session.show", self._session_show, required={"id": str})
        reg.add("session.add", self._session_add, required={"peer_a": str, "peer_b": str},
                optional={"timeout": float, "lifetime": float})
        reg.add("session.del", self._session_del, required={"id": str})
        reg.add("session.flush", self._session_flush)
        reg.add("call.show", self._call_show, required={"call_id": str})
        reg.add("call.del", self._call_del, required={"call_id": str})
        reg.add("flow.list", self._flow_list)
        reg.add("stats", self._stats)
        reg.add("log.level", self._log_level, optional={"level": str})
        reg.add("exit", self._exit, optional={"keep_datapath": bool})
        return reg

    def _describe(self, session: Any, now: float) -> dict[str, Any]:
        d = session.describe(now)
        flows = self.manager.flows(session)
        counts = self.datapath.counters([f.match for f in flows])
        d["packets"] = sum(c.packets for c in counts.values())
        d["bytes"] = sum(c.bytes for c in counts.values())
        return d

    def _session_list(self) -> list[dict[str, Any]]:
        now = self._now()
        return [self._describe(s, now) for s in self.manager.sessions()]

    def _session_show(self, id: str) -> dict[str, Any]:
        now = self._now()
        session = self.manager.get(id)
        d = self._describe(session, now)
        d["flows"] = self._flows_of([session], now)
        return d

    def _session_add(self, peer_a: str, peer_b: str, timeout: float | None = None,
                     lifetime: float | None = None) -> dict[str, Any]:
        a, b = _peer("peer_a", peer_a), _peer("peer_b", peer_b)
        if timeout is not None and timeout <= 0:
            raise ControlError("timeout must be positive")
        if lifetime is not None and lifetime <= 0:
            raise ControlError("lifetime must be positive")
        now = self._now()
        session = self.manager.add(a, b, now=now, idle_timeout=timeout, lifetime=lifetime)
        self._flush()  # the kernel has the flows before the caller hears of the relays
        return self._describe(session, now)

    def _session_del(self, id: str) -> dict[str, Any]:
        session = self.manager.remove(id, now=self._now())
        self._flush()  # forwarding has stopped when the caller hears of it
        return {"id": session.id, "deleted": True}

    def _session_flush(self) -> dict[str, int]:
        return {"deleted": self.manager.flush(now=self._now())}

    def _call(self, call_id: str) -> list[MediaSession]:
        """Every session of a Call-ID: one per answer (forks)."""
        sessions = self.manager.find(call_id)
        if not sessions:
            raise ControlError(f"no session has call-id {call_id}")
        return sessions

    def _call_show(self, call_id: str) -> list[dict[str, Any]]:
        now = self._now()
        return [{**self._describe(s, now), "flows": self._flows_of([s], now)}
                for s in self._call(call_id)]

    def _call_del(self, call_id: str) -> dict[str, Any]:
        now = self._now()
        deleted = [self.manager.remove(s.id, now=now).id for s in self._call(call_id)]
        self._flush()  # forwarding has stopped when the caller hears of it
        return {"call_id": call_id, "deleted": deleted}

    def _flows_of(self, sessions: Sequence[Any], now: float) -> list[dict[str, Any]]:
        flows = [f for s in sessions for f in self.manager.flows(s)]
        counts = self.datapath.counters([f.match for f in flows])
        out = []
        for f in flows:
            c = counts.get(f.match, FlowCounters())
            to = c.to or f.to
            out.append({
                "session": f.session,
                "match": str(f.match),
                "source": str(f.source),
                "to": str(to) if to.port else None,
                "latch": f.latch.name.lower(),
                "packets": c.packets,
                "bytes": c.bytes,
                "idle": round(now - c.last_seen, 3) if c.last_seen else None,
            })
        return out

    def _flow_list(self) -> list[dict[str, Any]]:
        return self._flows_of(self.manager.sessions(), self._now())

    def _stats(self) -> dict[str, Any]:
        sessions = self.manager.sessions()
        pools = {
            f"ipv{fam}": {"in_use": sum(p.in_use for p in ps),
                          "capacity": sum(p.capacity for p in ps)}
            for fam, ps in self.manager.pools.items() if ps
        }
        return {
            "uptime": round(time.monotonic() - self.started, 1),
            "datapath": self.media_relay,  # what relays media
            "guard": self.datapath.guard.name if self.datapath.guard is not None else "",
            "sessions": len(sessions),
            "deleting": sum(n for (_, state), n in self.manager.census().items()
                            if state is State.DELETING),
            "flows": self.manager.flow_count,
            "ports": pools,
            "ended": dict(self.manager.ended),
            "forwarded": {p.name: {"packets": (f := p.forwarded()).packets, "bytes": f.bytes}
                          for p in self.datapath.forwarders},
            "drops": {r: {"packets": d.packets, "bytes": d.bytes}
                      for r, d in sorted(self.datapath.drops().items())},
            "reasons": reasons.meanings(),
            "table_restored": self.table_restored,
        }

    def _log_level(self, level: str | None = None) -> dict[str, str]:
        from xlat import logs

        if level is None:
            return {"level": logs.level()}
        was = logs.set_level(level)
        # at the new level itself, so the line is written whatever the level is
        log.log(max(logging.INFO, logging.getLevelNamesMapping()[level.upper()]),
                "log level %s (was %s), set through the control socket", level, was)
        return {"level": level, "was": was}

    def _exit(self, keep_datapath: bool | None = None) -> dict[str, bool]:
        if keep_datapath is not None:
            self.keep_datapath = bool(keep_datapath)
        asyncio.get_running_loop().call_soon(self.request_exit)
        return {"exiting": True}


def _peer(label: str, text: str) -> Endpoint:
    """A session.add peer argument; errors name the argument."""
    try:
        ep = Endpoint.parse(text)
    except ValueError as e:
        raise ControlError(f"{label}: {e}") from None
    if ep.host.is_unspecified or ep.port == 0:
        raise ControlError(f"{label}: {ep} is not a usable address")
    return ep


def _version() -> str:
    from importlib.metadata import version

    return version("xlat")


def run(config: Config, loader: Callable[[], Config] | None = None) -> ExitCode:
    """Run the daemon to completion; returns the process exit code. ``loader`` reads
    the configuration again on SIGHUP."""
    daemon = Daemon(config, loader)
    try:
        log.info("event loop: %s", eventloop.resolve(config.event_loop)[0])
        eventloop.run(daemon.serve(), config.event_loop)
    except (StartupError, eventloop.EventLoopUnavailable) as e:
        log.error("%s", e)
        return ExitCode.STARTUP_FAILURE
    return ExitCode.OK
