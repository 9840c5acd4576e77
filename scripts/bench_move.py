#!/usr/bin/env python3
"""Live-move benchmark: fusedisk's move against `cp` and qemu-storage-daemon's blockdev-mirror.

    .venv/bin/python scripts/bench_move.py [--reps 3] [--scenarios idle,load[,split]]
        [--rate 200M] [--json results.json] [--profile DIR [--native]]

Each repetition, interleaved, on fresh identical non-sparse images (1 GiB by default) in --dir:

  idle   cp           `cp SRC DST` timed; then an fdatasync of DST, then `rm SRC` and a
                      directory fsync, each timed on its own (a durable copy, as a move is)
         fusedisk     `fusedisk migrate MOUNT DST --json` on an idle mount
         qsd          QMP blockdev-mirror (sync full, copy-mode write-blocking) of the exported
                      node to a new file node, BLOCK_JOB_READY, job-complete, BLOCK_JOB_COMPLETED
  load   fusedisk     the same move while fio writes 4 KiB at random through the mount
         qsd          the same mirror while fio writes through qsd
  split  fusedisk     under the writer: mirroring with the copier held to 1 MiB/s for --before
                      seconds, then the copier at full speed: where the writer's loss comes from

qemu-storage-daemon 7.2 cannot mirror a node under a writable FUSE export (the export takes the
RESIZE permission, which the mirror job does not share): idle, qsd exports the image read-only
through FUSE; under load its writer goes through a writable NBD export (fio's nbd engine).

The writer is fio (4 KiB randwrite, iodepth 16; libaio and direct=1 on a file) with a per-I/O
latency log stamped in Unix time (write_lat_log, log_unix_epoch=1), so its IOPS, p99 and worst
latency are split exactly into before / during / after the move, using the move's own start and
end (the daemon's `started`/`finished` for fusedisk; the mirror command and
BLOCK_JOB_COMPLETED's timestamp for qsd).

Pauses: fusedisk reports switch_pause_ms (I/O held, measured inside the daemon from the end of
the drain to the resume).  For qsd the figure is job-complete sent -> BLOCK_JOB_COMPLETED's
timestamp: an upper bound on its drained section (it includes the QMP round trip and the job
finishing).  The writer's worst latency during the move is the guest-visible figure for both.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as bl

from fusedisk.units import parse_size

# A window shorter than this is too short to quote IOPS for.
MIN_WINDOW = 0.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp/fusedisk-bench-move"),
        help="where images and mounts go (default: %(default)s)",
    )
    p.add_argument("--size", type=int, default=1024, help="image size in MiB (default: 1024)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default: 3)")
    p.add_argument("--before", type=float, default=5, help="writer seconds before the move")
    p.add_argument("--after", type=float, default=5, help="writer seconds after the move")
    p.add_argument("--ramp", type=float, default=1.5, help="writer warm-up seconds not counted")
    p.add_argument(
        "--scenarios",
        default="idle,load",
        help="idle, load (default: both), and split: fusedisk's writer loss by phase",
    )
    p.add_argument(
        "--rate",
        default="",
        help="copy rate limit for both movers, like 200M (fusedisk --rate, qsd mirror speed)",
    )
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="afterwards, one more fusedisk move per scenario under py-spy",
    )
    p.add_argument(
        "--native",
        action="store_true",
        help="profile C frames too (pyfuse3, syscalls); py-spy then pauses the daemon to sample",
    )
    return p.parse_args(argv)


# ---- the writer ---------------------------------------------------------------------------


@dataclass
class Writer:
    proc: subprocess.Popen[str]
    log_prefix: Path
    started: float
    key: str

    def stop(self) -> None:
        bl.terminate(self.proc, sig=signal.SIGINT, timeout=30)


def start_writer(cleanup: bl.Cleanup, file: Path | str, log_prefix: Path) -> Writer:
    """fio 4 KiB random writes at QD16 on a file (libaio, O_DIRECT) or an NBD URI (fio's nbd
    engine, libnbd: as asynchronous as libaio, no kernel in between)."""
    if isinstance(file, Path):
        target = [f"--filename={file}", "--ioengine=libaio", "--direct=1"]
    else:
        target = ["--ioengine=nbd", f"--uri={file}"]  # engine options after the engine
    command = [
        "fio", "--name=writer", *target, "--rw=randwrite", "--bs=4k", "--iodepth=16",
        "--numjobs=1", "--randrepeat=0",
        "--time_based=1", "--runtime=3600",
        f"--write_lat_log={log_prefix}", "--log_unix_epoch=1", "--output-format=json",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop fio in order
    )
    writer = Writer(proc, log_prefix, time.time(), f"fio {file}")
    # Logs first: undone last, after fio has stopped (it writes them as it exits).
    cleanup.push(f"logs {log_prefix}", functools.partial(_remove_logs, log_prefix))
    cleanup.push(writer.key, writer.stop)
    time.sleep(0.5)
    if proc.poll() is not None:
        raise RuntimeError(
            f"writer fio exited ({proc.returncode}): {proc.communicate()[1][-2000:]}"
        )
    return writer


def _remove_logs(prefix: Path) -> None:
    for path in prefix.parent.glob(prefix.name + "_*.log"):
        bl.remove(path)


def read_latencies(prefix: Path) -> tuple[list[float], list[float]]:
    """Completion times (s, Unix) and total latencies (ms) of every write, in log order."""
    times: list[float] = []
    lats: list[float] = []
    with open(f"{prefix}_lat.1.log", encoding="ascii") as f:
        for line in f:
            fields = line.split(",", 2)
            times.append(int(fields[0]) / 1000)
            lats.append(int(fields[1]) / 1e6)
    return times, lats


def window_stats(times: list[float], lats: list[float], start: float, end: float) -> dict[str, Any]:
    """Writes completed in [start, end): IOPS, latency percentiles, worst, and the worst
    one-second IOPS (whole seconds of the window only)."""
    span = end - start
    chosen = [lat for t, lat in zip(times, lats, strict=True) if start <= t < end]
    chosen.sort()
    per_second: dict[int, int] = {}
    for t in times:
        if start <= t < end:
            per_second[int(t - start)] = per_second.get(int(t - start), 0) + 1
    whole = [per_second.get(s, 0) for s in range(int(span))]
    return {
        "seconds": round(span, 3),
        "ios": len(chosen),
        "iops": round(len(chosen) / span) if span >= MIN_WINDOW else None,
        "p50_ms": round(bl.percentile(chosen, 50), 3) if chosen else None,
        "p99_ms": round(bl.percentile(chosen, 99), 3) if chosen else None,
        "max_ms": round(chosen[-1], 3) if chosen else None,
        "min_1s_iops": min(whole) if whole else None,
    }


def split_windows(
    writer: Writer, ramp: float, move_start: float, move_end: float, stop: float
) -> dict[str, Any]:
    times, lats = read_latencies(writer.log_prefix)
    before_start = writer.started + ramp
    return {
        "before": window_stats(times, lats, before_start, move_start),
        "during": window_stats(times, lats, move_start, move_end),
        "after": window_stats(times, lats, move_end, stop),
    }


def _worst_near(times: list[float], lats: list[float], start: float, end: float) -> float | None:
    chosen = [lat for t, lat in zip(times, lats, strict=True) if start <= t < end]
    return round(max(chosen), 3) if chosen else None


def finish_writer(writer: Writer, cleanup: bl.Cleanup) -> float:
    """Stop the writer; return when it stopped (Unix time)."""
    stop = time.time()
    cleanup.pop(writer.key)  # stops it (SIGINT: fio then writes its logs and JSON)
    out, err = writer.proc.communicate()
    # fio stopped by SIGINT exits 128 (or 0) after writing its JSON and logs.
    if writer.proc.returncode not in (0, 128, -signal.SIGINT) or "{" not in out:
        raise RuntimeError(f"writer fio failed ({writer.proc.returncode}): {err[-2000:]}")
    result = bl.parse_fio_json(out)
    if result["jobs"][0]["error"]:
        raise RuntimeError(f"writer fio reported error {result['jobs'][0]['error']}")
    return stop


# ---- moves ----------------------------------------------------------------------------------


def fresh_image(cleanup: bl.Cleanup, path: Path, size: int) -> None:
    cleanup.push(f"image {path}", functools.partial(bl.remove, path))
    bl.make_image(path, size)


def run_cp(args: argparse.Namespace, cleanup: bl.Cleanup) -> dict[str, Any]:
    src, dst = args.dir / "cp-src.img", args.dir / "cp-dst.img"
    fresh_image(cleanup, src, args.size_bytes)
    cleanup.push(f"image {dst}", functools.partial(bl.remove, dst))
    bl.remove(dst)
    os.sync()
    bl.warm(src)
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    t1 = time.perf_counter()
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    t2 = time.perf_counter()
    cleanup.pop(f"image {dst}")
    # What a move also does: delete the source durably (fusedisk's last step).
    t3 = time.perf_counter()
    cleanup.pop(f"image {src}")
    fd = os.open(args.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    t4 = time.perf_counter()
    return {
        "cp_s": round(t1 - t0, 3),
        "cp_fdatasync_s": round(t2 - t0, 3),
        "cp_fdatasync_rm_s": round(t2 - t0 + t4 - t3, 3),
    }


def run_fusedisk(args: argparse.Namespace, cleanup: bl.Cleanup, loaded: bool) -> dict[str, Any]:
    tag = "fdl" if loaded else "fdi"
    src, dst = args.dir / f"{tag}-src.img", args.dir / f"{tag}-dst.img"
    fresh_image(cleanup, src, args.size_bytes)
    cleanup.push(f"image {dst}", functools.partial(bl.remove, dst))
    bl.remove(dst)
    mount = bl.mount_fusedisk(cleanup, src, args.dir / f"{tag}-mnt")
    os.sync()
    bl.warm(src)
    writer = None
    if loaded:
        writer = start_writer(cleanup, mount.file, args.dir / f"{tag}-lat")
        time.sleep(args.ramp + args.before)
    profile: list[bl.Profile] = []
    with (
        bl.profiled(mount.pid, None, args.profile_file, args.native)
        if args.profile_file
        else _nothing(profile) as profile
    ):
        t0 = time.time()
        rate = ["--rate", args.rate] if args.rate else []
        out = bl.fusedisk("migrate", mount.mountpoint, dst, "--json", *rate, timeout=1800)
        t1 = time.time()
    status: dict[str, Any] = json.loads(out.stdout)
    if status["phase"] != "done":
        raise RuntimeError(f"fusedisk move ended {status['phase']}: {status['error']}")
    move_start, move_end = float(status["started"]), float(status["finished"])
    result: dict[str, Any] = {
        "move_s": round(move_end - move_start, 3),
        "cli_wall_s": round(t1 - t0, 3),
        "switch_pause_ms": status["switch_pause_ms"],
        "size": status["size"],
        "copied_bytes": status["copied_bytes"],
        "mirrored_bytes": status["mirrored_bytes"],
        "synced_by_writes_bytes": status["synced_by_writes_bytes"],
        "hole_bytes": status["hole_bytes"],
        "copied_ratio": round(status["copied_bytes"] / status["size"], 4),
    }
    if writer is not None:
        time.sleep(args.after)
        stop = finish_writer(writer, cleanup)
        result["writer"] = split_windows(writer, args.ramp, move_start, move_end, stop)
        times, lats = read_latencies(writer.log_prefix)
        # The switch is the move's last step but the source's deletion: look at its last second.
        result["worst_ms_last_1s_of_move"] = _worst_near(times, lats, move_end - 1, move_end + 0.1)
        cleanup.pop(f"logs {writer.log_prefix}")
    if profile:
        result["profile"] = profile[0].as_dict()
    bl.unmount_fusedisk(cleanup, mount)
    cleanup.pop(f"image {dst}")
    cleanup.pop(f"image {src}")
    return result


class _nothing:
    """A stand-in for bl.profiled when not profiling."""

    def __init__(self, out: list[bl.Profile]) -> None:
        self.out = out

    def __enter__(self) -> list[bl.Profile]:
        return self.out

    def __exit__(self, *exc: object) -> None:
        return None


def run_split(args: argparse.Namespace, cleanup: bl.Cleanup) -> dict[str, Any]:
    """Where the writer's loss comes from: before; mirroring with the copier all but stopped
    (``--rate 1M`` for --before seconds); the copier at full speed (``fusedisk rate 0``) until
    the move ends; after."""
    src, dst = args.dir / "fds-src.img", args.dir / "fds-dst.img"
    fresh_image(cleanup, src, args.size_bytes)
    cleanup.push(f"image {dst}", functools.partial(bl.remove, dst))
    bl.remove(dst)
    mount = bl.mount_fusedisk(cleanup, src, args.dir / "fds-mnt")
    os.sync()
    bl.warm(src)
    writer = start_writer(cleanup, mount.file, args.dir / "fds-lat")
    time.sleep(args.ramp + args.before)
    t_mirror = time.time()
    bl.fusedisk("migrate", mount.mountpoint, dst, "--detach", "--rate", "1M")
    time.sleep(args.before)
    t_copy = time.time()
    bl.fusedisk("rate", mount.mountpoint, "0")
    while (status := mount.status())["phase"] not in ("done", "failed", "cancelled"):
        time.sleep(0.05)
    if status["phase"] != "done":
        raise RuntimeError(f"fusedisk move ended {status['phase']}: {status['error']}")
    t_end = float(status["finished"])
    time.sleep(args.after)
    stop = finish_writer(writer, cleanup)
    times, lats = read_latencies(writer.log_prefix)
    windows = {
        "before": window_stats(times, lats, writer.started + args.ramp, t_mirror),
        "mirroring": window_stats(times, lats, t_mirror + 0.2, t_copy),
        "copying": window_stats(times, lats, t_copy, t_end),
        "after": window_stats(times, lats, t_end, stop),
    }
    cleanup.pop(f"logs {writer.log_prefix}")
    bl.unmount_fusedisk(cleanup, mount)
    cleanup.pop(f"image {dst}")
    cleanup.pop(f"image {src}")
    return {"writer": windows, "copied_bytes": status["copied_bytes"], "size": status["size"]}


def run_qsd(args: argparse.Namespace, cleanup: bl.Cleanup, loaded: bool) -> dict[str, Any]:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    tag = "qsl" if loaded else "qsi"
    src, dst = args.dir / f"{tag}-src.img", args.dir / f"{tag}-dst.img"
    fresh_image(cleanup, src, args.size_bytes)
    cleanup.push(f"image {dst}", functools.partial(bl.remove, dst))
    bl.remove(dst)
    # The target as fusedisk creates its own: a new, sparse file of the same size.
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "raw", str(dst), str(args.size_bytes)], check=True
    )
    # A writable FUSE export cannot be mirrored by qemu 7.2 (see bl.start_qsd): idle, the FUSE
    # export is read-only; under load the writer goes through a writable NBD export instead.
    kind = "nbd" if loaded else "fuse-ro"
    qsd = bl.start_qsd(cleanup, src, args.dir / f"{tag}.export", args.dir, kind)
    os.sync()
    bl.warm(src)
    writer = None
    if loaded:
        writer = start_writer(cleanup, qsd.nbd_uri, args.dir / f"{tag}-lat")
        time.sleep(args.ramp + args.before)
    qmp = QEMUMonitorProtocol(str(qsd.qmp_socket))
    qmp.connect()
    cleanup.push(f"qmp {tag}", qmp.close)
    try:
        t0 = time.time()
        qmp.cmd(
            "blockdev-add",
            **{
                "node-name": "target0",
                "driver": "raw",
                "file": {"driver": "file", "filename": str(dst)},
            },
        )
        qmp.cmd(
            "blockdev-mirror",
            **{
                "job-id": "move0",
                "device": "fmt0",
                "target": "target0",
                "sync": "full",
                "copy-mode": "write-blocking",
                **({"speed": parse_size(args.rate)} if args.rate else {}),
            },
        )
        ready = _wait_event(qmp, "BLOCK_JOB_READY", timeout=1800)
        t_complete = time.time()
        qmp.cmd("job-complete", id="move0")
        t_complete_returned = time.time()
        completed = _wait_event(qmp, "BLOCK_JOB_COMPLETED", timeout=600)
        t1 = time.time()
    finally:
        cleanup.pop(f"qmp {tag}")
    if completed["data"].get("error"):
        raise RuntimeError(f"qsd mirror failed: {completed['data']['error']}")
    completed_at = _event_time(completed)
    result: dict[str, Any] = {
        "move_s": round(t1 - t0, 3),
        "ready_after_s": round(_event_time(ready) - t0, 3),
        # job-complete sent -> BLOCK_JOB_COMPLETED (qsd's own timestamp): an upper bound of the
        # drained section in which qsd swaps the nodes.
        "switch_pause_ms": round((completed_at - t_complete) * 1000, 3),
        "job_complete_rtt_ms": round((t_complete_returned - t_complete) * 1000, 3),
        "size": args.size_bytes,
        "progress_len": completed["data"].get("len"),
        "progress_offset": completed["data"].get("offset"),
        "copied_ratio": round(completed["data"].get("offset", 0) / args.size_bytes, 4),
    }
    if writer is not None:
        time.sleep(args.after)
        stop = finish_writer(writer, cleanup)
        result["writer"] = split_windows(writer, args.ramp, t0, completed_at, stop)
        times, lats = read_latencies(writer.log_prefix)
        result["worst_ms_last_1s_of_move"] = _worst_near(
            times, lats, completed_at - 1, completed_at + 0.1
        )
        result["worst_ms_job_complete_window"] = _worst_near(
            times, lats, t_complete, completed_at + 0.1
        )
        cleanup.pop(f"logs {writer.log_prefix}")
    bl.stop_qsd(cleanup, qsd)
    cleanup.pop(f"image {dst}")
    cleanup.pop(f"image {src}")
    return result


def _event_time(event: dict[str, Any]) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


def _wait_event(qmp: Any, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"no {name} from qemu-storage-daemon in {timeout:.0f} s")
        event = qmp.pull_event(wait=left)
        if event is None:
            continue
        if event["event"] == name:
            return dict(event)
        if event["event"] == "BLOCK_JOB_COMPLETED" and event["data"].get("error"):
            raise RuntimeError(f"qsd mirror failed: {event['data']['error']}")


# ---- reporting ----------------------------------------------------------------------------


def med(results: list[dict[str, Any]], *path: str) -> float:
    values = []
    for r in results:
        v: Any = r
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if isinstance(v, int | float):
            values.append(float(v))
    return bl.median(values)


def f(x: float, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    cp = bl.median(r["cp_s"] for r in runs.get("cp", []))
    for name in ("fusedisk-idle", "qsd-idle"):
        rs = runs.get(name, [])
        if not rs:
            continue
        pairs = list(zip(rs, runs.get("cp", []), strict=False))
        per_rep = [round(r["move_s"] / c["cp_s"], 3) for r, c in pairs]
        # fusedisk's move also deletes the source; qsd's mirror leaves it.
        base = "cp_fdatasync_rm_s" if name.startswith("fusedisk") else "cp_fdatasync_s"
        per_rep_durable = [round(r["move_s"] / c[base], 3) for r, c in pairs]
        s[name] = {
            "move_s": med(rs, "move_s"),
            "move_over_cp": bl.median(per_rep),
            "move_over_cp_per_rep": per_rep,
            "move_over_durable_cp": bl.median(per_rep_durable),
            "move_over_durable_cp_per_rep": per_rep_durable,
            "switch_pause_ms": med(rs, "switch_pause_ms"),
            "copied_ratio": med(rs, "copied_ratio"),
        }
    if "cp" in runs:
        s["cp"] = {
            "cp_s": cp,
            "cp_fdatasync_s": bl.median(r["cp_fdatasync_s"] for r in runs["cp"]),
            "cp_fdatasync_rm_s": bl.median(r["cp_fdatasync_rm_s"] for r in runs["cp"]),
        }
    for name in ("fusedisk-load", "qsd-load"):
        rs = runs.get(name, [])
        if not rs:
            continue
        during_over_before = [
            round(r["writer"]["during"]["iops"] / r["writer"]["before"]["iops"], 3)
            for r in rs
            if r["writer"]["during"]["iops"] and r["writer"]["before"]["iops"]
        ]
        entry: dict[str, Any] = {
            "move_s": med(rs, "move_s"),
            "switch_pause_ms": med(rs, "switch_pause_ms"),
            "copied_ratio": med(rs, "copied_ratio"),
            "during_over_before": bl.median(during_over_before),
            "during_over_before_per_rep": during_over_before,
            "worst_ms_last_1s_of_move": med(rs, "worst_ms_last_1s_of_move"),
        }
        for window in ("before", "during", "after"):
            for key in ("iops", "p99_ms", "max_ms", "min_1s_iops"):
                entry[f"{window}_{key}"] = med(rs, "writer", window, key)
        s[name] = entry
    names = ("fusedisk-idle", "qsd-idle", "fusedisk-load", "qsd-load")
    fi, qi, fl, ql = (s.get(k, {}) for k in names)
    nan = float("nan")

    def at_most(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
        return _ok(a.get(key, nan) <= b.get(key, nan), a and b)

    pauses = [fi.get("switch_pause_ms", nan), fl.get("switch_pause_ms", nan)]
    s["verdicts"] = {
        "idle move <= 1.2 x cp": _ok(fi.get("move_over_cp", nan) <= 1.2, fi),
        "(idle move <= 1.2 x durable cp: cp+fdatasync+rm)": _ok(
            fi.get("move_over_durable_cp", nan) <= 1.2, fi
        ),
        "idle move at least as fast as qsd": at_most(fi, qi, "move_s"),
        "writer IOPS during >= 0.7 x before": _ok(fl.get("during_over_before", nan) >= 0.7, fl),
        "writer during/before at least qsd's": at_most(ql, fl, "during_over_before"),
        "switch pause <= 10 ms (idle and load)": _ok(max(pauses) <= 10, fi and fl),
        "switch pause at most qsd's (load)": at_most(fl, ql, "switch_pause_ms"),
        "loaded move at least as fast as qsd": at_most(fl, ql, "move_s"),
        "writer p99 during at most qsd's": at_most(fl, ql, "during_p99_ms"),
        "writer max during at most qsd's": at_most(fl, ql, "during_max_ms"),
    }
    return s


def _ok(condition: bool, present: Any) -> str:
    return verdict(condition if present else None)


def print_tables(s: dict[str, Any]) -> None:
    cp = s.get("cp", {})
    fi, qi = s.get("fusedisk-idle", {}), s.get("qsd-idle", {})
    nan = float("nan")
    if cp or fi or qi:
        print("Idle move (medians)")
        c0, c1, c2 = (cp.get(k, nan) for k in ("cp_s", "cp_fdatasync_s", "cp_fdatasync_rm_s"))
        rows = [
            ["", "cp", "cp+fdatasync", "cp+fdatasync+rm", "fusedisk", "qsd mirror"],
            ["time (s)", f(c0), f(c1), f(c2), f(fi.get("move_s", nan)), f(qi.get("move_s", nan))],
            ["time / cp (median of per-rep ratios)", "1.00", f(c1 / c0), f(c2 / c0),
             f(fi.get("move_over_cp", nan)), f(qi.get("move_over_cp", nan))],
            ["time / durable cp (fusedisk: +rm)", "-", "1.00", "1.00",
             f(fi.get("move_over_durable_cp", nan)), f(qi.get("move_over_durable_cp", nan))],
            ["switch pause (ms)", "-", "-", "-", f(fi.get("switch_pause_ms", nan), 1),
             f(qi.get("switch_pause_ms", nan), 1)],
            ["bytes copied / size", "1.00", "1.00", "1.00", f(fi.get("copied_ratio", nan), 3),
             f(qi.get("copied_ratio", nan), 3)],
        ]  # fmt: skip
        _print_rows(rows)
    fl, ql = s.get("fusedisk-load", {}), s.get("qsd-load", {})
    if fl or ql:
        print("Move under a fio 4 KiB randwrite writer, QD16 (medians)")
        rows = [["", "fusedisk", "qsd mirror"]]

        def add(label: str, key: str, digits: int = 2) -> None:
            rows.append([label, f(fl.get(key, nan), digits), f(ql.get(key, nan), digits)])

        add("move time (s)", "move_s")
        for window in ("before", "during", "after"):
            add(f"writer IOPS {window}", f"{window}_iops", 0)
        add("IOPS during / before", "during_over_before")
        add("worst 1 s IOPS during", "during_min_1s_iops", 0)
        for window in ("before", "during", "after"):
            add(f"writer p99 {window} (ms)", f"{window}_p99_ms")
        add("writer max during (ms)", "during_max_ms")
        add("writer max, last 1 s of move (ms)", "worst_ms_last_1s_of_move")
        add("switch pause (ms)", "switch_pause_ms", 1)
        add("bytes copied / size", "copied_ratio", 3)
        _print_rows(rows)
    print("Targets")
    _print_rows([["target", "verdict"], *([k, v] for k, v in s["verdicts"].items())])


def print_split(rs: list[dict[str, Any]]) -> None:
    print("fusedisk, writer by phase of the move (medians; ratio: median of per-rep ratios)")
    rows = [["window", "writer IOPS", "/ before", "p99 (ms)", "max (ms)"]]
    for window in ("before", "mirroring", "copying", "after"):
        ratios = [r["writer"][window]["iops"] / r["writer"]["before"]["iops"] for r in rs]
        rows.append(
            [
                window,
                f(med(rs, "writer", window, "iops"), 0),
                f(bl.median(ratios)),
                f(med(rs, "writer", window, "p99_ms")),
                f(med(rs, "writer", window, "max_ms")),
            ]
        )
    _print_rows(rows)


def _print_rows(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print()


# ---- main ---------------------------------------------------------------------------------


def describe(name: str, r: dict[str, Any]) -> str:
    text = f"{name}: "
    if name == "fusedisk-split":
        w = r["writer"]
        return (
            text
            + "writer IOPS "
            + "/".join(f"{k} {w[k]['iops']}" for k in ("before", "mirroring", "copying", "after"))
        )
    if "cp_s" in r:
        return text + (
            f"cp {r['cp_s']:.2f} s, with fdatasync {r['cp_fdatasync_s']:.2f} s, "
            f"and rm {r['cp_fdatasync_rm_s']:.2f} s"
        )
    text += (
        f"move {r['move_s']:.2f} s, pause {r['switch_pause_ms']} ms, copied x{r['copied_ratio']}"
    )
    if "writer" in r:
        w = r["writer"]
        text += "; writer IOPS " + "/".join(
            str(w[k]["iops"]) for k in ("before", "during", "after")
        )
        text += ", p99 ms " + "/".join(str(w[k]["p99_ms"]) for k in ("before", "during", "after"))
        text += f", max during {w['during']['max_ms']} ms"
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dir = args.dir.absolute()
    args.dir.mkdir(parents=True, exist_ok=True)
    args.size_bytes = args.size * bl.MiB
    args.profile_file = None
    scenarios = args.scenarios.split(",")
    plan: list[str] = []
    if "idle" in scenarios:
        plan += ["cp", "fusedisk-idle", "qsd-idle"]
    if "load" in scenarios:
        plan += ["fusedisk-load", "qsd-load"]
    if "split" in scenarios:
        plan += ["fusedisk-split"]
    notes = bl.machine_notes(args.dir)
    started = time.time()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in plan}
    profiles: dict[str, Any] = {}
    with bl.Cleanup() as cleanup:
        for rep in range(args.reps):
            for name in plan:  # interleaved, so noise hits every contender alike
                if name == "cp":
                    r = run_cp(args, cleanup)
                elif name == "fusedisk-split":
                    r = run_split(args, cleanup)
                elif name.startswith("fusedisk"):
                    r = run_fusedisk(args, cleanup, loaded=name.endswith("load"))
                else:
                    r = run_qsd(args, cleanup, loaded=name.endswith("load"))
                runs[name].append(r)
                bl.log(f"rep {rep + 1}/{args.reps} {describe(name, r)}")
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for name in ("fusedisk-idle", "fusedisk-load"):
                if name not in plan:
                    continue
                args.profile_file = args.profile / f"move-{name}.pyspy.txt"
                bl.log(f"profiling one more {name} move")
                r = run_fusedisk(args, cleanup, loaded=name.endswith("load"))
                profiles[name] = r
                bl.log(f"under the profiler: {describe(name, r)}")
            args.profile_file = None
    notes["loadavg_at_end"] = os.getloadavg()
    notes["duration_s"] = round(time.time() - started)
    summary = summarize(runs)
    print()
    print(
        f"{args.size} MiB non-sparse images in {args.dir} ({notes['workdir_fs']}), "
        f"{args.reps} reps, medians; writer windows: {args.before:g} s before, {args.after:g} s "
        f"after, split at the move's own start and end; rate limit {args.rate or 'none'}"
    )
    print_tables(summary)
    if runs.get("fusedisk-split"):
        print_split(runs["fusedisk-split"])
    for name, r in profiles.items():
        if "profile" in r:
            print(f"== py-spy, fusedisk daemon during one more {name} move ({describe(name, r)})")
            print(bl.Profile(**r["profile"]).format())
            print()
    if args.json:
        result = {
            "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
            "machine": notes,
            "settings": {k: str(v) for k, v in vars(args).items()},
            "summary": summary,
            "runs": runs,
            "profiles": profiles,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        bl.log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench_move: interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
