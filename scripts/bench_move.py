"""Live moves, run by `scripts/bench.py move`, each on a fresh non-sparse image; every
repetition runs each scenario's contenders in turn.

  idle   cp; fusedisk-move (`fusedisk migrate`: to a local filesystem the destination is
         written inline); fusedisk-move-deadline (the same with --dest-timeout 1: worker
         threads and a deadline, the default on network filesystems); qsd-move
         (blockdev-mirror, then job-complete)
  load   the same moves while fio writes 4 KiB at random, iodepth 16, through the contender;
         and floor and floor-mirror with the same writer and no move: the floors it is judged
         against (the writer's "during" window is then --before seconds long)
  split  fusedisk-move under the writer, mirroring with the copier held to 1 MiB/s for --before
         seconds, then copying flat out: where the writer's loss comes from

qemu-storage-daemon 7.2 cannot mirror a node under a writable FUSE export (the export takes the
RESIZE permission, which the mirror job does not share), so qsd-move serves its image through
an NBD export, and its writer uses fio's nbd engine. The writer logs every write's latency in
Unix time, so its IOPS, p99 and worst latency split exactly into before, during and after the
move, at the move's own start and end (fusedisk: the daemon's `started`/`finished`; qsd: the
mirror command and BLOCK_JOB_COMPLETED's timestamp). fusedisk's switch pause is measured inside
the daemon; qsd's is job-complete sent -> BLOCK_JOB_COMPLETED, an upper bound. --profile DIR
then runs one more fusedisk move per scenario under py-spy.

The destination is --dir, or with --remote a directory on sshfs mounted from a private sshd on
127.0.0.1 (tests/remote.py's fixture; its files are on the same local disk, behind ssh and
SFTP): moves and cp go there; the floors, which do not move, stay in --dir (floor-mirror's
second file too).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import benchlib as bl
from benchlib import CONTENDERS, MiB, Run, Table, fmt

from fusedisk.units import parse_size

SCENARIOS = {
    "idle": ("cp", "fusedisk-move", "fusedisk-move-deadline", "qsd-move"),
    "load": ("fusedisk-move", "fusedisk-move-deadline", "qsd-move", "floor", "floor-mirror"),
    "split": ("fusedisk-move",),
}
LABELS = {  # table columns
    "fusedisk-move": "fusedisk",
    "fusedisk-move-deadline": "fusedisk with deadline (--dest-timeout 1)",
    "qsd-move": "qsd mirror (NBD export)",
    "floor": "floor",
    "floor-mirror": "floor-mirror",
}
MIN_WINDOW = 0.2  # s: a window shorter than this is too short to quote IOPS for


def run(args: argparse.Namespace) -> tuple[list[Table], dict[str, Any]]:
    args.rate_bytes, scenarios = parse_size(args.rate), args.scenarios.split(",")
    if not set(scenarios) <= SCENARIOS.keys():
        raise SystemExit(f"bench: the scenarios are {', '.join(SCENARIOS)}")
    plan = [f"{s} {name}" for s in scenarios for name in SCENARIOS[s]]
    where = "to --dir"
    if args.remote:  # sshfs passes fsync on to sshd (fsync@openssh.com), which fsyncs the file
        where = "to sshfs from a private sshd on 127.0.0.1"
    with ExitStack() as stack:  # the remote, if any, for the whole run
        args.dest = bl.sshfs_destination(stack, args.dir / "remote") if args.remote else args.dir
        runs = bl.interleave(args.reps, plan, lambda entry: one(args, entry), describe)
        profiles = {}
        for scenario in ("idle", "load") if args.profile else ():
            if f"{scenario} fusedisk-move" in plan:
                raw = args.profile / f"move-{scenario}.pyspy.txt"
                profiles[scenario] = one(args, f"{scenario} fusedisk-move", raw)
                bl.log(f"under py-spy: {describe(profiles[scenario])}")
    tables = [*idle_tables(runs, where), *load_tables(runs, where), *split_tables(runs)]
    tables += [bl.profile_table(f"one more {s} move", p["profile"]) for s, p in profiles.items()]
    return tables, {"runs": runs, "profiles": profiles}


def one(args: argparse.Namespace, entry: str, profile: Path | None = None) -> Run:
    """One contender in one scenario (``entry``: "SCENARIO NAME"), from a fresh image to
    everything removed."""
    scenario, name = entry.split()
    if name == "cp":
        return run_cp(args)
    size = args.size * MiB
    with ExitStack() as stack:
        image = bl.scratch(stack, args.dir / f"{scenario}-{name}.img")
        bl.make_image(image, size)
        served = CONTENDERS[name].serve(stack, image, args.dir)
        dest = args.dest / f"{scenario}-{name}.dest"
        mover = CONTENDERS[name].mover
        move = mover(stack, served, dest, size) if mover else None
        os.sync()
        bl.warm(image)
        writer = None if scenario == "idle" else Writer(stack, served, image.with_suffix(""))
        time.sleep(0 if writer is None else args.ramp + args.before)
        with bl.profiled(served.pid, profile, args.native) as profiled:
            r: Run = {"started": time.time()}
            if move is None:  # a floor: the same writer, no move
                time.sleep(args.before)
                r["finished"] = time.time()
            else:
                move.start(MiB if scenario == "split" else args.rate_bytes)
                if scenario == "split":  # --before s of mirroring alone, then copying flat out
                    time.sleep(args.before)
                    r["copying"] = time.time()
                    move.set_rate(0)
                r |= move.wait()  # with the move's own start and end
        if writer is not None:
            time.sleep(args.after)
            phases = {"during": r["started"]}
            if scenario == "split":
                phases = {"mirroring": r["started"], "copying": r["copying"]}
            edges = {"before": writer.started + args.ramp, **phases, "after": r["finished"]}
            r["writer"] = writer.stop(edges)
            if move is not None:  # the switch is its last step but the source's deletion
                last_second = writer.window(r["finished"] - 1, r["finished"] + 0.1)
                r["worst_ms_last_1s_of_move"] = last_second["max_ms"]
        if profiled:
            r["profile"] = profiled
        return r


def run_cp(args: argparse.Namespace) -> Run:
    """cp timed; then an fdatasync of the copy; then rm of the source and a directory fsync,
    each timed on its own: a durable copy, as a move is."""
    with ExitStack() as stack:
        src, dst = bl.scratch(stack, args.dir / "cp.img"), bl.scratch(stack, args.dest / "cp.copy")
        bl.make_image(src, args.size * MiB)
        os.sync()
        bl.warm(src)
        t0 = time.perf_counter()
        subprocess.run(["cp", str(src), str(dst)], check=True)
        t1 = time.perf_counter()
        sync(dst, os.fdatasync)
        t2 = time.perf_counter()
        src.unlink()
        sync(args.dir, os.fsync)
        t3 = time.perf_counter()
    return {
        "cp_s": round(t1 - t0, 3),
        "cp_fdatasync_s": round(t2 - t0, 3),
        "cp_fdatasync_rm_s": round(t3 - t0, 3),
    }


def sync(path: Path, how: Any) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        how(fd)
    finally:
        os.close(fd)


def describe(r: Run) -> str:
    if "cp_s" in r:
        return f"cp {r['cp_s']} s, +fdatasync {r['cp_fdatasync_s']}, +rm {r['cp_fdatasync_rm_s']}"
    text = f"move {r['move_s']} s, pause {r['switch_pause_ms']} ms" if "move_s" in r else "no move"
    if "writer" in r:
        text += "; writer IOPS " + ", ".join(f"{k} {w['iops']}" for k, w in r["writer"].items())
    return text


# ---- the writer -------------------------------------------------------------------------------


class Writer:
    """fio writing 4 KiB at random, iodepth 16, through a file (libaio, O_DIRECT) or an NBD URI
    (fio's nbd engine: libnbd, as asynchronous as libaio), logging each write's latency."""

    def __init__(
        self, stack: ExitStack, served: bl.Served, prefix: Path, options: Sequence[str] = ()
    ) -> None:
        if served.nbd:
            target = ["--ioengine=nbd", f"--uri={served.nbd}"]
        else:
            target = [f"--filename={served.file}", "--ioengine=libaio", "--direct=1"]
        command = ["fio", "--name=writer", *target, "--rw=randwrite", "--bs=4k", "--iodepth=16"]
        command += ["--time_based=1", "--runtime=3600", "--randrepeat=0", "--output-format=json"]
        command += [f"--write_lat_log={prefix}", "--log_unix_epoch=1", *options]
        self.log = [bl.scratch(stack, Path(f"{prefix}_{k}.1.log")) for k in ("lat", "clat", "slat")]
        self.started = time.time()
        self.proc = bl.start(stack, command, signal.SIGINT, 30)  # fio then writes its logs
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise RuntimeError(f"writer fio exited: {self.proc.communicate()[1][-2000:]}")

    def stop(self, edges: dict[str, float]) -> dict[str, Any]:
        """Stop fio (SIGINT: it writes its log and JSON); its figures in the windows that
        start at each edge, the last one ending now."""
        stop = time.time()
        bl.terminate(self.proc, signal.SIGINT, 30)
        out, err = self.proc.communicate()
        if "{" not in out or bl.parse_fio(out)["jobs"][0]["error"]:
            raise RuntimeError(f"writer fio failed: {err[-2000:]}")
        self.times, self.lats = [], []  # completion time (s, Unix), latency (ms)
        with open(self.log[0], encoding="ascii") as f:
            for line in f:
                fields = line.split(",", 2)
                self.times.append(int(fields[0]) / 1000)
                self.lats.append(int(fields[1]) / 1e6)
        ends = [*list(edges.values())[1:], stop]
        return {k: self.window(t0, t1) for (k, t0), t1 in zip(edges.items(), ends, strict=True)}

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Writes completed in [start, end): IOPS, latency percentiles and worst, and the worst
        IOPS over the window's whole seconds."""
        span = end - start
        lats = sorted(x for t, x in zip(self.times, self.lats, strict=True) if start <= t < end)
        per_second = [0] * int(span)
        for t in self.times:
            if 0 <= t - start < int(span):
                per_second[int(t - start)] += 1

        def pct(q: int) -> float | None:  # nearest rank
            return round(lats[max(0, math.ceil(len(lats) * q / 100) - 1)], 3) if lats else None

        return {
            "seconds": round(span, 3),
            "iops": round(len(lats) / span) if span >= MIN_WINDOW else None,
            "p50_ms": pct(50),
            "p99_ms": pct(99),
            "max_ms": pct(100),
            "min_1s_iops": min(per_second, default=None),
        }


# ---- tables -----------------------------------------------------------------------------------


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
    default = moves["fusedisk-move"]
    t.add("time / fusedisk's", *no_cp, *(bl.compare(m, default)[1] for m in moves.values()))
    for label, key in {
        "switch pause (ms)": "switch_pause_ms",
        "copied / size": "copied_ratio",
    }.items():
        t.add(label, *no_cp, *(bl.med(rs, key) for rs in movers.values()))
    v = Table("Idle move targets", ["target", "fusedisk", "goal", "verdict"])
    fd, qsd = moves["fusedisk-move"], moves["qsd-move"]
    v.target("move time / cp", over["fusedisk-move"], 1.2, at_most=True)
    v.target("move time / durable cp", durable["fusedisk-move"], 1.2, at_most=True)
    v.target("move time at most qsd's (s)", bl.median(fd), bl.median(qsd), True)
    v.target("switch pause (ms)", bl.med(movers["fusedisk-move"], "switch_pause_ms"), 10, True)
    return [t, v]


def load_tables(runs: dict[str, list[Run]], where: str) -> list[Table]:
    cols = {name: runs.get(f"load {name}", []) for name in SCENARIOS["load"]}
    if not any(cols.values()):
        return []
    t = Table(
        f"Moving {where} under a fio 4 KiB randwrite writer, QD16 (medians; ratios "
        "median/median, per repetition in brackets; the floors do not move: their 'during' is "
        "--before s long; qsd's writer goes through NBD)",
        ["", *(LABELS[name] for name in cols)],
    )

    def row(label: str, *path: str, digits: int = 2) -> None:
        t.add(label, *(fmt(bl.med(c, *path), digits) for c in cols.values()))

    def iops(name: str, window: str = "during") -> list[float]:
        return bl.values(cols[name], "writer", window, "iops")

    row("move time (s)", "move_s")
    for window in ("before", "during", "after"):
        row(f"writer IOPS {window}", "writer", window, "iops", digits=0)
    t.add("IOPS during / before", *(bl.compare(iops(n), iops(n, "before"))[1] for n in cols))
    for peer in ("floor", "floor-mirror", "qsd-move", "fusedisk-move-deadline"):
        t.add(f"IOPS during / {peer}'s", *(bl.compare(iops(n), iops(peer))[1] for n in cols))
    row("worst 1 s IOPS during", "writer", "during", "min_1s_iops", digits=0)
    for window in ("before", "during", "after"):
        row(f"writer p99 {window} (ms)", "writer", window, "p99_ms")
    row("writer max during (ms)", "writer", "during", "max_ms")
    row("writer max, last 1 s of the move (ms)", "worst_ms_last_1s_of_move")
    row("switch pause (ms)", "switch_pause_ms", digits=1)
    row("bytes copied / size", "copied_ratio", digits=3)

    v = Table("Targets under load", ["target", "fusedisk", "goal", "verdict"])
    fd, qsd = cols["fusedisk-move"], cols["qsd-move"]
    kept = bl.compare(iops("fusedisk-move"), iops("fusedisk-move", "before"))
    v.target("writer IOPS during / before", kept, 0.7)
    v.target("writer IOPS during / floor's", bl.compare(iops("fusedisk-move"), iops("floor")), 0.5)
    machinery = bl.compare(iops("fusedisk-move-deadline"), iops("fusedisk-move"))
    v.target("writer IOPS during, deadline / default (local: inline)", machinery, 0.9)
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


def split_tables(runs: dict[str, list[Run]]) -> list[Table]:
    rs = runs.get("split fusedisk-move", [])
    t = Table(
        "fusedisk, the writer by phase of the move: mirroring with the copier at 1 MiB/s, then "
        "copying flat out (medians)",
        ["window", "writer IOPS", "/ before", "p99 (ms)", "max (ms)"],
    )
    before = bl.values(rs, "writer", "before", "iops")
    for w in ("before", "mirroring", "copying", "after"):
        figures = [bl.med(rs, "writer", w, k) for k in ("iops", "p99_ms", "max_ms")]
        ratio = bl.compare(bl.values(rs, "writer", w, "iops"), before)[1]
        t.add(w, fmt(figures[0], 0), ratio, *figures[1:])
    return [t] if rs else []
