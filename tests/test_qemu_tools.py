"""QEMU's own tools through a real fusedisk mount: qemu-io, qemu-img check/info/compare/convert.

QEMU opens the served file with its own I/O patterns (qcow2 metadata updates, O_DIRECT with
``-t none``, flushes on close, truncation on create); these tests check the bytes that reach the
image by QEMU's own verdicts, through the mount and again on the backing file after unmounting.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from tests.mounting import mounted

pytestmark = [pytest.mark.mount, pytest.mark.qemu]

TOOL_TIMEOUT = 120.0
VIRTUAL_SIZE = 64 << 20
WRITES = ["write -P 0xab 0 4M", "write -P 0xcd 30M 1M"]
READS = ["read -P 0xab 0 4M", "read -P 0xcd 30M 1M", "read -P 0 4M 26M", "read -P 0 31M 33M"]


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a QEMU tool; fail with its output unless it succeeds."""
    result = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout}\n" + (
        result.stderr
    )
    return result


def qemu_io(image: Path, commands: list[str], *options: str) -> None:
    argv: list[str | Path] = ["qemu-io", "-f", "qcow2", *options]
    for command in commands:
        argv += ["-c", command]
    result = run(*argv, image)
    output = result.stdout + result.stderr
    assert "failed" not in output.lower(), output  # "Pattern verification failed", "write failed"


def qcow2(path: Path) -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(VIRTUAL_SIZE))
    return path


@pytest.mark.parametrize("cache", ["writeback", "none"], ids=["page-cache", "o-direct"])
def test_qemu_io_through_the_mount_leaves_a_valid_qcow2(tmp_path: Path, cache: str) -> None:
    image = qcow2(tmp_path / "disk.qcow2")
    reference = qcow2(tmp_path / "reference.qcow2")  # the same writes, not through fusedisk
    qemu_io(reference, WRITES)

    with mounted(image, tmp_path / "mnt") as m:
        flushes = m.status()["flushes"]
        qemu_io(m.file, WRITES, "-t", cache)
        assert m.status()["flushes"] > flushes, "qemu's flush on close never reached the daemon"
        qemu_io(m.file, READS, "-t", cache)

        check = run("qemu-img", "check", "-f", "qcow2", m.file)
        assert "No errors were found on the image." in check.stdout

        info = json.loads(run("qemu-img", "info", "--output=json", m.file).stdout)
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == VIRTUAL_SIZE
        assert info["actual-size"] == image.stat().st_blocks * 512
        assert info["actual-size"] >= 5 << 20  # the 5 MiB written are allocated

    check = run("qemu-img", "check", "-f", "qcow2", image)
    assert "No errors were found on the image." in check.stdout
    compare = run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", reference, image)
    assert "Images are identical." in compare.stdout
    qemu_io(image, READS)


def _sparse_raw(path: Path) -> bytes:
    """16 MiB: random data at 2-5 MiB and in the last MiB, zeros (a hole) elsewhere."""
    rng = random.Random(21)
    data = bytearray(16 << 20)
    data[2 << 20 : 5 << 20] = rng.randbytes(3 << 20)
    data[15 << 20 :] = rng.randbytes(1 << 20)
    with open(path, "wb") as f:
        f.truncate(len(data))
        for start, end in ((2 << 20, 5 << 20), (15 << 20, 16 << 20)):
            f.seek(start)
            f.write(data[start:end])
    return bytes(data)


@pytest.mark.parametrize("output_format", ["raw", "qcow2"])
def test_qemu_img_convert_a_raw_image_into_the_mount(tmp_path: Path, output_format: str) -> None:
    source = tmp_path / "source.raw"
    content = _sparse_raw(source)
    image = tmp_path / "disk.img"
    # Old, non-zero bytes everywhere, longer than the source: convert must truncate and must
    # leave no old byte where the source has a hole.
    image.write_bytes(random.Random(22).randbytes(20 << 20))

    with mounted(image, tmp_path / "mnt") as m:
        run("qemu-img", "convert", "-f", "raw", "-O", output_format, "-t", "none", source, m.file)
        compare = run("qemu-img", "compare", "-f", "raw", "-F", output_format, source, m.file)
        assert "Images are identical." in compare.stdout
        info = json.loads(run("qemu-img", "info", "--output=json", m.file).stdout)
        assert (info["format"], info["virtual-size"]) == (output_format, len(content))

    compare = run("qemu-img", "compare", "-f", "raw", "-F", output_format, source, image)
    assert "Images are identical." in compare.stdout
    if output_format == "raw":
        assert image.read_bytes() == content
    else:
        run("qemu-img", "check", "-f", "qcow2", image)
