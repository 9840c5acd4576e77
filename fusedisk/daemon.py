"""The mount daemon: one trio nursery owning the FUSE loop, the control server and any move.

Start-up order matters for the user: every check runs, and any unfinished move found in the
journal is settled, before anything is mounted; the parent ``fusedisk mount`` hears "ready" only
once the mount serves requests.  Shutdown (unmount, SIGTERM, Ctrl-C) fails back a running move,
flushes the image and closes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from fusedisk import checks
from fusedisk.backend import ImageFile, PosixFile
from fusedisk.control import runtime_dir, serve_control
from fusedisk.destination import DEST_TIMEOUT, bounded, bounded_sync
from fusedisk.engine import Disk
from fusedisk.errors import FusediskError, MoveRefused, UsageError
from fusedisk.fs import DiskOperations, capabilities, forget_file_attributes
from fusedisk.storage import PosixStorage, journal_path, marker_path, read_journal, read_marker
from fusedisk.units import human

log = logging.getLogger(__name__)

T = TypeVar("T")
# How long recovery waits for each step on a destination (a remote may be gone) before it says
# the destination is unreachable.
RECOVERY_TIMEOUT = 5.0


@dataclass(frozen=True)
class MountConfig:
    image: str  # absolute
    mountpoint: str  # absolute
    name: str
    allow_other: bool = False
    resume: bool = True  # resume a move a crash interrupted (else roll it back)


def runtime_name(mountpoint: str) -> str:
    """A stable name for the files of the daemon serving ``mountpoint``."""
    return "mnt-" + hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]


Recovered = tuple[str, str | None, dict[str, Any] | None]


def recover(image: str, resume: bool = True) -> Recovered:
    """Settle a move that a crash or a kill left unfinished, found from either of its files.

    Returns the image to serve, a line saying what was found and done (None if nothing), and
    the journal's record if the move is to be resumed.  Before the switch was recorded the
    source is the truth: the move is resumed from its last checkpoint if it has one, its
    destination is still the file it created (marked, same inode) and ``resume`` allows;
    otherwise the partial destination is removed.  After, the destination is the truth: it is
    served and the source deleted, as the move would have done, whichever path the user named.
    Every step on the destination's side is bounded (it may be a remote that is gone).
    """
    record = read_journal(image)
    if record is None:
        source = read_marker(image)
        if source is None:
            return image, None, None
        # ``image`` is a destination fusedisk created: only a recorded switch makes it the truth.
        record = read_journal(source) if os.path.exists(journal_path(source)) else None
        if record is None or record["phase"] != "switched" or record["destination"] != image:
            raise UsageError(
                message=f"{image} is the unfinished destination of a move from {source}; "
                f"nothing was changed: mount {source} instead (that removes {image})"
            )
    source, dest = str(record["source"]), str(record["destination"])
    storage = PosixStorage()

    def at_destination(what: str, operation: Callable[[], T]) -> T:
        return bounded_sync(RECOVERY_TIMEOUT, what, dest, operation)

    if record["phase"] == "switched":
        try:
            present = at_destination(f"looking for {dest}", lambda: os.path.exists(dest))
            if present:
                at_destination("removing its marker", lambda: storage.mark_complete(dest))
        except OSError as e:
            raise UsageError(
                message=f"the journal {journal_path(source)} says the disk moved to {dest}, "
                f"which is unreachable ({e.strerror or e}); nothing was changed: mount again "
                "once it answers"
            ) from None
        if not present:
            raise UsageError(
                message=f"the journal {journal_path(source)} says the disk moved to {dest}, "
                "but that file is missing; nothing was changed"
            )
        if os.path.exists(source) and not record.get("keep_source", False):
            storage.remove(source)
        storage.clear_journal(source)
        return dest, f"found a finished move of {source} to {dest}: serving {dest}", None
    checkpoint = record.get("checkpoint")
    try:
        ours = at_destination("reading its marker", lambda: read_marker(dest)) == source
        if ours and resume and checkpoint is not None:
            found = at_destination(f"looking at {dest}", lambda: _file_id(dest))
            if found == checkpoint.get("destination_id"):
                return source, _resuming(source, dest, checkpoint), record
        if ours:
            at_destination(f"removing {dest}", lambda: storage.remove(dest))
            done = "removed the partial destination"
        else:
            done = f"no partial destination at {dest} (never created, or not mounted there now)"
    except OSError as e:
        done = (
            f"its destination is unreachable ({e.strerror or e}): the partial file {dest} "
            f"and its marker {marker_path(dest)} may remain there"
        )
    storage.clear_journal(source)
    return source, f"found an unfinished move of {source} to {dest}: {done}, serving {source}", None


def _file_id(path: str) -> list[int]:
    st = os.stat(path, follow_symlinks=False)
    return [st.st_dev, st.st_ino]


def _resuming(source: str, dest: str, checkpoint: dict[str, Any]) -> str:
    marked = len(checkpoint["marks"]) * int(checkpoint["region"])
    return (
        f"found an unfinished move of {source} to {dest}: resuming it from its checkpoint at "
        f"{human(int(checkpoint['cursor']))} (copying again at most {human(marked)} below it); "
        f"serving {source} meanwhile ('fusedisk cancel' rolls it back)"
    )


def open_locked(image: str) -> PosixFile:
    """Open the image, taking an exclusive flock so no second fusedisk serves it."""
    file = PosixFile.open(image)
    try:
        fcntl.flock(file.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise UsageError(message=f"image {image} is already served by another fusedisk") from None
    return file


class Daemon:
    def __init__(self, config: MountConfig, disk: Disk, control_path: str) -> None:
        self.config = config
        self.disk = disk
        self.control_path = control_path
        self.requests: Counter[str] = Counter()  # FUSE requests served, by operation
        self._migrate_lock = trio.Lock()

    def facts(self) -> dict[str, Any]:
        status = self.disk.status()
        status.update(
            pid=os.getpid(),
            mountpoint=self.config.mountpoint,
            name=self.config.name,
            control=self.control_path,
            requests=dict(self.requests),
            capabilities=capabilities(),
        )
        return status

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        move = self.disk.move
        if command == "status":
            pass
        elif command == "migrate":
            await self._migrate(request)
        elif command == "cancel":
            if move is None or not move.active:
                raise UsageError(message="no move is running")
            move.cancel()
            await move.finished_event.wait()
        elif command == "rate":
            if move is None or not move.active:
                raise UsageError(message="no move is running")
            move.set_rate_limit(int(request["rate_limit"]))
        else:
            raise UsageError(message=f"unknown command {command!r}")
        return self.facts()

    def _check_destination(self, dest: str, *, force: bool) -> str:
        """Check ``dest`` (blocking); return its filesystem's type."""
        checks.check_destination(self.disk.primary.path, dest, self.config.mountpoint, force=force)
        return checks.filesystem_type(os.path.dirname(dest))

    async def _migrate(self, request: dict[str, Any]) -> None:
        dest = str(request["destination"])
        source = self.disk.primary.path
        self.disk.check_can_move(dest)
        if self._migrate_lock.locked():
            raise MoveRefused(dest=dest, source=source, reason="a move is already starting")
        async with self._migrate_lock:  # checks and start as one step among requests
            # Every destination gets the deadline unless asked otherwise: local disks hang
            # too (a dying disk, a SAN LUN behind ext4), and the native write lane makes it
            # cost little (docs/benchmarks.md section 2).
            requested = request.get("dest_timeout")
            dest_timeout = DEST_TIMEOUT if requested is None else float(requested)
            try:
                kind = await bounded(
                    dest_timeout or DEST_TIMEOUT,
                    f"checking {dest}",
                    dest,
                    lambda: self._check_destination(dest, force=bool(request.get("force"))),
                )
                log.info("moving to %s on %s: destination deadline %g s", dest, kind, dest_timeout)
                await self.disk.start_move(
                    dest,
                    rate_limit=int(request.get("rate_limit") or 0),
                    keep_source=bool(request.get("keep_source")),
                    verify=bool(request.get("verify")),
                    dest_timeout=dest_timeout,
                    flush_while_copying=kind not in checks.WRITEBACK_FILESYSTEMS,
                )
            except OSError as e:
                raise MoveRefused(dest=dest, source=source, reason=e.strerror or str(e)) from e


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("got signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def open_image(
    image: str, resume: bool = True
) -> tuple[PosixFile, str | None, dict[str, Any] | None]:
    """Settle any unfinished move of ``image`` and open, locked, the file to serve; also the
    line for the user saying what recovery found (None if nothing) and the record of a move
    to resume (see :func:`recover`).  Nothing else is mounted yet, so a refusal here changes
    nothing."""
    # Lock before recovering: a daemon still moving this image holds the lock on it (and on
    # its destination), and its journal must not be "recovered" from under it.
    record = read_journal(image)
    first = image
    if record is not None and record["phase"] == "switched" and not os.path.exists(first):
        first = str(record["destination"])
    checks.check_image(first)
    file = open_locked(first)
    try:
        serving, found, resumed = recover(image, resume)
        if serving != first:
            file.close()
            checks.check_image(serving)
            file = open_locked(serving)
    except BaseException:
        file.close()
        raise
    return file, found, resumed


async def resume_move(disk: Disk, image: str, record: dict[str, Any]) -> str:
    """Resume the move recovery found; if that fails, roll it back.  Returns what happened."""
    dest_timeout = float(record.get("dest_timeout", DEST_TIMEOUT))
    try:
        await disk.resume_move(record, dest_timeout)
        return ""
    except (OSError, FusediskError) as e:
        log.warning("resuming the move to %s failed: %s", record["destination"], e)
        reason = getattr(e, "strerror", None) or str(e)
        _, found, _ = await trio.to_thread.run_sync(recover, image, False)
        return f"; resuming failed ({reason}): {found}"


def final_flush(image: ImageFile) -> None:
    """At unmount: make every write durable (the guest may not have flushed its last ones),
    then close the image."""
    try:
        image.fsync(False)
        log.info("flushed %s", image.path)
    except OSError as e:
        # Said, never hidden: the last writes the guest did not flush may be lost.
        raise UsageError(
            message=f"unmounted, but the final flush of {image.path} failed: "
            f"{e.strerror or e}; writes the guest had not flushed may be lost"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            image.close()


async def serve(config: MountConfig, ready: Callable[[str], None]) -> None:
    """Check, recover, mount and serve until unmounted; ``ready`` gets a line for the user."""
    checks.check_fuse_available()
    checks.check_mountpoint(config.mountpoint)
    image, found, resumed = open_image(config.image, config.resume)
    control_path = os.path.join(runtime_dir(), runtime_name(config.mountpoint) + ".sock")
    disk: Disk | None = None
    try:
        async with trio.open_nursery() as nursery:
            disk = Disk(image, PosixStorage(), nursery)
            disk.on_primary_changed = forget_file_attributes
            daemon = Daemon(config, disk, control_path)
            await nursery.start(serve_control, control_path, daemon.handle)
            if resumed is not None:
                found = (found or "") + await resume_move(disk, config.image, resumed)
            ops = DiskOperations(disk, config.name, daemon.facts, daemon.requests)
            # The source column of mount(8) and /proc/mounts: the image, as fstab names it
            # (so `mount -a` knows the line is mounted), escaped for FUSE's option parser.
            fsname = config.image.replace("\\", "\\\\").replace(",", "\\,")
            options = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=fusedisk"}
            if config.allow_other:
                options.add("allow_other")
            pyfuse3.init(ops, config.mountpoint, options)
            try:
                nursery.start_soon(_stop_on_signals)
                log.info("serving %s at %s/%s", image.path, config.mountpoint, config.name)
                ready(found or "")
                await pyfuse3.main()
            finally:
                pyfuse3.close(unmount=True)
            log.info("unmounted %s", config.mountpoint)
            nursery.cancel_scope.cancel()  # fails back a running move, stops the control server
    finally:
        # Unmounted, or failing: all that is left is this flush, and a signal must not cut it
        # short (systemd sends SIGTERM right after a plain umount of a mount unit).
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        final_flush(disk.primary if disk is not None else image)
