"""The machinery of scripts/bench.py: contenders, movers, fio, the interleaved runner, reports.

Everything a run starts (images, mounts, daemons, fio, moves) is registered on an ExitStack the
moment it exists, so an error, Ctrl-C or SIGTERM unwinds all of it, newest first; an undo that
fails is logged and the ones after it still run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
Run = dict[str, Any]  # the figures of one run of one contender


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- starting and stopping ------------------------------------------------------------------


def on_exit(stack: ExitStack, what: str, undo: Callable[..., object], *args: object) -> None:
    """Run ``undo(*args)`` when ``stack`` unwinds; a failure is logged, the rest still run."""

    def run() -> None:
        try:
            undo(*args)
        except Exception as e:
            log(f"cleanup: {what}: {e!r}")

    stack.callback(run)


def terminate(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Stop a process this script started (by its own handle), escalating to SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start(stack: ExitStack, command: list[str], sig: int, timeout: float) -> subprocess.Popen[str]:
    """Start a process with its output piped, in a session of its own (a terminal's Ctrl-C
    reaches only the bench), and register stopping it by ``sig``."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    on_exit(stack, command[0], terminate, proc, sig, timeout)
    return proc


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4].replace("\\040", " ") == target for line in f)


def unmount(path: Path, lazy: bool = False) -> None:
    if is_mounted(path):
        command = ["fusermount3", "-u", *(["-z"] if lazy else []), str(path)]
        subprocess.run(command, check=False, capture_output=True)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def scratch(stack: ExitStack, path: Path) -> Path:
    """``path``, removed now and again when ``stack`` unwinds."""
    remove(path)
    on_exit(stack, f"rm {path}", remove, path)
    return path


def make_image(path: Path, size: int, seed: int = 1) -> None:
    """A non-sparse image: 1 MiB of seeded random bytes per block, stamped with the block number,
    so every block differs and two calls with one seed give identical files."""
    block = bytearray(random.Random(seed).randbytes(MiB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for offset in range(0, size, MiB):
            block[:8] = (offset // MiB).to_bytes(8, "little")
            os.pwrite(fd, memoryview(block)[: min(MiB, size - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_sparse(path: Path, size: int, data: int) -> None:
    """A sparse file of ``size`` bytes with ``data`` bytes of random data in 16 MiB extents
    spread evenly over it."""
    extent = min(16 * MiB, data, size)
    count = max(1, data // extent)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(count):
            f.seek((size // count * i) // MiB * MiB)
            f.write(os.urandom(extent))


def warm(path: Path) -> None:
    """Read a file once so its pages are cached: every contender starts alike."""
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * MiB):
            pass


def _remove_if_empty(path: Path) -> None:
    if path.exists() and not path.stat().st_size:
        remove(path)


def start_daemon(
    stack: ExitStack,
    command: list[str],
    log_path: Path,
    ready: Callable[[], bool],
    stop: Callable[[subprocess.Popen[bytes]], None],
) -> subprocess.Popen[bytes]:
    """Start a serving daemon, register ``stop(proc)``, wait up to 30 s for ``ready()``. Its
    output goes to ``log_path``, kept only if it said something."""
    on_exit(stack, f"rm {log_path}", _remove_if_empty, log_path)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    on_exit(stack, f"stop {command[:2]}", stop, proc)
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{command[:2]} is not ready ({proc.poll()}); see {log_path}")
        time.sleep(0.05)
    return proc


def sshfs_destination(stack: ExitStack, work: Path) -> Path:
    """A directory on sshfs served by a private sshd on 127.0.0.1 (tests/remote.py's fixture,
    which keeps its keys, config and logs in ``work``): unmounted, stopped and ``work`` removed
    when ``stack`` unwinds. They start with SIGINT and SIGHUP blocked, which sshfs and ssh keep
    (sshd unblocks them, but serves each connection in a session of its own): a terminal's
    Ctrl-C leaves the mount up until the bench has cancelled the move and unmounts it."""
    spec = importlib.util.spec_from_file_location("fusedisk_remote", ROOT / "tests" / "remote.py")
    assert spec is not None and spec.loader is not None
    remote = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # for dataclasses
    spec.loader.exec_module(remote)
    mnt = work / "mnt"
    on_exit(stack, f"rm -r {work}", _remove_tree, work, mnt)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGHUP})
    try:
        sshd = stack.enter_context(remote.private_sshd(work))
        stack.enter_context(remote.sshfs_mount(sshd, work / "export", mnt))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl-C held back arrives now
    log(f"destination: sshfs {mnt}, sshd on 127.0.0.1:{sshd.port} serving {work / 'export'}")
    return mnt


def _remove_tree(path: Path, mountpoint: Path) -> None:
    if is_mounted(mountpoint):
        raise RuntimeError(f"{mountpoint} is still mounted; leaving {path}")
    shutil.rmtree(path, ignore_errors=True)


# ---- contenders -------------------------------------------------------------------------------


@dataclass
class Served:
    """How a contender serves an image: the file fio or QEMU opens, and what else is needed."""

    file: Path
    pid: int | None = None  # the serving daemon, for CPU accounting and py-spy
    qmp: Path | None = None  # qemu-storage-daemon's monitor socket
    nbd: str | None = None  # qemu-storage-daemon's NBD URI (``file`` is then its socket)


def fusedisk(*args: str | Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """Run the venv's fusedisk CLI (``env``: more environment); its stdout, or RuntimeError
    with its stderr."""
    command = [sys.executable, "-m", "fusedisk", *map(str, args)]
    r = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env} if env else None,
    )
    if r.returncode:
        raise RuntimeError(f"fusedisk {' '.join(map(str, args))}: {r.stderr.strip()}")
    return r.stdout


def status(mountpoint: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(fusedisk("status", mountpoint, "--json"))
    return result


def _mountpoint(stack: ExitStack, path: Path) -> Path:
    path.mkdir(exist_ok=True)
    on_exit(stack, f"rmdir {path}", _rmdir, path)
    return path


def _rmdir(path: Path) -> None:
    if not is_mounted(path):
        path.rmdir()


def serve_raw(stack: ExitStack, image: Path, work: Path) -> Served:
    return Served(image)


def serve_fusedisk(
    stack: ExitStack, image: Path, work: Path, env: dict[str, str] | None = None
) -> Served:
    mnt = _mountpoint(stack, work / f"{image.stem}.mnt")
    served = Served(mnt / "disk")

    def stop() -> None:
        try:
            if is_mounted(mnt):
                fusedisk("unmount", mnt, timeout=180)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log(f"{e}; unmounting lazily and killing the daemon")
            unmount(mnt, lazy=True)
            if served.pid:  # the daemon this run mounted, by the pid its status reported
                with contextlib.suppress(ProcessLookupError):
                    os.kill(served.pid, signal.SIGKILL)

    on_exit(stack, f"unmount {mnt}", stop)  # before mounting: a half-made mount is undone too
    fusedisk("mount", image, mnt, "--name", "disk", env=env)  # the daemon inherits ``env``
    served.pid = int(status(mnt)["pid"])
    return served


def serve_floor(stack: ExitStack, image: Path, work: Path, mirror: bool = False) -> Served:
    mnt = _mountpoint(stack, work / f"{image.stem}.mnt")
    command = [sys.executable, str(Path(__file__).with_name("floor.py")), str(image), str(mnt)]
    if mirror:  # a new sparse file of the same size, as a move's destination starts
        copy = scratch(stack, image.with_suffix(".mirror"))
        copy.touch()
        os.truncate(copy, image.stat().st_size)
        command += ["--mirror", str(copy)]

    def stop(proc: subprocess.Popen[bytes]) -> None:
        unmount(mnt)  # floor.py returns once unmounted
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        terminate(proc)
        unmount(mnt, lazy=True)

    log_path = work / f"{image.stem}.floor.log"
    proc = start_daemon(stack, command, log_path, lambda: is_mounted(mnt), stop)
    return Served(mnt / "disk", proc.pid)


def serve_qsd(stack: ExitStack, image: Path, work: Path, nbd: bool = False) -> Served:
    """qemu-storage-daemon serving ``image``: a writable FUSE export over a regular file, as
    shared/GUEST.md shows, or (``nbd``) a writable NBD export on a unix socket; QMP beside."""
    export = scratch(stack, work / f"{image.stem}.{'nbd' if nbd else 'export'}")
    qmp = scratch(stack, work / f"{image.stem}.qmp")
    command = [
        "qemu-storage-daemon",
        "--blockdev", f"node-name=file0,driver=file,filename={image}",
        "--blockdev", "node-name=fmt0,driver=raw,file=file0",
        "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp0",
        "--monitor", "chardev=qmp0",
    ]  # fmt: skip
    if nbd:
        command += ["--nbd-server", f"addr.type=unix,addr.path={export}"]
        kind = "type=nbd,name=disk"
    else:
        export.touch()
        kind = f"type=fuse,mountpoint={export}"
    command += ["--export", f"{kind},id=exp0,node-name=fmt0,writable=on"]

    def ready() -> bool:
        return qmp.exists() and (export.exists() if nbd else is_mounted(export))

    def stop(proc: subprocess.Popen[bytes]) -> None:
        terminate(proc)
        unmount(export, lazy=True)

    proc = start_daemon(stack, command, work / f"{image.stem}.qsd.log", ready, stop)
    uri = f"nbd+unix:///disk?socket={export}" if nbd else None
    return Served(export, proc.pid, qmp=qmp, nbd=uri)


# ---- movers -----------------------------------------------------------------------------------


class FusediskMove:
    """`fusedisk migrate MNT DEST --json --rate R`, running while the caller measures."""

    def __init__(
        self, stack: ExitStack, served: Served, dest: Path, size: int, options: Sequence[str] = ()
    ) -> None:
        self.stack, self.mnt, self.dest = stack, served.file.parent, scratch(stack, dest)
        self.options = options  # more `fusedisk migrate` options

    def start(self, rate: int) -> None:
        command = [sys.executable, "-m", "fusedisk", "migrate", str(self.mnt), str(self.dest)]
        command += [*self.options, "--json", "--rate", str(rate)]
        # SIGINT, if the bench stops it early, cancels the move
        self.proc = start(self.stack, command, signal.SIGINT, 120)

    def set_rate(self, rate: int) -> None:
        fusedisk("rate", self.mnt, str(rate))

    def snapshot(self) -> dict[str, Any]:
        s = status(self.mnt)
        return {
            "moving": s["phase"] == "mirroring",
            "progress": round(s["progress_bytes"] / max(1, s["total_bytes"]), 3),
            "copied_bytes": s["copied_bytes"],
        }

    def wait(self) -> Run:
        out, err = self.proc.communicate(timeout=3600)
        if self.proc.returncode:
            raise RuntimeError(f"fusedisk migrate failed: {err.strip()}")
        s = json.loads(out)
        keys: tuple[str, ...] = ("switch_pause_ms", "copied_bytes", "mirrored_bytes")
        keys += ("synced_by_writes_bytes", "hole_bytes", "size")
        return {
            "started": s["started"],
            "finished": s["finished"],
            "move_s": round(s["finished"] - s["started"], 3),
            "copied_ratio": round(s["copied_bytes"] / s["size"], 4),
            **{k: s[k] for k in keys},
            "dest_timeout": s.get("dest_timeout"),  # what the daemon ran with
        }


class QsdMirror:
    """blockdev-add of a new raw file, blockdev-mirror (sync full, copy-mode write-blocking,
    speed R) of the exported node, BLOCK_JOB_READY, job-complete, BLOCK_JOB_COMPLETED."""

    def __init__(self, stack: ExitStack, served: Served, dest: Path, size: int) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        # The target as fusedisk creates its own: a new, sparse file of the same size.
        command = ["qemu-img", "create", "-q", "-f", "raw", str(scratch(stack, dest)), str(size)]
        subprocess.run(command, check=True)
        self.size, self.qmp = size, QEMUMonitorProtocol(str(served.qmp))
        self.qmp.connect()
        stack.callback(self.qmp.close)
        target = {"driver": "file", "filename": str(dest)}
        self.qmp.cmd("blockdev-add", **{"node-name": "target0", "driver": "raw", "file": target})

    def start(self, rate: int) -> None:
        self.started = time.time()
        args = {"job-id": "move0", "device": "fmt0", "target": "target0", "sync": "full"}
        self.qmp.cmd("blockdev-mirror", **args, **{"copy-mode": "write-blocking", "speed": rate})

    def set_rate(self, rate: int) -> None:
        self.qmp.cmd("block-job-set-speed", device="move0", speed=rate)

    def snapshot(self) -> dict[str, Any]:
        reply: list[dict[str, Any]] = self.qmp.cmd("query-block-jobs")  # type: ignore[assignment]
        job = next(j for j in reply if j["device"] == "move0")  # until job-complete
        return {"moving": not job["ready"], "progress": round(job["offset"] / job["len"], 3)}

    def wait(self) -> Run:
        ready = self._event("BLOCK_JOB_READY")
        t_complete = time.time()
        self.qmp.cmd("job-complete", id="move0")
        done = self._event("BLOCK_JOB_COMPLETED")
        finished = _event_time(done)
        return {
            "started": self.started,
            "finished": finished,
            "move_s": round(finished - self.started, 3),
            "ready_after_s": round(_event_time(ready) - self.started, 3),
            # job-complete sent -> BLOCK_JOB_COMPLETED's own timestamp: an upper bound on the
            # drained section in which qsd swaps the nodes.
            "switch_pause_ms": round((finished - t_complete) * 1000, 1),
            "copied_ratio": round(done["data"].get("offset", 0) / self.size, 4),
        }

    def _event(self, name: str) -> dict[str, Any]:
        while True:
            event = self.qmp.pull_event(wait=1800.0)  # TimeoutError after that
            assert event is not None
            if event["event"] == "BLOCK_JOB_COMPLETED" and event["data"].get("error"):
                raise RuntimeError(f"qsd mirror failed: {event['data']['error']}")
            if event["event"] == name:
                return event


def _event_time(event: dict[str, Any]) -> float:
    return float(event["timestamp"]["seconds"]) + float(event["timestamp"]["microseconds"]) / 1e6


@dataclass(frozen=True)
class Contender:
    about: str
    serve: Callable[[ExitStack, Path, Path], Served]
    # measured while its image moves: mover(stack, served, dest, size)
    mover: Callable[[ExitStack, Served, Path, int], FusediskMove | QsdMirror] | None = None


nbd = functools.partial(serve_qsd, nbd=True)
floor_mirror = functools.partial(serve_floor, mirror=True)
deadline = functools.partial(FusediskMove, options=("--dest-timeout", "1"))
no_record = functools.partial(serve_fusedisk, env={"FUSEDISK_CHECKPOINT_EVERY": "inf"})
# Every contender of every subcommand, in one place.
CONTENDERS = {
    "raw": Contender("the image file itself (fio and QEMU open it O_DIRECT)", serve_raw),
    "floor": Contender("scripts/floor.py, bare pyfuse3 passthrough, syscalls inline", serve_floor),
    "floor-mirror": Contender("floor.py --mirror: each write to a second file too", floor_mirror),
    "fusedisk": Contender("`fusedisk mount` of the image", serve_fusedisk),
    "qsd": Contender("qemu-storage-daemon's writable FUSE export", serve_qsd),
    "qsd-nbd": Contender("qemu-storage-daemon's NBD export (unix socket)", nbd),
    "fusedisk-move": Contender(
        "fusedisk, moved by `fusedisk migrate`", serve_fusedisk, FusediskMove
    ),
    "fusedisk-move-deadline": Contender(
        "fusedisk-move with `--dest-timeout 1`: DEST through worker threads, 1 s deadline (the "
        "default on network and FUSE filesystems; on local ones the default is inline)",
        serve_fusedisk,
        deadline,
    ),
    "fusedisk-move-norecord": Contender(
        "fusedisk-move with no write-intent record (FUSEDISK_CHECKPOINT_EVERY=inf: no marks, "
        "no checkpoints; a crash rolls the move back): what the record costs",
        no_record,
        FusediskMove,
    ),
    "qsd-move": Contender("qsd-nbd, moved by blockdev-mirror write-blocking", nbd, QsdMirror),
    "cp": Contender("`cp SRC DST`, fdatasync DST, rm SRC and fsync the directory", serve_raw),
}


# ---- fio --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int

    @property
    def direction(self) -> str:
        return "read" if "read" in self.rw else "write"

    @property
    def metric(self) -> str:  # what the job is judged on
        return "iops" if self.bs == "4k" else "mibs"

    def args(self, filename: str | Path) -> list[str]:
        return [
            f"--name={self.name}",
            f"--filename={filename}",
            f"--rw={self.rw}",
            f"--bs={self.bs}",
            f"--iodepth={self.iodepth}",
        ]


JOBS = (
    Job("4k-randread-qd16", "randread", "4k", 16),
    Job("4k-randwrite-qd16", "randwrite", "4k", 16),
    Job("1m-seqread-qd8", "read", "1M", 8),
    Job("1m-seqwrite-qd8", "write", "1M", 8),
)


def fio_timing(runtime: float, ramp: float) -> list[str]:
    """What every measured fio job shares: libaio, O_DIRECT, time-based, after a ramp."""
    timing = [f"--runtime={runtime:g}", f"--ramp_time={ramp:g}"]
    return ["--ioengine=libaio", "--direct=1", "--time_based=1", "--randrepeat=0", *timing]


def parse_fio(text: str) -> dict[str, Any]:
    """fio's JSON, skipping lines it prints before it (such as 'terminating on signal')."""
    if "{" not in text:
        raise RuntimeError(f"fio printed no JSON: {text[:500]!r}")
    result: dict[str, Any] = json.loads(text[text.find("{") :])
    return result


def run_fio(args: Sequence[str], timeout: float) -> dict[str, Any]:
    r = subprocess.run(
        ["fio", "--output-format=json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if r.returncode:
        raise RuntimeError(f"fio failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return parse_fio(r.stdout)


def job_figures(out: dict[str, Any], jobs: Iterable[Job]) -> dict[str, Run]:
    """Per job: IOPS, MiB/s, p99 completion latency and fio's own CPU, from fio's JSON."""
    by_name = {j["jobname"]: j for j in out["jobs"]}
    figures = {}
    for job in jobs:
        j = by_name[job.name]
        stats = j[job.direction]
        p99 = stats.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0)
        figures[job.name] = {
            "iops": round(stats["iops"], 1),
            "mibs": round(stats["bw_bytes"] / MiB, 1),
            "p99_ms": round(p99 / 1e6, 3),
            "fio_cores": round((j["usr_cpu"] + j["sys_cpu"]) / 100, 3),
        }
    return figures


# ---- CPU --------------------------------------------------------------------------------------


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU a process (or one of its threads) has used so far."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path, encoding="utf-8") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [float(v) for v in f.readline().split()[1:8]]
    return sum(values) - values[3] - values[4], sum(values)  # less idle and iowait


def busy(before: tuple[float, float], after: tuple[float, float]) -> float:
    """How busy the whole machine was between two cpu_times() (1.0: every core)."""
    return round(ratio(after[0] - before[0], after[1] - before[1]), 3)


# ---- running and comparing --------------------------------------------------------------------


def interleave(
    reps: int, names: Sequence[str], run: Callable[[str], Run], describe: Callable[[Run], str]
) -> dict[str, list[Run]]:
    """Run every contender once per repetition, interleaved (a, b, c, a, b, c, ...), so that
    the machine's noise hits all of them alike."""
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for rep in range(reps):
        for i, name in enumerate(names):
            runs[name].append(run(name))
            done = f"{rep * len(names) + i + 1}/{reps * len(names)}"
            log(f"[{done}] {name}: {describe(runs[name][-1])}")
    return runs


def median(values: Iterable[float]) -> float:
    """The median of the numbers among ``values`` (NaN stands for a figure not measured)."""
    numbers = [v for v in values if not math.isnan(v)]
    return statistics.median(numbers) if numbers else math.nan


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def value(run: Run, path: Sequence[str]) -> float:
    """The number at ``path`` in a run's nested figures; NaN where there is none."""
    v: Any = run
    for key in path:
        v = v.get(key) if isinstance(v, dict) else None
    return float(v) if isinstance(v, int | float) else math.nan


def values(runs: Sequence[Run], *path: str) -> list[float]:
    return [value(r, path) for r in runs]


def med(runs: Sequence[Run], *path: str) -> float:
    return median(values(runs, *path))


def compare(a: Sequence[float], b: Sequence[float]) -> tuple[float, str]:
    """median(a) / median(b), and as text with the per-repetition ratios a[i] / b[i]."""
    r = ratio(median(a), median(b))
    per = [fmt(ratio(x, y)) for x, y in zip(a, b, strict=False)]
    return r, fmt(r) + (f" ({', '.join(per)})" if len(per) > 1 else "")


def fmt(x: str | float | None, digits: int = 2) -> str:
    if isinstance(x, str):
        return x
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def verdict(x: float, target: float, at_most: bool = False) -> str:
    """PASS/MISS for ``x >= target`` (or ``<=``), as printed (two decimals); '-' where a
    contender was not run."""
    if math.isnan(x) or math.isnan(target):
        return "-"
    x, target = round(x, 2), round(target, 2)
    return "PASS" if (x <= target if at_most else x >= target) else "MISS"


# ---- reports ----------------------------------------------------------------------------------


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: str | float | None) -> None:
        """A row; numbers get two decimals, a flag yes/no, a missing figure '-'."""
        yes_no = ("no", "yes")
        self.rows.append([yes_no[c] if isinstance(c, bool) else fmt(c) for c in cells])

    def target(
        self, label: str, x: float | tuple[float, str], goal: float, at_most: bool = False
    ) -> None:
        """A row of a targets table: the figure (or a compare()), the goal and the verdict."""
        value, text = x if isinstance(x, tuple) else (x, fmt(x))
        self.add(label, text, goal, verdict(value, goal, at_most))

    def __str__(self) -> str:
        lines = [self.title, "", "| " + " | ".join(self.header) + " |"]
        lines.append("|" + "---|" * len(self.header))
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows]) + "\n"


def report(
    args: argparse.Namespace, notes: dict[str, Any], tables: list[Table], data: dict[str, Any]
) -> None:
    """Print the tables as markdown; with --json, write them and every figure there too."""
    for table in tables:
        print(table)
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items() if k != "run"}
        result: dict[str, Any] = {"command": " ".join(sys.argv), "machine": notes}
        result["settings"] = settings
        result["tables"] = [vars(t) for t in tables]
        args.json.write_text(json.dumps(result | data, indent=2) + "\n")
        log(f"wrote {args.json}")


def idle_table(
    title: str,
    names: Sequence[str],
    jobs: Sequence[Job],
    figures: Callable[[str, Job], list[float]],
) -> Table:
    """Per job: each contender's median, fusedisk against floor, qsd and raw, and the targets:
    fusedisk >= 0.9 x floor on every job, >= 0.7 x qsd on 4 KiB random writes. ``figures``
    gives a contender's per-repetition values of a job's metric ([] if it was not run)."""
    header = ["job", *names, "fusedisk/floor", "fusedisk/qsd", "fusedisk/raw"]
    table = Table(title, [*header, "fusedisk >= 0.9 floor", "fusedisk >= 0.7 qsd (4k write)"])
    for job in jobs:
        cells = []
        for name in names:
            cells.append(fmt(median(figures(name, job)), 0 if job.metric == "iops" else 1))
            if "@" in name:  # a tuned contender: its ratio to the plain one
                plain = compare(figures(name, job), figures(name.partition("@")[0], job))
                cells[-1] += f" ({fmt(plain[0])})"
        fd = figures("fusedisk", job)
        floor, qsd, raw = (compare(fd, figures(name, job)) for name in ("floor", "qsd", "raw"))
        write = verdict(qsd[0], 0.7) if job.rw == "randwrite" and job.bs == "4k" else ""
        table.add(job.name, *cells, floor[1], qsd[1], raw[1], verdict(floor[0], 0.9), write)
    return table


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.strip().splitlines() or ["?"])[0]


def machine_notes(workdir: Path) -> dict[str, Any]:
    """The machine and the code measured (a digest of fusedisk/: others edit the tree)."""
    import pyfuse3

    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    digest = hashlib.sha256()
    for path in sorted((ROOT / "fusedisk").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    git = ["git", "-C", str(ROOT)]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": _first_line([*git, "rev-parse", "--short", "HEAD"]),
        "fusedisk_dirty": _first_line([*git, "status", "--porcelain", "--", "fusedisk"]) != "?",
        "fusedisk_sha256": digest.hexdigest()[:16],
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "loadavg_at_start": os.getloadavg(),
        "workdir_fs": _first_line(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(workdir)]),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3.__version__,
        "fio": _first_line(["fio", "--version"]),
        "qemu_storage_daemon": _first_line(["qemu-storage-daemon", "--version"]),
    }


# ---- py-spy -----------------------------------------------------------------------------------


@contextlib.contextmanager
def profiled(pid: int | None, raw: Path | None, native: bool) -> Iterator[dict[str, Any]]:
    """py-spy on ``pid`` while the body runs (with ``raw``, its output file), every thread
    apart and idle time included; the yielded dict then gets the top leaf frames of the main
    thread (the event loop serving FUSE) and of the others. ``native``: C frames too (syscalls
    by name), which pauses the process for each sample, so 100 Hz instead of 200."""
    if raw is None:
        yield {}
        return
    venv = Path(sys.executable).parent
    spy = shutil.which("py-spy", path=f"{venv}{os.pathsep}{os.environ.get('PATH', '')}")
    if spy is None or pid is None:
        raise RuntimeError("--profile needs py-spy (.venv/bin/pip install py-spy) and a daemon")
    command = [spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(raw)]
    command += ["--idle", "--threads", "--duration", "36000"]
    command += ["--rate", "100", "--native"] if native else ["--rate", "200", "--nonblocking"]
    raw.parent.mkdir(parents=True, exist_ok=True)
    remove(raw)
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    out: dict[str, Any] = {"raw": str(raw)}
    try:
        yield out
    finally:
        terminate(proc, signal.SIGINT, timeout=60)  # py-spy writes what it sampled, then exits
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote no {raw} (exit status {proc.returncode})")
    counts: dict[str, Counter[str]] = {"main thread": Counter(), "other threads": Counter()}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = "other threads"
        if frames[0].startswith("thread ("):
            thread = "main thread" if frames.pop(0).endswith(": MainThread") else thread
        if count.isdigit() and frames:
            counts[thread][_short(frames[-1])] += int(count)
    for thread, c in counts.items():
        out[thread] = {"samples": c.total(), "self_top": c.most_common(15)}


def _short(frame: str) -> str:
    """``func (/long/path/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({'/'.join(where.split('/')[-2:])}" if where else name


def profile_table(title: str, profile: dict[str, Any]) -> Table:
    raw = profile["raw"]
    table = Table(
        f"py-spy, {title}: self time (leaf frames); stacks in {raw}", ["thread", "share", "frame"]
    )
    for thread in ("main thread", "other threads"):
        total = max(1, profile[thread]["samples"])
        for frame, n in profile[thread]["self_top"][:12]:
            table.add(thread, f"{100 * n / total:.1f} %", frame)
    return table
