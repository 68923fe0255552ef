"""Counters and histograms the request path updates as plain Python numbers, exposed to
Prometheus when it scrapes.

prometheus_client's ``Counter.inc`` and ``Histogram.observe`` check the metric, take a lock and
go through three Python calls per increment; a finished request made nine of them (about 3 µs,
``bench/observe_overhead.py``). These are an attribute addition and, for a histogram, a bisect.
They are updated from the event loop's thread only (the gateway's observers run there), so no
lock is needed; a scrape reads them between two requests. What Prometheus sees is the same: the
families come out of ``collect()`` with the names, labels and buckets prometheus_client would
give them (``le`` formatted by its own ``floatToGoString``), and no ``_created`` series.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

S = TypeVar("S", "Count", "Spread")


class Count:
    """One counter series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (the request path: no check that it is positive; callers pass counts)."""
        self.value += amount


class Spread:
    """One histogram series: a count per bucket (the last one past every bound) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. Prometheus's ``le`` bucket of ``value``.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family(Generic[S]):
    """A metric with labels; ``labels(*values)`` returns (and creates once) a series."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.series: dict[tuple[str, ...], S] = {}

    def labels(self, *values: str) -> S:
        """The series of these label values (created empty, exposed from then on)."""
        series = self.series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            series = self.series[values] = self._new()
        return series

    def _new(self) -> S:
        raise NotImplementedError


class CounterFamily(_Family[Count]):
    """A counter with labels."""

    def _new(self) -> Count:
        return Count()

    def family(self) -> Metric:
        out = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self.series.items()):
            out.add_metric(list(values), series.value)
        return out


class HistogramFamily(_Family[Spread]):
    """A histogram with labels and fixed buckets (``+Inf`` added)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = ()
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        if list(self.bounds) != sorted(set(self.bounds)) or not self.bounds:
            raise ValueError(f"{self.name}: buckets must be increasing and not empty")
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]

    def _new(self) -> Spread:
        return Spread(self.bounds)

    def family(self) -> Metric:
        out = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self.series.items()):
            total = 0
            buckets = []
            for le, n in zip(self._le, list(series.counts), strict=True):
                total += n
                buckets.append((le, total))
            out.add_metric(list(values), buckets, series.sum)
        return out


class Families(Collector):
    """Registers these families with a ``CollectorRegistry``; each scrape reads them."""

    def __init__(self, families: Sequence[CounterFamily | HistogramFamily]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        for f in self.families:
            yield f.family()
