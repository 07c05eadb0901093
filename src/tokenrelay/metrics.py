"""Prometheus metrics (``GET /metrics``): one registry per app, fed by generation hooks.

The per-read hook (``relayed``) only bumps plain integers in a per-model :class:`_ReadStats`
(no lock, no prometheus call); :class:`_ReadCollector` turns them into the
``tokenrelay_events_relayed`` counter and the ``tokenrelay_inter_token_seconds`` histogram
when ``/metrics`` is scraped. Per-answer hooks use prometheus_client directly.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import INF, floatToGoString

from tokenrelay.errors import BadRequest

if TYPE_CHECKING:
    from tokenrelay.config import Settings
    from tokenrelay.errors import TokenRelayError
    from tokenrelay.generation import Generation
    from tokenrelay.hub import Hub
    from tokenrelay.upstream import ContinueNotice, RetryNotice

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _ReadStats:
    """Per-model counts of relayed reads: events, and gaps between reads with tokens."""

    __slots__ = ("events", "gap_buckets", "gap_sum")

    def __init__(self) -> None:
        self.events = 0
        self.gap_buckets = [0] * (len(_GAP_BUCKETS) + 1)  # per bucket, last one is +Inf
        self.gap_sum = 0.0


class _ReadCollector:
    """Exposes the :class:`_ReadStats` of every model at scrape time."""

    def __init__(self, stats: dict[str, _ReadStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "tokenrelay_events_relayed",
            "SSE events relayed (text, reasoning, tool calls)",
            labels=["model"],
        )
        gaps = HistogramMetricFamily(
            "tokenrelay_inter_token_seconds",
            "Time between consecutive upstream reads with tokens",
            labels=["model"],
        )
        for model, st in sorted(self._stats.items()):
            events.add_metric([model], st.events)
            cumulative, buckets = 0, []
            for bound, count in zip((*_GAP_BUCKETS, INF), st.gap_buckets, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            gaps.add_metric([model], buckets, st.gap_sum)
        yield events
        yield gaps


class _BreakerCollector:
    """``tokenrelay_circuit_breaker_state{route}`` from the breakers' last known states
    (the ``/metrics`` handler refreshes them first)."""

    def __init__(self, breakers: Any, gauge: dict[str, int]) -> None:
        self._breakers = breakers
        self._gauge = gauge

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "tokenrelay_circuit_breaker_state",
            "Circuit breaker per route: 0 closed, 1 open, 2 half-open",
            labels=["route"],
        )
        for route, state in sorted(self._breakers.last.items()):
            family.add_metric([route], self._gauge[state])
        yield family


class Metrics:
    """The gateway's metrics; also the generations' ``observer``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.open_streams = Gauge("tokenrelay_open_streams", "Generations running here",
                                  registry=r)
        self.subscribers = Gauge("tokenrelay_subscribers", "Open SSE subscriber responses",
                                 registry=r)
        self.journal_streams = Gauge("tokenrelay_journal_streams",
                                     "Streams retained by this process's journal", registry=r)
        self.ttft = Histogram("tokenrelay_ttft_seconds", "Time to first token", ["model"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.streams = Counter("tokenrelay_streams", "Finished answers by final state",
                               ["model", "state"], registry=r)
        self.errors = Counter("tokenrelay_upstream_errors", "Answers that ended in an error",
                              ["code"], registry=r)
        self.retries = Counter("tokenrelay_retries", "Upstream retries before the first token",
                               ["reason"], registry=r)
        self.resumes = Counter("tokenrelay_resumes", "Re-attachments with Last-Event-ID",
                               registry=r)
        self.continuations = Counter("tokenrelay_continuations",
                                     "Cut answers continued from their partial text",
                                     ["reason"], registry=r)
        self._reads: dict[str, _ReadStats] = {}
        r.register(_ReadCollector(self._reads))
        # Per live generation: its model's stats and the time of its last read with tokens.
        self._live: dict[int, list[Any]] = {}

    def bind(self, hub: Hub) -> None:
        """Read live gauges from the hub at scrape time."""
        self.open_streams.set_function(lambda: len(hub.generations))
        self.subscribers.set_function(hub.subscriber_count)
        journal = hub.journal
        if hasattr(journal, "__len__"):  # the memory journal; Redis is sized by Redis
            self.journal_streams.set_function(lambda: len(journal))

    def bind_breakers(self, breakers: Any) -> None:
        """A gauge per route: 0 closed, 1 open, 2 half-open (issue 15)."""
        from tokenrelay.breaker import GAUGE

        self.registry.register(_BreakerCollector(breakers, GAUGE))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- generation hooks ----------------------------------------------------------------

    def first_token(self, gen: Generation, seconds: float) -> None:
        self.ttft.labels(gen.route.name).observe(seconds)

    def relayed(self, gen: Generation, count: int) -> None:
        """Once per upstream read that carried events: plain arithmetic only."""
        now = gen.last_token_at or 0.0
        live = self._live.get(id(gen))
        if live is None:
            model = gen.route.name
            stats = self._reads.get(model)
            if stats is None:
                stats = self._reads[model] = _ReadStats()
            self._live[id(gen)] = [stats, now]
            stats.events += count
            return
        stats, last = live
        live[1] = now
        stats.events += count
        gap = now - last
        stats.gap_buckets[bisect_left(_GAP_BUCKETS, gap)] += 1
        stats.gap_sum += gap

    def retry(self, gen: Generation, notice: RetryNotice) -> None:
        self.retries.labels(notice.reason).inc()

    def continued(self, gen: Generation, notice: ContinueNotice) -> None:
        self.continuations.labels(notice.reason).inc()

    def finished(self, gen: Generation, error: TokenRelayError | None) -> None:
        self._live.pop(id(gen), None)
        self.streams.labels(gen.model_used, gen.state).inc()
        if error is not None:
            self.errors.labels(error.code).inc()

    def resumed(self) -> None:
        self.resumes.inc()


def metrics_refusal(settings: Settings, scope: Mapping[str, Any]) -> BadRequest | None:
    """Why ``/metrics`` is not served to this request, or None.

    With ``metrics_token``: only to ``Authorization: Bearer <metrics_token>`` (compared in
    constant time). Without it: only to loopback clients of a gateway that has neither
    client keys nor an auth proxy (the local default: the user's own Prometheus or curl).
    A shared gateway's counters (models, error codes, traffic) are not for every tenant.
    """
    token = settings.metrics_token
    if token:
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                presented = rest.strip() if scheme.lower() == b"bearer" else b""
                break
        if hmac.compare_digest(hashlib.sha256(presented).digest(),
                               hashlib.sha256(token.encode()).digest()):
            return None
        return BadRequest("/metrics needs 'Authorization: Bearer <metrics_token>'",
                          code="unauthorized", status=401)
    if settings.api_keys or settings.trusted_user_header:
        return BadRequest(
            "/metrics is off on a gateway with client keys or an auth proxy: set "
            "metrics_token (TOKENRELAY_METRICS_TOKEN) and scrape with "
            "'Authorization: Bearer <metrics_token>'", code="metrics_forbidden", status=403)
    client = scope.get("client")
    try:
        address = ipaddress.ip_address(client[0]) if client else None
        address = getattr(address, "ipv4_mapped", None) or address  # dual-stack socket
        local = address is not None and address.is_loopback
    except ValueError:
        local = False
    if not local:
        return BadRequest(
            "/metrics is served to loopback clients only; to scrape it from elsewhere set "
            "metrics_token (TOKENRELAY_METRICS_TOKEN) and send "
            "'Authorization: Bearer <metrics_token>'", code="metrics_forbidden", status=403)
    return None
