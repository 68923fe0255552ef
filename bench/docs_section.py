"""What every benchmark shares for its report: the CPU's name, and its section of
``docs/benchmarks.md``, kept between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers so
that each script rewrites its own section and leaves the others alone."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Each section names the machine, the date and the command that produced it; rerun the\n"
    "command to get the figures on yours.\n"
)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(name: str, body: str, title: str | None = None, after: str | None = None) -> Path:
    """Replace section ``name`` of docs/benchmarks.md with ``body`` (under ``title``).

    A new section goes right after section ``after`` when that exists, else at the end.
    """
    start, end = markers(name)
    block = start + "\n" + (f"{title}\n\n" if title else "") + body.rstrip("\n") + "\n" + end + "\n"
    text = DOCS.read_text() if DOCS.exists() else HEADER
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    elif after is not None and markers(after)[1] in text:
        head, tail = text.split(markers(after)[1], 1)
        text = head + markers(after)[1] + "\n\n" + block + ("\n" + tail.lstrip("\n") if tail.strip() else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)
    return DOCS


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def commit() -> str:
    """The checkout's commit (short), marked when fortress/ or bench/ has uncommitted changes."""
    root = DOCS.parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "fortress", "bench"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {head}" + (" (with uncommitted changes)" if dirty else "")


def machine_line() -> str:
    """'<CPU> (<n> cores, Linux <kernel>), Python <version>, commit <sha>' for a report's first
    line: every figure names the code it measured."""
    return (
        f"{cpu_model()} ({os.cpu_count()} cores, {platform.system()} {platform.release()}), "
        f"Python {platform.python_version()}, {commit()}"
    )
