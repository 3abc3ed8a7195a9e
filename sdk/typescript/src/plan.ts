// Plan decisions: what a plan handler returns. Build them with dispatch(step(...)...),
// complete(output), waitFor(signal, ...) and fail(message, ...).
import { ConfigError } from "./errors.js";

/** One node to run next, with its input (encoded like a task output). */
export interface Step {
  readonly nodeId: string;
  readonly input: unknown;
}

export type OnTimeout = "fail" | "signal" | "abort";

/** What a plan decided. */
export class Decision {
  private constructor(
    readonly kind: "dispatch" | "complete" | "wait" | "fail",
    readonly fields: {
      steps?: readonly Step[];
      output?: unknown;
      signalName?: string;
      timeoutMs?: number | undefined;
      onTimeout?: OnTimeout;
      default?: unknown;
      prompt?: string;
      message?: string;
      errorType?: string;
      details?: Record<string, unknown>;
    },
    readonly rationale: string,
  ) {}

  /** @internal */
  static make(kind: Decision["kind"], fields: Decision["fields"], rationale = ""): Decision {
    return new Decision(kind, fields, rationale);
  }

  /** The same decision with a rationale, for people reading the trace. */
  because(rationale: string): Decision {
    return new Decision(this.kind, this.fields, rationale);
  }
}

/** A step: run `nodeId` with `input`. */
export function step(nodeId: string, input: unknown = null): Step {
  if (!nodeId) throw new ConfigError("step() needs a node id");
  return { nodeId, input };
}

/** Run the given steps next; more than one is a fan-out. */
export function dispatch(...steps: Step[]): Decision {
  if (steps.length === 0) throw new ConfigError("dispatch() needs at least one step");
  return Decision.make("dispatch", { steps });
}

/** Complete the lifetime with `output`. */
export function complete(output: unknown = null): Decision {
  return Decision.make("complete", { output });
}

/** Options of waitFor(). */
export interface WaitOptions {
  /** How long to wait, in milliseconds; unset waits forever. */
  timeoutMs?: number;
  /** "fail" (default), "abort", or "signal" (deliver `default`). */
  onTimeout?: OnTimeout;
  /** The payload delivered when onTimeout is "signal". */
  default?: unknown;
  /** What the approver is asked. */
  prompt?: string;
}

/** Park the lifetime until `signalName` arrives; the plan is then asked again. */
export function waitFor(signalName: string, options: WaitOptions = {}): Decision {
  if (!signalName) throw new ConfigError("waitFor() needs a signal name");
  if (options.timeoutMs !== undefined && !(options.timeoutMs > 0)) {
    throw new ConfigError(`timeoutMs must be positive, got ${options.timeoutMs}`);
  }
  return Decision.make("wait", {
    signalName,
    timeoutMs: options.timeoutMs,
    onTimeout: options.onTimeout ?? "fail",
    default: options.default,
    prompt: options.prompt ?? "",
  });
}

/** Fail the lifetime with a typed error (default type "PlanFailed"). */
export function fail(message: string, options: { type?: string; details?: Record<string, unknown> } = {}): Decision {
  return Decision.make("fail", { message, errorType: options.type ?? "PlanFailed", details: options.details ?? {} });
}

/** The outcome of one task execution that flowed into the plan. */
export interface PlanInputView {
  executionId: string;
  nodeId: string;
  /** "succeeded", "failed", "timed_out", "cancelled", "rejected" or "unspecified". */
  status: string;
  /** The task's output, decoded; null unless it succeeded. */
  output: unknown;
  errorType: string;
  errorMessage: string;
  inputTokens: number;
  outputTokens: number;
  costMicros: number;
  succeeded: boolean;
}
