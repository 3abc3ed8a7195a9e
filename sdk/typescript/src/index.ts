// @tickmesh/sdk: write tickmesh executors (task and plan handlers) in TypeScript.
export { Worker, TENANT_METADATA_KEY, PROTOCOL_VERSION, CANCELLED_ERROR_TYPE } from "./worker.js";
export type { WorkerOptions, WorkerStats, TaskFn, PlanFn, HandlerOptions } from "./worker.js";
export { Client, LifetimeFailedError } from "./client.js";
export { ExecutionContext, TaskContext, PlanContext } from "./context.js";
export type { Report, Usage, ModelUsage, RawPayload, SignalView, ToolActionRecord } from "./context.js";
export { Decision, dispatch, step, complete, waitFor, fail } from "./plan.js";
export type { Step, PlanInputView, WaitOptions, OnTimeout } from "./plan.js";
export { TickmeshError, ConfigError, ValidationError, RpcError, TaskError, errorData } from "./errors.js";
export type { TaskErrorOptions, ErrorData } from "./errors.js";
export {
  Payload,
  JSON_TYPE,
  OCTET_STREAM,
  PROTOBUF,
  TEXT,
  encode,
  decode,
  text,
  bytes,
  encodeProtobuf,
  decodeProtobuf,
  protobufContentType,
  parseContentType,
  sha256Hex,
  toWirePayload,
  encodeWire,
} from "./codecs.js";
export { FileBlobResolver, PoolBlobResolver, payloadBytes, payloadContentType } from "./blobs.js";
export type { BlobResolver, PoolBlobResolverOptions } from "./blobs.js";
export { executionId, uuid7, TENANT_ID_PATTERN, HANDLER_NAME_PATTERN } from "./ids.js";
export { decodeEnvelope, encodeEnvelope, validateEnvelope, MAX_STRUCT_DEPTH } from "./envelope.js";
export type { BodyKind } from "./envelope.js";
export { SDK_VERSION } from "./version.js";
