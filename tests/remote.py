"""A real network destination for tests: sshfs mounted from a private sshd on 127.0.0.1.

:func:`private_sshd` runs ``/usr/sbin/sshd -D -e`` with its own config, throwaway host and client
keys and a free port, all in a work directory (never the machine's /etc/ssh config or keys).
:func:`sshfs_mount` mounts a directory it serves with ``sshfs -f``, a subprocess the test owns.
:class:`Remote` can then fake the network failing: :meth:`Remote.stop` SIGSTOPs the sshd
processes serving the connection (a stalled network: the kernel still ACKs TCP, nothing answers),
:meth:`Remote.cont` resumes them, :meth:`Remote.kill` SIGKILLs them (the server dies).

The mount uses ``ServerAliveInterval=1,ServerAliveCountMax=3`` and no ``reconnect``: a remote that
stops answering makes ssh give up after 3-4 s. When the connection drops (that, or a killed
remote), sshfs 3.7 fails the requests waiting for the server with EIO, except a waiting read,
which returns 0 bytes (end of file!), then ends itself; as root it detaches its own mount
(lazily), so later I/O on files it had open fails with ENOTCONN and paths under the mountpoint
are the empty local directory again (a create there succeeds, on local disk). sshfs writes are
asynchronous by default (``write()`` returns before the server has answered; errors surface at
``fsync`` or ``close``): pass ``extra_options=("sshfs_sync",)`` for synchronous writes. Unlinking
a file that is open renames it to ``.fuse_hidden*`` (libfuse), and fails with EBUSY, not EIO,
when the server is gone.

Every wait has a timeout, teardown continues a stopped remote before unmounting, and kills only
as a last resort, so teardown never hangs and leaves no mount and no process behind.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
SSHFS = "sshfs"
SSH_KEYGEN = "ssh-keygen"
FUSERMOUNT = "fusermount3"
START_TIMEOUT = 15.0  # sshd listening, sshfs mounted: far above what a healthy start takes
STOP_TIMEOUT = 5.0  # each step of a teardown before the next, harsher one
#: Options for tests: notice a dead or stalled server within about 4 s; no ``reconnect``.
ALIVE_OPTIONS = ("ServerAliveInterval=1", "ServerAliveCountMax=3")


def require_tools() -> None:
    """Fail (not skip) the test if sshd, sshfs or ssh-keygen are missing."""
    missing = [
        what
        for what, found in (
            (f"{SSHD} (Debian package openssh-server)", os.access(SSHD, os.X_OK)),
            (f"{SSHFS} (Debian package sshfs)", shutil.which(SSHFS)),
            (f"{SSH_KEYGEN} (Debian package openssh-client)", shutil.which(SSH_KEYGEN)),
            ("ssh (Debian package openssh-client)", shutil.which("ssh")),
            (f"{FUSERMOUNT} (Debian package fuse3)", shutil.which(FUSERMOUNT)),
        )
        if not found
    ]
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: run scripts/setup as root to install them",
            pytrace=False,
        )


# ---- processes ----------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[1], []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (by ppid in /proc/*/stat), parents before children."""
    children = _children()
    result: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            result.append(child)
            todo.append(child)
    return [p for p in result if alive(p)]


def _signal(pids: Sequence[int], sig: int, comm: str) -> None:
    """Send ``sig`` to those of ``pids`` still running ``comm`` (guards against pid reuse)."""
    for pid in pids:
        if alive(pid) and _comm(pid) == comm:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _end(pids: Sequence[int], comm: str) -> None:
    """SIGCONT + SIGTERM, then SIGKILL what is still there: never waits more than 2 timeouts."""
    _signal(pids, signal.SIGCONT, comm)
    _signal(pids, signal.SIGTERM, comm)
    if not _wait_gone(pids, STOP_TIMEOUT):
        _signal(pids, signal.SIGKILL, comm)
        _wait_gone(pids, STOP_TIMEOUT)


def _end_process(process: subprocess.Popen[bytes], wait_first: float = 0.0) -> None:
    """Wait ``wait_first`` s for ``process`` to exit, then SIGTERM, then SIGKILL; reap it."""
    for step in ("wait", "terminate", "kill"):
        if step == "terminate":
            process.terminate()
        elif step == "kill":
            process.kill()
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait_first if step == "wait" else STOP_TIMEOUT)
            return


# ---- sshd ---------------------------------------------------------------------------------


@dataclass
class Sshd:
    """A private sshd listening on 127.0.0.1:``port``, logging to ``log``."""

    workdir: Path
    port: int
    process: subprocess.Popen[bytes]
    client_key: Path
    user: str
    log: Path

    def descendants(self) -> list[int]:
        """Every live process serving a connection (children of the listening sshd, and theirs)."""
        return descendants(self.process.pid)


def _keygen(path: Path) -> None:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "fusedisk-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _sshd_config(workdir: Path, port: int, host_key: Path, authorized: Path) -> str:
    return f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {host_key}
AuthorizedKeysFile {authorized}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
UseDNS no
PrintMotd no
PidFile {workdir / "sshd.pid"}
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


class _PortTaken(Exception):
    pass


def _wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Wait until sshd sends its banner on ``port``; raise _PortTaken if it could not bind."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            text = log.read_text(errors="replace")
            if "Address already in use" in text:
                raise _PortTaken
            raise AssertionError(f"sshd exited {process.returncode}:\n{text}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
                if conn.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            _end_process(process)
            raise AssertionError(
                f"sshd not accepting connections after {START_TIMEOUT} s:\n"
                + log.read_text(errors="replace")
            )
        time.sleep(0.02)


def _stop_sshd(process: subprocess.Popen[bytes]) -> None:
    sessions = descendants(process.pid)
    _signal(sessions, signal.SIGCONT, "sshd")
    _end_process(process)
    # sshd -D leaves the processes serving live connections running when it ends.
    _end([p for p in sessions if alive(p)], "sshd")


@contextmanager
def private_sshd(workdir: Path) -> Iterator[Sshd]:
    """Run a private sshd on a free port of 127.0.0.1 until the block ends."""
    require_tools()
    workdir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    host_key = workdir / "ssh_host_ed25519_key"
    client_key = workdir / "client_ed25519_key"
    for key in (host_key, client_key):
        if not key.exists():
            _keygen(key)
    authorized = workdir / "authorized_keys"
    authorized.write_bytes(client_key.with_name(client_key.name + ".pub").read_bytes())
    config = workdir / "sshd_config"
    log = workdir / "sshd.log"
    for _attempt in range(5):  # another process may take the free port before sshd binds it
        port = _free_port()
        config.write_text(_sshd_config(workdir, port, host_key, authorized))
        with open(log, "ab") as log_file:
            process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        try:
            _wait_listening(process, port, log)
        except _PortTaken:
            continue
        break
    else:
        raise AssertionError(f"sshd found no free port:\n{log.read_text(errors='replace')}")
    user = pwd.getpwuid(os.geteuid()).pw_name
    try:
        yield Sshd(workdir, port, process, client_key, user, log)
    finally:
        _stop_sshd(process)


# ---- sshfs --------------------------------------------------------------------------------


def is_mounted(mountpoint: Path) -> bool:
    """Whether ``mountpoint`` is in /proc/mounts (never touches the mount, unlike ismount)."""
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            field_ = line.split()[1]
            decoded = field_.encode().decode("unicode_escape")  # \040 for a space, etc.
            if decoded == target:
                return True
    return False


def _tcp_sockets() -> list[tuple[int, int, int]]:
    """(local port, remote port, inode) of every IPv4 TCP socket in this network namespace."""
    result = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        result.append((int(local.split(":")[1], 16), int(remote.split(":")[1], 16), inode))
    return result


def _find_ssh(marker: str) -> list[int]:
    """The ssh clients whose command line holds ``marker`` (sshfs double-forks ssh: it is no
    descendant of sshfs)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _comm(int(entry.name)) == "ssh":
            with suppress(OSError):
                argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
                if any(arg.endswith(marker.encode()) for arg in argv):
                    found.append(int(entry.name))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    with suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _connection_pid(sshd: Sshd, clients: Sequence[int]) -> int | None:
    """The child of the listening sshd serving the TCP connection the ``clients`` hold."""
    client_inodes = set().union(*(_socket_inodes(pid) for pid in clients))
    sockets = _tcp_sockets()
    client_ports = {
        local for local, remote, inode in sockets if remote == sshd.port and inode in client_inodes
    }
    server_inodes = {
        inode
        for local, remote, inode in sockets
        if local == sshd.port and remote in client_ports and inode
    }
    for child in _children().get(sshd.process.pid, []):
        if any(_socket_inodes(p) & server_inodes for p in [child, *descendants(child)]):
            return child
    return None


def _wait_connection(sshd: Sshd, marker: str, log: Path) -> tuple[list[int], int]:
    """The ssh client(s) with ``marker`` and the sshd child serving their connection."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        clients = _find_ssh(marker)
        connection = _connection_pid(sshd, clients) if clients else None
        if connection is not None:
            return clients, connection
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no ssh client ({clients}) or no sshd process serving it:\n"
                + log.read_text(errors="replace")
                + sshd.log.read_text(errors="replace")
            )
        time.sleep(0.02)


@dataclass
class Remote:
    """An sshfs mount of ``remote_dir`` (served by ``sshd``) at ``mountpoint``."""

    sshd: Sshd
    remote_dir: Path
    mountpoint: Path
    process: subprocess.Popen[bytes]  # sshfs -f
    log: Path
    connection_pid: int  # the listening sshd's child serving this mount's connection
    ssh_pids: list[int]  # the ssh client(s) sshfs started
    stopped: set[int] = field(default_factory=set)

    def session_pids(self) -> list[int]:
        """The live sshd processes serving this mount: the per-connection child of the listening
        sshd and its descendants (with OpenSSH 9.2 the session process runs internal-sftp)."""
        stat = _stat(self.connection_pid)
        if stat is None or stat[1] != self.sshd.process.pid or not alive(self.connection_pid):
            return []
        return [self.connection_pid, *descendants(self.connection_pid)]

    def stop(self) -> None:
        """SIGSTOP the server side: the remote hangs as a stalled network would."""
        pids = self.session_pids()
        assert pids, "no sshd process serves this mount"
        self.stopped.update(pids)
        _signal(pids, signal.SIGSTOP, "sshd")
        deadline = time.monotonic() + STOP_TIMEOUT
        while not all((_stat(p) or ("T",))[0] == "T" for p in pids):
            assert time.monotonic() < deadline, "sshd processes did not stop"
            time.sleep(0.01)

    def cont(self) -> None:
        """SIGCONT what :meth:`stop` stopped (and any process still serving this mount)."""
        _signal(sorted(self.stopped | set(self.session_pids())), signal.SIGCONT, "sshd")
        self.stopped.clear()

    def kill(self) -> None:
        """SIGKILL the server side: the remote dies (the client sees its TCP connection close)."""
        pids = sorted(set(self.session_pids()) | self.stopped)
        _signal(pids, signal.SIGKILL, "sshd")
        self.stopped.clear()
        assert _wait_gone(pids, STOP_TIMEOUT), "sshd processes survived SIGKILL"


def _option(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")  # FUSE splits -o on commas


def _fusermount(*args: str) -> bool:
    try:
        result = subprocess.run([FUSERMOUNT, *args], capture_output=True, timeout=STOP_TIMEOUT * 2)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def _wait_mounted(mountpoint: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not is_mounted(mountpoint):
        if process.poll() is not None:
            text = log.read_text(errors="replace")
            raise AssertionError(f"sshfs exited {process.returncode}:\n{text}")
        if time.monotonic() > deadline:
            _end_process(process)
            text = log.read_text(errors="replace")
            raise AssertionError(f"sshfs not mounted after {START_TIMEOUT} s:\n{text}")
        time.sleep(0.02)


@contextmanager
def sshfs_mount(
    sshd: Sshd, remote_dir: Path, mountpoint: Path, extra_options: Sequence[str] = ()
) -> Iterator[Remote]:
    """Mount ``remote_dir`` as served by ``sshd`` at ``mountpoint`` with ``sshfs -f``.

    ``extra_options`` are more ``-o`` options, sshfs's or ssh's (``sshfs_sync``, ``cache=no``,
    ``reconnect``...). Teardown continues a stopped remote, unmounts (lazily if it must), ends
    sshfs and its ssh client, and never waits without a timeout.
    """
    require_tools()
    remote_dir.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}-sshfs.log"
    marker = f"HostKeyAlias=fusedisk-test-{uuid.uuid4().hex}"
    options = [
        f"IdentityFile={sshd.client_key}",
        f"Port={sshd.port}",
        "IdentitiesOnly=yes",
        "UserKnownHostsFile=/dev/null",
        "GlobalKnownHostsFile=/dev/null",
        "StrictHostKeyChecking=no",
        "BatchMode=yes",
        "PasswordAuthentication=no",
        "ConnectTimeout=5",
        "LogLevel=ERROR",
        marker,  # harmless (no known hosts): tells this mount's ssh client from others
        *ALIVE_OPTIONS,
        *extra_options,
    ]
    command = [SSHFS, "-f", "-F", "/dev/null"]  # -F: not the user's or the machine's ssh config
    command += [f"{sshd.user}@127.0.0.1:{remote_dir.resolve()}", str(mountpoint)]
    command += ["-o", ",".join(map(_option, options))]
    with open(log, "ab") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
    remote: Remote | None = None
    ssh_pids: list[int] = []
    try:
        _wait_mounted(mountpoint, process, log)
        # sshfs mounts before ssh has authenticated: a round trip to the server proves the SFTP
        # session is up (and sshd's pre-authentication child gone).
        try:
            os.statvfs(mountpoint)
        except OSError as error:
            text = log.read_text(errors="replace") + sshd.log.read_text(errors="replace")
            raise AssertionError(f"sshfs mount unusable: {error}\n{text}") from None
        ssh_pids, connection = _wait_connection(sshd, marker, log)
        remote = Remote(sshd, remote_dir, mountpoint, process, log, connection, ssh_pids)
        yield remote
    finally:
        if remote is not None:
            remote.cont()  # a stopped remote would hold the unmount and sshfs's exit
        ssh_pids = ssh_pids or _find_ssh(marker)
        if is_mounted(mountpoint) and not _fusermount("-u", str(mountpoint)):
            _fusermount("-u", "-z", str(mountpoint))  # busy (an open file): detach it
            _end_process(process)  # sshfs serves a detached mount until its last file closes
        else:
            _end_process(process, wait_first=STOP_TIMEOUT)
        _end([p for p in ssh_pids if alive(p)], "ssh")
        if is_mounted(mountpoint):  # sshfs died without unmounting: clear the stale mount
            _fusermount("-u", "-z", str(mountpoint))
