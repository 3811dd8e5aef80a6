"""Prometheus metrics of the projectors."""

from prometheus_client import Counter, Gauge, Histogram

APPLIED = Counter("outbox_projector_events_applied_total", "events applied", ["projector"])
DEAD_LETTERS = Counter("outbox_projector_dead_letters_total", "messages sent to the DLQ",
                       ["projector"])
RETRIES = Counter("outbox_projector_retries_total", "batch retries after an error",
                  ["projector"])
LAG_SECONDS = Gauge("outbox_projector_lag_seconds",
                    "now minus occurred_at of the last applied event", ["projector"])
BATCH_SECONDS = Histogram("outbox_projector_batch_seconds", "time to apply one batch",
                          ["projector"])
OCR_RUNS = Counter("outbox_ocr_engine_runs_total", "images read by the OCR engine")
EMBEDDING_TEXTS = Counter("outbox_embedding_texts_total", "texts embedded by the model")
