"""Fortress itself: an ECS Fargate service behind an internet-facing ALB, its secrets and its config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from aws_cdk import Duration, IgnoreMode, Stack
from aws_cdk import aws_certificatemanager as acm
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from fortress.config import BedrockReplicaConfig, FortressConfig, VllmReplicaConfig
from fortress.config.engines import LOCAL_ENGINES
from fortress.deploy.aws.errors import DeployError
from fortress.deploy.aws.model_pools import ModelPools, pool_name
from fortress.deploy.aws.nag import SECRET_KEY_REASON, skip_checkov
from fortress.deploy.aws.state import Postgres, Redis

GATEWAY_PORT = 8080
CONTAINER = "fortress"  # the task's one container
# blue_green: the public ALB's test listener, which reaches the new tasks before any client does.
# No security group rule opens it: an operator who wants to try the new tasks adds one for
# their own address.
TEST_PORT_HTTPS = 8443
TEST_PORT_HTTP = 8080
CONFIG_PATH = "/var/lib/fortress/fortress.yaml"
# Only what the Dockerfile copies goes into the image asset (the rest of a checkout can be large).
ASSET_EXCLUDE = [
    "*", "!Dockerfile", "!pyproject.toml", "!README.md", "!fortress", "**/__pycache__", "**/*.pyc",
]  # fmt: skip
# The container writes the config from its SSM parameter, and database and Redis URLs from
# their secrets, then execs the gateway (PID 1 keeps SIGTERM and SIGHUP).
PREPARE = (
    'printf "%s" "$FORTRESS_CONFIG_YAML" > ' + CONFIG_PATH + "; "
    'if [ -n "${DB_HOST:-}" ]; then export FORTRESS__DATABASE__URL='
    '"postgresql+psycopg://$DB_USER:$DB_PASSWORD@$DB_HOST:$DB_PORT/fortress"; fi; '
    'if [ -n "${REDIS_HOST:-}" ]; then export FORTRESS__LIMITS__BACKEND=redis '
    'FORTRESS__LIMITS__REDIS_URL="rediss://:$REDIS_TOKEN@$REDIS_HOST:$REDIS_PORT/0"; fi; '
)
START = PREPARE + "exec fortress serve -c " + CONFIG_PATH
# With local replicas left in the deployed config (Bedrock adapters), `fortress up` starts them
# beside the gateway (`serve` refuses local engines). -q: no progress display; stderr is no
# terminal in a task, so `up` creates no first key there (keys come from `fortress keys create`).
START_WITH_REPLICAS = PREPARE + "exec fortress up -q -c " + CONFIG_PATH
# The local engines a gateway task can run: the Bedrock adapter is Python in the image; vLLM and
# llama.cpp need machines of their own (a pool in deploy.aws.pools).
TASK_ENGINES = frozenset({"bedrock"})
# Cross-region inference profile ids carry a geography prefix before the model id.
PROFILE_PREFIXES = ("us.", "eu.", "apac.", "us-gov.", "global.")


def repo_root() -> Path | None:
    """The checkout with the Dockerfile the gateway image is built from, if this is one."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "Dockerfile").is_file() and (root / "fortress").is_dir() else None


def gateway_config(config: FortressConfig, pools: ModelPools, archive_bucket: str | None) -> str:
    """The config the deployed gateway serves: the same one, with each deployed pool's vLLM replicas
    replaced by the internal ALB's port for their tier, and without secrets or the deploy section.

    Other replicas stay as they are: external URLs, and Bedrock adapters the task starts itself.
    Any other local engine left (vLLM in a pool ``deploy.aws.pools`` does not name) is an error.
    """
    data: dict[str, Any] = config.model_dump(mode="json", exclude_unset=True)
    data.pop("deploy", None)
    data.pop("state_dir", None)
    data.get("server", {}).pop("admin_token", None)  # from Secrets Manager, never in the parameter
    data.get("auth", {}).pop("secret", None)
    data.setdefault("server", {})["host"] = "0.0.0.0"
    data["server"]["port"] = GATEWAY_PORT
    if archive_bucket is not None:
        data.setdefault("audit", {})["archive_dir"] = f"s3://{archive_bucket}/audit"
    endpoints = {p.name: p for p in pools.pools}
    for i, pool in enumerate(config.pools):
        deployed = endpoints.get(pool_name(pool))
        if deployed is None or not deployed.endpoints:
            continue
        assert pools.lb is not None
        dns = pools.lb.load_balancer_dns_name
        # A Bedrock tier behind the deployed vLLM tiers (or an external one) is kept.
        kept = [
            data["pools"][i]["replicas"][j]
            for j, rc in enumerate(pool.replicas)
            if not isinstance(rc, VllmReplicaConfig)
        ]
        data["pools"][i]["replicas"] = [
            {"engine": "external", "tier": ep.tier.value, "url": f"http://{dns}:{ep.port}"}
            for ep in deployed.endpoints
        ] + kept
    unrunnable = [
        f"pools[{i}] ({pool.get('model') or pool.get('name') or 'any model'}): engine {r['engine']}"
        for i, pool in enumerate(data.get("pools", []))
        for r in pool.get("replicas", [])
        if r.get("engine") in LOCAL_ENGINES and r.get("engine") not in TASK_ENGINES
    ]
    if unrunnable:
        raise DeployError(
            "the gateway task cannot start these local replicas ("
            + "; ".join(unrunnable)
            + "): name the pool in deploy.aws.pools (its own instances), or use engine: external"
        )
    return yaml.safe_dump(data, sort_keys=False)


def has_local_replicas(config: FortressConfig) -> bool:
    """Whether the deployed gateway starts replicas itself (Bedrock adapters): ``up``, not ``serve``."""
    return bool(bedrock_replicas(config))


def bedrock_replicas(config: FortressConfig) -> list[BedrockReplicaConfig]:
    """The Bedrock replicas the deployed gateway config keeps: all of them (a deployed pool keeps
    its Bedrock tier too, see :func:`gateway_config`)."""
    return [rc for p in config.pools for rc in p.replicas if isinstance(rc, BedrockReplicaConfig)]


def bedrock_arns(model_id: str, region: str, partition: str, account: str) -> list[str]:
    """What ``bedrock:InvokeModel*`` must allow for one ``model_id`` in ``region``.

    A foundation model id: its ARN there. A cross-region inference profile id (``us.``, ``eu.``,
    ...): the profile's ARN, and the model in every region the profile may route to (IAM checks
    both). An ARN is taken as it is.
    """
    if model_id.startswith("arn:"):
        return [model_id]
    if model_id.startswith(PROFILE_PREFIXES):
        base = model_id.split(".", 1)[1]
        return [
            f"arn:{partition}:bedrock:{region}:{account}:inference-profile/{model_id}",
            f"arn:{partition}:bedrock:*::foundation-model/{base}",
        ]
    return [f"arn:{partition}:bedrock:{region}::foundation-model/{model_id}"]


class Gateway(Construct):
    """The gateway service, its public ALB, secrets, config parameter and permissions."""

    def __init__(
        self,
        scope: Construct,
        cid: str,
        config: FortressConfig,
        vpc: ec2.IVpc,
        pools: ModelPools,
        archive: s3.IBucket,
        logs_bucket: s3.IBucket,
        postgres: Postgres | None,
        redis: Redis | None,
        logs_key: kms.IKey,
    ) -> None:
        super().__init__(scope, cid)
        aws = config.deploy.aws
        assert aws is not None
        g = aws.gateway
        stack = Stack.of(self)

        self.server_secret = secretsmanager.Secret(
            self,
            "ServerSecret",
            description="Fortress server secret (API key hashing, audit chain)",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                exclude_punctuation=True, password_length=64
            ),
        )
        self.admin_token = secretsmanager.Secret(
            self,
            "AdminToken",
            description="Fortress admin token (Authorization: Bearer on /admin)",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                exclude_punctuation=True, password_length=48
            ),
        )
        for secret in (self.server_secret, self.admin_token):
            skip_checkov(secret, {"CKV_AWS_149": SECRET_KEY_REASON})
        text = gateway_config(config, pools, archive.bucket_name)
        self.config_parameter = ssm.StringParameter(
            self,
            "Config",
            description="fortress.yaml of the gateway service",
            string_value=text,
            # Standard parameters hold 4 KB; larger configs need the advanced tier (8 KB).
            tier=ssm.ParameterTier.ADVANCED if len(text) > 3500 else ssm.ParameterTier.STANDARD,
        )

        insights = ecs.ContainerInsights.ENABLED
        self.cluster = ecs.Cluster(self, "Cluster", vpc=vpc, container_insights_v2=insights)
        task = ecs.FargateTaskDefinition(self, "Task", cpu=g.cpu, memory_limit_mib=g.memory)
        if g.image is not None:
            image = ecs.ContainerImage.from_registry(g.image)
        else:
            root = repo_root()
            if root is None:
                raise DeployError(
                    "deploy.aws.gateway.image is unset and there is no Dockerfile to build the gateway "
                    "from: set an image, or run from a Fortress checkout"
                )
            # Hashed at synth, built and pushed by `cdk deploy` (Docker is needed there, not here).
            image = ecs.ContainerImage.from_asset(
                str(root), exclude=ASSET_EXCLUDE, ignore_mode=IgnoreMode.DOCKER, build_args={"EMBEDDED": "0"}
            )
        log_group = logs.LogGroup(
            self, "Logs", retention=logs.RetentionDays.THREE_MONTHS, encryption_key=logs_key
        )
        secrets = {
            "FORTRESS_CONFIG_YAML": ecs.Secret.from_ssm_parameter(self.config_parameter),
            "FORTRESS__AUTH__SECRET": ecs.Secret.from_secrets_manager(self.server_secret),
            "FORTRESS__SERVER__ADMIN_TOKEN": ecs.Secret.from_secrets_manager(self.admin_token),
        }
        env = {"AWS_REGION": stack.region}
        if postgres is not None:
            secrets["DB_USER"] = ecs.Secret.from_secrets_manager(postgres.secret, "username")
            secrets["DB_PASSWORD"] = ecs.Secret.from_secrets_manager(postgres.secret, "password")
            env["DB_HOST"] = postgres.instance.db_instance_endpoint_address
            env["DB_PORT"] = postgres.instance.db_instance_endpoint_port
        if redis is not None:
            secrets["REDIS_TOKEN"] = ecs.Secret.from_secrets_manager(redis.auth)
            env["REDIS_HOST"] = redis.group.attr_primary_end_point_address
            env["REDIS_PORT"] = redis.group.attr_primary_end_point_port
        task.add_container(
            CONTAINER,
            image=image,
            entry_point=["/bin/sh", "-c"],
            command=[START_WITH_REPLICAS if has_local_replicas(config) else START],
            port_mappings=[ecs.PortMapping(container_port=GATEWAY_PORT)],
            logging=ecs.LogDrivers.aws_logs(stream_prefix="fortress", log_group=log_group),
            environment=env,
            secrets=secrets,
            stop_timeout=Duration.seconds(60),
        )
        archive.grant_read_write(task.task_role)
        self._fleet_permissions(task.task_role, pools)
        self._bedrock_permissions(task.task_role, bedrock_replicas(config))

        self.task = task
        self.blue_green = g.deployment == "blue_green"
        self.security_group = ec2.SecurityGroup(self, "ServiceSg", vpc=vpc, description="Fortress tasks")
        self.service = ecs.FargateService(
            self,
            "Service",
            cluster=self.cluster,
            task_definition=task,
            desired_count=g.min_tasks,
            min_healthy_percent=100,
            max_healthy_percent=200,
            # blue_green: CodeDeploy replaces the tasks (see blue_green.py); ECS's circuit breaker
            # works only with ECS's own rolling deployments.
            deployment_controller=ecs.DeploymentController(type=ecs.DeploymentControllerType.CODE_DEPLOY)
            if self.blue_green
            else None,
            circuit_breaker=None
            if self.blue_green
            else ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
            security_groups=[self.security_group],
            vpc_subnets=ec2.SubnetSelection(subnet_group_name="private"),
            enable_execute_command=False,
        )
        scaling = self.service.auto_scale_task_count(min_capacity=g.min_tasks, max_capacity=g.max_tasks)
        scaling.scale_on_cpu_utilization("Cpu", target_utilization_percent=g.cpu_target)
        scaling.scale_on_memory_utilization("Memory", target_utilization_percent=g.memory_target)

        # Who reaches whom: the ALB the tasks, the tasks the model servers and the state.
        if pools.lb_sg is not None:
            pools.lb_sg.add_ingress_rule(
                self.security_group, ec2.Port.tcp_range(8001, 8999), "the gateway to the model tiers"
            )
        if pools.security_group is not None:
            pools.security_group.add_ingress_rule(
                self.security_group, ec2.Port.tcp(8000), "the gateway to fleet instances"
            )
        self.bedrock_endpoint = self._bedrock_endpoint(config, vpc)
        if postgres is not None:
            postgres.security_group.add_ingress_rule(
                self.security_group, ec2.Port.tcp(postgres.instance.instance_endpoint.port), "the gateway"
            )
        if redis is not None:
            redis.security_group.add_ingress_rule(self.security_group, ec2.Port.tcp(6379), "the gateway")

        # The production listener (HTTPS with a domain, else HTTP) and its target group; with
        # blue_green also the test listener and the second ("green") target group.
        self.listener: elbv2.ApplicationListener
        self.target_group: elbv2.ApplicationTargetGroup
        self.test_listener: elbv2.ApplicationListener | None = None
        self.green_target_group: elbv2.ApplicationTargetGroup | None = None
        self.lb = self._public_load_balancer(config, vpc, logs_bucket)

    def _bedrock_permissions(self, role: iam.IRole, replicas: list[BedrockReplicaConfig]) -> None:
        """Invoke exactly the models (or inference profiles) the config names, nothing else."""
        if not replicas:
            return
        stack = Stack.of(self)
        arns: list[str] = []
        for rc in replicas:
            region = rc.options.region or stack.region
            for arn in bedrock_arns(rc.options.model_id, region, stack.partition, stack.account):
                if arn not in arns:
                    arns.append(arn)
        role.add_to_principal_policy(
            iam.PolicyStatement(
                sid="InvokeConfiguredBedrockModels",
                actions=["bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"],
                resources=arns,
            )
        )

    def _bedrock_endpoint(self, config: FortressConfig, vpc: ec2.IVpc) -> ec2.InterfaceVpcEndpoint | None:
        """``bedrock-runtime`` inside the VPC when a replica calls Bedrock in the stack's region:
        the adapters reach it without NAT (Bedrock in another region still goes out through NAT)."""
        stack = Stack.of(self)
        regions = {rc.options.region or stack.region for rc in bedrock_replicas(config)}
        if stack.region not in regions:
            return None
        endpoint = ec2.InterfaceVpcEndpoint(
            self,
            "BedrockRuntime",
            vpc=vpc,
            service=ec2.InterfaceVpcEndpointAwsService.BEDROCK_RUNTIME,
            subnets=ec2.SubnetSelection(subnet_group_name="private"),
            private_dns_enabled=True,  # the adapters' default endpoint name resolves to it
            open=False,
        )
        endpoint.connections.allow_default_port_from(self.security_group, "the gateway's Bedrock adapters")
        return endpoint

    def _fleet_permissions(self, role: iam.IRole, pools: ModelPools) -> None:
        names = [n for p in pools.pools for n in p.fleet_groups]
        if not names:
            return
        stack = Stack.of(self)
        arns = [
            f"arn:{stack.partition}:autoscaling:{stack.region}:{stack.account}:autoScalingGroup:*:"
            f"autoScalingGroupName/{n}"
            for n in names
        ]
        role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=[
                    "autoscaling:SetDesiredCapacity",
                    "autoscaling:TerminateInstanceInAutoScalingGroup",
                    "autoscaling:CompleteLifecycleAction",
                ],
                resources=arns,
            )
        )
        # Describe and metric reads have no resource-level permissions in IAM.
        role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=[
                    "autoscaling:DescribeAutoScalingGroups",
                    "autoscaling:DescribeScalingActivities",
                    "ec2:DescribeInstances",
                    "cloudwatch:GetMetricData",
                ],
                resources=["*"],
            )
        )

    def _public_load_balancer(
        self, config: FortressConfig, vpc: ec2.IVpc, logs_bucket: s3.IBucket
    ) -> elbv2.ApplicationLoadBalancer:
        aws = config.deploy.aws
        assert aws is not None
        sg = ec2.SecurityGroup(self, "LbSg", vpc=vpc, description="Fortress public ALB")
        skip_checkov(
            sg,
            {
                "CKV_AWS_260": "The public ALB's port 80: the HTTP listener without a domain, or with "
                "one only a 301 to HTTPS; clients reach the gateway from the internet by design."
            },
        )
        lb = elbv2.ApplicationLoadBalancer(
            self,
            "Lb",
            vpc=vpc,
            internet_facing=True,
            security_group=sg,
            drop_invalid_header_fields=True,
            # The ALB must outwait the gateway's own wait for a replica's first byte or next chunk.
            idle_timeout=Duration.seconds(
                min(4000, round(max(config.timeouts.first_byte, config.timeouts.idle)) + 5)
            ),
        )
        lb.log_access_logs(logs_bucket, prefix="gateway-lb")
        health = elbv2.HealthCheck(
            path="/health",
            interval=Duration.seconds(10),
            timeout=Duration.seconds(5),
            healthy_threshold_count=2,
            unhealthy_threshold_count=2,
            healthy_http_codes="200",
        )
        if aws.domain is not None:
            sg.add_ingress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "HTTPS from clients")
            sg.add_ingress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(80), "HTTP, answered 301 to HTTPS")
            cert = acm.Certificate.from_certificate_arn(self, "Cert", aws.domain.certificate_arn)
            https = lb.add_listener(
                "Https",
                port=443,
                protocol=elbv2.ApplicationProtocol.HTTPS,
                certificates=[elbv2.ListenerCertificate.from_certificate_manager(cert)],
                ssl_policy=elbv2.SslPolicy.RECOMMENDED_TLS,  # TLS 1.3 and 1.2 only
                open=False,
            )
            self.listener = https
            self.target_group = https.add_targets(
                "Gateway",
                port=GATEWAY_PORT,
                protocol=elbv2.ApplicationProtocol.HTTP,
                targets=[self.service],
                health_check=health,
                deregistration_delay=Duration.seconds(30),
            )
            lb.add_redirect(source_port=80, target_port=443)
            if self.blue_green:
                test = lb.add_listener(
                    "TestHttps",
                    port=TEST_PORT_HTTPS,
                    protocol=elbv2.ApplicationProtocol.HTTPS,
                    certificates=[elbv2.ListenerCertificate.from_certificate_manager(cert)],
                    ssl_policy=elbv2.SslPolicy.RECOMMENDED_TLS,
                    open=False,
                    default_target_groups=[self._green(vpc, health)],
                )
                self.test_listener = test
        else:
            # No domain, no certificate: HTTP only (docs/deploy.md says to add a domain).
            sg.add_ingress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(80), "HTTP from clients")
            http = lb.add_listener("Http", port=80, protocol=elbv2.ApplicationProtocol.HTTP, open=False)
            no_cert = (
                "No deploy.aws.domain, so no certificate to serve HTTPS with; with a domain this "
                "listener is HTTPS (TLS 1.2 and 1.3 only) and port 80 only redirects."
            )
            skip_checkov(http, {"CKV_AWS_2": no_cert, "CKV_AWS_103": no_cert})
            self.listener = http
            self.target_group = http.add_targets(
                "Gateway",
                port=GATEWAY_PORT,
                protocol=elbv2.ApplicationProtocol.HTTP,
                targets=[self.service],
                health_check=health,
                deregistration_delay=Duration.seconds(30),
            )
            if self.blue_green:
                test = lb.add_listener(
                    "TestHttp",
                    port=TEST_PORT_HTTP,
                    protocol=elbv2.ApplicationProtocol.HTTP,
                    open=False,
                    default_target_groups=[self._green(vpc, health)],
                )
                skip_checkov(test, {"CKV_AWS_2": no_cert, "CKV_AWS_103": no_cert})
                self.test_listener = test
        return lb

    def _green(self, vpc: ec2.IVpc, health: elbv2.HealthCheck) -> elbv2.ApplicationTargetGroup:
        """The second target group of a blue/green deployment: CodeDeploy registers the new tasks
        in it, and it sits behind the test listener so that it belongs to the load balancer."""
        self.green_target_group = elbv2.ApplicationTargetGroup(
            self,
            "GatewayGreen",
            vpc=vpc,
            port=GATEWAY_PORT,
            protocol=elbv2.ApplicationProtocol.HTTP,
            target_type=elbv2.TargetType.IP,
            health_check=health,
            deregistration_delay=Duration.seconds(30),
        )
        return self.green_target_group
