"""The continuous audit's position and last results, and the index its changed-rows walk
reads (`updated_at`, then `id`, in keyset order).

Revision ID: image_0005
Revises: image_0004
"""

from alembic import op

revision = "image_0005"
down_revision = "image_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE continuous_audit (
            name text PRIMARY KEY,
            watermark_at timestamptz,
            watermark_id uuid,
            slice_after uuid,
            cycle_started_at timestamptz,
            last_cycle_s double precision,
            last_pass_at timestamptz,
            last_pass_s double precision,
            last_pass_rows integer NOT NULL DEFAULT 0,
            passes bigint NOT NULL DEFAULT 0,
            open_drift jsonb NOT NULL DEFAULT '{}',
            drift_passes jsonb NOT NULL DEFAULT '{}'
        )""")
    # The one row the reconcilers share: the application's role only reads and updates it.
    op.execute("INSERT INTO continuous_audit (name) VALUES ('images')")
    op.execute("CREATE INDEX image_updated_at_idx ON image (updated_at, id)")


def downgrade() -> None:
    op.execute("DROP INDEX image_updated_at_idx")
    op.execute("DROP TABLE continuous_audit")
