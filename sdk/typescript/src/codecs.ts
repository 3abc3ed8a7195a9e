// Payload codecs: how JavaScript values become (content type, bytes) and back. Mirrors
// tickmesh.sdk.codecs (Python), so both languages read each other's payloads:
//
// * plain data (objects, arrays, strings, numbers, booleans, null) is JSON (application/json,
//   compact, UTF-8);
// * Uint8Array (and Buffer) is application/octet-stream;
// * a protobuf message is "application/x-protobuf; messageType=<full name>" (encodeProtobuf);
// * a Payload sets the content type explicitly.
//
// Decoding follows the content type: JSON (and +json) is parsed, text/* becomes a string,
// anything else stays bytes; empty data without a content type is null.
import { createHash } from "node:crypto";

import { create, fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";

import { PayloadSchema, type Payload as WirePayload } from "../../../gen/ts/tickmesh/v1/payload_pb.js";
import { ValidationError } from "./errors.js";

export const JSON_TYPE = "application/json";
export const OCTET_STREAM = "application/octet-stream";
export const PROTOBUF = "application/x-protobuf";
export const TEXT = "text/plain; charset=utf-8";

/** Bytes with an explicit content type, passed through unchanged. */
export class Payload {
  constructor(
    readonly data: Uint8Array,
    readonly contentType: string = OCTET_STREAM,
  ) {}
}

/** The content type of a serialized protobuf message of `typeName`. */
export function protobufContentType(typeName: string): string {
  return `${PROTOBUF}; messageType=${typeName}`;
}

/** Split a content type into its lowercased MIME type and its parameters (keys lowercased). */
export function parseContentType(contentType: string): [string, Record<string, string>] {
  const [mime = "", ...rest] = contentType.split(";");
  const params: Record<string, string> = {};
  for (const part of rest) {
    const eq = part.indexOf("=");
    if (eq >= 0) {
      params[part.slice(0, eq).trim().toLowerCase()] = part.slice(eq + 1).trim().replace(/^"|"$/g, "");
    }
  }
  return [mime.trim().toLowerCase(), params];
}

function isJson(mime: string): boolean {
  return mime === JSON_TYPE || mime.endsWith("+json");
}

/** A Payload holding `text` as text/plain UTF-8. */
export function text(value: string): Payload {
  return new Payload(new TextEncoder().encode(value), TEXT);
}

/** A Payload holding raw bytes with the given content type. */
export function bytes(data: Uint8Array, contentType: string = OCTET_STREAM): Payload {
  return new Payload(data, contentType);
}

/** A Payload holding a serialized protobuf message ("application/x-protobuf; messageType=..."). */
export function encodeProtobuf<Desc extends DescMessage>(schema: Desc, message: MessageShape<Desc>): Payload {
  return new Payload(toBinary(schema, message), protobufContentType(schema.typeName));
}

/** Parse a protobuf payload, checking its declared messageType against `schema`. */
export function decodeProtobuf<Desc extends DescMessage>(
  schema: Desc,
  payload: { data: Uint8Array; contentType: string },
): MessageShape<Desc> {
  const [mime, params] = parseContentType(payload.contentType);
  const declared = params["messagetype"] ?? "";
  if (mime && mime !== PROTOBUF && mime !== OCTET_STREAM) {
    throw new ValidationError(`payload is ${payload.contentType}, not a serialized ${schema.typeName}`);
  }
  if (declared && declared !== schema.typeName) {
    throw new ValidationError(`payload holds a ${declared}, not the ${schema.typeName} asked for`);
  }
  try {
    return fromBinary(schema, payload.data);
  } catch (err) {
    throw new ValidationError(`payload is not a serialized ${schema.typeName}: ${String(err)}`);
  }
}

/** Encode a value as [contentType, data]. Throws ValidationError when it has no encoding. */
export function encode(value: unknown): [string, Uint8Array] {
  if (value instanceof Payload) return [value.contentType, value.data];
  if (value instanceof Uint8Array) return [OCTET_STREAM, value];
  let json: string | undefined;
  try {
    json = JSON.stringify(value === undefined ? null : value, (_key, v: unknown) => {
      if (typeof v === "number" && !Number.isFinite(v)) {
        throw new ValidationError(`${v} is not a finite number`);
      }
      return v;
    });
  } catch (err) {
    throw new ValidationError(
      `cannot encode a ${typeof value} as a payload: ${err instanceof Error ? err.message : String(err)}; ` +
        "return JSON-like data, a Uint8Array, encodeProtobuf(...) or a Payload",
    );
  }
  if (json === undefined) {
    throw new ValidationError(`cannot encode a ${typeof value} as a payload`);
  }
  return [JSON_TYPE, new TextEncoder().encode(json)];
}

/** Decode payload bytes by their content type. Throws ValidationError on invalid bytes. */
export function decode(contentType: string, data: Uint8Array): unknown {
  const [mime, params] = parseContentType(contentType);
  if (!mime && data.length === 0) return null;
  if (isJson(mime)) {
    if (data.length === 0) return null;
    try {
      return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(data)) as unknown;
    } catch (err) {
      throw new ValidationError(`payload is not valid JSON: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
  if (mime.startsWith("text/")) {
    try {
      return new TextDecoder(params["charset"] ?? "utf-8", { fatal: true }).decode(data);
    } catch (err) {
      throw new ValidationError(`payload is not valid ${contentType}: ${String(err)}`);
    }
  }
  return data;
}

/** Lowercase hex SHA-256 of `data`. */
export function sha256Hex(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** An inline wire Payload with its size and SHA-256 filled in. */
export function toWirePayload(contentType: string, data: Uint8Array): WirePayload {
  return create(PayloadSchema, {
    contentType,
    data: { case: "inline", value: data },
    size: BigInt(data.length),
    sha256: sha256Hex(data),
  });
}

/** Encode a value straight into an inline wire Payload. */
export function encodeWire(value: unknown): WirePayload {
  const [contentType, data] = encode(value);
  return toWirePayload(contentType, data);
}
