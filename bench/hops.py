"""Where a step's time goes at M = 1: the hops of the step loop, timed from outside.

A core NATS subscription in the bench process taps every message of the tenant (work
requests, execution records, events) and the router's KV writes, and notes when each
passed. Joined with the stored records' timestamps (executor finished/started, router
request built), each parent → child gap splits into:

  executor finished        → pool published the record   (gRPC completion frame, pool)
  record published         → router built the request    (router consumer, load, decide)
  request built            → router's KV write passed    (encode, compare-and-set)
  KV write passed          → request published           (KV PubAck, then publish)
  request published        → executor started            (pool consumer, assignment frame)

The state service stores the same record meanwhile, off that path; the time from the
record's publish to its insert is reported beside the segments.

All clocks are this machine's wall clock; the tap adds its own delivery delay (~0.05 ms).
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from typing import Any

from nats.aio.msg import Msg

from tickmesh.executor_pool.pool import record_message_id
from tickmesh.runtime.subjects import TenantNames

from .records import Record
from .stats import summarize

SEGMENTS = (
    "executor finished → record published",
    "record published → request built (router)",
    "request built → router KV write",
    "router KV write → request published",
    "request published → executor started",
)
BESIDE = "record published → state inserted (off the path)"


class Tap:
    def __init__(self, tenant: str) -> None:
        self.names = TenantNames(tenant)
        self.by_msg_id: dict[str, float] = {}
        self.kv: dict[str, list[float]] = defaultdict(list)
        self.count = 0

    @property
    def subjects(self) -> list[str]:
        return [f"{self.names.root}.>", f"$KV.{self.names.router_bucket}.>"]

    async def on_msg(self, msg: Msg) -> None:
        now = time.time()
        self.count += 1
        if msg.subject.startswith("$KV."):
            self.kv[msg.subject.rsplit(".", 1)[-1]].append(now)
            return
        msg_id = (msg.headers or {}).get("Nats-Msg-Id")
        if msg_id and msg_id not in self.by_msg_id:
            self.by_msg_id[msg_id] = now

    def segments(self, records: list[Record]) -> dict[str, Any]:
        by_id = {r.execution_id: r for r in records}
        parts: dict[str, list[float]] = {s: [] for s in (*SEGMENTS, BESIDE)}
        for child in records:
            for pid in child.parents:
                parent = by_id.get(pid)
                if parent is None:
                    continue
                # The ids the services give these messages (the tap cannot rely on copies).
                t_exec = self.by_msg_id.get(record_message_id(parent.execution_id))
                t_req = self.by_msg_id.get(f"req:{child.execution_id}")
                kv_times = self.kv.get(child.lifetime_id, [])
                i = bisect.bisect_left(kv_times, child.created_at)
                t_kv = kv_times[i] if i < len(kv_times) else None
                if t_exec is None or t_req is None or t_kv is None:
                    continue
                points = [
                    parent.finished_at,
                    t_exec,
                    child.created_at,
                    t_kv,
                    t_req,
                    child.started_at,
                ]
                for name, a, b in zip(SEGMENTS, points, points[1:], strict=False):
                    parts[name].append((b - a) * 1000.0)
                parts[BESIDE].append((parent.persisted_at - t_exec) * 1000.0)
        return {name: summarize(v) for name, v in parts.items()}
