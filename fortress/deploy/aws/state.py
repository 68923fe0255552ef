"""Shared state for more than one gateway task: RDS PostgreSQL and ElastiCache Redis."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_elasticache as elasticache
from aws_cdk import aws_rds as rds
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from fortress.config import DeployPostgres, DeployRedis
from fortress.deploy.aws.nag import SECRET_KEY_REASON, skip_checkov

POSTGRES_PORT = 5432
REDIS_PORT = 6379
# Characters a password may not have: it goes into a database URL unquoted.
URL_UNSAFE = " %+~`#$&*()|[]{}:;<>?!'/@\"\\=,^"


class Postgres(Construct):
    """Keys, plans and the audit store: encrypted, backed up, deletion-protected, Multi-AZ when ``ha``."""

    def __init__(self, scope: Construct, cid: str, pg: DeployPostgres, vpc: ec2.IVpc) -> None:
        super().__init__(scope, cid)
        self.security_group = ec2.SecurityGroup(
            self, "Sg", vpc=vpc, description="PostgreSQL: the gateway only"
        )
        self.instance = rds.DatabaseInstance(
            self,
            "Db",
            engine=rds.DatabaseInstanceEngine.postgres(version=rds.PostgresEngineVersion.VER_16),
            instance_type=ec2.InstanceType(pg.instance_class.removeprefix("db.")),
            vpc=vpc,
            vpc_subnets=ec2.SubnetSelection(subnet_group_name="private"),
            security_groups=[self.security_group],
            credentials=rds.Credentials.from_generated_secret("fortress", exclude_characters=URL_UNSAFE),
            database_name="fortress",
            allocated_storage=pg.storage_gb,
            storage_type=rds.StorageType.GP3,
            storage_encrypted=True,
            multi_az=pg.ha,
            backup_retention=Duration.days(pg.backup_days),
            deletion_protection=True,
            removal_policy=RemovalPolicy.SNAPSHOT,
            enable_performance_insights=True,
            monitoring_interval=Duration.seconds(60),  # enhanced monitoring: OS metrics per process
            cloudwatch_logs_exports=["postgresql"],
            auto_minor_version_upgrade=True,
            port=POSTGRES_PORT,
        )
        assert self.instance.secret is not None
        self.secret: secretsmanager.ISecret = self.instance.secret
        skip_checkov(
            self.instance,
            {
                "CKV_AWS_161": "The gateway signs in with the generated password from Secrets Manager; IAM "
                "tokens expire every 15 minutes and its connection pool does not renew them.",
            },
        )
        # The generated secret itself (``instance.secret`` is its attachment to the instance).
        skip_checkov(self.instance.node.find_child("Secret"), {"CKV_AWS_149": SECRET_KEY_REASON})


class Redis(Construct):
    """The shared limiter: encrypted at rest and in transit, an AUTH token, failover with a replica."""

    def __init__(self, scope: Construct, cid: str, redis: DeployRedis, vpc: ec2.IVpc) -> None:
        super().__init__(scope, cid)
        self.security_group = ec2.SecurityGroup(self, "Sg", vpc=vpc, description="Redis: the gateway only")
        self.auth = secretsmanager.Secret(
            self,
            "AuthToken",
            description="Redis AUTH token of the Fortress limiter",
            generate_secret_string=secretsmanager.SecretStringGenerator(
                exclude_punctuation=True, password_length=48
            ),
        )
        skip_checkov(self.auth, {"CKV_AWS_149": SECRET_KEY_REASON})
        private = vpc.select_subnets(subnet_group_name="private")
        subnets = elasticache.CfnSubnetGroup(
            self, "Subnets", description="Fortress Redis", subnet_ids=private.subnet_ids
        )
        failover = redis.replicas >= 1
        self.group = elasticache.CfnReplicationGroup(
            self,
            "Group",
            replication_group_description="Fortress shared limits",
            engine="redis",
            cache_node_type=redis.node_type,
            num_cache_clusters=1 + redis.replicas,
            automatic_failover_enabled=failover,
            multi_az_enabled=failover,
            at_rest_encryption_enabled=True,
            transit_encryption_enabled=True,
            auth_token=self.auth.secret_value.unsafe_unwrap(),  # a dynamic reference, not the value
            cache_subnet_group_name=subnets.ref,
            security_group_ids=[self.security_group.security_group_id],
            port=REDIS_PORT,
        )
