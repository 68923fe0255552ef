"""What an engine is: a way to start one replica process, and where it then answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


class EngineError(ValueError):
    """An engine that cannot be started as configured; the message says how to fix it."""


@dataclass(frozen=True)
class Launch:
    """One process to start: ``argv`` with ``env`` added to Fortress's own environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    url: str
    health_path: str = "/health"

    @property
    def health_url(self) -> str:
        return self.url + self.health_path


class Engine(Protocol):
    """What the supervisor needs from an engine."""

    @property
    def kind(self) -> str:
        """The engine's name, as the replica config spells it (``rc.engine``)."""

    @property
    def model(self) -> str | None:
        """The model id the replica will report in ``/v1/models`` (None: learnt when it answers)."""

    @property
    def ready_timeout(self) -> float:
        """Seconds a fresh process may take to answer its health check 200 (model load)."""

    def launch(self, port: int, host: str = "127.0.0.1") -> Launch:
        """The process that serves on ``host:port``."""


def http_url(host: str, port: int) -> str:
    """The base URL of a server on ``host:port`` (IPv6 literals in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
