"""The simulator: ``python -m fortress.sim``, a simulated replica for tests and drills. Never a model."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Self

from fortress.config import LocalOptions, SimOptions, SimReplicaConfig
from fortress.engines.base import Launch, http_url

READY_TIMEOUT = 30.0
DEFAULT_MODEL = "sim-model"
# The simulator's own flags: SimOptions' fields beyond the common ones (model has its own flag).
SIM_FLAGS: tuple[str, ...] = tuple(
    name for name in SimOptions.model_fields if name not in LocalOptions.model_fields and name != "model"
)


def _flag_value(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # 1.0 -> "1": as written in the config
    return str(v)


@dataclass(frozen=True)
class SimEngine:
    """``python -m fortress.sim`` with the options that are set passed as ``--kebab-case VALUE``;
    ``options.binary`` replaces the Python interpreter."""

    kind: str
    options: SimOptions
    sim_model: str

    @classmethod
    def from_config(cls, rc: SimReplicaConfig, pool_model: str | None = None) -> Self:
        """``pool_model`` is the model served unless ``options.model`` names one."""
        model = rc.options.model or pool_model or DEFAULT_MODEL
        return cls(kind=rc.engine, options=rc.options, sim_model=model)

    @property
    def python(self) -> str:
        return self.options.binary or sys.executable

    @property
    def model(self) -> str:
        return self.sim_model

    @property
    def ready_timeout(self) -> float:
        return self.options.ready_timeout or READY_TIMEOUT

    def launch(self, port: int, host: str = "127.0.0.1") -> Launch:
        o = self.options
        argv = [self.python, "-m", "fortress.sim", "--host", host, "--port", str(port)]
        argv += ["--model", self.sim_model]
        for name in SIM_FLAGS:
            value = getattr(o, name)
            if value is not None:
                argv += ["--" + name.replace("_", "-"), _flag_value(value)]
        argv.extend(o.extra_args)
        return Launch(tuple(argv), dict(o.env), http_url(host, port))
