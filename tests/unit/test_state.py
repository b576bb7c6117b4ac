"""The crash journal (xlat/state.py): records in and out, torn records, compaction,
replay; and the files it writes, with a crash simulated at the byte level."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from xlat.addr import Endpoint
from xlat.media.ports import RelayPortPool
from xlat.media.session import SessionManager, StreamSpec
from xlat.sip.message import SipRequest
from xlat.sip.registrar import Registrar
from xlat.sip.uri import SipUri
from xlat.state import Journal, JournalFiles, clock, clock_shift, journal_name, replay


def test_replay_of_pending_records_gives_the_tables_back() -> None:
    j = Journal()
    j.put("session", "s1", {"a": 1})
    j.put("session", "s2", {"a": 2})
    j.put("session", "s1", {"a": 3})
    j.delete("session", "s2")
    j.delete("session", "never")  # nothing to delete: no record
    j.put("binding", "bob", [{"contact": "<sip:bob@192.0.2.1>"}])
    data = j.pending()
    assert data.count(b"\n") == 5 and j.pending() == b"" and j.logged == 5
    got = replay(data)
    assert got.tables == {"session": {"s1": {"a": 3}},
                          "binding": {"bob": [{"contact": "<sip:bob@192.0.2.1>"}]}}
    assert (j.count("session"), j.count("binding"), j.entries()) == (1, 1, 2)
    assert (got.records, got.torn, got.skipped) == (5, 0, 0)


def test_a_torn_last_record_is_dropped_and_the_rest_kept() -> None:
    j = Journal()
    j.put("session", "s1", {"a": 1})
    whole = j.pending()
    j.put("session", "s2", {"a": 2})
    second = j.pending()
    for cut in range(1, len(second)):  # a crash at every byte of the second append
        got = replay(whole + second[:cut])
        assert got.tables == {"session": {"s1": {"a": 1}}}, cut
        assert got.torn == 1
    assert replay(whole + second).table("session").keys() == {"s1", "s2"}


def test_lines_that_do_not_decode_are_skipped() -> None:
    j = Journal()
    j.put("t", "k", 1)
    good = j.pending()
    # a lost block reads back as zeros; a record of an unknown kind
    got = replay(good + b"\x00" * 40 + b"\n" + b'["frob","t","k"]\n' + b"[1]\n" + good)
    assert got.tables == {"t": {"k": 1}} and got.skipped == 3 and got.records == 2


def test_compaction_is_due_past_twice_the_entries_and_the_minimum() -> None:
    j = Journal(compact_min=10)
    for i in range(10):
        j.put("t", "k", i)  # one entry, rewritten
    j.pending()
    assert not j.compaction_due()
    j.put("t", "k", 10)
    j.pending()
    assert j.compaction_due()
    snap = j.snapshot()
    assert j.logged == 0 and not j.compaction_due() and j.pending() == b""
    assert replay(snap).tables == {"t": {"k": 10}}
    for i in range(20):
        j.put("t", f"k{i}", i)  # 21 entries: the bar is now 42 records
    j.pending()
    assert not j.compaction_due()


def test_an_old_log_replayed_over_a_newer_snapshot_changes_nothing() -> None:
    # a crash between the snapshot's rename and the log's truncation
    j = Journal()
    j.put("t", "a", 1)
    j.put("t", "b", 2)
    j.delete("t", "a")
    j.put("t", "c", 3)
    old_log = j.pending()
    snap = j.snapshot()
    assert replay(snap, old_log).tables == replay(snap).tables == {"t": {"b": 2, "c": 3}}


def test_drop_removes_a_table_with_records() -> None:
    j = Journal()
    j.put("session", "s1", 1)
    j.put("binding", "bob", 2)
    j.drop("session")
    assert replay(j.pending()).tables == {"session": {}, "binding": {"bob": 2}}


def test_clock_shift_only_across_a_reboot() -> None:
    saved = clock("boot-a", monotonic=1000.0, wall=1_700_000_000.0)
    assert clock_shift(saved, "boot-a", 5000.0, 1_700_004_000.0) == 0.0
    assert clock_shift(None, "boot-b", 5.0, 1.0) == 0.0
    # rebooted: 100 s of wall time later the monotonic clock reads 20
    shift = clock_shift(saved, "boot-b", 20.0, 1_700_000_100.0)
    assert 1000.0 + 30.0 + shift == 20.0 - 70.0  # 30 s after the save is 70 s ago now


def test_journal_name_keeps_daemons_apart() -> None:
    assert journal_name(Path("/run/xlat/control.sock")) == "run-xlat-control.sock"
    assert journal_name(Path("/tmp/a/c.sock")) != journal_name(Path("/tmp/b/c.sock"))


# ---- the files ---------------------------------------------------------------------------


def test_files_survive_a_crash_mid_append(tmp_path: Path) -> None:
    files = JournalFiles(tmp_path / "state", "ctl")
    assert files.load().tables == {}  # creates the directory
    j = Journal()
    j.put("t", "a", 1)
    files.start(j)
    assert files.started and files.log_path.read_bytes() == b""
    j.put("t", "b", 2)
    assert files.write(j) is None
    files.sync()
    with files.log_path.open("ab") as log:  # the kill -9 came in the middle of a write
        log.write(b'["put","t","c",{"half')
    got = JournalFiles(tmp_path / "state", "ctl").load()
    assert got.tables == {"t": {"a": 1, "b": 2}} and got.torn == 1
    files.close(j)
    assert replay(files.snapshot_path.read_bytes()).tables == {"t": {"a": 1, "b": 2}}
    assert files.log_path.read_bytes() == b""


def test_compaction_off_the_loop_leaves_the_state_readable_at_every_step(
        tmp_path: Path) -> None:
    files = JournalFiles(tmp_path, "ctl")
    j = Journal(compact_min=4)
    files.start(j)
    state = {}
    began = []
    for i in range(6):  # past compact_min a write begins a compaction, later ones append
        j.put("t", f"k{i % 2}", i)
        state[f"k{i % 2}"] = i
        began.append(files.write(j))
    assert began[:4] == [None] * 4 and began[5] is None and files.compacting
    slow = began[4]
    assert slow is not None

    def readable() -> dict[str, object]:
        return JournalFiles(tmp_path, "ctl").load().table("t")

    assert readable() == state  # crash before the fsync: old snapshot + log + next log
    j.put("t", "during", 7)  # the loop goes on appending meanwhile, to the next log
    state["during"] = 7
    assert files.write(j) is None
    assert readable() == state
    slow()  # the thread: fsync, rename the snapshot, the next log over the log
    files.compacted(failed=False)
    assert not files.compacting and not files.next_path.exists()
    assert not (tmp_path / "ctl.snapshot.tmp").exists()
    assert readable() == state
    j.put("t", "after", 8)
    state["after"] = 8
    files.write(j)  # appends reach the renamed log through the same fd
    assert files.log_path.read_bytes().count(b"\n") == 3 and readable() == state  # since it began
    files.close(j)
    assert replay(files.snapshot_path.read_bytes()).table("t") == state


def test_a_failed_compaction_compacts_again_at_the_next_write(tmp_path: Path) -> None:
    files = JournalFiles(tmp_path, "ctl")
    j = Journal(compact_min=1)
    files.start(j)
    j.put("t", "a", 1)
    j.put("t", "a", 2)
    j.put("t", "a", 3)
    assert files.write(j) is not None
    files.compacted(failed=True)  # say the fsync failed: nothing was renamed
    assert JournalFiles(tmp_path, "ctl").load().table("t") == {"a": 3}
    j.put("t", "b", 4)
    assert files.write(j) is None  # compacted at once, waiting for the disk
    assert not files.next_path.exists() and files.log_path.read_bytes() == b""
    assert replay(files.snapshot_path.read_bytes()).table("t") == {"a": 3, "b": 4}
    files.close(j)


def test_close_with_nothing_worth_keeping_removes_the_files(tmp_path: Path) -> None:
    files = JournalFiles(tmp_path, "ctl")
    files.start(Journal())
    files.close(None)
    assert list(tmp_path.iterdir()) == []


# ---- what the owners of the state journal -----------------------------------------------------

GW4 = IPv4Address("203.0.113.1")
GW6 = IPv6Address("2001:db8:6::1")
A6 = Endpoint.parse("[2001:db8:6::2]:4000")
B4 = Endpoint.parse("203.0.113.2:5000")


def manager() -> SessionManager:
    return SessionManager({4: RelayPortPool(GW4, 30000, 30099),
                           6: RelayPortPool(GW6, 30000, 30099)}, rng=random.Random())


def journal_of(mgr: SessionManager, j: Journal) -> None:
    j.update("session", mgr.drain_records())


def test_sessions_through_the_journal_come_back_whole() -> None:
    mgr, j = manager(), Journal()
    mgr.offer("c1", "a", [StreamSpec(A6)], toward=4, now=0.0)
    mgr.answer("c1", "a", "b", [StreamSpec(B4)], now=1.0)
    mgr.offer("c2", "x", [StreamSpec(A6)], toward=4, now=2.0)
    journal_of(mgr, j)
    log = j.pending()
    mgr.delete("c2", now=3.0, delay=0)  # ended: a del record
    journal_of(mgr, j)
    log += j.pending()
    state = replay(log)
    again = manager()
    flows = again.restore(state.table("session").values(), now=4.0)
    (s,) = again.sessions()
    assert (s.call_id, s.tags) == ("c1", ("a", "b"))
    (orig,) = mgr.sessions()
    assert {f.match: f for f in flows} == {f.match: f for f in mgr.flows(orig)}
    # in-dialog requests after the restart find it: a re-INVITE keeps the ports, a BYE ends it
    assert again.offer("c1", "a", [StreamSpec(A6)], toward=4, now=5.0, to_tag="b") == \
        mgr.offer("c1", "a", [StreamSpec(A6)], toward=4, now=5.0, to_tag="b")
    assert again.delete("c1", "b", "a", now=6.0, delay=0)
    assert again.sessions() == [] and again.pools[4][0].in_use == 0


def _register(contact: str, cseq: int, expires: int) -> SipRequest:
    return SipRequest("REGISTER", SipUri.parse("sip:gw.example"), [
        ("Via", "SIP/2.0/UDP 203.0.113.2:5060;branch=z9hG4bK1"),
        ("From", "<sip:bob@gw.example>;tag=1"), ("To", "<sip:bob@gw.example>"),
        ("Call-ID", "reg-1"), ("CSeq", f"{cseq} REGISTER"), ("Contact", contact),
        ("Expires", str(expires)),
    ])


def test_registrar_bindings_through_the_journal_come_back_and_expire_on_time() -> None:
    reg, j = Registrar(), Journal()
    changes: list[int] = []
    reg.on_change = lambda: changes.append(1)
    source = Endpoint.parse("[2001:db8:6::2]:5062")
    reg.register(_register("<sip:bob@[2001:db8:6::2]:5062>;q=0.5", 1, 600), source=source,
                 transport="tcp", now=100.0, to_tag="t")
    assert changes
    j.update("binding", reg.drain_records())
    again = Registrar()
    assert again.restore(replay(j.pending()).table("binding"), now=200.0) == 1
    (b,) = again.lookup("bob", now=200.0)
    assert (str(b.uri), b.q, b.source, b.transport) == ("sip:bob@[2001:db8:6::2]:5062", 0.5,
                                                        source, "tcp")
    assert b.expires_at == 700.0
    # the CSeq order of RFC 3261 §10.3 step 7 holds across the restart
    stale = again.register(_register("<sip:bob@[2001:db8:6::2]:5062>", 1, 600), source=source,
                           transport="tcp", now=201.0, to_tag="t")
    assert stale.status == 400
    # unregistered: the key's record goes
    again.drain_records()
    again.register(_register("<sip:bob@[2001:db8:6::2]:5062>", 2, 0), source=source,
                   transport="tcp", now=202.0, to_tag="t")
    assert again.drain_records() == [("bob", None)]
    # an expired binding is not restored
    assert Registrar().restore(replay(j.snapshot()).table("binding"), now=701.0) == 0


def test_journal_values_of_the_wrong_shape_restore_nothing_and_raise_nothing() -> None:
    from xlat.sip.proxy import ProxyConfig, SipProxy

    odd: list[object] = [5, "text", None, [], {"id": "x"}, {"id": "y", "streams": 7}]
    assert manager().restore(odd, now=0.0) == []  # type: ignore[arg-type]
    reg = Registrar()
    assert reg.restore({"bob": 5, "al": "x", "cy": [3, {"q": 1}]}, now=0.0) == 0  # type: ignore[dict-item]
    proxy = SipProxy(ProxyConfig(sip={4: Endpoint.parse("203.0.113.1:5060")}), manager(),
                     random.Random(1))
    assert proxy.restore({"sip:a@[2001:db8::1]": 5, "sip:b@x": {"dest": "?"}},  # type: ignore[dict-item]
                         now=0.0) == 0
