// Payloads that travel as a BlobRef: the embedded profile keeps them as files laid out
// <root>/<tenant>/<sha[:2]>/<sha>, referenced by file:// URIs; the cloud profile keeps them
// in S3, which executors read through the pool (ExecutorPoolService.FetchBlob). Mirrors
// FileBlobResolver and PoolBlobResolver (Python).
import { readFile, stat } from "node:fs/promises";
import { resolve as resolvePath, sep } from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";

import {
  ExecutorPoolService,
  FetchBlobRequestSchema,
  FetchBlobResponseSchema,
  type FetchBlobRequest,
  type FetchBlobResponse,
} from "../../../gen/ts/tickmesh/v1/executor_pool_service_pb.js";
import type { BlobRef, Payload as WirePayload } from "../../../gen/ts/tickmesh/v1/payload_pb.js";
import { sha256Hex } from "./codecs.js";
import { ConfigError, RpcError, ValidationError } from "./errors.js";
import { TENANT_METADATA_KEY } from "./ids.js";

const FETCH_BLOB_PATH = `/${ExecutorPoolService.typeName}/${ExecutorPoolService.method.fetchBlob.name}`;
const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
// Statuses that mean this blob cannot be had from this pool, however often it is asked.
const BLOB_REFUSALS = new Set([
  grpc.status.INVALID_ARGUMENT,
  grpc.status.PERMISSION_DENIED,
  grpc.status.UNAUTHENTICATED,
  grpc.status.DATA_LOSS,
]);

/** Fetches the bytes of a payload that travels as a BlobRef. */
export interface BlobResolver {
  /** `signal` aborts when the attempt needing the blob ends first (cancelled, timed out, dropped). */
  resolve(tenant: string, uri: string, sha256: string, size: number, signal?: AbortSignal): Promise<Uint8Array>;
}

/** Reads file:// blobs of the local blob store (optionally only under `root`), checking the SHA-256. */
export class FileBlobResolver implements BlobResolver {
  private readonly root: string | undefined;

  constructor(root?: string) {
    this.root = root === undefined ? undefined : resolvePath(root);
  }

  async resolve(tenant: string, uri: string, sha256: string, size: number, signal?: AbortSignal): Promise<Uint8Array> {
    signal?.throwIfAborted();
    let url: URL;
    try {
      url = new URL(uri);
    } catch {
      throw new ValidationError(`cannot resolve blob ${JSON.stringify(uri)}: not a URI`);
    }
    if (url.protocol !== "file:" || (url.host !== "" && url.host !== "localhost")) {
      throw new ValidationError(`cannot resolve blob ${JSON.stringify(uri)}: only file:// URIs are supported`);
    }
    const path = fileURLToPath(url);
    const parts = path.split(sep).filter((p) => p !== "");
    if (parts.includes("..") || parts.length < 3) {
      throw new ValidationError(`blob URI ${JSON.stringify(uri)} is not a blob store path`);
    }
    const name = parts[parts.length - 1] ?? "";
    const shard = parts[parts.length - 2] ?? "";
    const owner = parts[parts.length - 3] ?? "";
    if (owner !== tenant || shard !== name.slice(0, 2) || (sha256 !== "" && name !== sha256)) {
      throw new ValidationError(`blob URI ${JSON.stringify(uri)} is not one of tenant ${tenant}'s blobs`);
    }
    if (this.root !== undefined && !path.startsWith(this.root + sep)) {
      throw new ValidationError(`blob URI ${JSON.stringify(uri)} lies outside ${this.root}`);
    }
    let data: Uint8Array;
    try {
      data = new Uint8Array(await readFile(path, signal ? { signal } : {}));
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      throw new ValidationError(`blob ${uri} cannot be read: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (sha256Hex(data) !== (sha256 || name) || (size !== 0 && size !== data.length)) {
      throw new ValidationError(`blob ${uri} failed its sha256/size check`);
    }
    return data;
  }
}

/** Options of a {@link PoolBlobResolver}. */
export interface PoolBlobResolverOptions {
  /** Read file:// blobs directly only under this folder; others are downloaded through the pool. */
  root?: string;
  /** The longest one download may take, in milliseconds (default 300 000; 0 for no limit). */
  timeoutMs?: number;
  /** The message size limit of a client opened for a target address (default 64 MiB). */
  maxMessageBytes?: number;
}

/**
 * Resolves blobs of any blob store, downloading through the executor pool.
 *
 * A file:// blob that exists on this machine (under `root`, when given), laid out as the local
 * blob store keeps it, is read directly with {@link FileBlobResolver}'s checks: the embedded
 * profile's fast path. Every other blob (s3:// in the cloud profile, or a file this machine
 * cannot see) is downloaded from the pool's ExecutorPoolService.FetchBlob, so executors need no
 * credentials for the blob store. Either way the bytes must match their SHA-256 and size.
 *
 * This is the Worker's default resolver, on the Worker's own client. Refused, missing and
 * corrupt blobs throw ValidationError; a pool that cannot be reached throws RpcError.
 *
 * @example
 * const resolver = new PoolBlobResolver("127.0.0.1:50051");
 * const data = await resolver.resolve("acme", ref.uri, ref.sha256, Number(ref.size));
 * resolver.close();
 */
export class PoolBlobResolver implements BlobResolver {
  private readonly files: FileBlobResolver;
  private readonly root: string | undefined;
  private readonly timeoutMs: number;
  private client: grpc.Client | undefined;
  private readonly ownsClient: boolean;

  /** `pool` is the pool's address (host:port; close() closes the client opened for it) or a client to it. */
  constructor(pool: string | grpc.Client, options: PoolBlobResolverOptions = {}) {
    this.root = options.root === undefined ? undefined : resolvePath(options.root);
    this.files = new FileBlobResolver(this.root);
    this.timeoutMs = options.timeoutMs ?? 300_000;
    if (typeof pool === "string") {
      const maxMessageBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
      this.client = new grpc.Client(pool, grpc.credentials.createInsecure(), {
        "grpc.max_receive_message_length": maxMessageBytes,
        "grpc.max_send_message_length": maxMessageBytes,
      });
      this.ownsClient = true;
    } else {
      this.client = pool;
      this.ownsClient = false;
    }
  }

  async resolve(tenant: string, uri: string, sha256: string, size: number, signal?: AbortSignal): Promise<Uint8Array> {
    if (await this.isLocal(uri)) return this.files.resolve(tenant, uri, sha256, size, signal);
    const blob = await this.fetch(tenant, uri, sha256, size, signal);
    const digest = sha256Hex(blob.data);
    if (digest !== blob.ref.sha256 || (sha256 !== "" && digest !== sha256) || blob.data.length !== Number(blob.ref.size)) {
      throw new ValidationError(`blob ${uri} from the pool failed its sha256/size check`);
    }
    return blob.data;
  }

  /** Close the client this resolver opened (a client it was given stays open). */
  close(): void {
    if (this.ownsClient) this.client?.close();
    this.client = undefined;
  }

  /** Whether `uri` names a file:// blob that exists here (under `root`, when given). */
  private async isLocal(uri: string): Promise<boolean> {
    let path: string;
    try {
      const url = new URL(uri);
      if (url.protocol !== "file:" || (url.host !== "" && url.host !== "localhost")) return false;
      path = fileURLToPath(url);
    } catch {
      return false;
    }
    if (this.root !== undefined && !path.startsWith(this.root + sep)) return false;
    try {
      return (await stat(path)).isFile();
    } catch {
      return false; // not on this machine: the pool's blob store has it
    }
  }

  /** Download through FetchBlob: the blob's ref, then chunks adding up to exactly its size. */
  private fetch(
    tenant: string,
    uri: string,
    sha256: string,
    size: number,
    signal: AbortSignal | undefined,
  ): Promise<{ ref: BlobRef; data: Uint8Array }> {
    const client = this.client;
    if (!client) return Promise.reject(new ConfigError("this PoolBlobResolver was closed"));
    if (signal?.aborted) return Promise.reject(signal.reason);
    const metadata = new grpc.Metadata();
    metadata.set(TENANT_METADATA_KEY, tenant);
    const call = client.makeServerStreamRequest<FetchBlobRequest, FetchBlobResponse>(
      FETCH_BLOB_PATH,
      (msg) => Buffer.from(toBinary(FetchBlobRequestSchema, msg)),
      (buf) => fromBinary(FetchBlobResponseSchema, buf),
      create(FetchBlobRequestSchema, { uri, sha256 }),
      metadata,
      this.timeoutMs > 0 ? { deadline: Date.now() + this.timeoutMs } : {},
    );
    return new Promise((resolve, reject) => {
      let ref: BlobRef | undefined;
      let expected = 0;
      let received = 0;
      const chunks: Uint8Array[] = [];
      let settled = false;
      // An abandoned download would otherwise run on (and keep the process alive) until its deadline.
      const onAbort = () => fail(signal?.reason);
      signal?.addEventListener("abort", onAbort, { once: true });
      const fail = (err: unknown) => {
        if (settled) return;
        settled = true;
        signal?.removeEventListener("abort", onAbort);
        call.cancel();
        reject(err);
      };
      call.on("data", (response: FetchBlobResponse) => {
        if (settled) return;
        const part = response.part;
        if (ref === undefined) {
          if (part.case !== "blob") return fail(new ValidationError(`the pool's answer for blob ${uri} did not start with its ref`));
          ref = part.value;
          expected = Number(ref.size);
          if (size !== 0 && expected !== size) {
            return fail(new ValidationError(`the pool has blob ${uri} as ${expected} bytes, not ${size}`));
          }
          return;
        }
        if (part.case !== "chunk") return fail(new ValidationError(`the pool sent blob ${uri} with a second ref`));
        received += part.value.length;
        if (received > expected) return fail(new ValidationError(`the pool sent more than the ${expected} bytes of blob ${uri}`));
        chunks.push(part.value);
      });
      call.on("error", (err: grpc.ServiceError) => fail(fetchError(err, uri)));
      call.on("end", () => {
        if (settled) return;
        if (ref === undefined) return fail(new ValidationError(`the pool's answer for blob ${uri} did not start with its ref`));
        if (received !== expected) return fail(new ValidationError(`the pool sent ${received} of the ${expected} bytes of blob ${uri}`));
        settled = true;
        signal?.removeEventListener("abort", onAbort);
        resolve({ ref, data: new Uint8Array(Buffer.concat(chunks)) });
      });
    });
  }
}

function fetchError(err: grpc.ServiceError, uri: string): Error {
  const detail = err.details || err.message;
  if (BLOB_REFUSALS.has(err.code)) {
    return new ValidationError(`cannot fetch blob ${uri} from the pool (${grpc.status[err.code]}): ${detail}`);
  }
  if (err.code === grpc.status.NOT_FOUND) return new ValidationError(`blob ${uri} does not exist: ${detail}`);
  if (err.code === grpc.status.UNIMPLEMENTED) {
    return new ConfigError(
      `the executor pool does not serve FetchBlob, so blob ${uri} cannot be fetched: upgrade the pool, or give the Worker a blobResolver that can read it`,
    );
  }
  return new RpcError(err.code, detail);
}

/** The bytes of a wire payload: inline, or fetched through `resolver`. */
export async function payloadBytes(tenant: string, payload: WirePayload, resolver: BlobResolver, signal?: AbortSignal): Promise<Uint8Array> {
  switch (payload.data.case) {
    case "inline":
      return payload.data.value;
    case "blob": {
      const blob = payload.data.value;
      return resolver.resolve(tenant, blob.uri, payload.sha256 || blob.sha256, Number(payload.size || blob.size), signal);
    }
    default:
      return new Uint8Array();
  }
}

/** The content type of a wire payload (a BlobRef may carry it instead). */
export function payloadContentType(payload: WirePayload): string {
  if (payload.contentType) return payload.contentType;
  return payload.data.case === "blob" ? payload.data.value.contentType : "";
}
