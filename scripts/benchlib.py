"""The machinery of scripts/bench.py: processes, contenders and movers, fio, the interleaved
runner, statistics, tables and the report.

Everything a run starts (images, mounts, daemons, fio, moves) is registered on an ExitStack the
moment it exists, so an error, Ctrl-C or SIGTERM unwinds all of it, newest first; an undo that
fails is logged and the ones after it still run.

Adding a subcommand: write ``run(args) -> Result`` (the tables to print, and the data --json
writes beside them; its docstring is its --help) and a function adding its own options (every
subcommand has --dir, --json, --size in MiB and --reps), and register both in SUBCOMMANDS in
bench.py. ``prepare`` serves a fresh image by one of CONTENDERS (a new contender is one more
entry there), ``interleave`` runs contenders once per repetition, ``Writer`` is a fio writer
measured in time windows, and ``Table`` prints, with ``values``, ``compare`` and ``verdict``.
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
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
Run = dict[str, Any]  # the figures of one run of one contender
Result = tuple[list["Table"], dict[str, Any]]  # a subcommand's tables, and its data for --json


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- starting and stopping
def on_exit(stack: ExitStack, what: str, undo: Callable[..., object], *args: object) -> None:
    """Run ``undo(*args)`` when ``stack`` unwinds; a failure is logged, the rest still run."""

    def run() -> None:
        try:
            undo(*args)
        except Exception as e:
            log(f"cleanup: {what}: {e!r}")

    stack.callback(run)


def terminate(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 120) -> None:
    """Stop a process this script started, by its own handle, escalating to SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start(
    stack: ExitStack, command: list[str], sig: int = signal.SIGINT, piped: bool = True
) -> subprocess.Popen[str]:
    """Start ``command`` in a session of its own (a terminal's Ctrl-C reaches only the bench),
    its output piped or else on the bench's stderr, and register stopping it by ``sig``
    (SIGINT: fio writes its logs and JSON, `fusedisk migrate` cancels its move)."""
    out = subprocess.PIPE if piped else sys.stderr
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, text=True, start_new_session=True
    )
    on_exit(stack, f"stop {command[:2]}", terminate, proc, sig)
    return proc


def start_daemon(
    stack: ExitStack, command: list[str], ready: Callable[[], bool], mountpoint: Path
) -> int:
    """Start a serving daemon and wait up to 30 s for ``ready()``; its pid. On unwinding,
    SIGTERM stops it (floor.py then leaves its mount behind) and ``mountpoint`` is unmounted
    lazily, if mounted."""
    on_exit(stack, f"unmount {mountpoint}", unmount, mountpoint, True)
    proc = start(stack, command, signal.SIGTERM, piped=False)
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{command[:2]} is not ready (exit status {proc.poll()})")
        time.sleep(0.05)
    return proc.pid


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


def scratch(stack: ExitStack, path: Path) -> Path:
    """``path``, removed now and again when ``stack`` unwinds."""
    remove(path)
    on_exit(stack, f"rm {path}", remove, path)
    return path


def make_image(path: Path, size: int) -> None:
    """A non-sparse image: 1 MiB of seeded random bytes per block, stamped with the block number,
    so every block differs and every image is the same."""
    block = bytearray(random.Random(1).randbytes(MiB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for offset in range(0, size, MiB):
            block[:8] = (offset // MiB).to_bytes(8, "little")
            os.pwrite(fd, memoryview(block)[: min(MiB, size - offset)], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


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


# ---- contenders
@dataclass
class Served:
    """How a contender serves an image: the file fio or QEMU opens, and what else is needed."""

    file: Path
    pid: int | None = None  # the serving daemon, for CPU accounting and py-spy
    qmp: Path | None = None  # qemu-storage-daemon's monitor socket
    nbd: str | None = None  # qemu-storage-daemon's NBD URI (``file`` is then its socket)


def run(*command: str | Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """``command``'s stdout, or RuntimeError with the end of its stderr; ``env`` added to ours."""
    argv, environ = list(map(str, command)), None if env is None else os.environ | env
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=environ
    )
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()[-2000:]}")
    return r.stdout


def fusedisk(*args: str | Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    """Run the venv's fusedisk CLI (``sys.executable -m fusedisk``)."""
    return run(sys.executable, "-m", "fusedisk", *args, timeout=timeout, env=env)


def _mountpoint(stack: ExitStack, image: Path) -> Path:
    path = image.with_suffix(".mnt")
    path.mkdir(exist_ok=True)
    on_exit(stack, f"rmdir {path}", _rmdir, path)
    return path


def _rmdir(path: Path) -> None:
    if not is_mounted(path):
        path.rmdir()


def serve_raw(stack: ExitStack, image: Path) -> Served:
    return Served(image)


def serve_fusedisk(stack: ExitStack, image: Path, env: dict[str, str] | None = None) -> Served:
    mnt = _mountpoint(stack, image)
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
    fusedisk("mount", image, mnt, "--name", "disk", env=env)  # the daemon keeps ``env``
    served.pid = int(status(mnt)["pid"])
    return served


def status(mnt: Path) -> dict[str, Any]:
    """A fusedisk daemon's status, from its mount's .status file."""
    s: dict[str, Any] = json.loads((mnt / ".status").read_text())
    return s


def stock_pyfuse3() -> Path:
    """pyfuse3 3.5.0 as PyPI has it, unpacked from the wheel scripts/setup built (once)."""
    target = ROOT / ".venv" / "stock-pyfuse3" / "site"
    if not (target / "pyfuse3").is_dir():
        wheels = sorted(target.parent.glob("pyfuse3-3.5.0-*.whl"))
        if not wheels:
            raise RuntimeError(f"no stock pyfuse3 wheel in {target.parent}: run scripts/setup")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
        subprocess.run([*pip, "--target", str(target), str(wheels[-1])], check=True)
    return target


def serve_floor(stack: ExitStack, image: Path, mirror: bool = False, stock: bool = False) -> Served:
    mnt = _mountpoint(stack, image)
    command = [sys.executable, str(Path(__file__).with_name("floor.py")), str(image), str(mnt)]
    if stock:  # the floor on the library as released, beside ours (pyfuse3-patch/)
        command = ["env", f"PYTHONPATH={stock_pyfuse3()}", *command]
    if mirror:  # a new sparse file of the same size, as a move's destination starts
        with open(scratch(stack, image.with_suffix(".mirror")), "wb") as copy:
            copy.truncate(image.stat().st_size)
        command += ["--mirror", copy.name]
    return Served(
        mnt / "disk", start_daemon(stack, command, functools.partial(is_mounted, mnt), mnt)
    )


def serve_qsd(stack: ExitStack, image: Path, nbd: bool = False) -> Served:
    """qemu-storage-daemon serving ``image``: a writable FUSE export over a regular file, as
    shared/GUEST.md shows, or (``nbd``) a writable NBD export on a unix socket; QMP beside."""
    export = scratch(stack, image.with_suffix(".nbd" if nbd else ".export"))
    qmp = scratch(stack, image.with_suffix(".qmp"))
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

    uri = f"nbd+unix:///disk?socket={export}" if nbd else None
    return Served(export, start_daemon(stack, command, ready, export), qmp=qmp, nbd=uri)


class FusediskMove:
    """`fusedisk migrate MNT DEST --json --rate R`, running while the caller measures."""

    def __init__(
        self, stack: ExitStack, served: Served, dest: Path, size: int, options: Sequence[str] = ()
    ) -> None:
        self.stack, self.mnt, self.dest = stack, served.file.parent, scratch(stack, dest)
        self.options = options  # more `fusedisk migrate` options

    def start(self, rate: int) -> None:
        command = [sys.executable, "-m", "fusedisk", "migrate", str(self.mnt), str(self.dest)]
        self.proc = start(self.stack, [*command, *self.options, "--json", "--rate", str(rate)])

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
        s = json.loads(out) if out.strip() else {}
        if self.proc.returncode and s.get("phase") == "failed" and s.get("started"):
            # Failed back (a remote past its deadline, say): a figure of its own, and the
            # writer's "during" is the move until then.
            return {"started": s["started"], "finished": time.time(), "failed_back": s["error"]}
        if self.proc.returncode:
            raise RuntimeError(f"fusedisk migrate failed: {err.strip()}")
        keys = ("switch_pause_ms", "copied_bytes", "mirrored_bytes", "synced_by_writes_bytes")
        return {
            "started": s["started"],
            "finished": s["finished"],
            "move_s": round(s["finished"] - s["started"], 3),
            "copied_ratio": round(s["copied_bytes"] / s["size"], 4),
            **{k: s[k] for k in (*keys, "hole_bytes", "size")},
            "dest_timeout": s.get("dest_timeout"),  # what the daemon ran with
            "dest_writes": s.get("dest_writes"),
            "switch_steps_ms": s.get("switch_steps_ms"),
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
        return {
            "started": self.started,
            "finished": done["time"],
            "move_s": round(done["time"] - self.started, 3),
            "ready_after_s": round(ready["time"] - self.started, 3),
            # job-complete sent -> BLOCK_JOB_COMPLETED's own timestamp: an upper bound on the
            # drained section in which qsd swaps the nodes.
            "switch_pause_ms": round((done["time"] - t_complete) * 1000, 1),
            "copied_ratio": round(done["data"].get("offset", 0) / self.size, 4),
        }

    def _event(self, name: str) -> dict[str, Any]:
        """The next event ``name``, with its timestamp as "time" (Unix seconds)."""
        while True:
            event = self.qmp.pull_event(wait=1800.0)  # TimeoutError after that
            assert event is not None
            if event["event"] == "BLOCK_JOB_COMPLETED" and event["data"].get("error"):
                raise RuntimeError(f"qsd mirror failed: {event['data']['error']}")
            if event["event"] == name:
                stamp = event["timestamp"]
                return event | {"time": stamp["seconds"] + stamp["microseconds"] / 1e6}


@dataclass(frozen=True)
class Contender:
    about: str  # listed by `bench.py --help`
    serve: Callable[[ExitStack, Path], Served]  # serve(stack, image)
    # measured while its image moves: mover(stack, served, dest, size)
    mover: Callable[[ExitStack, Served, Path, int], FusediskMove | QsdMirror] | None = None


nbd = functools.partial(serve_qsd, nbd=True)


# Every contender of every subcommand, in one place.
def _move_with(description: str, **env: str) -> Contender:
    """fusedisk-move with a daemon started with ``env`` in its environment (a knob's value)."""
    return Contender(description, functools.partial(serve_fusedisk, env=env), FusediskMove)


CONTENDERS = {
    "raw": Contender("the image file itself (fio and QEMU open it O_DIRECT)", serve_raw),
    "floor": Contender("scripts/floor.py: bare pyfuse3 passthrough, syscalls inline", serve_floor),
    "floor-stock": Contender(
        "floor.py on the stock pyfuse3 3.5.0 (the others run ours: pyfuse3-patch/)",
        functools.partial(serve_floor, stock=True),
    ),
    "floor-mirror": Contender(
        "floor.py --mirror: each write to a second file too (the floor during a move)",
        functools.partial(serve_floor, mirror=True),
    ),
    "fusedisk": Contender("`fusedisk mount` of the image", serve_fusedisk),
    "qsd": Contender("qemu-storage-daemon's writable FUSE export", serve_qsd),
    "qsd-nbd": Contender("qemu-storage-daemon's NBD export (unix socket)", nbd),
    "fusedisk-move": Contender(
        "fusedisk, moved by `fusedisk migrate` (the default: a 1 s deadline on the destination, "
        "mirrored writes on the native thread)",
        serve_fusedisk,
        FusediskMove,
    ),
    "fusedisk-move-inline": Contender(
        "fusedisk-move with --dest-timeout 0: no deadline, the destination written inline by "
        "the event loop (the default before 2026-12-02 on local filesystems)",
        serve_fusedisk,
        functools.partial(FusediskMove, options=("--dest-timeout", "0")),
    ),
    "fusedisk-move-threads": _move_with(
        "fusedisk-move with FUSEDISK_DEST_LANE=threads: mirrored writes through a Python worker "
        "thread instead of the native one (fusedisk/_lane.c)",
        FUSEDISK_DEST_LANE="threads",
    ),
    "fusedisk-move-norecord": _move_with(
        "fusedisk-move with no write-intent record (FUSEDISK_CHECKPOINT_EVERY=inf: no marks, "
        "no checkpoints; a crash rolls the move back): what the record costs",
        FUSEDISK_CHECKPOINT_EVERY="inf",
    ),
    "fusedisk-move-paced": _move_with(
        "fusedisk-move with FUSEDISK_CHECKPOINT_PACE=4 (the default since 2026-12-02): a "
        "checkpoint waits 4 times as long as the last one's flush took (at least the usual 2 s)",
        FUSEDISK_CHECKPOINT_PACE="4",
    ),
    "fusedisk-move-unpaced": _move_with(
        "fusedisk-move with FUSEDISK_CHECKPOINT_PACE=0: a checkpoint every 2 s of copying "
        "however long the last one's flush took (the default before 2026-12-02)",
        FUSEDISK_CHECKPOINT_PACE="0",
    ),
    "fusedisk-move-early": _move_with(
        "fusedisk-move with FUSEDISK_EARLY_WRITEBACK=0.5: both files' writeback started every "
        "0.5 s between checkpoints (sync_file_range)",
        FUSEDISK_EARLY_WRITEBACK="0.5",
    ),
    "qsd-move": Contender("qsd-nbd, moved by blockdev-mirror write-blocking", nbd, QsdMirror),
    "cp": Contender("`cp SRC DST`, fdatasync DST, rm SRC and fsync the directory", serve_raw),
}


def prepare(
    stack: ExitStack, name: str, image: Path, size: int, dest: Path | None = None, data: int = 0
) -> tuple[Served, FusediskMove | QsdMirror | None]:
    """A fresh image of ``size`` bytes served by contender ``name`` and, for a moving one, its
    mover to ``dest``: non-sparse, read once (cached, as for every contender) with no dirty
    pages left; or, given ``data``, sparse with ``data`` bytes of it (make_sparse)."""
    if data:
        make_sparse(scratch(stack, image), size, data)
    else:
        make_image(scratch(stack, image), size)
    served = CONTENDERS[name].serve(stack, image)
    mover = CONTENDERS[name].mover
    move = mover(stack, served, dest or image.with_suffix(".dest"), size) if mover else None
    if not data:
        warm(image)
    return served, move


def warm(image: Path) -> None:
    """No dirty pages left, and ``image`` read once: cached, as every contender's image is."""
    os.sync()
    with open(image, "rb", buffering=0) as f:
        while f.read(4 * MiB):
            pass


# ---- fio
@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int

    @property
    def metric(self) -> str:  # what the job is judged on
        return "iops" if self.bs == "4k" else "mibs"

    def median(self, values: list[float]) -> str:
        """The median of a contender's values of ``metric``, as a table shows it."""
        return fmt(median(values), 0 if self.metric == "iops" else 1)

    def args(self, filename: str | Path) -> list[str]:
        return [
            *(f"--name={self.name}", f"--filename={filename}", f"--rw={self.rw}"),
            *(f"--bs={self.bs}", f"--iodepth={self.iodepth}"),
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


def job_figures(out: dict[str, Any], jobs: Iterable[Job]) -> dict[str, Run]:
    """Per job: IOPS, MiB/s, p99 completion latency and fio's own CPU, from fio's JSON."""
    by_name = {j["jobname"]: j for j in out["jobs"]}
    figures = {}
    for job in jobs:
        j = by_name[job.name]
        stats = j["read" if "read" in job.rw else "write"]
        p99 = stats.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0)
        figures[job.name] = {
            "iops": round(stats["iops"], 1),
            "mibs": round(stats["bw_bytes"] / MiB, 1),
            "p99_ms": round(p99 / 1e6, 3),
            "fio_cores": round((j["usr_cpu"] + j["sys_cpu"]) / 100, 3),
        }
    return figures


class Writer:
    """fio writing 4 KiB at random, iodepth 16, through a file (libaio, O_DIRECT) or an NBD URI
    (fio's nbd engine: libnbd, as asynchronous as libaio), logging each write's latency in Unix
    time, so that its figures split exactly into windows (before, during, after a move)."""

    MIN_WINDOW = 0.2  # s: a window shorter than this is too short to quote IOPS for

    def __init__(
        self, stack: ExitStack, served: Served, prefix: Path, options: Sequence[str] = ()
    ) -> None:
        if served.nbd:
            target = ["--ioengine=nbd", f"--uri={served.nbd}"]
        else:
            target = [f"--filename={served.file}", "--ioengine=libaio", "--direct=1"]
        command = ["fio", "--name=writer", *target, "--rw=randwrite", "--bs=4k", "--iodepth=16"]
        command += ["--time_based=1", "--runtime=3600", "--randrepeat=0", "--output-format=json"]
        command += [f"--write_lat_log={prefix}", "--log_unix_epoch=1", *options]
        self.log = [scratch(stack, Path(f"{prefix}_{k}.1.log")) for k in ("lat", "clat", "slat")]
        self.started = time.time()
        self.proc = start(stack, command)
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise RuntimeError(f"writer fio exited: {self.proc.communicate()[1][-2000:]}")

    def stop(self, edges: dict[str, float]) -> dict[str, Any]:
        """Stop fio; its figures in the windows that start at each edge, the last one ending
        now."""
        stop = time.time()
        terminate(self.proc, signal.SIGINT, 30)
        out, err = self.proc.communicate()
        if "{" not in out or parse_fio(out)["jobs"][0]["error"]:
            raise RuntimeError(f"writer fio failed: {err[-2000:]}")
        with open(self.log[0], encoding="ascii") as f:  # completion time (ms), latency (ns)
            self.writes = [
                (int(t) / 1e3, int(ns) / 1e6) for t, ns, _ in (s.split(",", 2) for s in f)
            ]
        ends = [*list(edges.values())[1:], stop]
        return {k: self.window(t0, t1) for (k, t0), t1 in zip(edges.items(), ends, strict=True)}

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Writes completed in [start, end): IOPS, latency percentiles and worst, and the worst
        IOPS over the window's whole seconds."""
        span = end - start
        lats = sorted(ms for t, ms in self.writes if start <= t < end)
        per_second = [0] * int(span)
        for t, _ in self.writes:
            if 0 <= t - start < int(span):
                per_second[int(t - start)] += 1

        def pct(q: int) -> float | None:  # nearest rank
            return round(lats[max(0, math.ceil(len(lats) * q / 100) - 1)], 3) if lats else None

        return {
            "seconds": round(span, 3),
            "iops": round(len(lats) / span) if span >= self.MIN_WINDOW else None,
            "p50_ms": pct(50),
            "p99_ms": pct(99),
            "max_ms": pct(100),
            "min_1s_iops": min(per_second, default=None),
        }


# ---- CPU
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


# ---- running and comparing
def interleave(reps: int, names: Sequence[str], run: Callable[[str], Run]) -> dict[str, list[Run]]:
    """Run every contender once per repetition, interleaved (a, b, c, a, b, c, ...), so that
    the machine's noise hits all of them alike."""
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names:
            log(f"repetition {rep + 1}/{reps}: {name}")
            runs[name].append(run(name))
    return runs


def values(runs: Iterable[Run], *path: str) -> list[float]:
    """The number at ``path`` in each run's nested figures; NaN where there is none."""
    found = []
    for run in runs:
        v: Any = run
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        found.append(float(v) if isinstance(v, int | float) else math.nan)
    return found


def median(numbers: Iterable[float]) -> float:
    """The median of ``numbers`` but NaN (a figure not measured); NaN if there are none."""
    measured = [v for v in numbers if not math.isnan(v)]
    return statistics.median(measured) if measured else math.nan


def med(runs: Iterable[Run], *path: str) -> float:
    return median(values(runs, *path))


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


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


# ---- reports
@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: str | float | None) -> None:
        """A row; numbers get two decimals, a flag yes/no, a missing figure '-'."""
        self.rows.append([("no", "yes")[c] if isinstance(c, bool) else fmt(c) for c in cells])

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
        cells = [job.median(figures(name, job)) for name in names]
        fd = figures("fusedisk", job)
        floor, qsd, raw = (compare(fd, figures(name, job)) for name in ("floor", "qsd", "raw"))
        write = verdict(qsd[0], 0.7) if job.rw == "randwrite" and job.bs == "4k" else ""
        table.add(job.name, *cells, floor[1], qsd[1], raw[1], verdict(floor[0], 0.9), write)
    return table


def report(args: argparse.Namespace, notes: dict[str, Any], result: Result) -> None:
    """Print the tables as markdown; with --json, write them and every figure there too."""
    tables, data = result
    for table in tables:
        print(table)
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items() if k != "run"}
        everything: dict[str, Any] = {"command": " ".join(sys.argv), "machine": notes}
        everything |= {"settings": settings, "tables": [vars(t) for t in tables], **data}
        args.json.write_text(json.dumps(everything, indent=2) + "\n")
        log(f"wrote {args.json}")


def _first_line(*command: str) -> str:
    try:
        return (run(*command, timeout=10).strip().splitlines() or ["?"])[0]
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return "?"


def machine_notes(workdir: Path) -> dict[str, Any]:
    """The machine and the code measured (a digest of fusedisk/: others edit the tree)."""
    import pyfuse3

    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    digest = hashlib.sha256()
    for path in sorted((ROOT / "fusedisk").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    git = ("git", "-C", str(ROOT))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": _first_line(*git, "rev-parse", "--short", "HEAD"),
        "fusedisk_dirty": _first_line(*git, "status", "--porcelain", "--", "fusedisk") != "?",
        "fusedisk_sha256": digest.hexdigest()[:16],
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "loadavg_at_start": os.getloadavg(),
        "workdir_fs": _first_line("findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(workdir)),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3.__version__,
        "fio": _first_line("fio", "--version"),
        "qemu_storage_daemon": _first_line("qemu-storage-daemon", "--version"),
    }


def fio_options(p: argparse.ArgumentParser, runtime: float) -> None:
    p.add_argument("--runtime", type=float, default=runtime, help="s per job (%(default)s)")
    p.add_argument("--ramp", type=float, default=1, help="fio ramp_time (%(default)s)")


def contenders_option(p: argparse.ArgumentParser, allowed: Sequence[str], default: int) -> None:
    """--contenders NAME,...: the first ``default`` of ``allowed`` unless given; checked."""

    def parse(text: str) -> list[str]:
        names = text.split(",")
        unknown = set(names) - set(allowed)
        if unknown or len(set(names)) < len(names):
            raise argparse.ArgumentTypeError(f"unknown {sorted(unknown)} or repeated names")
        return names

    help = f"any of {', '.join(allowed)} (default: %(default)s)"
    p.add_argument("--contenders", type=parse, default=",".join(allowed[:default]), help=help)
