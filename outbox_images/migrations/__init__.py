"""The image domain's migration history (registered under `outbox.migrations`)."""

from pathlib import Path

from outbox.grants import RoleGrants, on_table
from outbox.migrate import MigrationHistory

# Only the application's processes (the API, the reconciler, the OCR and embedding workers)
# touch the image tables; the relay reads none of them.
HISTORY = MigrationHistory(
    "images", Path(__file__).resolve().parent, "image_schema_version",
    RoleGrants(app=(*(on_table(t, "SELECT, INSERT, UPDATE, DELETE")
                      for t in ("image", "image_event", "result_cache")),
                    on_table("continuous_audit", "SELECT, UPDATE"))))
