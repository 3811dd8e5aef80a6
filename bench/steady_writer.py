"""Writes outbox events at a steady rate and prints the counts of events and transactions:
every 10 ms one transaction with that tick's events (each commit is a WAL flush; 100 of
them a second keep the disk from setting the pace)."""

from __future__ import annotations

import argparse
import time

import psycopg

from outbox.db import libpq_dsn
from outbox.settings import Settings


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, required=True, help="events per second")
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    tick = 0.01  # a small transaction batch every 10 ms keeps the rate smooth
    per_tick = max(1, round(args.rate * tick))
    written = transactions = 0
    with psycopg.connect(libpq_dsn(Settings()), autocommit=True) as conn:
        start = time.perf_counter()
        next_at = start
        while time.perf_counter() - start < args.seconds:
            with conn.transaction():
                for _ in range(per_tick):
                    conn.execute(
                        "insert into outbox (id, aggregate_type, aggregate_id, type, payload)"
                        " values (gen_random_uuid(), 'bench', %s, 'bench.event',"
                        " jsonb_build_object('pad', repeat('x', 900)))", (str(written % 100),))
                    written += 1
            transactions += 1
            next_at += tick
            time.sleep(max(0.0, next_at - time.perf_counter()))
    print(written, transactions)


if __name__ == "__main__":
    main()
