"""outbox-sidecar: a transactional outbox with change data capture.

The application writes only to PostgreSQL: each state change and its outbox row commit in one
transaction (`emit`); relays publish the rows to Kafka; projectors derive everything else.
"""

from outbox.emit import NoTransactionError, emit

__all__ = ["NoTransactionError", "emit"]
