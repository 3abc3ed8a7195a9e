// Identifiers: the deterministic execution id recipe (docs/contracts.md) and UUIDv7.
import { createHash, randomBytes } from "node:crypto";

/** Tenant ids are subject-safe: they appear in every NATS subject and stream name. */
export const TENANT_ID_PATTERN = /^[a-z0-9][a-z0-9_]{0,62}$/;

/** The call metadata entry that names the caller's tenant. */
export const TENANT_METADATA_KEY = "x-tickmesh-tenant";

/** Handler names nodes bind to. */
export const HANDLER_NAME_PATTERN = /^[A-Za-z0-9_-]{1,128}$/;

/**
 * The deterministic id of one step of a lifetime: the first 32 hex digits of SHA-256 over
 * the NUL-separated fields "tickmesh.execution.v1", tenant, lifetime, sorted parent ids
 * joined by ",", node id, iteration (decimal).
 */
export function executionId(
  tenantId: string,
  lifetimeId: string,
  parentExecutionIds: Iterable<string>,
  nodeId: string,
  iteration: number,
): string {
  const parents = [...parentExecutionIds].sort().join(",");
  const material = ["tickmesh.execution.v1", tenantId, lifetimeId, parents, nodeId, String(iteration)].join("\0");
  return createHash("sha256").update(material, "utf8").digest("hex").slice(0, 32);
}

let lastMs = 0;
let lastSeq = 0;

/** A new time-ordered UUIDv7 (RFC 9562); ids made in the same millisecond stay ordered. */
export function uuid7(): string {
  let ms = Date.now();
  if (ms > lastMs) {
    lastMs = ms;
    lastSeq = randomBytes(2).readUInt16BE(0) & 0x7ff;
  } else {
    lastSeq += 1;
    if (lastSeq > 0xfff) {
      lastMs += 1;
      lastSeq = 0;
    }
    ms = lastMs;
  }
  const bytes = randomBytes(16);
  bytes.writeUIntBE(ms, 0, 6);
  bytes[6] = 0x70 | ((lastSeq >> 8) & 0x0f);
  bytes[7] = lastSeq & 0xff;
  bytes[8] = 0x80 | ((bytes[8] ?? 0) & 0x3f);
  const hex = bytes.toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
