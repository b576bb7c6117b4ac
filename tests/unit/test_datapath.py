"""CompositeDatapath over fakes: fan-out, the guard's batching delay, merged counters."""

from collections.abc import Callable
from dataclasses import dataclass, field

from xlat.addr import Endpoint
from xlat.media.datapath import CompositeDatapath, FakeDatapath, Flow, FlowCounters

R1, R2 = Endpoint.parse("203.0.113.1:30000"), Endpoint.parse("[2001:db8::1]:30002")
PEER = Endpoint.parse("203.0.113.9:4000")


def flow(match: Endpoint) -> Flow:
    return Flow("s", match, match, PEER if match.family == 4 else match, idle_timeout=60.0)


@dataclass
class Batch:
    remove: list[Endpoint] = field(default_factory=list)
    install: list[Flow] = field(default_factory=list)
    refresh: list[Flow] = field(default_factory=list)


@dataclass
class Timers:
    """A hand-run call_later: records what is armed, fires on demand."""

    armed: list[tuple[float, Callable[[], None]]] = field(default_factory=list)
    cancelled: int = 0

    def __call__(self, delay: float, callback: Callable[[], None]) -> "Timers":
        self.armed.append((delay, callback))
        return self

    def cancel(self) -> None:
        self.cancelled += 1

    def fire(self) -> None:
        armed, self.armed = self.armed, []
        for _, callback in armed:
            callback()


def test_kernel_forwarder_alone_keeps_the_guard_out_of_flows() -> None:
    kernel, guard = FakeDatapath("ebpf"), FakeDatapath("nft")
    dp = CompositeDatapath([kernel], guard, Timers())
    dp.apply(Batch(install=[flow(R1)]))
    assert not dp.admits and list(kernel.flows) == [R1] and guard.flows == {}
    assert dp.name == "ebpf" and [p.name for p in dp.parts] == ["ebpf", "nft"]


def test_guard_batch_waits_next_to_the_kernel_and_keeps_the_last_change() -> None:
    kernel, sockets, guard = FakeDatapath("ebpf"), FakeDatapath("userspace"), FakeDatapath("nft")
    sockets.behind_guard = True
    timers = Timers()
    dp = CompositeDatapath([kernel, sockets], guard, timers, guard_delay=0.02)
    dp.apply(Batch(install=[flow(R1), flow(R2)]))
    dp.apply(Batch(remove=[R2]))  # same batch window: one timer, the last word wins
    assert set(kernel.flows) == set(sockets.flows) == {R1} and guard.flows == {}
    assert [delay for delay, _ in timers.armed] == [0.02]
    timers.fire()
    assert list(guard.flows) == [R1] and guard.calls == 2  # one remove, one install


def test_sockets_alone_get_their_ports_admitted_at_once() -> None:
    sockets, guard = FakeDatapath("userspace"), FakeDatapath("nft")
    sockets.behind_guard = True
    timers = Timers()
    dp = CompositeDatapath([sockets], guard, timers)
    dp.apply(Batch(install=[flow(R1)]))
    assert timers.armed == [] and list(guard.flows) == [R1]


def test_counters_are_summed_and_the_latest_sighting_says_where_it_sends() -> None:
    kernel, sockets = FakeDatapath("ebpf"), FakeDatapath("userspace")
    dp = CompositeDatapath([kernel, sockets])
    dp.apply(Batch(install=[flow(R1)]))
    kernel.stats[R1] = FlowCounters(10, 1000, last_seen=5.0, to=PEER)
    sockets.stats[R1] = FlowCounters(2, 200, last_seen=7.0, to=R2)
    assert dp.counters([R1]) == {R1: FlowCounters(12, 1200, 7.0, R2)}


def test_a_part_that_rejects_a_batch_does_not_keep_it_from_the_others() -> None:
    class Broken(FakeDatapath):
        def install(self, flows: object) -> None:
            raise OSError("no")

    broken, kernel = Broken("broken"), FakeDatapath("ebpf")
    CompositeDatapath([broken, kernel]).apply(Batch(install=[flow(R1)]))
    assert list(kernel.flows) == [R1]


def test_adopt_keeps_what_the_sessions_explain_and_removes_the_rest() -> None:
    kernel = FakeDatapath("ebpf")
    dp = CompositeDatapath([kernel])
    dp.apply(Batch(install=[flow(R1), flow(R2)]))
    kernel.stats[R1].packets = 5  # a live flow's counters survive adoption
    dp.adopt([flow(R1)])
    assert list(kernel.flows) == [R1] and kernel.stats[R1].packets == 5
