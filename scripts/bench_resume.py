"""`scripts/bench.py intent|resume`: the write-intent record's cost, and what a resumed move
copies (issue 9)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import benchlib as bl
from benchlib import MiB, Result, Run, Table

from fusedisk.storage import journal_path, marker_path
from fusedisk.units import parse_size

# fio, 4 KiB random writes, QD16, libaio O_DIRECT through the mount. uniform: flat out over the
# whole disk, the worst case for the record (it marks every region between two checkpoints). vm:
# a busy VM as the record sees it, 200 writes/s, 90 % into a hot 10 % of the disk, 10 % into the
# next 20 %, none into the rest.
WRITERS = {
    "uniform": ["--norandommap=1"],
    "vm": ["--norandommap=1", "--rate_iops=200", "--random_distribution=zoned:90/10:10/20:0/70"],
}
NORECORD = "fusedisk-move-norecord"


def intent_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", nargs="+", default=["4G", "1T"], help="%(default)s")
    p.add_argument("--data", type=int, default=1024, help="MiB of data (%(default)s)")
    p.add_argument("--before", type=float, default=3, help="writer s before the move (3)")
    p.add_argument(
        "--record",
        default="fusedisk-move",
        help="contenders keeping the record, each against " + NORECORD + " (%(default)s)",
    )
    p.add_argument(
        "--window", type=float, help="measure the move's first WINDOW s only, then cancel it"
    )
    _common_options(p)


def resume_options(p: argparse.ArgumentParser) -> None:
    p.set_defaults(size=4096)
    p.add_argument("--kill-at", type=float, default=0.9, help="of the copy (%(default)s)")
    p.add_argument("--give-way", help="FUSEDISK_GIVE_WAY for the daemon (default: its own)")
    _common_options(p)


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", default="40M", help="the move's copy rate limit (%(default)s)")
    p.add_argument("--writers", default="uniform,vm", help="%(default)s")
    p.add_argument("--ramp", type=float, default=1.5, help="writer warm-up s (%(default)s)")


def cost(args: argparse.Namespace) -> Result:
    """the writer's IOPS during a move with the write-intent record and without it.

    Each of --record (fusedisk-move; fusedisk-move-paced, -early: the same with the
    checkpoint's pacing knobs) against fusedisk-move-norecord (FUSEDISK_CHECKPOINT_EVERY=inf),
    interleaved, on a sparse image of each --sizes holding --data MiB in 16 MiB extents, the
    copy at --rate, under
    each of --writers (uniform, vm); target: with / without >= 0.9. Also each daemon's journal
    writes (checkpoints and mark batches)."""
    args.rate_bytes = parse_size(args.rate)
    cases = [(size, w) for size in args.sizes for w in args.writers.split(",")]
    record = args.record.split(",")
    plan = [f"{size} {w} {name}" for size, w in cases for name in (*record, NORECORD)]
    runs = bl.interleave(args.reps, plan, lambda entry: _cost_run(args, entry))
    table = Table(
        f"4 KiB random-write IOPS during a move with and without the write-intent record "
        f"(sparse images holding {args.data} MiB, copy at {args.rate}/s"
        + (f", the first {args.window:g} s of each move" if args.window else "")
        + f"; medians of {args.reps}, ratio per repetition in brackets)",
        [
            *("size", "writer", "record", "IOPS before"),
            *("IOPS during, record", "IOPS during, none"),
            *("record / none", ">= 0.9", "p99 ms, record", "p99 ms, none"),
            *("move s, record", "move s, none"),
            *("checkpoints", "journal writes"),
        ],
    )
    for (size, w), name in ((case, name) for case in cases for name in record):
        with_, without = (runs[f"{size} {w} {n}"] for n in (name, NORECORD))
        during = [bl.values(rs, "writer", "during", "iops") for rs in (with_, without)]
        kept = bl.compare(*during)
        table.add(
            size,
            w,
            name.removeprefix("fusedisk-move").lstrip("-") or "as is",
            bl.fmt(bl.med(with_ + without, "writer", "before", "iops"), 0),
            *(bl.fmt(bl.median(d), 0) for d in during),
            kept[1],
            bl.verdict(kept[0], 0.9),
            *(bl.med(rs, "writer", "during", "p99_ms") for rs in (with_, without)),
            *(bl.med(rs, "move_s") for rs in (with_, without)),
            *(bl.fmt(bl.med(with_, key), 0) for key in ("checkpoints", "intent_records")),
        )
    return [table], {"runs": runs}


def _cost_run(args: argparse.Namespace, entry: str) -> Run:
    size, writer, name = entry.split()
    with ExitStack() as stack:
        image, dest = args.dir / f"intent-{name}.img", args.dir / f"intent-{name}.dest"
        served, move = bl.prepare(stack, name, image, parse_size(size), dest, args.data * MiB)
        assert move is not None
        os.sync()
        fio = bl.Writer(stack, served, image.with_suffix(""), WRITERS[writer])
        time.sleep(args.ramp + args.before)
        move.start(args.rate_bytes)
        if args.window:  # the first --window s of the move, then it is cancelled
            r: Run = {"started": time.time()}
            time.sleep(args.window)
            r["finished"] = time.time()
            status = bl.status(served.file.parent)
            bl.fusedisk("cancel", served.file.parent)
        else:
            r = move.wait()
            status = bl.status(served.file.parent)
        edges = {"before": fio.started + args.ramp, "during": r["started"]}
        r["writer"] = fio.stop(edges | {"after": r["finished"]})
        r |= {key: status.get(key) for key in ("checkpoints", "intent_records")}
    return r


def resume(args: argparse.Namespace) -> Result:
    """what a move resumed after a crash copies.

    A --size MiB image moved at --rate under each of --writers; once the copy passes --kill-at,
    SIGKILL the daemon and the writer, mount again (the move resumes) and let it finish flat
    out: how much of the image the resumed move copied (target <= 0.2), how much it read from
    both files to compare (the regions the checkpoint marked), and what that checkpoint held."""
    args.rate_bytes = parse_size(args.rate)
    writers = args.writers.split(",")
    runs = bl.interleave(args.reps, writers, lambda w: _resume_run(args, w))
    table = Table(
        f"SIGKILL at {args.kill_at:g} of a {args.size} MiB move at {args.rate}/s under a writer"
        + (f" (FUSEDISK_GIVE_WAY={args.give_way})" if args.give_way else "")
        + f", then mount again: the resumed move (medians of {args.reps}; each repetition in "
        "brackets; fractions of the image)",
        [
            *("writer", "writes/s", "killed at", "checkpoint at", "marked below it"),
            *("resumed move copied", "<= 0.2", "compared", "of it equal", "resumed move (s)"),
        ],
    )

    def cell(rs: list[Run], key: str, digits: int = 3) -> str:
        each = ", ".join(bl.fmt(v, digits) for v in bl.values(rs, key))
        return bl.fmt(bl.med(rs, key), digits) + (f" ({each})" if rs[1:] else "")

    for w in writers:
        rs = runs[w]
        table.add(
            w,
            bl.fmt(bl.med(rs, "writes_per_s"), 0),
            *(cell(rs, key) for key in ("killed_at", "checkpoint_at", "marked_fraction")),
            cell(rs, "copied_fraction"),
            bl.verdict(bl.med(rs, "copied_fraction"), 0.2, at_most=True),
            cell(rs, "compared_fraction"),
            cell(rs, "equal_fraction"),
            cell(rs, "resumed_move_s", digits=1),
        )
    return [table], {"runs": runs}


def _resume_run(args: argparse.Namespace, writer: str) -> Run:
    size = args.size * MiB
    with ExitStack() as stack:
        image, dest = args.dir / "resume.img", args.dir / "resume.dest"
        for path in (image, dest, Path(journal_path(str(image))), Path(marker_path(str(dest)))):
            bl.scratch(stack, path)  # what a failed run may leave, too
        bl.make_image(image, size)
        env = {"FUSEDISK_GIVE_WAY": args.give_way} if args.give_way else None
        served = bl.serve_fusedisk(stack, image, env=env)
        mnt = served.file.parent
        bl.warm(image)
        fio = bl.Writer(stack, served, image.with_suffix(""), WRITERS[writer])
        time.sleep(args.ramp)
        bl.fusedisk("migrate", mnt, dest, "--detach", "--rate", str(args.rate_bytes))
        started = time.time()
        while (s := bl.status(mnt))["progress_bytes"] < args.kill_at * size:
            if s["phase"] != "mirroring":
                raise RuntimeError(f"the move ended before the kill: {s['phase']}, {s['error']}")
            time.sleep(0.02)
        os.kill(int(s["pid"]), signal.SIGKILL)  # the daemon this run mounted
        killed, killed_at = time.time(), s["progress_bytes"] / size
        bl.terminate(fio.proc, signal.SIGINT)  # it writes its log as it exits
        writes_per_s = _writes(fio.log[0], started, killed) / (killed - started)
        record = json.loads(Path(journal_path(str(image))).read_text())
        checkpoint = record.get("checkpoint") or {"cursor": 0, "marks": [], "region": 0}
        cursor = int(checkpoint["cursor"])
        marked = sum(1 for m in checkpoint["marks"] if m * checkpoint["region"] < cursor)
        bl.fusedisk("unmount", mnt)  # clears the stale mount
        mounted = time.time()
        line = bl.fusedisk("mount", image, mnt, "--name", "disk", env=env).strip()
        served.pid = int(bl.status(mnt)["pid"])
        bl.fusedisk("rate", mnt, "0")
        while (s := bl.status(mnt))["phase"] in ("mirroring", "switching"):
            time.sleep(0.1)
        if s["phase"] != "done" or s["resumed_from"] != cursor:
            raise RuntimeError(f"the resumed move: {s['phase']} from {s['resumed_from']}: {line}")
    return {
        "writes_per_s": round(writes_per_s),
        "killed_at": round(killed_at, 3),
        "checkpoint_at": round(cursor / size, 3),
        "marked_fraction": round(min(marked * checkpoint["region"], cursor) / size, 3),
        "copied_fraction": round(s["copied_bytes"] / size, 3),
        "compared_fraction": round(s["compared_bytes"] / size, 3),
        "equal_fraction": round(s["found_equal_bytes"] / size, 3),
        "resumed_move_s": round(s["finished"] - mounted, 1),
        "mount_line": line,
        "status": s,
    }


def _writes(lat_log: Path, start: float, end: float) -> int:
    """Writes fio completed in [start, end) (its latency log: Unix ms first on each line)."""
    with open(lat_log, encoding="ascii") as f:
        return sum(1 for line in f if start <= int(line.split(",", 1)[0]) / 1000 < end)
