"""A pinned tool in a virtualenv of its own, for the benchmarks that compare Fortress with
another program (LiteLLM's proxy in ``peers.py``, granian in ``servers.py``): installed once into
the user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``, ``fortress-bench/<name>-venv``)
and reused while it has the pinned version, so that it never touches Fortress's environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gateway_overhead as go


class Unavailable(Exception):
    """The tool cannot be installed here (the message says why)."""


def venv_dir(name: str) -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fortress-bench" / f"{name}-venv"


def installed_version(python: Path, dist: str) -> str | None:
    """The version of distribution ``dist`` in the virtualenv of ``python`` (None: not there)."""
    if not python.exists():
        return None
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def ensure(name: str, dist: str, version: str, requirements: list[str], executable: str) -> Path:
    """The path of ``executable`` in virtualenv ``name`` where ``dist`` is at ``version``,
    installing ``requirements`` first when it is not. Raises ``Unavailable``."""
    venv = venv_dir(name)
    python, exe = venv / "bin" / "python", venv / "bin" / executable
    if installed_version(python, dist) == version and exe.exists():
        return exe
    go.step(f"installing {' '.join(requirements)} into {venv} (once)")
    if not python.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            raise Unavailable(f"could not create a virtualenv: {made.stderr.strip()[-500:]}")
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *requirements], capture_output=True, text=True
    )
    if pip.returncode != 0 or not exe.exists():
        lines = [ln for ln in (pip.stdout + pip.stderr).splitlines() if "is ignored" not in ln]
        raise Unavailable(f"pip install {' '.join(requirements)} failed: " + " / ".join(lines[-3:]))
    return exe
