"""The destination's writer process: runs the mirrored writes of a move, in the guest's order.

Why a process and not a thread: a destination write must be abandonable (a network filesystem
can hang a syscall for hours), so it cannot run inline in the event loop's thread; but handing
each write to a Python thread costs the daemon ~60 µs of CPU per write, mostly the two threads
taking turns at the GIL (docs/benchmarks.md, issue 12).  A process has a GIL of its own: the
event loop only sends a frame down a socket, and the process writes the destination while the
event loop writes the source.

The process inherits the destination's open file description (never opens the path itself), so
a flush through the daemon's descriptor covers these writes (sshfs flushes per open file) and
the flock on it is held while the process lives: a recovery that would resume the move must
take that lock, so it can never run while a write of the dead daemon's could still land.  The
process dies with the daemon (PR_SET_PDEATHSIG) and ends when its socket closes; when the move
gives the destination up it is killed (a write stuck in the kernel then lands, if ever, in the
abandoned file, which nothing serves).

The process itself, and the wire between the two, are in :mod:`fusedisk.writer_main`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import outcome
import trio

from fusedisk.backend import PosixFile
from fusedisk.writer_main import RESULT

if TYPE_CHECKING:
    from fusedisk.destination import Call

# Socket buffers: enough queued writes that the event loop never waits to send (root may
# exceed net.core.wmem_max; others get what the system allows).
BUFFER = 8 << 20


class WriterProcess:
    """The event loop's side: queue calls (never blocking), collect their results in order."""

    def __init__(
        self,
        file: PosixFile,
        complete: Callable[[list[tuple[Call[object], outcome.Outcome[object]]]], None],
    ) -> None:
        self.path = file.path
        self._complete = complete
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            _grow_buffers(end)
        self._socket = ours
        arguments = [str(file.fd), str(theirs.fileno()), file.path, str(os.getpid())]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "fusedisk.writer_main", *arguments],
            pass_fds=(file.fd, theirs.fileno()),
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        ours.setblocking(False)
        self._sent: deque[Call[object]] = deque()  # in the process's hands, oldest first
        self._unsent = bytearray()  # frames the socket would not take yet
        self._has_unsent = trio.Event()
        self._results = bytearray()
        self.ended = False  # the process is gone, or we stopped it
        self._stopped = False

    def put(self, call: Call[object], frame: list[bytes]) -> None:
        """Queue ``call``, encoded as ``frame``.  Synchronous: the order of puts is the order the
        process runs them in."""
        self._sent.append(call)
        if self.ended:
            return
        if self._unsent:
            self._unsent += b"".join(frame)
            return
        try:
            sent = self._socket.sendmsg(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the process is gone: serve() sees its socket end and fails the calls
        if sent < sum(map(len, frame)):
            self._unsent += b"".join(frame)[sent:]
            self._has_unsent.set()

    async def serve(self) -> None:
        """Send what waits and hand results back, until :meth:`stop` (return) or until the
        process ends by itself (raise OSError).  Run by the destination's watch task."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send)
            await self._receive()
            nursery.cancel_scope.cancel()
        if not self._stopped:
            raise OSError(errno.EIO, "the destination's writer process ended", self.path)

    async def _send(self) -> None:
        with contextlib.suppress(OSError, trio.ClosedResourceError):  # gone: _receive sees it
            while True:
                await self._has_unsent.wait()
                self._has_unsent = trio.Event()
                while self._unsent:
                    await trio.lowlevel.wait_writable(self._socket)
                    with contextlib.suppress(BlockingIOError):
                        del self._unsent[: self._socket.send(self._unsent)]

    async def _receive(self) -> None:
        while True:
            try:
                await trio.lowlevel.wait_readable(self._socket)
                data = self._socket.recv(4096)  # 1,024 results
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.ended = True
                return
            self._results += data
            whole = len(self._results) // RESULT.size * RESULT.size
            done: list[tuple[Call[object], outcome.Outcome[object]]] = []
            for (code,) in RESULT.iter_unpack(self._results[:whole]):
                call = self._sent.popleft()
                if code == 0:
                    done.append((call, outcome.Value(None)))
                else:
                    error = OSError(code, f"{call.what}: {os.strerror(code)}", self.path)
                    done.append((call, outcome.Error(error)))
            del self._results[:whole]
            self._complete(done)

    def stop(self, kill: bool) -> None:
        """Close the socket (an idle process then exits at once); with ``kill``, also kill it.
        Reaped in a thread of its own: a process stuck in the kernel is never waited for."""
        if self._stopped:
            return
        self._stopped = self.ended = True
        trio.lowlevel.notify_closing(self._socket)
        self._socket.close()
        if kill:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        threading.Thread(target=self._process.wait, name=f"reap {self.path}", daemon=True).start()


def _grow_buffers(end: socket.socket) -> None:
    for forced, plain in ((32, socket.SO_SNDBUF), (33, socket.SO_RCVBUF)):  # SO_*BUFFORCE
        try:
            end.setsockopt(socket.SOL_SOCKET, forced, BUFFER)
        except OSError:
            end.setsockopt(socket.SOL_SOCKET, plain, BUFFER)
