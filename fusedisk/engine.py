"""The disk engine: serves one image and mirrors writes during a move.  It knows nothing of FUSE.

Concurrency contract (relied on, not hoped for): trio runs one task at a time and switches only
at checkpoints.  ``read``, ``write`` and ``truncate`` do their source I/O inline, and a mirrored
write submits its destination half (:mod:`fusedisk.destination`), writes the source and marks
the sync map with no checkpoint in between.  So each is one indivisible step with respect to
every other task: the copier can only interleave with it through its thread-side copy, and
:class:`~fusedisk.syncmap.RangeLocks` keeps those apart.  The only awaits on the I/O path are
(a) the I/O gate, closed only while a switch holds I/O, (b) waiting for a range the copier
holds, (c) waiting for the destination (at most its deadline), (d) fsync, in threads, and (e)
a write below the move's checkpoint waiting for its region's durable mark (or, while a move
fails back, for its record to be withdrawn).

``_inflight`` counts operations that await midway, between ``_enter`` and ``_leave``: holding
I/O waits for it to reach zero, so no operation still uses a file that a switch replaces.  The
fast paths (``try_read``, ``try_write``) have no checkpoint after the gate and need no count.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from fusedisk.backend import (
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    ImageFile,
)
from fusedisk.compare import Compared, clear_untrusted
from fusedisk.destination import DEST_TIMEOUT, Call, Destination, FileCall, bounded
from fusedisk.errors import MoveRefused
from fusedisk.failpoints import crash_point
from fusedisk.intent import CHECKPOINT_EVERY, Intent, marked_runs, region_size, trusted_runs
from fusedisk.storage import Storage
from fusedisk.syncmap import RangeLocks, SyncMap

if TYPE_CHECKING:
    from fusedisk.move import Move

log = logging.getLogger(__name__)

# fallocate modes after which the range reads as zeros: on both files alike once mirrored.
ZEROING = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
# A fallocate mode the serving file's filesystem does not support: the caller's error alone.
REFUSED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS})


class Disk:
    def __init__(self, image: ImageFile, storage: Storage, nursery: trio.Nursery) -> None:
        self.primary = image  # authoritative: every read comes from here
        self.mirror: Destination | None = None  # the move's destination while mirroring
        self.syncmap: SyncMap | None = None
        self.intent: Intent | None = None  # the move's write-intent record, while mirroring
        self.locks = RangeLocks()
        self.storage = storage
        self.move: Move | None = None  # the current or last move
        self._nursery = nursery
        self._resume: trio.Event | None = None  # set while I/O is held
        self._inflight = 0
        self._drained: trio.Event | None = None
        self.flushes = 0  # completed guest flushes: proves fsync reaches the daemon
        self.io_error: str | None = None  # the last error the serving file gave the guest
        self._starting = False
        self.io_count = 0  # guest operations served: the copier gives way while it grows
        self.truncations = 0  # size changes: the copier's extents from before are stale
        # Called once another file serves the disk: the FUSE layer drops the kernel's cached
        # attributes (they describe the old file's blocks and times).
        self.on_primary_changed: Callable[[], None] = lambda: None

    # ---- the I/O gate -------------------------------------------------------------------

    async def wait_resumed(self) -> None:
        """Return once guest I/O is not held (by a switch)."""
        while self._resume is not None:
            await self._resume.wait()

    async def _enter(self) -> None:
        """For an operation that awaits midway: counted in flight, so a hold waits for it."""
        await self.wait_resumed()
        self._inflight += 1
        self.io_count += 1

    def _leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._drained is not None:
            self._drained.set()

    @asynccontextmanager
    async def held_io(self, drain_timeout: float = math.inf) -> AsyncIterator[None]:
        """Hold new I/O and wait for in-flight I/O to finish; resume I/O on exit."""
        assert self._resume is None, "I/O is held by one owner at a time"
        self._resume = trio.Event()
        try:
            with trio.fail_after(drain_timeout):
                while self._inflight:
                    self._drained = trio.Event()
                    await self._drained.wait()
            self._drained = None
            yield
        finally:
            self._drained = None
            resume, self._resume = self._resume, None
            resume.set()

    # ---- guest I/O ----------------------------------------------------------------------

    def try_read(self, offset: int, size: int) -> bytes | None:
        """Read now; None while I/O is held (then ``await wait_resumed()`` and try again).

        The fast path, synchronous so that the FUSE handler calls it with no coroutine in
        between (each call level costs about 1 µs per request here: docs/benchmarks.md).  No
        checkpoint, so no hold can begin while it runs: it need not be counted in flight."""
        if self._resume is not None:
            return None
        self.io_count += 1
        try:
            return self.primary.pread(size, offset)
        except OSError as e:
            self._source_failed(f"read at offset {offset}", e)
            raise

    async def read(self, offset: int, size: int) -> bytes:
        while (data := self.try_read(offset, size)) is None:
            await self.wait_resumed()
        return data

    def _source_failed(self, what: str, error: OSError) -> None:
        """The serving file failed the guest (who gets the error): say so in the status, and
        stop a move (a failing source cannot be copied)."""
        self.io_error = f"{what} of {self.primary.path} failed: {error.strerror or error}"
        if self.mirror is not None:
            self._mirror_failed(f"source {what} failed: {error}")

    def try_write(self, offset: int, data: bytes) -> bool:
        """Write now and return True, as :meth:`try_read`; False when the write must wait
        (I/O held) or be mirrored: then ``await write()``."""
        if self._resume is not None or self.mirror is not None or self.intent is not None:
            return False
        self.io_count += 1
        try:
            self.primary.pwrite(data, offset)
        except OSError as e:
            self._source_failed(f"write at offset {offset}", e)
            raise
        return True

    async def write(self, offset: int, data: bytes) -> int:
        while not self.try_write(offset, data):
            if self.mirror is not None:
                return await self._write_mirrored(offset, data)
            if self.intent is not None:  # a fail-back is withdrawing the move's promises
                await self.intent.settled.wait()
                continue
            await self.wait_resumed()
        return len(data)

    async def _write_mirrored(self, offset: int, data: bytes) -> int:
        await self._enter()
        try:
            await self._ready_to_mirror(offset, offset + len(data))
            # No checkpoint from here to the wait: submit, write the source, mark the map.
            mirrored = self._apply_both(FileCall("pwrite", data, offset), "write at offset", offset)
            if mirrored is not None:
                assert self.syncmap is not None and self.move is not None
                # Marked before the destination has it: if it never does, the move fails back
                # and the map is thrown away; if it does, the copier must not copy it again.
                self.syncmap.mark_written(offset, offset + len(data))
                self.move.mirrored_bytes += len(data)
                if self.intent is not None:
                    self.intent.written(offset, offset + len(data))
                await self._wait_mirror(*mirrored)
        finally:
            self._leave()
        return len(data)

    async def _ready_to_mirror(self, start: int, end: int, locked: float | None = None) -> None:
        """Return, with no checkpoint after the last look, once [start, ``locked`` or end) is
        held by no copier and [start, end), below the move's checkpoint, is durably marked in
        its write-intent record (:mod:`fusedisk.intent`).  If the mark cannot be written, the
        move fails back, and this waits until the record promises nothing before the caller
        writes."""
        while True:
            intent = self.intent
            if self.mirror is None:
                if intent is None:
                    return
                # Failing back: until the record promises nothing, a write that reaches the
                # source alone could be trusted by a resume after a crash.
                await intent.settled.wait()
                continue
            await self.locks.wait_unlocked(start, end if locked is None else locked)
            intent = self.intent
            if self.mirror is None:
                continue
            if intent is None or not intent.must_mark(start, end):
                return
            try:
                await intent.mark(start, end)
            except OSError as e:
                if self.mirror is not None:
                    self._mirror_failed(f"recording a write's intent failed: {e.strerror or e}")

    def _apply_both(
        self, operation: FileCall, what: str, where: int, refused: frozenset[int] = frozenset()
    ) -> tuple[Destination, Call[None]] | None:
        """While mirroring, submit ``operation`` to the destination (its thread runs it while
        this one writes the source); apply it to the source; return what to wait for.

        A source error is the guest's (raised) and fails the move back; a destination error or
        a missed deadline, found by :meth:`_wait_mirror`, fails the move back and is not the
        guest's: the source, which stays authoritative, has the change.  Synchronous, so the
        order of submits is the order of the guest's operations.

        With ``refused`` (errnos by which the source's filesystem says it does not do this
        operation, rather than fails), the source goes first and the destination gets the
        operation only if the source did it: a refusal is the guest's error alone, and the
        move goes on with both files unchanged."""
        mirror = self.mirror
        call = None
        if mirror is not None and not refused:
            call = mirror.submit(operation, f"{what} {where}")
        try:
            operation(self.primary)
        except OSError as e:
            if e.errno not in refused:
                self._source_failed(f"{what} {where}", e)
            raise
        if mirror is not None and call is None:
            call = mirror.submit(operation, f"{what} {where}")
        return None if mirror is None or call is None else (mirror, call)

    async def _wait_mirror(self, mirror: Destination, call: Call[None]) -> None:
        """Wait (at most the destination's deadline) for a mirrored operation to land."""
        try:
            await mirror.wait(call)
        except OSError as e:
            if self.mirror is mirror:
                self._mirror_failed(f"destination {call.what}: {e.strerror or e}")

    async def truncate(self, size: int) -> None:
        await self._enter()
        try:
            # A shrink must not race the copier writing old bytes past the new end; what
            # changes (from the lower of the two sizes on) is a write for the intent record.
            old = self.primary.size()
            await self._ready_to_mirror(min(size, old), max(size, old), locked=math.inf)
            self.truncations += 1
            mirrored = self._apply_both(FileCall("truncate", size), "truncate to", size)
            if mirrored is not None:
                assert self.syncmap is not None
                self.syncmap.resize(size)
                if self.intent is not None:
                    self.intent.written(min(size, old), max(size, old))
                await self._wait_mirror(*mirrored)
        finally:
            self._leave()

    async def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the serving file and, while mirroring, on the destination: discard
        (PUNCH_HOLE|KEEP_SIZE), zero (ZERO_RANGE, with or without KEEP_SIZE) or preallocate
        (0 or KEEP_SIZE) [offset, offset+length).

        For the move it is a write (DESIGN.md): it waits for a range the copier holds (else the
        copier could write the old bytes it read back over the discarded range), marks its
        regions in the write-intent record, and is mirrored before it returns.  A discarded or
        zeroed range reads as zeros on both files, so its whole pages are in sync and the
        copier skips them; a preallocated one changes no byte, so it marks nothing.  A mode
        the source's filesystem refuses (EOPNOTSUPP) is raised to the caller, and neither
        file changes; a destination that fails it fails the move back."""
        end = offset + length
        await self._enter()
        try:
            await self._ready_to_mirror(offset, end)
            # No checkpoint from here to the wait, as for a write.
            old_size = self.primary.size() if self.mirror is not None else 0
            operation = FileCall("fallocate", mode, offset, length)
            mirrored = self._apply_both(operation, "fallocate at offset", offset, REFUSED)
            if mirrored is not None:
                assert self.syncmap is not None and self.move is not None
                size = self.primary.size()
                if size != old_size:
                    self.syncmap.resize(size)
                if mode & ZEROING and offset < size:
                    self.syncmap.mark_written(offset, min(end, size))
                    self.move.discarded_bytes += min(end, size) - offset
                if self.intent is not None:
                    self.intent.written(offset, end)
                await self._wait_mirror(*mirrored)
        finally:
            self._leave()

    async def seek(self, offset: int, whence: int) -> int:
        """lseek(2) with SEEK_DATA or SEEK_HOLE, answered from the serving file (the source
        during a move: it is authoritative).  ENXIO at or past the end, and for SEEK_DATA when
        no data follows; the end counts as a hole."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE reach the disk")
        await self.wait_resumed()  # during a switch's hold, ask whichever file then serves
        size = self.primary.size()
        if offset >= size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        if whence == os.SEEK_HOLE:
            return min(self.primary.next_hole(offset), size)
        found = self.primary.next_data(offset)
        if found >= size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return found

    async def flush(self, datasync: bool = False) -> None:
        """Return once every acknowledged write is durable on the source and, while mirroring,
        on the destination too (DESIGN.md, "Flush means both"), or the destination has failed
        (or missed its deadline) and the move fails back."""
        await self._enter()
        try:
            primary, mirror = self.primary, self.mirror
            primary_error: OSError | None = None
            async with trio.open_nursery() as nursery:
                if mirror is not None:
                    nursery.start_soon(self._flush_mirror, mirror, datasync)
                try:
                    await trio.to_thread.run_sync(primary.fsync, datasync)
                except OSError as e:  # raised outside the nursery, so not in an ExceptionGroup
                    primary_error = e
            if primary_error is not None:
                self._source_failed("flush", primary_error)
                raise primary_error
            self.flushes += 1
        finally:
            self._leave()

    async def _flush_mirror(self, mirror: Destination, datasync: bool) -> None:
        try:
            await mirror.flush(datasync)
        except OSError as e:
            if self.mirror is mirror:
                self._mirror_failed(f"destination flush: {e.strerror or e}")

    def size(self) -> int:
        return self.primary.size()

    # ---- moves --------------------------------------------------------------------------

    def _mirror_failed(self, reason: str) -> None:
        """Stop mirroring at once (no later write touches the destination) and have the move's
        task fail back.  Called from synchronous code: it must not await."""
        log.warning("move fails back: %s", reason)
        self.stop_mirroring()
        if self.move is not None:
            self.move.fail(reason)

    def destination_late(self, what: str) -> None:
        """The destination missed its deadline (the move's watchdog says which call)."""
        self._mirror_failed(f"destination {what}")

    def stop_mirroring(self) -> None:
        """From now on no operation touches the destination, and those waiting for it are
        answered at once: it is given up (it closes its file once nothing uses it)."""
        mirror, self.mirror, self.syncmap = self.mirror, None, None
        if mirror is not None:
            mirror.abandon()

    def intent_settled(self, intent: Intent | None) -> None:
        """A failed move's intent record promises nothing any more (or cannot be made to):
        writes to the source alone may go on."""
        if intent is not None:
            if self.intent is intent:
                self.intent = None
            intent.settled.set()

    async def start_move(
        self,
        dest: str,
        *,
        rate_limit: int = 0,
        keep_source: bool = False,
        verify: bool = False,
        dest_timeout: float = DEST_TIMEOUT,
        flush_while_copying: bool | None = None,
    ) -> Move:
        """Create ``dest``, start mirroring, and start the copier; return once mirroring is on.
        ``flush_while_copying``: whether the copier flushes the destination every few MiB
        (:data:`fusedisk.checks.WRITEBACK_FILESYSTEMS`); by default when it has a deadline."""
        from fusedisk.move import Move

        source = self.primary.path
        self.check_can_move(dest)
        self._starting = True  # until mirroring is on: a second request is refused meanwhile
        try:
            # The journal first: after a crash at any point from here, it leads to the
            # destination (if it was created) and to its removal.
            record: dict[str, Any] = {"phase": "mirroring", "source": source}
            record.update(destination=dest, keep_source=keep_source, verify=verify)
            if flush_while_copying is None:
                flush_while_copying = dest_timeout > 0
            record.update(dest_timeout=dest_timeout, rate_limit=rate_limit)
            record.update(flush_while_copying=flush_while_copying)
            await trio.to_thread.run_sync(self.storage.write_journal, source, record)
            try:
                dest_file, dest_id = await bounded(
                    dest_timeout,
                    f"creating {dest}",
                    dest,
                    lambda: _identified(
                        self.storage.create(dest, self.primary.size(), self.primary, source)
                    ),
                )
            except BaseException:
                self.storage.clear_journal(source)
                raise
        finally:
            self._starting = False
        move = Move(
            source,
            dest,
            rate_limit=rate_limit,
            keep_source=keep_source,
            verify=verify,
            dest_timeout=dest_timeout,
            flush_while_copying=flush_while_copying,
        )
        intent = None
        if math.isfinite(CHECKPOINT_EVERY):  # (else no record: a benchmark knob)
            intent = Intent(self.storage, record, region_size(self.primary.size()))
            intent.dest_id = dest_id
        return self._mirror_to(move, dest_file, intent, trusted=[])

    async def resume_move(self, record: dict[str, Any], dest_timeout: float) -> Move:
        """Go on with a move a crash interrupted: ``record`` is its journal's, whose checkpoint
        recovery found valid.  Open the destination, trust what the checkpoint says is in
        sync (:func:`fusedisk.intent.trusted_runs`), mirror, compare the regions it marks
        below its cursor (:mod:`fusedisk.compare`) and copy the rest."""
        from fusedisk.move import Move

        source, dest = self.primary.path, str(record["destination"])
        checkpoint = record["checkpoint"]
        cursor, region = int(checkpoint["cursor"]), int(checkpoint["region"])
        marks = {int(m) for m in checkpoint["marks"]}
        self.check_can_move(dest)
        dest_file, dest_id = await bounded(
            dest_timeout, f"opening {dest}", dest, lambda: _identified(self.storage.open(dest))
        )
        keep_source, verify = bool(record.get("keep_source")), bool(record.get("verify"))
        move = Move(
            source,
            dest,
            rate_limit=int(record.get("rate_limit", 0)),
            keep_source=keep_source,
            verify=verify,
            dest_timeout=dest_timeout,
            flush_while_copying=bool(record.get("flush_while_copying", dest_timeout > 0)),
        )
        move.resumed_from = cursor
        base = {k: v for k, v in record.items() if k != "checkpoint"}
        intent = Intent(self.storage, base, region, cursor=cursor, marks=marks)
        intent.dest_id = dest_id
        size = self.primary.size()
        trusted = trusted_runs(size, cursor, region, marks)
        marked = marked_runs(size, cursor, region, marks)
        move.compared = Compared(marked)
        try:
            await bounded(
                dest_timeout,
                f"clearing {dest} where it may be out of sync",
                dest,
                partial(clear_untrusted, dest_file, self.primary, cursor, marked, size),
            )
        except BaseException:
            with suppress(OSError):
                dest_file.close()
            raise
        return self._mirror_to(move, dest_file, intent, trusted)

    def _mirror_to(
        self,
        move: Move,
        dest_file: ImageFile,
        intent: Intent | None,
        trusted: list[tuple[int, int]],
    ) -> Move:
        """Turn mirroring on to ``dest_file`` and start the copier, trusting ``trusted``
        byte ranges as in sync."""
        from fusedisk.move import run_move

        mirror = Destination(dest_file, move.dest_timeout)
        # From here to the end, no checkpoint: no guest write can fall between taking the size
        # and turning mirroring on (and the resize is queued before any mirrored write).
        size = self.primary.size()
        resized = mirror.submit(FileCall("truncate", size), "sizing the destination")
        syncmap = SyncMap(size)
        for start, end in trusted:
            syncmap.mark_written(start, end)
        self.mirror, self.syncmap, self.move, self.intent = mirror, syncmap, move, intent
        move.intent = intent
        move.begin(mirror, resized)
        crash_point("mirroring-started")
        self._nursery.start_soon(run_move, self, move)
        # Keeps the destination's deadline; ends once it is given up or serves the disk.
        self._nursery.start_soon(mirror.watch, self.destination_late)
        return move

    def check_can_move(self, dest: str) -> None:
        """Refuse a move while another is starting or running."""
        if self._starting:
            raise MoveRefused(
                dest=dest, source=self.primary.path, reason="a move is already starting"
            )
        if self.move is not None and self.move.active:
            reason = f"a move is already {self.move.phase.value}"
            raise MoveRefused(dest=dest, source=self.primary.path, reason=reason)

    def status(self) -> dict[str, Any]:
        """Never fails: a serving file that cannot even be stat'ed (a dead remote) is reported."""
        try:
            size: int | None = self.primary.size()
        except OSError as e:
            size = None
            self.io_error = f"stat of {self.primary.path} failed: {e.strerror or e}"
        status: dict[str, Any] = {
            "image": self.primary.path,
            "size": size,
            "flushes": self.flushes,
            "io_error": self.io_error,
        }
        if self.move is None:
            status.update(phase="idle", source=None, destination=None, error=None)
        else:
            status.update(self.move.status(total=size or 0))
        return status


def _identified(file: ImageFile) -> tuple[ImageFile, list[int]]:
    """The file, and its (st_dev, st_ino): a resumed move checks it still is the same file."""
    st = file.stat()
    return file, [st.st_dev, st.st_ino]
