// Payloads that travel as a BlobRef: the embedded profile keeps them as files laid out
// <root>/<tenant>/<sha[:2]>/<sha>, referenced by file:// URIs. Mirrors FileBlobResolver (Python).
import { readFile } from "node:fs/promises";
import { resolve as resolvePath, sep } from "node:path";
import { fileURLToPath } from "node:url";

import type { Payload as WirePayload } from "../../../gen/ts/tickmesh/v1/payload_pb.js";
import { sha256Hex } from "./codecs.js";
import { ValidationError } from "./errors.js";

/** Fetches the bytes of a payload that travels as a BlobRef. */
export interface BlobResolver {
  resolve(tenant: string, uri: string, sha256: string, size: number): Promise<Uint8Array>;
}

/** Reads file:// blobs of the local blob store (optionally only under `root`), checking the SHA-256. */
export class FileBlobResolver implements BlobResolver {
  private readonly root: string | undefined;

  constructor(root?: string) {
    this.root = root === undefined ? undefined : resolvePath(root);
  }

  async resolve(tenant: string, uri: string, sha256: string, size: number): Promise<Uint8Array> {
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
      data = new Uint8Array(await readFile(path));
    } catch (err) {
      throw new ValidationError(`blob ${uri} cannot be read: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (sha256Hex(data) !== (sha256 || name) || (size !== 0 && size !== data.length)) {
      throw new ValidationError(`blob ${uri} failed its sha256/size check`);
    }
    return data;
  }
}

/** The bytes of a wire payload: inline, or fetched through `resolver`. */
export async function payloadBytes(tenant: string, payload: WirePayload, resolver: BlobResolver): Promise<Uint8Array> {
  switch (payload.data.case) {
    case "inline":
      return payload.data.value;
    case "blob": {
      const blob = payload.data.value;
      return resolver.resolve(tenant, blob.uri, payload.sha256 || blob.sha256, Number(payload.size || blob.size));
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
