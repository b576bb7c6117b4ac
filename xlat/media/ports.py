"""Relay port pairs: an even RTP port and the odd RTCP port above it (RFC 3550 §11).

Pure: time is passed in. A released pair rests in quarantine before it is handed
out again, so stray packets of a finished call never reach the next one.
"""

from __future__ import annotations

from collections import deque

from xlat.addr import Endpoint, IPAddress


class PortsExhausted(Exception):
    """No free relay pair on any address of the wanted family."""

    def __init__(self, family: int) -> None:
        super().__init__(f"no free IPv{family} relay port pair")
        self.family = family


class RelayPortPool:
    """The pairs of one media address in ``[min_port, max_port]``.

    ``allocate`` is O(1) and hands out the pair free the longest (FIFO), so a
    released pair is reused as late as possible; ``release`` puts it in
    quarantine for ``quarantine`` seconds first. The pool makes every pair's
    Endpoint up front and marks use in a bitmap: what a call holds costs the pool
    nothing more (memory follows the port range, not the number of calls).
    """

    def __init__(
        self, address: IPAddress, min_port: int, max_port: int, quarantine: float = 5.0
    ) -> None:
        first = min_port + (min_port % 2)  # RTP is even
        if not (1 <= min_port <= max_port <= 65535) or first + 1 > max_port:
            raise ValueError(f"port range {min_port}-{max_port} holds no RTP/RTCP pair")
        self.address = address
        self.min_port = first
        self.max_port = max_port
        self.quarantine = quarantine
        self._pairs = [Endpoint(address, port) for port in range(first, max_port, 2)]
        self._free: deque[int] = deque(range(len(self._pairs)))  # pair indexes
        self._resting: deque[tuple[float, int]] = deque()  # (ready_at, index), oldest first
        self._used = bytearray(len(self._pairs))
        self.capacity = len(self._pairs)
        self.in_use = 0

    @property
    def family(self) -> int:
        return self.address.version

    def allocate(self, now: float) -> Endpoint:
        """The RTP endpoint of a free pair (RTCP is port + 1). Raises PortsExhausted."""
        while self._resting and self._resting[0][0] <= now:
            self._free.append(self._resting.popleft()[1])
        if not self._free:
            raise PortsExhausted(self.family)
        index = self._free.popleft()
        self._used[index] = 1
        self.in_use += 1
        return self._pairs[index]

    def claim(self, rtp: Endpoint) -> Endpoint:
        """Mark a known pair as used (adopting the flows of a previous daemon); returns
        the pool's own Endpoint for it."""
        index = self._index(rtp)
        if index is None:
            raise ValueError(f"{rtp} is not a pair of this pool")
        if not self._used[index]:
            try:
                self._free.remove(index)
            except ValueError:
                self._resting = deque(r for r in self._resting if r[1] != index)
            self._used[index] = 1
            self.in_use += 1
        return self._pairs[index]

    def release(self, rtp: Endpoint, now: float) -> None:
        """Return a pair; it is reusable after the quarantine. Unknown pairs are ignored."""
        index = self._index(rtp)
        if index is not None and self._used[index]:
            self._used[index] = 0
            self.in_use -= 1
            self._resting.append((now + self.quarantine, index))

    def owns(self, rtp: Endpoint) -> bool:
        index = self._index(rtp)
        return index is not None and bool(self._used[index])

    def _index(self, rtp: Endpoint) -> int | None:
        offset = rtp.port - self.min_port
        if rtp.host != self.address or offset % 2 or not 0 <= offset // 2 < len(self._pairs):
            return None
        return offset // 2
