"""Task and plan authoring: decorators, codecs, context telemetry, decisions, errors."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from tickmesh.sdk import (
    ConfigError,
    DeadlineExceededError,
    NotFoundError,
    RPCError,
    StatusCode,
    TaskError,
    TransportError,
    ValidationError,
    codecs,
)
from tickmesh.sdk._client import _code_digests
from tickmesh.sdk._convert import (
    PlanInputData,
    WirePayload,
    error_to_proto,
    payload_to_proto,
    plan_result_to_proto,
    task_result_to_proto,
)
from tickmesh.sdk._plan import (
    Decision,
    Plan,
    PlanContext,
    PlanInputView,
    complete,
    dispatch,
    fail,
    plan,
    step,
    wait_for,
)
from tickmesh.sdk._task import ErrorData, Task, TaskContext, task
from tickmesh.sdk._transport import map_rpc_error
from tickmesh.sdk._worker import FileBlobResolver, Worker
from tickmesh.v1 import header_pb2, result_pb2


def make_context(**overrides: Any) -> TaskContext:
    fields: dict[str, Any] = {
        "tenant_id": "acme",
        "lifetime_id": "l1",
        "execution_id": "e1",
        "node_id": "n1",
        "handler": "h",
        "attempt": 1,
        "iteration": 1,
        "deadline": datetime.now(UTC) + timedelta(seconds=30),
    }
    fields.update(overrides)
    return TaskContext(**fields)


# --- decorators ---------------------------------------------------------------------------


@task
async def bare(ctx: TaskContext, value: dict[str, int]) -> int:
    return value["n"] + 1


@task(name="renamed", retries=2, timeout=timedelta(seconds=5))
async def configured(ctx: TaskContext, value: bytes) -> bytes:
    return value


@plan
async def planner(ctx: PlanContext, goal: str, inputs: list[PlanInputView]) -> Decision:
    return complete(goal)


def test_task_decorator_works_bare_and_with_arguments() -> None:
    assert isinstance(bare, Task)
    assert (bare.name, bare.kind, bare.retries, bare.timeout) == ("bare", "task", None, None)
    assert isinstance(configured, Task)
    assert (configured.name, configured.retries, configured.max_attempts) == ("renamed", 2, 3)
    assert configured.timeout == 5.0
    assert configured.input_annotation is bytes
    assert isinstance(planner, Plan)
    assert (planner.name, planner.kind) == ("planner", "plan")


async def test_decorated_tasks_stay_callable() -> None:
    assert await bare(make_context(), {"n": 1}) == 2


def test_code_digest_hashes_the_source() -> None:
    source = inspect.getsource(bare.fn)
    assert bare.code_digest == hashlib.sha256(source.encode()).hexdigest()
    assert bare.code_digest != configured.code_digest


def test_code_digest_falls_back_to_the_qualified_name() -> None:
    namespace: dict[str, Any] = {}
    exec("async def dynamic(ctx, value):\n    return value\n", namespace)
    fn = namespace["dynamic"]
    made = task(fn)
    expected = f"{fn.__module__}.{fn.__qualname__}".encode()
    assert made.code_digest == hashlib.sha256(expected).hexdigest()


def test_replay_holds_records_to_one_code_digest_per_handler_name() -> None:
    assert _code_digests([bare, configured, bare]) == {
        bare.name: bare.code_digest,
        configured.name: configured.code_digest,
    }
    renamed = task(name=bare.name)(configured.fn)
    with pytest.raises(ConfigError, match="two handlers named"):
        _code_digests([bare, renamed])


def test_decorators_reject_bad_definitions() -> None:
    def not_async(ctx: TaskContext, value: Any) -> None:
        return None

    with pytest.raises(ConfigError):
        task(not_async)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="handler name"):

        @task(name="has.dot")
        async def bad_name(ctx: TaskContext, value: Any) -> None:
            return None

    with pytest.raises(ConfigError):
        task(retries=-1)(bare.fn)


def test_worker_rejects_duplicate_handler_names() -> None:
    @task(name="bare")
    async def other(ctx: TaskContext, value: Any) -> None:
        return None

    with pytest.raises(ConfigError, match="two tasks"):
        Worker("127.0.0.1:1", tenant="acme", tasks=[bare, other])
    with pytest.raises(ConfigError):
        Worker("127.0.0.1:1", tenant="Not A Tenant", tasks=[bare])


# --- codecs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [{"a": [1, 2.5, None, True]}, [1, "x"], "héllo", 3, 2.5, False, None],
)
def test_json_values_roundtrip(value: Any) -> None:
    content_type, data = codecs.encode(value)
    assert content_type == codecs.JSON
    assert codecs.decode(content_type, data) == value


def test_json_is_compact_utf8() -> None:
    assert codecs.encode({"k": "é", "n": [1, 2]}) == (codecs.JSON, '{"k":"é","n":[1,2]}'.encode())


def test_json_nested_past_the_parsers_recursion_is_a_validation_error() -> None:
    # json.loads raises RecursionError here, which no caller of decode expects.
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(ValidationError, match="nested too deeply"):
        codecs.decode(codecs.JSON, deep)


def test_bytes_and_explicit_payloads() -> None:
    assert codecs.encode(b"\x00\x01") == (codecs.OCTET_STREAM, b"\x00\x01")
    assert codecs.decode(codecs.OCTET_STREAM, b"\x00") == b"\x00"
    assert codecs.encode(codecs.Payload(b"a,b", "text/csv")) == ("text/csv", b"a,b")
    assert codecs.decode("text/csv", b"a,b", codecs.Payload) == codecs.Payload(b"a,b", "text/csv")
    assert codecs.decode("text/plain; charset=utf-8", "é".encode()) == "é"
    assert codecs.decode(codecs.JSON, b"[1]", bytes) == b"[1]"


def test_protobuf_messages_roundtrip() -> None:
    ref = header_pb2.NodeRef(id="n", handler="h")
    content_type, data = codecs.encode(ref)
    assert content_type == "application/x-protobuf; messageType=tickmesh.v1.NodeRef"
    assert codecs.decode(content_type, data) == data  # no annotation: raw bytes
    assert codecs.decode(content_type, data, header_pb2.NodeRef) == ref
    with pytest.raises(ValidationError, match="NodeRef"):
        codecs.decode(content_type, data, header_pb2.GraphRef)


def test_codecs_refuse_what_they_cannot_represent() -> None:
    with pytest.raises(ValidationError):
        codecs.encode(object())
    with pytest.raises(ValidationError):
        codecs.encode(float("nan"))
    with pytest.raises(ValidationError):
        codecs.decode(codecs.JSON, b"{not json")


# --- context telemetry --------------------------------------------------------------------


def test_context_accumulates_telemetry() -> None:
    ctx = make_context()
    ctx.report(input_tokens=100, output_tokens=20, cost_micros=300, model="big")
    ctx.report(input_tokens=10, output_tokens=2, cost_micros=30, model="big", model_calls=2)
    ctx.report(input_tokens=5, model="small", lines=3)
    ctx.report(tool_calls=1, lines=2.5)
    ctx.record_tool_action("search", {"q": "x"}, ["r1"], side_effect=False, duration=0.25)

    telemetry = task_result_to_proto(
        "succeeded", output=codecs.encode(1), usage=ctx.usage, tool_actions=ctx.tool_actions
    ).telemetry
    assert (telemetry.input_tokens, telemetry.output_tokens, telemetry.cost_micros) == (
        115,
        22,
        330,
    )
    assert telemetry.model_calls == 4
    assert telemetry.tool_calls == 2
    assert dict(telemetry.custom_metrics) == {"lines": 5.5}
    per_model = {m.model: (m.input_tokens, m.calls) for m in telemetry.model_usage}
    assert per_model == {"big": (110, 3), "small": (5, 1)}


def test_tool_actions_become_proto_records() -> None:
    ctx = make_context()
    ctx.record_tool_action("fs.write", {"path": "a"}, None, side_effect=True, error="disk full")
    [action] = task_result_to_proto("failed", tool_actions=ctx.tool_actions).tool_actions
    assert (action.action_id, action.tool, action.side_effect) == ("a1", "fs.write", True)
    assert action.input.inline == b'{"path":"a"}'
    assert action.input.sha256 == hashlib.sha256(b'{"path":"a"}').hexdigest()
    assert not action.HasField("output")
    assert (action.error.type, action.error.message) == ("ToolError", "disk full")


def test_payloads_carry_size_and_digest() -> None:
    payload = payload_to_proto("application/json", b"{}")
    assert (payload.size, payload.sha256) == (2, hashlib.sha256(b"{}").hexdigest())


async def test_context_deadline_and_cancellation() -> None:
    ctx = make_context(deadline=datetime.now(UTC) + timedelta(seconds=10))
    assert 9 < ctx.remaining() <= 10
    assert not ctx.cancelled.is_set()


# --- plan decisions -----------------------------------------------------------------------


def test_dispatch_builds_next_steps() -> None:
    result = plan_result_to_proto(
        dispatch(step("a", {"x": 1}), step("b", b"raw"), rationale="fan out")
    )
    assert result.WhichOneof("decision") == "dispatch"
    assert result.rationale == "fan out"
    assert [(s.node_id, s.input.content_type, s.input.inline) for s in result.dispatch.steps] == [
        ("a", "application/json", b'{"x":1}'),
        ("b", "application/octet-stream", b"raw"),
    ]


def test_complete_wait_and_fail_decisions() -> None:
    done = plan_result_to_proto(complete({"answer": 42}))
    assert done.complete.output.inline == b'{"answer":42}'

    wait = plan_result_to_proto(
        wait_for("approval", timeout=90, on_timeout="signal", default={"ok": False}, prompt="?")
    ).wait
    assert wait.signal_name == "approval"
    assert wait.timeout.ToTimedelta() == timedelta(seconds=90)
    assert wait.on_timeout == result_pb2.WAIT_TIMEOUT_ACTION_SIGNAL
    assert wait.default_payload.inline == b'{"ok":false}'
    assert wait.prompt == "?"
    assert not plan_result_to_proto(wait_for("go")).wait.HasField("timeout")

    failed = plan_result_to_proto(fail("no way", type="Stuck", details={"tries": 3}))
    assert failed.WhichOneof("decision") == "fail"
    assert (failed.fail.error.type, failed.fail.error.message) == ("Stuck", "no way")
    assert not failed.fail.error.retryable
    assert dict(failed.fail.error.details) == {"tries": 3}


def test_decision_builders_validate() -> None:
    with pytest.raises(ConfigError):
        dispatch()
    with pytest.raises(ConfigError):
        step("")
    with pytest.raises(ConfigError):
        wait_for("x", on_timeout="later")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        wait_for("x", timeout=0)


def test_a_plan_without_decision_carries_its_error() -> None:
    result = plan_result_to_proto(None, error=ErrorData("ValueError", "bad", True))
    assert result.WhichOneof("decision") is None
    assert (result.error.type, result.error.retryable) == ("ValueError", True)


# --- errors -------------------------------------------------------------------------------


def test_task_errors_keep_type_retryability_and_details() -> None:
    error = ErrorData.from_exception(
        TaskError("quota", type="RateLimited", retryable=False, details={"retry_after": 5})
    )
    info = error_to_proto(error)
    assert (info.type, info.message, info.retryable) == ("RateLimited", "quota", False)
    assert dict(info.details) == {"retry_after": 5}


def test_other_exceptions_are_retryable_and_named_by_class() -> None:
    info = error_to_proto(ErrorData.from_exception(KeyError("k")))
    assert (info.type, info.retryable) == ("KeyError", True)
    assert error_to_proto(ErrorData.from_exception(ValueError())).message == "ValueError"


def test_unserializable_details_do_not_break_the_result() -> None:
    info = error_to_proto(ErrorData("X", "m", details={"obj": object()}))
    assert "repr" in dict(info.details)


class _FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.UNAVAILABLE, TransportError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.INVALID_ARGUMENT, ValidationError),
        (grpc.StatusCode.PERMISSION_DENIED, RPCError),
    ],
)
def test_rpc_errors_map_into_the_error_tree(code: grpc.StatusCode, kind: type[Exception]) -> None:
    mapped = map_rpc_error(_FakeRpcError(code, "why"))
    assert type(mapped) is kind
    assert "why" in str(mapped)
    if kind is RPCError:
        assert isinstance(mapped, RPCError)
        assert mapped.status == StatusCode.PERMISSION_DENIED


# --- blob resolution ----------------------------------------------------------------------


async def test_file_blob_resolver_reads_and_checks_blobs(tmp_path: Any) -> None:
    data = b"blob bytes"
    digest = hashlib.sha256(data).hexdigest()
    path = tmp_path / "acme" / digest[:2] / digest
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    resolver = FileBlobResolver(tmp_path)
    assert await resolver.resolve("acme", path.as_uri(), digest, len(data)) == data
    with pytest.raises(ValidationError):
        await resolver.resolve("other", path.as_uri(), digest, len(data))
    path.write_bytes(b"tampered")
    with pytest.raises(ValidationError):
        await resolver.resolve("acme", path.as_uri(), digest, len(data))
    with pytest.raises(ValidationError):
        await resolver.resolve("acme", "s3://bucket/key", digest, 1)
    await asyncio.sleep(0)


@settings(max_examples=500)
@given(
    # Halfway between two microseconds too, where rounding the product would differ.
    run_time=st.floats(min_value=-1.0, max_value=1e6, allow_nan=False)
    | st.integers(min_value=0, max_value=10**12).map(lambda k: (k + 0.5) / 1e6),
    queue_wait=st.none() | st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
)
def test_results_carry_run_time_and_queue_wait_as_timedelta_rounds_them(
    run_time: float, queue_wait: float | None
) -> None:
    telemetry = task_result_to_proto(
        "succeeded", run_time_s=run_time, queue_wait_s=queue_wait
    ).telemetry
    expected = duration_pb2.Duration()
    expected.FromTimedelta(timedelta(seconds=max(0.0, run_time)))
    assert telemetry.HasField("run_time")
    assert telemetry.run_time == expected
    assert telemetry.HasField("queue_wait") == (queue_wait is not None)
    if queue_wait is not None:
        expected.FromTimedelta(timedelta(seconds=queue_wait))
        assert telemetry.queue_wait == expected
    plan = plan_result_to_proto(None, run_time_s=run_time, queue_wait_s=queue_wait).telemetry
    assert plan == telemetry


class _SlowResolver:
    """Serves blobs named ``blob:<text>`` after a pause, counting reads in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0

    async def resolve(self, tenant: str, uri: str, sha256: str, size: int) -> bytes:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.05)
            if uri.startswith("missing:"):
                raise NotFoundError(f"blob {uri} does not exist")
            return uri.removeprefix("blob:").encode()
        finally:
            self.in_flight -= 1


def _input(name: str, output: WirePayload | None) -> PlanInputData:
    return PlanInputData(name, "n", "succeeded", output, "", "", 0, 0, 0)


def _wire(text: str, *, blob: bool) -> WirePayload:
    if blob:
        return WirePayload("text/plain", None, blob_uri=text)
    return WirePayload("text/plain", text.encode())


async def test_a_plans_blob_inputs_are_read_concurrently_and_kept_in_order() -> None:
    """A wide join's outputs travel as blobs: they are downloaded together, not in turn;
    the plan sees them in its inputs' order, and a missing one fails the attempt as the
    first unreadable input."""
    resolver = _SlowResolver()

    @plan
    async def join(ctx: PlanContext, goal: Any, inputs: list[PlanInputView]) -> Decision:
        return complete(None)

    worker = Worker("127.0.0.1:1", tenant="acme", tasks=[join], blob_resolver=resolver)
    inputs = [_input(f"b{i}", _wire(f"blob:part{i}", blob=True)) for i in range(5)]
    inputs.insert(2, _input("inline", _wire("here", blob=False)))
    inputs.insert(4, _input("failed", None))
    outputs = await worker._decode_outputs("acme", inputs)
    assert outputs == ["part0", "part1", "here", "part2", None, "part3", "part4"]
    assert resolver.most == 5  # every read in flight at once (in turn: 1), whatever the load
    one = await worker._decode_outputs("acme", [_input("b", _wire("blob:alone", blob=True))])
    assert one == ["alone"]

    broken = [_input(f"m{i}", _wire(f"missing:{i}", blob=True)) for i in range(3)]
    with pytest.raises(
        TaskError, match="cannot read the input: NOT_FOUND: blob missing:0 does not"
    ):
        await worker._decode_outputs("acme", [_input("ok", _wire("blob:x", blob=True)), *broken])
