"""Which errors are outages to wait out, rather than faults of one message: the generic
part, which every projector gets.

While a sink is down or overloaded, every batch fails the same way: the runtime keeps the
batch and retries it for as long as that lasts, instead of dead-lettering good messages. A
projector adds the errors of its own sinks' clients through its spec (`ProjectorSpec.transient`).
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy.exc

TransientCheck = Callable[[BaseException], bool]


class SinkUnavailable(RuntimeError):
    """A sink cannot take writes right now for a reason it reported itself (its index is
    missing, it refused items as overloaded): waited out like a lost connection."""


TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    SinkUnavailable,
    OSError,  # ConnectionError, TimeoutError, and the clients' errors built on them
    sqlalchemy.exc.OperationalError,  # lost connection, deadlock, serialization failure
)


def is_transient(exc: BaseException) -> bool:
    """True when `exc` is one of the outages any projector waits out."""
    return isinstance(exc, TRANSIENT_TYPES)


def transient_check(declared: tuple[type[BaseException], ...] | TransientCheck
                    ) -> TransientCheck:
    """The generic check combined with a projector's own: a tuple of exception types, or
    a function of the exception."""
    if isinstance(declared, tuple):
        types = declared
        return lambda exc: is_transient(exc) or isinstance(exc, types)
    check = declared
    return lambda exc: is_transient(exc) or check(exc)
