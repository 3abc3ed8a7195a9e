"""Every NATS subject, stream, consumer and KV bucket name tickmesh uses.

Names are built here and nowhere else. Subjects are lowercase and dotted; the
tenant is always the second token, so per-tenant permissions and accounts can
be expressed as `tm.<tenant>.>`.

    tm.<tenant>.work.task.<handler>   requests for task handlers  (stream TM_<T>_WORK, work queue)
    tm.<tenant>.work.plan.<handler>   requests for plan handlers  (stream TM_<T>_WORK)
    tm.<tenant>.exec.<lifetime>       execution records           (stream TM_<T>_EXEC, work queue)
    tm.<tenant>.ref.<lifetime>        refs to durable executions  (stream TM_<T>_REF, work queue)
    tm.<tenant>.evt.<lifetime>        a lifetime's events, live   (core NATS, not stored)
    tm.<tenant>.evb                   lifetime events in batches  (stream TM_<T>_EVT, kept)
    tm.<tenant>.dlq.<kind>            dead letters with a reason  (stream TM_<T>_DLQ, kept)
    tm.<tenant>.ctl.cancel            cancellations for pools     (core NATS, not stored)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tickmesh.sdk import ValidationError
from tickmesh.sdk.ids import TENANT_ID_PATTERN

PREFIX = "tm"
WorkKind = Literal["task", "plan"]

_TOKEN = re.compile(r"[A-Za-z0-9_\-]{1,128}")

# NATS headers that mirror key envelope fields, so routing and dedup need no decode.
HDR_MSG_ID = "Nats-Msg-Id"
HDR_TYPE = "Tickmesh-Type"
HDR_TENANT = "Tickmesh-Tenant"
HDR_LIFETIME = "Tickmesh-Lifetime"
HDR_EXECUTION = "Tickmesh-Execution"
HDR_REASON = "Tickmesh-Reason"
HDR_ATTEMPT = "Tickmesh-Attempt"
HDR_TRACEPARENT = "traceparent"


def check_tenant(tenant: str) -> str:
    if not TENANT_ID_PATTERN.fullmatch(tenant):
        raise ValidationError(f"invalid tenant id {tenant!r}: expected [a-z0-9][a-z0-9_]{{0,62}}")
    return tenant


def check_token(value: str, what: str) -> str:
    """A subject token must not contain dots, wildcards or spaces."""
    if not _TOKEN.fullmatch(value):
        raise ValidationError(f"invalid {what} {value!r}: expected [A-Za-z0-9_-]{{1,128}}")
    return value


@dataclass(frozen=True, slots=True)
class TenantNames:
    """The names of one tenant's subjects, streams, consumers and buckets."""

    tenant: str

    def __post_init__(self) -> None:
        check_tenant(self.tenant)

    @property
    def _upper(self) -> str:
        return self.tenant.upper()

    # --- subjects ---------------------------------------------------------
    @property
    def root(self) -> str:
        return f"{PREFIX}.{self.tenant}"

    def work(self, kind: WorkKind, handler: str) -> str:
        return f"{self.root}.work.{kind}.{check_token(handler, 'handler name')}"

    @property
    def work_all(self) -> str:
        return f"{self.root}.work.>"

    def exec(self, lifetime_id: str) -> str:
        return f"{self.root}.exec.{check_token(lifetime_id, 'lifetime id')}"

    @property
    def exec_all(self) -> str:
        return f"{self.root}.exec.>"

    def ref(self, lifetime_id: str) -> str:
        return f"{self.root}.ref.{check_token(lifetime_id, 'lifetime id')}"

    @property
    def ref_all(self) -> str:
        return f"{self.root}.ref.>"

    def evt(self, lifetime_id: str) -> str:
        return f"{self.root}.evt.{check_token(lifetime_id, 'lifetime id')}"

    @property
    def evt_all(self) -> str:
        return f"{self.root}.evt.>"

    @property
    def evb(self) -> str:
        """Where the router's batches of lifetime events go, for the state service (the
        events stream keeps them; the per-lifetime ``evt`` subjects are live only)."""
        return f"{self.root}.evb"

    def dlq(self, kind: str) -> str:
        return f"{self.root}.dlq.{check_token(kind, 'dead-letter kind')}"

    @property
    def dlq_all(self) -> str:
        return f"{self.root}.dlq.>"

    @property
    def cancel(self) -> str:
        return f"{self.root}.ctl.cancel"

    # --- streams ----------------------------------------------------------
    @property
    def work_stream(self) -> str:
        return f"TM_{self._upper}_WORK"

    @property
    def exec_stream(self) -> str:
        return f"TM_{self._upper}_EXEC"

    @property
    def ref_stream(self) -> str:
        return f"TM_{self._upper}_REF"

    @property
    def evt_stream(self) -> str:
        return f"TM_{self._upper}_EVT"

    @property
    def dlq_stream(self) -> str:
        return f"TM_{self._upper}_DLQ"

    # --- durable consumers -------------------------------------------------
    def work_consumer(self, kind: WorkKind, handler: str) -> str:
        return f"pool_{kind}_{check_token(handler, 'handler name')}"

    state_consumer = "state"
    router_consumer = "router"
    router_record_consumer = "router_records"

    # --- KV buckets -------------------------------------------------------
    @property
    def router_bucket(self) -> str:
        return f"TM_{self._upper}_ROUTER"

    @property
    def policy_bucket(self) -> str:
        return f"TM_{self._upper}_POLICY"


def tenant_of_subject(subject: str) -> str | None:
    """Return the tenant token of a tickmesh subject, or None if it is not one."""
    parts = subject.split(".")
    if len(parts) < 3 or parts[0] != PREFIX:
        return None
    return parts[1]
