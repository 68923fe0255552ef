"""fortress.observe.series: the request path's counters and histograms expose exactly what
prometheus_client's own would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest

from fortress.observe.series import CounterFamily, Families, HistogramFamily

BUCKETS = (0.05, 0.1, 1, 2.5)
VALUES = [0.0, 0.05, 0.050001, 0.1, 0.7, 1.0, 2.5, 3.0, 1e9, 0.2]


def test_same_exposition_as_prometheus_client() -> None:
    disable_created_metrics()
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    c = Counter("x_requests", "Requests.", ["model", "status"], registry=theirs)
    h = Histogram("x_latency_seconds", "Latency.", ["model"], buckets=BUCKETS, registry=theirs)
    u = Histogram("x_overhead_seconds", "Overhead.", buckets=BUCKETS, registry=theirs)
    oc = CounterFamily("x_requests", "Requests.", ["model", "status"])
    oh = HistogramFamily("x_latency_seconds", "Latency.", ["model"], buckets=BUCKETS)
    ou = HistogramFamily("x_overhead_seconds", "Overhead.", buckets=BUCKETS)
    ours.register(Families([oc, oh, ou]))
    ou.labels()  # an unlabelled series exists from the start, as prometheus_client's does
    for i, v in enumerate(VALUES):
        model, status = ("a", "200") if i % 3 else ("b", "502")
        c.labels(model, status).inc()
        oc.labels(model, status).inc()
        c.labels(model, status).inc(2.5)
        oc.labels(model, status).inc(2.5)
        h.labels(model).observe(v)
        oh.labels(model).observe(v)
        u.observe(v)
        ou.labels().observe(v)
    assert generate_latest(ours) == generate_latest(theirs)


def test_label_counts_and_buckets_are_checked() -> None:
    with pytest.raises(ValueError):
        CounterFamily("x", "X.", ["a"]).labels()
    with pytest.raises(ValueError):
        HistogramFamily("x", "X.", ["a"], buckets=BUCKETS).labels("1", "2")
    with pytest.raises(ValueError):
        HistogramFamily("x", "X.", buckets=(1.0, 0.5))
    with pytest.raises(ValueError):
        HistogramFamily("x", "X.", buckets=())
