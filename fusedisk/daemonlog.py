"""Where a daemon's log goes, and how long it stays.

A daemon started in the background (``fusedisk mount``, mount(8)) logs to a file of its own in
the private runtime directory, ``mnt-<hash of the mountpoint>.<start time>.<random>.log``.  The
file is capped while the daemon runs (:class:`DaemonLog` rotates it), removed by the daemon
itself when it ends cleanly, and kept when it does not: a daemon that is killed or crashes
cannot remove it, and one that ends in an error (a failed final flush) keeps it on purpose.  So
the files that stay are exactly the ones worth reading, and the CLI names them: ``fusedisk
status`` names a running daemon's log, and the stale mount a dead daemon left names its log.

Under systemd (stderr is the journal stream named by ``JOURNAL_STREAM``) there is no file: the
daemon keeps logging to stderr and journald keeps it, capped by journald's own limits.
"""

from __future__ import annotations

import contextlib
import glob
import logging.handlers
import os
from io import TextIOWrapper

from fusedisk.control import runtime_dirs

MAX_BYTES_ENV = "FUSEDISK_LOG_MAX_BYTES"
MAX_BYTES = 1 << 20  # per file: the current one, and one rotated (``.1``)


def max_bytes() -> int:
    try:
        return max(1024, int(os.environ.get(MAX_BYTES_ENV, MAX_BYTES)))
    except ValueError:
        return MAX_BYTES


class DaemonLog(logging.handlers.RotatingFileHandler):
    """A background daemon's log file: at the cap it becomes ``PATH.1`` (replacing the older
    one) and a new file starts, so a daemon that serves for months keeps at most two files.

    The daemon's stdout and stderr follow the current file (``dup2`` at every rotation), so what
    does not go through logging, such as a traceback or libfuse's own messages, lands there
    too; it counts towards the cap at the next log record."""

    def __init__(self, path: str) -> None:
        super().__init__(path, maxBytes=max_bytes(), backupCount=1, encoding="utf-8")

    def _open(self) -> TextIOWrapper:
        stream = super()._open()
        for fd in (1, 2):
            os.dup2(stream.fileno(), fd)
        return stream

    def remove(self) -> None:
        """The daemon ended cleanly: its log has nothing left to tell."""
        logging.getLogger().removeHandler(self)
        self.close()
        for path in (self.baseFilename, self.baseFilename + ".1"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def current() -> DaemonLog | None:
    """This process's log file, if it is a background daemon with one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, DaemonLog):
            return handler
    return None


def stderr_is_journal() -> bool:
    """True if stderr is systemd's journal stream: ``JOURNAL_STREAM`` names its device and
    inode, and a process that inherited the variable with stderr redirected elsewhere does not
    match (systemd.exec(5))."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def daemon_stderr(pid: int) -> str | None:
    """Where the process ``pid`` writes its stderr: a path, or the kernel's name for a pipe,
    socket or terminal; None if that cannot be seen (another user's process, or gone)."""
    try:
        return os.readlink(f"/proc/{pid}/fd/2")
    except OSError:
        return None


def _prefixes(mountpoint: str) -> list[str]:
    """Where the logs of this user's daemons of ``mountpoint`` start, in each runtime
    directory the daemon may have used (control.runtime_dirs)."""
    from fusedisk.daemon import runtime_name

    return [os.path.join(d, runtime_name(mountpoint) + ".") for d in runtime_dirs()]


def managed_log(pid: int, mountpoint: str) -> str | None:
    """The log file of the background daemon ``pid`` serving ``mountpoint`` (None if it has
    none: a foreground daemon, or one logging to the journal)."""
    path = daemon_stderr(pid)
    if path is not None and path.endswith(".log") and path.startswith(tuple(_prefixes(mountpoint))):
        return path
    return None


def dead_daemon_log(mountpoint: str) -> str | None:
    """The log the last daemon of ``mountpoint`` left when it died, if this user has one."""
    newest: tuple[float, str] | None = None
    for prefix in _prefixes(mountpoint):
        for path in glob.glob(glob.escape(prefix) + "*.log"):
            with contextlib.suppress(OSError):
                candidate = (os.stat(path).st_mtime, path)
                newest = candidate if newest is None else max(newest, candidate)
    return newest[1] if newest is not None else None


def last_line(path: str) -> str:
    """The last line of a log (what a daemon said last, without the ``fusedisk:`` prefix)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "its log cannot be read"
    return lines[-1].removeprefix("fusedisk: ") if lines else "it said nothing"
