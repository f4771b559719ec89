"""The service's error types, each carrying the HTTP status the API answers with.

Raising a typed error where the problem is found (a codec, the broker) and mapping it to a status
in one place keeps every bad input a 4xx with a message naming the problem, never a 500.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `status` is the HTTP status, `message` says what was wrong."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadInput(ServiceError):
    """The request's content is invalid (422 by default; 400 for undecodable encodings)."""

    status = 422


class UnsupportedMedia(ServiceError):
    """The body is not in a format this endpoint takes."""

    status = 415


class PayloadTooLarge(ServiceError):
    """The body, or an image's pixel count, exceeds a configured limit."""

    status = 413


class NotAcceptable(ServiceError):
    """The response format asked for in `Accept` cannot hold this result."""

    status = 406


class RequestTimeout(ServiceError):
    """The client did not send its request (headers or body) in time; the connection is closed."""

    status = 408


class QueueFull(ServiceError):
    """The task's queue is at `QUEUE_MAX_LEN`; the client should retry after `retry_after_s`."""

    status = 429

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ClientGone(ServiceError):
    """The client disconnected before its answer was ready; its jobs were cancelled.

    499 is the status proxies use for "client closed request": the metrics can then tell a client
    that went away from a failure of the service, and no 5xx alert fires for it.
    """

    status = 499


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its result came back; the job is cancelled."""

    status = 504


class Unavailable(ServiceError):
    """Redis (or the whole backend) cannot be reached right now."""

    status = 503


class JobFailed(ServiceError):
    """A worker could not run the job, or it was dead-lettered after too many deliveries."""

    status = 500
