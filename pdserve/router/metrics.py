"""The router's Prometheus metrics, vLLM's names under the `pdserve:` prefix. One registry per
router so that several routers can live in one process (tests, the overhead benchmark)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


class RouterMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pdserve:router_requests", "Requests routed, by where prefill ran",
                                ["prefill"], registry=r)          # prefill=remote|local
        self.local_reasons = Counter("pdserve:router_local_prefill", "Requests prefilled on the decode "
                                     "worker, by reason", ["reason"], registry=r)
        self.errors = Counter("pdserve:router_request_errors", "Requests that ended in an error",
                              ["status"], registry=r)
        self.retries = Counter("pdserve:router_retries", "Calls retried on another instance (or locally)",
                               ["stage"], registry=r)             # stage=prefill|decode
        self.aborts = Counter("pdserve:router_client_aborts", "Requests the client gave up on", registry=r)
        self.running = Gauge("pdserve:num_requests_running", "Requests in flight through the router",
                             registry=r)
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Router-side time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "Router-side request latency",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("pdserve:router_prefill_call_seconds",
                                      "Time of the call to a prefill worker", buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.healthy = Gauge("pdserve:router_instance_healthy", "1 if the instance passes health checks",
                             ["role", "url"], registry=r)
        self.in_flight = Gauge("pdserve:router_instance_in_flight", "Requests in flight per instance",
                               ["role", "url"], registry=r)

    def render(self, instances) -> bytes:
        for i in instances:
            self.healthy.labels(i.role, i.url).set(1 if i.healthy else 0)
            self.in_flight.labels(i.role, i.url).set(i.in_flight)
        return generate_latest(self.registry)

    def forget(self, inst) -> None:
        for g in (self.healthy, self.in_flight):
            try:
                g.remove(inst.role, inst.url)
            except KeyError:
                pass
