"""fusedisk the way hosts run filesystems: mount(8), umount(8) and fstab (tier 4: real mounts).

Every test runs the real mount(8) and umount(8) of util-linux with a private fstab
(``mount --fstab FILE``), never the machine's, and real daemons.  mount(8) runs the helper
``mount.fuse.fusedisk`` (and umount(8) ``umount.fuse.fusedisk``) only from /sbin, with a PATH of
its own, so the ``helpers`` fixture links this checkout's console scripts there for the module
and removes the links after (links that are already this checkout's are used and left alone;
another fusedisk's make the tests skip rather than replace them).  The environment passes
through mount(8), so a scratch copy on PYTHONPATH is what the helpers run.

Cleanup unmounts whatever a test left mounted under its directory with umount(8) (which also
drops any entry mount(8) wrote for it in /run/mount/utab), waits for its daemons (kills only as a
last resort), and removes the logs its dead daemons kept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fusedisk.cli import COMMANDS, build_parser
from fusedisk.control import daemon_sockets, runtime_dir
from fusedisk.daemon import runtime_name
from fusedisk.errors import UsageError
from fusedisk.mounthelper import (
    MountRequest,
    called_by_mount_fuse,
    parse_mount_args,
    parse_options,
)
from tests.lossy import lossy_mount
from tests.mounting import fusedisk, random_image
from tests.test_mount import assert_clean_error, is_mounted, running, snapshot, wait_until

pytestmark = pytest.mark.mount

SBIN = Path("/sbin")
HELPERS = ("mount.fuse.fusedisk", "umount.fuse.fusedisk")
TIMEOUT = 60.0
FSTYPE = "fuse.fusedisk"
UTAB = "/run/mount/utab"  # where mount(8) keeps options the kernel does not (uhelper=, _netdev)


@pytest.fixture(scope="module")
def helpers() -> Iterator[None]:
    """This checkout's helpers, linked into /sbin for the module's tests."""
    if os.getuid() != 0:
        pytest.skip("mount(8) runs the helpers in /sbin, and a test installs them there, as root")
    installed: list[Path] = []
    try:
        for name in HELPERS:
            target = Path(sys.executable).parent / name
            if not target.exists():
                pytest.fail(f"{target} is missing: scripts/setup installs the console scripts")
            link = SBIN / name
            if os.path.lexists(link):
                if os.path.realpath(link) != os.path.realpath(target):
                    pytest.skip(f"{link} is another fusedisk's helper: not replaced")
                continue  # already this checkout's: used, and left as it was
            link.symlink_to(target)
            installed.append(link)
        yield
    finally:
        for link in installed:
            link.unlink(missing_ok=True)


def run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def daemon_pids(under: Path) -> list[int]:
    """fusedisk daemons whose command line names a path under ``under``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        ours = b"fusedisk" in argv and any(str(under).encode() in arg for arg in argv)
        if ours and running(int(entry)):
            pids.append(int(entry))
    return pids


def utab_lines() -> list[str]:
    try:
        with open(UTAB, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def logs_of(mountpoint: Path) -> set[str]:
    """The log files (current and rotated) of the daemons that served ``mountpoint``."""
    prefix = runtime_name(str(mountpoint)) + "."
    return {
        name for name in os.listdir(runtime_dir()) if name.startswith(prefix) and ".log" in name
    }


@dataclass
class Host:
    """A private fstab, and the mountpoints and images of one test."""

    tmp: Path
    mountpoints: list[Path] = field(default_factory=list)

    @property
    def fstab(self) -> Path:
        return self.tmp / "fstab"

    def disk(self, name: str = "disk", size: int = 1 << 20, seed: int = 1) -> tuple[Path, bytes]:
        image = self.tmp / f"{name}.img"
        return image, random_image(image, size, seed=seed)

    def mountpoint(self, name: str = "mnt") -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        self.mountpoints.append(path)
        return path

    def write_fstab(self, *lines: str) -> None:
        self.fstab.write_text("# fusedisk tests: a private fstab\n" + "\n".join(lines) + "\n")

    def mount(self, *args: str | Path, env: dict[str, str] | None = None) -> str:
        """``mount --fstab FSTAB ARGS`` that must succeed; returns its stderr."""
        result = run("mount", "--fstab", self.fstab, *args, env=env)
        assert result.returncode == 0, result
        return result.stderr

    def cleanup(self) -> None:
        for point in self.mountpoints:  # umount(8), not fusermount3: it clears utab too
            for command in (["umount"], ["umount", "-l"], ["umount", "-i", "-l"]):
                if is_mounted(point):
                    run(*command, point)
        left = [str(point) for point in self.mountpoints if is_mounted(point)]
        deadline = time.monotonic() + TIMEOUT
        while daemon_pids(self.tmp) and time.monotonic() < deadline:
            time.sleep(0.05)
        stuck = daemon_pids(self.tmp)
        for pid in stuck:
            os.kill(pid, signal.SIGKILL)
        for point in self.mountpoints:  # what killed daemons leave
            for name in logs_of(point):
                os.unlink(os.path.join(runtime_dir(), name))
            for path in daemon_sockets(str(point)):
                Path(path).unlink(missing_ok=True)
        assert not left, f"still mounted after umount, umount -l and umount -i -l: {left}"
        assert not stuck, f"daemons {stuck} still ran {TIMEOUT:.0f} s after the unmount (killed)"
        left = [line for line in utab_lines() if f"TARGET={self.tmp}/" in line]
        assert not left, f"entries left in {UTAB}: {left}"


@pytest.fixture
def host(tmp_path: Path, helpers: None) -> Iterator[Host]:
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


def status(mountpoint: Path) -> dict[str, object]:
    result = fusedisk("status", mountpoint, "--json", timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    found: dict[str, object] = json.loads(result.stdout)
    return found


def pid_of(mountpoint: Path) -> int:
    return int(str(status(mountpoint)["pid"]))


def mount_options(mountpoint: Path) -> tuple[str, set[str]]:
    """(type, superblock options) of the mount at ``mountpoint``."""
    result = run("findmnt", "-n", "-o", "FSTYPE,FS-OPTIONS", "--mountpoint", mountpoint)
    kind, options = result.stdout.split()
    return kind, set(options.split(","))


# ---- the helpers' arguments (no mount) ------------------------------------------------------


def test_mount_options() -> None:
    assert parse_options("rw,nofail,_netdev,x-systemd.requires=a.service,comment=vm") == (
        None,
        False,
    )
    assert parse_options('name="web,1.raw",allow_other,noatime') == ("web,1.raw", True)
    assert parse_options("uid=0,name=x", sloppy=True) == ("x", False)  # mount -s
    for bad, said in [
        ("uid=0", "unknown mount option 'uid=0'"),
        ("ro", "read-only"),
        ("name=a,name=b", "twice"),
        ("allow_other=1", "unknown mount option 'allow_other=1'"),
    ]:
        with pytest.raises(UsageError, match=said):
            parse_options(bad)
    with pytest.raises(UsageError, match="read-only"):
        parse_options("ro", sloppy=True)


def test_mount_helper_arguments() -> None:
    """mount(8)'s convention: IMAGE MOUNTPOINT, then flags and -o in any order."""
    assert parse_mount_args(["/i", "/m", "-v", "-o", "rw,name=n", "-t", FSTYPE]) == (
        MountRequest("/i", "/m", "n", False)
    )
    assert parse_mount_args(["-f", "/i", "/m", "-o", "allow_other"]).fake
    for argv, said in [
        (["/i"], "usage"),
        (["/i", "/m", "/x"], "usage"),
        (["/i", "/m", "-N", "1234"], "namespaces"),
        (["/i", "/m", "-q"], "option -q not recognized"),
    ]:
        with pytest.raises(UsageError, match=said):
            parse_mount_args(argv)


def test_fusedisk_tells_mount_fuse_calls_from_its_commands() -> None:
    """mount.fuse3 runs ``fusedisk IMAGE MOUNTPOINT -o OPTIONS``; a command never looks so."""
    assert "{" + ",".join(COMMANDS) + "}" in build_parser().format_usage()  # all, and only
    assert called_by_mount_fuse(["/img", "/mnt", "-o", "rw"], COMMANDS)
    assert called_by_mount_fuse(["disk.img", "mnt", "-o", "rw,name=x"], COMMANDS)
    assert not called_by_mount_fuse(["status", "/mnt", "-o", "rw"], COMMANDS)
    assert not called_by_mount_fuse(["staus", "/mnt"], COMMANDS)  # a typo stays argparse's
    assert not called_by_mount_fuse(["--debug", "status", "-o", "x"], COMMANDS)


# ---- mounting ---------------------------------------------------------------------------------


def test_fstab_line_mounts_with_mount_a_and_by_mountpoint(host: Host) -> None:
    """The README's line: ``mount -a`` and ``mount MOUNTPOINT`` mount it, and return only once
    it serves (the disk reads right after, with no wait); ``umount`` unmounts it."""
    image, data = host.disk()
    mnt = host.mountpoint()
    host.write_fstab(f"{image} {mnt} {FSTYPE} defaults,nofail 0 0")

    assert host.mount("-a") == ""
    assert (mnt / "disk.img").read_bytes() == data  # served when mount(8) returned
    assert mount_options(mnt)[0] == FSTYPE
    pid = pid_of(mnt)
    [log] = logs_of(mnt)
    text = fusedisk("status", mnt, timeout=TIMEOUT)
    assert f"log:     {runtime_dir()}/{log}" in text.stdout.splitlines(), text.stdout

    result = run("umount", mnt)
    assert result.returncode == 0, result
    wait_until(lambda: not running(pid), "the daemon to exit after umount")
    assert not is_mounted(mnt)
    assert logs_of(mnt) == set(), "a clean unmount must remove the daemon's log"

    assert host.mount(mnt) == ""  # by mountpoint, from the same line
    assert (mnt / "disk.img").read_bytes() == data


def test_command_line_mount_with_options(host: Host) -> None:
    """``mount -t fuse.fusedisk IMAGE MOUNTPOINT -o name=NAME,allow_other``; options mount(8)
    and systemd act on themselves are accepted and ignored."""
    image, data = host.disk()
    mnt = host.mountpoint()
    host.write_fstab()
    options = "name=vm.raw,allow_other,nofail,_netdev,noatime,nodev,nosuid,comment=x-vm"
    assert host.mount("-t", FSTYPE, image, mnt, "-o", options) == ""
    assert os.listdir(mnt) == ["vm.raw"]
    assert (mnt / "vm.raw").read_bytes() == data
    kind, super_options = mount_options(mnt)
    assert kind == FSTYPE and "allow_other" in super_options


def test_mount_fuse3_runs_fusedisk_from_path(host: Host) -> None:
    """Without /sbin/mount.fuse.fusedisk, mount(8) falls back to fuse3's mount.fuse, which runs
    ``fusedisk IMAGE MOUNTPOINT -o OPTIONS`` from PATH (the ``fusedisk#IMAGE`` form of type
    ``fuse`` too): run it directly, with this checkout's ``fusedisk`` on PATH."""
    image, data = host.disk()
    mnt = host.mountpoint()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = run("/sbin/mount.fuse3", f"fusedisk#{image}", mnt, "-o", "rw,nofail,name=d", env=env)
    assert result.returncode == 0 and result.stderr == "", result
    assert (mnt / "d").read_bytes() == data
    assert mount_options(mnt)[0] == FSTYPE


def test_mount_a_again_skips_what_is_mounted(host: Host) -> None:
    image, _ = host.disk()
    mnt = host.mountpoint()
    host.write_fstab(f"{image} {mnt} {FSTYPE} defaults,nofail 0 0")
    host.mount("-a")
    pid = pid_of(mnt)
    result = run("mount", "--fstab", host.fstab, "-a")
    assert pid_of(mnt) == pid
    assert result.returncode == 0 and result.stderr == "", result


# ---- unmounting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "umount", "waits"),
    [
        ("defaults,nofail", ["umount"], False),
        ("defaults,nofail", ["umount", "-c"], True),
        ("defaults,nofail,uhelper=fuse.fusedisk", ["umount"], True),
    ],
    ids=["umount", "umount-c-as-systemd-runs-it", "umount-with-uhelper"],
)
def test_umount_makes_unflushed_writes_durable(
    host: Host, options: str, umount: list[str], waits: bool
) -> None:
    """Writes never flushed survive ``umount`` and then a power cut (the image lives on
    tests/lossyfs.py, which keeps only what was fsynced).  Plain ``umount`` is the kernel's
    unmount: it returns at once, and the daemon flushes and exits 0 after.  systemd runs
    ``umount -c``, which finds the type ``fuse.fusedisk`` and runs umount.fuse.fusedisk, as a
    ``uhelper=`` option makes plain umount do: that returns only once the daemon has flushed
    and exited, so the power may go right after."""
    with lossy_mount(host.tmp / "lossy") as lossy:
        image = lossy.path / "disk.img"
        data = bytearray(os.urandom(1 << 20))
        lossy.write_durable(image, bytes(data))
        mnt = host.mountpoint()
        host.write_fstab(f"{image} {mnt} {FSTYPE} {options} 0 0")
        host.mount("-a")
        pid = pid_of(mnt)
        with open(mnt / "disk.img", "r+b") as f:
            for offset in range(4096, 1 << 20, 64 << 10):
                f.seek(offset)
                f.write(b"written, never flushed")
                data[offset : offset + 22] = b"written, never flushed"
        result = run(*umount, mnt)
        assert result.returncode == 0 and result.stderr == "", result
        if waits:
            assert not running(pid), "umount returned before the daemon was done"
        else:
            wait_until(lambda: not running(pid), "the daemon to exit after umount", TIMEOUT)
        assert not is_mounted(mnt)
        assert logs_of(mnt) == set(), "the daemon did not end cleanly: its log is kept"
        lossy.power_cut()
        assert image.read_bytes() == data


def test_umount_c_returns_only_once_the_daemon_is_done(host: Host) -> None:
    """What systemd counts on (the unit stops, then its leftover processes are killed): with a
    move to a destination that stops answering (tests/lossyfs.py, stopped), the daemon's
    fail-back waits out the destination deadline; ``umount -c`` waits for all of it."""
    image, data = host.disk(size=4 << 20)
    mnt = host.mountpoint()
    host.write_fstab(f"{image} {mnt} {FSTYPE} defaults 0 0")
    deadline = 2.0
    with lossy_mount(host.tmp / "lossy") as lossy:
        dest = lossy.mkdir("dst") / "disk.img"
        host.mount(mnt)
        pid = pid_of(mnt)
        started = fusedisk(
            "migrate", mnt, dest, "--rate", "64K", "--dest-timeout", str(deadline), "--detach"
        )
        assert started.returncode == 0, started.stderr
        wait_until(lambda: status(mnt)["phase"] == "mirroring", "the move to start")
        lossy.process.send_signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            result = run("umount", "-c", mnt)
            took = time.monotonic() - began
            done = not running(pid)
        finally:
            lossy.process.send_signal(signal.SIGCONT)
        assert result.returncode == 0, result
        assert done, f"umount -c returned after {took:.2f} s, before the daemon was done"
        assert took >= deadline / 2, took
    assert image.read_bytes() == data


@pytest.mark.parametrize("umount", [["umount"], ["umount", "-c"]], ids=["umount", "umount-c"])
def test_umount_during_a_move_fails_back(host: Host, umount: list[str]) -> None:
    image, data = host.disk(size=4 << 20)
    mnt = host.mountpoint()
    dest = host.tmp / "new" / "disk.img"
    dest.parent.mkdir()
    host.write_fstab(f"{image} {mnt} {FSTYPE} defaults 0 0")
    host.mount(mnt)
    pid = pid_of(mnt)
    started = fusedisk("migrate", mnt, dest, "--rate", "64K", "--detach", timeout=TIMEOUT)
    assert started.returncode == 0, started.stderr
    wait_until(lambda: status(mnt)["phase"] == "mirroring", "the move to start")
    with open(mnt / "disk.img", "r+b") as f:
        f.write(b"mirrored write")  # on both files: the fail-back must keep it on the source
    result = run(*umount, mnt)
    assert result.returncode == 0, result
    wait_until(lambda: not running(pid), "the daemon to exit after umount", TIMEOUT)
    assert image.read_bytes() == b"mirrored write" + data[14:]
    assert not dest.exists(), "the partial destination was left behind"
    assert not (host.tmp / ".disk.img.fusedisk-move").exists(), "the journal was left behind"
    assert logs_of(mnt) == set()


def test_umount_of_a_busy_mount_changes_nothing(host: Host) -> None:
    image, _ = host.disk()
    mnt = host.mountpoint()
    host.write_fstab(f"{image} {mnt} {FSTYPE} defaults 0 0")
    host.mount(mnt)
    pid = pid_of(mnt)
    with open(mnt / "disk.img", "rb"):
        kernel = run("umount", mnt)
        helper = run("umount", "-c", mnt)
    assert kernel.returncode != 0 and "busy" in kernel.stderr, kernel
    assert_clean_error(helper, "busy", "nothing changed")
    assert is_mounted(mnt) and running(pid)
    assert (mnt / "disk.img").exists()


def test_lazy_umount_detaches_and_the_daemon_ends_once_the_disk_is_closed(host: Host) -> None:
    """``umount -l`` (which runs the helper with ``-l``) detaches at once; the daemon serves
    the open disk until it is closed, then flushes and exits cleanly."""
    image, data = host.disk()
    mnt = host.mountpoint()
    host.write_fstab(f"{image} {mnt} {FSTYPE} defaults 0 0")
    host.mount(mnt)
    pid = pid_of(mnt)
    with open(mnt / "disk.img", "r+b") as f:
        result = run("umount", "-l", mnt)
        assert result.returncode == 0 and result.stderr == "", result
        assert not is_mounted(mnt) and running(pid)
        f.write(b"after the lazy unmount")
        f.seek(0)
        assert f.read(22) == b"after the lazy unmount"
    wait_until(lambda: not running(pid), "the daemon to exit once the disk is closed", TIMEOUT)
    assert image.read_bytes() == b"after the lazy unmount" + data[22:]
    assert logs_of(mnt) == set()


def test_killed_daemon_keeps_its_log_and_mounting_again_recovers(host: Host) -> None:
    """A daemon that dies leaves its log, and every message about its stale mount names it;
    umount clears the stale mount, and mount(8) recovers exactly as ``fusedisk mount``."""
    image, data = host.disk(size=4 << 20)
    mnt = host.mountpoint()
    dest = host.tmp / "new" / "disk.img"
    dest.parent.mkdir()
    host.write_fstab(f"{image} {mnt} {FSTYPE} defaults,nofail 0 0")
    host.mount("-a")
    started = fusedisk("migrate", mnt, dest, "--rate", "64K", "--detach", timeout=TIMEOUT)
    assert started.returncode == 0, started.stderr
    [log] = logs_of(mnt)
    log_path = os.path.join(runtime_dir(), log)
    os.kill(pid_of(mnt), signal.SIGKILL)
    wait_until(lambda: fusedisk("status", mnt).returncode != 0, "the mount to go stale")

    assert_clean_error(fusedisk("status", mnt), "stale mount", "fusedisk unmount", log_path)
    result = run("umount", mnt)
    assert result.returncode == 0, result
    assert result.stderr.splitlines() == [
        f"fusedisk: cleared the stale mount {mnt}; the log of its dead daemon is kept at {log_path}"
    ]
    assert not is_mounted(mnt) and os.path.exists(log_path)
    assert daemon_sockets(str(mnt)) == [], "the dead daemon's socket was left"

    found = host.mount(mnt)
    assert found.startswith(f"fusedisk: found an unfinished move of {image} to {dest}"), found
    assert len(found.splitlines()) == 1, found
    assert (mnt / "disk.img").read_bytes() == data


@pytest.mark.parametrize("command", ["umount -c", "fusedisk unmount"])
def test_a_daemon_that_ends_in_an_error_keeps_its_log_and_says_so(host: Host, command: str) -> None:
    """The image's filesystem dies under the daemon (tests/lossyfs.py, killed), so its final
    flush fails: the unmount still happens, the log stays, and one line says so with the
    daemon's last words.  The umount helper exits 0 all the same (the mount is gone, and
    umount(8) must drop its utab entry); ``fusedisk unmount`` exits 1."""
    with lossy_mount(host.tmp / "lossy") as lossy:
        image = lossy.path / "disk.img"
        random_image(image, 1 << 20)
        mnt = host.mountpoint()
        host.write_fstab(f"{image} {mnt} {FSTYPE} defaults 0 0")
        host.mount(mnt)
        [log] = logs_of(mnt)
        log_path = os.path.join(runtime_dir(), log)
        lossy.kill()
        # The mount lives on: its directory and status answer, the status names the failure.
        assert os.stat(mnt).st_uid == os.getuid()
        status = json.loads(Path(mnt, ".status").read_text())
        assert f"stat of {image} failed" in status["io_error"], status
        shown = fusedisk("status", mnt, timeout=TIMEOUT)  # the daemon lives on: not stale
        assert shown.returncode == 0, shown.stderr
        assert f"image:   {image} (size unknown: stat of {image} failed" in shown.stdout
        if command == "umount -c":
            result = run("umount", "-c", mnt)
            assert result.returncode == 0, result
            [line] = result.stderr.splitlines()
        else:
            line = assert_clean_error(fusedisk("unmount", mnt, timeout=TIMEOUT))
        assert line.startswith(f"fusedisk: unmounted {mnt}, but its daemon ended in an error: ")
        assert f"the final flush of {image} failed" in line, line
        assert line.endswith(f"; its log is kept at {log_path}"), line
        assert not is_mounted(mnt) and os.path.exists(log_path)


# ---- logs -------------------------------------------------------------------------------------


def test_under_systemd_the_daemon_logs_to_the_journal(host: Host) -> None:
    """With stderr the stream ``JOURNAL_STREAM`` names (a file here, standing in for journald's
    socket), the daemon logs there, and no log file is made."""
    image, _ = host.disk()
    mnt = host.mountpoint()
    host.write_fstab(f"{image} {mnt} {FSTYPE} defaults,nofail 0 0")
    journal = host.tmp / "journal"
    with open(journal, "wb") as stream:
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        result = subprocess.run(
            ["mount", "--fstab", str(host.fstab), "-a"],
            stdout=stream,
            stderr=stream,
            env=env,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 0, journal.read_text()
    assert logs_of(mnt) == set()
    assert f"INFO fusedisk.daemon: serving {image} at {mnt}/disk.img" in journal.read_text()
    assert run("umount", "-c", mnt).returncode == 0
    assert f"INFO fusedisk.daemon: flushed {image}" in journal.read_text()


def test_log_is_capped_while_the_daemon_runs(host: Host) -> None:
    """At the cap the log rotates: one current file and one older, each under the cap (plus a
    record), and the daemon's own stderr follows the current one."""
    image, _ = host.disk()
    mnt = host.mountpoint()
    host.write_fstab(f"{image} {mnt} {FSTYPE} defaults 0 0")
    cap = 1024
    host.mount(mnt, env={**os.environ, "FUSEDISK_LOG_MAX_BYTES": str(cap)})
    pid = pid_of(mnt)
    dest = host.tmp / "dest.img"
    for _ in range(6):  # each move that starts and is cancelled logs a few lines
        started = fusedisk("migrate", mnt, dest, "--rate", "64K", "--detach", timeout=TIMEOUT)
        assert started.returncode == 0, started.stderr
        assert fusedisk("cancel", mnt, timeout=TIMEOUT).returncode == 0
    [current] = [name for name in logs_of(mnt) if name.endswith(".log")]
    assert logs_of(mnt) == {current, current + ".1"}
    for name in logs_of(mnt):
        size = os.path.getsize(os.path.join(runtime_dir(), name))
        assert 0 < size <= cap + 300, (name, size)
    assert os.readlink(f"/proc/{pid}/fd/2") == os.path.join(runtime_dir(), current)
    assert "failed back: cancelled" in Path(runtime_dir(), current).read_text()
    assert run("umount", "-c", mnt).returncode == 0
    assert logs_of(mnt) == set(), "a clean unmount removes the rotated log too"


# ---- bad input --------------------------------------------------------------------------------


@dataclass
class Bad:
    line: str  # the fstab line
    expect: str  # a fragment of the one error line
    status: int = 32  # the helper's, which mount(8) returns: 1 a bad invocation, 32 a failure


def _bad_cases(image: Path, mnt: Path, tmp: Path) -> dict[str, Bad]:
    return {
        "unknown option": Bad(f"{image} {mnt} {FSTYPE} defaults,uid=1000 0 0", "'uid=1000'", 1),
        "read-only": Bad(f"{image} {mnt} {FSTYPE} ro 0 0", "read-only", 1),
        "missing image": Bad(f"{tmp}/gone.img {mnt} {FSTYPE} defaults,nofail 0 0", "not exist"),
        "missing mountpoint": Bad(f"{image} {tmp}/nowhere {FSTYPE} nofail 0 0", "not exist"),
        "name with a slash": Bad(f"{image} {mnt} {FSTYPE} name=a/b 0 0", "plain file name"),
    }


BAD = list(_bad_cases(Path("i"), Path("m"), Path("t")))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_mounts_nothing(host: Host, case: str) -> None:
    image, _ = host.disk()
    mnt = host.mountpoint()
    bad = _bad_cases(image, mnt, host.tmp)[case]
    host.write_fstab(bad.line)
    before = snapshot(host.tmp, image, mnt)
    for argv in (["-a"], [bad.line.split()[1]]):
        result = run("mount", "--fstab", host.fstab, *argv)
        assert_clean_error(result, bad.expect)
        assert result.returncode == (32 if argv == ["-a"] else bad.status), result  # -a: any
        assert snapshot(host.tmp, image, mnt) == before
        assert logs_of(mnt) == set() and daemon_pids(host.tmp) == []


def test_second_mount_of_the_same_image_is_refused(host: Host) -> None:
    """Elsewhere (the image's lock refuses it) and at the same mountpoint again."""
    image, data = host.disk()
    first, second = host.mountpoint("first"), host.mountpoint("second")
    host.write_fstab(
        f"{image} {first} {FSTYPE} defaults,nofail 0 0",
        f"{image} {second} {FSTYPE} defaults,nofail 0 0",
    )
    host.mount(first)
    pid = pid_of(first)
    before = snapshot(host.tmp, image, first, second)
    assert_clean_error(run("mount", "--fstab", host.fstab, second), "already served")
    assert_clean_error(
        run("mount", "-t", FSTYPE, image, first), f"mountpoint {first} is already a mount point"
    )
    assert snapshot(host.tmp, image, first, second) == before
    assert not is_mounted(second) and pid_of(first) == pid
    assert logs_of(second) == set() and len(logs_of(first)) == 1
    assert (first / "disk.img").read_bytes() == data
