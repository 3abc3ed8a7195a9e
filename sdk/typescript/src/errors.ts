// The SDK's error tree. Task failures travel as data (ErrorInfo); these classes are how
// handlers raise them and how the SDK reports problems to callers.

/** Root of every error the SDK throws. */
export class TickmeshError extends Error {
  override name = "TickmeshError";
}

/** Configuration is missing or invalid. */
export class ConfigError extends TickmeshError {
  override name = "ConfigError";
}

/** Input is malformed: an envelope, a payload, a blob. */
export class ValidationError extends TickmeshError {
  override name = "ValidationError";
}

/** A gRPC call failed with a status (`code` is the numeric gRPC status code). */
export class RpcError extends TickmeshError {
  override name = "RpcError";
  constructor(
    readonly code: number,
    readonly detail: string,
  ) {
    super(`gRPC status ${code}: ${detail}`);
  }
}

/** Options of a {@link TaskError}. */
export interface TaskErrorOptions {
  /** A stable classification, matched by RetryPolicy.non_retryable_error_types. Default "TaskError". */
  type?: string;
  /** Whether another attempt may succeed. Default true. */
  retryable?: boolean;
  /** JSON-like structured context. */
  details?: Record<string, unknown>;
}

/**
 * Thrown by task or plan code to fail an attempt with a typed error; it travels as
 * ErrorInfo{type, message, retryable, details}. Any other exception becomes
 * ErrorInfo{type: error.name, retryable: true}.
 */
export class TaskError extends TickmeshError {
  override name = "TaskError";
  readonly type: string;
  readonly retryable: boolean;
  readonly details: Record<string, unknown>;

  constructor(message: string, options: TaskErrorOptions = {}) {
    super(message);
    this.type = options.type ?? "TaskError";
    this.retryable = options.retryable ?? true;
    this.details = { ...(options.details ?? {}) };
  }
}

/** A structured error as it travels in ErrorInfo. */
export interface ErrorData {
  type: string;
  message: string;
  retryable: boolean;
  details?: Record<string, unknown>;
}

/** TaskError keeps its type, retryability and details; anything else is retryable. */
export function errorData(err: unknown): ErrorData {
  if (err instanceof TaskError) {
    return { type: err.type, message: err.message, retryable: err.retryable, details: err.details };
  }
  if (err instanceof Error) {
    return { type: err.name || "Error", message: err.message || err.name || "Error", retryable: true };
  }
  return { type: "Error", message: describe(err), retryable: true };
}

/** String(value), or its tag when it has no string form (an object without a prototype). */
function describe(value: unknown): string {
  try {
    return String(value);
  } catch {
    return Object.prototype.toString.call(value);
  }
}
