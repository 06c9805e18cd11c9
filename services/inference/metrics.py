"""Inference's Prometheus metrics: batch and KV-cache state read from the
engines at scrape time, tokens generated, time to first token."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mariana_common.metrics import LATENCY_BUCKETS
from services.inference.engine import ChatEngine

TOKENS_GENERATED = Counter("mariana_inference_tokens_generated_total", "Completion tokens sent, by model.", ["model"])
TIME_TO_FIRST_TOKEN = Histogram(
    "mariana_inference_time_to_first_token_seconds",
    "From a Generate call to its first piece, by model.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)


class EngineCollector(Collector):
    """Queue depth, batch size, free slots and reserved KV tokens per model."""

    def __init__(self, engines: Mapping[str, ChatEngine]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily]:
        names = {
            "running": ("mariana_inference_batch_running", "Sequences decoding."),
            "prefilling": ("mariana_inference_batch_prefilling", "Sequences being prefilled."),
            "waiting": ("mariana_inference_queue_waiting", "Admitted requests waiting for a slot."),
            "free_slots": ("mariana_inference_batch_free_slots", "Free batch slots."),
            "kv_tokens_reserved": ("mariana_inference_kv_tokens_reserved", "KV-cache budget in use (tokens)."),
        }
        families = {field: GaugeMetricFamily(name, doc, labels=["model"]) for field, (name, doc) in names.items()}
        for model, engine in self._engines.items():
            stats = engine.stats()
            for field, family in families.items():
                family.add_metric([model], float(getattr(stats, field)))
        yield from families.values()


def register_engines(engines: Mapping[str, ChatEngine]) -> None:
    REGISTRY.register(EngineCollector(engines))
