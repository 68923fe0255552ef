"""The CDK app of one ``fortress.yaml``: one stack with every part of the deployment."""

from __future__ import annotations

from pathlib import Path

import aws_cdk as cdk
import cdk_nag
from constructs import Construct

from fortress.config import FortressConfig
from fortress.deploy.aws import keys
from fortress.deploy.aws.alarms import Alarms, AlarmTopic, Budget
from fortress.deploy.aws.archive import Archive
from fortress.deploy.aws.blue_green import BlueGreen
from fortress.deploy.aws.errors import DeployError
from fortress.deploy.aws.gateway import CONTAINER, GATEWAY_PORT, Gateway
from fortress.deploy.aws.model_pools import ModelPools
from fortress.deploy.aws.nag import suppress
from fortress.deploy.aws.network import Network
from fortress.deploy.aws.state import Postgres, Redis


class FortressStack(cdk.Stack):
    """Network, model pools, gateway service, state, archive and alarms of ``config.deploy.aws``."""

    def __init__(self, scope: Construct, config: FortressConfig) -> None:
        aws = config.deploy.aws
        assert aws is not None
        self._azs = [f"{aws.region}{letter}" for letter in "abcdef"[: aws.vpc.max_azs]]
        super().__init__(
            scope,
            aws.stack_name,
            env=cdk.Environment(account=aws.account, region=aws.region),
            description="Fortress: an OpenAI-compatible gateway in front of self-hosted models",
        )
        topic = AlarmTopic(self, "Alerts", aws).topic
        logs_key = keys.logs_key(self, "LogsKey")
        network = Network(self, "Network", aws, logs_key)
        archive = Archive(self, "Archive", aws.archive)
        pools = ModelPools(self, "Models", config, network.vpc, archive.access_logs, topic, self._azs)
        postgres = Postgres(self, "Postgres", aws.postgres, network.vpc) if aws.postgres else None
        redis = Redis(self, "Redis", aws.redis, network.vpc) if aws.redis else None
        gateway = Gateway(
            self,
            "Gateway",
            config,
            network.vpc,
            pools,
            archive.bucket,
            archive.access_logs,
            postgres,
            redis,
            logs_key,
        )
        target_groups = [
            (f"{p.name}-{ep.tier.value}", ep.target_group) for p in pools.pools for ep in p.endpoints
        ]
        alarms = Alarms(self, "Alarms", config, topic, gateway.service, gateway.lb, target_groups)
        if gateway.blue_green:
            BlueGreen(
                self,
                "GatewayDeployment",
                aws.gateway,
                gateway,
                list(alarms.errors_5xx),
                CONTAINER,
                GATEWAY_PORT,
            )
        if aws.budget is not None:
            Budget(self, "Budget", aws)
        scheme = "https" if aws.domain else "http"
        host = aws.domain.name if aws.domain else gateway.lb.load_balancer_dns_name
        cdk.CfnOutput(self, "Url", value=f"{scheme}://{host}", description="the gateway's base URL")
        cdk.CfnOutput(self, "LoadBalancerDns", value=gateway.lb.load_balancer_dns_name)
        cdk.CfnOutput(self, "AdminTokenSecret", value=gateway.admin_token.secret_arn)
        cdk.CfnOutput(self, "ArchiveBucket", value=archive.bucket.bucket_name)
        suppress(self)

    @property
    def availability_zones(self) -> list[str]:
        # Named zones rather than Fn::GetAZs (which gives only two without an account): the
        # tiers' placement (primary a, secondary b, standby c) must be fixed at synth.
        return self._azs


def build_app(
    config: FortressConfig, outdir: Path | None = None, *, nag: bool = True
) -> tuple[cdk.App, FortressStack]:
    """The app with the config's stack; ``nag`` applies cdk-nag's AWS Solutions checks at synth."""
    if config.deploy.aws is None:
        raise DeployError("the config has no deploy.aws section: nothing to deploy")
    app = cdk.App(outdir=str(outdir) if outdir is not None else None)
    stack = FortressStack(app, config)
    if nag:
        cdk.Aspects.of(app).add(cdk_nag.AwsSolutionsChecks(verbose=True))
    return app, stack
