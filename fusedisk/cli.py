"""The ``fusedisk`` command.  Every user mistake ends in one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from fusedisk import daemonlog
from fusedisk.control import STATUS_NAME, daemon_sockets, request, runtime_dir, survey
from fusedisk.destination import DEST_TIMEOUT
from fusedisk.errors import FusediskError, MoveFailed, StaleMount, UsageError
from fusedisk.units import human, parse_size

TERMINAL_PHASES = ("done", "failed", "cancelled")
COMMANDS = ("mount", "unmount", "status", "list", "migrate", "cancel", "rate")


def _abs(path: str) -> str:
    """Absolute without resolving links: the daemon runs elsewhere, and must see the same path."""
    return os.path.abspath(path)


# ---- mount and unmount --------------------------------------------------------------------


class DaemonFailed(FusediskError):
    """Unmounted, but the daemon did not end cleanly (say, its final flush failed)."""


def check_name(name: str, option: str = "--name ") -> None:
    """Refuse a file name the mount cannot serve (one line, nothing changed)."""
    if "/" in name or name in ("", ".", ".."):
        raise UsageError(message=f"{option}{name!r} is not a plain file name")
    if name == STATUS_NAME:
        raise UsageError(
            message=f"{option}{STATUS_NAME} is the mount's status file; choose another"
        )


def cmd_mount(args: argparse.Namespace) -> int:
    image, mountpoint = _abs(args.image), _abs(args.mountpoint)
    name = args.name or os.path.basename(image)
    check_name(name)
    if not args.foreground:
        start_mount(
            image,
            mountpoint,
            name=args.name,
            allow_other=args.allow_other,
            debug=args.debug,
            resume=not args.no_resume,
        )
        return 0
    return _serve_foreground(args, image, mountpoint, name)


def _serve_foreground(args: argparse.Namespace, image: str, mountpoint: str, name: str) -> int:
    """Serve until unmounted.  As a background daemon (``--ready-fd``), tell the parent when the
    mount is ready or why it is not, and remove the log on a clean unmount: a log survives only
    a daemon that died or ended in an error."""
    import trio

    from fusedisk.daemon import MountConfig, serve

    config = MountConfig(
        image=image,
        mountpoint=mountpoint,
        name=name,
        allow_other=args.allow_other,
        resume=not args.no_resume,
    )
    log_file = daemonlog.current()
    told = False  # the parent heard "ok" (the ready fd is closed then)

    def ready(found: str) -> None:
        nonlocal told
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"ok {found}\n".encode())
            os.close(args.ready_fd)
            told = True
        elif found:
            print(f"fusedisk: {found}", file=sys.stderr)

    try:
        trio.run(serve, config, ready)
    except FusediskError as e:
        if args.ready_fd is not None and not told:
            os.write(args.ready_fd, f"error {e}\n".encode())
            if log_file is not None:  # the parent prints the one line that matters
                log_file.remove()
        raise
    if log_file is not None:
        log_file.remove()
    return 0


def start_mount(
    image: str,
    mountpoint: str,
    *,
    name: str | None,
    allow_other: bool,
    debug: bool = False,
    resume: bool = True,
) -> None:
    """Mount with a daemon of its own, in the background; return once the mount is ready (and
    say what crash recovery found), or raise with the daemon's reason."""
    from fusedisk.daemon import runtime_name

    command = [sys.executable, "-m", "fusedisk", "mount", "--foreground", image, mountpoint]
    if name:
        command += ["--name", name]
    if allow_other:
        command += ["--allow-other"]
    if debug:
        command += ["--debug"]
    if not resume:
        command += ["--no-resume"]
    log_path: str | None = None
    if daemonlog.stderr_is_journal():  # under systemd: journald keeps the daemon's stderr
        output = sys.stderr.fileno()
    else:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        output, log_path = tempfile.mkstemp(
            prefix=f"{runtime_name(mountpoint)}.{stamp}.", suffix=".log", dir=runtime_dir()
        )
        command += ["--log-file", log_path]
    read_end, write_end = os.pipe()
    command += ["--ready-fd", str(write_end)]
    try:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            pass_fds=(write_end,),
            start_new_session=True,
        )
    except OSError:
        if log_path is not None:
            os.unlink(log_path)
        raise
    finally:
        os.close(write_end)
        if log_path is not None:
            os.close(output)
    with os.fdopen(read_end) as ready:
        line = ready.readline().strip()
    status, _, message = line.partition(" ")
    if status == "ok":
        if message:
            print(f"fusedisk: {message}", file=sys.stderr)
        return
    if status == "error":
        child.wait()
        raise UsageError(message=message)
    code = child.wait()
    where = f"see {log_path}" if log_path is not None else "see its messages in the journal"
    raise UsageError(message=f"the daemon exited ({code}) before mounting; {where}")


def cmd_unmount(args: argparse.Namespace) -> int:
    unmount(_abs(args.mountpoint))
    return 0


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount (lazily: once the last user closes the disk) and, unless lazy, wait for the
    daemon to have flushed the image and exited.  A stale mount is cleared, naming the log the
    dead daemon left; a daemon that ended in an error is reported with its log's last line."""
    pid: int | None = None
    log_file: str | None = None
    stale = False
    try:
        if not lazy:  # lazy: nothing to wait for, and a daemon that hangs must not stop it
            pid = int(request(mountpoint, {"command": "status"})["pid"])
            log_file = daemonlog.managed_log(pid, mountpoint)
    except StaleMount:
        stale = True
        # The dead daemon's socket, removed while its stale mount still keeps a new daemon
        # (which would make its own) from mounting here.
        for path in daemon_sockets(mountpoint):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise UsageError(message="fusermount3 is not installed (Debian package fuse3)") from None
    if result.returncode != 0:
        error = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        if "busy" in error.lower():
            raise UsageError(
                message=f"{mountpoint} is busy (a process such as QEMU has the disk open); "
                "still mounted, nothing changed"
            )
        raise UsageError(message=f"could not unmount {mountpoint}: {error}")
    if stale:
        left = daemonlog.dead_daemon_log(mountpoint)
        if left is not None:
            print(
                f"fusedisk: cleared the stale mount {mountpoint}; the log of its dead daemon "
                f"is kept at {left}",
                file=sys.stderr,
            )
    if pid is not None and not lazy:
        _wait_for_exit(pid, timeout=120.0)
        if log_file is not None and os.path.exists(log_file):  # a clean exit removes it
            raise DaemonFailed(
                message=f"unmounted {mountpoint}, but its daemon ended in an error: "
                f"{daemonlog.last_line(log_file)}; its log is kept at {log_file}"
            )


def _running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent to reap it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return
        time.sleep(0.02)
    raise UsageError(message=f"unmounted, but daemon pid {pid} still runs after {timeout:.0f} s")


# ---- status and moves -------------------------------------------------------------------


def _size(s: dict[str, Any]) -> str:
    """The image's size, or why it is unknown (its file cannot even be stat'ed)."""
    return human(s["size"]) if s["size"] is not None else f"size unknown: {s['io_error']}"


def _capabilities(names: list[str]) -> str:
    """What the mount carries beyond reads and writes (README, "Thin disks")."""
    from fusedisk.fs import CAPABILITIES

    if not names:
        return (
            "no discard, no SEEK_DATA/SEEK_HOLE (a pyfuse3 without fallocate and lseek "
            "handlers: scripts/setup builds one with them)"
        )
    return ", ".join(f"{name} ({CAPABILITIES.get(name, '?')})" for name in names)


def _format_status(s: dict[str, Any], log: str | None = None) -> str:
    lines = [
        f"mount:   {s['mountpoint']}/{s['name']} (daemon pid {s['pid']})",
        f"image:   {s['image']} ({_size(s)})",
        f"phase:   {s['phase']}",
        f"capabilities: {_capabilities(s.get('capabilities', []))}",
    ]
    if s["phase"] != "idle":
        lines += [
            f"move:    {s['source']} -> {s['destination']} ({s['step']})",
            f"pass:    {human(s['progress_bytes'])} of {human(s['total_bytes'])}; copied "
            f"{human(s['copied_bytes'])}, synced by writes {human(s['synced_by_writes_bytes'])}, "
            f"holes {human(s['hole_bytes'])}, mirrored {human(s['mirrored_bytes'])}, "
            f"discarded {human(s.get('discarded_bytes', 0))}",
            f"rate:    {human(s['rate'])}/s (limit "
            f"{human(s['rate_limit']) + '/s' if s['rate_limit'] else 'none'})",
        ]
        if s.get("resumed_from") is not None:
            lines.append(
                f"resumed: from the checkpoint at {human(s['resumed_from'])}; compared "
                f"{human(s.get('compared_bytes', 0))} of marked regions on both files, "
                f"{human(s.get('found_equal_bytes', 0))} of it equal (not written)"
            )
        if s["switch_pause_ms"] is not None:
            steps = ", ".join(f"{k} {v:g}" for k, v in s.get("switch_steps_ms", {}).items())
            lines.append(f"switch:  I/O held for {s['switch_pause_ms']:.3f} ms ({steps})")
        if s["error"]:
            lines.append(f"error:   {s['error']}")
    if log is not None:
        lines.append(f"log:     {log if log.startswith('/') else f'its stderr ({log})'}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    status = request(_abs(args.mountpoint), {"command": "status"})
    if args.json:  # exactly the daemon's object, as MOUNTPOINT/.status shows it
        print(json.dumps(status, sort_keys=True))
    else:
        print(_format_status(status, daemonlog.daemon_stderr(int(status["pid"]))))
    return 0


# ---- every mount at a glance ------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    entries = survey()
    for entry in entries:
        if entry["state"] == "serving":
            entry["log"] = daemonlog.daemon_stderr(int(entry["pid"]))
        elif entry["state"] == "stale":
            entry["log"] = daemonlog.dead_daemon_log(entry["mountpoint"])
    if args.json:
        print(json.dumps(entries, sort_keys=True))
    elif not entries:
        print("no fusedisk mounts")
    else:
        print(_table([_list_row(entry) for entry in entries]))
    return 0


def _list_row(e: dict[str, Any]) -> list[str]:
    if e["state"] == "serving":
        phase = e["phase"]
        if phase in ("mirroring", "switching"):
            total = max(int(e["total_bytes"]), 1)
            move = (
                f"{100 * min(int(e['progress_bytes']), total) // total}% of {human(total)} at "
                f"{human(e['rate'])}/s to {e['destination']}"
            )
        elif phase in ("failed", "cancelled"):
            move = f"to {e['destination']}: {e['error']}"
        else:
            move = "-"
        return [e["mountpoint"], e["image"], _size(e), str(e["pid"]), phase, move]
    if e["state"] == "stale":
        note = f"daemon gone: clear with 'fusedisk unmount {e['mountpoint']}'"
        if e["log"]:
            note += f"; its log is kept at {e['log']}"
        return [e["mountpoint"], "-", "-", "-", "stale", note]
    return [e["mountpoint"], "-", "-", "-", e["state"], e["error"]]


def _table(rows: list[list[str]]) -> str:
    rows = [["MOUNTPOINT", "IMAGE", "SIZE", "PID", "PHASE", "MOVE"], *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(
            [*(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)), row[-1]]
        )
        for row in rows
    )


def _progress_line(s: dict[str, Any], width: int = 30) -> str:
    total = max(s["total_bytes"], 1)
    done = min(s["progress_bytes"], total)
    filled = int(width * done / total)
    rate = s["rate"]
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 and s["phase"] == "mirroring" else "-"
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {human(done)}/{human(total)} "
        f"{human(rate)}/s ETA {eta} {s['phase']}: {s['step']}"
    )


def _watch(mountpoint: str, as_json: bool) -> dict[str, Any]:
    """Show progress until the move ends; Ctrl-C cancels it (the VM stays on the source)."""
    tty = sys.stderr.isatty() and not as_json
    last_line = 0.0
    try:
        while True:
            s = request(mountpoint, {"command": "status"})
            if s["phase"] in TERMINAL_PHASES:
                break
            now = time.monotonic()
            if tty:
                print("\r" + _progress_line(s), end="", file=sys.stderr, flush=True)
            elif now - last_line >= 2.0:
                print(_progress_line(s), file=sys.stderr, flush=True)
                last_line = now
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\nfusedisk: interrupted: cancelling the move", file=sys.stderr)
        s = request(mountpoint, {"command": "cancel"}, timeout=120)
    if tty:
        print("\r" + _progress_line(s), file=sys.stderr)
    return s


def parse_seconds(option: str, text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 86400:  # NaN too
        raise UsageError(message=f"{option} {text!r} is not a number of seconds (0 to 86400)")
    return seconds


def cmd_migrate(args: argparse.Namespace) -> int:
    mountpoint = _abs(args.mountpoint)
    command = {
        "command": "migrate",
        "destination": _abs(args.destination),
        "rate_limit": parse_size(args.rate) if args.rate else 0,
        "keep_source": args.keep_source,
        "verify": args.verify,
        "force": args.force,
        "dest_timeout": (
            parse_seconds("--dest-timeout", args.dest_timeout) if args.dest_timeout else None
        ),
    }
    status = request(mountpoint, command)
    if not args.detach:
        status = _watch(mountpoint, args.json)
    if args.json:
        print(json.dumps(status, sort_keys=True))
    if status["phase"] in ("failed", "cancelled"):
        raise MoveFailed(
            dest=status["destination"],
            phase=status["phase"],
            reason=status["error"],
            source=status["source"],
        )
    if not args.json and status["phase"] == "done":
        print(
            f"moved to {status['destination']}: copied {human(status['copied_bytes'])}, "
            f"I/O held {status['switch_pause_ms']:.3f} ms at the switch"
        )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    status = request(_abs(args.mountpoint), {"command": "cancel"}, timeout=120)
    if status["phase"] == "done":
        raise UsageError(
            message=f"too late: the move had switched; the disk is on {status['image']}"
        )
    print(f"cancelled: the disk stays on {status['image']}")
    return 0


def cmd_rate(args: argparse.Namespace) -> int:
    rate = parse_size(args.rate)
    request(_abs(args.mountpoint), {"command": "rate", "rate_limit": rate})
    print(f"rate limit: {human(rate) + '/s' if rate else 'none'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedisk", description="Serve a VM disk image through FUSE and live-move it."
    )
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.set_defaults(log_file=None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mount", help="serve IMAGE as MOUNTPOINT/NAME")
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("--name", help="the file's name in the mount (default: IMAGE's basename)")
    p.add_argument("--foreground", action="store_true", help="stay attached, log to stderr")
    p.add_argument("--allow-other", action="store_true", help="let other users open the disk")
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="after a crash, roll back a move it interrupted instead of resuming it",
    )
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-file", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("unmount", help="flush everything to the image and stop the daemon")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_unmount)

    p = sub.add_parser("status", help="show the image, the move phase and its counters")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("list", help="every fusedisk mount on this host, with any move")
    p.add_argument("--json", action="store_true", help="one JSON array of objects")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("migrate", help="live-move the mounted image to DEST")
    p.add_argument("mountpoint")
    p.add_argument("destination")
    p.add_argument("--rate", help="copy at most RATE bytes/s, like 50M or 1G (default: no limit)")
    p.add_argument("--keep-source", action="store_true", help="do not delete the source")
    p.add_argument("--verify", action="store_true", help="compare both files before switching")
    p.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.add_argument(
        "--dest-timeout",
        metavar="SECONDS",
        help=f"longest guest I/O may wait for DEST before the move fails back (default: "
        f"{DEST_TIMEOUT:g}; 0: no bound, DEST is written inline by the daemon's event loop)",
    )
    p.add_argument("--detach", action="store_true", help="return once the move has started")
    p.add_argument("--json", action="store_true", help="print the final status as JSON")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("cancel", help="stop a move and fail back to the source")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("rate", help="change a running move's rate limit (0: none)")
    p.add_argument("mountpoint")
    p.add_argument("rate")
    p.set_defaults(func=cmd_rate)
    return parser


def configure_logging(debug: bool, log_file: str | None) -> None:
    """A background daemon logs to its capped file; everything else to stderr (under systemd,
    without timestamps: journald adds its own)."""
    handler: logging.Handler
    if log_file is not None:
        handler = daemonlog.DaemonLog(log_file)
    else:
        handler = logging.StreamHandler()
    stamp = "" if log_file is None and daemonlog.stderr_is_journal() else "%(asctime)s "
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format=stamp + "%(levelname)s %(name)s: %(message)s",
        handlers=[handler],
    )


def report_errors(call: Callable[[], int], failure: int = 1) -> int:
    """The error boundary: every mistake ends in one line on stderr and exit status
    ``failure``, never a traceback."""
    try:
        return call()
    except StaleMount as e:
        left = daemonlog.dead_daemon_log(str(e.facts["path"]))
        kept = f"; the log of its dead daemon is kept at {left}" if left else ""
        print(f"fusedisk: {e}{kept}", file=sys.stderr)
        return failure
    except FusediskError as e:
        print(f"fusedisk: {e}", file=sys.stderr)
        return failure
    except ValueError as e:
        print(f"fusedisk: {e}", file=sys.stderr)
        return failure
    except OSError as e:  # the last resort: still one line, never a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"fusedisk: {where}{e.strerror or e}", file=sys.stderr)
        return failure
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from fusedisk import mounthelper

    if mounthelper.called_by_mount_fuse(argv, COMMANDS):
        return mounthelper.mount_main(argv)
    args = build_parser().parse_args(argv)

    def run() -> int:
        configure_logging(args.debug, args.log_file)
        code: int = args.func(args)
        return code

    return report_errors(run)
