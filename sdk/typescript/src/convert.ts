// Outcomes of handlers packed into the protocol's TaskResult / PlanResult / Completion.
import { create, type JsonObject } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";

import {
  CompletionSchema,
  type Completion,
} from "../../../gen/ts/tickmesh/v1/executor_pool_service_pb.js";
import {
  ErrorInfoSchema,
  PlanResultSchema,
  TaskResultSchema,
  TaskStatus,
  ToolActionSchema,
  WaitTimeoutAction,
  type ErrorInfo,
  type PlanResult,
  type TaskResult,
} from "../../../gen/ts/tickmesh/v1/result_pb.js";
import { ModelUsageSchema, TelemetrySchema, type Telemetry } from "../../../gen/ts/tickmesh/v1/telemetry_pb.js";
import { encodeWire, toWirePayload } from "./codecs.js";
import type { ToolActionRecord, Usage } from "./context.js";
import type { ErrorData } from "./errors.js";
import type { Decision } from "./plan.js";

export type TaskOutcome = "succeeded" | "failed" | "timed_out" | "cancelled";

const STATUS: Record<TaskOutcome, TaskStatus> = {
  succeeded: TaskStatus.SUCCEEDED,
  failed: TaskStatus.FAILED,
  timed_out: TaskStatus.TIMED_OUT,
  cancelled: TaskStatus.CANCELLED,
};

const STATUS_NAMES: Record<number, string> = {
  [TaskStatus.SUCCEEDED]: "succeeded",
  [TaskStatus.FAILED]: "failed",
  [TaskStatus.TIMED_OUT]: "timed_out",
  [TaskStatus.CANCELLED]: "cancelled",
  [TaskStatus.REJECTED]: "rejected",
};

export function statusName(status: TaskStatus): string {
  return STATUS_NAMES[status] ?? "unspecified";
}

const ON_TIMEOUT = {
  fail: WaitTimeoutAction.FAIL,
  signal: WaitTimeoutAction.SIGNAL,
  abort: WaitTimeoutAction.ABORT,
} as const;

function int64(n: number): bigint {
  return BigInt(Math.trunc(n));
}

function jsonObject(details: Record<string, unknown>): JsonObject | undefined {
  if (Object.keys(details).length === 0) return undefined;
  try {
    return JSON.parse(JSON.stringify(details)) as JsonObject;
  } catch {
    return { repr: String(details).slice(0, 4096) };
  }
}

export function errorInfo(error: ErrorData): ErrorInfo {
  const details = jsonObject(error.details ?? {});
  return create(ErrorInfoSchema, {
    type: error.type,
    message: error.message,
    retryable: error.retryable,
    ...(details ? { details } : {}),
  });
}

export function telemetry(usage: Usage, runTimeMs: number, queueWaitMs: number | undefined): Telemetry {
  const t = create(TelemetrySchema, {
    inputTokens: int64(usage.inputTokens),
    outputTokens: int64(usage.outputTokens),
    costMicros: int64(usage.costMicros),
    modelCalls: usage.modelCalls,
    toolCalls: usage.toolCalls,
    runTime: durationFromMs(Math.max(0, Math.round(runTimeMs))),
    customMetrics: Object.fromEntries(usage.custom),
    modelUsage: [...usage.models.keys()].sort().map((model) => {
      const m = usage.models.get(model)!;
      return create(ModelUsageSchema, {
        model,
        inputTokens: int64(m.inputTokens),
        outputTokens: int64(m.outputTokens),
        costMicros: int64(m.costMicros),
        calls: m.calls,
      });
    }),
  });
  if (queueWaitMs !== undefined) t.queueWait = durationFromMs(Math.max(0, Math.round(queueWaitMs)));
  return t;
}

function toolAction(a: ToolActionRecord) {
  const action = create(ToolActionSchema, {
    actionId: a.actionId,
    tool: a.tool,
    input: toWirePayload(...a.input),
    sideEffect: a.sideEffect,
  });
  if (a.output) action.output = toWirePayload(...a.output);
  if (a.error) action.error = errorInfo(a.error);
  if (a.startedAt) action.startedAt = timestampFromDate(a.startedAt);
  if (a.durationMs !== undefined) action.duration = durationFromMs(Math.round(a.durationMs));
  return action;
}

export function taskResult(
  status: TaskOutcome,
  options: {
    output?: [string, Uint8Array] | undefined;
    error?: ErrorData | undefined;
    usage: Usage;
    toolActions: readonly ToolActionRecord[];
    runTimeMs: number;
    queueWaitMs: number | undefined;
  },
): TaskResult {
  const result = create(TaskResultSchema, {
    status: STATUS[status],
    telemetry: telemetry(options.usage, options.runTimeMs, options.queueWaitMs),
    toolActions: options.toolActions.map(toolAction),
  });
  if (options.output) result.output = toWirePayload(...options.output);
  if (options.error) result.error = errorInfo(options.error);
  return result;
}

/** Build a PlanResult from a decision, or from the error that prevented one. Throws ValidationError on unencodable payloads. */
export function planResult(
  decision: Decision | undefined,
  options: { error?: ErrorData | undefined; usage: Usage; runTimeMs: number; queueWaitMs: number | undefined },
): PlanResult {
  const result = create(PlanResultSchema, {
    telemetry: telemetry(options.usage, options.runTimeMs, options.queueWaitMs),
  });
  if (options.error) result.error = errorInfo(options.error);
  if (!decision) return result;
  result.rationale = decision.rationale;
  const f = decision.fields;
  switch (decision.kind) {
    case "dispatch":
      result.decision = {
        case: "dispatch",
        value: { $typeName: "tickmesh.v1.DispatchDecision", steps: (f.steps ?? []).map((s) => ({
          $typeName: "tickmesh.v1.NextStep" as const,
          nodeId: s.nodeId,
          input: encodeWire(s.input),
        })) },
      };
      break;
    case "complete":
      result.decision = { case: "complete", value: { $typeName: "tickmesh.v1.CompleteDecision", output: encodeWire(f.output) } };
      break;
    case "wait": {
      const wait = {
        $typeName: "tickmesh.v1.WaitDecision" as const,
        signalName: f.signalName ?? "",
        onTimeout: ON_TIMEOUT[f.onTimeout ?? "fail"],
        prompt: f.prompt ?? "",
        timeout: f.timeoutMs !== undefined ? durationFromMs(Math.round(f.timeoutMs)) : undefined,
        defaultPayload: f.default !== undefined && f.default !== null ? encodeWire(f.default) : undefined,
      };
      result.decision = { case: "wait", value: wait };
      break;
    }
    case "fail":
      result.decision = {
        case: "fail",
        value: {
          $typeName: "tickmesh.v1.FailDecision",
          error: errorInfo({
            type: f.errorType || "PlanFailed",
            message: f.message ?? "",
            retryable: false,
            details: f.details ?? {},
          }),
        },
      };
      break;
  }
  return result;
}

export function completion(
  assignmentId: string,
  result: { case: "taskResult"; value: TaskResult } | { case: "planResult"; value: PlanResult },
  startedAt: Date,
  finishedAt: Date,
  codeDigest: string,
): Completion {
  return create(CompletionSchema, {
    assignmentId,
    result,
    startedAt: timestampFromDate(startedAt),
    finishedAt: timestampFromDate(finishedAt),
    codeDigest,
  });
}
