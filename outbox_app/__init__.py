"""The example image application: its projectors (the OCR and embedding workers, the search
and task-cache views), the HTTP API, uploads, the reconciler and the demo. It writes only to
PostgreSQL (through `outbox_images.store`); its views are derived from the log."""
