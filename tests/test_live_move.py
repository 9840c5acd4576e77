"""Live moves through a real FUSE mount, driven by the CLI exactly as a user would (tier 4).

Each test serves an image with a real daemon (``tests.mounting.mounted``), writes through the
mount while ``fusedisk migrate`` runs, and checks the invariants of DESIGN.md on real files: the
data equals a model on the file the mount now serves *and* on the backing file, the source is
deleted only after the switch, a fail-back leaves the source serving with every guest write in it,
and the counters account for every byte exactly once.

Timing without sleeps: a move is started with a low ``--rate`` so that it cannot finish while the
test does its writes, and is then released with ``fusedisk rate MOUNT 0``.  Every wait polls a
condition with a deadline.  Reads that must reach the daemon use O_DIRECT (the mount keeps the
kernel page cache across opens, so a buffered read could be answered from the cache).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fusedisk.control import request
from fusedisk.errors import FusediskError
from tests.mounting import Mounted, fusedisk, mounted, random_image

pytestmark = pytest.mark.mount

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4096
CLI_TIMEOUT = 60.0
MOVE_TIMEOUT = 60.0
TERMINAL = ("done", "failed", "cancelled")
SLOW_RATE = 256 * KiB  # no test image is copied at this --rate before the test releases it
SLOW = str(SLOW_RATE)


# ---- helpers ------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], bool], what: str, timeout: float = 30.0, alive: Mounted | None = None
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s (or if the daemon died)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        if alive is not None:
            assert alive.daemon.poll() is None, f"daemon died:\n{alive.log.read_text()}"
        time.sleep(0.02)


def wait_status(
    m: Mounted, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 30.0
) -> dict[str, Any]:
    """Poll ``fusedisk status`` until ``condition`` holds for it; return that status."""
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = [m.status()]
        return condition(found[0])

    wait_until(check, what, timeout, alive=m)
    return found[0]


def migrate(m: Mounted, dest: Path, *extra: str) -> dict[str, Any]:
    """Start a move with ``--detach --json``; return the status the command printed."""
    result = fusedisk("migrate", m.mountpoint, dest, "--detach", "--json", *extra, timeout=60)
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    assert status["phase"] == "mirroring", status
    return status


def migrate_waiting(m: Mounted, dest: Path, *extra: str) -> subprocess.Popen[str]:
    """``fusedisk migrate`` without --detach, in the background: it returns when the move ends."""
    return subprocess.Popen(
        [sys.executable, "-m", "fusedisk", "migrate", m.mountpoint, dest, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def set_rate(m: Mounted, rate: str) -> None:
    result = fusedisk("rate", m.mountpoint, rate, timeout=CLI_TIMEOUT)
    assert result.returncode == 0, result.stderr


def finish(m: Mounted) -> dict[str, Any]:
    """Lift the rate limit of the running move (unless it has just ended) and wait for it to
    end."""
    result = fusedisk("rate", m.mountpoint, "0", timeout=CLI_TIMEOUT)
    assert result.returncode == 0 or "no move is running" in result.stderr, result.stderr
    return m.wait_phase(*TERMINAL, timeout=MOVE_TIMEOUT)


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer, as O_DIRECT needs."""
    return mmap.mmap(-1, max(size, PAGE))


def read_direct(path: Path) -> bytes:
    """The whole file read with O_DIRECT: through a mount, the daemon answers, not the cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        size = os.fstat(fd).st_size
        buf = aligned_buffer(MiB)
        parts = []
        offset = 0
        while offset < size:
            n = os.preadv(fd, [buf], offset)
            assert n > 0, f"short read at {offset} of {size}"
            parts.append(bytes(buf[:n]))
            offset += n
        return b"".join(parts)[:size]
    finally:
        os.close(fd)


def write_direct(path: Path, offset: int, data: bytes) -> None:
    """One aligned O_DIRECT write (``offset`` and ``len(data)`` multiples of 4 KiB)."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = aligned_buffer(len(data))
        buf[: len(data)] = data
        assert os.pwritev(fd, [memoryview(buf)[: len(data)]], offset) == len(data)
    finally:
        os.close(fd)


def assert_same(actual: bytes, expected: bytes | bytearray, what: str) -> None:
    """Compare without printing megabytes: name the first differing offset."""
    if actual == expected:
        return
    assert len(actual) == len(expected), f"{what}: size {len(actual)}, expected {len(expected)}"
    first = next(i for i, (a, b) in enumerate(zip(actual, expected, strict=True)) if a != b)
    raise AssertionError(f"{what}: differs from the model first at offset {first}")


def journal(image: Path) -> Path:
    return image.parent / f".{image.name}.fusedisk-move"


def assert_moved(m: Mounted, status: dict[str, Any], source: Path, dest: Path) -> None:
    """The move ended as DESIGN.md step 5 says: serving the destination, source deleted."""
    assert status["phase"] == "done", status
    assert status["error"] is None, status
    assert status["image"] == str(dest) and status["destination"] == str(dest), status
    assert status["source"] == str(source), status
    assert isinstance(status["switch_pause_ms"], int | float), status
    assert not source.exists(), "the source survived a move without --keep-source"
    assert dest.is_file()
    assert not journal(source).exists() and not journal(dest).exists()


def one_error_line(stderr: str) -> str:
    """The single ``fusedisk: `` line of a failed command (progress lines may precede it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("fusedisk: ")]
    assert len(lines) == 1, stderr
    assert stderr.rstrip("\n").endswith(lines[0]), f"the error is not the last line: {stderr}"
    return lines[0]


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs at ``path`` (created), always unmounted afterwards."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True, timeout=30)
    try:
        yield path
    finally:
        umount(path)


@contextmanager
def read_only_bind(source: Path, path: Path) -> Iterator[Path]:
    """``source`` bind-mounted read-only at ``path``, always unmounted afterwards."""
    path.mkdir()
    subprocess.run(["mount", "--bind", source, path], check=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", path], check=True, timeout=30)
        yield path
    finally:
        umount(path)


def umount(path: Path) -> None:
    if subprocess.run(["umount", path], capture_output=True, timeout=30).returncode:
        subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


def fill(directory: Path) -> None:
    """Fill the filesystem of ``directory`` to the last byte with a file of its own."""
    chunk = b"\xee" * MiB
    with open(directory / "filler", "wb", buffering=0) as f:
        while True:
            try:
                written = f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return
            if written is not None and 0 < written < len(chunk):
                chunk = chunk[written:]


class Writer(threading.Thread):
    """A guest stand-in: seeded writes at random offsets through the mount, in a thread.

    Each write that returned is applied to ``model``; an error is recorded and ends the thread
    (the test asserts ``errors == []``).  ``limit`` ends it after that many writes.  Writes are
    of random length (1 byte to ``max_length``, unaligned unless ``direct``), with an fsync every
    ``fsync_every`` writes, paced by ``pause`` seconds so the daemon keeps CPU for the copier.
    """

    def __init__(
        self,
        path: Path,
        model: bytearray,
        *,
        seed: int,
        limit: int | None = None,
        max_length: int = 256 * KiB,
        region: tuple[int, int] | None = None,
        direct: bool = False,
        fsync_every: int = 8,
        pause: float = 0.002,
    ) -> None:
        super().__init__(name=f"writer-{seed}", daemon=True)
        self.path, self.model = path, model
        self.rng = random.Random(seed)
        self.limit, self.max_length, self.direct = limit, max_length, direct
        self.region = region or (0, len(model))
        self.fsync_every, self.pause = fsync_every, pause
        self.writes = 0
        self.errors: list[str] = []
        self.worst_write = self.worst_fsync = 0.0  # seconds: the longest a guest call waited
        self._stop_asked = threading.Event()
        self._progress = threading.Condition()

    def _next(self) -> tuple[int, bytes]:
        start, end = self.region
        if self.direct:
            length = self.rng.randrange(1, self.max_length // PAGE + 1) * PAGE
            offset = self.rng.randrange(start // PAGE, (end - length) // PAGE + 1) * PAGE
        else:
            length = self.rng.randint(1, self.max_length)
            offset = self.rng.randrange(start, end - length + 1)
        return offset, self.rng.randbytes(length)

    def run(self) -> None:
        flags = os.O_RDWR | (os.O_DIRECT if self.direct else 0)
        try:
            fd = os.open(self.path, flags)
        except OSError as e:
            self.errors.append(f"open: {e}")
            return
        buf = aligned_buffer(self.max_length)
        try:
            while not self._stop_asked.is_set() and self.writes != self.limit:
                offset, data = self._next()
                started = time.monotonic()
                if self.direct:
                    buf[: len(data)] = data
                    done = os.pwritev(fd, [memoryview(buf)[: len(data)]], offset)
                else:
                    done = os.pwrite(fd, data, offset)
                self.worst_write = max(self.worst_write, time.monotonic() - started)
                if done != len(data):
                    self.errors.append(f"short write at {offset}: {done} of {len(data)}")
                    return
                self.model[offset : offset + len(data)] = data
                if (self.writes + 1) % self.fsync_every == 0:
                    started = time.monotonic()
                    os.fsync(fd)
                    self.worst_fsync = max(self.worst_fsync, time.monotonic() - started)
                with self._progress:
                    self.writes += 1
                    self._progress.notify_all()
                self._stop_asked.wait(self.pause)
            os.fsync(fd)
        except OSError as e:
            self.errors.append(f"write #{self.writes}: {e}")
        finally:
            os.close(fd)
            with self._progress:
                self._progress.notify_all()

    def wait_writes(self, count: int, timeout: float = 30.0) -> None:
        """Block until ``count`` writes returned (failing on a writer error or the timeout)."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while self.writes < count:
                assert not self.errors, self.errors
                assert self.is_alive(), f"writer ended after {self.writes} writes"
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"only {self.writes} of {count} writes in {timeout} s"
                self._progress.wait(min(remaining, 0.5))

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_asked.set()
        self.join(timeout)


@contextmanager
def writing(writer: Writer) -> Iterator[Writer]:
    """Run ``writer`` for the block; stop and join it after (without hiding the block's error)."""
    writer.start()
    try:
        yield writer
    except BaseException:
        writer.stop()
        raise
    writer.stop()
    assert not writer.is_alive(), "the writer is still blocked in a write after 30 s"


def image_pair(tmp_path: Path, size: int, seed: int = 1) -> tuple[Path, bytearray]:
    """A seeded, fully allocated image in tmp_path/src; returns its path and a model of it."""
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    image = tmp_path / "src" / "disk.img"
    return image, bytearray(random_image(image, size, seed=seed))


def assert_serving(m: Mounted, model: bytearray | bytes, backing: Path) -> None:
    """The mount answers ``model`` (read by the daemon, not from cache), from ``backing``."""
    status = m.status()
    assert status["image"] == str(backing), status
    assert_same(read_direct(m.file), model, "the mount")
    assert_same(backing.read_bytes(), model, f"the backing file {backing}")


# ---- a whole move under fio ---------------------------------------------------------------

FIO_JOB = (
    "--name=w --rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=8"
    " --verify=crc32c --do_verify=1 --verify_fatal=1 --time_based=0"
)


def test_fio_verified_writes_across_a_whole_move(tmp_path: Path) -> None:
    """fio writes with crc32c verification while the disk moves, switch included.

    The move is throttled until fio has had 8 MiB of writes mirrored, then released; fio runs two
    write+verify loops over the whole disk, so it is still running when the move is done: its
    later writes and its verify reads are served by the destination.  A second fio run,
    ``--verify_only``, then rereads every block fio wrote, from the destination.
    """
    size = 32 * MiB
    source, _ = image_pair(tmp_path, size)
    dest = tmp_path / "dst" / "disk.img"
    with mounted(source, tmp_path / "mnt") as m:
        fio = ["fio", f"--filename={m.file}", f"--size={size}", *FIO_JOB.split()]
        # Paced, so that fio has not rewritten the whole disk (which the pass then skips, not
        # throttled) before the test sees the move under way.
        paced = ["--rate_iops=1000"]
        out = tmp_path / "fio.out"
        with open(out, "wb") as log:
            writer = subprocess.Popen(
                [*fio, *paced, "--loops=2"], stdout=log, stderr=log, cwd=tmp_path
            )
        try:
            migrate(m, dest, "--rate", "2M")
            during = wait_status(
                m,
                lambda s: (
                    s["mirrored_bytes"] >= 8 * MiB
                    or s["phase"] != "mirroring"
                    or writer.poll() is not None
                ),
                "fio to have 8 MiB of writes mirrored",
            )
            assert during["phase"] == "mirroring", f"the move ended too soon: {during}"
            assert writer.poll() is None, f"fio ended before the move:\n{out.read_text()}"
            status = finish(m)
            assert writer.poll() is None, f"fio ended with the move:\n{out.read_text()}"
            assert writer.wait(timeout=180) == 0, out.read_text()
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        report = out.read_text()
        assert "err= 0" in report and "verify:" not in report, report
        assert_moved(m, status, source, dest)
        assert status["mirrored_bytes"] >= 8 * MiB
        # Every destination has the deadline by default, its writes on the native thread; on a
        # local filesystem the copier's writeback keeps it flushed, so no flushes of its own.
        facts = (status["dest_timeout"], status["dest_writes"], status["flush_while_copying"])
        assert facts == (1.0, "native thread", False), status

        again = subprocess.run(
            [*fio, "--verify_only"], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert again.returncode == 0 and "err= 0" in again.stdout, again.stdout + again.stderr
        assert m.status()["image"] == str(dest)
        assert subprocess.run(["cmp", m.file, dest], timeout=60).returncode == 0
        assert_same(read_direct(m.file), dest.read_bytes(), "the mount against the destination")


# ---- moves back and forth -----------------------------------------------------------------


def test_moves_back_and_forth_with_writes_during_and_between(tmp_path: Path) -> None:
    """A→B→A→B: writes while each move mirrors (and across two of the switches), writes between
    moves; after each move the data equals the model on the mount and on the new file; the last
    move keeps its source (--keep-source), which then holds the data as of the switch."""
    size = 16 * MiB
    a, model = image_pair(tmp_path, size)
    b = tmp_path / "dst" / "disk.img"
    with mounted(a, tmp_path / "mnt") as m:
        for hop, (source, dest) in enumerate([(a, b), (b, a)]):
            migrate(m, dest, "--rate", SLOW)
            with writing(Writer(m.file, model, seed=10 + hop)) as writer:
                writer.wait_writes(40)
                mirroring = m.status()
                assert mirroring["phase"] == "mirroring" and mirroring["mirrored_bytes"] > 0
                status = finish(m)  # the writer goes on across the switch
                writer.wait_writes(writer.writes + 10)
            assert writer.errors == []
            assert_moved(m, status, source, dest)
            assert_serving(m, model, dest)
            with writing(Writer(m.file, model, seed=20 + hop, limit=30)) as between:
                between.join(30)
            assert between.errors == [] and between.writes == 30
            assert_serving(m, model, dest)

        migrate(m, b, "--rate", SLOW, "--keep-source")
        with writing(Writer(m.file, model, seed=30, limit=40, direct=True)) as writer:
            writer.join(30)
        assert writer.errors == [] and writer.writes == 40
        assert m.status()["phase"] == "mirroring", "the writes did not overlap the move"
        status = finish(m)
        assert status["phase"] == "done" and status["image"] == str(b), status
        assert status["keep_source"] is True
        assert_same(a.read_bytes(), model, "the source kept by --keep-source")
        assert not journal(a).exists()
        assert_serving(m, model, b)


# ---- cancel and rate --------------------------------------------------------------------------


def test_cancel_fails_back_to_the_source_with_the_guest_writes(tmp_path: Path) -> None:
    size = 32 * MiB
    source, model = image_pair(tmp_path, size)
    dest = tmp_path / "dst" / "disk.img"
    with mounted(source, tmp_path / "mnt") as m:
        waiting = migrate_waiting(m, dest, "--rate", SLOW)
        try:
            wait_status(m, lambda s: s["phase"] == "mirroring", "the move to start")
            with writing(Writer(m.file, model, seed=3)) as writer:
                writer.wait_writes(40)
                assert dest.exists()
                cancelled = fusedisk("cancel", m.mountpoint, timeout=CLI_TIMEOUT)
                assert cancelled.returncode == 0, cancelled.stderr
                assert cancelled.stdout.strip() == f"cancelled: the disk stays on {source}"
                writer.wait_writes(writer.writes + 20)  # the guest writes on, unaware
            _, stderr = waiting.communicate(timeout=CLI_TIMEOUT)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        assert writer.errors == []
        assert waiting.returncode == 1, stderr
        line = one_error_line(stderr)
        assert line == (
            f"fusedisk: move to {dest} cancelled: cancelled by the user; "
            f"the VM is still on {source}"
        )

        status = m.status()
        assert status["phase"] == "cancelled", status
        assert status["step"] == "failed back" and status["switch_pause_ms"] is None, status
        assert not dest.exists(), "the partial destination was left behind"
        assert not journal(source).exists()
        assert_serving(m, model, source)

        again = fusedisk("cancel", m.mountpoint, timeout=CLI_TIMEOUT)
        assert again.returncode == 1 and "no move is running" in one_error_line(again.stderr)


def test_ctrl_c_on_a_waiting_migrate_cancels_the_move(tmp_path: Path) -> None:
    """Ctrl-C while ``fusedisk migrate`` shows progress cancels the move (cli._watch)."""
    source, model = image_pair(tmp_path, 16 * MiB)
    dest = tmp_path / "dst" / "disk.img"
    err = tmp_path / "migrate.err"
    with mounted(source, tmp_path / "mnt") as m, open(err, "w") as err_file:
        waiting = subprocess.Popen(
            [sys.executable, "-m", "fusedisk", "migrate", m.mountpoint, dest, "--rate", SLOW],
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            stdin=subprocess.DEVNULL,
            text=True,
            # As from a terminal: a test run started in the background (`scripts/test &`)
            # ignores SIGINT, and the CLI would inherit that and never see the Ctrl-C.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            # The first progress line says the command is in its watch loop, where Ctrl-C cancels.
            wait_until(lambda: "mirroring" in err.read_text(), "a progress line", alive=m)
            with writing(Writer(m.file, model, seed=7, limit=20)) as writer:
                writer.join(30)
            waiting.send_signal(signal.SIGINT)  # as Ctrl-C sends it
            assert waiting.wait(timeout=CLI_TIMEOUT) == 1, err.read_text()
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        assert writer.errors == [] and writer.writes == 20
        stderr = err.read_text()
        assert "fusedisk: interrupted: cancelling the move" in stderr, stderr
        assert stderr.splitlines()[-1].endswith(f"the VM is still on {source}"), stderr
        assert m.status()["phase"] == "cancelled"
        assert not dest.exists()
        assert_serving(m, model, source)


def test_unmount_during_a_move_fails_back_to_the_source(tmp_path: Path) -> None:
    """Unmounting stops the daemon; a running move fails back first (daemon.py's docstring)."""
    source, model = image_pair(tmp_path, 16 * MiB)
    dest = tmp_path / "dst" / "disk.img"
    with mounted(source, tmp_path / "mnt") as m:
        migrate(m, dest, "--rate", SLOW)
        with writing(Writer(m.file, model, seed=8, limit=20)) as writer:
            writer.join(30)
        assert writer.errors == [] and writer.writes == 20
        result = fusedisk("unmount", m.mountpoint, timeout=CLI_TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert m.daemon.wait(timeout=CLI_TIMEOUT) == 0, m.log.read_text()
        assert "failed back" in m.log.read_text()
    assert not dest.exists(), "the partial destination survived the unmount"
    assert not journal(source).exists()
    assert_same(source.read_bytes(), model, "the source after the unmount")


def test_rate_change_speeds_up_a_throttled_move(tmp_path: Path) -> None:
    """At 1 MiB/s a 32 MiB move needs 31 s; raised to 1 GiB/s it ends at once."""
    size = 32 * MiB
    source, model = image_pair(tmp_path, size)
    dest = tmp_path / "dst" / "disk.img"
    with mounted(source, tmp_path / "mnt") as m:
        started = time.monotonic()
        status = migrate(m, dest, "--rate", "1M")
        assert status["rate_limit"] == MiB
        status = wait_status(m, lambda s: s["progress_bytes"] >= 2 * MiB, "two chunks copied")
        # The throttle holds: 1 MiB is copied at once, each further MiB a second later.
        assert time.monotonic() - started >= 0.9, "the --rate limit was not applied"
        assert status["phase"] == "mirroring" and status["progress_bytes"] < size

        changed = fusedisk("rate", m.mountpoint, "1G", timeout=CLI_TIMEOUT)
        assert changed.returncode == 0, changed.stderr
        assert changed.stdout.strip() == "rate limit: 1.0 GiB/s"
        raised = time.monotonic()
        status = m.wait_phase(*TERMINAL, timeout=MOVE_TIMEOUT)
        assert time.monotonic() - raised < 10, "the new rate did not take effect"
        assert status["rate_limit"] == 1 << 30
        assert_moved(m, status, source, dest)
        assert_serving(m, model, dest)

        after = fusedisk("rate", m.mountpoint, "10M", timeout=CLI_TIMEOUT)
        assert after.returncode == 1 and "no move is running" in one_error_line(after.stderr)


# ---- a destination that fills up --------------------------------------------------------------


def test_destination_filling_up_during_the_pass_fails_back(tmp_path: Path) -> None:
    """ENOSPC from the copier (or a mirrored write): phase failed, the destination removed, the
    source intact and serving, and the guest writing through it never saw an error."""
    size = 32 * MiB
    source, model = image_pair(tmp_path, size)
    with tmpfs(tmp_path / "small", "size=40M") as small, mounted(source, tmp_path / "mnt") as m:
        dest = small / "disk.img"
        waiting = migrate_waiting(m, dest, "--rate", "2M")
        try:
            wait_status(m, lambda s: s.get("copied_bytes", 0) > 0, "the copy to start")
            with writing(Writer(m.file, model, seed=4, max_length=64 * KiB)) as writer:
                writer.wait_writes(20)
                fill(small)  # the rest of the pass no longer fits
                status = m.wait_phase(*TERMINAL, timeout=MOVE_TIMEOUT)
                writer.wait_writes(writer.writes + 20)
            _, stderr = waiting.communicate(timeout=CLI_TIMEOUT)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        assert writer.errors == [], "the guest saw the destination's error"
        assert status["phase"] == "failed", status
        assert "space" in status["error"].lower(), status
        assert status["progress_bytes"] < size, status
        assert not dest.exists(), "the partial destination was left on the full filesystem"
        assert not journal(source).exists()
        assert waiting.returncode == 1, stderr
        line = one_error_line(stderr)
        assert line.startswith(f"fusedisk: move to {dest} failed: "), line
        assert f"still on {source}" in line and "space" in line.lower(), line
        assert_serving(m, model, source)


# ---- the single pass ----------------------------------------------------------------------


def test_single_pass_skips_what_writes_already_synced(tmp_path: Path) -> None:
    """The last quarter, fully rewritten by 1 MiB O_DIRECT writes before the pass gets there, is
    never copied; a partial-page write ahead of the pass still is (the copy reads the new bytes);
    and copied + synced by writes + holes == size: every byte accounted for exactly once."""
    size = 16 * MiB
    source, model = image_pair(tmp_path, size)
    dest = tmp_path / "dst" / "disk.img"
    far = (size * 3 // 4, size)
    with mounted(source, tmp_path / "mnt") as m:
        migrate(m, dest, "--rate", SLOW)
        rng = random.Random(5)
        for offset in range(*far, MiB):
            data = rng.randbytes(MiB)
            write_direct(m.file, offset, data)
            model[offset : offset + MiB] = data
        # Ahead of the pass, a write covering no page whole: the tail of one, the head of the next.
        partial, patch = 5 * MiB + 100, b"\x5a" * (PAGE + 100)
        fd = os.open(m.file, os.O_WRONLY)
        try:
            assert os.pwrite(fd, patch, partial) == len(patch)
            os.fsync(fd)
        finally:
            os.close(fd)
        model[partial : partial + len(patch)] = patch
        before = m.status()
        assert before["progress_bytes"] <= 5 * MiB, f"the pass was too quick to test: {before}"
        status = finish(m)

        assert_moved(m, status, source, dest)
        rewritten = far[1] - far[0]
        assert status["hole_bytes"] == 0, status
        assert status["mirrored_bytes"] >= rewritten + len(patch), status
        assert status["synced_by_writes_bytes"] >= rewritten, status
        assert status["copied_bytes"] <= size - rewritten, status
        # Exactly: partial pages are no proof of sync, so their chunk is copied like the rest.
        assert status["synced_by_writes_bytes"] == rewritten, status
        total = status["copied_bytes"] + status["synced_by_writes_bytes"] + status["hole_bytes"]
        assert total == size == status["total_bytes"], status
        assert_serving(m, model, dest)


def test_holes_stay_holes_and_cost_no_copying(tmp_path: Path) -> None:
    size = 64 * MiB
    (tmp_path / "dst").mkdir()
    source = tmp_path / "disk.img"
    model = bytearray(size)
    with open(source, "wb") as f:
        f.truncate(size)
        for offset in (0, 20 * MiB + 64 * KiB, size - 64 * KiB):
            data = random.Random(offset).randbytes(64 * KiB)
            f.seek(offset)
            f.write(data)
            model[offset : offset + len(data)] = data
    dest = tmp_path / "dst" / "disk.img"
    with mounted(source, tmp_path / "mnt") as m:
        before = os.stat(m.file)  # the kernel caches these attributes: the switch must drop them
        result = fusedisk("migrate", m.mountpoint, dest, "--json", timeout=CLI_TIMEOUT)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert_moved(m, status, source, dest)
        served = os.stat(m.file)
        assert served.st_mtime_ns == dest.stat().st_mtime_ns != before.st_mtime_ns
        assert served.st_blocks == dest.stat().st_blocks
        assert status["hole_bytes"] >= size - MiB, status
        assert status["copied_bytes"] <= 512 * KiB, status
        assert status["synced_by_writes_bytes"] == 0, status
        total = status["copied_bytes"] + status["synced_by_writes_bytes"] + status["hole_bytes"]
        assert total == size, status
        assert dest.stat().st_size == size
        assert dest.stat().st_blocks * 512 <= MiB, "the holes were filled on the destination"
        assert_serving(m, model, dest)


def test_shrink_and_grow_while_mirroring(tmp_path: Path) -> None:
    """Size changes through the mount while the move mirrors: a shrink below what the pass has
    done, a write past the end (leaving a hole), a shrink to an unaligned size ahead of the pass;
    the destination follows, and the regrown ranges stay holes."""
    source, model = image_pair(tmp_path, 16 * MiB)
    dest = tmp_path / "dst" / "disk.img"

    def resize(size: int) -> None:
        os.truncate(m.file, size)
        del model[size:]
        model.extend(bytes(size - len(model)))

    with mounted(source, tmp_path / "mnt") as m:
        migrate(m, dest, "--rate", SLOW)
        first = wait_status(m, lambda s: s["progress_bytes"] > 0, "the first chunk")
        assert first["progress_bytes"] == MiB, first  # one chunk copied, then throttled
        resize(512 * KiB + 5)
        resize(6 * MiB)
        fd = os.open(m.file, os.O_WRONLY)
        try:
            offset = 10 * MiB + 7
            assert os.pwrite(fd, b"\xa5" * 5000, offset) == 5000
        finally:
            os.close(fd)
        model.extend(bytes(offset - len(model)))
        model.extend(b"\xa5" * 5000)
        resize(20 * MiB)
        resize(12 * MiB + 123)
        resize(14 * MiB)
        during = m.status()
        assert during["phase"] == "mirroring" and during["total_bytes"] == 14 * MiB, during
        status = finish(m)
        assert_moved(m, status, source, dest)
        total = status["copied_bytes"] + status["synced_by_writes_bytes"] + status["hole_bytes"]
        assert total == 14 * MiB == status["total_bytes"], status
        assert status["hole_bytes"] >= 12 * MiB, "the regrown ranges were copied as data"
        assert dest.stat().st_blocks * 512 <= 2 * MiB, "the regrown ranges were filled"
        assert_serving(m, model, dest)


def test_verify_compares_every_byte_before_the_switch(tmp_path: Path) -> None:
    size = 16 * MiB
    source, model = image_pair(tmp_path, size)
    dest = tmp_path / "dst" / "disk.img"
    with mounted(source, tmp_path / "mnt") as m:
        with writing(Writer(m.file, model, seed=6, max_length=64 * KiB)) as writer:
            writer.wait_writes(5)
            result = fusedisk("migrate", m.mountpoint, dest, "--verify", "--json", timeout=120)
            writer.wait_writes(writer.writes + 5)
        assert writer.errors == []
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["verify"] is True
        assert status["verified_bytes"] == size == status["total_bytes"], status
        assert_moved(m, status, source, dest)
        assert_serving(m, model, dest)


# ---- bad input ----------------------------------------------------------------------------

BadCase = Callable[[Mounted, Path], tuple[list[str | Path], Path | None]]


def assert_refused(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 1 and exactly one stderr line, ``fusedisk: ...``, with no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusedisk: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Names, sizes and mtimes of everything under ``directory`` (mounts excluded)."""
    found = {}
    for path in sorted(directory.rglob("*")):
        if path.is_mount() or any(p.is_mount() for p in path.parents if p != directory):
            continue
        if path.name.endswith("-daemon.log"):
            continue
        st = path.lstat()
        found[str(path)] = (st.st_size, st.st_mtime_ns)
    return found


def _unchanged(m: Mounted, source: Path, model: bytearray, before: dict[str, Any]) -> None:
    status = m.status()
    assert status["phase"] == before["phase"] and status["image"] == str(source), status
    assert status["destination"] == before["destination"], status
    assert_serving(m, model, source)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Mounted, Path, bytearray]]:
    """A 16 MiB non-sparse image in tmp_path/src served at tmp_path/mnt."""
    source, model = image_pair(tmp_path, 16 * MiB)
    with mounted(source, tmp_path / "mnt") as m:
        yield m, source, model


def _dest_exists(m: Mounted, tmp: Path) -> tuple[list[str | Path], Path | None]:
    dest = tmp / "dst" / "old.img"
    dest.write_bytes(b"precious")
    return [dest], None


def _dest_is_source(m: Mounted, tmp: Path) -> tuple[list[str | Path], Path | None]:
    return [m.image], None


def _dest_is_source_forced(m: Mounted, tmp: Path) -> tuple[list[str | Path], Path | None]:
    return [m.image, "--force"], None


def _dest_is_hard_link(m: Mounted, tmp: Path) -> tuple[list[str | Path], Path | None]:
    link = tmp / "dst" / "link.img"
    os.link(m.image, link)
    return [link, "--force"], None


def _dest_is_symlink(m: Mounted, tmp: Path) -> tuple[list[str | Path], Path | None]:
    link = tmp / "dst" / "symlink.img"
    link.symlink_to(m.image)
    return [link, "--force"], None


def _dest_is_symlink_by_relative_path(
    m: Mounted, tmp: Path
) -> tuple[list[str | Path], Path | None]:
    link = tmp / "src" / "alias.img"
    link.symlink_to("disk.img")
    return [link], None


def _dest_dir_missing(m: Mounted, tmp: Path) -> tuple[list[str | Path], Path | None]:
    return [tmp / "nowhere" / "disk.img"], tmp / "nowhere"


def _dest_is_a_directory(m: Mounted, tmp: Path) -> tuple[list[str | Path], Path | None]:
    return [tmp / "dst", "--force"], None


def _dest_inside_the_mount(m: Mounted, tmp: Path) -> tuple[list[str | Path], Path | None]:
    return [m.mountpoint / "copy.img"], None


def _dest_is_the_mounted_file(m: Mounted, tmp: Path) -> tuple[list[str | Path], Path | None]:
    return [m.file, "--force"], None


BAD_DESTINATIONS: dict[str, tuple[BadCase, str]] = {
    "dest exists": (_dest_exists, "already exists (use --force"),
    "dest is the source": (_dest_is_source, "the source image itself"),
    "dest is the source, --force": (_dest_is_source_forced, "the source image itself"),
    "dest is a hard link to the source": (_dest_is_hard_link, "the source image itself"),
    "dest is a symlink to the source": (_dest_is_symlink, "the source image itself"),
    "dest is a relative symlink beside the source": (
        _dest_is_symlink_by_relative_path,
        "the source image itself",
    ),
    "dest directory missing": (_dest_dir_missing, "does not exist"),
    "dest is a directory": (_dest_is_a_directory, "is a directory"),
    "dest inside the mount": (_dest_inside_the_mount, "inside the fusedisk mount"),
    "dest is the mounted file": (_dest_is_the_mounted_file, "inside the fusedisk mount"),
}


@pytest.mark.parametrize("case", list(BAD_DESTINATIONS))
def test_bad_destination_is_refused_and_changes_nothing(
    served: tuple[Mounted, Path, bytearray], tmp_path: Path, case: str
) -> None:
    m, source, model = served
    make, fragment = BAD_DESTINATIONS[case]
    args, must_not_exist = make(m, tmp_path)
    before, files = m.status(), _snapshot(tmp_path)
    result = fusedisk("migrate", m.mountpoint, *args, timeout=CLI_TIMEOUT)
    line = assert_refused(result, fragment)
    assert f"the disk stays on {source}" in line, line
    assert result.stdout == ""
    assert _snapshot(tmp_path) == files, "a refused move changed files"
    if must_not_exist is not None:
        assert not must_not_exist.exists()
    _unchanged(m, source, model, before)


def test_existing_destination_is_replaced_with_force(
    served: tuple[Mounted, Path, bytearray], tmp_path: Path
) -> None:
    m, source, model = served
    dest = tmp_path / "dst" / "old.img"
    dest.write_bytes(b"old contents")
    assert_refused(fusedisk("migrate", m.mountpoint, dest, timeout=CLI_TIMEOUT), "--force")
    assert dest.read_bytes() == b"old contents"
    result = fusedisk("migrate", m.mountpoint, dest, "--force", timeout=CLI_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"moved to {dest}: copied "), result.stdout
    assert_moved(m, m.status(), source, dest)
    assert_serving(m, model, dest)


def test_read_only_destination_directories_are_refused(
    served: tuple[Mounted, Path, bytearray], tmp_path: Path
) -> None:
    m, source, model = served
    before = m.status()
    with tmpfs(tmp_path / "ro-tmpfs", "ro,size=64M") as ro:
        line = assert_refused(
            fusedisk("migrate", m.mountpoint, ro / "disk.img", timeout=CLI_TIMEOUT), "not writable"
        )
        assert str(ro) in line
        assert list(ro.iterdir()) == []
    with read_only_bind(tmp_path / "dst", tmp_path / "ro-bind") as ro:
        assert_refused(
            fusedisk("migrate", m.mountpoint, ro / "disk.img", timeout=CLI_TIMEOUT), "not writable"
        )
    assert list((tmp_path / "dst").iterdir()) == []
    _unchanged(m, source, model, before)


def test_too_little_free_space_is_refused_up_front(
    served: tuple[Mounted, Path, bytearray], tmp_path: Path
) -> None:
    m, source, model = served
    before = m.status()
    with tmpfs(tmp_path / "tiny", "size=8M") as tiny:
        line = assert_refused(
            fusedisk("migrate", m.mountpoint, tiny / "disk.img", timeout=CLI_TIMEOUT),
            "not enough free space",
        )
        assert f"{16 * MiB} bytes needed" in line, line
        assert list(tiny.iterdir()) == []
    _unchanged(m, source, model, before)


def test_a_second_move_while_one_runs_is_refused(
    served: tuple[Mounted, Path, bytearray], tmp_path: Path
) -> None:
    m, source, model = served
    first = tmp_path / "dst" / "first.img"
    second = tmp_path / "dst" / "second.img"
    migrate(m, first, "--rate", SLOW)
    before = m.status()
    cases: list[list[str | Path]] = [[second], [second, "--force"], [first, "--force"]]
    for args in cases:
        result = fusedisk("migrate", m.mountpoint, *args, timeout=CLI_TIMEOUT)
        assert_refused(result, "a move is already mirroring")
    assert not second.exists()
    status = m.status()
    assert status["phase"] == "mirroring" and status["destination"] == str(first), status
    assert status["started"] == before["started"]
    status = finish(m)
    assert_moved(m, status, source, first)
    assert_serving(m, model, first)


def test_commands_on_a_path_that_is_not_a_fusedisk_mount(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    dest = tmp_path / "dest.img"
    commands: list[list[str | Path]] = [
        ["migrate", plain, dest],
        ["migrate", tmp_path / "missing", dest],
        ["status", plain, "--json"],
        ["cancel", plain],
        ["rate", plain, "10M"],
    ]
    for command in commands:
        assert_refused(fusedisk(*command, timeout=CLI_TIMEOUT), "is not a fusedisk mount")
    assert not dest.exists()
    assert list(plain.iterdir()) == []


@pytest.mark.parametrize("rate", ["fast", "-1", "10X"])
def test_bad_rate_value_is_refused_with_status_1(
    served: tuple[Mounted, Path, bytearray], tmp_path: Path, rate: str
) -> None:
    m, source, model = served
    before = m.status()
    dest = tmp_path / "dst" / "disk.img"
    line = assert_refused(
        fusedisk("migrate", m.mountpoint, dest, f"--rate={rate}", timeout=CLI_TIMEOUT), "size"
    )
    assert repr(rate) in line
    assert not dest.exists()
    _unchanged(m, source, model, before)
    migrate(m, dest, "--rate", SLOW)
    assert_refused(fusedisk("rate", m.mountpoint, rate, timeout=CLI_TIMEOUT), repr(rate))
    assert m.status()["rate_limit"] == SLOW_RATE
    assert fusedisk("cancel", m.mountpoint, timeout=CLI_TIMEOUT).returncode == 0


@pytest.mark.parametrize("seconds", ["soon", "-1", "nan", "1e9"])
def test_bad_dest_timeout_is_refused_and_a_good_one_is_used(
    served: tuple[Mounted, Path, bytearray], tmp_path: Path, seconds: str
) -> None:
    m, source, model = served
    before = m.status()
    dest = tmp_path / "dst" / "disk.img"
    command = ("migrate", m.mountpoint, dest, f"--dest-timeout={seconds}")
    line = assert_refused(fusedisk(*command, timeout=CLI_TIMEOUT), "seconds")
    assert repr(seconds) in line and "--dest-timeout" in line
    assert not dest.exists()
    _unchanged(m, source, model, before)
    assert migrate(m, dest, "--rate", SLOW, "--dest-timeout", "2.5")["dest_timeout"] == 2.5
    assert fusedisk("cancel", m.mountpoint, timeout=CLI_TIMEOUT).returncode == 0


# ---- bugs found (see each reason) ---------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".tmp"])
def test_destination_at_the_journal_path_loses_no_data(
    served: tuple[Mounted, Path, bytearray], suffix: str
) -> None:
    m, source, model = served
    dest = Path(str(journal(source)) + suffix)
    result = fusedisk("migrate", m.mountpoint, dest, timeout=CLI_TIMEOUT)
    if result.returncode == 1:  # refusing it is the right answer
        assert_refused(result, "nothing was changed")
        assert_serving(m, model, source)
        return
    status = m.wait_phase(*TERMINAL, timeout=MOVE_TIMEOUT)
    assert status["phase"] == "done", status
    assert dest.is_file(), f"the move reports done, but {dest} does not exist"
    assert_serving(m, model, dest)


@contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """An existing file nobody, root included, may unlink (chattr +i); made mutable after."""
    path.write_bytes(b"keep")
    subprocess.run(["chattr", "+i", path], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", path], check=True, timeout=30)


@contextmanager
def no_free_inode(path: Path) -> Iterator[Path]:
    """A destination on a filesystem with room for bytes but no inode left."""
    with tmpfs(path, "size=64M,nr_inodes=1") as full:
        yield full / "disk.img"


@pytest.mark.parametrize("case", ["no free inode", "immutable DEST with --force"])
def test_an_os_error_starting_a_move_is_refused_and_the_mount_serves_on(
    served: tuple[Mounted, Path, bytearray], tmp_path: Path, case: str
) -> None:
    m, source, model = served
    before = m.status()
    if case == "no free inode":
        setup, extra, fragment = no_free_inode(tmp_path / "no-inodes"), [], "space"
    else:
        setup, extra, fragment = immutable(tmp_path / "dst" / "old.img"), ["--force"], "permit"
    with setup as dest:
        result = fusedisk("migrate", m.mountpoint, dest, *extra, timeout=CLI_TIMEOUT)
        assert m.daemon.poll() is None, "the daemon died: the VM lost its disk"
        assert_refused(result, fragment, f"stays on {source}")
        assert not dest.exists() or dest.read_bytes() == b"keep"
    _unchanged(m, source, model, before)


def test_two_simultaneous_migrate_requests_start_one_move(
    served: tuple[Mounted, Path, bytearray], tmp_path: Path
) -> None:
    m, _, _ = served
    for attempt in range(5):
        barrier = threading.Barrier(2)
        replies: dict[int, str] = {}
        threads = [
            threading.Thread(
                target=_send_migrate,
                args=(m, tmp_path / "dst" / f"{attempt}-{i}.img", barrier, replies, i),
            )
            for i in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        accepted = [i for i, reply in replies.items() if reply == "mirroring"]
        assert len(accepted) == 1, f"attempt {attempt}: {replies}"
        refused = replies[1 - accepted[0]]
        assert "a move is already" in refused, refused
        cancelled = fusedisk("cancel", m.mountpoint, timeout=CLI_TIMEOUT)
        assert cancelled.returncode == 0, cancelled.stderr


def _send_migrate(
    m: Mounted, dest: Path, barrier: threading.Barrier, replies: dict[int, str], i: int
) -> None:
    """One migrate request on the control socket, sent the moment the other one is."""
    command = {"command": "migrate", "destination": str(dest), "rate_limit": MiB}
    barrier.wait(timeout=30)
    try:
        replies[i] = request(str(m.mountpoint), command)["phase"]
    except FusediskError as e:
        replies[i] = str(e)
