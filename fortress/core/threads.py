"""OS-level names for Fortress's own threads, so ``top -H``, ``ps -L`` and ``/proc`` show them.

Python 3.11 names threads for Python only; the kernel keeps the process's name for each of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

_PR_SET_NAME = 15  # prctl(2): the calling thread's name, 15 bytes and a NUL
_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # no libc to call: names stay Python's own
        _prctl = None


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (by default its Python name) at the OS level: first 15
    bytes; nothing where prctl is not available."""
    if _prctl is None:
        return
    raw = (name or threading.current_thread().name).encode("utf-8", "replace")[:15]
    _prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)
