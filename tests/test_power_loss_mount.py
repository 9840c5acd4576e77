"""Power loss through the real mount: the image and the destination live on tests/lossyfs.py.

test_crash.py kills the daemon, which keeps the page cache: it proves the order of the steps,
not that each one is durable (DESIGN.md, "Crash-consistent").  Here the backing files live on a
layer that keeps only what was fsynced (data) and what a directory fsync made durable (names),
and a test cuts its power after the daemon is gone: what fusedisk did not make durable is lost,
as on a real machine.  Each test writes unique 4 KiB patterns through the fusedisk mount
(test_crash's writer and checks), then:

- unmount path: writes never fsynced, a clean ``fusedisk unmount``, a cut: every write is there
  (the daemon's final fsync at unmount);
- flush path: writes each fsynced, on an idle disk and during a slow move, SIGKILL, a cut,
  ``fusedisk mount`` of the original path: every fsynced write is there (Disk.flush);
- switch path: a move under a writer that fsyncs, run to ``done``, SIGKILL, a cut, ``fusedisk
  mount`` of the destination (after a finished move the source path is gone: the user mounts
  where the disk went): every flushed write and every copied byte is there, the source is gone
  (unless --keep-source) and nothing of the move is left (move._switch, Storage).

Every move passes ``--dest-timeout`` with a generous deadline: the destination is a FUSE
filesystem (so fusedisk gives it worker threads and a deadline), served in Python on two shared
cores, and a slow answer must not fail the move back and turn the test into a no-op.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fusedisk.backend import WRITEBACK_LAG
from fusedisk.storage import marker_path
from tests.lossy import Lossy, lossy_mount
from tests.mounting import mounted, wait_mounted
from tests.test_crash import (
    BLOCK,
    CRASH_ENV,
    HOT_BLOCKS,
    TIMEOUT,
    AfterKill,
    Layout,
    Writer,
    WriterLog,
    check_blocks,
    check_recovery,
    clean_env,
    clear_mount,
    cli,
    is_mounted,
    pattern,
    stop,
    wait_for,
)

pytestmark = pytest.mark.mount

# Below WRITEBACK_LAG: the copier then never flushes a threaded (FUSE) destination itself, so
# after the writer's last fsync only the switch's own flushes can make the copy durable.
IMAGE_SIZE = 4 << 20
assert IMAGE_SIZE < WRITEBACK_LAG
BLOCKS = IMAGE_SIZE // BLOCK
FLUSHES = 100  # flushed writes a test waits for before each next step
DEST_TIMEOUT = "10"  # seconds: see the module docstring


@pytest.fixture
def lossy(tmp_path: Path) -> Iterator[Lossy]:
    with lossy_mount(tmp_path / "lossy") as layer:
        yield layer


class LossyLayout(Layout):
    """test_crash's Layout (so its recovery checks apply as they are), with the source image in
    ``src/`` and the destination in ``dst/`` on the lossy layer, all durable from the start.
    The mountpoint and the daemon's log stay on local disk."""

    def __init__(self, tmp: Path, lossy: Lossy, seed: int = 1) -> None:  # not Layout's files
        self.tmp = lossy.mkdir("src")
        self.image = self.tmp / "disk.img"
        self.dest = lossy.mkdir("dst") / "moved.img"
        self.mountpoint = tmp / "mnt"
        self.mountpoint.mkdir()
        self.daemon_log = tmp / "daemon.log"
        self.journal = self.tmp / ".disk.img.fusedisk-move"
        self.original = random.Random(seed).randbytes(IMAGE_SIZE)
        lossy.write_durable(self.image, self.original)


# ---- a daemon under a writer, killed ------------------------------------------------------


@contextmanager
def served_under_writer(
    layout: Layout, seed: int, crash_at: str | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], Writer]]:
    """A foreground daemon serving the image (dying at failpoint ``crash_at``, if given) and
    test_crash's writer (write, fsync, log) on it; whatever happens, the daemon is dead, the
    writer stopped and the mount gone after."""
    command = [sys.executable, "-m", "fusedisk", "mount", "--foreground"]
    command += [str(layout.image), str(layout.mountpoint)]
    env = clean_env()
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    with open(layout.daemon_log, "ab") as log_file:
        daemon = subprocess.Popen(command, stdout=log_file, stderr=log_file, env=env)
    writer: Writer | None = None
    try:
        wait_mounted(layout.mountpoint, daemon, layout.daemon_log)
        writer = Writer(layout.mountpoint / layout.image.name, BLOCKS, seed)
        yield daemon, writer
    finally:
        stop(daemon)  # first: a writer blocked on a live mount then fails and ends
        if writer is not None:
            writer.stop()
        clear_mount(layout.mountpoint)


def liveness(
    daemon: subprocess.Popen[bytes], writer: Writer, layout: Layout
) -> Callable[[], str | None]:
    def alive() -> str | None:
        if daemon.poll() is not None:
            return f"daemon exited {daemon.returncode}:\n{layout.daemon_log.read_text()}"
        if not writer.running:
            return f"writer stopped: {writer.log.error}"
        return None

    return alive


def status(layout: Layout) -> dict[str, Any]:
    """The live status, from the mount's status file (no CLI process per poll)."""
    reply: dict[str, Any] = json.loads((layout.mountpoint / ".status").read_text())
    return reply


def wait_flushes(
    daemon: subprocess.Popen[bytes], writer: Writer, layout: Layout, more: int
) -> None:
    target = writer.log.flushes + more
    wait_for(
        lambda: writer.log.flushes >= target,
        f"{target} flushed writes",
        liveness(daemon, writer, layout),
    )


def start_move(layout: Layout, rate: str, *extra: str) -> None:
    args: list[str | Path] = ["migrate", layout.mountpoint, layout.dest, "--detach", "--rate", rate]
    result = cli(*args, "--dest-timeout", DEST_TIMEOUT, *extra)
    assert result.returncode == 0, result.stderr


def kill(daemon: subprocess.Popen[bytes], writer: Writer, layout: Layout, what: str) -> None:
    """SIGKILL the daemon (unless a failpoint did), let the writer fail on the dead mount,
    clear the stale mount."""
    if daemon.poll() is None:
        os.kill(daemon.pid, signal.SIGKILL)
    assert daemon.wait(timeout=TIMEOUT) == -signal.SIGKILL, what
    if writer.running:
        assert writer.wait_stopped(TIMEOUT), f"{what}: the writer hangs on the dead mount"
        error = str(writer.log.error)
        assert error.startswith(("ENOTCONN", "ECONNABORTED")), f"{what}: writer error {error}"
    result = cli("unmount", layout.mountpoint)
    assert result.returncode == 0, f"{what}: unmount of the stale mount: {result.stderr}"
    assert not is_mounted(layout.mountpoint), what


def after_power_cut(lossy: Lossy, layout: Layout, log: WriterLog) -> AfterKill:
    """Cut the power; what is left on the layer, read before anything else touches it."""
    lossy.power_cut()
    return AfterKill(
        journal=json.loads(layout.journal.read_text()) if layout.journal.exists() else None,
        source_exists=layout.image.exists(),
        dest_exists=layout.dest.exists(),
        log=log,
        daemon_log=layout.daemon_log.read_text(),
    )


# ---- the layer itself ---------------------------------------------------------------------


def test_lossyfs_keeps_only_what_was_made_durable(lossy: Lossy) -> None:
    """The layer every other test relies on: a cut loses exactly what was never made durable."""
    top = lossy.mkdir("d")
    kept, gone, unlinked = top / "kept", top / "gone", top / "unlinked"
    lossy.write_durable(kept, b"A" * 5000)
    lossy.write_durable(unlinked, b"U" * 10)
    fd = os.open(gone, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"G")
    os.fsync(fd)  # data durable, but its name is not: it must vanish
    os.close(fd)
    st = gone.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (os.getuid(), 0o600)  # fusedisk checks these
    fd = os.open(kept, os.O_RDWR)
    os.pwrite(fd, b"B" * 4096, 4096)  # never fsynced
    os.ftruncate(fd, 9000)
    os.fchmod(fd, 0o640)
    unlinked.unlink()
    os.replace(top / "kept", top / "renamed")  # never made durable either
    lossy.power_cut()
    assert sorted(os.listdir(top)) == ["kept", "unlinked"]
    assert kept.read_bytes() == b"A" * 5000 and kept.stat().st_mode & 0o777 == 0o644
    assert unlinked.read_bytes() == b"U" * 10
    with pytest.raises(OSError) as failed:
        os.pread(fd, 1, 0)
    assert failed.value.errno == errno.EIO  # a handle from before the cut
    with pytest.raises(OSError):
        os.close(fd)
    fd = os.open(kept, os.O_RDWR)  # after the cut: a working file again
    try:
        os.pwrite(fd, b"C", 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    lossy.power_cut()
    assert kept.read_bytes() == b"C" + b"A" * 4999


# ---- the unmount path ---------------------------------------------------------------------


def test_unmount_makes_unflushed_writes_durable(tmp_path: Path, lossy: Lossy) -> None:
    """Writes the guest never flushed survive a clean unmount and then a power cut: the
    daemon's final fsync (daemon.serve) made them durable."""
    layout = LossyLayout(tmp_path, lossy)
    rng = random.Random(0)
    log = WriterLog()
    with mounted(layout.image, layout.mountpoint) as m:
        fd = os.open(m.file, os.O_RDWR)
        try:
            for seq in range(1, 257):
                block = rng.randrange(HOT_BLOCKS if rng.random() < 0.5 else BLOCKS)
                log.started(block, seq)
                assert os.pwrite(fd, pattern(block, seq), block * BLOCK) == BLOCK
                log.flushed_write(block, seq)  # not flushed: the unmount must make it durable
        finally:
            os.close(fd)
        result = cli("unmount", m.mountpoint)
        assert result.returncode == 0, result.stderr
        assert m.daemon.wait(timeout=TIMEOUT) == 0, m.log.read_text()
    lossy.power_cut()
    what = "cleanly unmounted, then the power cut"
    check_blocks(layout.image.read_bytes(), layout.original, log, what)


# ---- the flush path -----------------------------------------------------------------------


def test_flushed_writes_on_an_idle_disk_survive_power_cut(tmp_path: Path, lossy: Lossy) -> None:
    layout = LossyLayout(tmp_path, lossy)
    what = "idle disk: SIGKILL, then the power cut"
    with served_under_writer(layout, seed=1) as (daemon, writer):
        wait_flushes(daemon, writer, layout, FLUSHES)
        kill(daemon, writer, layout, what)
    after = after_power_cut(lossy, layout, writer.log)
    assert after.journal is None and after.source_exists and not after.dest_exists, after
    with mounted(layout.image, layout.mountpoint) as m:
        check_blocks(m.file.read_bytes(), layout.original, writer.log, what)


def test_flushed_writes_during_a_move_survive_power_cut(tmp_path: Path, lossy: Lossy) -> None:
    """Killed while mirroring, then the power cut: the durable journal says the source is the
    truth, and the source holds every flushed write (the destination's flushes cannot help).
    Mounting it removes the partial destination and the journal, durably: a second cut after
    that leaves the source alone."""
    layout = LossyLayout(tmp_path, lossy)
    what = "mirroring: SIGKILL, then the power cut"
    with served_under_writer(layout, seed=2) as (daemon, writer):
        wait_flushes(daemon, writer, layout, FLUSHES // 4)
        start_move(layout, "1M")  # 4 s for the pass: still mirroring at the kill
        wait_flushes(daemon, writer, layout, FLUSHES)
        facts = status(layout)
        assert facts["phase"] == "mirroring" and facts["mirrored_bytes"] > 0, facts
        kill(daemon, writer, layout, what)
    after = after_power_cut(lossy, layout, writer.log)
    assert after.phase == "mirroring" and after.source_exists and after.dest_exists, after
    assert check_recovery(layout, after, keep_source=False, what=what) == "source"
    lossy.power_cut()  # recovery removed the partial destination: durably?
    left = sorted(os.listdir(layout.tmp)) + sorted(os.listdir(layout.dest.parent))
    assert left == [layout.image.name], f"{what}, recovery, a second cut: left {left}"


# ---- the switch path ----------------------------------------------------------------------


@pytest.mark.parametrize("keep_source", [False, True], ids=["delete-source", "keep-source"])
def test_finished_move_survives_power_cut(tmp_path: Path, lossy: Lossy, keep_source: bool) -> None:
    """A move under a writer that fsyncs runs to done; SIGKILL, the power cut; the user mounts
    the destination: it holds every flushed write and every byte the pass copied, and nothing of
    the move is left over (journal, partial marker; the source unless kept).

    The writer stops before the pass ends, so no guest flush after it makes the last copied
    chunks durable: only the switch's own flushes of the destination can."""
    layout = LossyLayout(tmp_path, lossy)
    what = f"done (keep_source={keep_source}): SIGKILL, then the power cut"
    with served_under_writer(layout, seed=3) as (daemon, writer):
        wait_flushes(daemon, writer, layout, FLUSHES // 4)
        start_move(layout, "2M", *(["--keep-source"] if keep_source else []))
        wait_flushes(daemon, writer, layout, FLUSHES)
        writer.stop()
        assert writer.log.error is None, writer.log.error
        facts = status(layout)
        assert facts["phase"] == "mirroring", f"{what}: the pass ended under the writer: {facts}"
        assert cli("rate", layout.mountpoint, "0").returncode == 0  # now finish it at once
        deadline = time.monotonic() + TIMEOUT
        while (facts := status(layout))["phase"] not in ("done", "failed"):
            assert time.monotonic() < deadline, f"{what}: {facts}"
            time.sleep(0.02)
        assert facts["phase"] == "done" and facts["error"] is None, facts
        kill(daemon, writer, layout, what)
    after = after_power_cut(lossy, layout, writer.log)
    assert after.journal is None, f"{what}: the finished move's journal came back: {after}"
    assert after.dest_exists and after.source_exists == keep_source, f"{what}: {after}"
    # As a user would: mount the destination (a marker that came back makes this refuse).
    assert check_recovery(layout, after, keep_source=keep_source, what=what) == "dest"
    marker = Path(marker_path(str(layout.dest)))
    assert not marker.exists(), f"{what}: the partial marker {marker} is still there"
    if keep_source:  # kept as it was at the switch: every write flushed before it
        check_blocks(layout.image.read_bytes(), layout.original, writer.log, f"{what}: source")


def test_recovery_after_a_power_cut_at_the_switch_is_durable(tmp_path: Path, lossy: Lossy) -> None:
    """Killed just after the switch record (failpoint switch-recorded), the power cut; mounting
    the original path finishes the move (serves the destination, deletes the source, drops the
    marker and the journal); a second power cut after that must find the same: recovery's own
    steps are durable, and the destination still mounts with every flushed write."""
    layout = LossyLayout(tmp_path, lossy)
    what = "killed at switch-recorded, then the power cut"
    with served_under_writer(layout, seed=4, crash_at="switch-recorded") as (daemon, writer):
        wait_flushes(daemon, writer, layout, FLUSHES // 4)
        start_move(layout, "0")
        try:
            daemon.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{what}: the daemon did not die at the failpoint") from None
        kill(daemon, writer, layout, what)
    after = after_power_cut(lossy, layout, writer.log)
    assert after.phase == "switched" and after.source_exists and after.dest_exists, after
    assert check_recovery(layout, after, keep_source=False, what=what) == "dest"
    lossy.power_cut()
    what = f"{what}, recovery, then a second power cut"
    with mounted(layout.dest, layout.mountpoint) as m:  # a marker that came back refuses this
        check_blocks(m.file.read_bytes(), layout.original, writer.log, what)
    left = sorted(os.listdir(layout.tmp)) + sorted(os.listdir(layout.dest.parent))
    assert left == [layout.dest.name], f"{what}: left on the layer: {left}"


def test_a_sigterm_during_the_final_flush_does_not_cut_it_short(
    tmp_path: Path, lossy: Lossy
) -> None:
    """systemd sends SIGTERM right after a plain umount of a mount unit, while the daemon may
    still be flushing the image: the flush completes, the daemon exits cleanly, the writes are
    durable.  The image's filesystem is stopped meanwhile, so the flush is surely under way."""
    layout = LossyLayout(tmp_path, lossy)
    command = [sys.executable, "-m", "fusedisk", "mount", "--foreground"]
    command += [str(layout.image), str(layout.mountpoint)]
    with open(layout.daemon_log, "ab") as log_file:
        daemon = subprocess.Popen(command, stdout=log_file, stderr=log_file, env=clean_env())
    try:
        wait_mounted(layout.mountpoint, daemon, layout.daemon_log)
        written = pattern(1, 0)
        fd = os.open(layout.mountpoint / layout.image.name, os.O_WRONLY)
        try:
            os.pwrite(fd, written, 0)  # never fsynced: only the final flush saves it
        finally:
            os.close(fd)
        lossy.process.send_signal(signal.SIGSTOP)
        try:
            subprocess.run(["fusermount3", "-u", str(layout.mountpoint)], check=True)
            time.sleep(0.5)  # the daemon is in its final fsync, which waits for the image
            daemon.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert daemon.poll() is None, "a SIGTERM cut the final flush short"
        finally:
            lossy.process.send_signal(signal.SIGCONT)
        assert daemon.wait(TIMEOUT) == 0, layout.daemon_log.read_text()
    finally:
        stop(daemon)
        clear_mount(layout.mountpoint)
    lossy.power_cut()
    assert layout.image.read_bytes()[:BLOCK] == written
