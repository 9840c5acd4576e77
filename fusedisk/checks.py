"""Checks of user input, run before anything is changed.  Each failure is a one-line error."""

from __future__ import annotations

import errno
import os
import shutil

from fusedisk.control import mounts
from fusedisk.errors import MoveRefused, StaleMount, UsageError
from fusedisk.storage import journal_path


def check_fuse_available() -> None:
    if not os.path.exists("/dev/fuse"):
        raise UsageError(message="/dev/fuse does not exist: load the fuse module (modprobe fuse)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UsageError(message="/dev/fuse is not readable and writable by this user")
    if shutil.which("fusermount3") is None:
        raise UsageError(message="fusermount3 is not installed (Debian package fuse3)")


def check_image(image: str) -> None:
    if not os.path.lexists(image):
        raise UsageError(message=f"image {image} does not exist")
    if os.path.isdir(image):
        raise UsageError(message=f"image {image} is a directory, not a disk image file")
    if not os.path.isfile(image):
        raise UsageError(message=f"image {image} is not a regular file")
    if not os.access(image, os.R_OK | os.W_OK):
        raise UsageError(message=f"image {image} is not readable and writable by this user")


def check_mountpoint(mountpoint: str) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise UsageError(message=f"mountpoint {mountpoint} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise StaleMount(path=mountpoint) from None
        raise UsageError(message=f"mountpoint {mountpoint}: {e.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise UsageError(message=f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(message=f"mountpoint {mountpoint} is already a mount point")
    if os.listdir(mountpoint):
        raise UsageError(message=f"mountpoint {mountpoint} is not empty")
    if st.st_uid != os.getuid() and os.getuid() != 0:
        raise UsageError(message=f"mountpoint {mountpoint} is not owned by this user")


# Filesystems that keep written data in this machine's page cache, whose writeback the copier
# starts and waits for chunk by chunk (sync_file_range), so the destination never holds much
# unflushed data.  Anywhere else (network and FUSE filesystems: sshfs queues written data until
# a flush, NFS keeps it unstable on the server until a COMMIT) the copier flushes every few MiB.
WRITEBACK_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "bcachefs", "zfs"}
    | {"vfat", "exfat", "ntfs3", "tmpfs", "ramfs", "overlay"}
)


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding ``path`` (the longest mount point above it).
    Blocking, and it resolves links on a filesystem that may hang: the daemon bounds it."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    for point, fstype in mounts():
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def check_destination(source: str, dest: str, mountpoint: str, *, force: bool) -> None:
    """Refuse a destination that would lose data or cannot work; remove it only with --force.

    Blocking, and it stats paths that may lie inside the mount: the daemon runs it in a thread.
    """

    def refuse(reason: str) -> MoveRefused:
        return MoveRefused(dest=dest, source=source, reason=reason)

    if not os.path.isabs(dest):
        raise refuse("the destination must be an absolute path")
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        raise refuse(f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise refuse(f"directory {parent} is not writable")
    if os.stat(parent).st_dev == os.stat(mountpoint).st_dev:
        raise refuse("the destination is inside the fusedisk mount itself")
    journal = journal_path(source)
    if dest in (journal, journal + ".tmp"):
        raise refuse("that name is the move journal's")
    reclaimable = 0
    if os.path.lexists(dest):
        if os.path.exists(dest) and os.path.samefile(dest, source):
            raise refuse("it is the source image itself")
        if os.path.islink(dest):
            raise refuse("it is a symbolic link (fusedisk does not write through links)")
        if os.path.isdir(dest):
            raise refuse("it is a directory")
        if not force:
            raise refuse("it already exists (use --force to replace it)")
        reclaimable = os.stat(dest).st_blocks * 512
    needed = os.stat(source).st_blocks * 512
    st = os.statvfs(parent)
    available = st.f_bavail * st.f_frsize + reclaimable
    if needed > available:
        raise refuse(
            f"not enough free space in {parent}: {needed} bytes needed, {available} available"
        )
    if reclaimable or os.path.lexists(dest):
        os.unlink(dest)  # --force, and every other check passed
