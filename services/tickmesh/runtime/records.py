"""What makes an execution record acceptable: the one check the state service (before
it stores a record) and the router (before it decides on one) both run, so a record
the state service dead-letters is never routed."""

from __future__ import annotations

from tickmesh.sdk import ValidationError
from tickmesh.v1 import envelope_pb2

from .subjects import check_token, tenant_of_subject

RECORD_KINDS = ("task_execution", "plan_execution")


def check_record(subject: str, envelope: envelope_pb2.ExecutionEnvelope) -> None:
    """A record's tenant must match its subject's, in the header and in the record, and
    the two headers must name the same lifetime, execution and attempt.

    Raises:
        ValidationError: Naming the mismatch.
    """
    kind = envelope.WhichOneof("body")
    if kind not in RECORD_KINDS:
        raise ValidationError(f"expected an execution record, got a {kind} body")
    subject_tenant = tenant_of_subject(subject)
    record = envelope.task_execution if kind == "task_execution" else envelope.plan_execution
    claimed = {envelope.header.tenant_id, record.header.tenant_id}
    if claimed != {subject_tenant}:
        raise ValidationError(
            f"record claims tenant(s) {sorted(claimed)} but arrived on a subject of "
            f"tenant {subject_tenant!r}"
        )
    inner, outer = record.header, envelope.header
    if not inner.execution_id or inner.attempt < 1:
        raise ValidationError("record header needs an execution_id and an attempt >= 1")
    if inner.lifetime_id != outer.lifetime_id:
        raise ValidationError("record and envelope disagree on the lifetime id")
    # What the store refuses must be refused here: a record the store rejects after it
    # passed this check would fail its whole batch, which is then redelivered forever.
    if not inner.lifetime_id:
        raise ValidationError("record header needs a lifetime_id")
    check_token(inner.lifetime_id, "lifetime id")  # its ref is published under it
    if (inner.execution_id, inner.attempt) != (outer.execution_id, outer.attempt):
        raise ValidationError("record and envelope disagree on the execution id or attempt")
