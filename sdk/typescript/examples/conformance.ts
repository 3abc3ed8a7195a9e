// The conformance executor in TypeScript: serves the fixed handler set of
// tests/conformance/PROTOCOL.md. Started by the checker as
//   node sdk/typescript/dist/sdk/typescript/examples/conformance.js
// with TICKMESH_POOL (host:port), TICKMESH_TENANT and TICKMESH_CONCURRENCY in the environment.
import { Payload, TaskError, Worker, complete, dispatch, step } from "../src/index.js";

const target = process.env["TICKMESH_POOL"];
const tenant = process.env["TICKMESH_TENANT"];
if (!target || !tenant) {
  console.error("TICKMESH_POOL and TICKMESH_TENANT must be set");
  process.exit(2);
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    function onAbort() {
      clearTimeout(timer);
      reject(signal.reason);
    }
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

const worker = new Worker({
  target,
  tenant,
  concurrency: Number(process.env["TICKMESH_CONCURRENCY"] ?? "4"),
  labels: { conformance: "typescript" },
})
  // Echo the input byte for byte, content type included.
  .task("conf_echo", async (ctx) => new Payload(ctx.rawInput.data, ctx.rawInput.contentType))
  // Sleep input.ms milliseconds; stop at once when cancelled.
  .task("conf_sleep", async (ctx, input: { ms?: number }) => {
    const ms = Number(input?.ms ?? 0);
    await sleep(ms, ctx.signal);
    return { slept: ms, attempt: ctx.attempt };
  })
  .task("conf_fail", async (_ctx, input: unknown) => {
    throw new TaskError("conformance failure", { type: "ConformanceError", retryable: false, details: { input } });
  })
  // input.bytes bytes of output: byte i is i % 256.
  .task("conf_big", async (_ctx, input: { bytes?: number }) => {
    const n = Number(input?.bytes ?? 0);
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = i % 256;
    return out;
  })
  // Dispatch node "work" once with the goal; then complete with its output.
  .plan("conf_plan", async (_ctx, goal, inputs) => {
    const first = inputs[0];
    if (!first) return dispatch(step("work", goal));
    if (first.succeeded) return complete(first.output);
    return complete({ status: first.status, error_type: first.errorType, error_message: first.errorMessage });
  });

let stopping = false;
for (const sig of ["SIGTERM", "SIGINT"] as const) {
  process.on(sig, () => {
    if (stopping) return;
    stopping = true;
    void worker.shutdown(5_000).then(() => process.exit(0));
  });
}

worker.run().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(`conformance executor failed: ${String(err)}`);
    process.exit(1);
  },
);
console.log(`conformance executor ${worker.executorId} serving ${tenant} via ${target}`);
