"""Crash consistency on real mounts: SIGKILL the daemon during a live move, then mount again.

DESIGN.md, "Crash-consistent": after a kill at any moment, mounting the image again finds one
truth (the source before the switch was recorded, the destination after) and no write that was
acknowledged and flushed is lost.  Each run:

1. serves a seeded random image with a foreground daemon, armed with a failpoint
   (``FUSEDISK_CRASH_AT``) or not, and starts a writer (:class:`Writer`) that writes 4 KiB
   blocks with a unique pattern, fsyncs each, and logs a write as flushed only once its fsync
   has returned;
2. starts a throttled move with ``fusedisk migrate --detach``;
3. lets the daemon die at the failpoint, or SIGKILLs it at a moment drawn from the seed
   (counted from `migrate`'s return, or from the move's end);
4. checks the files left on disk (the source exists unless the switch record is durable), clears
   the stale mount with ``fusedisk unmount``, mounts the ORIGINAL image path again with
   ``fusedisk mount``, and checks the one line it prints, which file it serves, that the other is
   gone, that no journal remains, and every block against the writer's log.

Caveat: SIGKILL loses no page cache, so these runs prove the order of the steps and the recovery
logic, not that each fsync reaches the platter (that would take a power cut).
"""

from __future__ import annotations

import errno
import json
import os
import random
import selectors
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import fusedisk, mounted, random_image, wait_mounted

pytestmark = pytest.mark.mount

BLOCK = 4096
IMAGE_SIZE = 8 << 20
RATE = 8 << 20  # bytes/s: the copy pass over IMAGE_SIZE takes about one second
HOT_BLOCKS = 32  # half the writes go here, so blocks are rewritten and "last flushed" matters
WARM_UP_FLUSHES = 5  # flushed writes before the move starts
TIMEOUT = 30.0  # for any single wait: far above what a healthy run needs
CRASH_ENV = "FUSEDISK_CRASH_AT"


# ---- the writer ---------------------------------------------------------------------------


def pattern(block: int, seq: int) -> bytes:
    """The 4 KiB written as write number ``seq`` to ``block``: unique, and self-describing."""
    return struct.pack("<QQ", block, seq) * (BLOCK // 16)


@dataclass
class WriterLog:
    """What the writer did, recorded in the order it happened."""

    flushed: dict[int, int] = field(default_factory=dict)  # block -> its last flushed seq
    # block -> seqs written to it after its last flushed one: acknowledged or not, either may
    # show, as the kill may have come before or after the daemon wrote them
    unflushed: dict[int, set[int]] = field(default_factory=dict)
    flushes: int = 0
    error: str | None = None

    def started(self, block: int, seq: int) -> None:
        self.unflushed.setdefault(block, set()).add(seq)

    def flushed_write(self, block: int, seq: int) -> None:
        """Call only once fsync has returned for the write ``seq``."""
        self.flushed[block] = seq
        self.unflushed[block] = {s for s in self.unflushed[block] if s > seq}
        self.flushes += 1


class Writer:
    """A guest stand-in, in a thread: write a 4 KiB block, fsync, log; stop at the first error.

    The log (:class:`WriterLog`) records a write as flushed only after its fsync returned, so it
    lists exactly the acknowledged-and-flushed writes.  The thread needs no killing: when the
    daemon dies the kernel fails every request on the mount (ENOTCONN), ending the loop.
    """

    def __init__(self, path: Path, nblocks: int, seed: int) -> None:
        self.path, self.nblocks = path, nblocks
        self.rng = random.Random(seed)
        self.log = WriterLog()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            self.log.error = f"open: {e}"
            return
        seq = 0
        try:
            while not self._stop.is_set():
                seq += 1
                hot = self.rng.random() < 0.5
                block = self.rng.randrange(HOT_BLOCKS if hot else self.nblocks)
                self.log.started(block, seq)
                if os.pwrite(fd, pattern(block, seq), block * BLOCK) != BLOCK:
                    raise OSError(errno.EIO, "short write")
                os.fsync(fd)
                self.log.flushed_write(block, seq)
        except OSError as e:
            self.log.error = f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e.strerror}"
        finally:
            with suppress(OSError):  # close flushes: ENOTCONN on a dead mount, closed regardless
                os.close(fd)  # else the stale mount stays busy

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_stopped(self, timeout: float) -> bool:
        """Wait for the loop to end on its own (an error); True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)


def check_blocks(data: bytes, original: bytes, log: WriterLog, what: str) -> None:
    """Every block holds its last flushed write (or a later unflushed one); others are intact."""
    assert len(data) == len(original), f"{what}: served size {len(data)} != {len(original)}"
    wrong: list[str] = []
    for block in range(len(original) // BLOCK):
        got = data[block * BLOCK : (block + 1) * BLOCK]
        allowed = set(log.unflushed.get(block, ()))
        if block in log.flushed:
            allowed.add(log.flushed[block])
        elif got == original[block * BLOCK : (block + 1) * BLOCK]:
            continue  # never flushed; an unflushed write may or may not have landed
        got_block, got_seq = struct.unpack_from("<QQ", got)
        if got_block == block and got_seq in allowed and got == pattern(block, got_seq):
            continue
        if got == original[block * BLOCK : (block + 1) * BLOCK]:
            found = "the original bytes"
        elif got == pattern(got_block, got_seq):
            found = f"write seq {got_seq} (of block {got_block})"
        else:
            found = f"unknown bytes {got[:16].hex()}..."
        wrong.append(f"block {block}: want seq in {sorted(allowed)}, found {found}")
    assert not wrong, (
        f"{what}: {len(wrong)} blocks lost acknowledged data ({log.flushes} flushed writes):\n"
        + "\n".join(wrong[:10])
    )


# ---- running the CLI and the daemon -------------------------------------------------------


# A checkpoint every 0.15 s of copying (the default is 2 s), not paced by how long the last
# flush took (a loaded machine would space them out): a kill in the copy pass finds one to
# resume from, except in its first moments.
CHECKPOINT_EVERY = "0.15"


def clean_env() -> dict[str, str]:
    """The environment with no failpoint armed: for every process except the one to kill."""
    env = dict(os.environ, FUSEDISK_CHECKPOINT_EVERY=CHECKPOINT_EVERY, FUSEDISK_CHECKPOINT_PACE="0")
    env.pop(CRASH_ENV, None)
    return env


def cli(*args: str | Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``fusedisk`` as a user would, with no failpoint armed."""
    return fusedisk(*args, timeout=timeout, env=clean_env())


def is_mounted(mountpoint: Path) -> bool:
    """In the mount table: unlike os.path.ismount, true of a stale mount too (stat fails)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = {line.split()[4].encode().decode("unicode_escape") for line in f}
    return str(mountpoint) in points


def clear_mount(mountpoint: Path) -> None:
    """Last-resort cleanup: unmount, lazily if something still holds it."""
    if not is_mounted(mountpoint):
        return
    if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def wait_for(condition: Callable[[], bool], what: str, alive: Callable[[], str | None]) -> None:
    """Poll ``condition`` until it holds; fail at TIMEOUT or as soon as ``alive`` reports death."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        death = alive()
        assert death is None, f"while waiting for {what}: {death}"
        assert time.monotonic() < deadline, f"{what}: not after {TIMEOUT} s"
        time.sleep(0.01)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=TIMEOUT)


class Layout:
    """One run's files: the source image, the destination in another directory, the mount."""

    def __init__(self, tmp: Path, seed: int = 1) -> None:
        self.tmp = tmp
        self.image = tmp / "disk.img"
        self.dest = tmp / "new" / "moved.img"
        self.mountpoint = tmp / "mnt"
        self.daemon_log = tmp / "daemon.log"
        self.journal = tmp / ".disk.img.fusedisk-move"
        self.dest.parent.mkdir()
        self.mountpoint.mkdir()
        self.original = random_image(self.image, IMAGE_SIZE, seed=seed)

    def journal_files(self) -> list[Path]:
        """The journal, a prepared record, anything of the kind, beside either file."""
        return sorted(self.tmp.glob(".*fusedisk-move*")) + sorted(
            self.dest.parent.glob(".*fusedisk-move*")
        )


@dataclass
class AfterKill:
    """What the kill left on disk, read before anything else touches it."""

    journal: dict[str, Any] | None
    source_exists: bool
    dest_exists: bool
    log: WriterLog
    daemon_log: str

    @property
    def phase(self) -> str | None:
        return None if self.journal is None else str(self.journal["phase"])


def crash_during_move(
    layout: Layout,
    *,
    crash_at: str | None,
    kill_after: float | None,
    keep_source: bool,
    writer_seed: int,
    what: str,
    once_done: bool = False,
    rate: int = RATE,
) -> AfterKill:
    """Serve, write, move (at ``rate``), and have the daemon die (failpoint or SIGKILL
    ``kill_after`` seconds after the move started, as the daemon timed it, or with
    ``once_done`` after the move reported done).  Returns with the daemon dead, the writer
    stopped and the stale mount cleared."""
    env = clean_env()
    if crash_at:
        env[CRASH_ENV] = crash_at
    command = [sys.executable, "-m", "fusedisk", "mount", "--foreground"]
    command += [str(layout.image), str(layout.mountpoint)]
    with open(layout.daemon_log, "ab") as log_file:
        daemon = subprocess.Popen(command, stdout=log_file, stderr=log_file, env=env)
    writer: Writer | None = None
    try:
        wait_mounted(layout.mountpoint, daemon, layout.daemon_log)
        writer = Writer(layout.mountpoint / "disk.img", IMAGE_SIZE // BLOCK, writer_seed)
        running = writer

        def alive() -> str | None:
            if daemon.poll() is not None:
                return f"daemon exited {daemon.returncode}:\n{layout.daemon_log.read_text()}"
            if not running.running:
                return f"writer stopped: {running.log.error}"
            return None

        wait_for(lambda: running.log.flushes >= WARM_UP_FLUSHES, "first flushed writes", alive)
        args: list[str | Path] = ["migrate", layout.mountpoint, layout.dest, "--detach"]
        args += ["--json", "--rate", str(rate)] + (["--keep-source"] if keep_source else [])
        migrate = cli(*args)
        if crash_at != "mirroring-started":  # that one dies before it can reply
            assert migrate.returncode == 0, f"{what}: {migrate.stderr}"
        if once_done:
            phase = ""

            def finished() -> bool:
                nonlocal phase
                phase = status(layout.mountpoint)["phase"]
                return phase not in ("mirroring", "switching")

            wait_for(finished, "the move's end", alive)
            assert phase == "done", f"{what}: the move ended {phase}"
        if kill_after is not None:
            # From the move's start, not from `migrate`'s return: on a loaded machine the CLI
            # can take half a second to exit, and the copy pass goes on meanwhile.
            if not once_done:
                kill_after = json.loads(migrate.stdout)["started"] + kill_after - time.time()
            with suppress(subprocess.TimeoutExpired):  # the random moment: not a synchronisation
                code = daemon.wait(timeout=max(0.0, kill_after))
                raise AssertionError(f"{what}: daemon exited {code} before the kill")
            os.kill(daemon.pid, signal.SIGKILL)
        try:
            code = daemon.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{what}: the daemon did not die at {crash_at}") from None
        assert code == -signal.SIGKILL, f"{what}: daemon exited {code}, not by SIGKILL"
        assert writer.wait_stopped(TIMEOUT), f"{what}: the writer hangs on the dead mount"
        after = AfterKill(
            journal=json.loads(layout.journal.read_text()) if layout.journal.exists() else None,
            source_exists=layout.image.exists(),
            dest_exists=layout.dest.exists(),
            log=writer.log,
            daemon_log=layout.daemon_log.read_text(),
        )
        # The request in flight when the daemon died fails ECONNABORTED, later ones ENOTCONN.
        error = str(writer.log.error)
        assert error.startswith(("ENOTCONN", "ECONNABORTED")), f"{what}: writer error {error}"
        # A stale mount: `fusedisk unmount` must clear it (the daemon it would ask is gone).
        assert is_mounted(layout.mountpoint), what
        result = cli("unmount", layout.mountpoint)
        assert result.returncode == 0, f"{what}: unmount of the stale mount: {result.stderr}"
        assert not is_mounted(layout.mountpoint), what
        return after
    finally:
        stop(daemon)  # first: a writer blocked on a live mount then fails and ends
        if writer is not None:
            writer.stop()
        clear_mount(layout.mountpoint)


def has_exited(pid: int) -> bool:
    """Whether a process that is not our child has ended: gone, or a zombie its parent has yet
    to reap (this machine's init reaps orphans only every second or two)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


@contextmanager
def remounted(
    layout: Layout, image: Path, what: str
) -> Iterator[tuple[subprocess.CompletedProcess[str], dict[str, Any]]]:
    """``fusedisk mount IMAGE MNT`` (a background daemon, as a user runs it), yielding its
    result and status; after, ``fusedisk unmount``, which returns once the daemon has exited."""
    result = cli("mount", image, layout.mountpoint)
    try:
        assert result.returncode == 0, f"{what}: mount after the kill: {result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        facts = status(layout.mountpoint)
        pid = int(facts["pid"])
        yield result, facts
        unmounted = cli("unmount", layout.mountpoint)
        assert unmounted.returncode == 0, f"unmount after recovery: {unmounted.stderr} ({what})"
        assert has_exited(pid), f"{what}: `fusedisk unmount` returned before the daemon exited"
    finally:
        clear_mount(layout.mountpoint)


def status(mountpoint: Path) -> dict[str, Any]:
    result = cli("status", mountpoint, "--json")
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def check_recovery(layout: Layout, after: AfterKill, *, keep_source: bool, what: str) -> str:
    """Mount again and check the one truth; returns which file was served (source/dest)."""
    what = f"{what} (journal: {after.journal}, daemon log:\n{after.daemon_log})"
    source, dest = str(layout.image), str(layout.dest)
    # Never is the source gone without a durable switch record (or a finished move).
    if not after.source_exists:
        assert after.phase == "switched" or (after.journal is None and after.dest_exists), (
            f"{what}: the source is gone with no durable switch record"
        )
    if after.journal is not None:
        assert after.journal["source"] == source and after.journal["destination"] == dest, what
        assert after.phase in ("mirroring", "switched"), what
    resumed = after.phase == "mirroring" and "checkpoint" in (after.journal or {})
    if after.phase == "mirroring":
        assert after.source_exists, what
        served, line = source, "found an unfinished move"
    elif after.phase == "switched":
        assert after.dest_exists, what
        served, line = dest, "found a finished move"
    else:
        # No journal: the kill came after the move finished (the journal is written before
        # `migrate --detach` returns).  Then the user mounts the destination.
        assert after.dest_exists, f"{what}: no journal and no destination"
        assert keep_source or not after.source_exists, what
        served, line = dest, ""
    named = layout.image if line else layout.dest
    with remounted(layout, named, what) as (result, facts):
        if line:
            lines = result.stderr.splitlines()
            assert len(lines) == 1, f"{what}: want one line, got {result.stderr!r}"
            assert lines[0].startswith(f"fusedisk: {line} of {source} to {dest}"), lines
            assert f"serving {served}" in lines[0], lines
            assert ("resuming it from its checkpoint" in lines[0]) == resumed, lines
        else:
            assert result.stderr == "", what
        # (A resumed move may already have switched: it goes on at once.)
        assert facts["image"] == served or (resumed and facts["image"] == dest), what
        data = (layout.mountpoint / named.name).read_bytes()
        check_blocks(data, layout.original, after.log, what)
        if resumed:
            # The move goes on from its checkpoint, and switches to exactly these bytes.
            assert after.journal is not None
            assert facts["resumed_from"] == after.journal["checkpoint"]["cursor"], facts
            done = wait_for_phase(layout.mountpoint, "done", "failed")
            assert done["phase"] == "done" and done["image"] == dest, f"{what}: {done}"
            # Every byte counted once: copied, synced by writes, a hole, or compared equal.
            skipped = done["synced_by_writes_bytes"] + done["hole_bytes"]
            counted = done["copied_bytes"] + skipped + done["found_equal_bytes"]
            assert counted == done["total_bytes"], f"{what}: {done}"
            shown = cli("status", layout.mountpoint).stdout
            assert "resumed: from the checkpoint at" in shown, f"{what}: {shown}"
            again = (layout.mountpoint / named.name).read_bytes()
            assert again == data, f"{what}: the resumed move changed what the disk reads"
            served = dest
        else:
            assert facts["phase"] == "idle", what
    assert Path(served).exists(), what
    if resumed:
        assert not marker_exists(layout.dest), f"{what}: a partial marker remains"
        assert layout.image.exists() == keep_source, f"{what}: source exists={keep_source}?"
    elif served == source:
        assert not layout.dest.exists(), f"{what}: the partial destination is still there"
    else:
        assert layout.image.exists() == keep_source, f"{what}: source exists={keep_source}?"
    assert not layout.journal_files(), f"{what}: journal left: {layout.journal_files()}"
    return "resumed" if resumed else "source" if served == source else "dest"


def wait_for_phase(mountpoint: Path, *phases: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while (facts := status(mountpoint))["phase"] not in phases:
        assert time.monotonic() < deadline, f"no phase {phases} within {TIMEOUT} s: {facts}"
        time.sleep(0.05)
    return facts


def marker_exists(dest: Path) -> bool:
    return (dest.parent / f".{dest.name}.fusedisk-partial").exists()


# ---- the tests ----------------------------------------------------------------------------

FAILPOINTS = {
    # failpoint: the journal's phase it must leave, hence the file served after recovery
    "mirroring-started": "mirroring",
    "copy-chunk:1": "mirroring",
    "copy-chunk:3": "mirroring",
    "checkpoint:2": "mirroring",  # always resumed: a checkpoint is recorded
    "switch-held": "mirroring",
    "switch-recorded": "switched",
    "source-deleted": "switched",
}


@pytest.mark.parametrize("crash_at", list(FAILPOINTS))
def test_kill_at_failpoint(tmp_path: Path, crash_at: str) -> None:
    layout = Layout(tmp_path)
    what = f"killed at {crash_at}"
    after = crash_during_move(
        layout, crash_at=crash_at, kill_after=None, keep_source=False, writer_seed=0, what=what
    )
    assert after.phase == FAILPOINTS[crash_at], f"{what}: journal {after.journal}"
    assert after.source_exists == (crash_at != "source-deleted"), f"{what}: {after}"
    assert after.dest_exists, what
    served = check_recovery(layout, after, keep_source=False, what=what)
    if FAILPOINTS[crash_at] == "switched":
        assert served == "dest", what
    else:  # resumed if a checkpoint was recorded before the kill
        assert served in ("source", "resumed"), what
        assert crash_at != "checkpoint:2" or served == "resumed", what
        assert crash_at != "mirroring-started" or served == "source", what


def test_kill_after_switch_record_keeps_source_when_asked(tmp_path: Path) -> None:
    """With --keep-source, recovery after the switch serves the destination and keeps both."""
    layout = Layout(tmp_path)
    what = "killed at switch-recorded with --keep-source"
    after = crash_during_move(
        layout,
        crash_at="switch-recorded",
        kill_after=None,
        keep_source=True,
        writer_seed=0,
        what=what,
    )
    assert after.journal is not None and after.journal["keep_source"] is True, what
    assert check_recovery(layout, after, keep_source=True, what=what) == "dest"


RANDOM_RUNS = 20
# The kills are spread over the phases by turn, so that each is hit whatever the seeds draw:
# the journal's phase each must leave.
KILL_PHASES = {"mirroring": "mirroring", "switching": "switched", "after": None}


def kill_plan(seed: int) -> tuple[str, bool]:
    """The phase run ``seed`` kills in, and whether it keeps the source (every third run of
    each phase)."""
    phases = list(KILL_PHASES)
    return phases[seed % len(phases)], seed // len(phases) % 3 == 1


@pytest.mark.parametrize(
    "seed", range(RANDOM_RUNS), ids=[f"seed={s}-{kill_plan(s)[0]}" for s in range(RANDOM_RUNS)]
)
def test_random_kill_during_move(tmp_path: Path, seed: int) -> None:
    """SIGKILL in a phase chosen by turn, at a moment in it drawn from the seed:

    - mirroring: in the first 0.6 * IMAGE_SIZE / RATE s after the move started (the daemon's
      own start time), in a move at half RATE, whose copy pass cannot end sooner than
      2 * IMAGE_SIZE / RATE after it started: a `migrate` that returns late on a loaded
      machine (the kill cannot come sooner) still kills in the copy pass;
    - switching: between the durable switch record and the end of the cleanup, at one of the
      failpoints there (right after the record; after deleting the source, when it is deleted);
    - after: up to 0.3 s after the move reported done.

    The journal left must be the one of that phase, and recovery serve the file it names."""
    rng = random.Random(seed)
    phase, keep_source = kill_plan(seed)
    crash_at: str | None = None
    kill_after: float | None = None
    rate = RATE
    if phase == "mirroring":
        kill_after = rng.uniform(0.0, 0.6 * IMAGE_SIZE / RATE)
        moment = f"SIGKILL {kill_after:.3f} s into the copy pass"
        # The pass then lasts over three times the window the kill is drawn from: on a
        # loaded machine `migrate` may return late, and the kill cannot come before it does.
        rate = RATE // 2
    elif phase == "switching":
        crash_at = "switch-recorded" if keep_source or rng.random() < 0.5 else "source-deleted"
        moment = f"killed at {crash_at}"
    else:
        kill_after = rng.uniform(0.0, 0.3)
        moment = f"SIGKILL {kill_after:.3f} s after the move was done"
    what = f"seed={seed}: {moment} ({phase}), keep_source={keep_source}"
    layout = Layout(tmp_path, seed=seed)
    after = crash_during_move(
        layout,
        crash_at=crash_at,
        kill_after=kill_after,
        keep_source=keep_source,
        writer_seed=seed,
        what=what,
        once_done=phase == "after",
        rate=rate,
    )
    assert after.phase == KILL_PHASES[phase], f"{what}: the kill left the journal {after.journal}"
    served = check_recovery(layout, after, keep_source=keep_source, what=what)
    if phase == "mirroring":  # resumed if a checkpoint was recorded before the kill
        assert served in ("source", "resumed"), what
    else:
        assert served == "dest", what


def test_recovery_refuses_a_switch_record_without_destination(tmp_path: Path) -> None:
    """A journal saying the disk moved to a file that is gone: refuse, change nothing."""
    layout = Layout(tmp_path)
    record = {
        "phase": "switched",
        "source": str(layout.image),
        "destination": str(layout.dest),
        "keep_source": False,
    }
    layout.journal.write_text(json.dumps(record))
    result = cli("mount", layout.image, layout.mountpoint)
    clear_mount(layout.mountpoint)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(layout.dest) in lines[0] and "missing" in lines[0], lines
    assert layout.image.read_bytes() == layout.original
    assert layout.journal.exists()
    assert not is_mounted(layout.mountpoint)


def test_second_mount_during_a_move_changes_nothing(tmp_path: Path) -> None:
    """A second `fusedisk mount` of an image whose move runs is refused, and must not "recover"
    the live move's journal (it once deleted the destination, then the move deleted the source).
    """
    layout = Layout(tmp_path)
    other = tmp_path / "mnt2"
    other.mkdir()
    with mounted(layout.image, layout.mountpoint) as m:
        started = cli("migrate", m.mountpoint, layout.dest, "--detach", "--rate", "1M")
        assert started.returncode == 0, started.stderr
        result = cli("mount", layout.image, other)
        clear_mount(other)
        assert result.returncode == 1, result.stderr
        assert "already served by another fusedisk" in result.stderr, result.stderr
        # The running move's files must be untouched by the refused mount.
        assert layout.journal.exists(), "the live move's journal was removed"
        assert layout.dest.exists(), "the live move's destination was deleted"
        assert cli("rate", m.mountpoint, "0").returncode == 0
        done = m.wait_phase("done", "failed", timeout=TIMEOUT)
        assert done["phase"] == "done", done
        assert m.file.read_bytes() == layout.original
    assert layout.dest.read_bytes() == layout.original
    assert not layout.image.exists()


def test_mounting_a_partial_destination_after_a_crash_is_refused(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    what = "killed at copy-chunk:1, then DEST mounted"
    after = crash_during_move(
        layout,
        crash_at="copy-chunk:1",
        kill_after=None,
        keep_source=False,
        writer_seed=0,
        what=what,
    )
    assert after.phase == "mirroring" and after.dest_exists, what
    result = cli("mount", layout.dest, layout.mountpoint)
    clear_mount(layout.mountpoint)
    assert result.returncode == 1, f"{what}: the partial destination was served"
    assert str(layout.image) in result.stderr, result.stderr


# A parent that never reaps until told: it runs `fusedisk mount`, whose daemon, orphaned when the
# CLI exits, becomes its child (PR_SET_CHILD_SUBREAPER) and stays a zombie once it exits, as
# under a container's PID 1 that does not reap (this machine's init takes a second or two).
SUBREAPER = textwrap.dedent(
    """
    import ctypes, os, subprocess, sys
    if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0):  # PR_SET_CHILD_SUBREAPER
        sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
    print(subprocess.run(sys.argv[1:]).returncode, flush=True)
    sys.stdin.read()  # until the test closes our stdin: reap nothing
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
    """
)


def read_line(stream: Any, timeout: float) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        assert selector.select(timeout), f"no line after {timeout} s"
    return str(stream.readline())


def test_unmount_returns_once_the_daemon_has_exited_even_unreaped(tmp_path: Path) -> None:
    """`fusedisk unmount` waits for the daemon to exit, not to be reaped (it once polled
    kill(pid, 0), true of a zombie: 120 s, then an error, under an init that does not reap)."""
    layout = Layout(tmp_path)
    command = [sys.executable, "-c", SUBREAPER, sys.executable, "-m", "fusedisk", "mount"]
    helper = subprocess.Popen(
        [*command, str(layout.image), str(layout.mountpoint)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    assert helper.stdin is not None and helper.stdout is not None
    try:
        assert read_line(helper.stdout, TIMEOUT).strip() == "0", "fusedisk mount failed"
        pid = int(status(layout.mountpoint)["pid"])
        result = cli("unmount", layout.mountpoint, timeout=10.0)
        assert result.returncode == 0, result.stderr
        assert has_exited(pid)
        assert Path(f"/proc/{pid}").exists(), "the daemon was reaped: the test proves nothing"
    finally:
        helper.stdin.close()
        helper.wait(timeout=TIMEOUT)
        clear_mount(layout.mountpoint)
