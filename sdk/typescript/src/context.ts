// The context handed to task and plan handlers: which execution runs, its deadline,
// the cancellation signal, and the telemetry guardrails read.
import type { JsonObject } from "@bufbuild/protobuf";

import { encode } from "./codecs.js";
import { errorData, type ErrorData } from "./errors.js";

/** Usage attributed to one model. */
export interface ModelUsage {
  inputTokens: number;
  outputTokens: number;
  costMicros: number;
  calls: number;
}

/** Telemetry accumulated by one attempt through report() and recordToolAction(). */
export interface Usage {
  inputTokens: number;
  outputTokens: number;
  costMicros: number;
  modelCalls: number;
  toolCalls: number;
  models: Map<string, ModelUsage>;
  custom: Map<string, number>;
}

/** What report() adds to the attempt's telemetry (values add up across calls). */
export interface Report {
  inputTokens?: number;
  outputTokens?: number;
  costMicros?: number;
  /** The model the usage belongs to; usage is then also broken down per model. */
  model?: string;
  /** Model calls made; defaults to 1 when `model` is given, else 0. */
  modelCalls?: number;
  /** Tool calls not recorded with recordToolAction(). */
  toolCalls?: number;
  /** Numeric metrics guardrails read as custom.<name>; summed. */
  custom?: Record<string, number>;
}

/** One recorded tool or API call. */
export interface ToolActionRecord {
  actionId: string;
  tool: string;
  input: [string, Uint8Array];
  output?: [string, Uint8Array];
  error?: ErrorData;
  startedAt?: Date;
  durationMs?: number;
  sideEffect: boolean;
}

/** The raw bytes and content type of a payload, before decoding. */
export interface RawPayload {
  contentType: string;
  data: Uint8Array;
}

/** What every handler is told about the execution it runs. */
export interface ExecutionInfo {
  tenantId: string;
  lifetimeId: string;
  executionId: string;
  nodeId: string;
  handler: string;
  attempt: number;
  iteration: number;
  deadline: Date;
  labels: Record<string, string>;
  config: JsonObject;
  signal: AbortSignal;
  /** W3C traceparent of the step's span when the lifetime is traced, else "". */
  traceparent?: string;
  /** W3C tracestate that goes with `traceparent`. */
  tracestate?: string;
}

export class ExecutionContext implements ExecutionInfo {
  /** The tenant the work belongs to. */
  readonly tenantId: string;
  /** The lifetime (one run of a graph) the step belongs to. */
  readonly lifetimeId: string;
  /** Deterministic id of the step: the same across attempts, redelivery and replay. */
  readonly executionId: string;
  /** The graph node being executed. */
  readonly nodeId: string;
  /** The handler name the node is bound to. */
  readonly handler: string;
  /** 1-based attempt number (the JetStream delivery count). */
  readonly attempt: number;
  /** How often this node has run in this lifetime, starting at 1. */
  readonly iteration: number;
  /** When the attempt must be finished; the worker reports TIMED_OUT and aborts `signal` then. */
  readonly deadline: Date;
  /** Free-form labels copied from the lifetime. */
  readonly labels: Record<string, string>;
  /** The node's static configuration from the graph. */
  readonly config: JsonObject;
  /** Aborted when the pool cancels the attempt, the deadline passes or the worker drops it. */
  readonly signal: AbortSignal;
  /**
   * W3C trace context of the step's span ("" when the lifetime is not traced): make it the
   * parent of the handler's own spans (e.g. `propagation.extract` with `@opentelemetry/api`)
   * and they join the lifetime's trace.
   */
  readonly traceparent: string;
  readonly tracestate: string;
  /** The input (task) or goal (plan) as it arrived, before decoding. */
  rawInput: RawPayload = { contentType: "", data: new Uint8Array() };
  /** Telemetry accumulated so far. */
  readonly usage: Usage = {
    inputTokens: 0,
    outputTokens: 0,
    costMicros: 0,
    modelCalls: 0,
    toolCalls: 0,
    models: new Map(),
    custom: new Map(),
  };
  /** Tool calls recorded so far. */
  readonly toolActions: ToolActionRecord[] = [];

  constructor(info: ExecutionInfo) {
    this.tenantId = info.tenantId;
    this.lifetimeId = info.lifetimeId;
    this.executionId = info.executionId;
    this.nodeId = info.nodeId;
    this.handler = info.handler;
    this.attempt = info.attempt;
    this.iteration = info.iteration;
    this.deadline = info.deadline;
    this.labels = info.labels;
    this.config = info.config;
    this.signal = info.signal;
    this.traceparent = info.traceparent ?? "";
    this.tracestate = info.tracestate ?? "";
  }

  /** Milliseconds left before the deadline (negative once it has passed). */
  remainingMs(): number {
    return this.deadline.getTime() - Date.now();
  }

  /** Add usage to this attempt's telemetry. */
  report(report: Report): void {
    const u = this.usage;
    const inputTokens = report.inputTokens ?? 0;
    const outputTokens = report.outputTokens ?? 0;
    const costMicros = report.costMicros ?? 0;
    const calls = report.modelCalls ?? (report.model ? 1 : 0);
    u.inputTokens += inputTokens;
    u.outputTokens += outputTokens;
    u.costMicros += costMicros;
    u.modelCalls += calls;
    u.toolCalls += report.toolCalls ?? 0;
    if (report.model) {
      const m = u.models.get(report.model) ?? { inputTokens: 0, outputTokens: 0, costMicros: 0, calls: 0 };
      m.inputTokens += inputTokens;
      m.outputTokens += outputTokens;
      m.costMicros += costMicros;
      m.calls += calls;
      u.models.set(report.model, m);
    }
    for (const [name, value] of Object.entries(report.custom ?? {})) {
      u.custom.set(name, (u.custom.get(name) ?? 0) + value);
    }
  }

  /** Record a tool or API call (counts as one tool call), so replay and fork can account for it. */
  recordToolAction(
    tool: string,
    input: unknown,
    options: { output?: unknown; sideEffect?: boolean; error?: unknown; startedAt?: Date; durationMs?: number } = {},
  ): void {
    const record: ToolActionRecord = {
      actionId: `a${this.toolActions.length + 1}`,
      tool,
      input: encode(input),
      sideEffect: options.sideEffect ?? false,
    };
    if (options.output !== undefined && options.output !== null) record.output = encode(options.output);
    if (options.error !== undefined) {
      record.error =
        typeof options.error === "string"
          ? { type: "ToolError", message: options.error, retryable: true }
          : errorData(options.error);
    }
    if (options.startedAt !== undefined) record.startedAt = options.startedAt;
    if (options.durationMs !== undefined) record.durationMs = options.durationMs;
    this.toolActions.push(record);
    this.usage.toolCalls += 1;
  }
}

/** The context a task handler receives. */
export class TaskContext extends ExecutionContext {}

/** A signal delivered to a plan that waited for it. */
export interface SignalView {
  name: string;
  payload: unknown;
  approver: string;
  timedOut: boolean;
}

/** The context a plan handler receives. */
export class PlanContext extends ExecutionContext {
  /** The signal the plan waited for, when it is asked again after waitFor(). */
  signalDelivery: SignalView | undefined;
}
