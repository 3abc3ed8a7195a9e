// The Node.js executor of tests/e2e/test_polyglot.py: serves
//   ts_digest  {text} -> {text, sha256, length, upper, pid, attempt}   (input encoded by a Python plan)
//   ts_bytes   {n}    -> n bytes, byte i = (i * 7) % 256               (application/octet-stream)
// When TICKMESH_MARKERS is set, ts_digest's first attempt touches <markers>/ts-1-<pid> and then
// blocks (until cancelled) so the test can SIGKILL this process mid-task.
import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";

import { Worker } from "../src/index.js";

const target = process.env["TICKMESH_POOL"];
const tenant = process.env["TICKMESH_TENANT"];
const markers = process.env["TICKMESH_MARKERS"];
if (!target || !tenant) {
  console.error("TICKMESH_POOL and TICKMESH_TENANT must be set");
  process.exit(2);
}

const worker = new Worker({ target, tenant, concurrency: 4, labels: { example: "polyglot" } })
  .task("ts_digest", async (ctx, input: { text: string }) => {
    if (markers && ctx.attempt === 1) {
      writeFileSync(join(markers, `ts-${ctx.attempt}-${process.pid}`), "");
      await new Promise<void>((resolve) => ctx.signal.addEventListener("abort", () => resolve(), { once: true }));
      throw ctx.signal.reason;
    }
    const utf8 = Buffer.from(input.text, "utf8");
    return {
      text: input.text,
      sha256: createHash("sha256").update(utf8).digest("hex"),
      length: utf8.length,
      upper: input.text.toUpperCase(),
      pid: process.pid,
      attempt: ctx.attempt,
    };
  })
  .task("ts_bytes", async (_ctx, input: { n: number }) => {
    const out = new Uint8Array(input.n);
    for (let i = 0; i < input.n; i++) out[i] = (i * 7) % 256;
    return out;
  });

for (const sig of ["SIGTERM", "SIGINT"] as const) {
  process.once(sig, () => void worker.shutdown(5_000).then(() => process.exit(0)));
}
worker.run().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(`polyglot executor failed: ${String(err)}`);
    process.exit(1);
  },
);
console.log(`polyglot executor ${process.pid} serving ${tenant}`);
