"""`scripts/bench.py move`: live moves, idle and under a writer."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import benchlib as bl
from benchlib import MiB, Result, Run, Table, fmt

from fusedisk.units import parse_size

SCENARIOS = {
    "idle": ("cp", "fusedisk-move", "fusedisk-move-inline", "qsd-move"),
    "load": ("fusedisk-move", "fusedisk-move-inline", "qsd-move", "floor", "floor-mirror"),
    "lanes": ("fusedisk-move-inline", "fusedisk-move", "fusedisk-move-threads"),
}
LABELS = {  # table columns
    "fusedisk-move": "fusedisk",
    "fusedisk-move-inline": "fusedisk inline (--dest-timeout 0)",
    "fusedisk-move-threads": "fusedisk, writes on a Python thread",
    "qsd-move": "qsd mirror (NBD export)",
    "floor": "floor",
    "floor-mirror": "floor-mirror",
}


MACHINERY = "writer IOPS during, default (1 s deadline) / inline"  # the deadline's cost


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenarios", default="idle,load", help="idle, load, lanes (%(default)s)")
    p.add_argument("--before", type=float, default=5, help="writer s before the move (5)")
    p.add_argument("--after", type=float, default=5, help="writer s after the move (5)")
    p.add_argument("--ramp", type=float, default=1.5, help="writer warm-up s, not counted (1.5)")
    p.add_argument("--rate", default="0", help="copy rate limit of the movers, like 200M")
    p.add_argument("--remote", action="store_true", help="move to sshfs from a private sshd")


def run(args: argparse.Namespace) -> Result:
    """live moves, idle and under a writer, against cp, qsd and the floors.

    Each contender on a fresh non-sparse image; each repetition runs every scenario's in turn.
    idle: cp (then fdatasync, then rm and a directory fsync, each timed); fusedisk-move
    (`fusedisk migrate` as it is by default: a 1 s deadline, mirrored writes on the native
    thread); fusedisk-move-inline (--dest-timeout 0: no deadline, the destination written by the
    event loop itself); qsd-move (blockdev-mirror).
    load: the same moves while fio writes 4 KiB at random, QD16, through the contender, and
    floor and floor-mirror under that writer with no move (their "during" is --before s long).
    lanes: load's writer under fusedisk's moves only: inline, the default, and the default with
    its writes on a Python thread instead of the native one (the cost of the deadline's
    workers, without the other contenders' time).
    qsd-move serves through an NBD export (qemu-storage-daemon 7.2 cannot mirror a node under a
    writable FUSE export), its writer through fio's nbd engine. The writer's log splits exactly
    at each move's own start and end; qsd's switch pause is job-complete -> BLOCK_JOB_COMPLETED,
    an upper bound. --remote moves (and cp) to sshfs from a private sshd on 127.0.0.1
    (tests/remote.py's fixture)."""
    args.rate_bytes, scenarios = parse_size(args.rate), args.scenarios.split(",")
    if not set(scenarios) <= SCENARIOS.keys():
        raise SystemExit(f"bench: the scenarios are {', '.join(SCENARIOS)}")
    plan = [f"{s} {name}" for s in scenarios for name in SCENARIOS[s]]
    # sshfs passes fsync on to sshd (fsync@openssh.com), which fsyncs the file
    where = "to sshfs from a private sshd on 127.0.0.1" if args.remote else "to --dir"
    with ExitStack() as stack:  # the remote, if any, for the whole run
        args.dest = bl.sshfs_destination(stack, args.dir / "remote") if args.remote else args.dir
        runs = bl.interleave(args.reps, plan, lambda entry: one(args, entry))
    tables = [*idle_tables(runs, where), *load_tables(runs, where)]
    tables += load_tables(runs, where, "lanes")
    return tables, {"runs": runs}


def one(args: argparse.Namespace, entry: str) -> Run:
    """One contender in one scenario (``entry``: "SCENARIO NAME"), from a fresh image to
    everything removed."""
    scenario, name = entry.split()
    with ExitStack() as stack:
        image, dest = args.dir / f"{scenario}-{name}.img", args.dest / f"{scenario}-{name}.dest"
        if name == "cp":
            bl.prepare(stack, "raw", image, args.size * MiB)
            return run_cp(image, bl.scratch(stack, dest))
        served, move = bl.prepare(stack, name, image, args.size * MiB, dest)
        writer = None if scenario == "idle" else bl.Writer(stack, served, image.with_suffix(""))
        time.sleep(0 if writer is None else args.ramp + args.before)
        r: Run = {"started": time.time()}
        if move is None:  # a floor: the same writer, no move
            time.sleep(args.before)
            r["finished"] = time.time()
        else:
            move.start(args.rate_bytes)
            r |= move.wait()  # with the move's own start and end
        if writer is not None:
            time.sleep(args.after)
            edges = {"before": writer.started + args.ramp, "during": r["started"]}
            r["writer"] = writer.stop(edges | {"after": r["finished"]})
            if move is not None:  # the switch is its last step but the source's deletion
                last_second = writer.window(r["finished"] - 1, r["finished"] + 0.1)
                r["worst_ms_last_1s_of_move"] = last_second["max_ms"]
        return r


def run_cp(src: Path, dst: Path) -> Run:
    """cp timed; then an fdatasync of the copy; then rm of the source and an fsync of its
    directory, each timed on its own: a durable copy, as a move is."""
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    t1 = time.perf_counter()
    sync(dst, os.fdatasync)
    t2 = time.perf_counter()
    src.unlink()
    sync(src.parent, os.fsync)
    t3 = time.perf_counter()
    return {
        "cp_s": round(t1 - t0, 3),
        "cp_fdatasync_s": round(t2 - t0, 3),
        "cp_fdatasync_rm_s": round(t3 - t0, 3),
    }


def sync(path: Path, how: Callable[[int], None]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        how(fd)
    finally:
        os.close(fd)


def idle_tables(runs: dict[str, list[Run]], where: str) -> list[Table]:
    cp = runs.get("idle cp", [])
    if not cp:
        return []
    movers = {name: runs.get(f"idle {name}", []) for name in SCENARIOS["idle"][1:]}
    t = Table(
        f"Idle move {where} (medians; ratios median/median, per repetition in brackets; "
        "cp+fdatasync: cp, then fdatasync of the copied file, not sync -f)",
        ["", "cp", "cp+fdatasync", "cp+fdatasync+rm", *(LABELS[name] for name in movers)],
    )
    cps = [bl.values(cp, k) for k in ("cp_s", "cp_fdatasync_s", "cp_fdatasync_rm_s")]
    moves = {name: bl.values(rs, "move_s") for name, rs in movers.items()}
    t.add("time (s)", *map(bl.median, [*cps, *moves.values()]))
    over = {name: bl.compare(m, cps[0]) for name, m in moves.items()}
    t.add("time / cp", *(bl.compare(c, cps[0])[1] for c in cps), *(o[1] for o in over.values()))
    # fusedisk's moves also delete the source; qsd's mirror leaves it
    durable = {n: bl.compare(m, cps[1 if n == "qsd-move" else 2]) for n, m in moves.items()}
    no_cp = ("-", "-", "-")
    t.add(
        "time / durable cp (fusedisk: +rm)", "-", "1.00", "1.00", *(d[1] for d in durable.values())
    )
    fd = moves["fusedisk-move"]
    t.add("time / fusedisk's", *no_cp, *(bl.compare(m, fd)[1] for m in moves.values()))
    t.add("switch pause (ms)", *no_cp, *(bl.med(rs, "switch_pause_ms") for rs in movers.values()))
    t.add("moves failed back", *no_cp, *(_failed_back(rs) for rs in movers.values()))
    t.add("copied / size", *no_cp, *(bl.med(rs, "copied_ratio") for rs in movers.values()))
    v = Table("Idle move targets", ["target", "fusedisk", "goal", "verdict"])
    v.target("move time / cp", over["fusedisk-move"], 1.2, at_most=True)
    v.target("move time / durable cp", durable["fusedisk-move"], 1.2, at_most=True)
    v.target("move time at most qsd's (s)", bl.median(fd), bl.median(moves["qsd-move"]), True)
    v.target("switch pause (ms)", bl.med(movers["fusedisk-move"], "switch_pause_ms"), 10, True)
    return [t, v]


def load_tables(runs: dict[str, list[Run]], where: str, scenario: str = "load") -> list[Table]:
    """The tables of the load scenario, or of lanes (its writer, fusedisk's moves only)."""
    cols = {name: runs.get(f"{scenario} {name}", []) for name in SCENARIOS[scenario]}
    if not any(cols.values()):
        return []
    t = Table(
        f"Moving {where} under a fio 4 KiB randwrite writer, QD16 (medians; ratios "
        "median/median, per repetition in brackets"
        + (
            "; the floors do not move: their 'during' is --before s long; qsd's writer goes "
            "through NBD)"
            if scenario == "load"
            else "; fusedisk's moves only: inline, and with the deadline on either lane)"
        ),
        ["", *(LABELS[name] for name in cols)],
    )

    def row(label: str, *path: str, digits: int = 2) -> None:
        t.add(label, *(fmt(bl.med(c, *path), digits) for c in cols.values()))

    def iops(name: str, window: str = "during") -> list[float]:
        return bl.values(cols[name], "writer", window, "iops")

    row("move time (s)", "move_s")
    t.add("moves failed back", *(_failed_back(c) for c in cols.values()))
    for window in ("before", "during", "after"):
        row(f"writer IOPS {window}", "writer", window, "iops", digits=0)
    t.add("IOPS during / before", *(bl.compare(iops(n), iops(n, "before"))[1] for n in cols))
    peers = ("floor", "floor-mirror", "qsd-move", "fusedisk-move-inline")
    for peer in peers if scenario == "load" else ("fusedisk-move-inline",):
        if peer in cols:
            t.add(f"IOPS during / {peer}'s", *(bl.compare(iops(n), iops(peer))[1] for n in cols))
    row("worst 1 s IOPS during", "writer", "during", "min_1s_iops", digits=0)
    for window in ("before", "during", "after"):
        row(f"writer p99 {window} (ms)", "writer", window, "p99_ms")
    row("writer max during (ms)", "writer", "during", "max_ms")
    row("writer max, last 1 s of the move (ms)", "worst_ms_last_1s_of_move")
    row("switch pause (ms)", "switch_pause_ms", digits=1)
    for step in ("drain", "check", "flush", "record"):  # where the pause went (release: ~0)
        row(f"switch pause: {step} (ms)", "switch_steps_ms", step, digits=1)
    row("bytes copied / size", "copied_ratio", digits=3)

    v = Table("Targets under load", ["target", "fusedisk", "goal", "verdict"])
    machinery = bl.compare(iops("fusedisk-move"), iops("fusedisk-move-inline"))
    if scenario == "lanes":  # only the deadline's cost, and the Python thread's for comparison
        v.target(MACHINERY, machinery, 0.9)
        threads = bl.compare(iops("fusedisk-move-threads"), iops("fusedisk-move-inline"))
        v.target(f"{MACHINERY}, writes on a Python thread", threads, 0.9)
        return [t, v]
    fd, qsd = cols["fusedisk-move"], cols["qsd-move"]
    kept = bl.compare(iops("fusedisk-move"), iops("fusedisk-move", "before"))
    v.target("writer IOPS during / before", kept, 0.7)
    v.target("writer IOPS during / floor's", bl.compare(iops("fusedisk-move"), iops("floor")), 0.5)
    v.target(MACHINERY, machinery, 0.9)
    qsd_kept = bl.compare(iops("qsd-move"), iops("qsd-move", "before"))[0]
    v.target("writer IOPS during / before, at least qsd's", kept, qsd_kept)
    v.target("switch pause (ms)", bl.med(fd, "switch_pause_ms"), 10, at_most=True)
    for label, path in {
        "switch pause at most qsd's (ms)": ("switch_pause_ms",),
        "move time at most qsd's (s)": ("move_s",),
        "writer p99 during at most qsd's (ms)": ("writer", "during", "p99_ms"),
        "writer max during at most qsd's (ms)": ("writer", "during", "max_ms"),
    }.items():
        v.target(label, bl.med(fd, *path), bl.med(qsd, *path), at_most=True)
    return [t, v]


def _failed_back(runs: list[Run]) -> str:
    """How many of ``runs``' moves failed back (their move figures are missing), of how many."""
    return f"{sum(1 for r in runs if r.get('failed_back'))} of {len(runs)}" if runs else "-"
