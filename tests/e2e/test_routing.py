"""The model catalog through the edge: edited while the platform runs, and a
model no pool can serve answered with a clean 503 and Retry-After."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import yaml

from tests.e2e.conftest import MODEL, Platform, TenantKey

pytestmark = pytest.mark.e2e


def listed_models(platform: Platform, key: TenantKey) -> set[str]:
    return {m.id for m in platform.openai(key.secret).models.list()}


@pytest.fixture
def ghost_model(platform: Platform, tenant_key: TenantKey) -> Iterator[str]:
    """A model whose only pool's upstream does not exist, added to the catalog
    (and taken out again: later tests see the catalog as it was)."""
    original = platform.catalog.read_text()
    catalog = yaml.safe_load(original)
    catalog["pools"]["nowhere"] = {"upstream": "inference-that-does-not-exist", "model": "ghost"}
    catalog["models"]["ghost"] = {"pools": ["nowhere"], "aliases": ["spectre"]}
    platform.catalog.write_text(yaml.safe_dump(catalog))
    yield "ghost"
    platform.catalog.write_text(original)
    deadline = time.monotonic() + 10
    while "ghost" in listed_models(platform, tenant_key) and time.monotonic() < deadline:
        time.sleep(0.2)


def test_an_edited_catalog_applies_without_restart_and_unservable_models_get_503(
    platform: Platform, tenant_key: TenantKey, ghost_model: str
) -> None:
    client = platform.openai(tenant_key.secret)
    deadline = time.monotonic() + 10
    while ghost_model not in listed_models(platform, tenant_key):
        assert time.monotonic() < deadline, "the catalog edit was not picked up"
        time.sleep(0.2)
    reply = httpx.post(
        f"http://{platform.edge}/v1/chat/completions",
        headers={"Authorization": f"Bearer {tenant_key.secret}"},
        json={"model": "spectre", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=30,
    )
    assert reply.status_code == 503, reply.text
    assert int(reply.headers["retry-after"]) >= 1
    assert "no pool can serve 'ghost'" in reply.text
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=ghost_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    # The rest of the catalog keeps serving.
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")
