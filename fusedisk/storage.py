"""Where image files and the move journal live: the POSIX implementation the daemon uses.

The engine reaches the filesystem only through this and :mod:`fusedisk.backend`, so engine tests
can swap in memory and fault-injecting fakes.

The journal is one small JSON file beside the source image, ``.<name>.fusedisk-move``, replaced
atomically (temp file, fsync, rename, fsync of the directory) so that after a crash it holds either
the old record or the new one, never a torn one.  Its ``phase`` is ``mirroring`` (the source is
the truth; the destination is partial) or ``switched`` (the destination is the truth; the source
may still exist and must be deleted).

A marker ``.<name>.fusedisk-partial`` beside a destination, created before it and removed once the
switch is recorded, proves two things after a crash: that fusedisk created that file (so removing
it loses nobody's data), and that it is incomplete (so mounting it directly is refused).

Files that decide what gets served or deleted (journal, marker) are trusted only if they are
regular files, not symlinks, owned by this user and writable by nobody else: the daemon often runs
as root in directories other users may write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from typing import Any, Protocol

from fusedisk.backend import ImageFile, PosixFile, fsync_dir
from fusedisk.errors import UsageError


class Storage(Protocol):
    def create(self, path: str, size: int, template: ImageFile, source: str) -> ImageFile:
        """Create a new, sparse destination of ``size`` bytes with ``template``'s permissions,
        marked as the partial destination of a move from ``source``."""
        ...

    def open(self, path: str) -> ImageFile:
        """Open an existing partial destination again (a resumed move), locked."""
        ...

    def remove(self, path: str) -> None:
        """Delete an image (and its partial marker) durably."""
        ...

    def mark_complete(self, path: str) -> None:
        """The switch to ``path`` is recorded: drop its partial marker."""
        ...

    def write_journal(self, source: str, record: dict[str, Any]) -> None:
        """Replace the journal durably, leaving a prepared record alone."""
        ...

    def prepare_journal(self, source: str, record: dict[str, Any]) -> None:
        """Make the next record durable aside, so committing it is one rename."""
        ...

    def commit_journal(self, source: str) -> None:
        """Atomically and durably make the prepared record the journal."""
        ...

    def clear_journal(self, source: str) -> None:
        """Remove the journal and any prepared record."""
        ...


def _beside(path: str, suffix: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{suffix}")


def journal_path(source: str) -> str:
    return _beside(source, "fusedisk-move")


def marker_path(dest: str) -> str:
    return _beside(dest, "fusedisk-partial")


def _read_trusted_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if there is no such file; refuses untrusted files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise  # the filesystem failed (a dead remote): not a verdict on the file
        raise UsageError(message=f"refusing {path}: {e.strerror} (not a plain file?)") from None
    with os.fdopen(fd, encoding="utf-8") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(message=f"refusing {path}: not a regular file")
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise UsageError(
                message=f"refusing {path}: not owned by uid {os.getuid()} or writable by others"
            )
        try:
            record = json.load(f)
        except ValueError:
            raise UsageError(message=f"refusing {path}: not a fusedisk record") from None
    if not isinstance(record, dict):
        raise UsageError(message=f"refusing {path}: not a fusedisk record")
    return record


def read_journal(source: str) -> dict[str, Any] | None:
    """The journal beside ``source``, or None.  A torn file cannot exist (see module doc)."""
    path = journal_path(source)
    record = _read_trusted_json(path)
    if record is None:
        return None
    if record.get("source") != os.path.abspath(source) or record.get("phase") not in (
        "mirroring",
        "switched",
    ):
        raise UsageError(message=f"refusing {path}: it does not describe a move of {source}")
    return record


def read_marker(dest: str) -> str | None:
    """The source whose move created ``dest`` and has not switched to it, or None."""
    record = _read_trusted_json(marker_path(dest))
    return None if record is None else str(record.get("source"))


def _write_new(path: str, data: bytes) -> None:
    """Create ``path`` afresh (never through a symlink) with ``data``, fsynced."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class PosixStorage:
    def create(self, path: str, size: int, template: ImageFile, source: str) -> ImageFile:
        # Written aside and renamed into place: a crash never leaves a torn marker (which
        # recovery would have to refuse, leaving the disk unmountable).
        marker = marker_path(path)
        _write_new(marker + ".tmp", json.dumps({"source": source}).encode() + b"\n")
        os.rename(marker + ".tmp", marker)
        mode = template.stat().st_mode & 0o7777
        try:
            image = PosixFile.create_exclusive(path, size, mode)
        except BaseException:
            os.unlink(marker_path(path))
            raise
        fcntl.flock(image.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the served image is locked
        fsync_dir(os.path.dirname(path))
        return image

    def open(self, path: str) -> ImageFile:
        image = PosixFile.open(path)
        try:
            fcntl.flock(image.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            image.close()
            raise
        return image

    def remove(self, path: str) -> None:
        for victim in (path, marker_path(path), marker_path(path) + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(victim)
        fsync_dir(os.path.dirname(path))

    def mark_complete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker_path(path))
        # Durable before the source and the journal go: a marker that came back after a power
        # cut, with them gone, would make the finished destination refuse to mount.
        fsync_dir(os.path.dirname(path))

    def write_journal(self, source: str, record: dict[str, Any]) -> None:
        # Aside under a name of its own: a record prepared for the switch stays untouched.
        final = journal_path(source)
        _write_new(final + ".new", json.dumps(record, sort_keys=True).encode() + b"\n")
        os.rename(final + ".new", final)
        fsync_dir(os.path.dirname(final))

    def prepare_journal(self, source: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, sort_keys=True).encode() + b"\n"
        _write_new(journal_path(source) + ".tmp", data)

    def commit_journal(self, source: str) -> None:
        final = journal_path(source)
        os.rename(final + ".tmp", final)
        fsync_dir(os.path.dirname(final))

    def clear_journal(self, source: str) -> None:
        final = journal_path(source)
        for victim in (final + ".tmp", final + ".new", final):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(victim)
        fsync_dir(os.path.dirname(final))
