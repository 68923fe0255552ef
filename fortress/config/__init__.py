"""The one typed model of ``fortress.yaml``.

Nothing else in Fortress parses configuration. One schema module per feature (``server``,
``routing``, ``engines``, ``fleet``, ``access``, ``audit``, ``observe``) and the ``loader`` (YAML with line
numbers, ``FORTRESS__*`` environment overrides). Every public name is re-exported here, so
``from fortress.config import X`` is all a user needs. This package imports nothing else of
Fortress.
"""

from fortress.config.access import Auth, Limits, UsagePlan
from fortress.config.audit import Audit, Database
from fortress.config.base import NAME_PATTERN, TIER_ORDER, ConfigModel, Tier, seconds
from fortress.config.deploy import (
    AwsDeploy,
    Deploy,
    DeployArchive,
    DeployBudget,
    DeployCost,
    DeployDomain,
    DeployGateway,
    DeployPool,
    DeployPostgres,
    DeployRedis,
    DeployVolume,
    DeployVpc,
)
from fortress.config.engines import (
    ENGINE_NAMES,
    LOCAL_ENGINES,
    LOCAL_REPLICA_CLASSES,
    REPLICA_CLASSES,
    BedrockOptions,
    BedrockReplicaConfig,
    ExternalReplicaConfig,
    LlamaCppOptions,
    LlamaCppReplicaConfig,
    LocalOptions,
    LocalReplicaConfig,
    ReplicaConfig,
    ReplicaConfigBase,
    SimOptions,
    SimReplicaConfig,
    VllmOptions,
    VllmReplicaConfig,
)
from fortress.config.example import EXAMPLE_CONFIG
from fortress.config.fleet import AwsFleet, FleetConfig, FleetSchedule, FleetTarget
from fortress.config.loader import (
    ENV_PREFIX,
    ConfigError,
    FortressConfig,
    build_config,
    load_config,
    parse_config,
)
from fortress.config.observe import (
    AccessLog,
    AlarmMetric,
    AlarmNotify,
    AlarmRule,
    Alarms,
    Observe,
    default_alarm_rules,
)
from fortress.config.routing import HealthCheck, OutlierDetection, PoolConfig, Routing
from fortress.config.server import Server, Timeouts

__all__ = [
    "ENGINE_NAMES",
    "ENV_PREFIX",
    "EXAMPLE_CONFIG",
    "LOCAL_ENGINES",
    "LOCAL_REPLICA_CLASSES",
    "NAME_PATTERN",
    "REPLICA_CLASSES",
    "TIER_ORDER",
    "AccessLog",
    "AlarmMetric",
    "AlarmNotify",
    "AlarmRule",
    "Alarms",
    "Audit",
    "Auth",
    "AwsDeploy",
    "AwsFleet",
    "BedrockOptions",
    "BedrockReplicaConfig",
    "ConfigError",
    "ConfigModel",
    "Database",
    "Deploy",
    "DeployArchive",
    "DeployBudget",
    "DeployCost",
    "DeployDomain",
    "DeployGateway",
    "DeployPool",
    "DeployPostgres",
    "DeployRedis",
    "DeployVolume",
    "DeployVpc",
    "ExternalReplicaConfig",
    "FleetConfig",
    "FleetSchedule",
    "FleetTarget",
    "FortressConfig",
    "HealthCheck",
    "Limits",
    "LlamaCppOptions",
    "LlamaCppReplicaConfig",
    "LocalOptions",
    "LocalReplicaConfig",
    "Observe",
    "OutlierDetection",
    "PoolConfig",
    "ReplicaConfig",
    "ReplicaConfigBase",
    "Routing",
    "Server",
    "SimOptions",
    "SimReplicaConfig",
    "Tier",
    "Timeouts",
    "UsagePlan",
    "VllmOptions",
    "VllmReplicaConfig",
    "build_config",
    "default_alarm_rules",
    "load_config",
    "parse_config",
    "seconds",
]
