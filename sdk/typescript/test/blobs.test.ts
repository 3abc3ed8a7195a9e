// PoolBlobResolver against a fake pool (a grpc-js server speaking ExecutorPoolService.FetchBlob
// and Connect): downloads in chunks, the file:// fast path, digest and stream checks, status
// mapping, and the Worker's default resolver. tests/integration/test_executor_blobs.py runs it
// against the real pool and an S3 store.
import { strict as assert } from "node:assert";
import { createHash, randomBytes } from "node:crypto";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { test } from "node:test";

import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";

import {
  AssignmentSchema,
  ConnectRequestSchema,
  ConnectResponseSchema,
  FetchBlobRequestSchema,
  FetchBlobResponseSchema,
  type ConnectRequest,
  type ConnectResponse,
  type FetchBlobRequest,
  type FetchBlobResponse,
} from "../../../gen/ts/tickmesh/v1/executor_pool_service_pb.js";
import { NodeKind } from "../../../gen/ts/tickmesh/v1/graph_pb.js";
import { TaskStatus } from "../../../gen/ts/tickmesh/v1/result_pb.js";
import { ConfigError, PoolBlobResolver, RpcError, ValidationError, Worker, decode } from "../src/index.js";

const MIB = 1024 * 1024;
const TENANT = "acme";

function sha(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

function s3Uri(tenant: string, digest: string): string {
  return `s3://bucket/pool/${tenant}/${digest.slice(0, 2)}/${digest}`;
}

type FetchCall = grpc.ServerWritableStream<FetchBlobRequest, FetchBlobResponse>;
type ConnectCall = grpc.ServerDuplexStream<ConnectRequest, ConnectResponse>;
/** What the fake pool does with one FetchBlob call (the default serves `blobs` honestly). */
type Behaviour = (call: FetchCall, blobs: Map<string, Uint8Array>) => void;

function serveHonestly(call: FetchCall, blobs: Map<string, Uint8Array>): void {
  const data = blobs.get(call.request.uri);
  if (data === undefined) {
    call.emit("error", { code: grpc.status.NOT_FOUND, details: `blob ${call.request.uri} does not exist` });
    return;
  }
  const digest = sha(data);
  call.write(create(FetchBlobResponseSchema, { part: { case: "blob", value: { uri: call.request.uri, sha256: digest, size: BigInt(data.length) } } }));
  for (let start = 0; start < data.length; start += MIB) {
    call.write(create(FetchBlobResponseSchema, { part: { case: "chunk", value: data.subarray(start, start + MIB) } }));
  }
  call.end();
}

interface FakePool {
  target: string;
  blobs: Map<string, Uint8Array>;
  requests: Array<{ tenant: string; uri: string; sha256: string }>;
  behave: (behaviour: Behaviour) => void;
  connects: ConnectCall[];
  frames: ConnectRequest[];
  next: () => Promise<ConnectRequest>;
  close: () => void;
}

async function fakePool(): Promise<FakePool> {
  const server = new grpc.Server();
  const blobs = new Map<string, Uint8Array>();
  const requests: FakePool["requests"] = [];
  const connects: ConnectCall[] = [];
  const frames: ConnectRequest[] = [];
  let behaviour: Behaviour = serveHonestly;
  let waiters: Array<() => void> = [];
  let read = 0;
  server.addService(
    {
      FetchBlob: {
        path: "/tickmesh.v1.ExecutorPoolService/FetchBlob",
        requestStream: false,
        responseStream: true,
        requestSerialize: (m: FetchBlobRequest) => Buffer.from(toBinary(FetchBlobRequestSchema, m)),
        requestDeserialize: (b: Buffer) => fromBinary(FetchBlobRequestSchema, b),
        responseSerialize: (m: FetchBlobResponse) => Buffer.from(toBinary(FetchBlobResponseSchema, m)),
        responseDeserialize: (b: Buffer) => fromBinary(FetchBlobResponseSchema, b),
      },
      Connect: {
        path: "/tickmesh.v1.ExecutorPoolService/Connect",
        requestStream: true,
        responseStream: true,
        requestSerialize: (m: ConnectRequest) => Buffer.from(toBinary(ConnectRequestSchema, m)),
        requestDeserialize: (b: Buffer) => fromBinary(ConnectRequestSchema, b),
        responseSerialize: (m: ConnectResponse) => Buffer.from(toBinary(ConnectResponseSchema, m)),
        responseDeserialize: (b: Buffer) => fromBinary(ConnectResponseSchema, b),
      },
    },
    {
      FetchBlob: (call: FetchCall) => {
        const tenant = String(call.metadata.get("x-tickmesh-tenant")[0] ?? "");
        requests.push({ tenant, uri: call.request.uri, sha256: call.request.sha256 });
        behaviour(call, blobs);
      },
      Connect: (call: ConnectCall) => {
        connects.push(call);
        call.on("data", (m: ConnectRequest) => {
          frames.push(m);
          if (m.message.case === "hello") {
            call.write(
              create(ConnectResponseSchema, {
                message: { case: "welcome", value: { sessionId: "s1", heartbeatInterval: durationFromMs(1000), inlinePayloadLimit: 1024n, maxMessageBytes: 8n * BigInt(MIB), protocolVersion: 1 } },
              }),
            );
          }
          const w = waiters;
          waiters = [];
          for (const f of w) f();
        });
        call.on("end", () => call.end());
        call.on("error", () => undefined);
      },
    },
  );
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  const next = async (): Promise<ConnectRequest> => {
    while (read >= frames.length) await new Promise<void>((r) => waiters.push(r));
    return frames[read++]!;
  };
  return {
    target: `127.0.0.1:${port}`,
    blobs,
    requests,
    behave: (b) => {
      behaviour = b;
    },
    connects,
    frames,
    next,
    close: () => server.forceShutdown(),
  };
}

test("an s3:// blob is downloaded through the pool in chunks, verified", async () => {
  const pool = await fakePool();
  const resolver = new PoolBlobResolver(pool.target);
  try {
    const data = new Uint8Array(randomBytes(2 * MIB + 12_345));
    const digest = sha(data);
    const uri = s3Uri(TENANT, digest);
    pool.blobs.set(uri, data);

    const got = await resolver.resolve(TENANT, uri, digest, data.length);

    assert.equal(got.length, data.length);
    assert.equal(sha(got), digest);
    assert.deepEqual(pool.requests, [{ tenant: TENANT, uri, sha256: digest }]);
    // Without an expected digest or size, the pool's own ref is the check.
    assert.equal(sha(await resolver.resolve(TENANT, uri, "", 0)), digest);
  } finally {
    resolver.close();
    pool.close();
  }
});

test("a file:// blob on this machine is read directly; a missing one comes from the pool", async () => {
  const pool = await fakePool();
  const root = await mkdtemp(join(tmpdir(), "tm-blobs-"));
  const resolver = new PoolBlobResolver(pool.target);
  try {
    const data = new TextEncoder().encode("local bytes");
    const digest = sha(data);
    const path = join(root, TENANT, digest.slice(0, 2), digest);
    await mkdir(join(root, TENANT, digest.slice(0, 2)), { recursive: true });
    await writeFile(path, data);
    const local = pathToFileURL(path).href;

    assert.equal(new TextDecoder().decode(await resolver.resolve(TENANT, local, digest, data.length)), "local bytes");
    assert.equal(pool.requests.length, 0, "a local file needs no download");
    // Another tenant's file is refused locally, as FileBlobResolver does.
    await assert.rejects(resolver.resolve("globex", local, digest, data.length), ValidationError);

    const remoteData = new TextEncoder().encode("bytes kept on the pool's machine");
    const remoteDigest = sha(remoteData);
    const remote = pathToFileURL(join(root, "elsewhere", TENANT, remoteDigest.slice(0, 2), remoteDigest)).href;
    pool.blobs.set(remote, remoteData);
    assert.equal(sha(await resolver.resolve(TENANT, remote, remoteDigest, remoteData.length)), remoteDigest);
    assert.deepEqual(pool.requests.map((r) => r.uri), [remote]);

    // With a root, files outside it are downloaded too.
    const rooted = new PoolBlobResolver(pool.target, { root: join(root, "mounted") });
    try {
      pool.blobs.set(local, data);
      assert.equal(sha(await rooted.resolve(TENANT, local, digest, data.length)), digest);
      assert.equal(pool.requests.length, 2);
    } finally {
      rooted.close();
    }
  } finally {
    resolver.close();
    pool.close();
    await rm(root, { recursive: true, force: true });
  }
});

test("refusals, missing and corrupt blobs are validation errors; an unreachable pool is an RpcError", async () => {
  const pool = await fakePool();
  const resolver = new PoolBlobResolver(pool.target);
  try {
    const data = new TextEncoder().encode("some bytes");
    const digest = sha(data);
    const uri = s3Uri(TENANT, digest);
    pool.blobs.set(uri, data);

    await assert.rejects(resolver.resolve(TENANT, s3Uri(TENANT, sha(new Uint8Array([1]))), "", 0), (err: unknown) => {
      return err instanceof ValidationError && /does not exist/.test(err.message);
    });
    await assert.rejects(resolver.resolve(TENANT, uri, sha(new Uint8Array([2])), 0), ValidationError);
    await assert.rejects(resolver.resolve(TENANT, uri, digest, data.length + 1), /as 10 bytes, not 11/);

    for (const [code, kind] of [
      [grpc.status.PERMISSION_DENIED, ValidationError],
      [grpc.status.INVALID_ARGUMENT, ValidationError],
      [grpc.status.DATA_LOSS, ValidationError],
      [grpc.status.UNIMPLEMENTED, ConfigError],
      [grpc.status.UNAVAILABLE, RpcError],
    ] as const) {
      pool.behave((call) => call.emit("error", { code, details: "why" }));
      await assert.rejects(resolver.resolve(TENANT, uri, digest, data.length), kind, `status ${code}`);
    }
  } finally {
    resolver.close();
    pool.close();
  }
});

test("a malformed download stream is refused", async () => {
  const pool = await fakePool();
  const resolver = new PoolBlobResolver(pool.target);
  try {
    const data = new TextEncoder().encode("the real bytes");
    const digest = sha(data);
    const uri = s3Uri(TENANT, digest);
    const ref = (size: number, sha256 = digest) =>
      create(FetchBlobResponseSchema, { part: { case: "blob", value: { uri, sha256, size: BigInt(size) } } });
    const chunk = (bytes: Uint8Array) => create(FetchBlobResponseSchema, { part: { case: "chunk", value: bytes } });
    const cases: Array<[string, (call: FetchCall) => void, RegExp]> = [
      ["chunk first", (call) => (call.write(chunk(data)), call.end()), /did not start with its ref/],
      ["nothing", (call) => call.end(), /did not start with its ref/],
      ["too many bytes", (call) => (call.write(ref(4)), call.write(chunk(data)), call.end()), /more than the 4 bytes/],
      ["too few bytes", (call) => (call.write(ref(data.length)), call.write(chunk(data.subarray(1))), call.end()), /sent 13 of the 14 bytes/],
      ["two refs", (call) => (call.write(ref(data.length)), call.write(ref(data.length)), call.end()), /second ref/],
      [
        "other bytes",
        (call) => {
          const other = new TextEncoder().encode("the fake bytes");
          call.write(ref(other.length));
          call.write(chunk(other));
          call.end();
        },
        /failed its sha256\/size check/,
      ],
    ];
    for (const [name, behaviour, message] of cases) {
      pool.behave(behaviour);
      await assert.rejects(resolver.resolve(TENANT, uri, "", 0), (err: unknown) => err instanceof ValidationError && message.test(err.message), name);
    }
  } finally {
    resolver.close();
    pool.close();
  }
});

test("the Worker's default resolver reads a blob input through the pool", async () => {
  const pool = await fakePool();
  const data = new Uint8Array(randomBytes(3 * MIB));
  const digest = sha(data);
  const uri = s3Uri(TENANT, digest);
  pool.blobs.set(uri, data);
  const worker = new Worker({ target: pool.target, tenant: TENANT, log: () => undefined }).task("digest", async (_ctx, input: Uint8Array) => ({
    sha256: sha(input),
    length: input.length,
  }));
  worker.start();
  try {
    assert.equal((await pool.next()).message.case, "hello");
    await worker.waitConnected();
    const header = {
      tenantId: TENANT,
      lifetimeId: "l1",
      executionId: "e1",
      attempt: 1,
      iteration: 1,
      node: { id: "n", handler: "digest", kind: NodeKind.TASK },
    };
    const input = {
      contentType: "application/octet-stream",
      data: { case: "blob" as const, value: { uri, sha256: digest, size: BigInt(data.length), contentType: "application/octet-stream" } },
      size: BigInt(data.length),
      sha256: digest,
    };
    const item = create(AssignmentSchema, {
      assignmentId: "a1",
      envelope: { header, body: { case: "taskRequest", value: { input } } },
      deadline: timestampFromMs(Date.now() + 10_000),
    });
    pool.connects[0]!.write(create(ConnectResponseSchema, { message: { case: "assignments", value: { items: [item] } } }));

    const frame = await pool.next();
    assert.equal(frame.message.case, "completions");
    if (frame.message.case !== "completions") return;
    const result = frame.message.value.items[0]?.result;
    assert.equal(result?.case, "taskResult");
    if (result?.case !== "taskResult") return;
    assert.equal(result.value.status, TaskStatus.SUCCEEDED, result.value.error?.message);
    const output = result.value.output!;
    assert.deepEqual(decode(output.contentType, output.data.case === "inline" ? output.data.value : new Uint8Array()), {
      sha256: digest,
      length: data.length,
    });
    assert.deepEqual(pool.requests.map((r) => [r.tenant, r.uri, r.sha256]), [[TENANT, uri, digest]]);
  } finally {
    await worker.shutdown(100);
    pool.close();
  }
});

test("an aborted download is cancelled at once, on the pool too", async () => {
  const pool = await fakePool();
  let cancelled: Promise<void> = Promise.resolve();
  let asked: () => void = () => undefined;
  const requested = new Promise<void>((r) => (asked = r));
  pool.behave((call) => {
    // Never answers: only the caller can end this download.
    cancelled = new Promise<void>((r) => call.on("cancelled", () => r()));
    asked();
  });
  const resolver = new PoolBlobResolver(pool.target, { timeoutMs: 3_000 });
  try {
    const abort = new AbortController();
    const uri = s3Uri(TENANT, sha(new Uint8Array([7])));
    const download = resolver.resolve(TENANT, uri, "", 0, abort.signal);
    await requested;
    const reason = new Error("the attempt was cancelled");
    abort.abort(reason);
    await assert.rejects(download, (err: unknown) => err === reason);
    await cancelled;
    const late = new AbortController();
    late.abort(reason);
    await assert.rejects(resolver.resolve(TENANT, uri, "", 0, late.signal), (err: unknown) => err === reason);
  } finally {
    resolver.close();
    pool.close();
  }
});

test("the Worker hands the attempt's signal to the blob resolver, aborted when the attempt is cancelled", async () => {
  const pool = await fakePool();
  const signals: Array<AbortSignal | undefined> = [];
  let asked: () => void = () => undefined;
  const requested = new Promise<void>((r) => (asked = r));
  const resolver = {
    resolve(_tenant: string, _uri: string, _sha256: string, _size: number, signal?: AbortSignal): Promise<Uint8Array> {
      signals.push(signal);
      asked();
      return new Promise<Uint8Array>((_, reject) => signal?.addEventListener("abort", () => reject(signal.reason)));
    },
  };
  const worker = new Worker({ target: pool.target, tenant: TENANT, blobResolver: resolver, log: () => undefined }).task("read", async (_ctx, input: unknown) => input);
  worker.start();
  try {
    assert.equal((await pool.next()).message.case, "hello");
    await worker.waitConnected();
    const digest = sha(new Uint8Array([1]));
    const input = { contentType: "application/octet-stream", data: { case: "blob" as const, value: { uri: s3Uri(TENANT, digest), sha256: digest, size: 1n } } };
    const item = create(AssignmentSchema, {
      assignmentId: "a1",
      envelope: { header: { tenantId: TENANT, lifetimeId: "l1", executionId: "e1", attempt: 1, iteration: 1, node: { id: "n", handler: "read", kind: NodeKind.TASK } }, body: { case: "taskRequest", value: { input } } },
      deadline: timestampFromMs(Date.now() + 60_000),
    });
    const call = pool.connects[0]!;
    call.write(create(ConnectResponseSchema, { message: { case: "assignments", value: { items: [item] } } }));
    await requested;
    call.write(create(ConnectResponseSchema, { message: { case: "cancellations", value: { items: [{ assignmentId: "a1", reason: "stop" }] } } }));
    let frame: ConnectRequest;
    do frame = await pool.next();
    while (frame.message.case !== "completions");
    const result = frame.message.value.items[0]?.result;
    assert.equal(result?.case === "taskResult" && result.value.status, TaskStatus.CANCELLED);
    assert.equal(signals.length, 1);
    assert.equal(signals[0]?.aborted, true);
  } finally {
    await worker.shutdown(100);
    pool.close();
  }
});
