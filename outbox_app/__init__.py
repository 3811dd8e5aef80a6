"""The example image application: HTTP API, uploads, the reconciler and the demo. It writes
only to PostgreSQL (through `outbox_images.store`) and reads the views (`projectors.views`)."""
