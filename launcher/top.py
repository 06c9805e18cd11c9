"""A live summary of the running platform from its metrics endpoints (the
launcher writes them to `<data dir>/metrics.json`): requests/s, p50/p95,
errors, cache hit ratio, tokens/s, and the state worth a glance (breakers,
queues, spool, ledger lag). Every figure is a difference of two scrapes.

    .venv/bin/python -m launcher.top [--interval 2] [--once]
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from launcher.settings import LauncherSettings

Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]
PUBLIC_API = "/mariana.llm.v1.LlmService/"


def scrape(endpoints: dict[str, str]) -> dict[str, Sample]:
    """process name -> {(series, labels): value}; a process that does not answer is left out."""
    scraped: dict[str, Sample] = {}
    for name, url in endpoints.items():
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                text = reply.read().decode()
        except OSError:
            continue
        sample: Sample = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                sample[(s.name, tuple(sorted(s.labels.items())))] = s.value
        scraped[name] = sample
    return scraped


def total(scraped: dict[str, Sample], series: str, **match: str) -> float:
    return sum(
        value
        for sample in scraped.values()
        for (name, labels), value in sample.items()
        if name == series and all(dict(labels).get(k, "").startswith(v) for k, v in match.items())
    )


def quantile(before: dict[str, Sample], after: dict[str, Sample], q: float) -> float | None:
    """From the public API's latency histogram buckets, over the interval."""
    buckets: dict[float, float] = defaultdict(float)
    for scraped, sign in ((after, 1), (before, -1)):
        for sample in scraped.values():
            for (name, labels), value in sample.items():
                label = dict(labels)
                if name == "mariana_rpc_duration_seconds_bucket" and label.get("method", "").startswith(PUBLIC_API):
                    buckets[float(label["le"])] += sign * value
    ordered = sorted(buckets.items())
    count = ordered[-1][1] if ordered else 0
    if count <= 0:
        return None
    for bound, cumulative in ordered:
        if cumulative >= q * count:
            return bound
    return None


def summary(before: dict[str, Sample], after: dict[str, Sample], seconds: float) -> str:
    def delta(series: str, **match: str) -> float:
        return total(after, series, **match) - total(before, series, **match)

    calls = delta("mariana_rpc_calls_total", method=PUBLIC_API)
    ok = delta("mariana_rpc_calls_total", method=PUBLIC_API, code="OK")
    hits = delta("mariana_router_cache_lookups_total", result="hits")
    misses = delta("mariana_router_cache_lookups_total", result="misses")
    tokens = delta("mariana_router_tokens_total", kind="completion")
    p50, p95 = quantile(before, after, 0.5), quantile(before, after, 0.95)
    open_breakers = sum(
        1
        for sample in after.values()
        for (name, _), value in sample.items()
        if name == "mariana_router_breaker_state" and value > 0
    )

    def ms(value: float | None) -> str:
        return "-" if value is None else f"<={value * 1000:.0f}ms"

    ratio = f"{hits / (hits + misses):.0%}" if hits + misses else "-"
    return (
        f"{calls / seconds:7.1f} req/s  p50 {ms(p50)}  p95 {ms(p95)}  errors {calls - ok:.0f}  "
        f"cache hits {ratio}  {tokens / seconds:7.1f} tok/s  breakers open {open_breakers}  "
        f"waiting {total(after, 'mariana_inference_queue_waiting'):.0f}  "
        f"free slots {total(after, 'mariana_inference_batch_free_slots'):.0f}  "
        f"spool {total(after, 'mariana_router_usage_spool_depth'):.0f}  "
        f"ledger lag {total(after, 'mariana_billing_consumer_lag_events'):.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--once", action="store_true", help="one line, then exit")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: the launcher's data dir")
    args = parser.parse_args()
    data_dir = args.data_dir or LauncherSettings().data_dir
    path = data_dir / "metrics.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: is the platform running (make run)?")
    endpoints = {name: url for name, url in json.loads(path.read_text()).items() if name != "envoy"}
    before = scrape(endpoints)
    while True:
        time.sleep(args.interval)
        after = scrape(endpoints)
        print(summary(before, after, args.interval), flush=True)
        if args.once:
            return
        before = after


if __name__ == "__main__":
    main()
