"""Human approval, on both sides of a wait.

In a plan::

    from tickmesh.sdk.approvals import approval, approval_of

    @plan(name="review")
    async def review(ctx: PlanContext, inputs: list[PlanInputView]) -> Decision:
        decided = approval_of(ctx)
        if decided is None:                       # first time: ask a human
            return approval(prompt="ship it?", timeout=3600, on_timeout="fail")
        if not decided.approved:
            return fail(f"rejected by {decided.approver}: {decided.comment}")
        return complete(...)

From a service or the CLI (``tickmesh signal LIFETIME approval --data '{"approved": true}'``)::

    await approve(client, lifetime_id, approver="ada", comment="looks good")
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ._plan import Decision, OnTimeout, PlanContext, wait_for

if TYPE_CHECKING:
    from ._client import Client, LifetimeInfo

APPROVAL = "approval"
"""The signal name the helpers use."""


@dataclass(frozen=True, slots=True)
class Approval:
    """An approver's answer (or the default, when the wait timed out)."""

    approved: bool
    approver: str
    comment: str
    timed_out: bool
    data: Any


def approval(
    *,
    prompt: str = "",
    timeout: float | timedelta | None = None,
    on_timeout: OnTimeout = "fail",
    default_approved: bool = False,
    name: str = APPROVAL,
    rationale: str = "",
) -> Decision:
    """Wait for a human's approval; on ``on_timeout="signal"`` the default is
    ``{"approved": default_approved}``."""
    return wait_for(
        name,
        timeout=timeout,
        on_timeout=on_timeout,
        default={"approved": default_approved, "comment": "timed out"},
        prompt=prompt,
        rationale=rationale or prompt,
    )


def approval_of(ctx: PlanContext, *, name: str = APPROVAL) -> Approval | None:
    """The answer the plan is asked again with, or None when it has not waited yet.

    Only JSON ``true`` approves (``{"approved": true}`` or a bare ``true``): any other
    answer, the string ``"false"`` or ``"no"`` included, is a refusal.
    """
    signal = ctx.signal
    if signal is None or signal.name != name:
        return None
    data = signal.payload
    # Truthiness would approve a form's "false", being a non-empty string.
    if isinstance(data, dict):
        approved = data.get("approved") is True
        comment = str(data.get("comment", ""))
    else:
        approved, comment = data is True, ""
    return Approval(approved, signal.approver, comment, signal.timed_out, data)


async def approve(
    client: Client,
    lifetime_id: str,
    *,
    approved: bool = True,
    approver: str = "",
    comment: str = "",
    signal_id: str = "",
    name: str = APPROVAL,
) -> LifetimeInfo:
    """Answer a lifetime waiting for approval (``signal_id`` makes it idempotent)."""
    return await client.signal(
        lifetime_id,
        name,
        {"approved": approved, "comment": comment},
        approver=approver,
        signal_id=signal_id,
    )


__all__ = ["APPROVAL", "Approval", "approval", "approval_of", "approve"]
