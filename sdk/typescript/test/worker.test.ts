// The Worker against a fake pool (a grpc-js server speaking ExecutorPoolService.Connect):
// hello, batched completions, heartbeats, cancellation, deadlines, errors and drain.
import { strict as assert } from "node:assert";
import { test } from "node:test";

import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";

import {
  AssignmentSchema,
  ConnectRequestSchema,
  ConnectResponseSchema,
  type ConnectRequest,
  type ConnectResponse,
} from "../../../gen/ts/tickmesh/v1/executor_pool_service_pb.js";
import { NodeKind } from "../../../gen/ts/tickmesh/v1/graph_pb.js";
import { TaskStatus } from "../../../gen/ts/tickmesh/v1/result_pb.js";
import { TraceContextSchema } from "../../../gen/ts/tickmesh/v1/header_pb.js";
import { BlobRefSchema } from "../../../gen/ts/tickmesh/v1/payload_pb.js";
import { PlanInputSchema } from "../../../gen/ts/tickmesh/v1/request_pb.js";
import { TaskError, Worker, complete, decode, dispatch, encodeWire, step } from "../src/index.js";

type Call = grpc.ServerDuplexStream<ConnectRequest, ConnectResponse>;

async function fakePool(): Promise<{ target: string; calls: Call[]; frames: ConnectRequest[]; tenants: string[]; next: () => Promise<ConnectRequest>; close: () => void }> {
  const server = new grpc.Server();
  const calls: Call[] = [];
  const frames: ConnectRequest[] = [];
  const tenants: string[] = [];
  let waiters: Array<() => void> = [];
  let read = 0;
  server.addService(
    {
      Connect: {
        path: "/tickmesh.v1.ExecutorPoolService/Connect",
        requestStream: true,
        responseStream: true,
        requestSerialize: (m: ConnectRequest) => Buffer.from(toBinary(ConnectRequestSchema, m)),
        requestDeserialize: (b: Buffer) => fromBinary(ConnectRequestSchema, b),
        responseSerialize: (m: ConnectResponse) => Buffer.from(toBinary(ConnectResponseSchema, m)),
        responseDeserialize: (b: Buffer) => fromBinary(ConnectResponseSchema, b),
      },
    },
    {
      Connect: (call: Call) => {
        calls.push(call);
        tenants.push(String(call.metadata.get("x-tickmesh-tenant")[0] ?? ""));
        call.on("data", (m: ConnectRequest) => {
          frames.push(m);
          if (m.message.case === "hello") {
            call.write(
              create(ConnectResponseSchema, {
                message: { case: "welcome", value: { sessionId: "s1", heartbeatInterval: durationFromMs(100), inlinePayloadLimit: 1024n, maxMessageBytes: 1n << 20n, protocolVersion: 1 } },
              }),
            );
          }
          const w = waiters;
          waiters = [];
          for (const f of w) f();
        });
        call.on("end", () => call.end());
        call.on("error", () => undefined);
      },
    },
  );
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  const next = async (): Promise<ConnectRequest> => {
    while (read >= frames.length) await new Promise<void>((r) => waiters.push(r));
    return frames[read++]!;
  };
  return { target: `127.0.0.1:${port}`, calls, frames, tenants, next, close: () => server.forceShutdown() };
}

function assignment(id: string, kind: "task" | "plan", handler: string, input: unknown, deadlineMs = 10_000) {
  const header = {
    tenantId: "acme",
    lifetimeId: "l1",
    executionId: `e-${id}`,
    attempt: 1,
    iteration: 1,
    node: { id: `node-${handler}`, handler, kind: kind === "task" ? NodeKind.TASK : NodeKind.PLAN },
  };
  const body =
    kind === "task"
      ? { case: "taskRequest" as const, value: { input: encodeWire(input) } }
      : { case: "planRequest" as const, value: { goal: encodeWire(input), inputs: [] } };
  return create(AssignmentSchema, { assignmentId: id, envelope: { header, body }, deadline: timestampFromMs(Date.now() + deadlineMs) });
}

function assign(call: Call, ...items: ReturnType<typeof assignment>[]) {
  call.write(create(ConnectResponseSchema, { message: { case: "assignments", value: { items } } }));
}

test("the worker speaks the protocol: hello, batches, heartbeats, cancel, deadline, errors, drain", async () => {
  const pool = await fakePool();
  const worker = new Worker({ target: pool.target, tenant: "acme", concurrency: 3, log: () => undefined })
    .task("echo", async (_ctx, input: unknown) => input)
    .task("wait", async (ctx) => {
      await new Promise((_, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason)));
    })
    .task("boom", async () => {
      throw new TaskError("bad", { type: "Boom", retryable: false, details: { a: 1 } });
    })
    .task("crash", async () => {
      throw new RangeError("out of range");
    })
    .plan("planner", async (_ctx, goal) => (goal === "go" ? dispatch(step("n", { x: 1 })) : complete(goal)));
  worker.start();
  try {
    const hello = await pool.next();
    assert.equal(hello.message.case, "hello");
    if (hello.message.case !== "hello") return;
    assert.equal(hello.message.value.concurrency, 3);
    assert.equal(hello.message.value.protocolVersion, 1);
    assert.match(hello.message.value.runtime, /^node \d+/);
    assert.deepEqual(hello.message.value.handlers.map((h) => h.name).sort(), ["boom", "crash", "echo", "planner", "wait"]);
    assert.equal(pool.tenants[0], "acme");
    await worker.waitConnected();
    const call = pool.calls[0]!;

    // Two results finishing in the same tick travel in one Completions frame.
    assign(call, assignment("a1", "task", "echo", { n: 1 }), assignment("a2", "plan", "planner", "go"));
    const both = await pool.next();
    assert.equal(both.message.case, "completions");
    if (both.message.case !== "completions") return;
    assert.deepEqual(both.message.value.items.map((c) => c.assignmentId).sort(), ["a1", "a2"]);
    const echo = both.message.value.items.find((c) => c.assignmentId === "a1")!;
    assert.equal(echo.result.case, "taskResult");
    if (echo.result.case === "taskResult") {
      assert.equal(echo.result.value.status, TaskStatus.SUCCEEDED);
      const out = echo.result.value.output!;
      assert.deepEqual(decode(out.contentType, out.data.case === "inline" ? out.data.value : new Uint8Array()), { n: 1 });
    }
    const planned = both.message.value.items.find((c) => c.assignmentId === "a2")!;
    assert.equal(planned.result.case === "planResult" && planned.result.value.decision.case, "dispatch");

    // Errors are structured.
    assign(call, assignment("b1", "task", "boom", null), assignment("b2", "task", "crash", null));
    const errs = await pool.next();
    assert.equal(errs.message.case, "completions");
    if (errs.message.case === "completions") {
      const byId = new Map(errs.message.value.items.map((c) => [c.assignmentId, c.result.case === "taskResult" ? c.result.value : undefined]));
      assert.equal(byId.get("b1")?.status, TaskStatus.FAILED);
      assert.deepEqual([byId.get("b1")?.error?.type, byId.get("b1")?.error?.retryable, byId.get("b1")?.error?.details], ["Boom", false, { a: 1 }]);
      assert.deepEqual([byId.get("b2")?.error?.type, byId.get("b2")?.error?.retryable], ["RangeError", true]);
    }

    // Long work is heartbeated, cancellation reports CANCELLED, the deadline TIMED_OUT.
    assign(call, assignment("c1", "task", "wait", null), assignment("c2", "task", "wait", null, 400));
    const beat = await pool.next();
    assert.equal(beat.message.case, "heartbeat");
    if (beat.message.case === "heartbeat") assert.deepEqual([...beat.message.value.assignmentIds].sort(), ["c1", "c2"]);
    call.write(create(ConnectResponseSchema, { message: { case: "cancellations", value: { items: [{ assignmentId: "c1", reason: "stop" }] } } }));
    let cancelled: ConnectRequest;
    do cancelled = await pool.next();
    while (cancelled.message.case === "heartbeat");
    assert.equal(cancelled.message.case === "completions" && cancelled.message.value.items[0]?.result.value?.$typeName, "tickmesh.v1.TaskResult");
    if (cancelled.message.case === "completions" && cancelled.message.value.items[0]?.result.case === "taskResult") {
      assert.equal(cancelled.message.value.items[0].assignmentId, "c1");
      assert.equal(cancelled.message.value.items[0].result.value.status, TaskStatus.CANCELLED);
    }
    let timedOut: ConnectRequest;
    do timedOut = await pool.next();
    while (timedOut.message.case === "heartbeat");
    if (timedOut.message.case === "completions" && timedOut.message.value.items[0]?.result.case === "taskResult") {
      assert.equal(timedOut.message.value.items[0].assignmentId, "c2");
      assert.equal(timedOut.message.value.items[0].result.value.status, TaskStatus.TIMED_OUT);
      assert.equal(timedOut.message.value.items[0].result.value.error?.type, "TimeoutError");
    } else assert.fail(`expected the timed-out completion, got ${timedOut.message.case}`);

    // Over the concurrency limit: rejected.
    assign(call, ...["d1", "d2", "d3", "d4"].map((id) => assignment(id, "task", "wait", null)));
    let rejected: ConnectRequest;
    do rejected = await pool.next();
    while (rejected.message.case === "heartbeat");
    assert.equal(rejected.message.case, "rejections");
    if (rejected.message.case === "rejections") {
      assert.deepEqual(rejected.message.value.items.map((r) => [r.assignmentId, r.error?.type]), [["d4", "ExecutorBusy"]]);
    }
  } finally {
    await worker.shutdown(100);
    pool.close();
  }
  assert.ok(worker.stats.completionFrames >= 4);
});

test("a handler sees the step's trace context, so its own spans can join the lifetime's trace", async () => {
  const pool = await fakePool();
  const worker = new Worker({ target: pool.target, tenant: "acme", log: () => undefined })
    .task("traced", async (ctx) => ({ traceparent: ctx.traceparent, tracestate: ctx.tracestate }));
  worker.start();
  try {
    await pool.next(); // hello
    await worker.waitConnected();
    const call = pool.calls[0]!;
    const traced = assignment("t1", "task", "traced", null);
    const traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    traced.envelope!.header!.traceContext = create(TraceContextSchema, { traceparent, tracestate: "k=v" });
    assign(call, traced, assignment("t2", "task", "traced", null));
    const done = await pool.next();
    assert.equal(done.message.case, "completions");
    if (done.message.case !== "completions") return;
    const outputs = new Map(
      done.message.value.items.map((c) => {
        const out = c.result.case === "taskResult" ? c.result.value.output : undefined;
        return [c.assignmentId, out && out.data.case === "inline" ? decode(out.contentType, out.data.value) : undefined];
      }),
    );
    assert.deepEqual(outputs.get("t1"), { traceparent, tracestate: "k=v" });
    assert.deepEqual(outputs.get("t2"), { traceparent: "", tracestate: "" }); // an untraced lifetime
  } finally {
    await worker.shutdown(100);
    pool.close();
  }
});

test("a plan's blob inputs are read together and handed over in order", async () => {
  const pool = await fakePool();
  let inFlight = 0;
  let most = 0;
  const resolver = {
    async resolve(_tenant: string, uri: string): Promise<Uint8Array> {
      inFlight += 1;
      most = Math.max(most, inFlight);
      await new Promise((r) => setTimeout(r, 50));
      inFlight -= 1;
      return encodeWire(uri.replace("blob:", "")).data.value as Uint8Array;
    },
  };
  const seen: unknown[][] = [];
  const worker = new Worker({ target: pool.target, tenant: "acme", blobResolver: resolver, log: () => undefined }).plan(
    "join",
    async (_ctx, _goal, inputs) => {
      seen.push(inputs.map((i) => i.output));
      return complete(inputs.length);
    },
  );
  worker.start();
  try {
    await pool.next(); // hello
    await worker.waitConnected();
    const joined = assignment("j1", "plan", "join", null);
    const body = joined.envelope!.body;
    if (body.case !== "planRequest") return assert.fail("not a plan request");
    const blob = (i: number) => ({
      contentType: "application/json",
      data: { case: "blob" as const, value: create(BlobRefSchema, { uri: `blob:part${i}`, contentType: "application/json" }) },
    });
    const inputs = [0, 1, 2, 3, 4].map((i) => create(PlanInputSchema, { executionId: `b${i}`, output: blob(i) }));
    inputs.splice(2, 0, create(PlanInputSchema, { executionId: "inline", output: encodeWire("here") }));
    inputs.splice(4, 0, create(PlanInputSchema, { executionId: "failed" }));
    body.value.inputs = inputs;
    assign(pool.calls[0]!, joined);
    let done: ConnectRequest;
    do done = await pool.next();
    while (done.message.case === "heartbeat");
    assert.equal(done.message.case, "completions");
    assert.equal(most, 5, "every read in flight at once (in turn: 1), whatever the load");
    assert.deepEqual(seen, [["part0", "part1", "here", "part2", null, "part3", "part4"]]);
  } finally {
    await worker.shutdown(100);
    pool.close();
  }
});

test("an attempt whose result cannot be built is reported failed, and the worker keeps serving", async () => {
  const pool = await fakePool();
  const worker = new Worker({ target: pool.target, tenant: "acme", log: () => undefined })
    .task("odd-throw", async () => {
      throw Object.create(null); // no toString: String() of it throws
    })
    .task("nan-tokens", async (ctx) => {
      ctx.report({ inputTokens: Number.NaN });
      return 1;
    })
    .task("huge-tokens", async (ctx) => {
      ctx.report({ outputTokens: 1e30 });
      return 1;
    })
    .task("half-call", async (ctx) => {
      ctx.report({ modelCalls: 1.5 });
      return 1;
    })
    .task("echo", async (_ctx, input: unknown) => input);
  worker.start();
  try {
    await pool.next(); // hello
    await worker.waitConnected();
    const ids = ["odd-throw", "nan-tokens", "huge-tokens", "half-call"];
    assign(pool.calls[0]!, ...ids.map((h) => assignment(h, "task", h, null)), assignment("after", "task", "echo", 1));
    const reported = new Map<string, { status: TaskStatus | undefined; type: string | undefined; retryable: boolean | undefined }>();
    while (!reported.has("after")) {
      const frame = await pool.next();
      if (frame.message.case !== "completions") continue;
      for (const c of frame.message.value.items) {
        const r = c.result.case === "taskResult" ? c.result.value : undefined;
        reported.set(c.assignmentId, { status: r?.status, type: r?.error?.type, retryable: r?.error?.retryable });
      }
    }
    assert.deepEqual(reported.get("after"), { status: TaskStatus.SUCCEEDED, type: undefined, retryable: undefined });
    assert.deepEqual(reported.get("odd-throw"), { status: TaskStatus.FAILED, type: "Error", retryable: true });
    for (const id of ["nan-tokens", "huge-tokens", "half-call"]) {
      assert.deepEqual(reported.get(id), { status: TaskStatus.FAILED, type: "ValidationError", retryable: false }, id);
    }
  } finally {
    await worker.shutdown(100);
    pool.close();
  }
});

test("a deadline further away than a timer can hold does not time the attempt out at once", async () => {
  const pool = await fakePool();
  let release: () => void = () => undefined;
  const gate = new Promise<void>((r) => (release = r));
  const worker = new Worker({ target: pool.target, tenant: "acme", log: () => undefined })
    .task("gated", async (ctx) => {
      await Promise.race([gate, new Promise((_, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason)))]);
      return "done";
    })
    .task("echo", async (_ctx, input: unknown) => input);
  worker.start();
  try {
    await pool.next(); // hello
    await worker.waitConnected();
    const thirtyDays = 30 * 24 * 3600 * 1000; // over 2^31 - 1 ms, setTimeout's largest delay
    assign(pool.calls[0]!, assignment("long", "task", "gated", null, thirtyDays));
    assign(pool.calls[0]!, assignment("probe", "task", "echo", 1));
    const statuses = new Map<string, TaskStatus | undefined>();
    while (!statuses.has("long")) {
      const frame = await pool.next();
      if (frame.message.case !== "completions") continue;
      for (const c of frame.message.value.items) statuses.set(c.assignmentId, c.result.case === "taskResult" ? c.result.value.status : undefined);
      if (statuses.has("probe")) release();
    }
    assert.equal(statuses.get("long"), TaskStatus.SUCCEEDED);
  } finally {
    release();
    await worker.shutdown(100);
    pool.close();
  }
});

test("waitConnected settles when the worker stops, so no timer outlives it", async () => {
  const pool = await fakePool();
  pool.close(); // nothing listens: the worker never connects
  const worker = new Worker({ target: pool.target, tenant: "acme", log: () => undefined }).task("echo", async (_ctx, input: unknown) => input);
  worker.start();
  const before = worker.waitConnected(600_000).then(
    () => "connected",
    () => "rejected",
  );
  await worker.shutdown(100);
  const settled = await Promise.race([before, new Promise<string>((r) => setImmediate(() => r("pending")))]);
  assert.equal(settled, "rejected");
  await assert.rejects(worker.waitConnected(600_000));
});

test("after the worker half-closes its stream it writes nothing more, so the pool can end the stream cleanly", async () => {
  const pool = await fakePool();
  const worker = new Worker({ target: pool.target, tenant: "acme", log: () => undefined }).task("echo", async (_ctx, input: unknown) => input);
  worker.start();
  try {
    await worker.waitConnected();
    const call = pool.calls[0]!;
    const session = (worker as unknown as { session: { call: grpc.ClientDuplexStream<ConnectRequest, ConnectResponse> } }).session;
    // Watch the client side: every write after its end() is a write the stream refuses.
    let ended = false;
    const lateWrites: string[] = [];
    const write = session.call.write.bind(session.call);
    const end = session.call.end.bind(session.call);
    session.call.end = ((...args: unknown[]) => {
      ended = true;
      return (end as (...a: unknown[]) => unknown)(...args);
    }) as typeof session.call.end;
    session.call.write = ((message: ConnectRequest, ...rest: unknown[]) => {
      if (ended) lateWrites.push(message.message.case ?? "");
      return (write as (...a: unknown[]) => boolean)(message, ...rest);
    }) as typeof session.call.write;
    // The pool keeps its side open after the drain (as it does while it settles), and an
    // assignment it sent before seeing the half-close arrives after it.
    call.removeAllListeners("end");
    const halfClosed = new Promise<void>((resolve) => call.once("end", resolve));
    call.write(create(ConnectResponseSchema, { message: { case: "drain", value: { grace: durationFromMs(0) } } }));
    await halfClosed;
    assert.ok(ended);
    const rejectionsBefore = worker.stats.rejections;
    assign(call, assignment("late", "task", "echo", 1));
    while (worker.stats.rejections === rejectionsBefore) await new Promise<void>((r) => setImmediate(r));
    // The refusal's frame would be flushed on the next turns of the event loop.
    for (let i = 0; i < 3; i++) await new Promise<void>((r) => setImmediate(r));
    assert.deepEqual(lateWrites, []);
    call.end();
  } finally {
    await worker.shutdown(100);
    pool.close();
  }
});
