"""The model servers: vLLM on EC2 Auto Scaling groups, one per replica entry or per fleet group.

A pool's ``engine: vllm`` replicas become one group each, in its tier's zone (primary: the
first AZ, secondary: the second, standby: the third, cold at desired 0), registered in a target
group per tier behind an internal ALB; the gateway reaches each tier at that ALB's port for it.
A pool with an aws ``fleet:`` gets the groups ``fleet.aws.groups`` names (spot, on-demand),
which the gateway's fleet sizes itself and reaches by instance address.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from aws_cdk import Duration, Stack
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from constructs import Construct

from fortress.config import DeployPool, FortressConfig, PoolConfig, Tier, VllmOptions, VllmReplicaConfig
from fortress.deploy.aws.nag import skip_checkov
from fortress.engines.vllm import VllmEngine

VLLM_PORT = 8000
# The internal ALB's port for a tier: primary 8001, secondary 8002, standby 8003 (per pool, +10).
TIER_PORT = {Tier.PRIMARY: 1, Tier.SECONDARY: 2, Tier.STANDBY: 3}
TIER_AZ = {Tier.PRIMARY: 0, Tier.SECONDARY: 1, Tier.STANDBY: 2}
DEFAULT_CACHE_DIR = "/opt/models"
# vLLM is pip-installed into its own virtual environment on the instance (the image brings the
# NVIDIA driver and CUDA); pinned so every instance of a group serves alike.
VLLM_VERSION = "0.6.6"
DATA_DEVICE = "/dev/sdf"
# The model server's secrets (``env_secrets``): fetched at boot into this root-only file, which
# vLLM's unit reads; the user data names only the secrets, never their values.
SECRETS_ENV_FILE = "/etc/fortress/vllm-secrets.env"
INTERNAL_HTTP = (
    "The internal ALB of the model servers: private subnets, reachable only from the gateway's "
    "security group; vLLM speaks plain HTTP and a private CA for TLS inside the VPC is not set up."
)


def pool_name(pool: PoolConfig) -> str:
    """The name ``deploy.aws.pools`` uses for a pool."""
    return pool.name or pool.model or "default"


def machine_image(image: str, region: str) -> ec2.IMachineImage:
    """An ``ssm:`` parameter (resolved at deploy time) or a fixed AMI id of the stack's region."""
    if image.startswith("ssm:"):
        return ec2.MachineImage.from_ssm_parameter(image[4:], os=ec2.OperatingSystemType.LINUX)
    return ec2.MachineImage.generic_linux({region: image})


def vllm_argv(options: VllmOptions, served_name: str) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` command line an instance runs: the same flags as a local replica, port 8000."""
    opts = options.model_copy(update={"binary": "/opt/vllm/bin/vllm"})
    if opts.cache_dir is None:
        opts = opts.model_copy(update={"cache_dir": DEFAULT_CACHE_DIR})
    rc = VllmReplicaConfig(engine="vllm", options=opts)
    launch = VllmEngine.from_config(rc, served_name).launch(VLLM_PORT, host="0.0.0.0")
    return list(launch.argv), dict(launch.env)


def secret_region(ref: str, region: str) -> str:
    """The region to ask for a secret: an ARN's own, else the stack's."""
    return ref.split(":")[3] if ref.startswith("arn:") else region


def fetch_secrets(secrets: dict[str, str], region: str) -> str:
    """Shell that writes each ``NAME=value`` of ``secrets`` (name -> secret ARN or name) into
    :data:`SECRETS_ENV_FILE` (0600, root) with the AWS CLI; empty without secrets.

    The Deep Learning AMI has the AWS CLI; another image without one gets it from pip. Values are
    read into a variable, never echoed (no ``set -x``), so they stay out of cloud-init's log.
    """
    if not secrets:
        return ""
    lines = [
        "# The model server's secrets, into a root-only file (0600) its unit reads.",
        "AWS=$(command -v aws || true)",
        'if [ -z "$AWS" ]; then python3 -m venv /opt/awscli && /opt/awscli/bin/pip install --quiet awscli '
        "&& AWS=/opt/awscli/bin/aws; fi",
        f"install -d -m 0700 -o root -g root {shlex.quote(str(Path(SECRETS_ENV_FILE).parent))}",
        f"(umask 077 && : > {SECRETS_ENV_FILE})",
        "fetch_secret() {  # id region: the secret's string, retried while the instance role's",
        "  local value  # credentials are not there yet",
        "  for _ in $(seq 30); do",
        '    if value=$("$AWS" secretsmanager get-secret-value --secret-id "$1" --region "$2" '
        '--query SecretString --output text); then printf "%s" "$value"; return 0; fi',
        "    sleep 10",
        "  done",
        "  return 1",
        "}",
    ]
    for name, ref in sorted(secrets.items()):
        fetched = f"$(fetch_secret {shlex.quote(ref)} {shlex.quote(secret_region(ref, region))})"
        lines.append(f'VALUE="{fetched}"')
        # systemd reads NAME=value lines; a token is one line.
        lines.append(f'printf "%s=%s\\n" {name} "$VALUE" >> {SECRETS_ENV_FILE}')
    lines.append("unset VALUE")
    return "\n".join(lines) + "\n"


def secret_arn(ref: str, partition: str, region: str, account: str) -> str:
    """What IAM must allow for one ``env_secrets`` value: an ARN as it is; a name, its secrets in
    the stack's region and account (Secrets Manager appends six random characters to the name)."""
    if ref.startswith("arn:"):
        return ref
    return f"arn:{partition}:secretsmanager:{region}:{account}:secret:{ref}-??????"


def user_data(
    options: VllmOptions, served_name: str, secrets: dict[str, str] | None = None, region: str = ""
) -> ec2.UserData:
    """Mount the cache volume, install vLLM and a systemd unit that keeps it running; with
    ``secrets`` (env var -> secret ARN or name), fetch them first into the unit's environment file."""
    argv, env = vllm_argv(options, served_name)
    cache = options.cache_dir or DEFAULT_CACHE_DIR
    unit_env = "\n".join(f"Environment={shlex.quote(f'{k}={v}')}" for k, v in sorted(env.items()))
    if secrets:
        unit_env += f"\nEnvironmentFile={SECRETS_ENV_FILE}"
    script = f"""#!/bin/bash
set -euo pipefail
# The cache volume: the EBS disk that is not the root disk (NVMe names vary by instance type).
ROOT=$(lsblk -no PKNAME "$(findmnt -no SOURCE /)")
for _ in $(seq 60); do
  DEV=$(lsblk -dpno NAME,MODEL | awk '/Elastic Block Store/ {{print $1}}' | grep -v "/dev/$ROOT$" | head -1)
  [ -n "$DEV" ] && break; sleep 5
done
blkid "$DEV" || mkfs.xfs -f "$DEV"
mkdir -p {shlex.quote(cache)}
UUID=$(blkid -s UUID -o value "$DEV")
grep -q "$UUID" /etc/fstab || echo "UUID=$UUID {cache} xfs defaults,nofail 0 2" >> /etc/fstab
mount -a
python3 -m venv /opt/vllm
/opt/vllm/bin/pip install --quiet vllm=={VLLM_VERSION}
{fetch_secrets(secrets or {}, region)}cat > /etc/systemd/system/vllm.service <<'UNIT'
[Unit]
Description=vLLM OpenAI-compatible server (Fortress model pool)
After=network-online.target local-fs.target
Wants=network-online.target

[Service]
{unit_env}
ExecStart={shlex.join(argv)}
Restart=always
RestartSec=10
TimeoutStartSec=0
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now vllm.service
"""
    return ec2.UserData.custom(script)


@dataclass
class TierEndpoint:
    """Where the gateway reaches one tier of a pool: the internal ALB's port for it."""

    tier: Tier
    port: int
    target_group: elbv2.ApplicationTargetGroup


@dataclass
class DeployedPool:
    """One pool's groups, and how the gateway reaches them."""

    name: str
    groups: list[autoscaling.AutoScalingGroup] = field(default_factory=list)
    endpoints: list[TierEndpoint] = field(default_factory=list)
    fleet_groups: list[str] = field(default_factory=list)


class ModelPools(Construct):
    """Every deployed pool's Auto Scaling groups, their instance role and security group."""

    def __init__(
        self,
        scope: Construct,
        cid: str,
        config: FortressConfig,
        vpc: ec2.IVpc,
        logs_bucket: s3.IBucket,
        topic: sns.ITopic,
        azs: list[str],
    ) -> None:
        super().__init__(scope, cid)
        aws = config.deploy.aws
        assert aws is not None
        self.vpc = vpc
        self.azs = azs
        self.region = aws.region
        self.topic = topic
        self.pools: list[DeployedPool] = []
        # No deployed pool (only Bedrock or external replicas): no instance role, group or ALB.
        self.security_group: ec2.SecurityGroup | None = None
        self.role: iam.Role | None = None
        if aws.pools:
            self.security_group = ec2.SecurityGroup(
                self,
                "InstanceSg",
                vpc=vpc,
                description="vLLM instances: port 8000 from the gateway and the ALB",
            )
            self.role = self._instance_role("InstanceRole")
        # A pool with env_secrets gets a role of its own: only its instances read its secrets.
        self.secret_roles: dict[str, iam.Role] = {}
        self.lb: elbv2.ApplicationLoadBalancer | None = None
        self.lb_sg: ec2.SecurityGroup | None = None
        by_name = {pool_name(p): p for p in config.pools}
        for index, (name, dp) in enumerate(aws.pools.items()):
            pool = by_name[name]
            deployed = DeployedPool(name)
            if pool.fleet is not None and pool.fleet.provider == "aws":
                self._fleet_groups(pool, dp, deployed)
            else:
                self._replica_groups(pool, dp, deployed, index, logs_bucket)
            self.pools.append(deployed)

    # -- instances ---------------------------------------------------------------------------------

    def _instance_role(self, cid: str) -> iam.Role:
        # Least privilege: Session Manager (no SSH, no open port 22) and the CloudWatch agent.
        return iam.Role(
            self,
            cid,
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore"),
                iam.ManagedPolicy.from_aws_managed_policy_name("CloudWatchAgentServerPolicy"),
            ],
        )

    def _role(self, name: str, dp: DeployPool) -> iam.Role:
        """The shared instance role, or for a pool with ``env_secrets`` its own, which may read
        exactly those secrets (``GetSecretValue`` alone)."""
        assert self.role is not None
        if not dp.env_secrets:
            return self.role
        if name not in self.secret_roles:
            role = self._instance_role(
                "".join(part.capitalize() for part in _ident(name).split("-")) + "InstanceRole"
            )
            stack = Stack.of(self)
            role.add_to_principal_policy(
                iam.PolicyStatement(
                    sid="ReadModelServerSecrets",
                    actions=["secretsmanager:GetSecretValue"],
                    resources=sorted(
                        {
                            secret_arn(ref, stack.partition, self.region, stack.account)
                            for ref in dp.env_secrets.values()
                        }
                    ),
                )
            )
            self.secret_roles[name] = role
        return self.secret_roles[name]

    def _launch_template(
        self, cid: str, name: str, dp: DeployPool, options: VllmOptions, served: str, spot: bool
    ) -> ec2.LaunchTemplate:
        v = dp.volume
        assert self.security_group is not None
        return ec2.LaunchTemplate(
            self,
            cid,
            machine_image=machine_image(dp.image, self.region),
            instance_type=ec2.InstanceType(dp.instance_type),
            user_data=user_data(options, served, dp.env_secrets, self.region),
            role=self._role(name, dp),
            security_group=self.security_group,
            require_imdsv2=True,
            detailed_monitoring=True,
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/sda1",
                    volume=ec2.BlockDeviceVolume.ebs(
                        150,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        encrypted=True,
                        delete_on_termination=True,
                    ),
                ),
                ec2.BlockDevice(
                    device_name=DATA_DEVICE,
                    volume=ec2.BlockDeviceVolume.ebs(
                        v.size_gb,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        iops=v.iops,
                        throughput=v.throughput,
                        encrypted=True,
                        delete_on_termination=True,
                    ),
                ),
            ],
            spot_options=ec2.LaunchTemplateSpotOptions(
                max_price=dp.spot_max_price, request_type=ec2.SpotRequestType.ONE_TIME
            )
            if spot
            else None,
        )

    def _group(
        self,
        cid: str,
        template: ec2.LaunchTemplate,
        subnets: ec2.SubnetSelection,
        *,
        min_capacity: int,
        max_capacity: int,
        desired: int | None,
        grace: float,
        elb: bool,
        name: str | None = None,
    ) -> autoscaling.AutoScalingGroup:
        hc = (
            autoscaling.HealthCheck.elb(grace=Duration.seconds(grace))
            if elb
            else autoscaling.HealthCheck.ec2(grace=Duration.seconds(grace))
        )
        return autoscaling.AutoScalingGroup(
            self,
            cid,
            vpc=self.vpc,
            vpc_subnets=subnets,
            launch_template=template,
            min_capacity=min_capacity,
            max_capacity=max_capacity,
            desired_capacity=desired,
            health_check=hc,
            auto_scaling_group_name=name,
            notifications=[autoscaling.NotificationConfiguration(topic=self.topic)],
        )

    def _served(self, pool: PoolConfig, options: VllmOptions) -> str:
        return options.served_model_name or pool.model or options.model

    # -- a pool of replicas: one group per entry, one target group per tier ------------------------

    def _load_balancer(self, logs_bucket: s3.IBucket) -> elbv2.ApplicationLoadBalancer:
        if self.lb is None:
            self.lb_sg = ec2.SecurityGroup(
                self, "ModelLbSg", vpc=self.vpc, description="internal ALB of the model servers"
            )
            self.lb = elbv2.ApplicationLoadBalancer(
                self,
                "ModelLb",
                vpc=self.vpc,
                internet_facing=False,
                security_group=self.lb_sg,
                vpc_subnets=ec2.SubnetSelection(subnet_group_name="private"),
                drop_invalid_header_fields=True,
            )
            self.lb.log_access_logs(logs_bucket, prefix="model-lb")
            assert self.security_group is not None
            self.security_group.add_ingress_rule(
                self.lb_sg, ec2.Port.tcp(VLLM_PORT), "the internal ALB to vLLM (traffic and health checks)"
            )
        return self.lb

    def _replica_groups(
        self, pool: PoolConfig, dp: DeployPool, deployed: DeployedPool, index: int, logs_bucket: s3.IBucket
    ) -> None:
        lb = self._load_balancer(logs_bucket)
        hc = pool.health_check
        for i, rc in enumerate(r for r in pool.replicas if isinstance(r, VllmReplicaConfig)):
            tier = Tier(rc.tier)
            tag = f"{deployed.name}-{tier.value}-{i}"
            cid = "".join(part.capitalize() for part in _ident(tag).split("-"))
            served = self._served(pool, rc.options)
            template = self._launch_template(
                f"{cid}Template", deployed.name, dp, rc.options, served, spot=False
            )
            az = self.azs[TIER_AZ[tier] % len(self.azs)]
            standby = tier is Tier.STANDBY
            group = self._group(
                f"{cid}Group",
                template,
                ec2.SubnetSelection(subnet_group_name="private", availability_zones=[az]),
                min_capacity=0 if standby else rc.count,
                max_capacity=rc.count,
                desired=0 if standby else rc.count,
                grace=dp.health_check_grace,
                elb=True,
            )
            tg = elbv2.ApplicationTargetGroup(
                self,
                f"{cid}Targets",
                vpc=self.vpc,
                port=VLLM_PORT,
                protocol=elbv2.ApplicationProtocol.HTTP,
                target_type=elbv2.TargetType.INSTANCE,
                targets=[group],
                deregistration_delay=Duration.seconds(round(pool.deregistration_delay)),
                health_check=elbv2.HealthCheck(
                    path=hc.path,
                    interval=Duration.seconds(round(hc.interval)),
                    timeout=Duration.seconds(round(hc.timeout)),
                    healthy_threshold_count=hc.healthy_threshold,
                    unhealthy_threshold_count=hc.unhealthy_threshold,
                    healthy_http_codes=",".join(str(s) for s in hc.expected_status),
                ),
                stickiness_cookie_duration=Duration.seconds(round(dp.stickiness)) if dp.stickiness else None,
                stickiness_cookie_name=dp.stickiness_cookie if dp.stickiness else None,
            )
            # Two entries of one tier (rare) get ports a hundred apart.
            port = VLLM_PORT + 10 * index + TIER_PORT[tier]
            while any(ep.port == port for p in [*self.pools, deployed] for ep in p.endpoints):
                port += 100
            listener = lb.add_listener(
                f"{cid}Listener",
                port=port,
                protocol=elbv2.ApplicationProtocol.HTTP,
                open=False,
                default_target_groups=[tg],
            )
            skip_checkov(listener, {"CKV_AWS_2": INTERNAL_HTTP, "CKV_AWS_103": INTERNAL_HTTP})
            deployed.groups.append(group)
            deployed.endpoints.append(TierEndpoint(tier, port, tg))

    # -- a pool with an aws fleet: the named spot and on-demand groups -----------------------------

    def _fleet_groups(self, pool: PoolConfig, dp: DeployPool, deployed: DeployedPool) -> None:
        fleet = pool.fleet
        assert fleet is not None and fleet.aws is not None and dp.vllm is not None
        served = self._served(pool, dp.vllm)
        for capacity, group_name in fleet.aws.groups.items():
            spot = capacity == "spot"
            cid = "".join(part.capitalize() for part in _ident(f"{deployed.name}-{capacity}").split("-"))
            template = self._launch_template(f"{cid}Template", deployed.name, dp, dp.vllm, served, spot=spot)
            # The fleet sets desired capacity itself; the group only bounds it.
            group = self._group(
                f"{cid}Group",
                template,
                ec2.SubnetSelection(subnet_group_name="private"),
                min_capacity=0,
                max_capacity=fleet.max_replicas,
                desired=None,
                grace=dp.health_check_grace,
                elb=False,
                name=group_name,
            )
            for j, sched in enumerate(fleet.schedules):
                group.scale_on_schedule(
                    f"Schedule{j}",
                    # Auto Scaling's recurrence is the same five-field Unix cron as the config's.
                    schedule=autoscaling.Schedule.expression(sched.cron),
                    time_zone=sched.timezone,
                    min_capacity=sched.min_replicas,
                    max_capacity=sched.max_replicas,
                )
            deployed.groups.append(group)
            deployed.fleet_groups.append(group_name)


def _ident(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)
