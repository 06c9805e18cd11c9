"""Every service's /metrics and Envoy's stats, scraped around a request: the
named series exist and move. And the live summary reads them."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from launcher.settings import REPO
from launcher.top import scrape, total
from tests.e2e.conftest import MODEL, Platform, TenantKey

pytestmark = pytest.mark.e2e

CHAT = "/mariana.llm.v1.LlmService/CreateChatCompletion"


def endpoints(platform: Platform) -> dict[str, str]:
    return {name: url for name, (_, url) in platform.stack.metrics.items()}


def test_every_service_exports_metrics_that_move(platform: Platform, tenant_key: TenantKey) -> None:
    names = set(endpoints(platform))
    assert {"auth", "router", "inference", "moderation", "billing", "envoy"} <= names
    before = scrape(endpoints(platform))
    assert set(before) == names  # every endpoint answers
    client = platform.openai(tenant_key.secret)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi there"}], max_tokens=4)

    def moved(series: str, **match: str) -> bool:
        return total(scrape(endpoints(platform)), series, **match) > total(before, series, **match)

    assert moved("mariana_rpc_calls_total", method=CHAT, code="OK")  # router RED
    assert moved("mariana_rpc_duration_seconds_count", method=CHAT)
    assert moved("mariana_router_time_to_first_token_seconds_count")
    assert moved("mariana_router_tokens_total", kind="completion")
    assert moved("mariana_router_reservations_total", result="reserved")
    assert moved("mariana_auth_checks_total", result="allowed")
    assert moved("mariana_moderation_verdicts_total", direction="input")
    assert moved("mariana_inference_tokens_generated_total", model=MODEL)
    assert moved("envoy_cluster_upstream_rq_total", envoy_cluster_name="router")
    after = scrape(endpoints(platform))
    assert total(after, "mariana_inference_batch_free_slots", model=MODEL) > 0  # a gauge read at scrape time
    deadline = time.monotonic() + 15
    while not moved("mariana_billing_events_applied_total"):  # usage reaches the ledger asynchronously
        assert time.monotonic() < deadline, "billing never applied the usage"
        time.sleep(0.2)


def test_the_live_summary_reads_the_running_platform(platform: Platform) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.top",
            "--once",
            "--interval",
            "0.5",
            "--data-dir",
            str(platform.stack.data_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "req/s" in result.stdout and "ledger lag" in result.stdout
