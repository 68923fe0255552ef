"""Blue/green deployments of the gateway (``deploy.aws.gateway.deployment: blue_green``).

The service runs under the CODE_DEPLOY deployment controller: CodeDeploy starts a new task set
(green) beside the running one (blue), registers it in the second target group, shifts the
production listener's traffic to it as ``blue_green_traffic`` says, and rolls back when the
deployment fails, is stopped, or the gateway's 5xx alarm fires.

CloudFormation cannot give such a service a new task definition (CDK leaves the revision out of
the service's ``TaskDefinition``, so it does not try). A custom resource here does it instead:
whenever ``cdk deploy`` registers a new revision (a new image, new settings), its ARN changes,
the resource is updated, and it calls CodeDeploy's ``CreateDeployment`` with that revision. The
stack update does not wait for the traffic shift; CodeDeploy's console or CLI follows it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aws_cdk import Duration, Stack
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_codedeploy as codedeploy
from aws_cdk import aws_iam as iam
from aws_cdk import custom_resources as cr
from constructs import Construct

from fortress.config import DeployGateway
from fortress.deploy.aws.nag import skip_checkov

# How the production listener's traffic moves to the new tasks.
TRAFFIC = {
    "all_at_once": codedeploy.EcsDeploymentConfig.ALL_AT_ONCE,
    "canary_10_5m": codedeploy.EcsDeploymentConfig.CANARY_10_PERCENT_5_MINUTES,
    "linear_10_1m": codedeploy.EcsDeploymentConfig.LINEAR_10_PERCENT_EVERY_1_MINUTES,
}
# The old tasks stay this long after the shift: a rollback within it moves traffic back at once.
KEEP_BLUE = Duration.minutes(5)
# checkov on the Lambda function behind CDK's AwsCustomResource: why each finding is accepted.
_CALL = "CDK's AwsCustomResource function makes one CodeDeploy API call when CloudFormation updates the stack"
CUSTOM_RESOURCE_SKIPS = {
    "CKV_AWS_115": _CALL + "; CloudFormation invokes it once per update, so no concurrency limit is needed.",
    "CKV_AWS_116": _CALL + "; a failed call fails the stack update itself, which a dead-letter queue "
    "would not improve on.",
    "CKV_AWS_117": _CALL + " and reaches nothing in the VPC; inside it, it would need NAT or an "
    "endpoint to reach CodeDeploy.",
}

if TYPE_CHECKING:
    from fortress.deploy.aws.gateway import Gateway


class BlueGreen(Construct):
    """The CodeDeploy application and deployment group of the gateway service, and the custom
    resource that deploys each new task definition revision through them."""

    def __init__(
        self,
        scope: Construct,
        cid: str,
        settings: DeployGateway,
        gateway: Gateway,
        alarms: list[cloudwatch.IAlarm],
        container: str,
        port: int,
    ) -> None:
        super().__init__(scope, cid)
        assert gateway.test_listener is not None and gateway.green_target_group is not None
        self.application = codedeploy.EcsApplication(self, "Application")
        self.config = TRAFFIC[settings.blue_green_traffic]
        self.group = codedeploy.EcsDeploymentGroup(
            self,
            "DeploymentGroup",
            application=self.application,
            service=gateway.service,
            blue_green_deployment_config=codedeploy.EcsBlueGreenDeploymentConfig(
                blue_target_group=gateway.target_group,
                green_target_group=gateway.green_target_group,
                listener=gateway.listener,
                test_listener=gateway.test_listener,
                termination_wait_time=KEEP_BLUE,
            ),
            deployment_config=self.config,
            alarms=alarms,
            auto_rollback=codedeploy.AutoRollbackConfig(
                failed_deployment=True, stopped_deployment=True, deployment_in_alarm=bool(alarms)
            ),
        )
        self.deployment = self._deploy_each_revision(gateway, container, port)

    def _deploy_each_revision(self, gateway: Gateway, container: str, port: int) -> cr.AwsCustomResource:
        app_name = self.application.application_name
        group_name = self.group.deployment_group_name
        appspec = {
            "version": 1,
            "Resources": [
                {
                    "TargetService": {
                        "Type": "AWS::ECS::Service",
                        "Properties": {
                            "TaskDefinition": gateway.task.task_definition_arn,
                            "LoadBalancerInfo": {"ContainerName": container, "ContainerPort": port},
                        },
                    }
                }
            ],
        }
        # The stack's creation starts the service with its first revision itself: nothing to deploy.
        on_create = cr.AwsSdkCall(
            service="CodeDeploy",
            action="getDeploymentGroup",
            parameters={"applicationName": app_name, "deploymentGroupName": group_name},
            physical_resource_id=cr.PhysicalResourceId.of("initial"),
            output_paths=["deploymentGroupInfo.deploymentGroupName"],
        )
        on_update = cr.AwsSdkCall(
            service="CodeDeploy",
            action="createDeployment",
            parameters={
                "applicationName": app_name,
                "deploymentGroupName": group_name,
                "description": "Fortress gateway: a new task definition revision from cdk deploy",
                "revision": {
                    "revisionType": "AppSpecContent",
                    # The task definition's ARN is a token here; CDK resolves it inside the string.
                    "appSpecContent": {"content": json.dumps(appspec)},
                },
            },
            physical_resource_id=cr.PhysicalResourceId.from_response("deploymentId"),
        )
        resource = cr.AwsCustomResource(
            self,
            "Deploy",
            on_create=on_create,
            on_update=on_update,
            policy=cr.AwsCustomResourcePolicy.from_statements(
                [
                    iam.PolicyStatement(
                        actions=["codedeploy:CreateDeployment", "codedeploy:GetDeploymentGroup"],
                        resources=[self.group.deployment_group_arn],
                    ),
                    iam.PolicyStatement(
                        actions=["codedeploy:GetDeploymentConfig"],
                        resources=[self.config.deployment_config_arn],
                    ),
                    iam.PolicyStatement(
                        actions=[
                            "codedeploy:RegisterApplicationRevision",
                            "codedeploy:GetApplicationRevision",
                        ],
                        resources=[self.application.application_arn],
                    ),
                ]
            ),
            install_latest_aws_sdk=False,  # the Lambda runtime's SDK: nothing fetched at deploy time
        )
        resource.node.add_dependency(gateway.service)
        # One function serves every AwsCustomResource of the stack, a child of the stack itself.
        uuid = cr.AwsCustomResource.PROVIDER_FUNCTION_UUID.replace("-", "")
        function = Stack.of(self).node.try_find_child(f"AWS{uuid}")
        if function is not None:
            skip_checkov(function, CUSTOM_RESOURCE_SKIPS)
        return resource
