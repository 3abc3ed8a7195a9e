"""Handlers of the coding-agent graph, with a deterministic fake LLM.

The fake model writes a small Python module per requested module. On the first
round it leaves a deliberate bug in every module whose name has an odd length,
the validator finds it, and the reviewer sends those modules back with the
validator's feedback; the second round fixes them. Every model call reports
tokens and cost as a real one would, so guardrails and traces have figures.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tickmesh.sdk import (
    Decision,
    PlanContext,
    PlanInputView,
    TaskContext,
    TaskError,
    complete,
    dispatch,
    fail,
    plan,
    step,
    task,
)

MODEL = "fake-llm-large"
INPUT_MICROS_PER_TOKEN = 3  # $3 per million input tokens
OUTPUT_MICROS_PER_TOKEN = 15  # $15 per million output tokens
MAX_ROUNDS = 3


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def fake_llm(ctx: TaskContext, prompt: str, completion: str) -> str:
    """Account for one model call the way a real client would."""
    tokens_in, tokens_out = _tokens(prompt), _tokens(completion)
    ctx.report(
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost_micros=tokens_in * INPUT_MICROS_PER_TOKEN + tokens_out * OUTPUT_MICROS_PER_TOKEN,
        model=MODEL,
    )
    return completion


@task(name="parse_request")
async def parse_request(ctx: TaskContext, request: dict[str, Any]) -> dict[str, Any]:
    modules = request.get("modules") or ["app"]
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise TaskError("modules must be a list of names", type="BadRequest", retryable=False)
    return {"task": request.get("task", "write a program"), "modules": modules}


@plan(name="coding_planner")
async def coding_planner(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    parsed = inputs[0]
    if not parsed.succeeded:
        return fail(f"could not understand the request: {parsed.error_message}")
    spec = parsed.output
    return dispatch(
        *(
            step("generate", {"task": spec["task"], "module": m, "round": 1, "feedback": ""})
            for m in spec["modules"]
        ),
        rationale=f"{len(spec['modules'])} independent modules: generate them in parallel",
    )


@task(name="llm_codegen")
async def llm_codegen(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
    module, round_ = job["module"], job["round"]
    buggy = round_ == 1 and len(module) % 2 == 1
    body = "return a - b  # BUG" if buggy else "return a + b"
    code = f'"""{module}: {job["task"]}"""\n\n\ndef {module}_add(a, b):\n    {body}\n'
    prompt = f"Write module {module} for: {job['task']}. Feedback: {job['feedback']}"
    fake_llm(ctx, prompt, code)
    return {"module": module, "round": round_, "code": code}


@plan(name="assembler")
async def assembler(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    failed = [i for i in inputs if not i.succeeded]
    if failed:
        return fail(
            f"code generation failed for {len(failed)} module(s): {failed[0].error_message}"
        )
    files = {i.output["module"] + ".py": i.output["code"] for i in inputs}
    round_ = max(i.output["round"] for i in inputs)
    return dispatch(step("validate", {"files": files, "round": round_}), rationale="validate")


@task(name="validate_code")
async def validate_code(ctx: TaskContext, job: dict[str, Any]) -> dict[str, Any]:
    report = {}
    for name, code in sorted(job["files"].items()):
        namespace: dict[str, Any] = {}
        exec(compile(code, name, "exec"), namespace)  # the fake model's own output
        add = namespace[name.removesuffix(".py") + "_add"]
        report[name] = "ok" if add(2, 3) == 5 else f"{name}: expected add(2, 3) == 5"
    digest = hashlib.sha256(repr(sorted(job["files"].items())).encode()).hexdigest()[:12]
    ctx.report(tests_run=float(len(report)))
    return {"files": job["files"], "report": report, "round": job["round"], "digest": digest}


@plan(name="reviewer")
async def reviewer(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
    result = inputs[0]
    if not result.succeeded:
        return fail(f"validation crashed: {result.error_message}")
    review = result.output
    broken = sorted(name for name, verdict in review["report"].items() if verdict != "ok")
    if not broken:
        return complete(
            {"files": review["files"], "rounds": review["round"], "digest": review["digest"]},
            rationale=f"all {len(review['files'])} modules pass after {review['round']} round(s)",
        )
    if review["round"] >= MAX_ROUNDS:
        return fail(f"still failing after {MAX_ROUNDS} rounds: {', '.join(broken)}")
    next_round = review["round"] + 1
    return dispatch(
        *(
            step(
                "generate",
                {
                    "task": goal.get("task", "") if isinstance(goal, dict) else "",
                    "module": name.removesuffix(".py"),
                    "round": next_round,
                    "feedback": review["report"][name],
                },
            )
            for name in sorted(review["files"])
        ),
        rationale=f"refine: {', '.join(broken)} failed validation",
    )
