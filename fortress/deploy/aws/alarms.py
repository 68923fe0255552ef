"""Alarms: the config's rules as CloudWatch alarms to an SNS topic, a dashboard, a budget."""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_budgets as budgets
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subs
from constructs import Construct

from fortress.config import AwsDeploy, FortressConfig
from fortress.observe.rules_export import cloudwatch_alarms

_COMPARE = {
    "GreaterThanThreshold": cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
    "GreaterThanOrEqualToThreshold": cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
    "LessThanThreshold": cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
    "LessThanOrEqualToThreshold": cloudwatch.ComparisonOperator.LESS_THAN_OR_EQUAL_TO_THRESHOLD,
}


class AlarmTopic(Construct):
    """The SNS topic alarms and Auto Scaling events go to (KMS-encrypted, TLS only)."""

    def __init__(self, scope: Construct, cid: str, deploy: AwsDeploy) -> None:
        super().__init__(scope, cid)
        key = kms.Key(self, "Key", enable_key_rotation=True, description="Fortress alarm topic")
        # CloudWatch and Auto Scaling publish to the encrypted topic with this key.
        for service in ("cloudwatch.amazonaws.com", "autoscaling.amazonaws.com"):
            key.grant(iam.ServicePrincipal(service), "kms:Decrypt", "kms:GenerateDataKey*")
        self.topic = sns.Topic(self, "Topic", master_key=key, enforce_ssl=True)
        for email in deploy.alarm_emails:
            self.topic.add_subscription(subs.EmailSubscription(email))


class Alarms(Construct):
    """One alarm per ``observe.alarms.rules`` entry (the same export as ``fortress alarms export
    --format cloudwatch``), plus a dashboard of the gateway, its ALB and the model tiers."""

    def __init__(
        self,
        scope: Construct,
        cid: str,
        config: FortressConfig,
        topic: sns.ITopic,
        service: ecs.FargateService,
        lb: elbv2.ApplicationLoadBalancer,
        target_groups: list[tuple[str, elbv2.ApplicationTargetGroup]],
    ) -> None:
        super().__init__(scope, cid)
        action = actions.SnsAction(topic)
        self.alarms: list[cloudwatch.Alarm] = []
        # The gateway's 5xx alarms: a blue/green deployment rolls back while one fires.
        self.errors_5xx: list[cloudwatch.Alarm] = []
        rules = config.observe.alarms.rules
        for i, (rule, spec) in enumerate(zip(rules, cloudwatch_alarms(config), strict=True)):
            metric = cloudwatch.Metric(
                namespace=spec["Namespace"],
                metric_name=spec["MetricName"],
                dimensions_map={d["Name"]: d["Value"] for d in spec["Dimensions"]},
                period=Duration.seconds(spec["Period"]),
                statistic=spec.get("ExtendedStatistic") or spec["Statistic"],
            )
            alarm = cloudwatch.Alarm(
                self,
                f"Rule{i}",
                alarm_name=spec["AlarmName"],
                alarm_description=spec["AlarmDescription"],
                metric=metric,
                threshold=spec["Threshold"],
                evaluation_periods=spec["EvaluationPeriods"],
                datapoints_to_alarm=spec["DatapointsToAlarm"],
                comparison_operator=_COMPARE[spec["ComparisonOperator"]],
                treat_missing_data=cloudwatch.TreatMissingData(
                    "BREACHING" if spec["TreatMissingData"] == "breaching" else "NOT_BREACHING"
                ),
            )
            alarm.add_alarm_action(action)
            alarm.add_ok_action(action)
            self.alarms.append(alarm)
            if rule.metric == "errors_5xx" and rule.op in (">", ">="):
                self.errors_5xx.append(alarm)
        # The floor nothing else watches: a tier whose targets are all unhealthy.
        for name, tg in target_groups:
            alarm = tg.metrics.healthy_host_count(period=Duration.minutes(1)).create_alarm(
                self,
                f"{name}Healthy",
                threshold=1,
                evaluation_periods=2,
                comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
                alarm_description=f"{name}: no healthy model server",
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            )
            alarm.add_alarm_action(action)
            self.alarms.append(alarm)

        dash = cloudwatch.Dashboard(self, "Dashboard")
        dash.add_widgets(
            cloudwatch.GraphWidget(
                title="ALB requests and 5xx",
                left=[lb.metrics.request_count(), lb.metrics.http_code_elb(elbv2.HttpCodeElb.ELB_5XX_COUNT)],
            ),
            cloudwatch.GraphWidget(
                title="ALB target response time",
                left=[lb.metrics.target_response_time(statistic="p95")],
            ),
            cloudwatch.GraphWidget(
                title="Gateway CPU and memory",
                left=[service.metric_cpu_utilization(), service.metric_memory_utilization()],
            ),
        )
        if target_groups:
            dash.add_widgets(
                cloudwatch.GraphWidget(
                    title="Healthy model servers per tier",
                    left=[tg.metrics.healthy_host_count(label=name) for name, tg in target_groups],
                )
            )
        if self.alarms:
            dash.add_widgets(cloudwatch.AlarmStatusWidget(title="Alarms", alarms=self.alarms, width=24))


class Budget(Construct):
    """An AWS Budgets monthly cost budget that mails at ``alert_at_percent`` of actual spend."""

    def __init__(self, scope: Construct, cid: str, deploy: AwsDeploy) -> None:
        super().__init__(scope, cid)
        b = deploy.budget
        assert b is not None
        budgets.CfnBudget(
            self,
            "Budget",
            budget=budgets.CfnBudget.BudgetDataProperty(
                budget_type="COST",
                time_unit="MONTHLY",
                budget_limit=budgets.CfnBudget.SpendProperty(amount=b.monthly_usd, unit="USD"),
                budget_name=f"{deploy.stack_name}-monthly",
            ),
            notifications_with_subscribers=[
                budgets.CfnBudget.NotificationWithSubscribersProperty(
                    notification=budgets.CfnBudget.NotificationProperty(
                        comparison_operator="GREATER_THAN",
                        notification_type="ACTUAL",
                        threshold=b.alert_at_percent,
                        threshold_type="PERCENTAGE",
                    ),
                    subscribers=[
                        budgets.CfnBudget.SubscriberProperty(address=e, subscription_type="EMAIL")
                        for e in b.emails
                    ],
                )
            ],
        )
