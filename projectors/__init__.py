"""Projectors: Kafka -> effects (OCR and embedding workers, search and task-cache views)."""
