// The Node.js executor: runs task and plan handlers for the executor pool over its public
// gRPC protocol (ExecutorPoolService.Connect), exactly like the Python Worker.
//
// One stream carries everything, in batches: the pool sends Assignments frames; the worker
// answers with Completions frames holding every result finished since the last frame (results
// finishing in the same event-loop tick travel together), one Heartbeat frame listing all
// running assignments per heartbeat interval, and Rejections for work it cannot run.
import { createHash, randomBytes } from "node:crypto";
import { hostname } from "node:os";

import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { durationMs, timestampDate } from "@bufbuild/protobuf/wkt";

import {
  ConnectRequestSchema,
  ConnectResponseSchema,
  ExecutorPoolService,
  type Assignment,
  type Completion,
  type ConnectRequest,
  type ConnectResponse,
  type Rejection,
  type Welcome,
  CompletionSchema,
  RejectionSchema,
  HandlerSpecSchema,
} from "../../../gen/ts/tickmesh/v1/executor_pool_service_pb.js";
import { NodeKind } from "../../../gen/ts/tickmesh/v1/graph_pb.js";
import type { Payload as WirePayload } from "../../../gen/ts/tickmesh/v1/payload_pb.js";
import { TaskStatus } from "../../../gen/ts/tickmesh/v1/result_pb.js";
import { PoolBlobResolver, payloadBytes, payloadContentType, type BlobResolver } from "./blobs.js";
import { decode, encode } from "./codecs.js";
import { PlanContext, TaskContext, type ExecutionContext, type RawPayload } from "./context.js";
import { completion, errorInfo, planResult, statusName, taskResult, type TaskOutcome } from "./convert.js";
import { ConfigError, RpcError, TaskError, TickmeshError, ValidationError, errorData, type ErrorData } from "./errors.js";
import { HANDLER_NAME_PATTERN, TENANT_ID_PATTERN, TENANT_METADATA_KEY } from "./ids.js";
import { Decision, type PlanInputView } from "./plan.js";
import { SDK_VERSION } from "./version.js";

export { TENANT_METADATA_KEY } from "./ids.js";
export const PROTOCOL_VERSION = 1;
export const CANCELLED_ERROR_TYPE = "CancelledError";
const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const WELCOME_TIMEOUT_MS = 10_000;
const CLOSE_TIMEOUT_MS = 5_000;
// setTimeout fires at once when asked for a longer delay.
const MAX_TIMER_MS = 2 ** 31 - 1;
const FATAL_CODES = new Set([
  grpc.status.INVALID_ARGUMENT,
  grpc.status.PERMISSION_DENIED,
  grpc.status.UNAUTHENTICATED,
  grpc.status.UNIMPLEMENTED,
]);
const CONNECT_PATH = `/${ExecutorPoolService.typeName}/${ExecutorPoolService.method.connect.name}`;

/** A task handler: `async (ctx, input) => output`. */
export type TaskFn<In = any, Out = unknown> = (ctx: TaskContext, input: In) => Promise<Out> | Out;
/** A plan handler: `async (ctx, goal, inputs) => decision`. */
export type PlanFn<Goal = any> = (ctx: PlanContext, goal: Goal, inputs: PlanInputView[]) => Promise<Decision> | Decision;

/** Options of a handler. */
export interface HandlerOptions {
  /** Per-attempt limit in milliseconds, enforced on top of the pool's deadline. */
  timeoutMs?: number;
  /** Identifies the handler's code version; defaults to the SHA-256 of the function's source. */
  codeDigest?: string;
}

interface HandlerEntry {
  kind: "task" | "plan";
  name: string;
  fn: TaskFn | PlanFn;
  timeoutMs: number | undefined;
  codeDigest: string;
}

/** Options of a {@link Worker}. */
export interface WorkerOptions {
  /** The pool's gRPC address, host:port. */
  target: string;
  /** The tenant whose work this worker runs. */
  tenant: string;
  /** The most assignments run at once (default 16). */
  concurrency?: number;
  /** Identifies this executor; defaults to host:pid:random. */
  executorId?: string;
  /** Free-form metadata announced to the pool. */
  labels?: Record<string, string>;
  /**
   * Fetches payloads that travel as blobs; defaults to a {@link PoolBlobResolver} on the
   * worker's client (local file:// blobs read directly, all others downloaded through the pool).
   */
  blobResolver?: BlobResolver;
  /** The channel's message size limit (default 64 MiB; the pool's own limit also applies). */
  maxMessageBytes?: number;
  /** First reconnect delay (default 100 ms), doubled up to reconnectMaxMs (default 5 s). */
  reconnectInitialMs?: number;
  reconnectMaxMs?: number;
  /** Where warnings go (default console.warn). */
  log?: (message: string) => void;
}

/** Counters of what a Worker sent and received, over all its connections. */
export interface WorkerStats {
  connections: number;
  assignmentFrames: number;
  assignments: number;
  completionFrames: number;
  completions: number;
  heartbeatFrames: number;
  rejections: number;
  cancellations: number;
}

interface Running {
  item: Assignment;
  kind: "task" | "plan";
  handler: HandlerEntry;
  ctx: TaskContext | PlanContext;
  abort: AbortController;
  startedAt: Date;
  timer: NodeJS.Timeout | undefined;
  settled: boolean;
}

type Outcome =
  | { kind: "value"; value: unknown }
  | { kind: "error"; error: unknown }
  | { kind: "timeout" }
  | { kind: "cancelled"; reason: string };

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

/**
 * Runs task and plan handlers for one tenant, fed by the executor pool.
 *
 * @example
 * const worker = new Worker({ target: "127.0.0.1:50051", tenant: "acme" })
 *   .task("summarize", async (ctx, doc: { text: string }) => doc.text.slice(0, 100));
 * await worker.run();
 */
export class Worker {
  readonly executorId: string;
  readonly stats: WorkerStats = {
    connections: 0,
    assignmentFrames: 0,
    assignments: 0,
    completionFrames: 0,
    completions: 0,
    heartbeatFrames: 0,
    rejections: 0,
    cancellations: 0,
  };
  private readonly options: Required<Omit<WorkerOptions, "executorId" | "labels" | "blobResolver" | "log">>;
  private readonly labels: Record<string, string>;
  private readonly blobResolver: BlobResolver | undefined;
  private resolver: BlobResolver | undefined;
  private readonly log: (message: string) => void;
  private readonly handlers = new Map<string, HandlerEntry>();
  private stopping = false;
  private readonly stop = new AbortController();
  private running: Promise<void> | undefined;
  private session: Session | undefined;
  private connectedWaiters: Array<{ resolve: () => void; reject: (err: Error) => void }> = [];

  constructor(options: WorkerOptions) {
    if (!TENANT_ID_PATTERN.test(options.tenant)) throw new ConfigError(`invalid tenant id ${JSON.stringify(options.tenant)}`);
    const concurrency = options.concurrency ?? 16;
    if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 10_000) {
      throw new ConfigError(`concurrency must be an integer between 1 and 10000, got ${concurrency}`);
    }
    this.options = {
      target: options.target,
      tenant: options.tenant,
      concurrency,
      maxMessageBytes: options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES,
      reconnectInitialMs: options.reconnectInitialMs ?? 100,
      reconnectMaxMs: options.reconnectMaxMs ?? 5_000,
    };
    this.executorId = options.executorId ?? `${hostname()}:${process.pid}:${randomBytes(4).toString("hex")}`;
    this.labels = { ...(options.labels ?? {}) };
    this.blobResolver = options.blobResolver;
    this.resolver = options.blobResolver;
    this.log = options.log ?? ((m) => console.warn(`[tickmesh] ${m}`));
  }

  /** Serve a task handler `fn(ctx, input) => output` under `name`. */
  task<In = any, Out = unknown>(name: string, fn: TaskFn<In, Out>, options: HandlerOptions = {}): this {
    return this.add("task", name, fn as TaskFn, options);
  }

  /** Serve a plan handler `fn(ctx, goal, inputs) => Decision` under `name`. */
  plan<Goal = any>(name: string, fn: PlanFn<Goal>, options: HandlerOptions = {}): this {
    return this.add("plan", name, fn as PlanFn, options);
  }

  private add(kind: "task" | "plan", name: string, fn: TaskFn | PlanFn, options: HandlerOptions): this {
    if (!HANDLER_NAME_PATTERN.test(name)) {
      throw new ConfigError(`invalid handler name ${JSON.stringify(name)}: expected [A-Za-z0-9_-]{1,128}`);
    }
    if (this.running) throw new ConfigError("add handlers before the worker runs");
    const key = `${kind}:${name}`;
    if (this.handlers.has(key)) throw new ConfigError(`two ${kind}s are named ${JSON.stringify(name)}`);
    if (options.timeoutMs !== undefined && !(options.timeoutMs > 0)) {
      throw new ConfigError(`timeoutMs must be positive, got ${options.timeoutMs}`);
    }
    this.handlers.set(key, {
      kind,
      name,
      fn,
      timeoutMs: options.timeoutMs,
      codeDigest: options.codeDigest ?? createHash("sha256").update(fn.toString()).digest("hex"),
    });
    return this;
  }

  /** Serve until shutdown(), reconnecting with backoff. Rejects when the pool refuses this executor. */
  run(): Promise<void> {
    if (this.running) return this.running;
    if (this.handlers.size === 0) return Promise.reject(new ConfigError("a Worker needs at least one task or plan"));
    this.running = this.loop();
    return this.running;
  }

  /** Start serving in the background (errors are logged); returns this. */
  start(): this {
    this.run().catch((err: unknown) => this.log(`worker stopped: ${String(err)}`));
    return this;
  }

  /** Resolve once the pool has welcomed this worker (rejects after `timeoutMs`). */
  waitConnected(timeoutMs = 10_000): Promise<void> {
    if (this.session) return Promise.resolve();
    if (this.stopping) return Promise.reject(new TickmeshError("the worker is shutting down"));
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (err: Error) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      const timer = setTimeout(() => {
        this.connectedWaiters = this.connectedWaiters.filter((w) => w !== waiter);
        reject(new Error(`not connected within ${timeoutMs} ms`));
      }, timeoutMs);
      this.connectedWaiters.push(waiter);
    });
  }

  /** Stop taking work, let running work finish (up to `graceMs`), and disconnect. */
  async shutdown(graceMs = 10_000): Promise<void> {
    this.stopping = true;
    this.stop.abort();
    const session = this.session;
    if (session) await session.drain(graceMs);
    if (this.running) {
      await this.running.catch((err: unknown) => this.log(`worker stopped with an error: ${String(err)}`));
    }
  }

  private async loop(): Promise<void> {
    const client = new grpc.Client(this.options.target, grpc.credentials.createInsecure(), {
      "grpc.max_receive_message_length": this.options.maxMessageBytes,
      "grpc.max_send_message_length": this.options.maxMessageBytes,
      "grpc.keepalive_time_ms": 20_000,
      "grpc.keepalive_timeout_ms": 10_000,
      "grpc.keepalive_permit_without_calls": 1,
      "grpc.initial_reconnect_backoff_ms": 100,
      "grpc.max_reconnect_backoff_ms": 2_000,
    });
    // Blob downloads share the Connect stream's client (one connection to the pool).
    const pooled = this.blobResolver ? undefined : new PoolBlobResolver(client);
    this.resolver = this.blobResolver ?? pooled;
    let backoff = this.options.reconnectInitialMs;
    try {
      while (!this.stopping) {
        let welcomed = false;
        try {
          welcomed = await this.serveOnce(client);
        } catch (err) {
          if (err instanceof RpcError && FATAL_CODES.has(err.code)) throw err;
          if (err instanceof ValidationError) throw err;
          this.log(`executor stream to ${this.options.target} broke: ${err instanceof Error ? err.message : String(err)}`);
        }
        if (this.stopping) break;
        if (welcomed) backoff = this.options.reconnectInitialMs;
        await sleep(backoff, this.stop.signal);
        backoff = Math.min(this.options.reconnectMaxMs, backoff * 2);
      }
    } finally {
      pooled?.close();
      this.resolver = this.blobResolver;
      client.close();
      // Settle waiters now: their timers would otherwise keep the process alive.
      const waiters = this.connectedWaiters;
      this.connectedWaiters = [];
      for (const w of waiters) w.reject(new TickmeshError("the worker stopped before the pool welcomed it"));
    }
  }

  private hello(): ConnectRequest {
    return create(ConnectRequestSchema, {
      message: {
        case: "hello",
        value: {
          executorId: this.executorId,
          handlers: [...this.handlers.values()].map((h) =>
            create(HandlerSpecSchema, {
              name: h.name,
              kind: h.kind === "task" ? NodeKind.TASK : NodeKind.PLAN,
              codeDigest: h.codeDigest,
            }),
          ),
          concurrency: this.options.concurrency,
          runtime: `node ${process.versions.node}`,
          sdkVersion: SDK_VERSION,
          protocolVersion: PROTOCOL_VERSION,
          labels: this.labels,
        },
      },
    });
  }

  /** One Connect call: hello, welcome, then the session until the stream ends. True when welcomed. */
  private serveOnce(client: grpc.Client): Promise<boolean> {
    const metadata = new grpc.Metadata();
    metadata.set(TENANT_METADATA_KEY, this.options.tenant);
    const call = client.makeBidiStreamRequest<ConnectRequest, ConnectResponse>(
      CONNECT_PATH,
      (msg) => Buffer.from(toBinary(ConnectRequestSchema, msg)),
      (buf) => fromBinary(ConnectResponseSchema, buf),
      metadata,
      {},
    );
    return new Promise<boolean>((resolve, reject) => {
      let session: Session | undefined;
      let finished = false;
      const onStop = () => {
        if (!session) call.cancel();
      };
      const timer = setTimeout(() => {
        if (!session) {
          call.cancel();
          end(new Error(`no welcome from the pool within ${WELCOME_TIMEOUT_MS} ms`));
        }
      }, WELCOME_TIMEOUT_MS);
      this.stop.signal.addEventListener("abort", onStop, { once: true });
      const end = (err?: unknown) => {
        if (finished) return;
        finished = true;
        clearTimeout(timer);
        this.stop.signal.removeEventListener("abort", onStop);
        if (session) {
          session.closed();
          if (this.session === session) this.session = undefined;
          resolve(true);
        } else if (err !== undefined && !this.stopping) {
          reject(err);
        } else {
          resolve(false);
        }
      };
      call.on("data", (response: ConnectResponse) => {
        if (session) {
          session.onFrame(response);
          return;
        }
        if (response.message.case !== "welcome") {
          call.cancel();
          end(new Error("the pool did not answer hello with welcome"));
          return;
        }
        clearTimeout(timer);
        session = new Session(this, call, response.message.value);
        this.session = session;
        this.stats.connections += 1;
        const waiters = this.connectedWaiters;
        this.connectedWaiters = [];
        for (const w of waiters) w.resolve();
        if (this.stopping) void session.drain(0);
      });
      call.on("error", (err: grpc.ServiceError) => end(new RpcError(err.code, err.details || err.message)));
      call.on("end", () => end());
      call.on("status", (status: grpc.StatusObject) => {
        if (status.code !== grpc.status.OK) end(new RpcError(status.code, status.details));
        else end();
      });
      try {
        call.write(this.hello());
      } catch (err) {
        end(err);
      }
    });
  }

  // --- running one assignment -----------------------------------------------------------

  /** @internal */
  handlerFor(kind: "task" | "plan", name: string): HandlerEntry | undefined {
    return this.handlers.get(`${kind}:${name}`);
  }

  /** @internal */
  get concurrency(): number {
    return this.options.concurrency;
  }

  /** @internal */
  get maxMessageBytes(): number {
    return this.options.maxMessageBytes;
  }

  private async decodePayload(ctx: ExecutionContext, payload: WirePayload | undefined): Promise<[unknown, RawPayload]> {
    if (!payload) return [null, { contentType: "", data: new Uint8Array() }];
    try {
      if (!this.resolver) throw new RpcError(grpc.status.UNAVAILABLE, "the worker is not connected to the pool");
      const data = await payloadBytes(ctx.tenantId, payload, this.resolver, ctx.signal);
      const contentType = payloadContentType(payload);
      return [decode(contentType, data), { contentType, data }];
    } catch (err) {
      if (ctx.signal.aborted) throw ctx.signal.reason;
      // A pool that cannot be reached right now is worth another attempt; a bad blob is not.
      if (err instanceof RpcError || err instanceof ConfigError) throw err;
      throw new TaskError(`cannot read the input: ${err instanceof Error ? err.message : String(err)}`, {
        type: "InvalidInput",
        retryable: false,
      });
    }
  }

  /** @internal */
  async invoke(run: Running): Promise<unknown> {
    const body = run.item.envelope?.body;
    if (body?.case === "taskRequest") {
      const [value, raw] = await this.decodePayload(run.ctx, body.value.input);
      run.ctx.rawInput = raw;
      return (run.handler.fn as TaskFn)(run.ctx as TaskContext, value);
    }
    if (body?.case !== "planRequest") throw new ValidationError("the assignment carries no request");
    const request = body.value;
    const [goal, raw] = await this.decodePayload(run.ctx, request.goal);
    run.ctx.rawInput = raw;
    // Read together: a wide join's outputs travel as blobs, and one after the other a join of N
    // would wait for N downloads in turn. The first failure in the inputs' order is reported.
    const read = await Promise.allSettled(
      request.inputs.map(async (p) => (p.output ? (await this.decodePayload(run.ctx, p.output))[0] : null)),
    );
    const failed = read.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) throw failed.reason;
    const inputs: PlanInputView[] = [];
    for (const [i, p] of request.inputs.entries()) {
      const output = (read[i] as PromiseFulfilledResult<unknown>).value;
      const status = statusName(p.status);
      inputs.push({
        executionId: p.executionId,
        nodeId: p.node?.id ?? "",
        status,
        output,
        errorType: p.error?.type ?? "",
        errorMessage: p.error?.message ?? "",
        inputTokens: Number(p.telemetry?.inputTokens ?? 0n),
        outputTokens: Number(p.telemetry?.outputTokens ?? 0n),
        costMicros: Number(p.telemetry?.costMicros ?? 0n),
        succeeded: p.status === TaskStatus.SUCCEEDED,
      });
    }
    const ctx = run.ctx as PlanContext;
    if (request.signal) {
      const [payload] = await this.decodePayload(ctx, request.signal.payload);
      ctx.signalDelivery = {
        name: request.signal.name,
        payload,
        approver: request.signal.approver,
        timedOut: request.signal.timedOut,
      };
    }
    return (run.handler.fn as PlanFn)(ctx, goal, inputs);
  }

  /** @internal A failed completion without the handler's telemetry, tool actions or output. */
  failedCompletion(run: Running, error: ErrorData): Completion {
    const finished = new Date();
    const runTimeMs = finished.getTime() - run.startedAt.getTime();
    const usage = { inputTokens: 0, outputTokens: 0, costMicros: 0, modelCalls: 0, toolCalls: 0, models: new Map(), custom: new Map() };
    const result =
      run.kind === "task"
        ? { case: "taskResult" as const, value: taskResult("failed", { error, usage, toolActions: [], runTimeMs, queueWaitMs: undefined }) }
        : { case: "planResult" as const, value: planResult(undefined, { error, usage, runTimeMs, queueWaitMs: undefined }) };
    return completion(run.item.assignmentId, result, run.startedAt, finished, run.handler.codeDigest);
  }

  /** @internal Build the completion of a finished attempt. */
  completionOf(run: Running, outcome: Outcome): Completion {
    const finished = new Date();
    const runTimeMs = finished.getTime() - run.startedAt.getTime();
    const created = run.item.envelope?.header?.createdAt;
    const queueWaitMs = created ? run.startedAt.getTime() - timestampDate(created).getTime() : undefined;
    let status: TaskOutcome = "succeeded";
    let error: ErrorData | undefined;
    let value: unknown;
    switch (outcome.kind) {
      case "timeout":
        status = "timed_out";
        error = { type: "TimeoutError", message: "the attempt ran past its deadline", retryable: true };
        break;
      case "cancelled":
        status = "cancelled";
        error = { type: CANCELLED_ERROR_TYPE, message: outcome.reason || "the attempt was cancelled", retryable: false };
        break;
      case "error":
        status = "failed";
        error = errorData(outcome.error);
        break;
      case "value":
        value = outcome.value;
        break;
    }
    const usage = run.ctx.usage;
    if (run.kind === "task") {
      let output: [string, Uint8Array] | undefined;
      if (status === "succeeded") {
        try {
          output = encode(value);
        } catch (err) {
          status = "failed";
          error = { type: "ValidationError", message: err instanceof Error ? err.message : String(err), retryable: false };
        }
      }
      const result = taskResult(status, { output, error, usage, toolActions: run.ctx.toolActions, runTimeMs, queueWaitMs });
      return completion(run.item.assignmentId, { case: "taskResult", value: result }, run.startedAt, finished, run.handler.codeDigest);
    }
    let decision: Decision | undefined;
    if (status === "succeeded") {
      if (value instanceof Decision) decision = value;
      else {
        error = {
          type: "InvalidDecision",
          message: `a plan must return dispatch/complete/waitFor/fail, not ${String(value).slice(0, 200)}`,
          retryable: false,
        };
      }
    }
    let result;
    try {
      result = planResult(decision, { error, usage, runTimeMs, queueWaitMs });
    } catch (err) {
      result = planResult(undefined, {
        error: { type: "ValidationError", message: err instanceof Error ? err.message : String(err), retryable: false },
        usage,
        runTimeMs,
        queueWaitMs,
      });
    }
    return completion(run.item.assignmentId, { case: "planResult", value: result }, run.startedAt, finished, run.handler.codeDigest);
  }
}

/** A failed stand-in for a completion too large to send, or undefined if it fits. */
function oversized(c: Completion, size: number, maxBytes: number): Completion | undefined {
  if (size <= maxBytes - 1024) return undefined;
  const error = errorInfo({
    type: "OutputTooLarge",
    message: `the result is ${size} bytes, over the pool's ${maxBytes}-byte message limit; store large outputs in the blob store`,
    retryable: false,
  });
  const replacement = create(CompletionSchema, {
    assignmentId: c.assignmentId,
    startedAt: c.startedAt,
    finishedAt: c.finishedAt,
    codeDigest: c.codeDigest,
  });
  if (c.result.case === "taskResult") {
    replacement.result = {
      case: "taskResult",
      value: { ...c.result.value, status: TaskStatus.FAILED, output: undefined, error, toolActions: [] },
    };
  } else if (c.result.case === "planResult") {
    replacement.result = {
      case: "planResult",
      value: { ...c.result.value, decision: { case: undefined }, error },
    };
  }
  return replacement;
}

/** One connected stream: reads frames, runs assignments, sends batched frames. */
class Session {
  private readonly running = new Map<string, Running>();
  private done: Array<{ completion: Completion; size: number }> = [];
  private rejected: Rejection[] = [];
  private heartbeatDue = false;
  private flushScheduled = false;
  private draining = false;
  private closing = false;
  /** Our sending side is closed: a frame written now would fail the whole stream. */
  private halfClosed = false;
  private ended = false;
  private drainPromise: Promise<void> | undefined;
  private readonly heartbeat: NodeJS.Timeout;
  private readonly maxBytes: number;
  private endWaiters: Array<() => void> = [];

  constructor(
    private readonly worker: Worker,
    private readonly call: grpc.ClientDuplexStream<ConnectRequest, ConnectResponse>,
    welcome: Welcome,
  ) {
    const poolMax = Number(welcome.maxMessageBytes);
    this.maxBytes = Math.min(poolMax > 0 ? poolMax : DEFAULT_MAX_MESSAGE_BYTES, worker.maxMessageBytes);
    const interval = welcome.heartbeatInterval ? durationMs(welcome.heartbeatInterval) : 2_000;
    this.heartbeat = setInterval(() => {
      if (this.running.size > 0) {
        this.heartbeatDue = true;
        this.scheduleFlush();
      }
    }, interval > 0 ? interval : 2_000);
  }

  onFrame(response: ConnectResponse): void {
    const stats = this.worker.stats;
    switch (response.message.case) {
      case "assignments": {
        stats.assignmentFrames += 1;
        stats.assignments += response.message.value.items.length;
        for (const item of response.message.value.items) this.assign(item);
        break;
      }
      case "cancellations":
        for (const c of response.message.value.items) {
          const run = this.running.get(c.assignmentId);
          if (!run) continue;
          stats.cancellations += 1;
          this.finish(run, { kind: "cancelled", reason: c.reason || "cancelled" });
        }
        break;
      case "drain": {
        const grace = response.message.value.grace;
        void this.drain(grace ? durationMs(grace) : 0);
        break;
      }
      default:
        // welcome again, or a message kind from a newer protocol: nothing to do.
        break;
    }
  }

  private assign(item: Assignment): void {
    const body = item.envelope?.body;
    const header = item.envelope?.header;
    if (!header || (body?.case !== "taskRequest" && body?.case !== "planRequest")) {
      this.reject(item.assignmentId, {
        type: "InvalidAssignment",
        message: `assignment ${item.assignmentId} carries a ${body?.case ?? "nothing"}, not a request`,
        retryable: false,
      });
      return;
    }
    const kind = body.case === "taskRequest" ? "task" : "plan";
    const handlerName = header.node?.handler ?? "";
    const handler = this.worker.handlerFor(kind, handlerName);
    if (!handler) {
      this.reject(item.assignmentId, { type: "UnknownHandler", message: `no ${kind} named ${JSON.stringify(handlerName)} here`, retryable: true });
      return;
    }
    if (this.draining) {
      this.reject(item.assignmentId, { type: "Draining", message: "the executor is draining", retryable: true });
      return;
    }
    if (this.running.size >= this.worker.concurrency) {
      this.reject(item.assignmentId, { type: "ExecutorBusy", message: "no free slot", retryable: true });
      return;
    }
    const now = new Date();
    let deadline = item.deadline ? timestampDate(item.deadline) : new Date(now.getTime() + 60_000);
    if (handler.timeoutMs !== undefined && now.getTime() + handler.timeoutMs < deadline.getTime()) {
      deadline = new Date(now.getTime() + handler.timeoutMs);
    }
    const abort = new AbortController();
    const info = {
      tenantId: header.tenantId,
      lifetimeId: header.lifetimeId,
      executionId: header.executionId,
      nodeId: header.node?.id ?? "",
      handler: handlerName,
      attempt: header.attempt,
      iteration: header.iteration,
      deadline,
      labels: { ...header.labels },
      config: body.value.config ?? {},
      signal: abort.signal,
      traceparent: header.traceContext?.traceparent ?? "",
      tracestate: header.traceContext?.tracestate ?? "",
    };
    const ctx = kind === "task" ? new TaskContext(info) : new PlanContext(info);
    const run: Running = { item, kind, handler, ctx, abort, startedAt: now, timer: undefined, settled: false };
    this.running.set(item.assignmentId, run);
    this.armDeadline(run, deadline.getTime());
    let invoked: Promise<unknown>;
    try {
      invoked = Promise.resolve(this.worker.invoke(run));
    } catch (err) {
      invoked = Promise.reject(err);
    }
    invoked.then(
      (value) => this.finish(run, { kind: "value", value }),
      (error: unknown) => this.finish(run, { kind: "error", error }),
    );
  }

  /** Time the attempt out at `at` (epoch ms), in steps a timer can hold. */
  private armDeadline(run: Running, at: number): void {
    const left = at - Date.now();
    run.timer =
      left > MAX_TIMER_MS
        ? setTimeout(() => this.armDeadline(run, at), MAX_TIMER_MS)
        : setTimeout(() => this.finish(run, { kind: "timeout" }), Math.max(0, left));
  }

  /** Settle an attempt once: report it (unless dropped) and free its slot. */
  private finish(run: Running, outcome: Outcome): void {
    if (run.settled) return;
    run.settled = true;
    clearTimeout(run.timer);
    this.running.delete(run.item.assignmentId);
    if (outcome.kind === "timeout") run.abort.abort(new TaskError("the attempt ran past its deadline", { type: "TimeoutError" }));
    if (outcome.kind === "cancelled") run.abort.abort(new TaskError(outcome.reason, { type: CANCELLED_ERROR_TYPE, retryable: false }));
    if (this.ended) return;
    let c: Completion;
    let size: number;
    try {
      c = this.worker.completionOf(run, outcome);
      size = toBinary(CompletionSchema, c).length;
    } catch (err) {
      // Reported telemetry with no int64/uint32 form (NaN, fractions, beyond 2^63) cannot be
      // serialized; thrown from a callback it would take the whole process down, unreported.
      const message = `the result cannot be sent: ${err instanceof Error ? err.message : String(err)}`;
      c = this.worker.failedCompletion(run, { type: "ValidationError", message, retryable: false });
      size = toBinary(CompletionSchema, c).length;
    }
    const replacement = oversized(c, size, this.maxBytes);
    this.done.push(replacement ? { completion: replacement, size: toBinary(CompletionSchema, replacement).length } : { completion: c, size });
    this.scheduleFlush();
  }

  /** Abandon an attempt without reporting it: the pool returns it to the queue. */
  private drop(run: Running, reason: string): void {
    if (run.settled) return;
    run.settled = true;
    clearTimeout(run.timer);
    this.running.delete(run.item.assignmentId);
    run.abort.abort(new TaskError(reason, { type: CANCELLED_ERROR_TYPE }));
  }

  private reject(assignmentId: string, error: ErrorData): void {
    this.worker.stats.rejections += 1;
    this.rejected.push(create(RejectionSchema, { assignmentId, error: errorInfo(error) }));
    this.scheduleFlush();
  }

  private scheduleFlush(): void {
    if (this.flushScheduled || this.ended || this.halfClosed) return;
    this.flushScheduled = true;
    // Everything finishing in this event-loop turn joins the same frame.
    setImmediate(() => this.flush());
  }

  private write(message: ConnectRequest["message"]): void {
    this.call.write(create(ConnectRequestSchema, { message }));
  }

  private flush(): void {
    this.flushScheduled = false;
    // After the half-close nothing more is said: work refused or unreported now is the
    // pool's to requeue when the stream ends.
    if (this.ended || this.halfClosed) return;
    const stats = this.worker.stats;
    try {
      if (this.rejected.length > 0) {
        const items = this.rejected;
        this.rejected = [];
        this.write({ case: "rejections", value: { $typeName: "tickmesh.v1.Rejections", items } });
      }
      if (this.done.length > 0) {
        const items = this.done;
        this.done = [];
        let batch: Completion[] = [];
        let size = 0;
        const send = () => {
          this.write({ case: "completions", value: { $typeName: "tickmesh.v1.Completions", items: batch } });
          stats.completionFrames += 1;
          stats.completions += batch.length;
          batch = [];
          size = 0;
        };
        for (const item of items) {
          const itemSize = item.size + 16;
          if (batch.length > 0 && size + itemSize > this.maxBytes) send();
          batch.push(item.completion);
          size += itemSize;
        }
        if (batch.length > 0) send();
      }
      if (this.heartbeatDue) {
        this.heartbeatDue = false;
        const ids = [...this.running.keys()];
        if (ids.length > 0) {
          this.write({ case: "heartbeat", value: { $typeName: "tickmesh.v1.Heartbeat", assignmentIds: ids } });
          stats.heartbeatFrames += 1;
        }
      }
      if (this.closing) {
        this.halfClosed = true;
        this.call.end();
      }
    } catch (err) {
      this.worker["log"](`cannot send to the pool: ${err instanceof Error ? err.message : String(err)}`);
      this.call.cancel();
    }
  }

  /** Take no more work, finish running work within `graceMs`, then close the sending side. */
  drain(graceMs: number): Promise<void> {
    if (!this.drainPromise) this.drainPromise = this.doDrain(graceMs);
    return this.drainPromise;
  }

  private async doDrain(graceMs: number): Promise<void> {
    this.draining = true;
    const until = Date.now() + graceMs;
    while (this.running.size > 0 && Date.now() < until && !this.ended) {
      await sleep(Math.min(20, until - Date.now()));
    }
    for (const run of [...this.running.values()]) this.drop(run, "the executor is draining");
    this.closing = true;
    if (this.ended) return;
    this.flushScheduled = false;
    this.flush();
    // The pool ends the stream once we stop writing; don't wait forever if it doesn't.
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.call.cancel();
        resolve();
      }, CLOSE_TIMEOUT_MS);
      this.endWaiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /** The stream ended: drop everything still running (the pool requeues it). */
  closed(): void {
    if (this.ended) return;
    this.ended = true;
    clearInterval(this.heartbeat);
    for (const run of [...this.running.values()]) this.drop(run, "the executor stream closed");
    const waiters = this.endWaiters;
    this.endWaiters = [];
    for (const w of waiters) w();
  }
}
