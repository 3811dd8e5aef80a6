"""`emit` and the event envelope."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from outbox import NoTransactionError, emit
from outbox.envelope import SCHEMA_PATH, EventEnvelope, envelope_json_schema
from outbox.tables import outbox_table
from outbox_images.tables import image_table


def _counts(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return (
            conn.execute(select(func.count()).select_from(image_table)).scalar_one(),
            conn.execute(select(func.count()).select_from(outbox_table)).scalar_one(),
        )


def _insert_image(conn, image_id: uuid.UUID) -> None:
    conn.execute(
        insert(image_table).values(
            id=image_id, org_id="o", state="requested", version=1, filename="a.png",
            content_type="image/png", declared_size=1, object_key="k",
        )
    )


class Boom(Exception):
    pass


def test_rollback_after_emit_leaves_no_trace(engine):
    image_id = uuid.uuid4()
    with pytest.raises(Boom), engine.begin() as conn:
        _insert_image(conn, image_id)
        emit(conn, aggregate_type="image", aggregate_id=image_id, type="image.requested",
             payload={"id": str(image_id)}, aggregate_version=1, org_id="o")
        raise Boom
    assert _counts(engine) == (0, 0)


def test_commit_keeps_change_and_event(engine):
    image_id = uuid.uuid4()
    with Session(engine) as session, session.begin():
        _insert_image(session, image_id)
        event_id = emit(session, aggregate_type="image", aggregate_id=image_id,
                        type="image.requested", payload={"n": 1}, aggregate_version=1,
                        org_id="o", headers={"x-source": "test"})
    assert _counts(engine) == (1, 1)
    with engine.connect() as conn:
        row = conn.execute(select(outbox_table)).mappings().one()
    assert row["id"] == event_id
    assert row["aggregate_id"] == str(image_id)
    assert row["payload"] == {"n": 1}
    assert row["headers"]["x-source"] == "test"
    version, trace, span, flags = row["headers"]["traceparent"].split("-")
    assert (version, len(trace), len(span), flags) == ("00", 32, 16, "01")
    assert row["published_at"] is None


def test_emit_outside_a_transaction_is_refused(engine):
    with Session(engine) as session, pytest.raises(NoTransactionError):
        emit(session, aggregate_type="image", aggregate_id="1", type="t", payload={})
    assert _counts(engine) == (0, 0)


def test_published_schema_matches_the_envelope():
    assert json.loads(SCHEMA_PATH.read_text()) == envelope_json_schema()


def test_envelope_round_trip_uses_schema_key():
    env = EventEnvelope(id=uuid.uuid4(), type="image.uploaded", aggregate_type="image",
                        aggregate_id="a", aggregate_version=2, org_id="o",
                        occurred_at="2026-01-01T00:00:00Z", payload={"state": "uploaded"})
    raw = json.loads(env.to_json())
    assert raw["schema"] == 1 and "schema_version" not in raw
    assert EventEnvelope.from_json(env.to_json()) == env
    with pytest.raises(ValueError):
        EventEnvelope.from_json(b'{"id": "not-a-uuid"}')
