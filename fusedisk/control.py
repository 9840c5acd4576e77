"""The control channel: a Unix socket, one JSON request and one JSON reply per connection.

Security: the socket lives in a private directory (mode 0700, owned by the daemon's user), is
itself mode 0600, and every connection's peer uid (SO_PEERCRED) must be the daemon's own: only the
mount's owner can query or steer it.  The CLI recognises a fusedisk mount by its type in
/proc/self/mountinfo (``fuse.fusedisk``) and finds the socket in the mount's status file
(``MOUNTPOINT/.status``), which only the owner can read unless the mount is ``allow_other``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import stat
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import trio

from fusedisk.errors import ControlError, FusediskError, NotMounted, StaleMount

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
FSTYPE = "fuse.fusedisk"  # the type in /proc/self/mountinfo: fuse.SUBTYPE
STATUS_NAME = ".status"  # the status file in the mount: found by name, never listed
MAX_REQUEST = 1 << 16
SURVEY_TIMEOUT = 5.0  # how long `fusedisk list` waits for the daemons to answer


def _runtime_candidates() -> list[str]:
    uid = os.getuid()
    candidates = []
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.stat(base).st_uid == uid:  # not after a bare `su`
        candidates.append(os.path.join(base, "fusedisk"))
    candidates.append("/run/fusedisk" if uid == 0 else f"/tmp/fusedisk-{uid}")
    return candidates


def _private(path: str) -> bool:
    st = os.lstat(path)
    return st.st_uid == os.getuid() and not st.st_mode & 0o077 and stat.S_ISDIR(st.st_mode)


def runtime_dir() -> str:
    """A directory only this user can enter, for sockets and daemon logs."""
    candidates = _runtime_candidates()
    for path in candidates:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            if _private(path):
                return path
        except OSError:
            continue
    uid = os.getuid()
    raise ControlError(message=f"no private runtime directory for uid {uid}: tried {candidates}")


def runtime_dirs() -> list[str]:
    """Every private runtime directory of this user that exists: where this user's daemons may
    have put their sockets and logs.  Which one :func:`runtime_dir` picks depends on
    XDG_RUNTIME_DIR, which a login shell sets and systemd's mount units do not."""
    found = []
    for path in _runtime_candidates():
        with contextlib.suppress(OSError):
            if _private(path):
                found.append(path)
    return found


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def serve_control(
    path: str, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on ``path`` until cancelled; reply to each request with ``handler``'s dict."""
    if os.path.lexists(path):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    try:
        task_status.started()

        async def serve_one(stream: trio.SocketStream) -> None:
            await _serve_one(stream, handler)

        await trio.serve_listeners(serve_one, [trio.SocketListener(sock)])
    finally:
        with trio.CancelScope(shield=True):
            if os.path.lexists(path):
                os.unlink(path)


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    """Answer one request (from the owner only)."""
    async with stream:
        uid = _peer_uid(stream.socket)
        if uid != os.getuid():
            log.warning("refused a control connection from uid %d", uid)
            await _reply(stream, {"ok": False, "error": "permission denied: not the mount's owner"})
            return
        data = b""
        with trio.move_on_after(10):
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        try:
            request = json.loads(data)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            reply = {"ok": True, **await handler(request)}
        except FusediskError as e:
            reply = {"ok": False, "error": str(e)}
        except (ValueError, KeyError, TypeError) as e:
            reply = {"ok": False, "error": f"bad control request: {e}"}
        except Exception as e:  # never let one request take the daemon (and the disk) down
            log.exception("control request %r failed", data[:200])
            reply = {"ok": False, "error": f"internal error: {e!r}"}
        await _reply(stream, reply)


async def _reply(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    with contextlib.suppress(trio.BrokenResourceError):  # the client went away
        await stream.send_all(json.dumps(reply).encode() + b"\n")


# ---- the client side (blocking; used by the CLI) -----------------------------------------


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, the parts fusedisk looks at."""

    mountpoint: str
    fstype: str
    owner: int | None  # a FUSE mount's user_id=: the uid whose daemon serves it


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mount_entries() -> Iterator[MountEntry]:
    """Every mount this process sees, in /proc/self/mountinfo's order (the topmost last)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            tail = fields[fields.index("-") + 1 :]  # type, source, superblock options
            options = dict(o.partition("=")[::2] for o in tail[2].split(",")) if tail[2:] else {}
            owner = options.get("user_id", "")
            yield MountEntry(_unescape(fields[4]), tail[0], int(owner) if owner.isdigit() else None)


def mounts() -> Iterator[tuple[str, str]]:
    """(mount point, filesystem type) of every mount, in /proc/self/mountinfo's order."""
    for entry in mount_entries():
        yield entry.mountpoint, entry.fstype


def mount_type(mountpoint: str) -> str | None:
    """The filesystem type mounted at ``mountpoint`` (the topmost mount), from
    /proc/self/mountinfo: unlike a stat, it answers for a stale mount too."""
    target = os.path.realpath(mountpoint)
    found = None
    for point, kind in mounts():
        if point == target:
            found = kind
    return found


def status_path(mountpoint: str) -> str:
    return os.path.join(mountpoint, STATUS_NAME)


def read_status(mountpoint: str) -> dict[str, Any]:
    """The live status of the fusedisk mount at ``mountpoint``, read from its status file.

    Raises NotMounted unless a fusedisk mount is there, StaleMount if its daemon is gone."""
    kind = mount_type(mountpoint)
    if kind != FSTYPE:
        if not os.path.lexists(mountpoint):
            reason = "no such file or directory"
        elif not os.path.isdir(mountpoint):
            reason = "not a directory"
        else:
            reason = "not a mount point" if kind is None else f"a {kind} mount"
        raise NotMounted(path=mountpoint, reason=reason)
    try:
        with open(status_path(mountpoint), "rb") as f:
            status: dict[str, Any] = json.loads(f.read())
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise NotMounted(path=mountpoint, reason=f"its status: {e.strerror}") from None
        # Stale, unless the daemon lives and relays an error of its image's filesystem (gone,
        # say): then its control socket still answers, if the daemon is this user's.  (No stat
        # tells them apart: the kernel answers one from its attribute cache, even when stale.)
        for socket_path in daemon_sockets(mountpoint):
            with contextlib.suppress(ControlError):
                return ask(socket_path, {"command": "status"}, timeout=5.0, mountpoint=mountpoint)
        raise StaleMount(path=mountpoint) from None
    return status


def daemon_sockets(mountpoint: str) -> list[str]:
    """The control sockets (existing) that this user's daemon of ``mountpoint`` may have made:
    ``<runtime dir>/<runtime_name>.sock`` (daemon.serve)."""
    from fusedisk.daemon import runtime_name

    name = runtime_name(mountpoint) + ".sock"
    return [path for d in runtime_dirs() if os.path.exists(path := os.path.join(d, name))]


def control_socket(mountpoint: str) -> str:
    """The control socket of the fusedisk daemon serving ``mountpoint``."""
    return str(read_status(mountpoint)["control"])


def request(mountpoint: str, command: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one command to the daemon serving ``mountpoint``; see :func:`ask`."""
    return ask(control_socket(mountpoint), command, timeout, mountpoint)


def ask(
    path: str, command: dict[str, Any], timeout: float = 30.0, mountpoint: str = "the mount"
) -> dict[str, Any]:
    """Send one command to the control socket ``path``; return the reply, or raise ControlError
    with the daemon's message.  Touches nothing in the mount (request counts stay exact)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(command).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        raise ControlError(
            message=f"cannot reach the fusedisk daemon of {mountpoint} at {path}: {e.strerror}"
        ) from None
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ControlError(message=f"the daemon of {mountpoint} sent no reply") from None
    if not reply.pop("ok", False):
        raise ControlError(message=str(reply.get("error", "unknown error")))
    return reply


def survey(timeout: float = SURVEY_TIMEOUT) -> list[dict[str, Any]]:
    """Every fusedisk mount this process sees, each one object with ``mountpoint``,
    ``owner_uid`` and a ``state``:

    - ``serving``: the daemon answered; the rest is its status (as ``MOUNTPOINT/.status``);
    - ``stale``: its daemon is gone; ``clear`` is the command that clears the mount;
    - ``unreadable``: its status cannot be read by this user (``error`` says why);
    - ``not answering``: the daemon did not answer within ``timeout`` seconds (stopped, or
      stuck).  Each mount is asked in a thread of its own, so one hung daemon costs the whole
      listing at most ``timeout``, not forever; such a thread is abandoned, and a process exit
      ends it (a FUSE request waits killably).
    """
    entries: dict[str, MountEntry] = {}
    for entry in mount_entries():
        if entry.fstype == FSTYPE:
            entries[entry.mountpoint] = entry
    found: dict[str, dict[str, Any] | None] = {}

    def ask_one(mountpoint: str) -> None:
        try:
            found[mountpoint] = _probe(mountpoint)
        except (OSError, ValueError, FusediskError) as e:  # a status that is not JSON, say
            found[mountpoint] = {"state": "unreadable", "error": f"its status: {e}"}

    threads = [
        threading.Thread(target=ask_one, args=(point,), daemon=True, name=f"survey {point}")
        for point in entries
    ]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    answered = dict(found)  # what a thread abandoned now may still add is not looked at
    listed = []
    for point, entry in entries.items():
        if point not in answered:
            state: dict[str, Any] | None = {
                "state": "not answering",
                "error": f"its daemon did not answer within {timeout:g} s",
            }
        else:
            state = answered[point]
        if state is not None:  # None: unmounted meanwhile
            listed.append({**state, "mountpoint": point, "owner_uid": entry.owner})
    return listed


def _probe(mountpoint: str) -> dict[str, Any] | None:
    try:
        status = read_status(mountpoint)
    except StaleMount:
        return {"state": "stale", "clear": f"fusedisk unmount {mountpoint}"}
    except NotMounted as e:
        if mount_type(mountpoint) != FSTYPE:
            return None
        return {"state": "unreadable", "error": f"its status cannot be read ({e.facts['reason']})"}
    return {**status, "state": "serving"}
