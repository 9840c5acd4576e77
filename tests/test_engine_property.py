"""Property: whatever the guest does during a move (writes of any size and place, flushes, size
changes), wherever the copier stands, the move ends with the served bytes and the destination
both equal to a model of the guest's writes, and at every step the bytes below the copier's
cursor are the same on both files.

The copier's thread is stopped after it read each run of a chunk from the source and before it
writes it to the destination (a :class:`Turnstile` in the source's ``on_copy_read`` hook): the
window in which a guest write to the same bytes would be overwritten with the stale bytes read,
were the copier's range not held.  Every example starts with a write into the run the copier has
just read, so every example reaches that window; its other operations are applied one at a time
with the copier stopped wherever it has got to, some aimed at the run it stands in, and the
copier advances one run at a time while an operation waits for it, or when an ``advance`` says.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from contextlib import suppress

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedisk import move as move_module
from fusedisk.engine import Disk
from fusedisk.move import Move, Phase
from tests.fakes import MemoryFile, MemoryStorage

SIZE = 256 * 1024
CHUNK = 16 * 1024  # many small chunks: many places for the guest to land between and inside
WAIT = 10.0  # seconds: every wait here has an end

Op = tuple[str, int, int, int]
write = st.tuples(
    st.just("write"), st.integers(0, SIZE + 20000), st.integers(1, 40000), st.integers(0, 255)
)
# At an offset into the run the copier stands in: it holds that range, so the write must wait.
write_at_copier = st.tuples(
    st.just("write-at-copier"),
    st.integers(0, CHUNK - 1),
    st.integers(1, 40000),
    st.integers(0, 255),
)
truncate = st.tuples(st.just("truncate"), st.integers(0, SIZE * 2), st.just(0), st.just(0))
flush = st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0))
advance = st.tuples(st.just("advance"), st.integers(1, 6), st.just(0), st.just(0))
operation = st.one_of(write, write, write_at_copier, write_at_copier, truncate, flush, advance)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(move_module, "CHUNK", CHUNK)
    # The copier, stopped in the turnstile, would then give the guest as long again.
    monkeypatch.setattr(move_module, "GIVE_WAY", 0.0)


async def wait_until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT):
        while not condition():
            await trio.sleep(0.0005)  # for the copier's thread: no task to wait on


class Turnstile:
    """Stops the copier's thread in ``on_copy_read`` until :meth:`advance` lets it through."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.at: tuple[int, int] | None = None  # (offset, length) of the run it stands in
        self._go: threading.Event | None = None
        self._open = False

    def __call__(self, offset: int, length: int) -> None:  # in the copier's thread
        if self._open:
            return
        go = threading.Event()
        trio.from_thread.run_sync(self._arrive, offset, length, go, trio_token=self._token)
        assert go.wait(WAIT), "the test never let the copier through"

    def _arrive(self, offset: int, length: int, go: threading.Event) -> None:
        if self._open:
            go.set()
        else:
            self.at, self._go = (offset, length), go

    async def advance(self, move: Move) -> None:
        """Let the copier finish its run; return once it stands in the next one, or the pass
        is over (the move's step is no longer "copying")."""
        go, self._go, self.at = self._go, None, None
        assert go is not None, "the copier is not stopped"
        go.set()
        await wait_until(lambda: self.at is not None or move.step != "copying")

    def open(self) -> None:
        """From now on, let the copier run freely."""
        self._open = True
        go, self._go, self.at = self._go, None, None
        if go is not None:
            go.set()


class Guest:
    """Applies operations to the disk and to a model of its bytes, one at a time."""

    def __init__(self, disk: Disk, move: Move, dst: MemoryFile, nursery: trio.Nursery) -> None:
        self.disk, self.move, self.dst, self.nursery = disk, move, dst, nursery
        assert isinstance(disk.primary, MemoryFile)
        assert isinstance(disk.primary.on_copy_read, Turnstile)
        self.src, self.turnstile = disk.primary, disk.primary.on_copy_read
        self.model = bytearray(self.src.data)

    async def settle(self) -> None:
        """Until every task waits and, while the copier is stopped, every mirrored write
        submitted has landed.  (Only then: the barrier is a call of the test's own in the
        writes' lane, which the switch, counting only the guest's operations in flight, would
        find still queued.)"""
        await trio.testing.wait_all_tasks_blocked()
        if self.turnstile.at is not None and (mirror := self.disk.mirror) is not None:
            with suppress(OSError):  # given up: the move's error says why
                await mirror.wait_writes()
        await trio.testing.wait_all_tasks_blocked()

    def check_below_cursor(self) -> None:
        if self.disk.mirror is None or self.move.phase is not Phase.MIRRORING:
            return  # switched or failed back: the final checks say which and why
        src, dst = self.src.data, self.dst.data
        end = min(self.move.cursor, len(src))
        if src[:end] != dst[:end]:
            first = next(i for i in range(end) if src[i] != dst[i])
            raise AssertionError(
                f"below the copier's cursor ({end}) the destination differs from the source "
                f"from offset {first}: stale bytes"
            )

    def at_copier(self, offset: int) -> int:
        """``offset`` into the run the copier stands in (into the disk once the pass is over)."""
        start, length = self.turnstile.at or (0, SIZE)
        return start + offset % length

    async def apply(self, kind: str, offset: int = 0, data: bytes = b"") -> None:
        """Apply one operation, advancing the copier for as long as the operation waits."""
        done = trio.Event()

        async def run() -> None:
            if kind == "flush":
                await self.disk.flush()
            elif kind == "truncate":
                await self.disk.truncate(offset)
            else:
                await self.disk.write(offset, data)
            done.set()

        if offset > len(self.model):
            self.model.extend(bytes(offset - len(self.model)))
        if kind == "truncate":
            del self.model[offset:]
        elif kind == "write":
            self.model[offset : offset + len(data)] = data
        self.nursery.start_soon(run)
        await self.settle()
        while not done.is_set():
            if self.turnstile.at is not None:
                await self.turnstile.advance(self.move)
                await self.settle()
            else:
                with trio.fail_after(WAIT):
                    await done.wait()
        self.check_below_cursor()

    async def advance(self, runs: int) -> None:
        for _ in range(runs):
            if self.turnstile.at is None:
                return
            await self.turnstile.advance(self.move)
            await self.settle()
            self.check_below_cursor()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    first=st.tuples(st.integers(0, CHUNK - 1), st.integers(1, 40000)),
    ops=st.lists(operation, max_size=40),
    seed=st.integers(0, 2**32 - 1),
    sparse=st.booleans(),
)
@pytest.mark.parametrize("dest_timeout", [0.0, WAIT], ids=["inline", "worker"])
def test_move_under_random_guest_io_matches_the_model(
    dest_timeout: float, first: tuple[int, int], ops: list[Op], seed: int, sparse: bool
) -> None:
    trio.run(_scenario, dest_timeout, first, ops, seed, sparse)


async def _scenario(
    dest_timeout: float, first: tuple[int, int], ops: list[Op], seed: int, sparse: bool
) -> None:
    rng = random.Random(seed)
    src = MemoryFile("/src", bytes(SIZE), sparse=True)
    if not sparse:
        src.pwrite(rng.randbytes(SIZE), 0)
    else:
        src.pwrite(rng.randbytes(5000), 70000)
    storage = MemoryStorage(src)
    turnstile = Turnstile()
    src.on_copy_read = turnstile
    async with trio.open_nursery() as nursery:
        try:
            disk = Disk(src, storage, nursery)
            # Unthrottled: the turnstile sets the pace.  The workers' deadline is far above
            # how long an example keeps the copier stopped.
            move = await disk.start_move("/dst", dest_timeout=dest_timeout)
            guest = Guest(disk, move, storage.files["/dst"], nursery)
            await wait_until(lambda: turnstile.at is not None)
            # The copier has read its first run from the source: write into it, with bytes
            # unlike every byte there, so that a stale overwrite cannot go unseen.
            where, length = guest.at_copier(first[0]), first[1]
            old = bytes(guest.model[where : where + length]).ljust(length, b"\0")
            await guest.apply("write", where, bytes(x ^ 0xFF for x in old))
            for kind, a, b, c in ops:
                if kind == "advance":
                    await guest.advance(a)
                elif kind == "write-at-copier":
                    await guest.apply("write", guest.at_copier(a), bytes([c]) * b)
                elif kind == "write":
                    await guest.apply("write", a, bytes([c]) * b)
                else:
                    await guest.apply(kind, a)
            turnstile.open()
            with trio.fail_after(WAIT):
                await move.finished_event.wait()
        finally:
            turnstile.open()  # a failed example must not keep the copier's thread waiting
    assert move.phase is Phase.DONE, move.error
    dst = storage.files["/dst"]
    assert disk.primary is dst
    assert bytes(dst.data) == bytes(guest.model)
    assert "/src" not in storage.files
