"""Handlers of the hello graph: greet, decide, shout."""

from __future__ import annotations

from typing import Any

from tickmesh.sdk import (
    Decision,
    PlanContext,
    PlanInputView,
    TaskContext,
    complete,
    dispatch,
    plan,
    step,
    task,
)


@task
async def greet(ctx: TaskContext, name: Any) -> str:
    who = name.get("name", "world") if isinstance(name, dict) else str(name or "world")
    return f"hello, {who}"


@plan
async def decide(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    latest = inputs[-1]
    if latest.node_id == "greet":
        return dispatch(step("shout", latest.output), rationale="make it louder")
    return complete({"greeting": latest.output}, rationale="loud enough")


@task
async def shout(ctx: TaskContext, text: str) -> str:
    return text.upper() + "!"
