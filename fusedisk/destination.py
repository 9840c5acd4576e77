"""A move's destination, reached through worker threads of its own, with a deadline on each call.

Why threads: a destination on a network filesystem can hang inside the kernel for as long as the
network or server is gone (NFS hard mounts: hours; a stalled sshfs).  A syscall stuck there can
be neither interrupted nor cancelled, only abandoned.  So every operation on the destination
file runs in one of three worker threads of its own, each first in, first out, and the event
loop waits for each at most ``deadline`` seconds.  Mirrored writes and truncates have one thread
to themselves, which keeps overlapping writes in the order the guest issued them and never puts
a write behind a 1 MiB copy or a flush; the copier's chunks, verify's reads and the checks
before the switch share another; flushes and writeback have the third, so a chunk, whose range
the copier holds while it waits, never waits behind a flush.  (The copier and the writes are
kept apart by the range locks, as with no threads.)  For a real file the write lane is a native
thread (fusedisk/_lane.c) that never takes the GIL, so it costs the event loop, which serves
every guest request, no turns at it; the watchdog's task reaps what it finished
(docs/design.md, "The destination").

When a call fails or misses its deadline the move fails back, and the destination is abandoned:
its waiters are answered at once, calls still queued never run, and the last worker to end
closes the file, once its current syscall returns (perhaps never).  Only the workers ever touch
the descriptor, so a write that lands late lands in the abandoned file, never in a file that
reused the descriptor's number; and the next move gets new workers, so it never waits behind
dead ones.

With ``deadline == 0`` (``--dest-timeout 0``) there are no workers: calls run inline as plain
syscalls, and bulk calls in trio's threads, with no bound.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

from fusedisk.backend import ImageFile, PosixFile

try:
    from fusedisk._lane import Lane as NativeLane
except ImportError:  # not built (no C compiler at install): the write lane is a Python thread
    NativeLane = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[ImageFile], T]

# How long a guest operation may wait for the destination (``fusedisk migrate --dest-timeout``).
DEST_TIMEOUT = 1.0
# A worker reports finished calls in batches, but never holds one back longer than this.
REPORT_AFTER = 0.001


class DestinationTimeout(OSError):
    def __init__(self, path: str, what: str, deadline: float) -> None:
        super().__init__(errno.ETIMEDOUT, f"{what} did not complete within {deadline:g} s", path)


class FileCall:
    """A mirrored operation: one :class:`ImageFile` method and its arguments, applied to each
    file alike (a plain value: what a worker runs can be read in a debugger or a log)."""

    __slots__ = ("args", "method")

    def __init__(self, method: str, *args: object) -> None:
        self.method = method
        self.args = args

    def __call__(self, file: ImageFile) -> None:
        getattr(file, self.method)(*self.args)


class Call(Generic[T]):
    """One operation submitted to a worker; its outcome is set in the event loop's thread."""

    __slots__ = ("operation", "result", "submitted", "task", "what")

    def __init__(self, operation: Operation[T], what: str) -> None:
        self.operation = operation
        self.what = what
        self.result: outcome.Outcome[T] | None = None
        self.task: trio.lowlevel.Task | None = None  # waiting for it
        self.submitted = 0.0


class Lane(enum.Enum):
    """The destination's worker threads, each first in, first out."""

    WRITES = "writes"  # mirrored writes and truncates: in the guest's order, never behind a copy
    BULK = "bulk"  # the copier's chunks, verify's reads, checks: may take a while
    # Flushes and writeback, which wait for the disk: never ahead of a chunk, whose range the
    # copier holds while it waits (a queued chunk would hold up guest writes for a flush's time)
    FLUSH = "flush"


class Destination:
    def __init__(self, file: ImageFile, deadline: float) -> None:
        self.file = file
        self.path = file.path
        self.deadline = deadline
        self.abandoned = False
        self._pending: dict[Lane, deque[Call[object]]] = {lane: deque() for lane in Lane}
        self._queues: dict[Lane, queue.SimpleQueue[Call[object] | None]] = {}
        self._in_call: dict[Lane, Call[object]] = {}  # the call each worker is in (or was last)
        self._threads: list[threading.Thread] = []
        self._running = 0  # worker threads not yet ended; the last one closes the file
        self._lock = threading.Lock()
        self._busy = 0  # with no thread: bulk calls running in trio's threads
        self._closed = False
        self._keep_open = False  # released: the file serves the disk now
        self._ended = trio.Event()  # given up or released: the watchdog's work is done
        self._native: NativeLane | None = None  # the write lane, when it is a native thread
        if deadline > 0:
            self._token = trio.lowlevel.current_trio_token()
            lanes = list(Lane)
            if _native_lane_for(file):
                assert isinstance(file, PosixFile)
                self._native = NativeLane(file.fd)
                lanes.remove(Lane.WRITES)
            for lane in lanes:
                work: queue.SimpleQueue[Call[object] | None] = queue.SimpleQueue()
                self._queues[lane] = work
                # Daemon threads: one stuck in the kernel must not keep the process alive.
                thread = threading.Thread(
                    target=self._work,
                    args=(lane, work),
                    name=f"{lane.value} {self.path}",
                    daemon=True,
                )
                self._threads.append(thread)
            self._running = len(self._threads)
            for thread in self._threads:
                thread.start()

    @property
    def writes_through(self) -> str:
        """How mirrored writes reach the file (for the status): "inline", "native thread" or
        "python thread"."""
        if not self._queues:
            return "inline"
        return "native thread" if self._native is not None else "python thread"

    # ---- the event loop's side -----------------------------------------------------------

    def submit(self, operation: Operation[T], what: str, lane: Lane = Lane.WRITES) -> Call[T]:
        """Queue ``operation``; with no thread, run it now.  Never a checkpoint, so a caller's
        synchronous step (write the source, submit the mirror, mark the sync map) stays whole."""
        call: Call[T] = Call(operation, what)
        if self.abandoned:
            call.result = outcome.Error(self._gone(what))
        elif not self._queues:
            call.result = outcome.capture(operation, self.file)
        else:
            call.submitted = time.monotonic()
            self._pending[lane].append(call)  # type: ignore[arg-type]
            if lane is Lane.WRITES and self._native is not None:
                _submit_native(self._native, call, operation)
            else:
                self._queues[lane].put(call)  # type: ignore[arg-type]
        return call

    async def wait(self, call: Call[T]) -> T:
        """The call's result, or its error.  No checkpoint when it is already done (always so
        with no thread).  The deadline is :meth:`watch`'s to keep: one task for all calls is
        cheaper than a cancel scope for each (this is on the path of every mirrored write)."""
        if call.result is None:
            call.task = trio.lowlevel.current_task()

            def abort(raise_cancel: object) -> trio.lowlevel.Abort:
                call.task = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        assert call.result is not None
        return call.result.unwrap()

    async def watch(self, overdue: Callable[[str], None]) -> None:
        """Until the destination is given up or released: when the oldest call in a lane has
        waited longer than the deadline, give the destination up (answering every waiter) and
        tell ``overdue`` why.  Checks every eighth of the deadline.  Also reaps the native
        write lane's finished calls, as they come."""
        if not self._queues:
            return
        async with trio.open_nursery() as nursery:
            if self._native is not None:
                nursery.start_soon(self._reap_native, self._native)
            while not self.abandoned:
                with trio.move_on_after(self.deadline / 8):
                    await self._ended.wait()
                self._check_deadline(overdue)
            nursery.cancel_scope.cancel()

    def _check_deadline(self, overdue: Callable[[str], None]) -> None:
        now = time.monotonic()
        for lane, calls in self._pending.items():
            if calls and now - calls[0].submitted > self.deadline:
                # The call its worker is stuck in (the ones before it may be done, their
                # results on the way in the same batch).
                current = self._in_call.get(lane)
                stuck = current if current is not None and current.result is None else calls[0]
                late = DestinationTimeout(self.path, stuck.what, self.deadline)
                self._answer(stuck, outcome.Error(late))
                try:
                    overdue(str(late.strerror))
                except Exception:  # never into the daemon's nursery: it serves the disk
                    log.exception("reporting a late destination failed")
                self.abandon()
                return

    async def _reap_native(self, native: NativeLane) -> None:
        """Hand the native lane's finished calls to their waiters, a batch per wake-up."""
        while True:
            await trio.lowlevel.wait_readable(native.fileno())
            done = [(call, _outcome(code, self.path)) for call, code in native.reap()]
            self._complete(Lane.WRITES, done)

    async def run(self, operation: Operation[T], what: str, lane: Lane = Lane.BULK) -> T:
        """A bulk operation (a chunk, a flush): in a worker with the deadline, or with no
        threads of its own in one of trio's."""
        if not self._queues and not self.abandoned:
            self._busy += 1  # the file stays open until this thread is done with it
            try:
                return await trio.to_thread.run_sync(operation, self.file)
            finally:
                self._busy -= 1
                if self.abandoned and not self._busy:
                    self._close_once()
        return await self.wait(self.submit(operation, what, lane))

    async def flush(self, datasync: bool = True) -> None:
        """fsync (fdatasync with ``datasync``) in the flush lane."""
        await self.run(lambda f: f.fsync(datasync), "flush", Lane.FLUSH)

    async def wait_writes(self) -> None:
        """Return once every write submitted so far has landed (a barrier in their lane; with
        no threads every write landed when it was submitted)."""
        if self._queues:
            await self.run(_barrier, "earlier mirrored writes", Lane.WRITES)

    def abandon(self) -> None:
        """Give the destination up: answer every waiter now, run nothing more, and close the
        file once the workers' current calls return (at once with no threads)."""
        if self.abandoned:
            return
        self.abandoned = True
        for calls in self._pending.values():
            for call in calls:
                self._answer(call, outcome.Error(self._gone(call.what)))
            calls.clear()
        self._stop_workers()
        if not self._queues and not self._busy:
            self._close_once()

    def release(self) -> ImageFile:
        """Stop the workers, idle (I/O is held and drained), and hand over the open file: the
        destination now serves the disk, inline like any primary."""
        assert not any(self._pending.values()), "release only when nothing is in flight"
        self._keep_open = True
        self.abandoned = True  # nothing more goes through the workers
        self._stop_workers()
        for thread in self._threads:
            thread.join(timeout=self.deadline)  # idle: they return at once
        if self._native is not None:
            self._native.join(self.deadline)
        return self.file

    def _stop_workers(self) -> None:
        self._ended.set()
        if self._native is not None:
            self._native.stop()  # it closes its own descriptor when its current call returns
        for work in self._queues.values():
            work.put(None)

    def _gone(self, what: str) -> OSError:
        return OSError(errno.EIO, f"{what}: the destination was given up", self.path)

    def _complete(
        self, lane: Lane, done: list[tuple[Call[object], outcome.Outcome[object]]]
    ) -> None:
        calls = self._pending[lane]
        for call, result in done:
            if calls and calls[0] is call:  # first in, first out; gone if abandoned meanwhile
                calls.popleft()
                self._answer(call, result)

    @staticmethod
    def _answer(call: Call[object], result: outcome.Outcome[object]) -> None:
        if call.result is None:
            call.result = result
            if call.task is not None:
                trio.lowlevel.reschedule(call.task)
                call.task = None

    def _close_once(self) -> None:
        if not self._closed and not self._keep_open:
            self._closed = True
            _close(self.file)

    # ---- the worker threads ----------------------------------------------------------------

    def _work(self, lane: Lane, work: queue.SimpleQueue[Call[object] | None]) -> None:
        """Run calls in order; report them in batches: every hand-back costs the event loop's
        thread a wake-up and both threads a trip for the GIL (docs/benchmarks.md)."""
        try:
            going = True
            while going:
                batch = [work.get()]
                with contextlib.suppress(queue.Empty):
                    while True:
                        batch.append(work.get_nowait())
                done: list[tuple[Call[object], outcome.Outcome[object]]] = []
                started = time.monotonic()
                for call in batch:
                    if call is None or self.abandoned:
                        going = False
                        break
                    if done and (
                        lane is not Lane.WRITES or time.monotonic() - started > REPORT_AFTER
                    ):
                        # A slow call must not hold back the results before it.
                        self._token.run_sync_soon(self._complete, lane, done)
                        done, started = [], time.monotonic()
                    self._in_call[lane] = call  # for the watchdog: who is late
                    done.append((call, outcome.capture(call.operation, self.file)))
                if done:
                    self._token.run_sync_soon(self._complete, lane, done)
        except trio.RunFinishedError:
            pass  # the daemon is gone; its descriptors go with it
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:  # only now can no call use the descriptor any more
                self._close_once()


def _barrier(file: ImageFile) -> None:
    """Nothing: in the write lane, done once every write submitted before it is."""


def _native_lane_for(file: ImageFile) -> bool:
    """Whether the write lane can be native: built, and a real descriptor to write
    (``FUSEDISK_DEST_LANE=threads`` asks for the Python thread, to compare them)."""
    wanted = os.environ.get("FUSEDISK_DEST_LANE", "native") != "threads"
    return wanted and NativeLane is not None and type(file) is PosixFile


# The write lane's operations the native thread runs (FileCall methods; and the barrier).
NATIVE_METHODS = frozenset({"pwrite", "truncate", "fallocate"})


def _submit_native(native: NativeLane, call: Call[Any], operation: Operation[Any]) -> None:
    if operation is _barrier:
        native.barrier(call)
    elif isinstance(operation, FileCall) and operation.method in NATIVE_METHODS:
        getattr(native, operation.method)(call, *operation.args)
    else:
        raise TypeError(f"the native write lane cannot run {operation!r}")


def _outcome(code: int, path: str) -> outcome.Outcome[object]:
    if code == 0:
        return outcome.Value(None)
    return outcome.Error(OSError(code, os.strerror(code), path))


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
