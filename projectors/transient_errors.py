"""Which sink errors are outages to wait out, rather than faults of one message.

A projector's sinks are PostgreSQL, S3, Elasticsearch and Redis. While one of them is down
or overloaded, every batch fails the same way: the runtime keeps the batch and retries it
for as long as that lasts, instead of dead-lettering good messages.
"""

from __future__ import annotations

import botocore.exceptions
import elastic_transport
import redis.exceptions
import sqlalchemy.exc
from elasticsearch import ApiError


class SinkUnavailable(RuntimeError):
    """A sink cannot take writes right now for a reason it reported itself (its index is
    missing, it refused items as overloaded): waited out like a lost connection."""


TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    SinkUnavailable,
    OSError,  # ConnectionError, TimeoutError and the vendored HTTP timeouts of botocore
    sqlalchemy.exc.OperationalError,  # lost connection, deadlock, serialization failure
    botocore.exceptions.ConnectionError,
    # A connection cut mid-request or mid-body (ConnectionClosedError, ReadTimeoutError,
    # ResponseStreamingError), and a body shorter than announced.
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    elastic_transport.ConnectionError,
    elastic_transport.ConnectionTimeout,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,  # maxmemory reached: writes come back once it frees
)

# Elasticsearch answers these while overloaded or starting.
TRANSIENT_HTTP_STATUSES = frozenset({429, 502, 503, 504})
# An object store's own failures (500 InternalError, 503 SlowDown): retried, as its
# documentation asks.
TRANSIENT_S3_STATUSES = TRANSIENT_HTTP_STATUSES | {500}


def is_transient(exc: BaseException) -> bool:
    """True when `exc` says a sink is unreachable or overloaded, not that the data is bad."""
    if isinstance(exc, TRANSIENT_TYPES):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in TRANSIENT_S3_STATUSES
    return isinstance(exc, ApiError) and exc.meta.status in TRANSIENT_HTTP_STATUSES
