"""Policies and the published snapshot, in the tenant's policy KV bucket.

policy.<id>.<version 8 digits>   Policy (immutable)
policy.<id>.latest               Policy of the newest version (updated by CAS)
snapshot                         PolicySnapshot routers watch
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from google.protobuf import duration_pb2, timestamp_pb2
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from tickmesh.runtime.kv import keys_matching
from tickmesh.runtime.subjects import TenantNames
from tickmesh.sdk import NotFoundError, ValidationError
from tickmesh.sdk._graph import POLICY_ID_PATTERN
from tickmesh.v1 import guardrail_pb2

SNAPSHOT_KEY = "snapshot"


def _token(policy_id: str) -> str:
    # Policy ids may contain dots; KV keys use dots as separators. An id no policy can
    # have (a stored policy's is checked against the same pattern) is refused by name,
    # not left to the bucket's InvalidKeyError.
    if not POLICY_ID_PATTERN.fullmatch(policy_id):
        raise ValidationError(
            f"invalid policy id {policy_id!r}: expected {POLICY_ID_PATTERN.pattern}"
        )
    return policy_id.replace(".", "=")


class PolicyStore:
    def __init__(self, kv: KeyValue, tenant: str) -> None:
        self._kv = kv
        self.tenant = tenant

    @classmethod
    async def open(cls, js: JetStreamContext, names: TenantNames) -> PolicyStore:
        return cls(await js.key_value(names.policy_bucket), names.tenant)

    async def put(
        self, policy_id: str, source: str, *, graph_id: str, dry_run: bool
    ) -> tuple[guardrail_pb2.Policy, bool]:
        digest = hashlib.sha256(source.encode()).hexdigest()
        for _ in range(10):
            latest = await self._latest(policy_id)
            if (
                latest is not None
                and latest[0].digest == digest
                and latest[0].graph_id == graph_id
                and latest[0].dry_run == dry_run
            ):
                return latest[0], False
            policy = guardrail_pb2.Policy(
                tenant_id=self.tenant,
                policy_id=policy_id,
                version=(latest[0].version if latest else 0) + 1,
                source=source,
                digest=digest,
                graph_id=graph_id,
                dry_run=dry_run,
            )
            policy.created_at.FromDatetime(datetime.now(UTC))
            key = f"policy.{_token(policy_id)}.{policy.version:08d}"
            try:
                await self._kv.create(key, policy.SerializeToString())
            except KeyWrongLastSequenceError:
                # The number is taken: by a concurrent put, or by one that stopped before
                # moving `latest`, which would otherwise hold it (and refuse every put) for ever.
                await self._repair_latest(policy_id)
                continue
            data = policy.SerializeToString()
            try:
                if latest is None:
                    await self._kv.create(f"policy.{_token(policy_id)}.latest", data)
                else:
                    await self._kv.update(
                        f"policy.{_token(policy_id)}.latest", data, last=latest[1]
                    )
            except KeyWrongLastSequenceError:
                # Moved by a repair (to this version or a newer one): this version is stored.
                await self._repair_latest(policy_id)
            return policy, True
        raise RuntimeError(f"policy {policy_id}: too many concurrent writes")

    async def _repair_latest(self, policy_id: str) -> None:
        """Point `latest` at the newest stored version if it is behind."""
        token = _token(policy_id)
        for _ in range(10):
            latest = await self._latest(policy_id)
            keys = await keys_matching(self._kv, f"policy.{token}.*")
            versions = [int(v) for k in keys if (v := k.rsplit(".", 1)[1]).isdigit()]
            if not versions or (latest is not None and latest[0].version >= max(versions)):
                return
            newest = await self.get(policy_id, max(versions))
            try:
                if latest is None:
                    await self._kv.create(f"policy.{token}.latest", newest.SerializeToString())
                else:
                    await self._kv.update(
                        f"policy.{token}.latest", newest.SerializeToString(), last=latest[1]
                    )
                return
            except KeyWrongLastSequenceError:
                continue

    async def _latest(self, policy_id: str) -> tuple[guardrail_pb2.Policy, int] | None:
        try:
            entry = await self._kv.get(f"policy.{_token(policy_id)}.latest")
        except KeyNotFoundError:
            return None
        assert entry.value is not None
        assert entry.revision is not None
        return guardrail_pb2.Policy.FromString(entry.value), entry.revision

    async def get(self, policy_id: str, version: int = 0) -> guardrail_pb2.Policy:
        try:
            if version:
                entry = await self._kv.get(f"policy.{_token(policy_id)}.{version:08d}")
            else:
                entry = await self._kv.get(f"policy.{_token(policy_id)}.latest")
        except KeyNotFoundError as exc:
            what = f"version {version} of policy" if version else "policy"
            raise NotFoundError(f"no {what} {policy_id!r}") from exc
        assert entry.value is not None
        return guardrail_pb2.Policy.FromString(entry.value)

    async def latest_all(self) -> list[guardrail_pb2.Policy]:
        policies = []
        for key in await keys_matching(self._kv, "policy.*.latest"):
            entry = await self._kv.get(key)
            assert entry.value is not None
            policies.append(guardrail_pb2.Policy.FromString(entry.value))
        return sorted(policies, key=lambda p: p.policy_id)

    async def publish_snapshot(self, lease_s: float) -> guardrail_pb2.PolicySnapshot:
        policies = await self.latest_all()
        snapshot = guardrail_pb2.PolicySnapshot(
            tenant_id=self.tenant,
            # Versions only grow, so their sum is a revision that only grows.
            revision=sum(p.version for p in policies),
            policies=policies,
            issued_at=_now(),
            lease=_seconds(lease_s),
        )
        await self._kv.put(SNAPSHOT_KEY, snapshot.SerializeToString())
        return snapshot


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(datetime.now(UTC))
    return ts


def _seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d
