"""The image resource and the workers' result cache.

Revision ID: image_0001
Revises:
"""

from alembic import op

revision = "image_0001"
down_revision = None
branch_labels = None
depends_on = None

IMAGE = """
CREATE TABLE image (
    id uuid PRIMARY KEY,
    org_id text NOT NULL,
    state text NOT NULL,
    version bigint NOT NULL,
    filename text NOT NULL,
    content_type text NOT NULL,
    declared_size bigint NOT NULL,
    checksum_sha256 text,
    object_key text NOT NULL,
    object_size bigint,
    metadata jsonb,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    ocr jsonb,
    embedding jsonb,
    deadline_at timestamptz,
    state_entered_at timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The reconciler reads only what is due: work proportional to that, not to the table.
CREATE INDEX image_deadline_idx ON image (deadline_at) WHERE deadline_at IS NOT NULL;
CREATE INDEX image_org_listing_idx ON image (org_id, created_at, id);
CREATE INDEX image_org_state_listing_idx ON image (org_id, state, created_at, id);
"""

# OCR and embedding results by (kind, content checksum, engine/model version): an identical
# image or text, or a replay, never redoes the work.
RESULT_CACHE = """
CREATE TABLE result_cache (
    kind text NOT NULL,
    checksum text NOT NULL,
    engine text NOT NULL,
    result jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, checksum, engine)
);
"""


def upgrade() -> None:
    op.execute(IMAGE)
    op.execute(RESULT_CACHE)


def downgrade() -> None:
    op.execute("DROP TABLE result_cache, image")
