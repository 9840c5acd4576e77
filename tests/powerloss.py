"""A power-loss model of the filesystem under fusedisk, in the manner of ALICE.

Recording: fusedisk's real code (PosixFile, PosixStorage, fsync_dir, recovery) runs on real files
in a few directories, with the ``os`` module of its modules replaced by :class:`RecordingOS`,
which makes each call and logs what it changed: a file created, written, truncated, chmod'ed,
fsynced; a name renamed or unlinked; a directory fsynced.  The harness adds its own events (a
write acknowledged, a flush completed) to the same log, so each entry's index is a moment.

Replaying: :class:`Model` walks the log.  What is durable follows POSIX, not ext4's kindness:
a file's data, size and mode become durable at its fsync (fdatasync too), for what was written
before that fsync began; a name (create, rename, unlink) becomes durable at the fsync of its
directory.  After any prefix of the log, :meth:`Model.crash` gives what a power cut there could
leave: only the durable state, everything (as SIGKILL would), or in between: a prefix of each
directory's undurable name changes (metadata is journaled in order) and any subset of each
file's undurable data changes (the disk may write back pages in any order).
"""

from __future__ import annotations

import functools
import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

import fusedisk.backend
import fusedisk.daemon
import fusedisk.destination
import fusedisk.storage
from fusedisk._lane import Lane as NativeLane

# ---- the log ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Create:
    dir: str
    name: str
    ino: int
    mode: int


@dataclass(frozen=True)
class Write:
    ino: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class Truncate:
    ino: int
    size: int


@dataclass(frozen=True)
class Chmod:
    ino: int
    mode: int


@dataclass(frozen=True)
class Fsync:
    ino: int
    started: int  # log index when the call began: changes logged before it are durable


@dataclass(frozen=True)
class Rename:
    dir: str
    old: str
    new: str
    ino: int


@dataclass(frozen=True)
class Unlink:
    dir: str
    name: str


@dataclass(frozen=True)
class FsyncDir:
    dir: str
    started: int


@dataclass(frozen=True)
class Event:
    """The harness's: not a change of state, a moment to check against."""

    name: str
    info: Any = None


Entry = Create | Write | Truncate | Chmod | Fsync | Rename | Unlink | FsyncDir | Event
DataChange = Write | Truncate | Chmod
NameChange = Create | Rename | Unlink


# ---- recording ----------------------------------------------------------------------------


class RecordingOS:
    """Stands for the ``os`` module in fusedisk's modules: changes under ``roots`` are made
    for real and logged; everything else is passed through.  Thread-safe: the engine calls it
    from trio's threads and the destination's workers."""

    def __init__(self, roots: list[str]) -> None:
        self.roots = [os.path.abspath(r) for r in roots]
        self.log: list[Entry] = []
        self.initial: dict[str, tuple[bytes, int]] = {}  # path -> (data, mode), all durable
        self._lock = threading.Lock()
        self._next_ino = 0
        self._names: dict[str, int] = {}  # path -> inode, as things are now
        self._fds: dict[int, int | str] = {}  # fd -> inode, or a directory's path
        self._positions: dict[int, int] = {}  # fd -> offset, for os.write
        self.fail_writes: dict[int, int] = {}  # inode -> writes left before EIO
        self._fail_paths: dict[str, int] = {}  # for files not yet created
        self.real_ids: dict[int, list[int]] = {}  # inode -> the real file's [st_dev, st_ino]
        # Called (outside the lock, in the writer's thread) after each logged write: lets a test
        # act at an exact step.
        self.after_write: Callable[[Write], None] | None = None
        for root in self.roots:
            for name in sorted(os.listdir(root)):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    self.initial[path] = (f.read(), os.stat(path).st_mode & 0o7777)
                self._names[path] = self._new_ino()
                st = os.stat(path)
                self.real_ids[self._names[path]] = [st.st_dev, st.st_ino]
        self._initial_inodes = dict(self._names)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fail_after(self, path: str, writes: int) -> None:
        """Make writes to ``path`` (created now or later) fail with EIO after ``writes``."""
        path = os.path.abspath(path)
        self._fail_paths[path] = writes
        if path in self._names:
            self.fail_writes[self._names[path]] = writes

    def initial_inodes(self) -> dict[str, int]:
        return dict(self._initial_inodes)

    def ino_of(self, path: str) -> int | None:
        return self._names.get(os.path.abspath(path))

    def event(self, name: str, info: Any = None) -> int:
        """Log a harness event; return its index."""
        with self._lock:
            self.log.append(Event(name, info))
            return len(self.log) - 1

    def _new_ino(self) -> int:
        self._next_ino += 1
        return self._next_ino

    def _tracked(self, path: str) -> bool:
        directory = os.path.dirname(path)
        return path in self.roots or directory in self.roots

    # ---- the calls fusedisk makes --------------------------------------------------------

    def open(self, path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        path = os.path.abspath(os.fspath(path))
        if not self._tracked(path):
            return os.open(path, flags, mode, **kwargs)
        with self._lock:
            existed = os.path.lexists(path)
            fd = os.open(path, flags, mode, **kwargs)
            if path in self.roots:
                self._fds[fd] = path
                return fd
            if not existed:
                ino = self._names[path] = self._new_ino()
                directory, name = os.path.split(path)
                st = os.fstat(fd)
                self.log.append(Create(directory, name, ino, st.st_mode & 0o7777))
                self.real_ids[ino] = [st.st_dev, st.st_ino]
                if path in self._fail_paths:
                    self.fail_writes[ino] = self._fail_paths[path]
            ino = self._names[path]
            if flags & os.O_TRUNC:
                self.log.append(Truncate(ino, 0))
            self._fds[fd], self._positions[fd] = ino, 0
            return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)
            self._positions.pop(fd, None)
        os.close(fd)

    def _file(self, fd: int) -> int | None:
        target = self._fds.get(fd)
        return target if isinstance(target, int) else None

    def _maybe_fail(self, ino: int) -> None:
        if ino in self.fail_writes:
            self.fail_writes[ino] -= 1
            if self.fail_writes[ino] < 0:
                raise OSError(5, "planted EIO (power-loss model)")

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        ino = self._file(fd)
        if ino is None:
            return os.pwrite(fd, data, offset)
        with self._lock:
            self._maybe_fail(ino)
            n = os.pwrite(fd, data, offset)
            entry = Write(ino, offset, bytes(data[:n]))
            self.log.append(entry)
        if self.after_write is not None:
            self.after_write(entry)
        return n

    def write(self, fd: int, data: Any) -> int:
        ino = self._file(fd)
        if ino is None:
            return os.write(fd, data)
        with self._lock:
            n = os.write(fd, data)
            entry = Write(ino, self._positions[fd], bytes(data[:n]))
            self.log.append(entry)
            self._positions[fd] += n
        if self.after_write is not None:
            self.after_write(entry)
        return n

    def copy_file_range(
        self, src: int, dst: int, count: int, offset_src: int, offset_dst: int
    ) -> int:
        ino = self._file(dst)
        if ino is None:
            return os.copy_file_range(src, dst, count, offset_src, offset_dst)
        with self._lock:
            self._maybe_fail(ino)
            n = os.copy_file_range(src, dst, count, offset_src, offset_dst)
            self.log.append(Write(ino, offset_dst, os.pread(dst, n, offset_dst)))
            return n

    def ftruncate(self, fd: int, size: int) -> None:
        with self._lock:
            os.ftruncate(fd, size)
            if (ino := self._file(fd)) is not None:
                self.log.append(Truncate(ino, size))

    def fchmod(self, fd: int, mode: int) -> None:
        with self._lock:
            os.fchmod(fd, mode)
            if (ino := self._file(fd)) is not None:
                self.log.append(Chmod(ino, mode & 0o7777))

    def _sync(self, fd: int, call: Any) -> None:
        with self._lock:
            started, target = len(self.log), self._fds.get(fd)
        call(fd)  # not under the lock: other calls go on meanwhile, as they would
        if target is None:
            return
        with self._lock:
            if isinstance(target, int):
                self.log.append(Fsync(target, started))
            else:
                self.log.append(FsyncDir(target, started))

    def fsync(self, fd: int) -> None:
        self._sync(fd, os.fsync)

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, os.fdatasync)

    def rename(self, old: Any, new: Any) -> None:
        old, new = os.path.abspath(os.fspath(old)), os.path.abspath(os.fspath(new))
        with self._lock:
            os.rename(old, new)
            if self._tracked(new):
                assert os.path.dirname(old) == os.path.dirname(new), "same-directory renames only"
                ino = self._names.pop(old)
                self._names[new] = ino
                self.log.append(
                    Rename(os.path.dirname(new), os.path.basename(old), os.path.basename(new), ino)
                )

    def unlink(self, path: Any) -> None:
        path = os.path.abspath(os.fspath(path))
        with self._lock:
            os.unlink(path)
            if self._tracked(path):
                self._names.pop(path, None)
                self.log.append(Unlink(os.path.dirname(path), os.path.basename(path)))


class RecordingLane:
    """Stands for the native write lane (fusedisk._lane.Lane), whose thread writes in C where
    :class:`RecordingOS` cannot see it: each write or truncate is logged when it is reaped, the
    latest moment it can have landed.  A change logged late can only look less durable than it
    is (an fsync begun before it does not cover it), so the model's crash states include every
    one the real order allows; and a flush reaps the writes before it (its barrier) before its
    fsync begins, so none it must cover is logged after."""

    def __init__(self, recorder: RecordingOS, fd: int) -> None:
        self._lane = NativeLane(fd)
        self._recorder, self._ino = recorder, recorder._file(fd)
        self._changes: dict[int, Write | Truncate] = {}  # id(token) -> what it does, until reaped

    def pwrite(self, token: object, data: bytes, offset: int) -> None:
        self._lane.pwrite(token, data, offset)
        if self._ino is not None:
            self._changes[id(token)] = Write(self._ino, offset, bytes(data))

    def truncate(self, token: object, size: int) -> None:
        self._lane.truncate(token, size)
        if self._ino is not None:
            self._changes[id(token)] = Truncate(self._ino, size)

    def reap(self) -> list[tuple[object, int]]:
        done = self._lane.reap()
        for token, code in done:
            change = self._changes.pop(id(token), None)
            if change is None or code != 0:
                continue
            with self._recorder._lock:
                self._recorder.log.append(change)
            if isinstance(change, Write) and self._recorder.after_write is not None:
                self._recorder.after_write(change)
        return done

    def __getattr__(self, name: str) -> Any:  # barrier, stop, join, fileno; no fallocate here
        if name == "fallocate":
            raise AttributeError("the power-loss model has no fallocate")
        return getattr(self._lane, name)


MODULES = (fusedisk.backend, fusedisk.storage, fusedisk.daemon)


@contextmanager
def recording(monkeypatch: pytest.MonkeyPatch, roots: list[str]) -> Iterator[RecordingOS]:
    """Record what fusedisk's modules do to the files under ``roots`` (all durable now)."""
    recorder = RecordingOS(roots)
    with monkeypatch.context() as patch:
        for module in MODULES:
            patch.setattr(module, "os", recorder)
        patch.setattr(
            fusedisk.destination, "NativeLane", functools.partial(RecordingLane, recorder)
        )
        yield recorder


# ---- replaying ----------------------------------------------------------------------------


@dataclass
class FileState:
    data: bytearray
    mode: int
    changes: list[tuple[int, DataChange]] = field(default_factory=list)  # not yet durable


@dataclass
class DirState:
    names: dict[str, int]  # durable
    changes: list[tuple[int, NameChange]] = field(default_factory=list)  # not yet durable


Files = dict[str, tuple[bytes, int, int]]  # path -> (data, mode, inode): what a crash leaves


def _apply_data(data: bytearray, mode: int, change: DataChange) -> int:
    if isinstance(change, Write):
        end = change.offset + len(change.data)
        if len(data) < end:
            data.extend(bytes(end - len(data)))
        data[change.offset : end] = change.data
    elif isinstance(change, Truncate):
        del data[change.size :]
        data.extend(bytes(change.size - len(data)))
    else:
        mode = change.mode
    return mode


def _apply_name(names: dict[str, int], change: NameChange) -> None:
    if isinstance(change, Create):
        names[change.name] = change.ino
    elif isinstance(change, Rename):
        if names.get(change.old) == change.ino:
            del names[change.old]
        names[change.new] = change.ino
    else:
        names.pop(change.name, None)


class Model:
    """What is durable after each prefix of a recording's log."""

    def __init__(self, recorder: RecordingOS) -> None:
        self.log = recorder.log
        self.position = 0  # entries replayed
        self.files: dict[int, FileState] = {}
        self.dirs = {root: DirState({}) for root in recorder.roots}
        for path, ino in recorder.initial_inodes().items():
            data, mode = recorder.initial[path]
            self.files[ino] = FileState(bytearray(data), mode)
            self.dirs[os.path.dirname(path)].names[os.path.basename(path)] = ino

    def step(self) -> Entry:
        """Replay one more entry."""
        index, entry = self.position, self.log[self.position]
        self.position += 1
        if isinstance(entry, Create):
            self.files[entry.ino] = FileState(bytearray(), entry.mode)
            self.dirs[entry.dir].changes.append((index, entry))
        elif isinstance(entry, Write | Truncate | Chmod):
            self.files[entry.ino].changes.append((index, entry))
        elif isinstance(entry, Fsync):
            file = self.files[entry.ino]
            for _, change in (c for c in file.changes if c[0] < entry.started):
                file.mode = _apply_data(file.data, file.mode, change)
            file.changes = [c for c in file.changes if c[0] >= entry.started]
        elif isinstance(entry, Rename | Unlink):
            self.dirs[entry.dir].changes.append((index, entry))
        elif isinstance(entry, FsyncDir):
            directory = self.dirs[entry.dir]
            for _, renamed in (c for c in directory.changes if c[0] < entry.started):
                _apply_name(directory.names, renamed)
            directory.changes = [c for c in directory.changes if c[0] >= entry.started]
        return entry

    def crash(self, keep: str, seed: int = 0) -> Files:
        """The files a power cut now could leave.  ``keep``: "durable" (nothing else),
        "all" (everything, as a kill), or "some" (drawn from ``seed``)."""
        rng = random.Random(seed)
        files: Files = {}
        for path, directory in self.dirs.items():
            names = dict(directory.names)
            changes = directory.changes
            kept = {"durable": 0, "all": len(changes)}.get(keep, rng.randint(0, len(changes)))
            for _, renamed in changes[:kept]:
                _apply_name(names, renamed)
            for name, ino in names.items():
                file = self.files[ino]
                data, mode = bytearray(file.data), file.mode
                for _, change in file.changes:
                    if keep == "all" or (keep == "some" and rng.random() < 0.5):
                        mode = _apply_data(data, mode, change)
                files[os.path.join(path, name)] = (bytes(data), mode, ino)
        return files


def materialise(files: Files, roots: list[str]) -> dict[int, list[int]]:
    """Make ``roots`` hold exactly ``files`` (real files, for the real recovery code); return
    each inode's new [st_dev, st_ino]."""
    for root in roots:
        for name in os.listdir(root):
            os.unlink(os.path.join(root, name))
    ids: dict[int, list[int]] = {}
    for path, (data, mode, ino) in files.items():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            st = os.fstat(fd)
            ids[ino] = [st.st_dev, st.st_ino]
        finally:
            os.close(fd)
    return ids
