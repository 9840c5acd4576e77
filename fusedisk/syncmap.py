"""Which pages of the destination already equal the source, and which ranges the copier holds.

``SyncMap`` keeps one byte per 4 KiB page (0.025% of the image size: 256 KiB for 1 GiB) so that
marking a 1 MiB write is one slice assignment in C, not a Python loop.

``RangeLocks`` is the guard against the stale overwrite (DESIGN.md, "No stale overwrite"): the
copier holds the range it is copying; a guest write or truncate that touches a held range waits
until it is released.  Writers never hold ranges: their critical section (write the source, write
the destination, mark the map) is synchronous code with no trio checkpoint, so it cannot interleave
with anything else on the event loop.  Only the copier's thread-side copy can, and this lock is
what keeps it apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

from fusedisk.backend import PAGE

SYNCED = 1
UNSYNCED = 0


def _pages_within(start: int, end: int, size: int) -> tuple[int, int]:
    """Pages wholly covered by [start, end): a page ends at PAGE or at the file's end."""
    first = -(-start // PAGE)
    if end >= size:
        last = -(-size // PAGE)  # the last, partial page counts as covered
    else:
        last = end // PAGE
    return first, max(first, last)


class SyncMap:
    def __init__(self, size: int) -> None:
        self._size = size
        self._state = bytearray(-(-size // PAGE))

    @property
    def size(self) -> int:
        return self._size

    def resize(self, size: int) -> None:
        """Follow a size change.  New pages start unsynced: the copier finds them as holes."""
        pages = -(-size // PAGE)
        if pages < len(self._state):
            del self._state[pages:]
        else:
            self._state.extend(bytes(pages - len(self._state)))
        self._size = size

    def mark_written(self, start: int, end: int) -> None:
        """A mirrored write made [start, end) equal on both files: whole pages are now in sync."""
        if end > self._size:
            self.resize(end)
        first, last = _pages_within(start, end, self._size)
        if last > first:
            self._state[first:last] = b"\x01" * (last - first)

    def mark_synced(self, start: int, end: int) -> None:
        """The copier made [start, end) (page-aligned start) equal on both files."""
        first, last = start // PAGE, -(-min(end, self._size) // PAGE)
        if last > first:
            self._state[first:last] = b"\x01" * (last - first)

    def unsynced_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """Byte ranges within [start, end) (start page-aligned) whose pages are not in sync."""
        end = min(end, self._size)
        runs: list[tuple[int, int]] = []
        state = self._state
        page, last = start // PAGE, -(-end // PAGE)
        while page < last:
            first_unsynced = state.find(b"\x00", page, last)
            if first_unsynced < 0:
                break
            first_synced = state.find(b"\x01", first_unsynced, last)
            if first_synced < 0:
                first_synced = last
            runs.append((first_unsynced * PAGE, min(first_synced * PAGE, end)))
            page = first_synced
        return runs

    def synced_bytes(self) -> int:
        return min(self._state.count(SYNCED) * PAGE, self._size)


class RangeLocks:
    """Byte ranges held by the copier; writers wait for overlapping ones to be released."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, int], trio.Event] = {}

    def _overlapping(self, start: int, end: float) -> trio.Event | None:
        for (a, b), released in self._held.items():
            if a < end and start < b:
                return released
        return None

    async def wait_unlocked(self, start: int, end: float) -> None:
        """Return once no held range overlaps [start, end).  No checkpoint when none does, so a
        caller's following synchronous code runs without anything interleaving."""
        while (released := self._overlapping(start, end)) is not None:
            await released.wait()

    @contextmanager
    def hold(self, start: int, end: int) -> Iterator[None]:
        """Hold [start, end).  Synchronous: only one task (the copier or the verifier) holds
        ranges at a time, so there is never anyone to wait for."""
        key = (start, end)
        assert self._overlapping(start, end) is None, "copier ranges never overlap"
        self._held[key] = trio.Event()
        try:
            yield
        finally:
            self._held.pop(key).set()
