"""mount(8) and umount(8) helpers: ``mount.fuse.fusedisk`` and ``umount.fuse.fusedisk``.

For a mount of type ``fuse.fusedisk`` (``mount -t fuse.fusedisk IMAGE MOUNTPOINT``, or a line
of /etc/fstab, which systemd turns into a mount unit) mount(8) runs::

    /sbin/mount.fuse.fusedisk IMAGE MOUNTPOINT [-sfnv] [-N NAMESPACE] [-o OPTIONS]

and umount(8), for such a mount, runs ``/sbin/umount.fuse.fusedisk MOUNTPOINT [-flnrv]`` if it
exists.  mount(8) looks for helpers only in /sbin, /sbin/fs.d and /sbin/fs, with a PATH of its
own, so the console scripts (installed beside ``fusedisk``) are linked there (README, Usage).

The mount helper is ``fusedisk mount`` in the background: same checks, same crash recovery, and
it returns once the mount serves.  The umount helper is ``fusedisk unmount``: it returns only
once the daemon has flushed the image and exited (umount(2) alone returns before that: the
kernel does not wait for a FUSE daemon), and it clears a stale mount.

Without ``mount.fuse.fusedisk`` in /sbin, mount(8) falls back to /sbin/mount.fuse (fuse3's
mount.fuse3), which runs ``fusedisk IMAGE MOUNTPOINT -o OPTIONS`` from mount(8)'s PATH (where a
system-wide ``pip install`` puts it); ``fusedisk`` recognises that call
(:func:`called_by_mount_fuse`) and comes here, so the ``fusedisk#IMAGE`` form of type ``fuse``
works too.

Every mistake ends in one line on stderr (``fusedisk: ...``), nothing mounted, and mount(8)'s
exit status conventions: 1 for a bad invocation (an unknown option), 32 for a mount that failed.
"""

from __future__ import annotations

import getopt
import os
import subprocess
import sys
from collections.abc import Collection
from dataclasses import dataclass

from fusedisk.errors import UsageError

USAGE_FAILURE = 1  # mount(8) and umount(8): incorrect invocation
MOUNT_FAILURE = 32  # mount(8): mount failure; umount(8): umount failure

# Options with a meaning: the file's name in the mount, letting other users open the disk, and
# rolling back (not resuming) a move a crash interrupted.
HONOURED = ("name=NAME", "allow_other", "noresume")
# Accepted and ignored: options mount(8) or systemd act on themselves (auto, nofail, _netdev,
# user...), and options that say nothing about a mount of one disk image file (rw, atime,
# exec...).  Every FUSE mount is nosuid and nodev whatever is asked, and the disk's mode is the
# image's, so exec/noexec and suid/dev change nothing either.
IGNORED = frozenset(
    {"rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser"}
    | {"owner", "group", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async"}
    | {"atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime"}
    | {"diratime", "nodiratime", "lazytime", "nolazytime", "loud", "silent"}
)
IGNORED_PREFIXES = ("x-", "X-", "comment=", "uhelper=")  # userspace comments; systemd's x-systemd.*
REFUSED = {"ro": "fusedisk serves a disk read-write; a read-only mount is not supported"}


@dataclass(frozen=True)
class MountRequest:
    """What mount(8) asked for, once its arguments and options are checked."""

    image: str
    mountpoint: str
    name: str | None = None
    allow_other: bool = False
    fake: bool = False  # mount -f: check everything, mount nothing
    resume: bool = True  # noresume: after a crash, roll an unfinished move back


def split_options(text: str) -> list[str]:
    """``a,b="x,y",c`` -> ``['a', 'b=x,y', 'c']``: libmount quotes a value with a comma."""
    options, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            options.append(current)
            current = ""
        else:
            current += char
    options.append(current)
    return [option for option in options if option]


def parse_options(text: str, sloppy: bool = False) -> tuple[str | None, bool]:
    """The ``-o`` list: (name, allow_other).  Refuses an unknown option unless ``sloppy``
    (mount -s), and ``ro`` always."""
    name: str | None = None
    allow_other = False
    for option in split_options(text):
        key, equals, value = option.partition("=")
        if option in REFUSED:
            raise UsageError(message=f"option '{option}': {REFUSED[option]}; nothing was mounted")
        if key == "name" and equals:
            if name is not None:
                raise UsageError(message="option 'name=' is given twice; nothing was mounted")
            name = value
        elif option == "allow_other":
            allow_other = True
        elif option in IGNORED or option == "noresume" or option.startswith(IGNORED_PREFIXES):
            continue  # (noresume: read by parse_mount_args)
        elif sloppy:
            continue
        else:
            raise UsageError(
                message=f"unknown mount option '{option}' (fusedisk takes "
                f"{' and '.join(HONOURED)}; see README); nothing was mounted"
            )
    return name, allow_other


def parse_mount_args(argv: list[str]) -> MountRequest:
    """``IMAGE MOUNTPOINT [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t TYPE]``, in any order."""
    try:
        flags, positional = getopt.gnu_getopt(argv, "sfnvo:t:N:")
    except getopt.GetoptError as e:
        raise UsageError(message=f"{e}; nothing was mounted") from None
    if len(positional) != 2 or not all(positional):
        raise UsageError(
            message="usage: mount.fuse.fusedisk IMAGE MOUNTPOINT [-o OPTIONS]; nothing was mounted"
        )
    given = dict(flags)
    if "-N" in given:
        raise UsageError(message="mount namespaces (-N) are not supported; nothing was mounted")
    options = ",".join(value for flag, value in flags if flag == "-o")
    name, allow_other = parse_options(options, sloppy="-s" in given)
    resume = "noresume" not in split_options(options)
    return MountRequest(
        positional[0], positional[1], name, allow_other, fake="-f" in given, resume=resume
    )


def called_by_mount_fuse(argv: list[str], commands: Collection[str]) -> bool:
    """True if ``fusedisk`` was run the way mount.fuse3 runs a filesystem:
    ``fusedisk IMAGE MOUNTPOINT -o OPTIONS`` (mount(8) always passes at least ``rw``)."""
    return len(argv) == 4 and argv[2] == "-o" and argv[0] not in commands and argv[0][:1] != "-"


def mount_main(argv: list[str] | None = None) -> int:
    """``mount.fuse.fusedisk``: mount, and return once the mount serves."""
    from fusedisk.cli import check_name, configure_logging, report_errors, start_mount

    args = sys.argv[1:] if argv is None else argv
    parsed: list[MountRequest] = []

    def parse() -> int:
        configure_logging(False, None)
        parsed.append(parse_mount_args(args))
        return 0

    if report_errors(parse, USAGE_FAILURE):
        return USAGE_FAILURE
    request = parsed[0]
    image, mountpoint = os.path.abspath(request.image), os.path.abspath(request.mountpoint)

    def mount() -> int:
        check_name(request.name or os.path.basename(image), "option name=")
        if not request.fake:
            start_mount(
                image,
                mountpoint,
                name=request.name,
                allow_other=request.allow_other,
                resume=request.resume,
            )
        return 0

    return report_errors(mount, MOUNT_FAILURE)


def umount_main(argv: list[str] | None = None) -> int:
    """``umount.fuse.fusedisk``: ``fusedisk unmount``.  With ``-l`` (lazy) the mount is
    detached at once and the daemon ends once the disk is closed; with ``-f`` (force: abort the
    connection, for a daemon that hangs) it is the kernel's unmount (``umount -i -f``).
    Neither waits for the daemon."""
    from fusedisk.cli import DaemonFailed, configure_logging, report_errors, unmount

    args = sys.argv[1:] if argv is None else argv

    def run() -> int:
        configure_logging(False, None)
        try:
            flags, positional = getopt.gnu_getopt(args, "flnrvN:t:")
        except getopt.GetoptError as e:
            raise UsageError(message=f"{e}; nothing was unmounted") from None
        given = dict(flags)
        if len(positional) != 1:
            raise UsageError(message="usage: umount.fuse.fusedisk MOUNTPOINT [-fl]")
        if "-N" in given:
            raise UsageError(message="mount namespaces (-N) are not supported")
        mountpoint = os.path.abspath(positional[0])
        if "-f" in given:  # umount -i: the kernel's unmount, never this helper again
            command = ["umount", "-i", "-f", *(["-l"] if "-l" in given else []), mountpoint]
            return subprocess.run(command).returncode
        try:
            unmount(mountpoint, lazy="-l" in given)
        except DaemonFailed as e:
            # Unmounted all the same: success, or umount(8) would keep the mount's entry in
            # /run/mount/utab; the line still says what went wrong (the journal, under systemd).
            print(f"fusedisk: {e}", file=sys.stderr)
        return 0

    return report_errors(run, MOUNT_FAILURE)
