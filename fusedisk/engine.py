"""The disk engine: serves one image and mirrors writes during a move.  It knows nothing of FUSE.

Concurrency contract (relied on, not hoped for): trio runs one task at a time and switches only
at checkpoints.  ``read``, ``write`` and ``truncate`` do their file I/O inline, with no checkpoint
between writing the source, writing the destination and marking the sync map.  So a guest write is
one indivisible step with respect to every other task: the copier can only interleave with it
through its thread-side copy, and :class:`~fusedisk.syncmap.RangeLocks` keeps those apart.  The
only awaits on the I/O path are (a) the I/O gate, closed only while a switch or fail-back holds
I/O, (b) waiting for a range the copier holds, and (c) fsync, which runs in threads.

``_inflight`` counts operations between ``_enter`` and ``_leave``: holding I/O waits for it to
reach zero, so no operation still uses a file that a switch or fail-back is about to replace.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from fusedisk.backend import ImageFile
from fusedisk.errors import MoveRefused
from fusedisk.failpoints import crash_point
from fusedisk.storage import Storage
from fusedisk.syncmap import RangeLocks, SyncMap

if TYPE_CHECKING:
    from fusedisk.move import Move

log = logging.getLogger(__name__)

# A held switch waits at most this long for in-flight I/O (a stuck fsync) before it fails back.
DRAIN_TIMEOUT = 10.0


class Disk:
    def __init__(self, image: ImageFile, storage: Storage, nursery: trio.Nursery) -> None:
        self.primary = image  # authoritative: every read comes from here
        self.mirror: ImageFile | None = None  # the move's destination while mirroring
        self.syncmap: SyncMap | None = None
        self.locks = RangeLocks()
        self.storage = storage
        self.move: Move | None = None  # the current or last move
        self._nursery = nursery
        self._resume: trio.Event | None = None  # set while I/O is held
        self._inflight = 0
        self._drained: trio.Event | None = None
        self.flushes = 0  # completed guest flushes: proves fsync reaches the daemon
        self._starting = False
        self.last_io = 0.0
        # Called once another file serves the disk: the FUSE layer drops the kernel's cached
        # attributes (they describe the old file's blocks and times).
        self.on_primary_changed: Callable[[], None] = lambda: None

    # ---- the I/O gate -------------------------------------------------------------------

    async def _enter(self) -> None:
        while self._resume is not None:
            await self._resume.wait()
        self._inflight += 1
        self.last_io = trio.current_time()  # the copier gives way while the guest is busy

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

    async def read(self, offset: int, size: int) -> bytes:
        await self._enter()
        try:
            return self.primary.pread(size, offset)
        except OSError as e:
            if self.mirror is not None:  # a failing source: stop moving, keep serving
                self._mirror_failed(f"source read at offset {offset} failed: {e}")
            raise
        finally:
            self._leave()

    async def write(self, offset: int, data: bytes) -> int:
        await self._enter()
        try:
            if self.mirror is not None:
                await self.locks.wait_unlocked(offset, offset + len(data))
            self._write_both(offset, data)  # no checkpoint from here on
        finally:
            self._leave()
        return len(data)

    def _write_both(self, offset: int, data: bytes) -> None:
        if self._apply_both(lambda f: f.pwrite(data, offset), "write at offset", offset):
            assert self.syncmap is not None and self.move is not None
            self.syncmap.mark_written(offset, offset + len(data))
            self.move.mirrored_bytes += len(data)

    def _apply_both(self, operation: Callable[[ImageFile], None], what: str, where: int) -> bool:
        """Apply ``operation`` to the source, then, while mirroring, to the destination; return
        True if it reached both.  A source error is the guest's (raised) and fails the move back;
        a destination error fails the move back and is not the guest's: the source, which stays
        authoritative, has the change.  Synchronous, so nothing interleaves."""
        mirror = self.mirror
        try:
            operation(self.primary)
        except OSError as e:
            if mirror is not None:
                self._mirror_failed(f"source {what} {where} failed: {e}")
            raise
        if mirror is None:
            return False
        try:
            operation(mirror)
        except OSError as e:
            self._mirror_failed(f"destination {what} {where} failed: {e}")
            return False
        return True

    async def truncate(self, size: int) -> None:
        await self._enter()
        try:
            if self.mirror is not None:
                # A shrink must not race the copier writing old bytes past the new end.
                await self.locks.wait_unlocked(min(size, self.primary.size()), math.inf)
            if self._apply_both(lambda f: f.truncate(size), "truncate to", size):
                assert self.syncmap is not None
                self.syncmap.resize(size)
        finally:
            self._leave()

    async def flush(self, datasync: bool = False) -> None:
        """Return once every acknowledged write is durable on the source and, while mirroring,
        on the destination too (DESIGN.md, "Flush means both")."""
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
                if mirror is not None and self.mirror is mirror:
                    self._mirror_failed(f"source flush failed: {primary_error}")
                raise primary_error
            self.flushes += 1
        finally:
            self._leave()

    async def _flush_mirror(self, mirror: ImageFile, datasync: bool) -> None:
        try:
            await trio.to_thread.run_sync(mirror.fsync, datasync)
        except OSError as e:
            if self.mirror is mirror:
                self._mirror_failed(f"destination flush failed: {e}")

    def size(self) -> int:
        return self.primary.size()

    # ---- moves --------------------------------------------------------------------------

    def _mirror_failed(self, reason: str) -> None:
        """Stop mirroring at once (no later write touches the destination) and have the move's
        task fail back.  Called from synchronous code: it must not await."""
        log.warning("move fails back: %s", reason)
        self.mirror = None
        if self.move is not None:
            self.move.fail(reason)

    async def start_move(
        self, dest: str, *, rate_limit: int = 0, keep_source: bool = False, verify: bool = False
    ) -> Move:
        """Create ``dest``, start mirroring, and start the copier; return once mirroring is on."""
        from fusedisk.move import Move, run_move

        source = self.primary.path
        self.check_can_move(dest)
        self._starting = True  # until mirroring is on: a second request is refused meanwhile
        try:
            # The journal first: after a crash at any point from here, it leads to the
            # destination (if it was created) and to its removal.
            record: dict[str, Any] = {"phase": "mirroring", "source": source}
            record.update(destination=dest, keep_source=keep_source)
            await trio.to_thread.run_sync(self.storage.write_journal, source, record)
            try:
                dest_file = await trio.to_thread.run_sync(
                    self.storage.create, dest, self.primary.size(), self.primary, source
                )
            except BaseException:
                self.storage.clear_journal(source)
                raise
        finally:
            self._starting = False
        move = Move(source, dest, rate_limit=rate_limit, keep_source=keep_source, verify=verify)
        # From here to the end, no checkpoint: no guest write can fall between taking the size
        # and turning mirroring on.
        size = self.primary.size()
        dest_file.truncate(size)
        self.mirror, self.syncmap, self.move = dest_file, SyncMap(size), move
        move.begin(dest_file)
        crash_point("mirroring-started")
        self._nursery.start_soon(run_move, self, move)
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
        status: dict[str, Any] = {
            "image": self.primary.path,
            "size": self.primary.size(),
            "flushes": self.flushes,
        }
        if self.move is None:
            status.update(phase="idle", source=None, destination=None, error=None)
        else:
            status.update(self.move.status(total=status["size"]))
        return status
