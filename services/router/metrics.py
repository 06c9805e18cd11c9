"""The router's Prometheus metrics (RED per RPC comes from mariana_common)."""

from prometheus_client import Counter, Gauge, Histogram

from mariana_common.metrics import LATENCY_BUCKETS

ROUTE_STEPS = Counter(
    "mariana_router_route_steps_total",
    "Steps of the fallback chain: primary, fallback, cache, stale_cache, unavailable, broken_stream, retry, "
    "breaker_open, bulkhead_full.",
    ["step"],
)
BREAKER_STATE = Gauge(
    "mariana_router_breaker_state", "Circuit breaker per pool: 0 closed, 1 half-open, 2 open.", ["pool"]
)
CACHE_LOOKUPS = Counter("mariana_router_cache_lookups_total", "Answer-cache lookups by result.", ["result"])
RESERVATIONS = Counter(
    "mariana_router_reservations_total",
    "Admission decisions: reserved, refused_budget, refused_tokens, unreserved (Redis away).",
    ["result"],
)
RESERVATIONS_OVERLAPPED = Counter(
    "mariana_router_reservations_overlapped_total",
    "Reservations made side by side with the inference call, by outcome: reserved, refused (an inference call "
    "started and cancelled), unreserved (Redis away, failing open), failed.",
    ["result"],
)
SPOOL_DEPTH = Gauge("mariana_router_usage_spool_depth", "Usage records on disk waiting for Redis.")
TIME_TO_FIRST_TOKEN = Histogram(
    "mariana_router_time_to_first_token_seconds",
    "From the request to its first generated piece.",
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter("mariana_router_tokens_total", "Tokens of finished requests, by model and kind.", ["model", "kind"])
