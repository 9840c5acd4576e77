"""Shared helpers for scripts/bench.py and scripts/bench_move.py (not part of fusedisk itself).

Everything a benchmark starts (fusedisk mounts, qemu-storage-daemon, fio) is registered with a
:class:`Cleanup` stack the moment it exists, so Ctrl-C, SIGTERM or an error anywhere unwinds
every mount and process the script started, newest first, and nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import json
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
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
FUSECTL = Path("/sys/fs/fuse/connections")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- cleanup ----------------------------------------------------------------------------


class Cleanup:
    """A LIFO stack of undo actions, run on normal exit, on errors, on Ctrl-C and on SIGTERM.

    Each action runs even if an earlier one failed; failures are printed, not raised, so one
    stuck mount does not leave the processes behind it running.
    """

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> None:
        self._actions.append((what, action))

    def pop(self, what: str) -> None:
        """Run the newest action called ``what`` now, and forget it."""
        for i in range(len(self._actions) - 1, -1, -1):
            if self._actions[i][0] == what:
                _, action = self._actions.pop(i)
                self._run(what, action)
                return

    def _run(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except BaseException as e:  # keep unwinding: a failed undo must not stop the others
            log(f"cleanup: {what}: {e!r}")

    def run_all(self) -> None:
        # Ctrl-C pressed again while unwinding is ignored: unwinding half-way is worse.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while self._actions:
                what, action = self._actions.pop()
                self._run(what, action)
        finally:
            signal.signal(signal.SIGINT, previous)

    def __enter__(self) -> Cleanup:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGHUP, on_signal)
        # Also when started in the background, where the shell leaves SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self.run_all()


def terminate(
    proc: subprocess.Popen[Any], timeout: float = 15.0, sig: int = signal.SIGTERM
) -> None:
    """Stop one process this script started (by its own handle), escalating to SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mountpoint = line.split()[4].replace("\\040", " ")
            if mountpoint == target:
                return True
    return False


def force_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, capture_output=True)


# ---- images -------------------------------------------------------------------------------


def make_image(path: Path, size: int, seed: int = 1) -> None:
    """Write a non-sparse image: 1 MiB of seeded random bytes per block, stamped with the block
    number, so every block differs and two calls with one seed give identical files."""
    block = bytearray(random.Random(seed).randbytes(MiB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for offset in range(0, size, MiB):
            block[:8] = (offset // MiB).to_bytes(8, "little")
            n = min(MiB, size - offset)
            os.pwrite(fd, memoryview(block)[:n], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = os.stat(path)
    if st.st_blocks * 512 < size:
        raise RuntimeError(f"{path} came out sparse ({st.st_blocks * 512} of {size} bytes)")


def warm(path: Path) -> None:
    """Read a file once so its pages are cached (every target then starts alike)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * MiB):
            pass


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# ---- fusedisk -----------------------------------------------------------------------------


def fusedisk_command() -> list[str]:
    """The CLI of the fusedisk installed next to this interpreter (the venv's)."""
    return [sys.executable, "-m", "fusedisk"]


def fusedisk(*args: str | Path, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*fusedisk_command(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise RuntimeError(f"fusedisk {' '.join(map(str, args))}: {result.stderr.strip()}")
    return result


def fusedisk_status(mountpoint: Path) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(fusedisk("status", mountpoint, "--json").stdout)
    return status


@dataclass
class FusediskMount:
    image: Path
    mountpoint: Path
    name: str = "disk"
    pid: int = 0

    @property
    def file(self) -> Path:
        return self.mountpoint / self.name

    def status(self) -> dict[str, Any]:
        return fusedisk_status(self.mountpoint)


def mount_fusedisk(
    cleanup: Cleanup, image: Path, mountpoint: Path, name: str = "disk"
) -> FusediskMount:
    mountpoint.mkdir(parents=True, exist_ok=True)
    cleanup.push(f"rmdir {mountpoint}", functools.partial(_rmdir, mountpoint))
    mount = FusediskMount(image, mountpoint, name)
    key = f"fusedisk {mountpoint}"
    # Registered before mounting: a mount that half-succeeds is still undone.
    cleanup.push(key, lambda: _unmount_fusedisk(mount))
    fusedisk("mount", image, mountpoint, "--name", name)
    mount.pid = int(mount.status()["pid"])
    return mount


def unmount_fusedisk(cleanup: Cleanup, mount: FusediskMount) -> None:
    cleanup.pop(f"fusedisk {mount.mountpoint}")
    cleanup.pop(f"rmdir {mount.mountpoint}")


def _rmdir(path: Path) -> None:
    if not is_mounted(path):
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()


def _unmount_fusedisk(mount: FusediskMount) -> None:
    if not is_mounted(mount.mountpoint):
        return
    try:
        fusedisk("unmount", mount.mountpoint, timeout=180)
        return
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        log(f"fusedisk unmount {mount.mountpoint} failed ({e}); unmounting lazily")
    force_unmount(mount.mountpoint)
    if mount.pid:  # the daemon this script mounted, by the pid its own status reported
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(mount.pid):
            time.sleep(0.1)
        if _alive(mount.pid):
            os.kill(mount.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- qemu-storage-daemon ------------------------------------------------------------------


@dataclass
class QsdExport:
    image: Path
    file: Path  # the FUSE export (a regular file the export is mounted over), or the NBD socket
    qmp_socket: Path
    proc: subprocess.Popen[bytes]
    kind: str  # "fuse", "fuse-ro" or "nbd"

    @property
    def nbd_uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.file}"


def start_qsd(
    cleanup: Cleanup, image: Path, export: Path, workdir: Path, kind: str = "fuse"
) -> QsdExport:
    """qemu-storage-daemon serving ``image`` (raw) with a QMP monitor on a socket.

    ``fuse``: a writable FUSE file at ``export``, exactly as shared/GUEST.md describes.
    ``fuse-ro``: the same, read-only.  ``nbd``: a writable NBD export named ``disk`` on the
    unix socket ``export`` (qemu 7.2 cannot mirror a node under a writable FUSE export: the
    export takes the RESIZE permission, which the mirror job does not share).
    """
    qmp = workdir / f"{export.name}.qmp"
    remove(qmp)
    command = [
        "qemu-storage-daemon",
        "--blockdev", f"node-name=file0,driver=file,filename={image}",
        "--blockdev", "node-name=fmt0,driver=raw,file=file0",
        "--chardev", f"socket,path={qmp},server=on,wait=off,id=qmp0",
        "--monitor", "chardev=qmp0",
    ]  # fmt: skip
    if kind == "nbd":
        remove(export)
        command += ["--nbd-server", f"addr.type=unix,addr.path={export}"]
        command += ["--export", "type=nbd,id=exp0,node-name=fmt0,name=disk,writable=on"]
    else:
        export.touch()
        writable = "on" if kind == "fuse" else "off"
        command += [
            "--export",
            f"type=fuse,id=exp0,node-name=fmt0,mountpoint={export},writable={writable}",
        ]
    log_path = workdir / f"{export.name}.qsd.log"
    log_file = open(log_path, "ab")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True
    )
    log_file.close()
    qsd = QsdExport(image, export, qmp, proc, kind)

    def stop() -> None:
        terminate(proc)
        if kind != "nbd":
            force_unmount(export)
        remove(qmp)
        if kind == "nbd" or not is_mounted(export):
            remove(export)
        if log_path.exists() and not log_path.stat().st_size:
            remove(log_path)  # kept only when qemu-storage-daemon said something

    cleanup.push(f"qsd {export}", stop)
    deadline = time.monotonic() + 30
    while not ((kind == "nbd" and export.exists()) or is_mounted(export)) or not qmp.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"qemu-storage-daemon exited ({proc.returncode}); see its log")
        if time.monotonic() > deadline:
            raise RuntimeError("qemu-storage-daemon did not export in 30 s")
        time.sleep(0.05)
    return qsd


def stop_qsd(cleanup: Cleanup, qsd: QsdExport) -> None:
    cleanup.pop(f"qsd {qsd.file}")


# ---- FUSE connection tunables -------------------------------------------------------------


def ensure_fusectl(cleanup: Cleanup) -> None:
    """Mount the fusectl filesystem if nothing has (undone at exit if this script did it)."""
    if is_mounted(FUSECTL):
        return
    subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], check=True)
    cleanup.push("fusectl", lambda: _umount(FUSECTL))


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=False)


def fuse_connection(path: Path) -> Path:
    """The fusectl directory of the FUSE connection serving ``path``."""
    return FUSECTL / str(os.stat(path).st_dev)


def read_tunables(path: Path) -> dict[str, int]:
    conn = fuse_connection(path)
    return {
        name: int((conn / name).read_text())
        for name in ("max_background", "congestion_threshold")
        if (conn / name).exists()
    }


def set_tunables(path: Path, tunables: dict[str, int]) -> None:
    conn = fuse_connection(path)
    for name, value in tunables.items():
        (conn / name).write_text(f"{value}\n")
    got = read_tunables(path)
    for name, value in tunables.items():
        if got.get(name) != value:
            raise RuntimeError(f"{conn / name} reads {got.get(name)} after writing {value}")


# ---- fio ----------------------------------------------------------------------------------


def parse_fio_json(text: str) -> dict[str, Any]:
    """fio's JSON, skipping lines it prints before it (such as 'terminating on signal')."""
    start = text.find("{")
    if start < 0:
        raise RuntimeError(f"fio printed no JSON: {text[:500]!r}")
    result: dict[str, Any] = json.loads(text[start:])
    return result


def run_fio(args: Sequence[str], timeout: float) -> dict[str, Any]:
    result = subprocess.run(
        ["fio", "--output-format=json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise RuntimeError(f"fio failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return parse_fio_json(result.stdout)


# ---- statistics ---------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), -(-len(sorted_values) * q // 100)))
    return sorted_values[int(rank) - 1]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ---- machine notes ------------------------------------------------------------------------


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def machine_notes(workdir: Path) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="utf-8") as f:
        mem_kib = int(f.readline().split()[1])
    fs = " ".join(_first_line(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(workdir)]).split())
    import pyfuse3  # the versions fusedisk runs with

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "code": code_version(),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "loadavg_at_start": os.getloadavg(),
        "workdir": str(workdir),
        "workdir_fs": fs,
        "python": platform.python_version(),
        "pyfuse3": getattr(pyfuse3, "__version__", "?"),
        "fio": _first_line(["fio", "--version"]),
        "qemu_storage_daemon": _first_line(["qemu-storage-daemon", "--version"]),
    }


def code_version() -> dict[str, Any]:
    """Which fusedisk was measured: the commit, whether fusedisk/ had local changes, and a
    digest of its sources (others edit the tree while benchmarks run)."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / "fusedisk").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    changed = _first_line(["git", "-C", str(root), "status", "--porcelain", "--", "fusedisk"])
    return {
        "commit": _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"]),
        "fusedisk_dirty": changed not in ("?", ""),
        "fusedisk_sha256": digest.hexdigest()[:16],
    }


# ---- py-spy -------------------------------------------------------------------------------


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


@dataclass
class Profile:
    """Top frames of the daemon's main thread (the event loop serving FUSE: its time is the data
    path) and, apart, of its other threads (trio's workers: the copier, fsyncs)."""

    samples: int  # of the main thread
    self_top: list[tuple[str, int]] = field(default_factory=list)
    inclusive_top: list[tuple[str, int]] = field(default_factory=list)
    raw_path: str = ""
    other_samples: int = 0
    other_self_top: list[tuple[str, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "self_top": self.self_top,
            "inclusive_top": self.inclusive_top,
            "raw_path": self.raw_path,
            "other_samples": self.other_samples,
            "other_self_top": self.other_self_top,
        }

    def format(self, n: int = 12) -> str:
        def pct(count: int, total: int) -> str:
            return f"{100 * count / max(total, 1):5.1f}%"

        lines = [f"py-spy: main thread {self.samples} samples ({self.raw_path})"]
        lines.append("  main thread, self time (leaf frame):")
        lines += [f"    {pct(c, self.samples)}  {fr}" for fr, c in self.self_top[:n]]
        lines.append("  main thread, inclusive (frame anywhere on the stack):")
        lines += [f"    {pct(c, self.samples)}  {fr}" for fr, c in self.inclusive_top[:n]]
        if self.other_samples:
            lines.append(f"  other threads ({self.other_samples} samples), self time:")
            lines += [
                f"    {pct(c, self.other_samples)}  {fr}" for fr, c in self.other_self_top[:n]
            ]
        return "\n".join(lines)


def start_py_spy(
    pid: int, duration: float, raw_path: Path, native: bool = False
) -> subprocess.Popen[bytes]:
    """Sample ``pid``, every thread apart, idle time included (so time the event loop spends
    waiting for requests shows too).

    Without ``native``: 200 Hz, without pausing the process.  With it: C frames too (pyfuse3 is
    Cython, and syscalls show by name), which needs py-spy to pause the process for each sample,
    so 100 Hz and some slowdown of the daemon."""
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy not found (pip install py-spy into the venv)")
    command = [spy, "record", "--pid", str(pid), "--duration", str(max(1, round(duration)))]
    command += ["--format", "raw", "--idle", "--threads", "--output", str(raw_path)]
    command += ["--rate", "100", "--native"] if native else ["--rate", "200", "--nonblocking"]
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def summarize_profile(raw_path: Path) -> Profile:
    """Top frames from py-spy's collapsed stacks (``thread (tid): name;frame;... count``)."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    other_self: Counter[str] = Counter()
    total = other = 0
    with open(raw_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [fr for fr in stack.split(";") if fr]
            main = True
            if frames and frames[0].startswith("thread ("):
                main = frames.pop(0).endswith(": MainThread")
            frames = [_short_frame(fr) for fr in frames]
            if not frames:
                continue
            if not main:
                other += count
                other_self[frames[-1]] += count
                continue
            total += count
            self_counts[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
    return Profile(
        samples=total,
        self_top=self_counts.most_common(25),
        inclusive_top=[(f, c) for f, c in inclusive.most_common(40) if not f.startswith("<")][:25],
        raw_path=str(raw_path),
        other_samples=other,
        other_self_top=other_self.most_common(15),
    )


def _short_frame(frame: str) -> str:
    """``func (/long/path/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    parts = where.rstrip(")").split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


@contextlib.contextmanager
def profiled(
    pid: int, duration: float | None, raw_path: Path, native: bool = False
) -> Iterator[list[Profile]]:
    """Profile ``pid`` while the body runs: for ``duration`` seconds, or (None) until the body
    ends.  The yielded list gets the summary once py-spy has written its output."""
    out: list[Profile] = []
    proc = start_py_spy(pid, duration or 3600, raw_path, native)
    try:
        yield out
    except BaseException:
        terminate(proc, sig=signal.SIGINT)
        raise
    if duration is None:
        proc.send_signal(signal.SIGINT)  # py-spy writes what it has sampled, then exits
    try:
        _, err = proc.communicate(timeout=(duration or 0) + 60)
    except subprocess.TimeoutExpired:
        terminate(proc, sig=signal.SIGINT)
        err = b""
    if raw_path.exists() and raw_path.stat().st_size:
        out.append(summarize_profile(raw_path))
    else:
        log(f"py-spy wrote no profile: {err.decode(errors='replace').strip()[-500:]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used so far."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rpartition(")")[2].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, see proc(5)).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total


def busy_fraction(before: tuple[float, float], after: tuple[float, float]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else float("nan")
