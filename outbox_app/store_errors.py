"""The outages of the built-in projectors' stores (S3, Elasticsearch, Redis): errors of
their clients that say the store is unreachable or overloaded, not that the data is bad.

A process installed with one extra has only its own stores' clients. An error can only be an
instance of a client's class once that client was imported, so each client's error classes
are looked up among the imported modules, never imported here."""

from __future__ import annotations

import sys

from projectors.transient_errors import is_transient

# Module, then the names of its error classes that mean an outage.
STORE_OUTAGE_NAMES: dict[str, tuple[str, ...]] = {
    # A connection cut mid-request or mid-body (ConnectionClosedError, ReadTimeoutError,
    # ResponseStreamingError are HTTPClientErrors), and a body shorter than announced.
    "botocore.exceptions": ("ConnectionError", "HTTPClientError", "IncompleteReadError"),
    "elastic_transport": ("ConnectionError", "ConnectionTimeout"),
    # OutOfMemoryError: maxmemory reached, writes come back once it frees.
    "redis.exceptions": ("ConnectionError", "TimeoutError", "OutOfMemoryError"),
}

# Elasticsearch answers these while overloaded or starting.
TRANSIENT_HTTP_STATUSES = frozenset({429, 502, 503, 504})
# An object store's own failures (500 InternalError, 503 SlowDown): retried, as its
# documentation asks.
TRANSIENT_S3_STATUSES = TRANSIENT_HTTP_STATUSES | {500}


def _imported(module: str, name: str) -> type[BaseException] | None:
    """The class `module.name`, when that module is imported."""
    loaded = sys.modules.get(module)
    return None if loaded is None else getattr(loaded, name)


def store_outage_types() -> tuple[type[BaseException], ...]:
    """The outage classes of the clients imported so far."""
    return tuple(cls for module, names in STORE_OUTAGE_NAMES.items() for name in names
                 if (cls := _imported(module, name)) is not None)


def is_store_outage(exc: BaseException) -> bool:
    """True when `exc` says S3, Elasticsearch or Redis is unreachable or overloaded."""
    if isinstance(exc, store_outage_types()):
        return True
    client_error = _imported("botocore.exceptions", "ClientError")
    if client_error is not None and isinstance(exc, client_error):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in TRANSIENT_S3_STATUSES
    api_error = _imported("elasticsearch", "ApiError")
    return (api_error is not None and isinstance(exc, api_error)
            and exc.meta.status in TRANSIENT_HTTP_STATUSES)


def is_outage(exc: BaseException) -> bool:
    """A generic outage (see `transient_errors`) or one of these stores'."""
    return is_transient(exc) or is_store_outage(exc)
