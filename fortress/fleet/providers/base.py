"""The interface every provider implements, and the instance states they report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

# An instance's life, the same words for every provider (stored and shown as such).
PROVISIONING = "provisioning"  # asked for, not yet running anything
STARTING = "starting"  # running, its engine not ready yet
READY = "ready"  # its engine answers; registered with the router
DRAINING = "draining"  # no new traffic; in-flight requests finishing
TERMINATED = "terminated"  # gone (or, for a local slot, stopped: free to start again)
FAILED = "failed"  # could not be started or kept running
PREEMPTED = "preempted"  # taken back by the platform (a spot interruption)
ACTIVE = frozenset({PROVISIONING, STARTING, READY})


@dataclass(frozen=True)
class Instance:
    """One replica slot or machine of a pool as its provider sees it."""

    id: str  # stable: a local slot's name, a cloud instance id
    state: str
    replica: str  # the name it has (or will have) in the router
    capacity: str = "local"  # local | spot | on-demand
    detail: str = ""
    url: str | None = None
    extra: dict[str, Any] | None = None

    def snapshot(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "state": self.state,
            "replica": self.replica,
            "capacity": self.capacity,
            "detail": self.detail,
            "url": self.url,
        }
        if self.extra:
            out.update(self.extra)
        return out


class Provider(Protocol):
    """Launches and terminates a pool's instances. Calls return at once; the work goes on in
    the background and shows in ``instances()``."""

    kind: str
    # True when the controller routes to the instances itself (cloud instances); False when
    # something else registers them (local slots: the runtime, as the supervisor reports).
    registers: bool

    async def start(self) -> None:
        """Before the first evaluation: read what exists (a restarted gateway adopts it)."""

    def instances(self) -> list[Instance]:
        """Every instance of the pool, in a stable order."""

    def launch(self, count: int) -> list[str]:
        """Start ``count`` more instances; returns the ids of those it could start."""

    def terminate(self, ids: list[str]) -> None:
        """Drain, then stop these instances."""

    def cpu_percent(self) -> float | None:
        """Average CPU use of the ready instances (percent of their machine), None if unknown."""

    def gpu_percent(self) -> float | None:
        """Average GPU utilisation of the instances (percent), None if unknown."""

    async def close(self) -> None:
        """Wait for launches and terminations in progress (the fleet is stopping)."""
