"""The KMS key the stack's CloudWatch log groups are encrypted with."""

from __future__ import annotations

from aws_cdk import Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

# What CloudWatch Logs does with a log group's key (AWS's documented key policy for it).
LOGS_ACTIONS = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]


def logs_key(scope: Construct, cid: str) -> kms.Key:
    """A rotated key CloudWatch Logs may use for this account's and region's log groups only.

    The flow logs and the gateway's logs (access lines with key names and users) are encrypted
    with it rather than CloudWatch's default key, so reading them needs a grant on this key too.
    """
    stack = Stack.of(scope)
    key = kms.Key(scope, cid, enable_key_rotation=True, description="Fortress log groups")
    log_groups = f"arn:{stack.partition}:logs:{stack.region}:{stack.account}:log-group:*"
    key.add_to_resource_policy(
        iam.PolicyStatement(
            principals=[iam.ServicePrincipal(f"logs.{stack.region}.amazonaws.com")],
            actions=LOGS_ACTIONS,
            resources=["*"],
            conditions={"ArnLike": {"kms:EncryptionContext:aws:logs:arn": log_groups}},
        )
    )
    return key
