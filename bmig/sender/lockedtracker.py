"""breqd as one migration sees it: one TrackerClient behind one lock.

The planner checks out, the acknowledgement thread commits and aborts, the cutover
changes the lineage: breqd ties checkouts to the connection that made them, so they all
travel on one connection, one call at a time. Nothing here decides what to call.
"""

from __future__ import annotations

import threading

from bmig.tracker.blocking_client import TrackerClient


class LockedTracker:
    """breqd's client shared by the planner and the acknowledgement thread: checkouts
    and commits must travel on one connection, one call at a time. Every call of a
    migration goes through here (lineage changes too), never around the lock;
    ``client`` is the connection itself, for its owner to close."""

    def __init__(self, client: TrackerClient):
        self.client = client
        self._lock = threading.Lock()

    def checkout(self, device: str, max_bytes: int,
                 settled: bool = False) -> list[tuple[int, int]]:
        with self._lock:
            return self.client.checkout(device, max_bytes, settled)

    def claim(self, device: str, wait: float) -> str | None:
        with self._lock:
            return self.client.claim(device, wait)

    def commit(self, device: str, ranges: list[tuple[int, int]]) -> None:
        with self._lock:
            self.client.commit(device, ranges)

    def abort(self, device: str, ranges: list[tuple[int, int]]) -> None:
        with self._lock:
            self.client.abort(device, ranges)

    def stats(self, device: str) -> dict:
        with self._lock:
            return self.client.stats(device)

    def query(self, device: str, offset: int, length: int):
        with self._lock:
            return self.client.query(device, offset, length)

    def mark(self, device: str, ranges: list[tuple[int, int]]) -> None:
        with self._lock:
            self.client.mark(device, ranges)

    def set_all_dirty(self, device: str) -> None:
        with self._lock:
            self.client.set_all_dirty(device)

    def set_lineage(self, device: str, role: str, successor: str | None = None) -> dict:
        with self._lock:
            return self.client.set_lineage(device, role, successor)

    def close(self) -> None:
        """Not under the lock: a call still waiting on breqd fails at once instead of
        holding up the close."""
        self.client.close()
