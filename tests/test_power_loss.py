"""Power loss at every step: the real engine, storage and recovery over the power-loss model.

Each scenario runs fusedisk's own code on real files (a 256 KiB image, 64 KiB copy chunks) while a
guest task writes unique 4 KiB blocks and flushes, with every change recorded
(:mod:`tests.powerloss`).  Then, after every entry of the log, for what a power cut there could
leave (only the durable state, everything, and a drawn mix), the real start-up code
(``daemon.open_image``: recovery, then the file to serve) runs on those files, and:

- every write acknowledged before a completed guest flush (or before the daemon's final flush at
  unmount) reads back, or a later write to its block does; nothing else appears;
- the source is never gone without a durable switch record naming a destination that holds all
  that (DESIGN.md, "Source authoritative until the switch");
- the disk can always be mounted again: from its original path, or after a finished move from the
  destination's, as the status told the user; recovery leaves no journal and no partial file;
- what recovery serves, it serves again if recovery itself is cut short at any step, and a
  later move (the user runs the same migrate again) switches to exactly those bytes;

and, at the moments the design names: when a guest flush returns while mirroring, the
destination holds durably every write acknowledged before the flush began ("Flush means both");
when the switch record becomes durable, the destination holds durably every acknowledged write
("Switch is short and durable").
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from fusedisk import intent as intent_module
from fusedisk import move as move_module
from fusedisk.backend import PosixFile
from fusedisk.daemon import final_flush, open_image
from fusedisk.engine import Disk
from fusedisk.errors import UsageError
from fusedisk.move import Phase
from fusedisk.storage import PosixStorage, journal_path, marker_path
from tests.powerloss import Files, Model, RecordingOS, Rename, Write, materialise, recording
from tests.test_resume import checkpoint_whenever_none_runs

BLOCK = 4096
BLOCKS = 64  # a 256 KiB image: every crash state is a few small files
HOT = 8  # half the writes go to these blocks, so rewrites and "the last flushed" matter
CHUNK = 64 << 10  # four copy chunks, so a crash can fall between them
REGION = 16 << 10  # the write-intent record's regions: sixteen
RATE = 1 << 20  # bytes/s: the copy pass takes about a quarter of a second
KEEPS = ("durable", "all", "some")
WAIT = 10.0  # seconds: a bound on any move here (they take milliseconds)


def pattern(block: int, seq: int) -> bytes:
    return struct.pack("<QQ", block, seq) * (BLOCK // 16)


# ---- the guest ----------------------------------------------------------------------------


@dataclass
class GuestWrite:
    block: int
    seq: int
    issued: int  # log indexes
    acked: int | None = None


@dataclass
class Flush:
    started: int
    done: int
    mirror: str | None  # the destination it had to reach, if mirroring throughout


@dataclass
class Guest:
    """Writes unique blocks through the engine and flushes, logging both in the model's log."""

    disk: Disk
    recorder: RecordingOS
    rng: random.Random
    writes: list[GuestWrite] = field(default_factory=list)
    flushes: list[Flush] = field(default_factory=list)
    mirroring_from: int | None = None  # writes issued after this index were mirrored
    pause_flushes = False
    at_third_checkpoint: Callable[[], None] | None = None
    _flushing = False
    _checkpoints = 0
    _last_cursor = -1
    _flush_ended: trio.Event = field(default_factory=trio.Event)

    async def write(self, block: int | None = None) -> None:
        if block is None:
            block = self.rng.randrange(HOT if self.rng.random() < 0.5 else BLOCKS)
        write = GuestWrite(block, len(self.writes) + 1, self.recorder.event("issue"))
        self.writes.append(write)
        await self.disk.write(block * BLOCK, pattern(block, write.seq))
        write.acked = self.recorder.event("ack")

    async def flush(self) -> None:
        mirror = self.disk.mirror
        self._flushing = True
        try:
            started = self.recorder.event("flush")
            await self.disk.flush()
            throughout = mirror is not None and self.disk.mirror is mirror
            done = self.recorder.event("flushed")
            self.flushes.append(
                Flush(started, done, mirror.path if mirror and throughout else None)
            )
        finally:
            self._flushing = False
            self._flush_ended.set()
            self._flush_ended = trio.Event()

    async def run(self, stop: trio.Event) -> None:
        """Write, and flush every third write, until told to stop."""
        while not stop.is_set():
            for _ in range(3):
                await self.write()
            if not self.pause_flushes:
                await self.flush()
            await trio.sleep(0.003)

    def act_on(self, entry: Write) -> None:
        """Called with every write the recorder logs, in the writer's thread.  The switch
        record written aside (I/O not yet held): once no guest flush is under way, one more
        write, and no flush until the move ends.  Only the destination's flush inside the hold
        makes it durable before the switch is committed.  It also counts checkpoints."""
        if not entry.data.startswith(b"{"):
            return  # not a record
        if b'"switched"' in entry.data:
            trio.from_thread.run(self._write_alone)
        elif b'"checkpoint"' in entry.data:
            cursor = json.loads(entry.data)["checkpoint"]["cursor"]
            if cursor > self._last_cursor:  # a new checkpoint (a mark keeps the cursor)
                self._last_cursor = cursor
                self._checkpoints += 1
                if self._checkpoints == 3 and self.at_third_checkpoint is not None:
                    self.at_third_checkpoint()

    async def _write_alone(self) -> None:
        self.pause_flushes = True
        while self._flushing:
            await self._flush_ended.wait()
        await self.write()

    def allowed(self, block: int, position: int, final: Flush | None) -> set[int]:
        """The write numbers (0: the original bytes) that ``block`` may hold after a power cut
        at ``position``: its last write acknowledged before the last completed flush began,
        or any later write issued by then."""
        flushes = [f for f in self.flushes if f.done < position]
        if final is not None and final.done < position:
            flushes.append(final)
        base = 0
        if flushes:
            covered = max(flushes, key=lambda f: f.done).started
            acked = [w for w in self.writes if w.block == block and w.acked is not None]
            base = max((w.seq for w in acked if (w.acked or 0) < covered), default=0)
        later = {w.seq for w in self.writes if w.block == block and w.seq > base}
        return {base} | {seq for seq in later if self.writes[seq - 1].issued < position}


def decode(data: bytes, original: bytes) -> list[int | None]:
    """Per block: the write number it holds, 0 for the original bytes, None for anything else."""
    seqs: list[int | None] = []
    for i in range(BLOCKS):
        block = data[i * BLOCK : (i + 1) * BLOCK]
        if block == original[i * BLOCK : (i + 1) * BLOCK]:
            seqs.append(0)
            continue
        number, seq = struct.unpack_from("<QQ", block) if len(block) == BLOCK else (None, 0)
        seqs.append(seq if number == i and block == pattern(i, seq) else None)
    return seqs


# ---- a scenario ---------------------------------------------------------------------------


@dataclass
class Run:
    source: str
    dest: str
    original: bytes
    recorder: RecordingOS
    guest: Guest
    final: Flush | None = None  # the daemon's flush at unmount
    resumed: int = 0  # crash states whose recovery resumed the move


async def record_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str, seed: int = 1
) -> Run:
    """Run ``scenario`` with the guest writing and flushing, then shut down as the daemon
    does at unmount (fail back a running move, final flush), all recorded."""
    monkeypatch.setattr(move_module, "CHUNK", CHUNK)
    # A checkpoint after every chunk, and 16 KiB regions: resuming is reached, and its marks
    # are fine enough to matter.
    checkpoint_whenever_none_runs(monkeypatch)
    monkeypatch.setattr(intent_module, "MIN_REGION", REGION)
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    source, dest = str(src_dir / "disk.img"), str(dst_dir / "disk.img")
    original = random.Random(seed).randbytes(BLOCKS * BLOCK)
    Path(source).write_bytes(original)  # durable as the model starts (its assumption)
    with recording(monkeypatch, [str(src_dir), str(dst_dir)]) as recorder:
        image = PosixFile.open(source)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            disk = Disk(image, PosixStorage(), nursery)
            guest = Guest(disk, recorder, random.Random(seed))
            async with trio.open_nursery() as guest_nursery:
                guest_nursery.start_soon(guest.run, stop)
                recorder.after_write = guest.act_on
                await trio.sleep(0.01)
                move = await disk.start_move(
                    dest,
                    rate_limit=RATE,
                    verify=scenario == "verify",
                    dest_timeout=1.0 if scenario == "threaded" else 0.0,
                )
                guest.mirroring_from = recorder.event("mirroring")
                if scenario == "threaded":  # the native lane, its writes logged when reaped
                    assert move.dest_writes == "native thread", move.dest_writes
                if scenario == "fail-back":
                    # From the third checkpoint on (the guest has flushed since the second),
                    # every write to the destination fails, and the move fails back.
                    guest.at_third_checkpoint = lambda: recorder.fail_after(dest, 0)
                if scenario == "unmount-while-mirroring":
                    with trio.fail_after(WAIT):
                        while not [f for f in guest.flushes if f.mirror]:
                            await trio.sleep(0.001)
                    assert move.phase is Phase.MIRRORING, "too late to unmount while mirroring"
                else:
                    with trio.fail_after(WAIT):
                        await move.finished_event.wait()
                    guest.pause_flushes = False
                    await trio.sleep(0.02)  # writes after the switch (or the fail-back)
                stop.set()
            for _ in range(3):  # unflushed: only the final flush at unmount keeps these
                await guest.write()
            nursery.cancel_scope.cancel()  # as serve() does once unmounted
        final_started = recorder.event("unmount")
        final_flush(disk.primary)
        final = Flush(final_started, recorder.event("unmounted"), None)
    expected = {
        "fail-back": Phase.FAILED,
        "unmount-while-mirroring": Phase.FAILED,
    }.get(scenario, Phase.DONE)
    assert move.phase is expected, (move.phase, move.error)
    return Run(source, dest, original, recorder, guest, final)


# ---- the checks ---------------------------------------------------------------------------


def digest(files: Files) -> str:
    h = hashlib.sha256()
    for path, (data, mode, _) in sorted(files.items()):
        h.update(f"{path}\0{mode}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def shape(files: Files) -> tuple[object, ...]:
    """Which files exist and what the journal says: states of one shape recover alike."""
    journals = tuple(sorted(f[0] for path, f in files.items() if "fusedisk-move" in path))
    return tuple(sorted(files)), journals


def journal_record(run: Run, files: Files) -> dict[str, object] | None:
    entry = files.get(journal_path(run.source))
    return None if entry is None else dict(json.loads(entry[0]))


def lay_down(run: Run, recorder: RecordingOS, files: Files) -> None:
    """Materialise ``files``.  The journal names the destination by its inode, which a file
    laid down again cannot keep: where it names the file the model knows as the destination,
    rename it to the new inode (the same file, for every purpose of the test)."""
    ids = materialise(files, recorder.roots)
    record = journal_record(run, files)
    checkpoint = record.get("checkpoint") if record else None
    if not isinstance(checkpoint, dict) or run.dest not in files:
        return
    dest_ino = files[run.dest][2]
    if checkpoint["destination_id"] == recorder.real_ids.get(dest_ino):
        checkpoint["destination_id"] = ids[dest_ino]
        Path(journal_path(run.source)).write_text(json.dumps(record))


async def remount(
    run: Run, files: Files, where: str, recorder: RecordingOS | None = None
) -> tuple[str, bytes]:
    """Lay ``files`` down and start the disk again as a user would after the power cut: from
    its original path, or, after a finished move (no source, no journal), from the
    destination's.  A move that recovery resumes runs to its end, and must switch to exactly
    the bytes served at the remount.  Check nothing of the move is left behind; return what
    was served at the remount."""
    lay_down(run, recorder or run.recorder, files)
    present = run.source in files or journal_path(run.source) in files
    path = run.source if present else run.dest
    try:
        image, _, resumed = open_image(path)
    except UsageError as e:
        pytest.fail(f"{where}: mounting {path} again was refused: {e}; files: {sorted(files)}")
    data, served = image.pread(BLOCKS * BLOCK + 1, 0), image.path
    if resumed is None:
        image.close()
    else:
        run.resumed += 1
        async with trio.open_nursery() as nursery:
            disk = Disk(image, PosixStorage(), nursery)
            # (At full speed: the run's rate limit, which resuming keeps, is not under test.)
            move = await disk.resume_move({**resumed, "rate_limit": 0}, dest_timeout=0)
            with trio.fail_after(WAIT):
                await move.finished_event.wait()
        after, served = disk.primary.pread(BLOCKS * BLOCK + 1, 0), disk.primary.path
        disk.primary.close()
        assert move.phase is Phase.DONE, f"{where}: the resumed move ended {move.error}"
        changed = [
            i
            for i in range(BLOCKS)
            if after[i * BLOCK : (i + 1) * BLOCK] != data[i * BLOCK : (i + 1) * BLOCK]
        ]
        assert not changed, f"{where}: after the resumed move's switch, blocks {changed} differ"
    # (A record prepared aside, journal + ".tmp", may remain: it is never read, only replaced.)
    assert not os.path.exists(journal_path(run.source)), f"{where}: the journal remains"
    assert not os.path.exists(marker_path(run.dest)), f"{where}: a partial marker remains"
    other = run.dest if served == run.source else run.source
    assert not os.path.exists(other), f"{where}: serving {served}, but {other} remains"
    return served, data


def check_blocks(run: Run, data: bytes, position: int, where: str) -> None:
    """Every block holds what ``Guest.allowed`` says it may; the size never changed."""
    assert len(data) == BLOCKS * BLOCK, f"{where}: size {len(data)}"
    for block, seq in enumerate(decode(data, run.original)):
        allowed = run.guest.allowed(block, position, run.final)
        assert seq in allowed, f"{where}: block {block} holds write {seq}, allowed {allowed}"


def check_source_kept(run: Run, files: Files, position: int, where: str) -> None:
    """No source without a durable switch record naming a destination that holds it all."""
    if run.source in files:
        return
    record = journal_record(run, files)
    if record is None and run.dest in files and marker_path(run.dest) not in files:
        return  # a finished move: the destination is the disk
    assert record is not None and record["phase"] == "switched", f"{where}: source gone, {record}"
    assert run.dest in files, f"{where}: source gone, and the destination too"
    check_blocks(run, files[run.dest][0], position, f"{where} (destination, source gone)")


def check_flushes_reached_destination(run: Run, model: Model, flush: Flush) -> None:
    """DESIGN.md "Flush means both": once a guest flush returns while mirroring, every write
    acknowledged before it began is durable on the destination too."""
    assert flush.mirror is not None and run.guest.mirroring_from is not None
    files = model.crash("durable")
    assert flush.mirror in files, "the destination's name is not durable while mirroring"
    durable = decode(files[flush.mirror][0], run.original)
    for block in range(BLOCKS):
        acked = [w for w in run.guest.writes if w.block == block and w.acked is not None]
        before = [w for w in acked if w.acked < flush.started]  # type: ignore[operator]
        if not before or before[-1].issued < run.guest.mirroring_from:
            continue  # the copier's to bring over, not this flush's
        since = {
            w.seq
            for w in run.guest.writes
            if w.block == block and w.seq >= before[-1].seq and w.issued < model.position
        }
        assert durable[block] in since, (
            f"flush at {flush.started}..{flush.done}: destination block {block} durably holds "
            f"write {durable[block]}, not write {before[-1].seq} or a later one"
        )


def check_switch_is_durable(run: Run, model: Model) -> None:
    """At the moment the switch record becomes durable, the destination durably holds every
    acknowledged write (no write is in flight: I/O is held)."""
    files = model.crash("durable")
    last: dict[int, int] = {}
    for w in run.guest.writes:
        if w.acked is not None and w.acked < model.position:
            last[w.block] = w.seq
    durable = decode(files[run.dest][0], run.original)
    for block in range(BLOCKS):
        if durable[block] != last.get(block, 0):
            write = run.guest.writes[last[block] - 1] if block in last else None
            syncs = [
                (i, e)
                for i, e in enumerate(run.recorder.log[: model.position])
                if type(e).__name__ in ("Fsync", "Rename", "FsyncDir")
            ][-8:]
            pytest.fail(
                f"switch recorded at {model.position}: destination block {block} durably holds "
                f"write {durable[block]}, not {last.get(block, 0)} ({write}); last syncs: {syncs}"
            )


async def check_every_crash(run: Run) -> tuple[dict[tuple[object, ...], Files], set[str]]:
    """Cut the power after every entry of the run's log; return one state of each shape, and
    the steps of the move the durable states were found at."""
    model = Model(run.recorder)
    log = run.recorder.log
    flushes = {f.done: f for f in run.guest.flushes if f.mirror is not None}
    served_by_state: dict[str, tuple[str, bytes]] = {}
    shapes: dict[tuple[object, ...], Files] = {}
    switch_seen = False
    steps: set[str] = set()
    for position in range(len(log) + 1):
        if position:
            model.step()
        if position - 1 in flushes:
            check_flushes_reached_destination(run, model, flushes[position - 1])
        for keep in KEEPS:
            files = model.crash(keep, seed=position)
            where = f"power cut after entry {position} of {len(log)} ({keep} kept)"
            check_source_kept(run, files, position, where)
            key = digest(files)
            if key not in served_by_state:
                served_by_state[key] = await remount(run, files, where)
                shapes.setdefault(shape(files), files)
            check_blocks(run, served_by_state[key][1], position, where)
        durable = model.crash("durable")
        record = journal_record(run, durable)
        phase = "no move" if record is None else str(record["phase"])
        steps.add(phase + (", source gone" if run.source not in durable else ""))
        if not switch_seen and record is not None and record["phase"] == "switched":
            check_switch_is_durable(run, model)
            switch_seen = True
    return shapes, steps


async def check_recovery_is_crash_safe(
    run: Run, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery cut short at any step, then run again, serves what it would have served."""
    expected = await remount(run, files, "recovery uninterrupted")
    lay_down(run, run.recorder, files)
    present = run.source in files or journal_path(run.source) in files
    with recording(monkeypatch, run.recorder.roots) as recorder:
        image, _, _ = open_image(run.source if present else run.dest)
        image.close()
    model = Model(recorder)
    for position in range(len(recorder.log) + 1):
        if position:
            model.step()
        for keep in ("durable", "all"):
            where = f"recovery cut after its entry {position} ({keep} kept)"
            again = await remount(run, model.crash(keep), where, recorder)
            assert again == expected, where


async def check_later_move(run: Run, files: Files) -> None:
    """After recovery, the same move run again (or back, after a finished one) switches to
    exactly the bytes recovery served."""
    served, data = await remount(run, files, "before a later move")
    image, _, _ = open_image(served)
    target = run.dest if served == run.source else run.source
    async with trio.open_nursery() as nursery:
        disk = Disk(image, PosixStorage(), nursery)
        move = await disk.start_move(target, dest_timeout=0)
        with trio.fail_after(WAIT):
            await move.finished_event.wait()
    disk.primary.close()
    assert move.phase is Phase.DONE, move.error
    assert Path(target).read_bytes() == data


def writes_in_switch_window(run: Run) -> int:
    """Writes acknowledged after the switch record was written aside and before it was
    committed (I/O not yet held): only the flush inside the hold makes them durable."""
    log = run.recorder.log
    journal = os.path.basename(journal_path(run.source))
    prepared = next(
        i for i, e in enumerate(log) if isinstance(e, Write) and b'"switched"' in e.data
    )
    committed = next(
        i
        for i, e in enumerate(log)
        if isinstance(e, Rename) and e.old == journal + ".tmp" and e.new == journal
    )
    return sum(
        1 for w in run.guest.writes if w.acked is not None and prepared < w.acked < committed
    )


SCENARIOS = ["move", "verify", "threaded", "fail-back", "unmount-while-mirroring"]


@pytest.fixture
def files_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the runs' files go: tmpfs if there is one (the model decides what is durable,
    not the disk, so its fsyncs need not cost; a slow fsync makes the guest flush less)."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="fusedisk-powerloss-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_power_loss_at_every_step(
    files_dir: Path, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    run = await record_run(files_dir, monkeypatch, scenario)
    mirrored_flushes = [f for f in run.guest.flushes if f.mirror is not None]
    assert len(mirrored_flushes) >= 1, "the guest must flush while mirroring"
    if scenario in ("move", "verify", "threaded"):
        assert writes_in_switch_window(run) >= 1, (
            "no write fell between the last flush and the hold"
        )
    shapes, steps = await check_every_crash(run)
    # Power cuts fell in every step: before, while mirroring, switched with the source still
    # there and with it gone, and after the move (or its fail-back).
    expected = {"no move", "mirroring"}
    if scenario in ("move", "verify", "threaded"):
        expected |= {"switched", "switched, source gone", "no move, source gone"}
    assert steps == expected
    assert run.resumed > 0, "no crash state resumed the move"
    for files in shapes.values():
        await check_recovery_is_crash_safe(run, files, monkeypatch)
        await check_later_move(run, files)
