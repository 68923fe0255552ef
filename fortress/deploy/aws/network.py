"""The VPC: public subnets for the load balancer and NAT, private ones for everything else."""

from __future__ import annotations

from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from constructs import Construct

from fortress.config import AwsDeploy


class Network(Construct):
    """A new VPC over ``max_azs`` zones, or the existing one ``vpc.id`` names (a lookup: needs an account)."""

    def __init__(self, scope: Construct, cid: str, deploy: AwsDeploy, logs_key: kms.IKey) -> None:
        super().__init__(scope, cid)
        v = deploy.vpc
        if v.id is not None:
            self.vpc: ec2.IVpc = ec2.Vpc.from_lookup(self, "Vpc", vpc_id=v.id)
            return
        private = ec2.SubnetType.PRIVATE_WITH_EGRESS if v.nat_gateways else ec2.SubnetType.PRIVATE_ISOLATED
        vpc = ec2.Vpc(
            self,
            "Vpc",
            ip_addresses=ec2.IpAddresses.cidr(v.cidr),
            max_azs=v.max_azs,
            nat_gateways=v.nat_gateways,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                ec2.SubnetConfiguration(name="private", subnet_type=private, cidr_mask=20),
            ],
            # Model weights and the audit archive go to S3 without NAT charges.
            gateway_endpoints={
                "S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)
            },
        )
        if v.flow_logs:
            group = logs.LogGroup(
                self, "FlowLogs", retention=logs.RetentionDays.THREE_MONTHS, encryption_key=logs_key
            )
            vpc.add_flow_log("FlowLog", destination=ec2.FlowLogDestination.to_cloud_watch_logs(group))
        self.vpc = vpc
