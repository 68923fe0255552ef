"""cdk-nag suppressions: each finding the stack accepts, with the reason it is accepted."""

from __future__ import annotations

import aws_cdk as cdk
from cdk_nag import NagPackSuppression, NagSuppressions

_ALWAYS = {
    "AwsSolutions-IAM4": "AWS managed policies: SSM managed instance core and the CloudWatch agent's "
    "policy on the model servers, the ECS task execution role's policy; they track AWS's own changes.",
    "AwsSolutions-IAM5": "Wildcards CDK generates for grants scoped to one resource (bucket objects, "
    "KMS data keys, log streams) and read-only Describe/GetMetricData calls that have no resource-level "
    "permissions in IAM.",
    "AwsSolutions-SMG4": "The server secret and admin token are read by the gateway at start; rotating "
    "them is an operator action (a restart), not a Lambda rotation.",
    "AwsSolutions-ECS2": "Only non-secret values (database and Redis host and port, the region) are "
    "environment variables; every secret comes from Secrets Manager or SSM.",
    "AwsSolutions-EC23": "The public load balancer accepts clients from the internet by design; the "
    "gateway authenticates every request with an API key.",
    "AwsSolutions-RDS11": "The default PostgreSQL port is reachable only from the gateway's security group.",
    "AwsSolutions-AEC5": "The default Redis port is reachable only from the gateway's security group.",
}


def suppress(stack: cdk.Stack) -> None:
    """Apply the stack's suppressions (each rule listed above has findings in some config)."""
    NagSuppressions.add_stack_suppressions(
        stack, [NagPackSuppression(id=rule, reason=reason) for rule, reason in _ALWAYS.items()], True
    )
