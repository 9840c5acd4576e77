"""A live move: the phases, the single copy pass, verify, the switch and the fail-back.

The steps follow DESIGN.md: mirroring is turned on by :meth:`Disk.start_move`; then this task
copies in one pass what is not in sync, optionally verifies, holds I/O for the switch, records it
durably, resumes on the destination alone and deletes the source.  Any error before the switch is
recorded fails back: mirroring stops, the partial destination is removed, the source keeps
serving.  After the switch is recorded there is no way back (the source may already be gone).
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
import xxhash

from fusedisk.backend import PAGE, WRITEBACK_LAG, ImageFile
from fusedisk.compare import Compared, write_differences
from fusedisk.destination import DEST_TIMEOUT, Call, Destination, Lane, bounded
from fusedisk.errors import StateError, VerifyMismatch
from fusedisk.failpoints import crash_point
from fusedisk.intent import CHECKPOINT_EVERY, CHECKPOINT_PACE, EARLY_WRITEBACK, Intent
from fusedisk.storage import marker_path

if TYPE_CHECKING:
    from fusedisk.engine import Disk
    from fusedisk.syncmap import SyncMap

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # the copier's unit: one range held, one thread hand-off
# When the guest did I/O while a chunk was copied, the copier pauses GIVE_WAY times as long as
# the chunk took: measured in docs/benchmarks.md ("copier giving way").
# FUSEDISK_GIVE_WAY tunes it (0: copy flat out, as fast as the machine allows).
GIVE_WAY = float(os.environ.get("FUSEDISK_GIVE_WAY", "1.0"))
# With no destination deadline (--dest-timeout 0), the switch waits at most this long for
# in-flight I/O (a stuck flush) before it fails back.
DRAIN_TIMEOUT = 10.0


class Phase(enum.Enum):
    IDLE = "idle"  # no move has run since the mount
    MIRRORING = "mirroring"  # writes go to both files; the copy pass (and verify) runs
    SWITCHING = "switching"  # holding I/O, recording the switch, then deleting the source
    DONE = "done"  # the mount runs on the destination alone
    FAILED = "failed"  # failed back: the source serves, the destination was removed
    CANCELLED = "cancelled"  # cancelled by the user, then as FAILED


_NEXT: dict[Phase, set[Phase]] = {
    Phase.IDLE: {Phase.MIRRORING},
    Phase.MIRRORING: {Phase.SWITCHING, Phase.FAILED, Phase.CANCELLED},
    Phase.SWITCHING: {Phase.DONE, Phase.FAILED, Phase.CANCELLED},
    Phase.DONE: set(),
    Phase.FAILED: set(),
    Phase.CANCELLED: set(),
}


class Move:
    """One move's state and counters.  Counters are plain ints updated from the event loop."""

    def __init__(
        self,
        source: str,
        dest: str,
        *,
        rate_limit: int,
        keep_source: bool,
        verify: bool,
        dest_timeout: float = DEST_TIMEOUT,
        flush_while_copying: bool = False,
    ) -> None:
        self.source, self.dest = source, dest
        self.keep_source, self.verify = keep_source, verify
        self.dest_timeout = dest_timeout  # seconds any guest I/O may wait for the destination
        # The copier flushes the destination every few MiB (fusedisk.checks.WRITEBACK_FILESYSTEMS)
        self.flush_while_copying = flush_while_copying
        self.phase = Phase.IDLE
        self.step = "starting"
        self.error: str | None = None
        self.switched = False  # the switch record is durable: no failing back from here
        self.destination: Destination | None = None  # the destination, until the switch
        self.old_source: ImageFile | None = None  # after the switch: to close and delete
        self._resized: Call[None] | None = None  # the destination's first operation
        self.cursor = 0  # the pass has dealt with every byte below this offset
        self.copied_bytes = 0
        self.mirrored_bytes = 0
        self.discarded_bytes = 0  # punched or zeroed by the guest on both files
        self.synced_by_writes_bytes = 0
        self.hole_bytes = 0
        # A resumed move's comparison (fusedisk.compare): bytes read from both files and
        # compared, and of those the ones found equal (not written; the rest count as copied).
        self.compared = Compared([])
        self.compared_bytes = 0
        self.found_equal_bytes = 0
        self.verified_bytes = 0
        self.switch_pause_ms: float | None = None
        self.switch_steps_ms: dict[str, float] = {}  # where the held time went, step by step
        self.resumed_from: int | None = None  # resumed after a crash: the checkpoint's cursor
        self.intent: Intent | None = None  # its write-intent record (fusedisk.intent)
        self.started = time.time()
        self.finished: float | None = None
        self.cancel_scope = trio.CancelScope()
        self.finished_event = trio.Event()
        self._cancelled_by_user = False
        self._rate_limit = rate_limit
        self._rate_changed = trio.Event()
        # Rate accounting: bytes copied since ``_budget_since`` may not exceed rate * elapsed.
        self._budget_since: float | None = None
        self._budget_bytes = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, copied_bytes) samples

    @property
    def active(self) -> bool:
        return self.phase in (Phase.MIRRORING, Phase.SWITCHING)

    def set_phase(self, phase: Phase) -> None:
        if phase not in _NEXT[self.phase]:
            raise StateError(current=self.phase.value, wanted=phase.value)
        log.info("move %s -> %s: %s", self.source, self.dest, phase.value)
        self.phase = phase
        if not self.active:
            self.finished = time.time()
            self.finished_event.set()

    async def at_destination(self, what: str, operation: Callable[[], None]) -> None:
        """A blocking step in the destination's directory, bounded by the deadline."""
        await bounded(self.dest_timeout, what, self.dest, operation)

    def begin(self, destination: Destination, resized: Call[None]) -> None:
        self.destination, self._resized = destination, resized
        self.set_phase(Phase.MIRRORING)

    @property
    def dest_writes(self) -> str:
        """How mirrored writes reach the destination (status): its lane, once mirroring."""
        return "not yet" if self.destination is None else self.destination.writes_through

    def fail(self, reason: str) -> None:
        """Ask for a fail-back (from any task, synchronously).  Too late once switched."""
        if self.switched or not self.active:
            return
        self.error = self.error or reason
        self.cancel_scope.cancel()

    def cancel(self) -> None:
        if self.switched or not self.active:
            return
        self._cancelled_by_user = True
        self.fail("cancelled by the user")

    # ---- rate limit ---------------------------------------------------------------------

    @property
    def rate_limit(self) -> int:
        return self._rate_limit

    def set_rate_limit(self, rate: int) -> None:
        self._rate_limit = rate
        self._budget_since = None  # a new limit counts from now
        self._rate_changed.set()
        self._rate_changed = trio.Event()

    async def _throttle(self, nbytes: int) -> None:
        """Sleep so that copying averages at most the rate limit (0: unlimited)."""
        now = trio.current_time()
        self._recent.append((now, self.copied_bytes))
        while self._recent and self._recent[0][0] < now - 2.0:
            self._recent.popleft()
        if not self._rate_limit:
            await trio.lowlevel.checkpoint()
            return
        # Average over time, not per chunk: time a slow chunk took (a busy machine) is credited
        # to the next ones, up to one second of catching up.
        if self._budget_since is None or now - self._budget_since > 1.0 + (
            self._budget_bytes / self._rate_limit
        ):
            self._budget_since, self._budget_bytes = now, 0
        self._budget_bytes += nbytes
        with trio.move_on_at(self._budget_since + self._budget_bytes / self._rate_limit):
            await self._rate_changed.wait()

    def recent_rate(self) -> float:
        """Bytes per second the copier moved over the last two seconds."""
        if len(self._recent) < 2 or not self.active:
            return 0.0
        (t0, b0), (t1, b1) = self._recent[0], self._recent[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def status(self, total: int) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "step": self.step,
            "source": self.source,
            "destination": self.dest,
            "progress_bytes": min(self.cursor, total),
            "total_bytes": total,
            "copied_bytes": self.copied_bytes,
            "mirrored_bytes": self.mirrored_bytes,
            "discarded_bytes": self.discarded_bytes,
            "synced_by_writes_bytes": self.synced_by_writes_bytes,
            "hole_bytes": self.hole_bytes,
            "compared_bytes": self.compared_bytes,
            "found_equal_bytes": self.found_equal_bytes,
            "verified_bytes": self.verified_bytes,
            "rate_limit": self._rate_limit,
            "rate": round(self.recent_rate()),
            "switch_pause_ms": self.switch_pause_ms,
            "switch_steps_ms": self.switch_steps_ms,
            "resumed_from": self.resumed_from,
            **(self.intent.status() if self.intent is not None else {}),
            "keep_source": self.keep_source,
            "dest_timeout": self.dest_timeout,
            "dest_writes": self.dest_writes,
            "flush_while_copying": self.flush_while_copying,
            "verify": self.verify,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
        }


async def run_move(disk: Disk, move: Move) -> None:
    """The move's background task, owned by the disk's nursery."""
    try:
        with move.cancel_scope:
            await _copy_pass(disk, move)
            if move.verify:
                await _verify(disk, move)
            await _switch(disk, move)
    except (OSError, trio.TooSlowError, VerifyMismatch) as e:
        move.error = move.error or f"{move.step}: {e}"
        disk.stop_mirroring()
    except Exception as e:  # a bug: still fail back rather than leave the disk half-moved
        log.exception("move task crashed")
        move.error = move.error or f"{move.step}: internal error {e!r}"
    finally:
        with trio.CancelScope(shield=True):
            if move.switched:
                await _finish(disk, move)
            elif move.active:
                move.error = move.error or "the daemon stopped before the move finished"
                await _fail_back(disk, move)


async def _copy_pass(disk: Disk, move: Move) -> None:
    """Copy, in one pass from start to end, every page that is data on the source and not in sync.

    Each chunk is examined and held in one synchronous step (no checkpoint between reading the
    sync map and holding the range), so a write either lands before (the map shows it; a mirror
    still on its way carries the bytes the copy reads from the source anyway) or waits until the
    chunk is copied (and is mirrored over the copy).  Extents are looked up once each (SEEK_DATA
    and SEEK_HOLE scan the page cache on tmpfs: ~2.5 ms for 512 MiB, with the disk's I/O waiting)
    and again after a truncate (a shrink and a regrowth leave a hole, which stays one): a write
    into a hole was mirrored, and a discard's whole pages are in the sync map.
    """
    move.step = "copying"
    dest, syncmap = move.destination, disk.syncmap
    assert dest is not None and syncmap is not None and move._resized is not None
    await dest.wait(move._resized)
    # A checkpoint flushes both files while the copy goes on (this nursery waits for it at
    # the end of the pass, before verify or the switch write the journal).
    failed: OSError | trio.TooSlowError | None = None
    async with trio.open_nursery() as checkpoints:
        try:
            await _copy_chunks(disk, move, dest, syncmap, checkpoints)
        except (OSError, trio.TooSlowError) as e:  # raised outside: not in an ExceptionGroup
            failed = e
            checkpoints.cancel_scope.cancel()
    if failed is not None:
        raise failed


async def _copy_chunks(
    disk: Disk, move: Move, dest: Destination, syncmap: SyncMap, checkpoints: trio.Nursery
) -> None:
    source = disk.primary
    unflushed = 0  # bytes copied since the last flush (when the copier flushes as it goes)
    data_end = 0  # the source holds data from the cursor to here (when the cursor is below)
    truncations = disk.truncations
    kicked = trio.current_time()  # when writeback was last started early (EARLY_WRITEBACK)
    while True:
        size = source.size()  # again each time: the guest may grow or shrink the disk
        cursor = move.cursor
        if cursor >= size:
            return
        if cursor >= data_end or truncations != disk.truncations:
            truncations, data_end = disk.truncations, 0
            data = min(source.next_data(cursor) // PAGE * PAGE, size)
            if data > cursor:
                move.hole_bytes += data - cursor
                move.cursor = data
                continue
            data_end = source.next_hole(cursor)
        end = min(data_end, cursor + CHUNK, size)
        end = max(min(-(-end // PAGE) * PAGE, size), min(cursor + PAGE, size))
        copied = read = 0
        chunk_started, guest_ops = trio.current_time(), disk.io_count
        with disk.locks.hold(cursor, end):
            runs = syncmap.unsynced_runs(cursor, end)
            move.synced_by_writes_bytes += (end - cursor) - sum(b - a for a, b in runs)
            for a, b, compare in (p for run in runs for p in move.compared.pieces(*run)):
                if compare:  # read both, write what differs, all in this held step
                    n, equal = await dest.run(
                        partial(write_differences, source, offset=a, length=b - a),
                        f"comparing at {a}",
                    )
                    move.compared_bytes += n + equal
                    move.found_equal_bytes += equal
                    read += n + equal
                else:
                    n = await dest.run(
                        partial(source.copy_to, offset=a, length=b - a), f"copying at {a}"
                    )
                    read += n
                copied += n
                move.copied_bytes += n
                crash_point("copy-chunk")
            syncmap.copy_reached(end)
        move.cursor = end
        if copied:
            # Outside the held range (a guest write there need not wait for the disk): start
            # writing the chunk back and wait for what was written 8 MiB before, so the
            # destination never holds much unflushed data and a guest flush, or the switch's,
            # takes about one chunk's time, not the whole pass's.
            await dest.run(partial(_writeback, cursor, end - cursor), "writeback")
            unflushed += copied
            if move.flush_while_copying and unflushed >= WRITEBACK_LAG:
                # A network filesystem keeps written data in its own queue, where writeback
                # does not reach (sshfs: all of it, until a flush, which then holds up the
                # guest's writes behind it): a flush every few MiB keeps that queue short.
                # (On a local one the writeback above reaches the disk: no need.)
                await dest.flush()
                unflushed = 0
        intent, now = disk.intent, trio.current_time()
        if (
            intent is not None
            and not intent.checkpointing
            and now - intent.checkpointed
            >= max(CHECKPOINT_EVERY, CHECKPOINT_PACE * intent.flush_seconds)
        ):
            await checkpoints.start(_checkpoint, disk, move, dest)
        elif intent is not None and EARLY_WRITEBACK and now - kicked >= EARLY_WRITEBACK:
            kicked = now
            checkpoints.start_soon(_start_writeback, disk, dest)
        # The limit is on bytes read from the source to copy or compare, not on bytes skipped.
        await move._throttle(read)
        if read and disk.io_count != guest_ops:
            # The guest is doing I/O: leave it the CPU for as long as the copy took (the
            # copier and the daemon's one thread share two cores with the VM).
            await trio.sleep((trio.current_time() - chunk_started) * GIVE_WAY)


async def _checkpoint(
    disk: Disk, move: Move, dest: Destination, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Record in the journal that all below the cursor is durably in sync (fusedisk.intent);
    started once the writes from now on are told apart.  A failure fails the move back."""
    intent, source = disk.intent, disk.primary
    assert intent is not None

    async def flush_both() -> None:
        await dest.wait_writes()  # the mirrored writes submitted so far have landed
        await dest.flush()
        await trio.to_thread.run_sync(source.fsync, True)

    try:
        await intent.checkpoint(move.cursor, flush_both, task_status.started)
    except OSError as e:
        disk.stop_mirroring()
        move.fail(f"checkpointing: {e.strerror or e}")
        return
    crash_point("checkpoint")


def _writeback(offset: int, length: int, dest: ImageFile) -> None:
    dest.start_writeback(offset, length)


async def _start_writeback(disk: Disk, dest: Destination) -> None:
    """Start writing both files' dirty pages back (length 0: to the end), waiting for none:
    the next checkpoint's flush then finds less to write.  Best effort: errors mean no help."""
    source = disk.primary
    try:
        await trio.to_thread.run_sync(source.start_writeback, 0, 0)
        await dest.run(partial(_writeback, 0, 0), "writeback", Lane.FLUSH)
    except (OSError, trio.TooSlowError) as e:  # a failing file fails the move elsewhere
        log.debug("early writeback: %s", e)


def _digest(image: ImageFile, offset: int, length: int) -> bytes:
    return xxhash.xxh3_128_digest(image.pread(length, offset))


async def _verify(disk: Disk, move: Move) -> None:
    """Compare both files chunk by chunk (xxh3_128) while the guest keeps writing."""
    move.step = "verifying"
    source, dest = disk.primary, move.destination
    assert dest is not None
    offset = 0
    while offset < (size := source.size()):
        end = min(offset + CHUNK, size)
        with disk.locks.hold(offset, end):
            await dest.wait_writes()  # those submitted before the hold have landed
            theirs = await dest.run(partial(_digest, offset=offset, length=end - offset), "verify")
            ours = await trio.to_thread.run_sync(_digest, source, offset, end - offset)
        if ours != theirs:
            raise VerifyMismatch(
                source=move.source, dest=move.dest, offset=offset, length=end - offset
            )
        move.verified_bytes = end
        offset = end
    if source.size() != await dest.run(lambda f: f.size(), "size"):
        raise VerifyMismatch(source=move.source, dest=move.dest, offset=size, length=0)


async def _switch(disk: Disk, move: Move) -> None:
    """Hold I/O, flush the destination, record the switch durably, resume on the destination.

    Every wait on the destination is bounded by its deadline, the held time included."""
    dest = move.destination
    assert dest is not None
    move.set_phase(Phase.SWITCHING)
    move.step = "flushing destination"
    # Flush with I/O still flowing until a flush is quick (little left dirty), and write the
    # switch record aside, so the held time is one small flush and one rename.
    for _ in range(4):
        started = time.perf_counter()
        await dest.flush()
        if time.perf_counter() - started < 0.002:
            break
    record = {
        "phase": "switched",
        "source": move.source,
        "destination": move.dest,
        "keep_source": move.keep_source,
    }
    await trio.to_thread.run_sync(disk.storage.prepare_journal, move.source, record)
    await dest.run(lambda f: f.check_in_place(), "checking the destination")
    move.step = "holding I/O"
    # The guest's pause starts when new I/O is held, before the I/O in flight has drained.
    hold_started = time.perf_counter()
    async with disk.held_io(drain_timeout=dest.deadline or DRAIN_TIMEOUT):
        drained = time.perf_counter()
        if move.error is not None:  # a mirrored write failed just before the hold
            return
        crash_point("switch-held")
        await dest.run(lambda f: f.check_in_place(), "checking the destination")
        checked = time.perf_counter()
        await dest.flush()  # only writes since the last flush
        flushed = time.perf_counter()
        disk.storage.commit_journal(move.source)
        recorded = time.perf_counter()
        crash_point("switch-recorded")
        move.old_source = disk.primary
        # The sync map is freed once I/O resumes, not in the guest's pause.
        synced, disk.syncmap, disk.intent = disk.syncmap, None, None
        disk.primary, disk.mirror = dest.release(), None
        move.switched = True
        ended = time.perf_counter()
        move.switch_pause_ms = _ms(ended - hold_started)
        move.switch_steps_ms = {
            "drain": _ms(drained - hold_started),
            "check": _ms(checked - drained),
            "flush": _ms(flushed - checked),
            "record": _ms(recorded - flushed),
            "release": _ms(ended - recorded),
        }
    del synced
    log.info(
        "switched to %s after a %.3f ms pause (ms: %s)",
        move.dest,
        move.switch_pause_ms,
        ", ".join(f"{step} {ms:g}" for step, ms in move.switch_steps_ms.items()),
    )
    disk.on_primary_changed()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def _finish(disk: Disk, move: Move) -> None:
    """After the switch: close and delete the source, drop the journal, report done.  The VM
    runs on the destination; a leftover source or marker is garbage, not a risk."""
    move.step = "deleting source" if not move.keep_source else "closing source"
    try:
        if move.old_source is not None:
            move.old_source.close()
        await move.at_destination(
            "removing the partial-destination marker", lambda: disk.storage.mark_complete(move.dest)
        )
    except OSError as e:
        move.error = f"switched, but the destination did not answer: {e}"
        log.error("%s", move.error)
    try:
        if not move.keep_source:
            await trio.to_thread.run_sync(disk.storage.remove, move.source)
            crash_point("source-deleted")
        await trio.to_thread.run_sync(disk.storage.clear_journal, move.source)
    except OSError as e:
        move.error = f"switched, but cleaning up {move.source} failed: {e}"
        log.error("%s", move.error)
    move.step = "done"
    move.set_phase(Phase.DONE)


async def _fail_back(disk: Disk, move: Move) -> None:
    """Stop mirroring, remove the partial destination: the source goes on serving, untouched.

    Guest I/O is not held: the destination, given up, answers every operation waiting for it
    at once, and closes its file itself once nothing can use it."""
    move.step = "failing back"
    intent = move.intent
    disk.stop_mirroring()
    # First, a record that promises nothing: a crash from then on rolls the move back, never
    # resumes it.  Until then guest writes wait (the source alone has them).
    promised = intent is not None and (intent.records > 0 or move.resumed_from is not None)
    if intent is not None and promised:
        try:
            await intent.withdraw()
            promised = False
        except OSError as e:
            log.error("fail-back could not withdraw the checkpoint of %s: %s", move.source, e)
    if not promised:
        disk.intent_settled(intent)
    try:
        await move.at_destination(
            "removing the partial destination", lambda: disk.storage.remove(move.dest)
        )
    except OSError as e:
        log.error("fail-back could not remove %s: %s", move.dest, e)
        move.error = (
            f"{move.error}; the partial destination {move.dest} (and its marker "
            f"{marker_path(move.dest)}) may remain: {e.strerror or e}"
        )
    # (Removed, it cannot be resumed; not removed either, writes cannot wait for ever.)
    disk.intent_settled(intent)
    try:
        await trio.to_thread.run_sync(disk.storage.clear_journal, move.source)
    except OSError as e:
        log.error("fail-back could not clear the journal of %s: %s", move.source, e)
    move.step = "failed back"
    move.set_phase(Phase.CANCELLED if move._cancelled_by_user else Phase.FAILED)
    log.warning("move to %s failed back: %s", move.dest, move.error)
