"""The machine the gateway runs on: GPUs through NVML where there are any, else CPU and memory.

``nvidia-ml-py`` (imported as ``pynvml``) is optional: without it, or without a GPU, the probe
reports no GPUs and the gateway's own CPU and memory are shown instead. Every read here is a
few microseconds (NVML calls, /proc files) and happens at scrape or evaluation time, never on
the request path.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fortress.observe")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class GpuSample:
    index: int
    name: str
    utilization: float  # percent, 0-100
    memory_used: int  # bytes
    memory_total: int  # bytes


class GpuProbe:
    """Reads every local GPU through NVML; ``available`` is False where that is impossible."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._names: list[str] = []
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                self._handles.append(h)
                self._names.append(name.decode() if isinstance(name, bytes) else str(name))
            self._nvml = pynvml
        except Exception as exc:  # ImportError, NVMLError (no driver, no device)
            log.debug("no NVML GPUs: %s", exc)
            self._handles = []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def sample(self) -> list[GpuSample]:
        """Utilisation and memory of each GPU now (empty without NVML)."""
        out: list[GpuSample] = []
        nv = self._nvml
        for i, h in enumerate(self._handles):
            try:
                util = nv.nvmlDeviceGetUtilizationRates(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
            except Exception as exc:  # a GPU fallen off the bus must not break a scrape
                log.warning("NVML read of GPU %d failed: %s", i, exc)
                continue
            out.append(GpuSample(i, self._names[i], float(util.gpu), int(mem.used), int(mem.total)))
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
            self._handles = []


def host_memory() -> tuple[int, int] | None:
    """(used, total) bytes of this machine's memory, from /proc/meminfo (None elsewhere)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            info = {}
            for line in f:
                key, _, rest = line.partition(b":")
                info[key] = int(rest.split()[0]) * 1024
                if len(info) > 8:
                    break
    except (OSError, ValueError, IndexError):
        return None
    total = info.get(b"MemTotal")
    avail = info.get(b"MemAvailable")
    if not total or avail is None:
        return None
    return total - avail, total


def process_rss() -> int | None:
    """Resident memory of this process in bytes (None where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """This process's CPU use in percent of one core between two calls of ``percent``."""

    def __init__(self) -> None:
        self._cpu = time.process_time()
        self._wall = time.monotonic()
        self._last = 0.0

    def percent(self) -> float:
        cpu, wall = time.process_time(), time.monotonic()
        if wall - self._wall >= 0.5:
            self._last = 100.0 * (cpu - self._cpu) / (wall - self._wall)
            self._cpu, self._wall = cpu, wall
        return self._last
