"""A move's destination, reached through one worker thread of its own, with a deadline on each call.

Why a thread: a destination on a network filesystem can hang inside the kernel for as long as the
network or server is gone (NFS hard mounts: hours; a stalled sshfs).  A syscall stuck there can
be neither interrupted nor cancelled, only abandoned.  So every operation on the destination
file (mirrored writes and truncates, the copier's chunks, flushes, verify reads, the checks
before the switch) runs in this one thread, in the order submitted, and the event loop waits
for each at most ``deadline`` seconds.  One FIFO thread keeps overlapping mirrored writes in the
order the guest issued them, and keeps each copier chunk in its place among them.

When a call fails or misses its deadline the move fails back, and the destination is abandoned:
its waiters are answered at once, calls still queued never run, and the thread closes the file
once its current syscall returns (perhaps never) and ends.  Only this thread ever touches the
descriptor, so a write that lands late lands in the abandoned file, never in a file that reused
the descriptor's number; and the next move gets a new thread, so it never waits behind a dead one.

With ``deadline == 0`` there is no thread: calls run inline as plain syscalls, and bulk calls in
trio's threads, with no bound (for local storage that fails rather than hangs; it saves the
hand-off, see docs/benchmarks.md).
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import outcome
import trio

from fusedisk.backend import ImageFile

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[ImageFile], T]

# How long a guest operation may wait for the destination (``fusedisk migrate --dest-timeout``).
DEST_TIMEOUT = 1.0


class DestinationTimeout(OSError):
    def __init__(self, path: str, what: str, deadline: float) -> None:
        super().__init__(errno.ETIMEDOUT, f"{what} did not complete within {deadline:g} s", path)


class Call(Generic[T]):
    """One operation submitted to the worker; its outcome is set in the event loop's thread."""

    __slots__ = ("done", "operation", "result", "what")

    def __init__(self, operation: Operation[T], what: str) -> None:
        self.operation = operation
        self.what = what
        self.result: outcome.Outcome[T] | None = None
        self.done = trio.Event()


class Destination:
    def __init__(self, file: ImageFile, deadline: float) -> None:
        self.file = file
        self.path = file.path
        self.deadline = deadline
        self.abandoned = False
        self._pending: set[Call[object]] = set()
        self._queue: queue.SimpleQueue[Call[object] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._busy = 0  # with no thread: bulk calls running in trio's threads
        self._closed = False
        self._keep_open = False  # released: the file serves the disk now
        if deadline > 0:
            self._token = trio.lowlevel.current_trio_token()
            # A daemon thread: one stuck in the kernel must not keep the process from exiting.
            self._thread = threading.Thread(
                target=self._work, name=f"fusedisk destination {self.path}", daemon=True
            )
            self._thread.start()

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    # ---- the event loop's side -----------------------------------------------------------

    def submit(self, operation: Operation[T], what: str) -> Call[T]:
        """Queue ``operation``; with no thread, run it now.  Never a checkpoint, so a caller's
        synchronous step (write the source, submit the mirror, mark the sync map) stays whole."""
        call: Call[T] = Call(operation, what)
        if self.abandoned:
            call.result = outcome.Error(self._gone(what))
        elif self._thread is None:
            call.result = outcome.capture(operation, self.file)
        else:
            self._pending.add(call)  # type: ignore[arg-type]
            self._queue.put(call)  # type: ignore[arg-type]
        return call

    async def wait(self, call: Call[T]) -> T:
        """The call's result, or its error; DestinationTimeout past the deadline.  No
        checkpoint when it is already done (always so with no thread)."""
        if call.result is None:
            with trio.move_on_after(self.deadline):
                await call.done.wait()
            if call.result is None:
                raise DestinationTimeout(self.path, call.what, self.deadline)
        return call.result.unwrap()

    async def run(self, operation: Operation[T], what: str) -> T:
        """A bulk operation (a chunk, a flush): in the worker with the deadline, or with no
        thread of its own in one of trio's."""
        if self._thread is None and not self.abandoned:
            self._busy += 1  # the file stays open until this thread is done with it
            try:
                return await trio.to_thread.run_sync(operation, self.file)
            finally:
                self._busy -= 1
                if self.abandoned and not self._busy:
                    self._close_once()
        return await self.wait(self.submit(operation, what))

    def abandon(self) -> None:
        """Give the destination up: answer every waiter now, run nothing more, and close the file
        in the worker once its current call returns (at once with no thread)."""
        if self.abandoned:
            return
        self.abandoned = True
        for call in self._pending:
            if call.result is None:
                call.result = outcome.Error(self._gone(call.what))
                call.done.set()
        self._pending.clear()
        if self._thread is not None:
            self._queue.put(None)
        elif not self._busy:
            self._close_once()

    def release(self) -> ImageFile:
        """Stop the worker, idle (I/O is held and drained), and hand over the open file: the
        destination now serves the disk, inline like any primary."""
        assert not self._pending, "release only when nothing is in flight"
        self._keep_open = True
        self.abandoned = True  # nothing more goes through the worker
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=self.deadline)  # idle: it returns at once
        return self.file

    def _gone(self, what: str) -> OSError:
        return OSError(errno.EIO, f"{what}: the destination was given up", self.path)

    def _complete(self, call: Call[object], result: outcome.Outcome[object]) -> None:
        self._pending.discard(call)
        if call.result is None:  # not already answered by abandon()
            call.result = result
            call.done.set()

    def _close_once(self) -> None:
        if not self._closed and not self._keep_open:
            self._closed = True
            _close(self.file)

    # ---- the worker thread -----------------------------------------------------------------

    def _work(self) -> None:
        while (call := self._queue.get()) is not None and not self.abandoned:
            result = outcome.capture(call.operation, self.file)
            try:
                self._token.run_sync_soon(self._complete, call, result)
            except trio.RunFinishedError:
                return  # the daemon is gone; so is its descriptor table
        self._close_once()


async def bounded(deadline: float, what: str, path: str, operation: Callable[[], T]) -> T:
    """Run a blocking call that touches the destination's directory (create, remove, the
    marker) in one of trio's threads; past the deadline, abandon it (it may still complete:
    whatever it leaves is a partial destination, marked as such) and raise DestinationTimeout.
    No deadline when ``deadline`` is 0."""
    if deadline <= 0:
        return await trio.to_thread.run_sync(operation)
    with trio.move_on_after(deadline):
        return await trio.to_thread.run_sync(operation, abandon_on_cancel=True)
    raise DestinationTimeout(path, what, deadline)


def bounded_sync(deadline: float, what: str, path: str, operation: Callable[[], T]) -> T:
    """:func:`bounded` for code outside the event loop (recovery before mounting)."""
    done: list[outcome.Outcome[T]] = []
    worker = threading.Thread(
        target=lambda: done.append(outcome.capture(operation)), name=what, daemon=True
    )
    worker.start()
    worker.join(deadline)
    if not done:
        raise DestinationTimeout(path, what, deadline)
    return done[0].unwrap()


def _close(file: ImageFile) -> None:
    try:
        file.close()
    except OSError as e:  # a dead remote: ENOTCONN, EIO...  The move has failed already.
        log.warning("closing the destination %s failed: %s", file.path, e)
