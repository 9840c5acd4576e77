"""A move's write-intent record: what lets a crash resume the move instead of starting over.

It lives in the journal beside the source, as the ``checkpoint`` of its ``mirroring`` record: the
copy cursor as of the last checkpoint, and the regions a guest write may have touched since
(``marks``), as md's write-intent bitmap and dm-clone's metadata do.  The invariant that makes
resuming safe: **every byte where the source's and the destination's durable contents may
differ lies at or past the recorded cursor, or in a marked region.**  Resuming trusts the rest and
copies only that.

- A checkpoint (every CHECKPOINT_EVERY seconds, one at a time, while the copy goes on past its
  cursor): note the copier's cursor, start a new epoch (each write notes the epoch it was made
  in), wait for the mirrored writes already submitted, flush both files (all written before
  is now durably equal), then record the cursor with the marks of the regions below it
  written in this epoch (during the flush: perhaps not durable) or the one before (md's lazy
  clearing: a region the guest writes now will likely be written again, and keeping its mark
  spares that write a journal write; a region left alone for a whole interval is cleared, so
  a resume copies it no more).
- A guest write or truncate below the recorded cursor, in a region not durably marked, first
  marks it durably (one journal write serves every write that waits meanwhile), and only then
  touches either file.
- While a record is being written, either it or the one before may be what a crash leaves: a
  write goes ahead unmarked only if it is safe under both (``_views``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import trio

from fusedisk.storage import Storage

# At most this many regions (the record stays small: ~25 KB at worst), of at least MIN_REGION:
# the finer they are, the less a resume copies again (docs/benchmarks.md §6).
REGIONS = 4096
MIN_REGION = 1 << 20
# Seconds of copying between checkpoints; FUSEDISK_CHECKPOINT_EVERY tunes it (the crash tests
# checkpoint often, so that their kills find something to resume).  "inf" is a benchmark knob:
# no record at all (no marks, no checkpoints; a crash rolls the move back), to measure what the
# record costs beside it (docs/benchmarks.md).
CHECKPOINT_EVERY = float(os.environ.get("FUSEDISK_CHECKPOINT_EVERY", "2.0"))
# A checkpoint keeps the marks of regions written in its own epoch and this many before it.
KEEP_EPOCHS = 1
# Pacing (FUSEDISK_CHECKPOINT_PACE, 0: none): the next checkpoint begins no sooner than this many
# times as long as the last one's flush took, after it ended, so that under a writer dirtying
# pages faster than the disk writes them back flushes fill at most 1/(1+PACE) of the time
# (in a move's first 20 s a 1 TiB sparse disk under a random writer kept 0.60 of its IOPS with
# it, 0.45 without; over 90 s, with it, the record cost nothing measurable: benchmarks §8).
CHECKPOINT_PACE = float(os.environ.get("FUSEDISK_CHECKPOINT_PACE", "4"))
# FUSEDISK_EARLY_WRITEBACK (seconds, 0: never): while a move keeps a record, start the
# writeback of both files' dirty pages this often, so that a checkpoint's flush finds less to
# write (docs/benchmarks.md §8).
EARLY_WRITEBACK = float(os.environ.get("FUSEDISK_EARLY_WRITEBACK", "0"))


def region_size(size: int) -> int:
    """MIN_REGION, or the power of two that keeps a disk of ``size`` within REGIONS regions."""
    wanted = max(MIN_REGION, -(-size // REGIONS))
    return 1 << (wanted - 1).bit_length()


class Intent:
    def __init__(
        self,
        storage: Storage,
        record: dict[str, Any],
        region: int,
        cursor: int = 0,
        marks: set[int] | None = None,
    ) -> None:
        self.storage = storage
        self.record = record  # the journal's mirroring record, less its checkpoint
        self.region = region
        # (cursor, marks) of the durable record; two while a new one is being written.
        self._views: list[tuple[int, frozenset[int]]] = [(cursor, frozenset(marks or ()))]
        self._wanted: set[int] = set()  # regions to mark in the next record
        self._epoch = 0  # checkpoints begun
        self._upto = cursor  # the cursor of the latest checkpoint begun
        self._written_in: dict[int, int] = {}  # region -> the last epoch a write was made in
        self._lock = trio.Lock()  # one record write at a time
        self.checkpointed = trio.current_time()
        self.flush_seconds = 0.0  # how long the last checkpoint's flush of both files took
        self.dest_id: list[int] | None = None  # the destination's (st_dev, st_ino)
        self.records = 0  # journal writes (checkpoints and marks), for the status
        self.checkpoints = 0
        self.checkpointing = False  # one checkpoint at a time
        self.withdrawn = False
        self.settled = trio.Event()  # failed back: the record promises nothing any more

    @property
    def cursor(self) -> int:
        return self._views[-1][0]

    @property
    def marks(self) -> frozenset[int]:
        return self._views[-1][1]

    def _regions(self, start: int, end: int) -> range:
        return range(start // self.region, -(-end // self.region))

    def must_mark(self, start: int, end: int) -> bool:
        """Must a write to [start, end) wait for :meth:`mark` first: is any region of it below
        the cursor unmarked, in a record a crash may leave?  Synchronous, so the caller checks
        and then writes with no checkpoint in between."""
        for cursor, marks in self._views:
            if start < cursor and any(
                r not in marks for r in self._regions(start, min(end, cursor))
            ):
                return True
        return False

    def written(self, start: int, end: int) -> None:
        """In the write's synchronous step, after it was submitted to both files: note the
        epoch its regions were written in.  Past the cursor of the latest checkpoint that
        only spares later marks: a truncate that grows the disk far notes REGIONS at most."""
        end = min(end, max(self._upto, (start // self.region + REGIONS) * self.region))
        for r in self._regions(start, end):
            self._written_in[r] = self._epoch

    async def mark(self, start: int, end: int) -> None:
        """Make the regions of [start, end) below the cursor durably marked."""
        below = self._regions(start, min(end, max(c for c, _ in self._views)))
        self._wanted.update(below)
        for r in below:  # the write comes after this: perhaps during the next checkpoint
            self._written_in[r] = self._epoch
        async with self._lock:
            if self.withdrawn:
                raise OSError(errno.ECANCELED, "the move's intent record was withdrawn")
            if self.must_mark(start, end):  # else a record written meanwhile has them
                await self._write(self.cursor, self.marks | self._wanted)

    async def checkpoint(
        self, cursor: int, flush_both: Any, started: Callable[[], None] = lambda: None
    ) -> None:
        """Record ``cursor`` (the copier's: all below it is in sync) once ``flush_both()`` has
        made both files durable, marking the regions below it written since the epoch before.
        ``started()`` once a new epoch has begun: the copier may go on from there."""
        self._upto = cursor
        self._epoch += 1  # writes from here on may not be durable once flush_both returns
        epoch = self._epoch
        self.checkpointing = True
        started()
        try:
            began = trio.current_time()
            await flush_both()
            self.flush_seconds = trio.current_time() - began
            async with self._lock:
                if self.withdrawn:
                    raise OSError(errno.ECANCELED, "the move's intent record was withdrawn")
                recent = {r: e for r, e in self._written_in.items() if e >= epoch - KEEP_EPOCHS}
                self._written_in = recent  # (older epochs count no more)
                last = -(-cursor // self.region)  # regions from here on are past the cursor
                await self._write(cursor, {r for r in recent if r < last} | self._wanted)
                self.checkpoints += 1
        finally:
            self.checkpointing = False
        self.checkpointed = trio.current_time()

    async def withdraw(self) -> None:
        """The move fails back: replace the record with one that promises nothing (a crash
        from here on rolls the move back), and write no other after it."""
        async with self._lock:
            self.withdrawn = True
            source = str(self.record["source"])
            await trio.to_thread.run_sync(self.storage.write_journal, source, self.record)

    async def _write(self, cursor: int, marks: frozenset[int] | set[int]) -> None:
        view = (cursor, frozenset(marks))
        self._views.append(view)
        try:
            checkpoint = {
                "cursor": cursor,
                "region": self.region,
                "marks": sorted(marks),
                "destination_id": self.dest_id,
            }
            record = {**self.record, "checkpoint": checkpoint}
            source = str(self.record["source"])
            await trio.to_thread.run_sync(self.storage.write_journal, source, record)
            self.records += 1
            self._views = [view]
            self._wanted -= view[1]
        finally:
            if len(self._views) > 1:  # failed: the old record stands
                self._views.remove(view)

    def status(self) -> dict[str, Any]:
        cursor, marks = self._views[0]
        return {
            "checkpoint_bytes": cursor,
            "marked_bytes": min(len(marks) * self.region, cursor),
            "intent_records": self.records,
            "checkpoints": self.checkpoints,
        }


def trusted_runs(size: int, cursor: int, region: int, marks: set[int]) -> list[tuple[int, int]]:
    """Byte ranges a resumed move trusts as in sync: below ``cursor`` and in no marked region
    (the gaps between :func:`marked_runs`)."""
    end, start = min(cursor, size), 0
    runs: list[tuple[int, int]] = []
    for a, b in [*marked_runs(size, cursor, region, marks), (end, end)]:
        if start < a:
            runs.append((start, a))
        start = b
    return runs


def marked_runs(size: int, cursor: int, region: int, marks: set[int]) -> list[tuple[int, int]]:
    """Byte ranges below ``cursor`` in marked regions (adjacent ones joined): what a resumed
    move compares rather than copies (:mod:`fusedisk.compare`)."""
    end = min(cursor, size)
    runs: list[tuple[int, int]] = []
    for r in sorted(m for m in marks if m * region < end):
        start, stop = r * region, min((r + 1) * region, end)
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], stop)
        else:
            runs.append((start, stop))
    return runs
