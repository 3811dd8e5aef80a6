"""Projectors: the consumer runtime that applies Kafka events to a sink, the command that runs
an installed projector by name, dead letters and view rebuilds."""
