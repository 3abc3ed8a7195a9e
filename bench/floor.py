"""`python -m bench.floor`: the unbatched floor, measured on the same machine.

Per step: a JetStream publish that waits for its PubAck (the request), a push consumer
delivering it (consume), one durable append, and the ack; then the chain's next step is
published. M chains run concurrently (closed loop over L chains of N steps). Nothing is
batched: this is the naive design that tickmesh must beat.

The append is one row in one transaction, in the store the profile uses:

* ``--db PATH`` (embedded): SQLite, WAL, synchronous=FULL, like the state store; one
  writer thread, as SQLite has one writer.
* ``--dsn postgresql://...`` (cloud): one ``INSERT`` through an asyncpg pool of
  ``--pool-size`` connections (the state service's default pool size), each in its own
  transaction with the server's default synchronous_commit. The table is created for the
  run and dropped after it.

Protocol with the parent: prints ``ready`` once set up, waits for a line on stdin, runs,
prints one JSON line with the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import nats
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from .stats import summarize

STREAM = "BENCH_FLOOR"
SUBJECT = "benchfloor"


class Steps(Protocol):
    """Where the floor appends its steps."""

    async def append(self, chain: str, step: int, body: bytes) -> None: ...

    async def count(self) -> int: ...

    async def close(self) -> None: ...


def open_db(path: Path) -> sqlite3.Connection:
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE steps (seq INTEGER PRIMARY KEY AUTOINCREMENT, chain TEXT NOT NULL,"
        " step INTEGER NOT NULL, at INTEGER NOT NULL, body BLOB NOT NULL,"
        " UNIQUE (chain, step))"
    )
    return conn


class SqliteSteps:
    """One SQLite file, appended to from one thread (SQLite has one writer)."""

    def __init__(self, path: Path) -> None:
        self._conn = open_db(path)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="floor-sqlite")

    def _append(self, chain: str, step: int, body: bytes) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        self._conn.execute(
            "INSERT INTO steps (chain, step, at, body) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (chain, step) DO NOTHING",
            (chain, step, time.time_ns(), body),
        )
        self._conn.execute("COMMIT")

    async def append(self, chain: str, step: int, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._append, chain, step, body)

    async def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM steps").fetchone()[0])

    async def close(self) -> None:
        self._thread.shutdown()
        self._conn.close()


class PostgresSteps:
    """A table of its own in a PostgreSQL database: one INSERT, one transaction per step."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], table: str) -> None:
        self._pool = pool
        self._table = table
        self._insert = (
            f"INSERT INTO {table} (chain, step, at, body) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (chain, step) DO NOTHING"
        )

    @classmethod
    async def open(cls, dsn: str, pool_size: int) -> PostgresSteps:
        table = f"bench_floor_{os.getpid()}"
        # Every connection open before the run, so connecting is never timed.
        pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
        try:
            await pool.execute(
                f"CREATE TABLE {table} (seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " chain TEXT NOT NULL, step INTEGER NOT NULL, at BIGINT NOT NULL,"
                " body BYTEA NOT NULL, UNIQUE (chain, step))"
            )
        except BaseException:
            await pool.close()
            raise
        return cls(pool, table)

    async def append(self, chain: str, step: int, body: bytes) -> None:
        await self._pool.execute(self._insert, chain, step, time.time_ns(), body)

    async def count(self) -> int:
        return int(await self._pool.fetchval(f"SELECT COUNT(*) FROM {self._table}"))

    async def settings(self) -> dict[str, str]:
        return {
            name: str(await self._pool.fetchval(f"SHOW {name}"))
            for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method")
        }

    async def close(self) -> None:
        try:
            await self._pool.execute(f"DROP TABLE IF EXISTS {self._table}")
        finally:
            await self._pool.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    store: Steps
    info: dict[str, Any]
    if args.dsn:
        pg = await PostgresSteps.open(args.dsn, args.pool_size)
        store = pg
        info = {"kind": "postgresql", "pool_size": args.pool_size, **await pg.settings()}
    else:
        store = SqliteSteps(Path(args.db))
        info = {"kind": "sqlite", "synchronous": "FULL", "journal_mode": "WAL"}
    try:
        result = await measure(args, store)
    finally:
        await store.close()
    result["store"] = info
    return result


async def measure(args: argparse.Namespace, store: Steps) -> dict[str, Any]:
    nc = await nats.connect(args.nats_url, name="bench-floor")
    js = nc.jetstream()
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(STREAM)
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=[f"{SUBJECT}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
    )
    loop = asyncio.get_running_loop()
    steps, lifetimes, concurrency = args.steps, args.lifetimes, args.concurrency
    padding = b"x" * args.payload_bytes
    received: dict[str, list[float]] = {}
    chain_done: dict[str, asyncio.Future[None]] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def handle(msg: Msg) -> None:
        now = time.perf_counter()
        chain, _, rest = msg.data.partition(b":")
        step = int(rest.split(b":", 1)[0])
        name = chain.decode()
        received[name].append(now)
        await store.append(name, step, msg.data)
        if step + 1 < steps:
            await js.publish(f"{SUBJECT}.{name}", chain + b":%d:" % (step + 1) + padding)
            await msg.ack()
        else:
            await msg.ack()
            chain_done[name].set_result(None)

    async def on_msg(msg: Msg) -> None:
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await js.subscribe(
        f"{SUBJECT}.>",
        durable="floor",
        cb=on_msg,
        manual_ack=True,
        config=ConsumerConfig(ack_wait=60, max_ack_pending=100_000),
        pending_msgs_limit=1_000_000,
    )
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await loop.run_in_executor(None, sys.stdin.readline)

    todo = iter(range(lifetimes))

    async def lane() -> None:
        for n in todo:
            name = f"c{n}"
            received[name] = []
            chain_done[name] = loop.create_future()
            await js.publish(f"{SUBJECT}.{name}", name.encode() + b":0:" + padding)
            await chain_done[name]

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(max(1, min(concurrency, lifetimes)))))
    wall = time.perf_counter() - start
    gaps = [(b - a) * 1000.0 for times in received.values() for a, b in itertools.pairwise(times)]
    total = sum(len(t) for t in received.values())
    stored = await store.count()
    await nc.close()
    return {
        "concurrency": concurrency,
        "lifetimes": lifetimes,
        "steps": total,
        "stored": stored,
        "wall_s": wall,
        "steps_per_s": stored / wall if wall > 0 else 0.0,
        "gap_ms": summarize(gaps),
        "cpu_s_self": time.process_time(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--nats-url", required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="SQLite file to create (embedded profile)")
    where.add_argument("--dsn", help="postgresql:// database to add a table to (cloud profile)")
    parser.add_argument(
        "--pool-size", type=int, default=8, help="PostgreSQL connections (the state's default)"
    )
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lifetimes", type=int, default=20)
    parser.add_argument("--payload-bytes", type=int, default=400)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if args.no_uvloop:
        result = asyncio.run(run(args))
    else:
        import uvloop

        result = uvloop.run(run(args))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
