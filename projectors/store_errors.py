"""The outages of the built-in projectors' stores (S3, Elasticsearch, Redis): errors of
their clients that say the store is unreachable or overloaded, not that the data is bad."""

from __future__ import annotations

import botocore.exceptions
import elastic_transport
import redis.exceptions
from elasticsearch import ApiError

from projectors.transient_errors import is_transient

STORE_OUTAGE_TYPES: tuple[type[BaseException], ...] = (
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


def is_store_outage(exc: BaseException) -> bool:
    """True when `exc` says S3, Elasticsearch or Redis is unreachable or overloaded."""
    if isinstance(exc, STORE_OUTAGE_TYPES):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in TRANSIENT_S3_STATUSES
    return isinstance(exc, ApiError) and exc.meta.status in TRANSIENT_HTTP_STATUSES


def is_outage(exc: BaseException) -> bool:
    """A generic outage (see `transient_errors`) or one of these stores'."""
    return is_transient(exc) or is_store_outage(exc)
