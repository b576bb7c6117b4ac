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
    quarantine for ``quarantine`` seconds first.
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
        self._free: deque[int] = deque(range(first, max_port, 2))
        self._resting: deque[tuple[float, int]] = deque()  # (ready_at, port), oldest first
        self._used: set[int] = set()
        self.capacity = len(self._free)

    @property
    def family(self) -> int:
        return self.address.version

    @property
    def in_use(self) -> int:
        return len(self._used)

    def allocate(self, now: float) -> Endpoint:
        """The RTP endpoint of a free pair (RTCP is port + 1). Raises PortsExhausted."""
        while self._resting and self._resting[0][0] <= now:
            self._free.append(self._resting.popleft()[1])
        if not self._free:
            raise PortsExhausted(self.family)
        port = self._free.popleft()
        self._used.add(port)
        return Endpoint(self.address, port)

    def claim(self, rtp: Endpoint) -> None:
        """Mark a known pair as used (adopting the flows of a previous daemon)."""
        if rtp.host != self.address or rtp.port not in range(self.min_port, self.max_port, 2):
            raise ValueError(f"{rtp} is not a pair of this pool")
        if rtp.port in self._used:
            return
        try:
            self._free.remove(rtp.port)
        except ValueError:
            self._resting = deque(r for r in self._resting if r[1] != rtp.port)
        self._used.add(rtp.port)

    def release(self, rtp: Endpoint, now: float) -> None:
        """Return a pair; it is reusable after the quarantine. Unknown pairs are ignored."""
        if rtp.host == self.address and rtp.port in self._used:
            self._used.remove(rtp.port)
            self._resting.append((now + self.quarantine, rtp.port))

    def owns(self, rtp: Endpoint) -> bool:
        return rtp.host == self.address and rtp.port in self._used
