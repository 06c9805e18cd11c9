"""The usage stream contract between the router (producer) and billing
(consumer): where events go and how one is encoded in a stream entry."""

from __future__ import annotations

from google.protobuf.message import DecodeError
from pydantic import Field

from mariana.billing.v1.billing_pb2 import UsageEvent
from mariana_common.settings import RedisSettings

EVENT_FIELD = b"event"


class UsageStreamSettings(RedisSettings):
    usage_stream: str = Field("mariana:usage", description="Redis Stream of usage events.")


def encode(event: UsageEvent) -> dict[bytes, bytes]:
    return {EVENT_FIELD: event.SerializeToString()}


def decode(fields: dict[bytes, bytes]) -> UsageEvent:
    """Raises ValueError when the entry is not a usage event."""
    raw = fields.get(EVENT_FIELD)
    if raw is None:
        raise ValueError("stream entry has no 'event' field")
    event = UsageEvent()
    try:
        event.ParseFromString(raw)
    except DecodeError as error:
        raise ValueError(f"undecodable usage event: {error}") from error
    if not event.request_id or not event.tenant_id or not event.key_id:
        raise ValueError("usage event lacks request_id, tenant_id or key_id")
    return event
