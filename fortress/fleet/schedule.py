"""Scheduled bounds: which schedule of a pool is in force at a given time, and the next change.

Semantics of an AWS Auto Scaling scheduled action: each schedule fires at the times its cron
expression names, in its own time zone (so ``0 6 * * *`` in ``Europe/Paris`` follows daylight
saving time), and the bounds it sets hold from its latest firing until another schedule of the
pool fires. Bounds a schedule leaves unset come from the pool's ``fleet`` section. Pure: the
caller passes the time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter

from fortress.config import FleetConfig, FleetSchedule


@dataclass(frozen=True)
class Bounds:
    """The pool's replica bounds in force, and the schedule that set them (None: the base)."""

    min: int
    max: int
    schedule: str | None = None
    since: datetime | None = None  # when that schedule last fired


def label(s: FleetSchedule) -> str:
    """How a schedule is named in decisions and status: its ``name``, else its cron line."""
    return s.name or f"{s.cron} {s.timezone}"


def _local(now: datetime, s: FleetSchedule) -> datetime:
    return now.astimezone(ZoneInfo(s.timezone))


def last_fired(s: FleetSchedule, now: datetime) -> datetime:
    """The latest time at or before ``now`` (aware) when ``s`` fired, in UTC."""
    base = _local(now, s)
    # croniter's get_prev is strictly before its start: start a microsecond later so a firing at
    # exactly `now` counts as fired.
    prev: datetime = croniter(s.cron, base.replace(microsecond=0) + _EPS).get_prev(datetime)
    return prev.astimezone(UTC)


def next_fire(s: FleetSchedule, now: datetime) -> datetime:
    """The first time strictly after ``now`` (aware) when ``s`` fires, in UTC."""
    nxt: datetime = croniter(s.cron, _local(now, s)).get_next(datetime)
    return nxt.astimezone(UTC)


def bounds_at(fleet: FleetConfig, now: datetime) -> Bounds:
    """The bounds in force at ``now`` (an aware datetime): the latest-fired schedule's, with its
    unset bounds from the base; min never above max."""
    best: tuple[datetime, int, FleetSchedule] | None = None
    for i, s in enumerate(fleet.schedules):
        fired = last_fired(s, now)
        if best is None or (fired, i) >= best[:2]:  # the later firing wins; a tie, the later one
            best = (fired, i, s)
    if best is None:
        return Bounds(fleet.min_replicas, fleet.max_replicas)
    fired, _, s = best
    hi = fleet.max_replicas if s.max_replicas is None else s.max_replicas
    lo = fleet.min_replicas if s.min_replicas is None else s.min_replicas
    return Bounds(min(lo, hi), hi, label(s), fired)


def next_change(fleet: FleetConfig, now: datetime) -> tuple[datetime, str] | None:
    """When the next schedule fires after ``now``, and which (None without schedules)."""
    found = [(next_fire(s, now), label(s)) for s in fleet.schedules]
    return min(found) if found else None


_EPS = datetime.resolution * 1000  # one millisecond
