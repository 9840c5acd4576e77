"""Which pages of the destination already equal the source, and which ranges the copier holds.

``SyncMap`` costs what mirrored writes touched, never what the image's virtual size is: behind
the copier's position everything is in sync by construction (copied, written over, or a hole on
both files), so only the runs of whole pages that mirrored writes covered ahead of it are kept,
as sorted, disjoint page ranges.  A 64 TiB disk with nothing written ahead of
the copy costs an empty dict.

``RangeLocks`` is the guard against the stale overwrite (DESIGN.md, "No stale overwrite"): the
copier holds the range it is copying; a guest write or truncate that touches a held range waits
until it is released.  Writers never hold ranges: their critical section (write the source, write
the destination, mark the map) is synchronous code with no trio checkpoint, so it cannot interleave
with anything else on the event loop.  Only the copier's thread-side copy can, and this lock is
what keeps it apart.
"""

from __future__ import annotations

import array
import bisect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import trio

from fusedisk.backend import PAGE

# The runs are kept in at most about this many buckets, whatever the size: each costs a few
# objects (to allocate, and to free when the map is dropped).  Fixed when the map is made.
BUCKETS = 4096
MIN_BUCKET = 256  # pages (1 MiB)


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
        self._behind = 0  # pages below this one are in sync: the copier has passed them
        # Runs of pages ahead of the copier that mirrored writes made equal, by bucket (a
        # 4096th of the disk or 1 MiB, a power of two pages): in each, [start, end) in pages,
        # sorted, disjoint and never touching (touching runs are merged; no run crosses a
        # bucket's edge).  Buckets bound each insertion's cost to one bucket's runs and the
        # map's fixed cost to a few objects each; arrays of machine integers: 16 bytes a run.
        pages = -(-size // PAGE)
        per_bucket = max(1, -(-pages // BUCKETS))
        self._bucket = max(MIN_BUCKET, 1 << (per_bucket - 1).bit_length())
        self._buckets: dict[int, tuple[array.array[int], array.array[int]]] = {}
        self._runs = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def runs(self) -> int:
        """How many written runs it remembers (its memory is proportional to this)."""
        return self._runs

    def resize(self, size: int) -> None:
        """Follow a size change.  New pages start unsynced: the copier finds them as holes."""
        if size < self._size:
            self._behind = min(self._behind, -(-size // PAGE))
            # Whole pages only: a partial last page is not wholly written any more on a regrow.
            end = size // PAGE
            for bucket in [b for b in self._buckets if (b + 1) * self._bucket > end]:
                starts, ends = self._buckets[bucket]
                keep = bisect.bisect_left(starts, end)
                self._runs -= len(starts) - keep
                del starts[keep:], ends[keep:]
                if ends and ends[-1] > end:
                    ends[-1] = end
                if not starts:
                    del self._buckets[bucket]
        self._size = size

    def mark_written(self, start: int, end: int) -> None:
        """A mirrored write made [start, end) equal on both files: whole pages are now in sync."""
        if end > self._size:
            self.resize(end)
        first, last = _pages_within(start, end, self._size)
        first = max(first, self._behind)
        while first < last:
            bucket = first // self._bucket
            stop = min(last, (bucket + 1) * self._bucket)
            self._add(bucket, first, stop)
            first = stop

    def _add(self, bucket: int, first: int, last: int) -> None:
        """Add [first, last) to one bucket, merged with every run it overlaps or touches."""
        if bucket not in self._buckets:
            self._buckets[bucket] = (array.array("q"), array.array("q"))
        starts, ends = self._buckets[bucket]
        low = bisect.bisect_left(ends, first)
        high = bisect.bisect_right(starts, last)
        if low == high:
            starts.insert(low, first)
            ends.insert(low, last)
            self._runs += 1
            return
        starts[low], ends[low] = min(first, starts[low]), max(last, ends[high - 1])
        del starts[low + 1 : high], ends[low + 1 : high]
        self._runs -= high - low - 1

    def copy_reached(self, end: int) -> None:
        """The copier has dealt with everything below ``end``: all of it is in sync now.
        (Runs behind it are never looked at again; they go with the map.)"""
        self._behind = max(self._behind, -(-min(end, self._size) // PAGE))

    def unsynced_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """Byte ranges within [start, end) (start page-aligned) whose pages are not in sync."""
        end = min(end, self._size)
        page, last = max(start // PAGE, self._behind), -(-end // PAGE)
        if page >= last:
            return []
        runs: list[tuple[int, int]] = []
        for a, b in self._synced_runs(page, last):
            if a > page:
                runs.append((page * PAGE, a * PAGE))
            page = max(page, b)
        if page < last:
            runs.append((page * PAGE, end))
        return runs

    def _synced_runs(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """The written runs that overlap [first, last) pages, in order."""
        low, high = first // self._bucket, (last - 1) // self._bucket
        if high - low < len(self._buckets):
            buckets: Iterable[int] = range(low, high + 1)
        else:  # a long range (not the copier's): look only at the buckets there are
            buckets = sorted(b for b in self._buckets if low <= b <= high)
        for bucket in buckets:
            if bucket not in self._buckets:
                continue
            starts, ends = self._buckets[bucket]
            i = bisect.bisect_right(ends, first)
            while i < len(starts) and starts[i] < last:
                yield starts[i], ends[i]
                i += 1


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
