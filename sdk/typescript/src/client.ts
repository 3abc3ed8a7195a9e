// A small client of the router API (RouterService): start a lifetime, read it, watch its
// events, abort it, and wait for its result.
import * as grpc from "@grpc/grpc-js";
import { create, fromBinary, toBinary, type DescMessage, type MessageShape } from "@bufbuild/protobuf";

import { LifetimeState, type AgentLifetime, type LifetimeEvent } from "../../../gen/ts/tickmesh/v1/lifetime_pb.js";
import {
  AbortLifetimeRequestSchema,
  AbortLifetimeResponseSchema,
  GetLifetimeRequestSchema,
  GetLifetimeResponseSchema,
  RouterService,
  StartLifetimeRequestSchema,
  StartLifetimeResponseSchema,
  WatchLifetimeRequestSchema,
  WatchLifetimeResponseSchema,
} from "../../../gen/ts/tickmesh/v1/router_service_pb.js";
import { FileBlobResolver, payloadBytes, payloadContentType, type BlobResolver } from "./blobs.js";
import { decode, encodeWire } from "./codecs.js";
import { ConfigError, RpcError, TickmeshError } from "./errors.js";
import { TENANT_ID_PATTERN } from "./ids.js";
import { TENANT_METADATA_KEY } from "./worker.js";

const TERMINAL = new Set([LifetimeState.COMPLETED, LifetimeState.FAILED, LifetimeState.ABORTED]);

/** A lifetime ended FAILED or ABORTED instead of COMPLETED. */
export class LifetimeFailedError extends TickmeshError {
  override name = "LifetimeFailedError";
  constructor(
    readonly lifetimeId: string,
    readonly state: string,
    readonly detail: string,
  ) {
    super(`lifetime ${lifetimeId} ended ${state}: ${detail}`);
  }
}

function path(method: { name: string }): string {
  return `/${RouterService.typeName}/${method.name}`;
}

function serializer<D extends DescMessage>(schema: D) {
  return (msg: MessageShape<D>) => Buffer.from(toBinary(schema, msg));
}

function deserializer<D extends DescMessage>(schema: D) {
  return (buf: Buffer) => fromBinary(schema, buf);
}

/** Calls the router for one tenant. */
export class Client {
  private readonly client: grpc.Client;
  private readonly resolver: BlobResolver;

  constructor(
    target: string,
    private readonly tenant: string,
    options: { callTimeoutMs?: number; blobResolver?: BlobResolver } = {},
  ) {
    if (!TENANT_ID_PATTERN.test(tenant)) throw new ConfigError(`invalid tenant id ${JSON.stringify(tenant)}`);
    this.client = new grpc.Client(target, grpc.credentials.createInsecure(), {
      "grpc.max_receive_message_length": 64 * 1024 * 1024,
    });
    this.callTimeoutMs = options.callTimeoutMs ?? 30_000;
    this.resolver = options.blobResolver ?? new FileBlobResolver();
  }

  private readonly callTimeoutMs: number;

  close(): void {
    this.client.close();
  }

  private metadata(): grpc.Metadata {
    const md = new grpc.Metadata();
    md.set(TENANT_METADATA_KEY, this.tenant);
    return md;
  }

  private unary<I extends DescMessage, O extends DescMessage>(
    method: { name: string },
    input: I,
    output: O,
    request: MessageShape<I>,
  ): Promise<MessageShape<O>> {
    return new Promise((resolve, reject) => {
      this.client.makeUnaryRequest(
        path(method),
        serializer(input),
        deserializer(output),
        request,
        this.metadata(),
        { deadline: Date.now() + this.callTimeoutMs },
        (err: grpc.ServiceError | null, value?: MessageShape<O>) => {
          if (err) reject(new RpcError(err.code, err.details || err.message));
          else if (value === undefined) reject(new RpcError(grpc.status.INTERNAL, "empty response"));
          else resolve(value);
        },
      );
    });
  }

  /** Start a lifetime of `graphId` with `input` (encoded like a task output). */
  async startLifetime(
    graphId: string,
    input: unknown = null,
    options: { version?: number; labels?: Record<string, string>; clientRequestId?: string } = {},
  ): Promise<AgentLifetime> {
    const response = await this.unary(
      RouterService.method.startLifetime,
      StartLifetimeRequestSchema,
      StartLifetimeResponseSchema,
      create(StartLifetimeRequestSchema, {
        graphId,
        graphVersion: options.version ?? 0,
        input: encodeWire(input),
        labels: options.labels ?? {},
        clientRequestId: options.clientRequestId ?? "",
      }),
    );
    if (!response.lifetime) throw new RpcError(grpc.status.INTERNAL, "StartLifetime returned no lifetime");
    return response.lifetime;
  }

  /** A lifetime's current state. */
  async getLifetime(lifetimeId: string): Promise<AgentLifetime> {
    const response = await this.unary(
      RouterService.method.getLifetime,
      GetLifetimeRequestSchema,
      GetLifetimeResponseSchema,
      create(GetLifetimeRequestSchema, { lifetimeId }),
    );
    if (!response.lifetime) throw new RpcError(grpc.status.NOT_FOUND, `lifetime ${lifetimeId}`);
    return response.lifetime;
  }

  /** Abort a lifetime. */
  async abortLifetime(lifetimeId: string, reason = ""): Promise<AgentLifetime | undefined> {
    const response = await this.unary(
      RouterService.method.abortLifetime,
      AbortLifetimeRequestSchema,
      AbortLifetimeResponseSchema,
      create(AbortLifetimeRequestSchema, { lifetimeId, reason }),
    );
    return response.lifetime;
  }

  /** The lifetime's events in sequence order (history first when afterSequence is 0). */
  async *watch(lifetimeId: string, afterSequence = 0n, signal?: AbortSignal): AsyncGenerator<LifetimeEvent> {
    const call = this.client.makeServerStreamRequest(
      path(RouterService.method.watchLifetime),
      serializer(WatchLifetimeRequestSchema),
      deserializer(WatchLifetimeResponseSchema),
      create(WatchLifetimeRequestSchema, { lifetimeId, afterSequence }),
      this.metadata(),
      {},
    );
    const onAbort = () => call.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      for await (const response of call as AsyncIterable<MessageShape<typeof WatchLifetimeResponseSchema>>) {
        if (response.event) yield response.event;
      }
    } catch (err) {
      const e = err as grpc.ServiceError;
      if (e.code === grpc.status.CANCELLED && signal?.aborted) return;
      throw new RpcError(e.code ?? grpc.status.UNKNOWN, e.details || e.message);
    } finally {
      signal?.removeEventListener("abort", onAbort);
      call.cancel();
    }
  }

  /** Decode a lifetime's output payload (inline or blob). */
  async output(lifetime: AgentLifetime): Promise<unknown> {
    if (!lifetime.output) return null;
    const data = await payloadBytes(this.tenant, lifetime.output, this.resolver);
    return decode(payloadContentType(lifetime.output), data);
  }

  /** Wait (polling) until the lifetime ends; return its decoded output, or throw LifetimeFailedError. */
  async result(lifetimeId: string, withinMs = 60_000, pollMs = 50): Promise<unknown> {
    const until = Date.now() + withinMs;
    for (;;) {
      const lifetime = await this.getLifetime(lifetimeId);
      if (TERMINAL.has(lifetime.state)) {
        if (lifetime.state === LifetimeState.COMPLETED) return this.output(lifetime);
        throw new LifetimeFailedError(lifetimeId, LifetimeState[lifetime.state], lifetime.error?.message ?? "");
      }
      if (Date.now() > until) throw new TickmeshError(`lifetime ${lifetimeId} did not end within ${withinMs} ms`);
      await new Promise((r) => setTimeout(r, pollMs));
    }
  }
}
