"""Prometheus metrics with vLLM's names under the `pdserve:` prefix, plus KV transfer ones.

Engine gauges and counters are read from engine.stats() at scrape time; latencies are
observed by the serving code as requests finish; KV transfer events come from the connector.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    def __init__(self, engine, model_name: str):
        self.engine, self.labels = engine, {"model_name": model_name}

    def collect(self):
        s = self.engine.stats()  # plain reads of counters; a slightly stale view is fine
        lab = list(self.labels)
        val = list(self.labels.values())

        def gauge(name, doc, v):
            g = GaugeMetricFamily(f"pdserve:{name}", doc, labels=lab)
            g.add_metric(val, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(f"pdserve:{name}", doc, labels=lab)
            c.add_metric(val, v)
            return c
        yield gauge("num_requests_running", "Requests in model execution batches (or loading KV).",
                    s["num_requests_running"])
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s["num_requests_waiting"])
        yield gauge("num_requests_held", "Prefill role: requests whose KV is held for a decode worker.",
                    s["num_requests_held"])
        yield gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s["kv_cache_usage_perc"])
        yield gauge("num_kv_blocks_used", "KV blocks referenced by some request.", s["num_used_blocks"])
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s["prefix_cache_queries"])
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["prefix_cache_hits"])
        yield counter("prompt_tokens", "Prefill tokens processed.", s["prompt_tokens"])
        yield counter("generation_tokens", "Generation tokens processed.", s["generation_tokens"])
        yield counter("num_preemptions", "Cumulative number of preemptions.", s["num_preemptions"])


class Metrics:
    def __init__(self, engine, model_name: str):
        self.registry = r = CollectorRegistry()
        r.register(_EngineCollector(engine, model_name))
        lab = ["model_name"]
        self.model = model_name
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Time between output tokens.", lab,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "End-to-end request latency.", lab,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.success = Counter("pdserve:request_success", "Finished requests by finish reason.",
                               lab + ["finished_reason"], registry=r)
        self.kv_bytes = Counter("pdserve:kv_transfer_bytes", "KV bytes moved between workers.",
                                ["direction", "transport"], registry=r)
        self.kv_blocks = Counter("pdserve:kv_transfer_blocks", "KV blocks pulled from prefill workers.",
                                 registry=r)
        self.kv_seconds = Histogram("pdserve:kv_transfer_seconds", "Duration of one KV pull.",
                                    ["transport"], buckets=LATENCY_BUCKETS, registry=r)
        self.kv_failures = Counter("pdserve:kv_transfer_failures", "Failed KV pulls.", ["reason"], registry=r)

    def on_kv_event(self, kind: str, **kw) -> None:
        """The connector's events (called from its threads; prometheus_client is thread-safe)."""
        if kind == "pulled":
            self.kv_bytes.labels("pulled", kw["transport"]).inc(kw["nbytes"])
            self.kv_blocks.inc(kw["blocks"])
            self.kv_seconds.labels(kw["transport"]).observe(kw["seconds"])
        elif kind == "served":
            self.kv_bytes.labels("served", kw["transport"]).inc(kw["nbytes"])
        elif kind == "failed":
            self.kv_failures.labels(kw["reason"]).inc()

    def request_done(self, out, finish_reason: str | None, arrival: float, now: float,
                     token_times: list[float]) -> None:
        m = self.model
        if out.first_token_time is not None:
            self.ttft.labels(m).observe(max(0.0, out.first_token_time - arrival))
        for a, b in zip(token_times, token_times[1:]):
            self.itl.labels(m).observe(b - a)
        self.e2e.labels(m).observe(now - arrival)
        if finish_reason:
            self.success.labels(m, finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
