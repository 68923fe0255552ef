"""What every schema module shares: the frozen base model, durations, names, tiers."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, ConfigDict

# Names of pools and replicas: they appear in metric labels, log file names and URLs.
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class ConfigModel(BaseModel):
    """A section of ``fortress.yaml``: immutable, and unknown keys are errors (typos fail loudly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def replace(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` applied.

        Unlike ``model_copy(update=...)``, which skips validation, every field and model
        validator runs again, so an invalid value raises ``pydantic.ValidationError``.
        """
        data = {k: getattr(self, k) for k in type(self).model_fields}
        return type(self).model_validate({**data, **changes})


def seconds(v: Any) -> Any:
    """Durations as numbers of seconds or strings like ``"250ms"``, ``"90s"``, ``"3m"``, ``"1h"``.

    Anything else is returned unchanged for the field's own validation to judge.
    """
    if isinstance(v, str):
        s = v.strip().lower()
        for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
            if s.endswith(suffix) and s[: -len(suffix)].replace(".", "", 1).isdigit():
                return float(s[: -len(suffix)]) * mult
    return v


def _http(v: str) -> str:
    if not v.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return v.rstrip("/")


# A URL Fortress calls (a replica, an AWS endpoint): http or https, without a trailing slash.
HttpUrl = Annotated[str, AfterValidator(_http)]


class Tier(StrEnum):
    """Replica tiers, highest first: traffic goes to the highest tier with a healthy replica."""

    # Defined here rather than in routing.py: replica configs (engines.py) and pools (routing.py)
    # both need it, and routing.py imports engines.py.
    PRIMARY = "primary"
    SECONDARY = "secondary"
    STANDBY = "standby"


TIER_ORDER: tuple[Tier, ...] = (Tier.PRIMARY, Tier.SECONDARY, Tier.STANDBY)
