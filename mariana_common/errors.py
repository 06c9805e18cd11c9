"""Domain errors. Domain code raises these and never imports grpc; the one
interceptor in `interceptors.py` turns them into gRPC status codes."""

from __future__ import annotations


class MarianaError(Exception):
    """Base of every error a client may see. The message is shown to it;
    `reason`, when set, is the machine-readable code (OpenAI's `error.code`,
    e.g. "insufficient_quota"), sent as a google.rpc.ErrorInfo detail."""

    reason: str | None = None


class InvalidArgument(MarianaError):
    """The request is malformed or asks for something impossible."""


class Unauthenticated(MarianaError):
    """No valid credential."""


class PermissionDenied(MarianaError):
    """A valid credential that may not do this."""


class NotFound(MarianaError):
    """The named thing does not exist."""


class AlreadyExists(MarianaError):
    """The thing to create exists already."""


class ResourceExhausted(MarianaError):
    """A limit or a queue is full; the client may retry later."""

    def __init__(self, message: str, retry_after_s: float | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


class Unavailable(MarianaError):
    """A dependency cannot serve now; the client may retry (after `retry_after_s`, if known)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(MarianaError):
    """The request ran out of time."""
