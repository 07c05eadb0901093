"""Prometheus metrics (``GET /metrics``): one registry per app, fed by generation hooks.

Hooks run per upstream *read* (a batch of frames), never per token, and label children are
resolved once per generation, so metrics cost nothing noticeable on the hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from tokenrelay.errors import TokenRelayError
    from tokenrelay.generation import Generation
    from tokenrelay.hub import Hub
    from tokenrelay.upstream import RetryNotice

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


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
        self.gap = Histogram("tokenrelay_inter_token_seconds",
                             "Time between consecutive upstream reads with tokens", ["model"],
                             buckets=_GAP_BUCKETS, registry=r)
        self.events = Counter("tokenrelay_events_relayed", "SSE events relayed (text, "
                              "reasoning, tool calls)", ["model"], registry=r)
        self.streams = Counter("tokenrelay_streams", "Finished answers by final state",
                               ["model", "state"], registry=r)
        self.errors = Counter("tokenrelay_upstream_errors", "Answers that ended in an error",
                              ["code"], registry=r)
        self.retries = Counter("tokenrelay_retries", "Upstream retries before the first token",
                               ["reason"], registry=r)
        self.resumes = Counter("tokenrelay_resumes", "Re-attachments with Last-Event-ID",
                               registry=r)
        self._children: dict[int, tuple[Any, Any, Any]] = {}
        self._last: dict[int, float] = {}

    def bind(self, hub: Hub) -> None:
        """Read live gauges from the hub at scrape time."""
        self.open_streams.set_function(lambda: len(hub.generations))
        self.subscribers.set_function(hub.subscriber_count)
        journal = hub.journal
        if hasattr(journal, "__len__"):  # the memory journal; Redis is sized by Redis
            self.journal_streams.set_function(lambda: len(journal))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- generation hooks ----------------------------------------------------------------

    def _child(self, gen: Generation) -> tuple[Any, Any, Any]:
        found = self._children.get(id(gen))
        if found is None:
            model = gen.route.name
            found = (self.ttft.labels(model), self.gap.labels(model), self.events.labels(model))
            self._children[id(gen)] = found
        return found

    def first_token(self, gen: Generation, seconds: float) -> None:
        self._child(gen)[0].observe(seconds)

    def relayed(self, gen: Generation, count: int) -> None:
        _, gap, events = self._child(gen)
        events.inc(count)
        now = gen.last_token_at or 0.0
        last = self._last.get(id(gen))
        if last is not None:
            gap.observe(now - last)
        self._last[id(gen)] = now

    def retry(self, gen: Generation, notice: RetryNotice) -> None:
        self.retries.labels(notice.reason).inc()

    def finished(self, gen: Generation, error: TokenRelayError | None) -> None:
        self._children.pop(id(gen), None)
        self._last.pop(id(gen), None)
        self.streams.labels(gen.model_used, gen.state).inc()
        if error is not None:
            self.errors.labels(error.code).inc()

    def resumed(self) -> None:
        self.resumes.inc()
