"""Cached OCR and embedding results, by content checksum and engine/model version."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

from images.tables import result_cache_table as t


def cached_result(conn: Connection, kind: str, checksum: str, engine: str) -> Any | None:
    """The stored result, or None."""
    return conn.execute(
        select(t.c.result).where(t.c.kind == kind, t.c.checksum == checksum, t.c.engine == engine)
    ).scalar_one_or_none()


def store_result(conn: Connection, kind: str, checksum: str, engine: str, result: Any) -> None:
    """Store a result (the first one stored wins)."""
    conn.execute(insert(t).values(kind=kind, checksum=checksum, engine=engine, result=result)
                 .on_conflict_do_nothing())
