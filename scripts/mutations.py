#!/usr/bin/env python3
"""Plant each safety bug in a scratch copy of the tree and run the tests: each must be caught.

Not part of the test run (it runs the suite once per bug).  For every mutation below: copy the
tree (tracked and untracked files, not ignored ones) to a temporary directory, replace the exact
lines named (a mutation that no longer applies is an error: update it with the code), run pytest
there, and list the tests that failed.  A mutation no test catches is a hole in the suite; the
script exits 1 if there is one.  First the unchanged copy runs, and must pass.

    .venv/bin/python scripts/mutations.py                 # every mutation, the CI suite but guests
    .venv/bin/python scripts/mutations.py --only marker-not-durable -- tests/test_power_loss.py

Prints a Markdown table (mutation, what it plants, the tests that caught it) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PYTEST = ["-m", "not guest"]


@dataclass(frozen=True)
class Mutation:
    name: str
    plants: str
    path: str
    edits: tuple[tuple[str, str], ...]  # (exact text, its replacement), each found exactly once


MUTATIONS = [
    Mutation(
        "flush-not-waiting-for-destination",
        "a guest flush starts the destination fsync but does not wait for it",
        "fusedisk/engine.py",
        (
            (
                "nursery.start_soon(self._flush_mirror, mirror, datasync)",
                "self._nursery.start_soon(self._flush_mirror, mirror, datasync)",
            ),
        ),
    ),
    Mutation(
        "no-final-flush",
        "no final fsync when the daemon unmounts",
        "fusedisk/daemon.py",
        (("        image.fsync(False)\n", "        pass\n"),),
    ),
    Mutation(
        "flush-skips-destination",
        "flush does not fsync the destination",
        "fusedisk/engine.py",
        (
            (
                'mirror.run(lambda f: f.fsync(datasync), "flush")',
                'mirror.run(lambda f: None, "flush")',
            ),
        ),
    ),
    Mutation(
        "no-flush-in-hold",
        "no destination fsync inside the switch hold",
        "fusedisk/move.py",
        (
            (
                '        await dest.run(lambda f: f.fsync(True), "flush")  # only writes since',
                "        # ",
            ),
        ),
    ),
    Mutation(
        "source-deleted-before-record",
        "source deleted inside the hold, before the switch record is committed",
        "fusedisk/move.py",
        (
            (
                "        disk.storage.commit_journal(move.source)\n",
                "        disk.storage.remove(move.source)\n"
                "        disk.storage.commit_journal(move.source)\n",
            ),
        ),
    ),
    Mutation(
        "copier-without-range-lock",
        "the copier takes no range lock",
        "fusedisk/move.py",
        (("        with disk.locks.hold(cursor, end):\n", "        if True:\n"),),
    ),
    Mutation(
        "partial-pages-marked-synced",
        "partly written pages marked in sync",
        "fusedisk/syncmap.py",
        (
            ("    first = -(-start // PAGE)\n    if end", "    first = start // PAGE\n    if end"),
            ("        last = end // PAGE\n", "        last = -(-end // PAGE)\n"),
        ),
    ),
    Mutation(
        "destination-write-skipped",
        "a mirrored write (or truncate) is not sent to the destination",
        "fusedisk/engine.py",
        (
            (
                'not refused:\n            call = mirror.submit(operation, f"{what} {where}")',
                'not refused:\n            call = mirror.submit(lambda f: None, f"{what} {where}")',
            ),
            (
                'None:\n            call = mirror.submit(operation, f"{what} {where}")',
                'None:\n            call = mirror.submit(lambda f: None, f"{what} {where}")',
            ),
        ),
    ),
    Mutation(
        "marker-not-durable",
        "the partial marker's removal is not made durable before the source goes",
        "fusedisk/storage.py",
        (
            (
                "            os.unlink(marker_path(path))\n        # Durable",
                "            os.unlink(marker_path(path))\n        return\n        # Durable",
            ),
        ),
    ),
    Mutation(
        "marker-written-in-place",
        "the partial marker is written in place (a crash can leave it torn)",
        "fusedisk/storage.py",
        (
            ('_write_new(marker + ".tmp", ', "_write_new(marker, "),
            ('        os.rename(marker + ".tmp", marker)\n', ""),
        ),
    ),
    Mutation(
        "journal-commit-not-durable",
        "the journal's rename is not made durable (no directory fsync)",
        "fusedisk/storage.py",
        (
            (
                'final + ".tmp", final)\n        fsync_dir(os.path.dirname(final))\n',
                'final + ".tmp", final)\n',
            ),
        ),
    ),
    Mutation(
        "destination-name-not-durable",
        "the new destination's name is not made durable (no directory fsync)",
        "fusedisk/storage.py",
        (("image is locked\n        fsync_dir(os.path.dirname(path))\n", "image is locked\n"),),
    ),
    Mutation(
        "write-before-its-intent-mark",
        "a write below the checkpoint goes ahead without waiting for its region's durable mark",
        "fusedisk/engine.py",
        (
            (
                "            if intent is None or not intent.must_mark(start, end):",
                "            if True:",
            ),
        ),
    ),
    Mutation(
        "checkpoint-without-source-flush",
        "a checkpoint is recorded without flushing the source",
        "fusedisk/move.py",
        (("        await trio.to_thread.run_sync(source.fsync, True)\n", ""),),
    ),
    Mutation(
        "checkpoint-without-destination-flush",
        "a checkpoint is recorded without flushing the destination",
        "fusedisk/move.py",
        (
            (
                '        await dest.run(lambda f: f.fsync(True), "flush")\n'
                "        await trio.to_thread.run_sync(source.fsync, True)\n",
                "        await trio.to_thread.run_sync(source.fsync, True)\n",
            ),
        ),
    ),
    Mutation(
        "checkpoint-forgets-writes-during-it",
        "a checkpoint's record leaves out the regions written while it flushed",
        "fusedisk/intent.py",
        (
            (
                "if e >= epoch - KEEP_EPOCHS}",
                "if epoch - KEEP_EPOCHS <= e < epoch}",
            ),
        ),
    ),
    Mutation(
        "checkpoint-clears-recent-marks",
        "a checkpoint clears the marks of regions written since the checkpoint before (eager "
        "clearing: not a safety bug, but each write there then waits for a journal write again)",
        "fusedisk/intent.py",
        (("if e >= epoch - KEEP_EPOCHS}", "if e >= epoch}"),),
    ),
    Mutation(
        "fail-back-keeps-checkpoint",
        "a fail-back leaves the checkpoint in the journal (a crash could resume a dead move)",
        "fusedisk/move.py",
        (
            (
                "    promised = intent is not None and (intent.records > 0 or move.resumed_from",
                "    promised = False and (intent.records > 0 or move.resumed_from",
            ),
        ),
    ),
    Mutation(
        "resume-any-destination",
        "recovery resumes a destination that is not the file the move created",
        "fusedisk/daemon.py",
        (('            if found == checkpoint.get("destination_id"):', "            if True:"),),
    ),
    Mutation(
        "journal-write-not-durable",
        "a journal record (start, mark, checkpoint) is renamed into place with no directory fsync",
        "fusedisk/storage.py",
        (
            (
                'final + ".new", final)\n        fsync_dir(os.path.dirname(final))\n',
                'final + ".new", final)\n',
            ),
        ),
    ),
    Mutation(
        "discard-without-range-lock",
        "a discard does not wait for the range the copier holds (nor for its intent mark)",
        "fusedisk/engine.py",
        (("            await self._ready_to_mirror(offset, end)\n", ""),),
    ),
    Mutation(
        "discard-not-mirrored",
        "a discard (fallocate) is applied to the source only, never sent to the destination",
        "fusedisk/engine.py",
        (
            (
                '            operation = FileCall("fallocate", mode, offset, length)\n',
                "            self.primary.fallocate(mode, offset, length)\n"
                '            operation = FileCall("size")\n',
            ),
        ),
    ),
    Mutation(
        "preallocation-marked-synced",
        "a preallocation (no byte changed) marks its range in sync, as a discard does",
        "fusedisk/engine.py",
        (
            (
                "                if mode & ZEROING and offset < size:",
                "                if offset < size:",
            ),
        ),
    ),
    Mutation(
        "discard-not-marked-synced",
        "a discard marks nothing in sync (the copier copies its zeros: the destination fills)",
        "fusedisk/engine.py",
        (("                    self.syncmap.mark_written(offset, min(end, size))\n", ""),),
    ),
    Mutation(
        "compare-writes-equal-pages",
        "a resumed move's comparison writes every page it compares, equal or not",
        "fusedisk/compare.py",
        (
            ("    if ours == theirs:  # one comparison", "    if False:  # one comparison"),
            (
                "differs = page < len(ours) and ours[page : page + PAGE] != theirs",
                "differs = page < len(ours) and True or ours[page : page + PAGE] != theirs",
            ),
        ),
    ),
    Mutation(
        "compare-misses-differing-pages",
        "a resumed move's comparison looks at each page's first byte only",
        "fusedisk/compare.py",
        (
            (
                "ours[page : page + PAGE] != theirs[page : page + PAGE]",
                "ours[page : page + 1] != theirs[page : page + 1]",
            ),
        ),
    ),
    Mutation(
        "compare-without-range-lock",
        "a resumed move compares (reads both files, writes what differs) without holding the range",
        "fusedisk/move.py",
        (
            ("import enum\n", "import contextlib\nimport enum\n"),
            (
                "        with disk.locks.hold(cursor, end):\n            runs = syncmap",
                "        held = disk.locks.hold(cursor, end)\n"
                "        with contextlib.nullcontext() if move.compared else held:\n"
                "            runs = syncmap",
            ),
        ),
    ),
    Mutation(
        "marked-source-holes-not-punched",
        "a resumed move keeps the destination's data where the source is a hole in a marked region",
        "fusedisk/compare.py",
        (("    for start, stop in marked:\n", "    for start, stop in []:\n"),),
    ),
    Mutation(
        "refused-mode-reaches-destination",
        "a fallocate mode the source refuses was already applied to the destination",
        "fusedisk/engine.py",
        (('"fallocate at offset", offset, REFUSED)', '"fallocate at offset", offset)'),),
    ),
]


def scratch_copy(into: Path) -> None:
    """The tree as git sees it (tracked and untracked, not ignored), without .venv or caches."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        if (REPO / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, into / name)


def planted(text: str, mutation: Mutation) -> str:
    """``text`` with ``mutation``'s edits made; exits if one no longer applies."""
    for old, new in mutation.edits:
        if text.count(old) != 1:
            sys.exit(
                f"mutations: {mutation.name} no longer applies ({old.strip()!r} found "
                f"{text.count(old)} times in {mutation.path}): update it with the code"
            )
        text = text.replace(old, new)
    return text


def plant(tree: Path, mutation: Mutation) -> None:
    path = tree / mutation.path
    path.write_text(planted(path.read_text(), mutation))


def run_tests(mutation: Mutation | None, pytest_args: list[str]) -> tuple[int, list[str], float]:
    """Run pytest on a scratch copy (with ``mutation`` planted): exit code, failed tests, time."""
    with tempfile.TemporaryDirectory(prefix="fusedisk-mutation-") as scratch:
        tree = Path(scratch)
        scratch_copy(tree)
        if mutation is not None:
            plant(tree, mutation)
        junit = tree / "junit.xml"
        started = time.monotonic()
        result = subprocess.run(
            [
                *(str(REPO / ".venv/bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"),
                f"--junitxml={junit}",
                *pytest_args,
            ],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
        )
        elapsed = time.monotonic() - started
        failed: list[str] = []
        if junit.exists():
            for case in ET.parse(junit).iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(
                        f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
                    )
        if result.returncode not in (0, 1):
            sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        return result.returncode, failed, elapsed


def _grouped(tests: list[str]) -> list[str]:
    """``test[a]``, ``test[b]`` as one ``test[...]`` (2 of its cases)."""
    counts: dict[str, int] = {}
    for test in tests:
        counts[test.split("[")[0]] = counts.get(test.split("[")[0], 0) + 1
    return [
        f"`{name}`" if n == 1 and name in tests else f"`{name}[...]` ({n} cases)"
        for name, n in counts.items()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="run these mutations only")
    parser.add_argument("--json", default="mutations.json", help="where to write the results")
    parser.add_argument("pytest_args", nargs="*", help=f"for pytest (default: {DEFAULT_PYTEST})")
    args = parser.parse_args()
    pytest_args = args.pytest_args or DEFAULT_PYTEST
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        known = ", ".join(m.name for m in MUTATIONS)
        sys.exit(f"mutations: unknown name in {args.only}; known: {known}")
    for mutation in chosen:  # each still applies, checked before a long run, not during it
        planted((REPO / mutation.path).read_text(), mutation)
    code, failed, elapsed = run_tests(None, pytest_args)
    if code != 0:
        sys.exit(f"mutations: the unchanged tree fails ({code}): {failed}; fix that first")
    print(f"unchanged tree: passes ({elapsed:.0f} s)", flush=True)
    results: list[dict[str, Any]] = []
    for mutation in chosen:
        code, failed, elapsed = run_tests(mutation, pytest_args)
        caught = code == 1 and bool(failed)
        results.append(
            {
                "mutation": mutation.name,
                "plants": mutation.plants,
                "caught_by": failed,
                "exit_code": code,
                "seconds": round(elapsed, 1),
                "caught": caught,
            }
        )
        print(
            f"{mutation.name}: {'caught by ' + str(len(failed)) if caught else 'NOT CAUGHT'} "
            f"({elapsed:.0f} s)",
            flush=True,
        )
        Path(args.json).write_text(  # after each: a run cut short keeps what it found
            json.dumps({"pytest_args": pytest_args, "results": results}, indent=1)
        )
    print(f"\npytest {' '.join(pytest_args)}\n")
    print("| mutation | plants | caught by |\n|---|---|---|")
    for r in results:
        tests = "<br>".join(_grouped(r["caught_by"])) if r["caught"] else "**NOT CAUGHT**"
        print(f"| {r['mutation']} | {r['plants']} | {tests} |")
    return 0 if all(r["caught"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
