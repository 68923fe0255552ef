"""cdk-nag and checkov suppressions: each finding the stack accepts, with the reason it is accepted."""

from __future__ import annotations

import aws_cdk as cdk
from cdk_nag import NagPackSuppression, NagSuppressions
from constructs import IConstruct

_ALWAYS = {
    "AwsSolutions-IAM4": "AWS managed policies: SSM managed instance core and the CloudWatch agent's "
    "policy on the model servers, the ECS task execution role's policy, and with blue_green CodeDeploy's "
    "ECS role and the basic execution role of the function that starts its deployments; they track "
    "AWS's own changes.",
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

# checkov: why the stack's secrets keep Secrets Manager's own KMS key instead of a customer key.
SECRET_KEY_REASON = (
    "Encrypted with the account's aws/secretsmanager key; who reads it is decided by IAM grants to "
    "the gateway's task execution role alone, which a customer managed key would not narrow."
)


def suppress(stack: cdk.Stack) -> None:
    """Apply the stack's suppressions (each rule listed above has findings in some config)."""
    NagSuppressions.add_stack_suppressions(
        stack, [NagPackSuppression(id=rule, reason=reason) for rule, reason in _ALWAYS.items()], True
    )


def skip_checkov(construct: IConstruct, checks: dict[str, str]) -> None:
    """Record on ``construct``'s CloudFormation resource the checkov checks it fails by design.

    checkov reads ``Metadata.checkov.skip`` (``[{"id": ..., "comment": ...}]``) from the template;
    every entry says why, so the scan's report shows the reason beside the skipped check.
    """
    resource = construct if isinstance(construct, cdk.CfnResource) else construct.node.default_child
    if not isinstance(resource, cdk.CfnResource):
        raise TypeError(f"{construct.node.path} has no CloudFormation resource to annotate")
    current = resource.get_metadata("checkov") or {}
    skip = [*current.get("skip", []), *({"id": i, "comment": c} for i, c in checks.items())]
    resource.add_metadata("checkov", {"skip": skip})
