"""Where image files and the move journal live: the POSIX implementation the daemon uses.

The engine reaches the filesystem only through this and :mod:`fusedisk.backend`, so engine tests
can swap in memory and fault-injecting fakes.

The journal is one small JSON file beside the source image, ``.<name>.fusedisk-move``, replaced
atomically (temp file, fsync, rename, fsync of the directory) so that after a crash it holds either
the old record or the new one, never a torn one.  Its ``phase`` is ``mirroring`` (the source is
the truth; the destination is partial) or ``switched`` (the destination is the truth; the source
may still exist and must be deleted).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from typing import Any, Protocol

from fusedisk.backend import ImageFile, PosixFile, fsync_dir


class Storage(Protocol):
    def create(self, path: str, size: int, template: ImageFile) -> ImageFile:
        """Create a new, sparse image of ``size`` bytes with ``template``'s permissions."""
        ...

    def remove(self, path: str) -> None:
        """Delete an image durably."""
        ...

    def write_journal(self, source: str, record: dict[str, Any]) -> None:
        """Replace the journal durably (prepare and commit in one)."""
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


def journal_path(source: str) -> str:
    directory, name = os.path.split(os.path.abspath(source))
    return os.path.join(directory, f".{name}.fusedisk-move")


def read_journal(source: str) -> dict[str, Any] | None:
    """The journal beside ``source``, or None.  A torn file cannot exist (see module doc)."""
    try:
        with open(journal_path(source), encoding="utf-8") as f:
            record: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        return None
    return record


class PosixStorage:
    def create(self, path: str, size: int, template: ImageFile) -> ImageFile:
        mode = os.stat(template.path).st_mode & 0o7777
        image = PosixFile.create_exclusive(path, size, mode)
        fcntl.flock(image.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the served image is locked
        fsync_dir(os.path.dirname(path))
        return image

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        fsync_dir(os.path.dirname(path))

    def write_journal(self, source: str, record: dict[str, Any]) -> None:
        self.prepare_journal(source, record)
        self.commit_journal(source)

    def prepare_journal(self, source: str, record: dict[str, Any]) -> None:
        temp = journal_path(source) + ".tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(record, sort_keys=True).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit_journal(self, source: str) -> None:
        final = journal_path(source)
        os.rename(final + ".tmp", final)
        fsync_dir(os.path.dirname(final))

    def clear_journal(self, source: str) -> None:
        final = journal_path(source)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(final + ".tmp")
        self.remove(final)
