"""Metrics of several gateway workers on one machine, summed at scrape time.

Each worker keeps its own Prometheus registry (the request path stays a few increments in
process memory). Once a second, and when it stops, a worker publishes what must be summed
(counters, histograms, a few gauges such as requests in flight) to its slot of a
``MetricsBoard``: one ``memfd`` per worker, made by the master before it forks, so the slots
outlive a worker that is killed. ``/metrics`` on any worker is then its own live series plus
the other workers' last snapshots (at most a second old): counters and histograms summed,
summed gauges summed, a few gauges at their minimum, and every other gauge (replica states,
alarms, GPUs: each worker sees the same machine and replicas) as this worker sees it.

A worker that replaces a killed one starts from its predecessor's last snapshot, so the sums
never go backwards (a counter that drops reads as a reset to Prometheus): what the killed
process counted in its last second is what is lost.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from typing import Any

import orjson
from prometheus_client.core import Metric

# Gauges that add up across workers (each worker holds its own share); other gauges are read
# from the worker that answers, except these, where the lowest value speaks for all.
SUM_GAUGES = frozenset(
    {
        "fortress_requests_in_flight",
        "fortress_replica_in_flight",
        "fortress_connections_open",
        "fortress_audit_backlog_records",
        "fortress_limiter_pending_replay",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    }
)
MIN_GAUGES = frozenset(
    {"fortress_audit_shipper_ok", "fortress_key_store_reachable", "process_start_time_seconds"}
)
CUMULATIVE = frozenset({"counter", "histogram", "summary"})

# A sample's key: its name and sorted labels as a JSON array (any label value is safe in it);
# snapshots map keys to values, so reading one is a single orjson.loads with no loop in Python.
Samples = dict[str, float]
# family name -> [type, help, samples]
Families = dict[str, list[Any]]


def shared(family: Metric) -> bool:
    """Whether ``family`` is published for the other workers to merge."""
    return family.type in CUMULATIVE or family.name in SUM_GAUGES or family.name in MIN_GAUGES


def to_families(metrics: Iterable[Metric]) -> Families:
    """Collected families as plain data (published as JSON, merged by key)."""
    out: Families = {}
    dumps = orjson.dumps
    for fam in metrics:
        samples: Samples = {
            dumps([s.name, sorted(s.labels.items())]).decode(): float(s.value) for s in fam.samples
        }
        if fam.name in out:  # the same family from two collectors: keep both samples
            out[fam.name][2].update(samples)
        else:
            out[fam.name] = [fam.type, fam.documentation, samples]
    return out


def encode(families: Families, incarnation: int) -> bytes:
    return orjson.dumps({"incarnation": incarnation, "families": families})


def decode(data: bytes) -> tuple[Families, int]:
    """(families, incarnation) of a published snapshot; empty for an empty slot."""
    if not data:
        return {}, 0
    doc = orjson.loads(data)
    return doc["families"], int(doc.get("incarnation", 1))


def add(into: Families, other: Families, *, cumulative_only: bool = False) -> None:
    """Merge ``other`` into ``into``: sums for cumulative families and summed gauges, the
    minimum for ``MIN_GAUGES``, the value ``into`` has (else ``other``'s) for other gauges."""
    for name, (typ, help_, samples) in other.items():
        if cumulative_only and typ not in CUMULATIVE:
            continue
        mine = into.get(name)
        if mine is None:
            into[name] = [typ, help_, dict(samples)]
            continue
        target = mine[2]
        if typ in CUMULATIVE or name in SUM_GAUGES:
            get = target.get
            for key, value in samples.items():
                target[key] = get(key, 0.0) + value
        elif name in MIN_GAUGES:
            for key, value in samples.items():
                have = target.get(key)
                target[key] = value if have is None else min(have, value)
        else:
            for key, value in samples.items():
                target.setdefault(key, value)


def to_metrics(families: Families) -> list[Metric]:
    out = []
    for name, (typ, help_, samples) in families.items():
        m = Metric(name, help_, typ)
        for key, value in samples.items():
            sample, labels = orjson.loads(key)
            m.add_sample(sample, dict(labels), value)
        out.append(m)
    return out


class MetricsBoard:
    """One slot per worker, in shared memory, holding that worker's last published metrics.

    ``create`` (in the master, before the workers are forked) makes one ``memfd`` per worker;
    the workers inherit them. Writes and reads take an ``fcntl`` lock on the slot, which the
    kernel releases if the writer is killed mid-write.
    """

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds

    @classmethod
    def create(cls, workers: int) -> MetricsBoard:
        return cls([os.memfd_create(f"fortress-metrics-w{i}", os.MFD_CLOEXEC) for i in range(workers)])

    @property
    def workers(self) -> int:
        return len(self.fds)

    def publish(self, worker: int, data: bytes) -> None:
        fd = self.fds[worker]
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            os.ftruncate(fd, len(data))
            os.pwrite(fd, data, 0)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def read(self, worker: int) -> bytes:
        fd = self.fds[worker]
        fcntl.lockf(fd, fcntl.LOCK_SH)
        try:
            size = os.fstat(fd).st_size
            return os.pread(fd, size, 0) if size else b""
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


class WorkerMetrics:
    """What one worker adds to its ``/metrics``: the others' snapshots, and its predecessor's."""

    def __init__(self, board: MetricsBoard, worker: int) -> None:
        self.board = board
        self.worker = worker
        # A killed predecessor's last snapshot: its counters carry on in this process's.
        prev, incarnation = decode(board.read(worker))
        self.base: Families = {}
        add(self.base, prev, cumulative_only=True)
        self.incarnation = incarnation + 1

    def publish(self, own: Iterable[Metric]) -> None:
        """Publish this worker's shared families (with its predecessor's counts)."""
        fams = to_families(f for f in own if shared(f))
        add(fams, self.base)
        self.board.publish(self.worker, encode(fams, self.incarnation))

    def merged(self, own: Iterable[Metric]) -> list[Metric]:
        """This worker's families with every other worker's last snapshot summed in."""
        fams = to_families(own)
        add(fams, self.base)
        reporting, restarts = 1, self.incarnation - 1
        for w in range(self.board.workers):
            if w == self.worker:
                continue
            try:
                other, incarnation = decode(self.board.read(w))
            except (ValueError, KeyError, TypeError):  # a slot being replaced: skip this once
                continue
            if incarnation:
                reporting += 1
                restarts += incarnation - 1
            add(fams, other)
        out = to_metrics(fams)
        up = Metric("fortress_workers", "Gateway worker processes whose metrics this answer sums.", "gauge")
        up.add_sample("fortress_workers", {}, float(reporting))
        again = Metric(
            "fortress_worker_restarts", "Times a gateway worker was replaced after it died.", "counter"
        )
        again.add_sample("fortress_worker_restarts_total", {}, float(restarts))
        return [*out, up, again]
