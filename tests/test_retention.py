"""Derived tables stay bounded, and a deleted image leaves no OCR text behind."""

from __future__ import annotations

import uuid

import psycopg
from sqlalchemy import func, select, text

from outbox.db import libpq_dsn
from outbox.tables import outbox_table
from outbox_app.reconciler import Reconciler
from outbox_images.storage import s3_client
from outbox_images.store import create_image, delete
from outbox_images.tables import result_cache_table
from relays.janitor import purge_processed_events


def test_old_tracking_records_are_purged(migrated, engine):
    with engine.begin() as conn:
        conn.execute(text("insert into processed_event (consumer, event_id, processed_at) values"
                          " ('ocr', gen_random_uuid(), now() - interval '8 days'),"
                          " ('ocr', gen_random_uuid(), now())"))
    with psycopg.connect(libpq_dsn(migrated), autocommit=True) as conn:
        assert purge_processed_events(conn, 7 * 86400) == 1
    with engine.connect() as conn:
        assert conn.execute(text("select count(*) from processed_event")).scalar() == 1


def test_old_cached_results_are_purged_by_the_reconciler(api_settings, engine):
    with engine.begin() as conn:
        conn.execute(text("insert into result_cache (kind, checksum, engine, result, created_at)"
                          " values ('ocr', 'old', 'e', '{}', now() - interval '31 days'),"
                          " ('ocr', 'new', 'e', '{}', now())"))
    done = Reconciler(api_settings, engine, s3_client(api_settings)).run_once()
    assert done["result_cache_purged"] == 1
    with engine.connect() as conn:
        left = conn.execute(select(result_cache_table.c.checksum)).scalars().all()
    assert left == ["new"]


def test_deleting_an_image_drops_its_ocr_text_and_cached_result(api_settings, engine):
    image_id = uuid.uuid4()
    with engine.begin() as conn:
        row = create_image(conn, api_settings, image_id=image_id, org_id="o",
                           filename="a.png", content_type="image/png", declared_size=1,
                           object_key="k")
        conn.execute(text("update image set ocr = :ocr where id = :id"),
                     {"ocr": '{"text": "secret", "checksum": "c1"}', "id": image_id})
        conn.execute(text("insert into result_cache (kind, checksum, engine, result) values"
                          " ('ocr', 'c1', 'e', :result)"), {"result": '{"text": "secret"}'})
    with engine.begin() as conn:
        row = conn.execute(text("select * from image where id = :id"),
                           {"id": image_id}).mappings().one()
        deleted = delete(conn, row, api_settings)
    assert deleted["state"] == "deleted" and deleted["ocr"] is None
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(result_cache_table)).scalar() == 0
        last = conn.execute(select(outbox_table.c.payload).order_by(outbox_table.c.seq.desc())
                            .limit(1)).scalar_one()
    assert last["state"] == "deleted" and last["ocr"] is None and "secret" not in str(last)
