"""Errors the core raises for bad requests; the services map them to gRPC status codes."""


class InvalidArgument(ValueError):
    """The request is malformed (maps to INVALID_ARGUMENT)."""


class FailedPrecondition(RuntimeError):
    """The request does not fit the session's state (maps to FAILED_PRECONDITION)."""


class ResourceExhausted(RuntimeError):
    """A limit is reached, e.g. sessions per service (maps to RESOURCE_EXHAUSTED).
    `retry_after_ms`, when known, travels as trailing metadata `retry-after-ms`."""

    def __init__(self, message: str, retry_after_ms: int | None = None):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(RuntimeError):
    """The caller's deadline passed before the work was done (maps to DEADLINE_EXCEEDED)."""


class Unavailable(RuntimeError):
    """A service this one depends on is not reachable (maps to UNAVAILABLE)."""


class Unimplemented(RuntimeError):
    """The request asks for something this server does not do yet (maps to UNIMPLEMENTED)."""
