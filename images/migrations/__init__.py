"""The image domain's migration history (registered under `outbox.migrations`)."""

from pathlib import Path

from outbox.migrate import MigrationHistory

HISTORY = MigrationHistory("images", Path(__file__).resolve().parent, "image_schema_version")
