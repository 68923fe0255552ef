"""Where alarm notifications go: the log, webhooks (Slack-compatible), AWS SNS.

Each notifier sends one ``AlarmEvent``; the evaluator sends events in order and logs (never
raises) a notifier's failure, so an unreachable webhook cannot stop alarms from being evaluated.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson

from fortress.config import AlarmNotify
from fortress.observe.alarms import AlarmEvent, AlarmState, Notifier

log = logging.getLogger("fortress.alarms")


class LogNotifier:
    """Log each event on ``fortress.alarms``: WARNING when a page or warning fires, else INFO."""

    async def send(self, event: AlarmEvent) -> None:
        loud = event.state is AlarmState.FIRING and event.rule.severity in ("page", "warning")
        log.log(logging.WARNING if loud else logging.INFO, "%s", event.text())


class WebhookNotifier:
    """POST the event's JSON (``{"text": ..., "alarm": ..., "state": ...}``) to a URL.

    ``text`` is what a Slack or Mattermost incoming webhook displays; the other fields are for
    receivers that route on them (PagerDuty/Opsgenie bridges, scripts)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def send(self, event: AlarmEvent) -> None:
        body = orjson.dumps(event.payload())
        async with (
            aiohttp.ClientSession(timeout=self.timeout) as session,
            session.post(self.url, data=body, headers={"content-type": "application/json"}) as resp,
        ):
            await resp.read()
            if resp.status >= 300:
                raise RuntimeError(f"webhook answered {resp.status}")


class SnsNotifier:
    """Publish the event to an SNS topic (e-mail, SMS, PagerDuty, Lambda subscribers).

    ``client`` is a boto3 SNS client; by default one is made for ``region`` with the usual
    credential chain (instance role on AWS). boto3 calls block, so they run in a thread."""

    def __init__(self, topic_arn: str, region: str | None = None, client: Any = None) -> None:
        self.topic_arn = topic_arn
        if client is None:
            import boto3

            region = region or _region_of(topic_arn)
            client = boto3.client("sns", region_name=region)
        self.client = client

    def publish(self, event: AlarmEvent) -> dict[str, Any]:
        """The blocking publish call (what ``send`` runs in a thread)."""
        subject = f"[{str(event.state).upper()}] {event.rule.name} ({event.rule.severity})"
        return self.client.publish(
            TopicArn=self.topic_arn,
            Subject=subject[:100],  # SNS limit
            Message=orjson.dumps(event.payload()).decode(),
            MessageAttributes={
                "severity": {"DataType": "String", "StringValue": event.rule.severity},
                "state": {"DataType": "String", "StringValue": str(event.state)},
                "alarm": {"DataType": "String", "StringValue": event.rule.name},
            },
        )

    async def send(self, event: AlarmEvent) -> None:
        await asyncio.to_thread(self.publish, event)


def _region_of(arn: str) -> str | None:
    parts = arn.split(":")
    return parts[3] if len(parts) > 3 and parts[3] else None


def build_notifiers(cfg: AlarmNotify) -> list[Notifier]:
    """The notifiers ``alarms.notify`` asks for."""
    out: list[Notifier] = []
    if cfg.log:
        out.append(LogNotifier())
    out.extend(WebhookNotifier(url, cfg.timeout) for url in cfg.webhooks)
    if cfg.sns_topic_arn:
        out.append(SnsNotifier(cfg.sns_topic_arn, cfg.sns_region))
    return out
