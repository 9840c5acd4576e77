"""The destination's writer process itself (see :mod:`fusedisk.writer`): reads frames from its
socket, runs them on the destination in order, answers each with an errno.  Only the standard
library and the backend: it starts in a few tens of milliseconds.

The wire: frames ``HEADER (payload length, kind, offset) + payload``, one RESULT (errno, 0 when
done) back per frame, in order.  A write's payload is its data; a call's is ``marshal((method,
args))`` of a :class:`~fusedisk.destination.FileCall` (ints only); a barrier has none.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import marshal
import os
import signal
import socket
import struct
import sys
import time

from fusedisk.backend import PosixFile

HEADER = struct.Struct("<IBq")  # payload length, kind, offset
RESULT = struct.Struct("<i")  # errno, 0 when done
BARRIER, WRITE, CALL = 0, 1, 2
# The receive buffer: room for several of the largest writes the kernel sends (1 MiB).
RECEIVE = 8 << 20
# A batch's results are sent back at the latest this long after its first one was done.
REPORT_AFTER = 0.001
PR_SET_PDEATHSIG = 1


def _run(file: PosixFile, kind: int, offset: int, payload: memoryview) -> int:
    try:
        if kind == WRITE:
            file.pwrite(payload, offset)  # type: ignore[arg-type]  # any buffer will do
        elif kind == CALL:
            method, args = marshal.loads(payload)
            getattr(file, method)(*args)
    except OSError as e:
        return e.errno or errno.EIO
    except Exception:  # never expected; the move fails back on it
        return errno.EIO
    return 0


def _serve(fd: int, socket_fd: int, path: str) -> None:
    file = PosixFile(path, fd)
    connection = socket.socket(fileno=socket_fd)
    # One buffer for good: a fresh multi-megabyte bytes per recv() would be an mmap and a
    # munmap each time, for what is often a single 4 KiB write.
    buffer = bytearray(RECEIVE)
    view, filled = memoryview(buffer), 0
    while True:
        received = connection.recv_into(view[filled:])
        if not received:
            return  # the daemon is done with us (or gone)
        filled += received
        results, first_done, start = bytearray(), 0.0, 0
        while filled - start >= HEADER.size:
            length, kind, offset = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + length
            if end > filled:
                break
            results += RESULT.pack(_run(file, kind, offset, view[start + HEADER.size : end]))
            start = end
            if not first_done:
                first_done = time.monotonic()
            elif time.monotonic() - first_done > REPORT_AFTER:
                connection.sendall(results)  # a slow write must not hold back the others
                results, first_done = bytearray(), 0.0
        if results:
            connection.sendall(results)
        # Keep the part of a frame not yet received, at the start (in a bigger buffer if the
        # frame needs one: a write may be larger than RECEIVE).
        rest = bytes(view[start:filled])
        need = HEADER.unpack_from(rest)[0] + HEADER.size if len(rest) >= HEADER.size else 0
        if need > len(buffer):
            view.release()
            buffer = bytearray(need)
            view = memoryview(buffer)
        filled = len(rest)
        view[:filled] = rest


def main() -> None:
    fd, socket_fd, path, daemon = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    # Die with the daemon: a write of a dead daemon's must not land after a recovery (which
    # could not take the destination's lock while we hold it anyway).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != daemon:
        return  # the daemon died before we could ask
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the foreground daemon is its own
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        _serve(fd, socket_fd, path)  # ends when the daemon closes the socket


if __name__ == "__main__":
    main()
