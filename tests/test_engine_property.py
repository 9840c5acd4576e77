"""Property: whatever the guest does during a move (writes of any size and place, flushes, size
changes, at any moment relative to the copier), the move ends with the served bytes and the
destination both equal to a model of the guest's writes."""

from __future__ import annotations

import random

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedisk import move as move_module
from fusedisk.engine import Disk
from fusedisk.move import Phase
from tests.fakes import MemoryFile, MemoryStorage

SIZE = 256 * 1024

write = st.tuples(
    st.just("write"), st.integers(0, SIZE + 20000), st.integers(1, 40000), st.integers(0, 255)
)
truncate = st.tuples(st.just("truncate"), st.integers(0, SIZE * 2), st.just(0), st.just(0))
flush = st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0))
pause = st.tuples(st.just("pause"), st.integers(0, 6), st.just(0), st.just(0))
operation = st.one_of(write, write, write, truncate, flush, pause)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many small chunks give the guest many chances to land between and inside them.
    monkeypatch.setattr(move_module, "CHUNK", 16 * 1024)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(operation, max_size=40), seed=st.integers(0, 2**32 - 1), sparse=st.booleans())
def test_move_under_random_guest_io_matches_the_model(
    ops: list[tuple[str, int, int, int]], seed: int, sparse: bool
) -> None:
    trio.run(_scenario, ops, seed, sparse)


async def _scenario(ops: list[tuple[str, int, int, int]], seed: int, sparse: bool) -> None:
    rng = random.Random(seed)
    src = MemoryFile("/src", bytes(SIZE), sparse=True)
    if not sparse:
        src.pwrite(rng.randbytes(SIZE), 0)
    else:
        src.pwrite(rng.randbytes(5000), 70000)
    model = bytearray(src.data)
    storage = MemoryStorage(src)
    async with trio.open_nursery() as nursery:
        disk = Disk(src, storage, nursery)
        # Throttled so the pass lasts about as long as the operations (~0.1 s).
        move = await disk.start_move("/dst", rate_limit=4 << 20)
        for kind, a, b, c in ops:
            if kind == "write":
                data = bytes([c]) * b
                await disk.write(a, data)
                if a > len(model):
                    model.extend(bytes(a - len(model)))
                model[a : a + b] = data
            elif kind == "truncate":
                await disk.truncate(a)
                del model[a:]
                model.extend(bytes(a - len(model)))
            elif kind == "flush":
                await disk.flush()
            else:
                await trio.sleep(a * 0.001)
        with trio.fail_after(10):
            await move.finished_event.wait()
    assert move.phase is Phase.DONE, move.error
    dst = storage.files["/dst"]
    assert disk.primary is dst
    assert bytes(dst.data) == bytes(model)
    assert "/src" not in storage.files
