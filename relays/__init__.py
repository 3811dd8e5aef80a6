"""Relays: PostgreSQL outbox -> Kafka, by logical decoding or by polling."""
