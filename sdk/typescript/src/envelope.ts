// Decoding and encoding the bus's one message type with the checks docs/contracts.md asks of
// every decoder: a header, a valid tenant, a body (of the announced kind), Structs at most 32 deep.
import { fromBinary, toBinary, type DescMessage } from "@bufbuild/protobuf";

import { ExecutionEnvelopeSchema, type ExecutionEnvelope } from "../../../gen/ts/tickmesh/v1/envelope_pb.js";
import { ValidationError } from "./errors.js";
import { TENANT_ID_PATTERN } from "./ids.js";

export const MAX_STRUCT_DEPTH = 32;

export type BodyKind = NonNullable<ExecutionEnvelope["body"]["case"]>;

/** Decode and check an envelope; `expectedKind` is the camelCase body kind (Tickmesh-Type header). */
export function decodeEnvelope(data: Uint8Array, expectedKind?: BodyKind): ExecutionEnvelope {
  if (data.length === 0) throw new ValidationError("malformed ExecutionEnvelope: empty message");
  let envelope: ExecutionEnvelope;
  try {
    envelope = fromBinary(ExecutionEnvelopeSchema, data);
  } catch (err) {
    throw new ValidationError(`malformed ExecutionEnvelope (${data.length} bytes): ${err instanceof Error ? err.message : String(err)}`);
  }
  validateEnvelope(envelope, expectedKind);
  return envelope;
}

/** Check and serialize an envelope. */
export function encodeEnvelope(envelope: ExecutionEnvelope): Uint8Array {
  validateEnvelope(envelope);
  return toBinary(ExecutionEnvelopeSchema, envelope);
}

export function validateEnvelope(envelope: ExecutionEnvelope, expectedKind?: BodyKind): void {
  const header = envelope.header;
  if (!header) throw new ValidationError("ExecutionEnvelope has no header");
  if (!TENANT_ID_PATTERN.test(header.tenantId)) {
    throw new ValidationError(`ExecutionEnvelope header.tenant_id ${JSON.stringify(header.tenantId)} is not a valid tenant id`);
  }
  const kind = envelope.body.case;
  if (kind === undefined) throw new ValidationError("ExecutionEnvelope has no body");
  if (expectedKind !== undefined && kind !== expectedKind) {
    throw new ValidationError(`ExecutionEnvelope body is ${kind} but the message type header says ${expectedKind}`);
  }
  const depth = structDepth(ExecutionEnvelopeSchema, envelope as unknown as Record<string, unknown>);
  if (depth > MAX_STRUCT_DEPTH) {
    throw new ValidationError(`ExecutionEnvelope nests a Struct ${depth} levels deep; the limit is ${MAX_STRUCT_DEPTH}`);
  }
}

/** Deepest google.protobuf.Struct/ListValue nesting below a message (protobuf-es keeps them as JSON). */
function structDepth(schema: DescMessage, message: Record<string, unknown>): number {
  let deepest = 0;
  for (const field of schema.fields) {
    let value: unknown;
    if (field.oneof) {
      const oneof = message[field.oneof.localName] as { case?: string; value?: unknown } | undefined;
      value = oneof?.case === field.localName ? oneof.value : undefined;
    } else {
      value = message[field.localName];
    }
    if (value === undefined || value === null) continue;
    const sub = field.fieldKind === "message" ? field.message
      : field.fieldKind === "list" && field.listKind === "message" ? field.message
      : field.fieldKind === "map" && field.mapKind === "message" ? field.message
      : undefined;
    if (!sub) continue;
    const items = field.fieldKind === "list" ? (value as unknown[])
      : field.fieldKind === "map" ? Object.values(value as Record<string, unknown>)
      : [value];
    for (const item of items) {
      if (STRUCT_TYPES.has(sub.typeName)) deepest = Math.max(deepest, jsonDepth(item));
      else deepest = Math.max(deepest, structDepth(sub, item as Record<string, unknown>));
    }
  }
  return deepest;
}

const STRUCT_TYPES = new Set(["google.protobuf.Struct", "google.protobuf.ListValue"]);

function jsonDepth(value: unknown): number {
  if (value === null || typeof value !== "object") return 0;
  let deepest = 0;
  for (const child of Array.isArray(value) ? value : Object.values(value)) deepest = Math.max(deepest, jsonDepth(child));
  return deepest + 1;
}
