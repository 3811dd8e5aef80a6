"""The publication of an outbox schema: one idempotent statement that makes it publish the
outbox's inserts, creating or repairing it.

The schema's owner runs it (the third migration, and every `outbox migrate`), so a relay
needs no ownership of the outbox table; a relay whose role does own it runs the same
statement to heal a publication someone dropped or changed.
"""

from __future__ import annotations

from outbox.pg_names import OUTBOX_TABLE, publication_name


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def ensure_publication_sql(schema: str) -> str:
    """A DO block that creates the schema's publication for inserts into its outbox, or
    repairs one that no longer publishes them; it changes nothing when all is in place.
    `schema` must be a checked plain identifier (`outbox.db.checked_schema`)."""
    pub = publication_name(schema)
    table = f'"{schema}".{OUTBOX_TABLE}'
    return f"""
DO $publication$
DECLARE
    pub_oid oid;
    pub_insert boolean;
    pub_all_tables boolean;
BEGIN
    SELECT p.oid, p.pubinsert, p.puballtables INTO pub_oid, pub_insert, pub_all_tables
    FROM pg_catalog.pg_publication p WHERE p.pubname = {_literal(pub)};
    IF NOT FOUND THEN
        CREATE PUBLICATION "{pub}" FOR TABLE {table} WITH (publish = 'insert');
        RETURN;
    END IF;
    IF NOT pub_insert THEN
        ALTER PUBLICATION "{pub}" SET (publish = 'insert');
    END IF;
    IF NOT pub_all_tables AND NOT EXISTS (
            SELECT 1 FROM pg_catalog.pg_publication_rel r
            WHERE r.prpubid = pub_oid AND r.prrelid = {_literal(table)}::regclass) THEN
        ALTER PUBLICATION "{pub}" ADD TABLE {table};
    END IF;
END
$publication$;
"""
