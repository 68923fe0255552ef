"""The whole config, and the one way in: YAML or a plain mapping, env overrides, clear errors.

``load_config`` reads the YAML, applies ``FORTRESS__SECTION__KEY`` environment overrides and
validates the result; a ``ConfigError`` names every bad key together with the file line it
came from. ``build_config`` does the same for a mapping built in code (no lines to name).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from fortress.config.access import OPERATOR_PLAN, Auth, Limits, UsagePlan, default_plans, operator_plan
from fortress.config.audit import Audit, Database
from fortress.config.base import ConfigModel
from fortress.config.deploy import Deploy
from fortress.config.engines import ENGINE_NAMES
from fortress.config.observe import Observe
from fortress.config.routing import PoolConfig, Routing
from fortress.config.server import Server, Timeouts

ENV_PREFIX = "FORTRESS__"
# The config file every command uses when not given ``-c``; then ./fortress.yaml if present.
CONFIG_ENV = "FORTRESS_CONFIG"
CONFIG_FILE = "fortress.yaml"

Loc = tuple[str | int, ...]


class FortressConfig(ConfigModel):
    """The whole of ``fortress.yaml``."""

    server: Server = Field(default_factory=Server)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    routing: Routing = Field(default_factory=Routing)
    pools: list[PoolConfig] = Field(default_factory=list)
    state_dir: str = Field(".fortress", description="local state: secret, journal, SQLite, logs")
    auth: Auth = Field(default_factory=Auth)
    plans: dict[str, UsagePlan] = Field(default_factory=default_plans)
    limits: Limits = Field(default_factory=Limits)
    audit: Audit = Field(default_factory=Audit)
    database: Database = Field(default_factory=Database)
    observe: Observe = Field(default_factory=Observe)
    deploy: Deploy = Field(default_factory=Deploy)

    @field_validator("plans")
    @classmethod
    def _operator_plan(cls, plans: dict[str, UsagePlan]) -> dict[str, UsagePlan]:
        # Built in: present whatever else the config defines, unless it defines its own.
        if OPERATOR_PLAN not in plans:
            plans = {**plans, OPERATOR_PLAN: operator_plan()}
        return plans

    @field_validator("pools")
    @classmethod
    def _names_unique(cls, pools: list[PoolConfig]) -> list[PoolConfig]:
        # Model names route requests; pool and replica names label metrics and status: each
        # must mean one thing.
        models: dict[str, int] = {}
        pool_names: dict[str, int] = {}
        replicas: dict[str, str] = {}
        for i, pool in enumerate(pools):
            for name in ([pool.model] if pool.model else []) + list(pool.aliases):
                if name in models:
                    raise ValueError(f"model name {name!r} is used by pools {models[name]} and {i}")
                models[name] = i
            if pool.name is not None:
                if pool.name in pool_names:
                    first = pool_names[pool.name]
                    raise ValueError(f"pool name {pool.name!r} is used by pools {first} and {i}")
                pool_names[pool.name] = i
            for j, rc in enumerate(pool.replicas):
                if rc.name is not None:
                    where = f"pools.{i}.replicas.{j}"
                    if rc.name in replicas:
                        first = replicas[rc.name]
                        raise ValueError(f"replica name {rc.name!r} is used by {first} and {where}")
                    replicas[rc.name] = where
        return pools

    @model_validator(mode="after")
    def _alarm_actions_name_alarms(self) -> Self:
        # A fleet's scale_out_on_alarms must name alarms that exist (and are evaluated).
        names = {r.name for r in self.observe.alarms.rules}
        for i, pool in enumerate(self.pools):
            wanted = pool.fleet.scale_out_on_alarms if pool.fleet is not None else None
            if not wanted:
                continue  # None: the scale_up alarms, whichever exist
            unknown = [n for n in wanted if n not in names]
            if unknown:
                raise ValueError(
                    f"pools.{i}.fleet.scale_out_on_alarms names no alarm: {', '.join(unknown)} "
                    f"(alarms: {', '.join(sorted(names)) or 'none'})"
                )
            if not (self.observe.enabled and self.observe.alarms.enabled):
                raise ValueError(f"pools.{i}.fleet.scale_out_on_alarms needs observe.alarms enabled")
        return self

    @model_validator(mode="after")
    def _deployed_pools_exist(self) -> Self:
        # deploy.aws.pools names pools of this config, each with model servers to deploy.
        aws = self.deploy.aws
        if aws is None:
            return self
        by_name = {p.name or p.model or "default": p for p in self.pools}
        for name, dp in aws.pools.items():
            pool = by_name.get(name)
            if pool is None:
                raise ValueError(
                    f"deploy.aws.pools.{name}: no pool is named {name!r} "
                    f"(pools: {', '.join(sorted(by_name)) or 'none'})"
                )
            vllm = [r for r in pool.replicas if r.engine == "vllm"]
            fleet = pool.fleet is not None and pool.fleet.provider == "aws"
            if fleet and dp.vllm is None:
                raise ValueError(
                    f"deploy.aws.pools.{name}: a pool with an aws fleet has no replicas: give `vllm:` "
                    "(its model and flags)"
                )
            if not fleet and not vllm:
                raise ValueError(
                    f"deploy.aws.pools.{name}: the pool has neither engine: vllm replicas nor an "
                    "aws fleet: nothing to run on EC2"
                )
            if fleet and dp.stickiness is not None:
                # ALB stickiness needs a target group; the gateway routes to a fleet's instances
                # itself, so the session must be kept by the gateway's own balancer.
                raise ValueError(
                    f"deploy.aws.pools.{name}.stickiness: the gateway routes to an aws fleet's instances "
                    "itself, not through a target group: keep sessions with the pool's "
                    "`balancer: session` (a header, or a cookie with `session: {source: cookie, ttl: 900s}`)"
                )
            if vllm and dp.vllm is not None:
                raise ValueError(f"deploy.aws.pools.{name}: `vllm:` is taken from the pool's replicas here")
        return self


class ConfigError(Exception):
    """A config that cannot be used; the message names each bad key and its line."""


def _line_index(text: str) -> dict[Loc, int]:
    """Map each key path in the YAML document to its 1-based line number."""
    index: dict[Loc, int] = {}

    def walk(node: yaml.Node, path: Loc) -> None:
        index.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, key_node.value)
                index[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return index


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """Apply ``FORTRESS__SERVER__PORT=9000``-style overrides (values parsed as YAML scalars).

    ``data`` may hold config objects (``build_config``): one on an override's path is turned
    into a mapping, so the override lands in it and it is validated again with the rest.
    """
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        node: Any = data
        for part in parts[:-1]:
            key: str | int = int(part) if isinstance(node, list) else part
            child = node[key] if isinstance(node, list) else node.setdefault(part, {})
            if isinstance(child, BaseModel):
                child = child.model_dump(by_alias=True)  # all fields: `engine` picks the class
                node[key] = child
            node = child
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value


def _clean_loc(loc: Loc) -> Loc:
    """Drop the union tags pydantic puts in the location of a replica's errors
    (``pools.0.replicas.0.llamacpp.options`` → ``pools.0.replicas.0.options``)."""
    out: list[str | int] = []
    for part in loc:
        tagged = len(out) >= 2 and out[-2] == "replicas" and isinstance(out[-1], int)
        if tagged and part in ENGINE_NAMES:
            continue
        out.append(part)
    return tuple(out)


def _line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    """The line of the nearest key on ``loc`` that the document has."""
    probe = loc
    while probe:
        line = lines.get(probe)
        if line is None and isinstance(probe[-1], str):  # options may be written ctx-size
            line = lines.get((*probe[:-1], probe[-1].replace("_", "-")))
        if line is not None:
            return line
        probe = probe[:-1]
    return None


def _format_errors(err: ValidationError, lines: Mapping[Loc, int], source: str) -> str:
    out = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] == "union_tag_invalid":  # only replicas are a tagged union
            loc = (*loc, "engine")
            tag = e.get("ctx", {}).get("tag")
            msg = f"unknown engine {tag!r}; use one of: {', '.join(ENGINE_NAMES)}"
        elif e["type"] == "union_tag_not_found":
            msg = "a replica must be a mapping: {url: ...} or {engine: ..., options: ...}"
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(loc, lines)
        where = f" (line {line})" if line else ""
        out.append(f"  {key}{where}: {msg}")
    return "\n".join(out)


def _validate(
    data: dict[str, Any], source: str, env: Mapping[str, str] | None, lines: Mapping[Loc, int]
) -> FortressConfig:
    try:
        _apply_env(data, os.environ if env is None else env)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"bad {ENV_PREFIX}* override: {exc}") from exc
    try:
        return FortressConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, lines, source)) from None


def parse_config(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> FortressConfig:
    """Validate YAML text into a ``FortressConfig`` (env overrides applied; ``env`` defaults to
    the process environment)."""
    try:
        data = yaml.safe_load(text) or {}
        lines = _line_index(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {source}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping")
    return _validate(data, source, env, lines)


def build_config(
    data: Mapping[str, Any], source: str = "(built)", env: Mapping[str, str] | None = None
) -> FortressConfig:
    """Validate a mapping built in code (values may be config objects) into a ``FortressConfig``,
    with ``FORTRESS__*`` overrides applied as for a file; ``data`` itself is left unchanged."""
    return _validate(copy.deepcopy(dict(data)), source, env, {})


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> FortressConfig:
    """Read and validate ``fortress.yaml``."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from exc
    return parse_config(text, str(p), env)


def find_config(
    explicit: str | Path | None = None, env: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> tuple[Path | None, str]:
    """Which config file a command uses, and how it was found.

    In order: ``explicit`` (``-c``), else ``$FORTRESS_CONFIG``, else ``./fortress.yaml`` when it
    exists, else none (the built-in defaults). ``FORTRESS__*`` overrides apply in every case;
    they are ``load_config``'s business. Returns (path or None, one of ``"-c"``,
    ``"FORTRESS_CONFIG"``, ``"./fortress.yaml"``, ``"defaults"``).
    """
    if explicit is not None:
        return Path(explicit), "-c"
    named = (os.environ if env is None else env).get(CONFIG_ENV)
    if named:
        return Path(named), CONFIG_ENV
    local = Path(cwd if cwd is not None else ".") / CONFIG_FILE
    if local.is_file():
        return local, f"./{CONFIG_FILE}"
    return None, "defaults"
