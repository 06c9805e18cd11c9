"""What the error interceptor makes of a failure: a status for the caller, or,
when the caller is already gone, a cancellation (not an error of ours)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import structlog.testing

from mariana_common.interceptors import _abort_for


class Context:
    """The two things `_abort_for` asks of a servicer context."""

    def __init__(self, cancelled: bool) -> None:
        self._cancelled = cancelled
        self.aborted: tuple[Any, ...] | None = None

    def cancelled(self) -> bool:
        return self._cancelled

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


async def test_a_failure_after_the_caller_went_away_is_a_cancellation() -> None:
    context = Context(cancelled=True)
    with structlog.testing.capture_logs() as logs, pytest.raises(asyncio.CancelledError):
        await _abort_for(RuntimeError("execute_batch failed"), context)  # type: ignore[arg-type]
    assert context.aborted is None
    assert [(e["event"], e["log_level"]) for e in logs] == [("caller went away", "info")]


async def test_a_failure_while_the_caller_waits_is_internal_and_logged() -> None:
    context = Context(cancelled=False)
    with structlog.testing.capture_logs() as logs, pytest.raises(grpc.aio.AbortError):
        await _abort_for(RuntimeError("a bug"), context)  # type: ignore[arg-type]
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.INTERNAL
    assert [(e["event"], e["log_level"]) for e in logs] == [("call failed", "error")]
