"""Who may reach a fusedisk mount and its control socket, and where a move may write.

The other user is uid 65534 (nobody), reached with ``setpriv``, so these tests need root.  Its
clients are stdlib-only scripts run by the system interpreter (``/usr/bin/python3``): the venv's
interpreter lives under /root (mode 0700) on this machine, so where nobody must run fusedisk
itself it gets one ambient capability, CAP_DAC_READ_SEARCH, to reach that interpreter.  It grants
reading and searching, never writing: ``/dev/fuse`` (0600) stays closed to it, as to any user.

To test the SO_PEERCRED check on its own, one client gets CAP_DAC_OVERRIDE instead: the modes of
the directory and the socket no longer stop it, so only the daemon's peer-uid check can.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.mounting import Mounted, fusedisk, mounted, random_image

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.getuid() != 0, reason="acting as another uid (setpriv) needs root"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing"),
]

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
IMAGE_SIZE = 4 << 20
TIMEOUT = 60.0

# Connect to a Unix socket, send one line, print {"errno": N} or {"reply": {...}} as JSON.
CLIENT = textwrap.dedent(
    """
    import json, socket, sys
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    try:
        sock.connect(sys.argv[1])
    except OSError as e:
        print(json.dumps({"errno": e.errno}))
        sys.exit(0)
    try:
        sock.sendall(sys.argv[2].encode() + b"\\n")
    except BrokenPipeError:  # refused: the daemon replied and closed before reading
        pass
    data = b""
    while not data.endswith(b"\\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    print(json.dumps({"reply": json.loads(data)}))
    """
)

# Try each operation on a path; print {operation: "ok" or errno} as JSON.
PROBE = textwrap.dedent(
    """
    import json, os, sys
    path = sys.argv[1]
    result = {}
    def attempt(name, operation):
        try:
            operation()
            result[name] = "ok"
        except OSError as e:
            result[name] = e.errno
    attempt("stat", lambda: os.stat(path))
    attempt("read", lambda: os.close(os.open(path, os.O_RDONLY)))
    attempt("write", lambda: os.close(os.open(path, os.O_WRONLY)))
    status = os.path.join(os.path.dirname(path), ".status")
    attempt("status", lambda: os.close(os.open(status, os.O_RDONLY)))
    attempt("status-write", lambda: os.close(os.open(status, os.O_WRONLY)))
    print(json.dumps(result))
    """
)


def as_nobody(
    argv: Sequence[str | Path],
    *,
    caps: Sequence[str] = (),
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as uid/gid 65534 with no groups, and only the ambient ``caps`` named."""
    command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if caps:
        spec = ",".join(f"+{cap}" for cap in caps)
        command += [f"--inh-caps={spec}", f"--ambient-caps={spec}"]
    return subprocess.run(
        [*command, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
    )


def nobody_python(script: str, *args: str | Path, caps: Sequence[str] = ()) -> dict[str, Any]:
    """Run a stdlib-only script as nobody with the system interpreter; its JSON output."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to run a client as another user")
    result = as_nobody([SYSTEM_PYTHON, "-c", script, *args], caps=caps)
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def assert_still_serving(m: Mounted, content: bytes) -> None:
    assert m.daemon.poll() is None, m.log.read_text()
    facts = m.status()
    assert facts["phase"] == "idle" and facts["image"] == str(m.image), facts
    assert m.file.read_bytes() == content


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can search (pytest's tmp_path is inside a 0700 directory): so when
    nobody is refused below, the refusal comes from fusedisk, not from a parent directory."""
    path = Path(tempfile.mkdtemp(prefix="fusedisk-security-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


# ---- the control socket -------------------------------------------------------------------


def test_control_socket_is_private(disk_mount: Mounted) -> None:
    control = Path(disk_mount.status()["control"])
    sock = os.lstat(control)
    assert stat.S_ISSOCK(sock.st_mode), control
    assert stat.S_IMODE(sock.st_mode) == 0o600, oct(sock.st_mode)
    assert sock.st_uid == os.getuid()
    directory = os.lstat(control.parent)
    assert stat.S_ISDIR(directory.st_mode), f"{control.parent} is not a real directory"
    assert stat.S_IMODE(directory.st_mode) == 0o700, oct(directory.st_mode)
    assert directory.st_uid == os.getuid()  # the daemon's uid: it runs as this test does


def test_another_uid_cannot_reach_the_control_socket(disk_mount: Mounted) -> None:
    control = disk_mount.status()["control"]
    reply = nobody_python(CLIENT, control, json.dumps({"command": "status"}))
    assert reply == {"errno": 13}, reply  # EACCES: the 0700 directory, then the 0600 socket
    assert_still_serving(disk_mount, disk_mount.image.read_bytes())


def test_peer_uid_check_refuses_another_uid(disk_mount: Mounted, tmp_path: Path) -> None:
    """Past the file modes (CAP_DAC_OVERRIDE), another uid still gets nothing done."""
    content = disk_mount.image.read_bytes()
    control = disk_mount.status()["control"]
    stolen = tmp_path / "stolen.img"
    request = json.dumps({"command": "migrate", "destination": str(stolen)})
    reply = nobody_python(CLIENT, control, request, caps=["dac_override"])
    assert reply == {"reply": {"ok": False, "error": "permission denied: not the mount's owner"}}, (
        reply
    )
    assert not stolen.exists(), "a move started for another uid"
    assert "refused a control connection from uid 65534" in disk_mount.log.read_text()
    assert_still_serving(disk_mount, content)


# ---- the mount itself ---------------------------------------------------------------------


def probe_as_nobody(file: Path) -> dict[str, Any]:
    return nobody_python(PROBE, file)


def test_mount_is_private_by_default(public_dir: Path) -> None:
    image = public_dir / "disk.img"
    content = random_image(image, IMAGE_SIZE, seed=3)
    image.chmod(0o644)  # the file's mode would let nobody read it: the mount must not
    with mounted(image, public_dir / "mnt") as m:
        assert os.stat(public_dir).st_mode & 0o005 == 0o005  # nobody can search up to MNT
        probe = probe_as_nobody(m.file)
        assert probe["stat"] == 13 and probe["read"] == 13 and probe["write"] == 13, probe
        assert probe["status"] == 13, probe  # nor read the status (the control socket's path)
        assert_still_serving(m, content)


def test_allow_other_shows_the_disk_with_its_file_modes(public_dir: Path) -> None:
    """With --allow-other another user sees the disk, and the kernel enforces its mode bits
    (pyfuse3's default_permissions): 0644 lets nobody read, never write."""
    image = public_dir / "disk.img"
    content = random_image(image, IMAGE_SIZE, seed=4)
    image.chmod(0o644)
    with mounted(image, public_dir / "mnt", "--allow-other") as m:
        probe = probe_as_nobody(m.file)
        assert probe["stat"] == "ok" and probe["read"] == "ok", probe
        assert probe["write"] == 13, f"another user may write the disk: {probe}"
        # It can read the socket's path from the status file, yet still not reach the socket,
        # and the status file is read-only for everyone.
        assert probe["status"] == "ok" and probe["status-write"] == 13, probe
        reply = nobody_python(CLIENT, m.status()["control"], json.dumps({"command": "status"}))
        assert reply == {"errno": 13}, reply
        assert_still_serving(m, content)


# ---- where a move may write ----------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("target", ["file", "dangling", "directory", "source"])
def test_symlink_destination_is_refused(
    disk_mount: Mounted, tmp_path: Path, target: str, force: bool
) -> None:
    content = disk_mount.image.read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    pointee = {
        "file": other / "precious.img",
        "dangling": other / "nothing-here.img",
        "directory": other,
        "source": disk_mount.image,
    }[target]
    if target == "file":
        pointee.write_bytes(b"precious" * 1000)
    before = os.stat(pointee) if pointee.exists() else None
    link = tmp_path / "link.img"
    link.symlink_to(pointee)
    result = fusedisk(
        "migrate", disk_mount.mountpoint, link, "--detach", *(["--force"] if force else [])
    )
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fusedisk: cannot move to {link}"), lines
    why = "the source image itself" if target == "source" else "symbolic link"
    assert why in lines[0], lines
    assert link.is_symlink() and os.readlink(link) == str(pointee)
    if before is None:
        assert not os.path.lexists(pointee), "a file appeared where the dangling link points"
    else:
        after = os.stat(pointee)
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        )
    if target == "file":
        assert pointee.read_bytes() == b"precious" * 1000
    assert_still_serving(disk_mount, content)


# ---- an unprivileged user -----------------------------------------------------------------


def nobody_can_use_dev_fuse() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to run a client as another user")
    check = "import os; print(os.access('/dev/fuse', os.R_OK | os.W_OK))"
    result = as_nobody([SYSTEM_PYTHON, "-c", check])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() == "True"


@pytest.fixture
def nobody_home(public_dir: Path) -> Path:
    """A directory of nobody's own, holding its disk image and its mountpoint."""
    home = public_dir / "home"
    home.mkdir()
    random_image(home / "disk.img", IMAGE_SIZE, seed=5)
    (home / "mnt").mkdir()
    (home / "run").mkdir(mode=0o700)
    for path in (home, home / "disk.img", home / "mnt", home / "run"):
        os.chown(path, NOBODY, NOBODY)
    return home


def nobody_fusedisk(
    home: Path, *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """The fusedisk CLI as nobody (CAP_DAC_READ_SEARCH only to reach the venv's interpreter)."""
    full_env = {"PATH": "/usr/bin:/bin", "HOME": str(home), **env}
    argv = [sys.executable, "-m", "fusedisk", *args]
    return as_nobody(argv, caps=["dac_read_search"], env=full_env, cwd=home)


@pytest.mark.parametrize(
    ("foreground", "runtime"),
    [
        pytest.param(False, "own", id="daemon-own"),
        pytest.param(True, "own", id="foreground-own"),
        pytest.param(False, "inherited", id="daemon-inherited"),
        pytest.param(True, "inherited", id="foreground-inherited"),
    ],
)
def test_unprivileged_mount_without_dev_fuse_says_so(
    nobody_home: Path, public_dir: Path, runtime: str, foreground: bool
) -> None:
    """A user who cannot open /dev/fuse gets one line naming it, and nothing is mounted.

    ``runtime`` is the XDG_RUNTIME_DIR the user has: its own, or one inherited from root
    (``su`` without ``-``), which exists but which it may not write."""
    if nobody_can_use_dev_fuse():
        pytest.skip("uid 65534 can open /dev/fuse on this machine")
    if runtime == "own":
        xdg = nobody_home / "run"
    else:
        xdg = public_dir / "root-run"
        xdg.mkdir(mode=0o700)
    args = ["mount", "disk.img", "mnt", *(["--foreground"] if foreground else [])]
    result = nobody_fusedisk(nobody_home, *args, env={"XDG_RUNTIME_DIR": str(xdg)})
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusedisk: "), lines
    assert "/dev/fuse" in lines[0], lines
    assert not os.path.ismount(nobody_home / "mnt")
    assert not os.listdir(nobody_home / "mnt")


def test_unprivileged_user_moves_own_disk(nobody_home: Path) -> None:
    if not nobody_can_use_dev_fuse():
        pytest.skip(
            "/dev/fuse is mode 0600 root on this machine: uid 65534 cannot open it, so no "
            "unprivileged user can mount (the refusal is tested above)"
        )
    env = {"XDG_RUNTIME_DIR": str(nobody_home / "run")}
    content = (nobody_home / "disk.img").read_bytes()
    dest = nobody_home / "moved.img"
    mounted_ = nobody_fusedisk(nobody_home, "mount", "disk.img", "mnt", env=env)
    assert mounted_.returncode == 0, mounted_.stderr
    try:
        moved = nobody_fusedisk(nobody_home, "migrate", "mnt", str(dest), env=env)
        assert moved.returncode == 0, moved.stderr
    finally:
        unmounted = nobody_fusedisk(nobody_home, "unmount", "mnt", env=env)
        if unmounted.returncode:
            subprocess.run(["fusermount3", "-u", "-z", str(nobody_home / "mnt")], check=False)
    assert unmounted.returncode == 0, unmounted.stderr
    # (root cannot look inside a mount of nobody's without allow_other: check the files after)
    assert dest.stat().st_uid == NOBODY
    assert dest.read_bytes() == content
    assert not (nobody_home / "disk.img").exists()


# ---- the journal, in a directory other users may write ---------------------------------------


@pytest.fixture
def shared_images(public_dir: Path) -> Path:
    """A directory of images that a group nobody belongs to may write (mode 0775, not sticky),
    as image directories shared with a `kvm` or `libvirt` group often are; and a root-owned
    victim file outside it, in a directory nobody cannot write."""
    images = public_dir / "images"
    images.mkdir()
    os.chown(images, 0, NOBODY)
    images.chmod(0o775)
    random_image(images / "disk.img", IMAGE_SIZE, seed=6)
    (public_dir / "victim.conf").write_bytes(b"precious\n")
    (public_dir / "mnt").mkdir()
    return images


PLANT = textwrap.dedent(
    """
    import os, sys
    kind, path, value = sys.argv[1:]
    if kind == "file":
        with open(path, "w") as f:
            f.write(value)
    else:
        os.symlink(value, path)
    print("{}")
    """
)


def plant_as_nobody(kind: str, path: Path, value: str) -> None:
    nobody_python(PLANT, kind, path, value)


@pytest.mark.parametrize("phase", ["mirroring", "switched"])
def test_a_journal_planted_by_another_user_is_not_obeyed(
    shared_images: Path, public_dir: Path, phase: str
) -> None:
    """A record nobody planted beside the image, naming a file of root's as the destination.
    Obeyed, "mirroring" would have that file removed as a partial destination (were its marker
    there too); "switched" would have the image deleted and the other file served in its place.
    """
    image, victim = shared_images / "disk.img", public_dir / "victim.conf"
    content = image.read_bytes()
    record: dict[str, object] = {"phase": phase, "source": str(image), "destination": str(victim)}
    if phase == "switched":
        record["keep_source"] = False
    plant_as_nobody("file", shared_images / ".disk.img.fusedisk-move", json.dumps(record))
    mountpoint = public_dir / "mnt"
    result = fusedisk("mount", image, mountpoint)
    served: tuple[str, bytes] | None = None  # the file the mount serves, and its bytes
    if result.returncode == 0:
        try:
            facts = fusedisk("status", mountpoint, "--json")
            assert facts.returncode == 0, facts.stderr
            served = json.loads(facts.stdout)["image"], (mountpoint / image.name).read_bytes()
        finally:
            unmounted = fusedisk("unmount", mountpoint)
        assert unmounted.returncode == 0, unmounted.stderr
    assert victim.read_bytes() == b"precious\n", f"{victim}, named by a planted journal, changed"
    assert image.exists(), f"mounting {image} deleted it, as a planted journal said"
    assert image.read_bytes() == content
    # Refusing (one line naming the journal) or ignoring the journal are both safe.
    if result.returncode:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and ".disk.img.fusedisk-move" in lines[0], lines
    else:
        assert served is not None
        assert served[0] == str(image), f"it served {served[0]}, not {image}"
        assert served[1] == content, "the mount served other bytes than the image's"


def test_a_symlink_planted_as_the_journal_is_not_followed(
    shared_images: Path, public_dir: Path, tmp_path: Path
) -> None:
    image, victim = shared_images / "disk.img", public_dir / "victim.conf"
    plant_as_nobody("link", shared_images / ".disk.img.fusedisk-move.tmp", str(victim))
    with mounted(image, public_dir / "mnt") as m:
        result = fusedisk("migrate", m.mountpoint, tmp_path / "moved.img")
        assert victim.read_bytes() == b"precious\n", "the journal was written through a symlink"
        # Moving (the link replaced or ignored) or refusing in one line are both safe.
        assert result.returncode == 0 or len(result.stderr.splitlines()) == 1, result.stderr
