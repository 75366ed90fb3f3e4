"""Prometheus metrics: the one module that turns the layers' plain stats into exported series.

Adapter ids become label values only for the first `max_adapter_labels` adapters seen; the
rest share the label "other", so a flood of adapter ids cannot blow up the series count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from loraplex.server.engine.api import AdapterInfo
from loraplex.server.scheduler import RequestRecord

BASE_LABEL = "base"
OTHER_LABEL = "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class AdapterLabels:
    """Maps adapter ids to label values, capped."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter_id: str) -> str:
        if not adapter_id:
            return BASE_LABEL
        with self._lock:
            if adapter_id in self._known:
                return adapter_id
            if len(self._known) < self.cap:
                self._known.add(adapter_id)
                return adapter_id
        return OTHER_LABEL


class _AdapterResidency(Collector):
    """Resident adapters and their bytes, read from the adapter store at scrape time."""

    def __init__(self, list_adapters: Callable[[], list[AdapterInfo]]) -> None:
        self._list = list_adapters

    def collect(self) -> Iterator[GaugeMetricFamily]:
        resident = [a for a in self._list() if a.resident]
        yield GaugeMetricFamily(
            "loraplex_resident_adapters", "Adapters loaded now", value=len(resident)
        )
        yield GaugeMetricFamily(
            "loraplex_resident_adapter_bytes",
            "Bytes held by resident adapters",
            value=sum(a.nbytes for a in resident),
        )


class _LoraRequestsInfo(Collector):
    """vLLM's `lora_requests_info`, for gateways that route by adapter (the Kubernetes
    inference gateway reads it): the adapters running and waiting, as comma-separated label
    values, and how many adapters fit; the value is the time of the reading."""

    def __init__(self, in_flight: Callable[[], tuple[set[str], set[str]]], max_lora: int) -> None:
        self._in_flight = in_flight
        self._max_lora = max_lora

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running, waiting = self._in_flight()
        family = GaugeMetricFamily(
            "lora_requests_info", "Adapters running and waiting (vLLM's series)",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )  # fmt: skip
        labels = [",".join(sorted(running)), ",".join(sorted(waiting)), str(self._max_lora)]
        family.add_metric(labels, time.time())
        yield family


class Metrics:
    """Receives scheduler, service and adapter store events; implements the
    SchedulerObserver and StoreEvents protocols."""

    def __init__(self, registry: CollectorRegistry | None = None, max_adapter_labels: int = 32):
        self.registry = registry or CollectorRegistry()
        self.label = AdapterLabels(max_adapter_labels)
        r = self.registry
        self.requests = Counter(
            "loraplex_requests", "Generation requests by adapter and gRPC status",
            ["adapter", "status"], registry=r,
        )  # fmt: skip
        self.queue_time = self._histogram("loraplex_queue_seconds", "Time waiting for admission")
        self.ttft = self._histogram("loraplex_time_to_first_token_seconds", "Time to first token")
        self.tpot = self._histogram(
            "loraplex_time_per_output_token_seconds",
            "Time per output token after the first",
            TOKEN_TIME_BUCKETS,
        )
        self.e2e = self._histogram("loraplex_e2e_latency_seconds", "End-to-end request latency")
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens", "Prompt tokens by adapter", ["adapter"], registry=r
        )
        self.generated_tokens = Counter(
            "loraplex_generated_tokens", "Generated tokens by adapter", ["adapter"], registry=r
        )
        self.running = Gauge("loraplex_running_requests", "Sequences running", registry=r)
        self.waiting = Gauge("loraplex_waiting_requests", "Requests waiting", registry=r)
        self.batch_size = Histogram(
            "loraplex_batch_size", "Sequences per engine step", buckets=BATCH_BUCKETS, registry=r
        )
        self.adapter_load_time = Histogram(
            "loraplex_adapter_load_seconds",
            "Adapter load time: reading, validating and preparing",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            "loraplex_adapter_evictions", "Adapters dropped from residency", registry=r
        )

    def _histogram(
        self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS
    ) -> Histogram:
        return Histogram(name, doc, ["adapter"], buckets=buckets, registry=self.registry)

    def watch_adapters(self, list_adapters: Callable[[], list[AdapterInfo]]) -> None:
        self.registry.register(_AdapterResidency(list_adapters))

    def watch_engine(self, resources: Callable[[], dict[str, int]]) -> None:
        """Read what the engine's sequences hold (see HFEngine.resources) at scrape time."""
        gauge = Gauge("loraplex_engine_held", "Engine resources held by sequences", ["resource"],
                      registry=self.registry)  # fmt: skip
        for name in resources():
            gauge.labels(name).set_function(_reader(resources, name))

    def watch_lora_requests(
        self, in_flight: Callable[[], tuple[set[str], set[str]]], max_lora: int
    ) -> None:
        self.registry.register(_LoraRequestsInfo(in_flight, max_lora))

    def watch_scheduler(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Read (running, waiting) from the scheduler at scrape time."""
        self.running.set_function(lambda: counts()[0])
        self.waiting.set_function(lambda: counts()[1])

    def request_done(self, adapter_id: str, status: str, known: bool = True) -> None:
        """Count a request; ids the server refused (`known` False) never get their own label."""
        label = self.label(adapter_id) if known else OTHER_LABEL
        self.requests.labels(label, status).inc()

    def request_finished(self, record: RequestRecord) -> None:
        label = self.label(record.adapter_id)
        t = record.timings
        self.prompt_tokens.labels(label).inc(record.prompt_tokens)
        self.generated_tokens.labels(label).inc(record.completion_tokens)
        if t.scheduled is not None:
            self.queue_time.labels(label).observe(t.scheduled - t.submitted)
        if t.first_token is not None:
            self.ttft.labels(label).observe(t.first_token - t.submitted)
            if t.finished is not None and record.completion_tokens > 1:
                per_token = (t.finished - t.first_token) / (record.completion_tokens - 1)
                self.tpot.labels(label).observe(per_token)
        if t.finished is not None:
            self.e2e.labels(label).observe(t.finished - t.submitted)

    def step_finished(self, running: int, waiting: int, batch_size: int) -> None:
        self.batch_size.observe(batch_size)

    def adapter_loaded(self, adapter_id: str, seconds: float) -> None:
        self.adapter_load_time.observe(seconds)

    def adapter_evicted(self, adapter_id: str) -> None:
        self.adapter_evictions.inc()

    def serve_http(self, port: int, host: str) -> tuple[int, Callable[[], None]]:
        """Expose /metrics on its own port; returns the port and a function that stops it."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join()

        return int(server.server_port), stop


def _reader(resources: Callable[[], dict[str, int]], name: str) -> Callable[[], float]:
    return lambda: resources()[name]
