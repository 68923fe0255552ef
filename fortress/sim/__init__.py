"""The replica simulator: an OpenAI-compatible server for tests, load and chaos drills.

A TEST TOOL, NEVER A MODEL: it answers placeholder tokens on a configurable schedule and
misbehaves on request (see ``fortress.sim.server``). Run it with ``fortress sim`` or
``python -m fortress.sim``. It imports nothing else of Fortress, so the engines that launch it
and the tests that drive it depend on it, never the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fortress.sim.server import SimSettings, build_app, run

__all__ = ["SimSettings", "build_app", "run"]


def __getattr__(name: str) -> Any:
    # Lazy: `fortress.cli.main` imports fortress.sim.command at startup, and loading aiohttp for
    # every `fortress` invocation would slow the whole CLI down.
    if name in __all__:
        from fortress.sim import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
