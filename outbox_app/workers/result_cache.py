"""Cached OCR and embedding results, by content checksum and engine/model version."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

from outbox_images.tables import result_cache_table as t


def cached_results(conn: Connection, kind: str, checksums: list[str], engine: str
                   ) -> dict[str, Any]:
    """The stored results of `checksums`, by checksum (absent ones left out), in one query."""
    rows = conn.execute(select(t.c.checksum, t.c.result).where(
        t.c.kind == kind, t.c.checksum.in_(checksums), t.c.engine == engine))
    return {checksum: result for checksum, result in rows}


def cached_result(conn: Connection, kind: str, checksum: str, engine: str) -> Any | None:
    """The stored result, or None."""
    return cached_results(conn, kind, [checksum], engine).get(checksum)


def store_results(conn: Connection, kind: str, engine: str, results: dict[str, Any]) -> None:
    """Store results by checksum in one statement (the first one stored of each wins)."""
    if results:
        conn.execute(insert(t).on_conflict_do_nothing(),
                     [{"kind": kind, "checksum": c, "engine": engine, "result": r}
                      for c, r in results.items()])


def store_result(conn: Connection, kind: str, checksum: str, engine: str, result: Any) -> None:
    """Store a result (the first one stored wins)."""
    store_results(conn, kind, engine, {checksum: result})
