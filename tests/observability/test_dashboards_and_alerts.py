"""The dashboard and the alert rules refer only to series the platform
exports, and the rules are well-formed (promtool checks them too when it is
installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import mariana_common.metrics
import services.auth.ext_authz
import services.billing.consumer
import services.moderation.servicer
import services.router.metrics
from launcher.settings import REPO
from services.inference.metrics import register_engines

OBSERVABILITY = REPO / "observability"
SERIES = re.compile(r"\b((?:mariana|envoy)_[a-z0-9_]+)\b")
MODULES = (mariana_common.metrics, services.auth.ext_authz, services.billing.consumer, services.moderation.servicer)


def known_series() -> set[str]:
    assert all(MODULES) and services.router.metrics  # imported for the metrics they register
    if not any(type(c).__name__ == "EngineCollector" for c in REGISTRY._collector_to_names):
        register_engines({})
    names = set()
    for family in REGISTRY.collect():
        names |= {family.name + suffix for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    return names


def unknown_series(expr: str, known: set[str]) -> set[str]:
    return {s for s in SERIES.findall(expr) if s.startswith("mariana_") and s not in known}


def test_alert_rules_are_complete_and_name_real_series() -> None:
    rules = yaml.safe_load((OBSERVABILITY / "alerts.yml").read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {"MarianaHighErrorRate", "MarianaSlowRequests", "MarianaBreakerOpen", "MarianaBudgetsExhausted"} <= names
    assert "MarianaLedgerLag" in names
    known = known_series()
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["for"], rule["alert"]
        assert not unknown_series(rule["expr"], known), rule["alert"]


def test_dashboard_panels_query_real_series() -> None:
    dashboard = json.loads((OBSERVABILITY / "grafana" / "mariana.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 12
    known = known_series()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert not unknown_series(target["expr"], known), panel["title"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_and_the_scrape_config(tmp_path: Path) -> None:
    for check in (["rules", str(OBSERVABILITY / "alerts.yml")], ["config", str(OBSERVABILITY / "prometheus.yml")]):
        result = subprocess.run(["promtool", "check", *check], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout
