// The coding agent's `validate_code` task in TypeScript: a port of validate_code in
// examples/coding_agent/handlers.py that the demo can serve from a Node.js executor.
//
//   TICKMESH_POOL=127.0.0.1:50051 TICKMESH_TENANT=default \
//     node sdk/typescript/dist/examples/coding_agent/ts/validate.js
//
// Each generated module must define `<module>_add(a, b)` returning a + b. The Python handler
// exec()s the module; this port finds the function textually and evaluates its one-line return
// expression with `new Function` (the fake model only writes `return a + b` / `return a - b`),
// so it is deterministic and runs no other code. The report and the digest are byte-identical
// to the Python handler's, so either executor can serve the node.
import { createHash } from "node:crypto";
import { fileURLToPath } from "node:url";

import { TaskError, Worker, type TaskContext } from "../../../sdk/typescript/src/index.js";

export interface ValidateJob {
  files: Record<string, string>;
  round: number;
}

export interface ValidateReport {
  files: Record<string, string>;
  report: Record<string, string>;
  round: number;
  digest: string;
}

/** Python's repr() of a str (what the Python handler hashes), for the same digest. */
export function pyRepr(s: string): string {
  const quote = s.includes("'") && !s.includes('"') ? '"' : "'";
  let out = quote;
  for (const ch of s) {
    const code = ch.codePointAt(0)!;
    if (ch === "\\") out += "\\\\";
    else if (ch === quote) out += `\\${quote}`;
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (code < 0x20 || code === 0x7f) out += `\\x${code.toString(16).padStart(2, "0")}`;
    else out += ch;
  }
  return out + quote;
}

/** sha256(repr(sorted(files.items())))[:12], as the Python handler computes it. */
export function filesDigest(files: Record<string, string>): string {
  const items = Object.entries(files).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  const repr = `[${items.map(([k, v]) => `(${pyRepr(k)}, ${pyRepr(v)})`).join(", ")}]`;
  return createHash("sha256").update(repr, "utf8").digest("hex").slice(0, 12);
}

/** Evaluate `<module>_add(2, 3)` of one generated module; undefined when it cannot be found. */
export function checkModule(name: string, code: string): string {
  const fn = name.replace(/\.py$/, "") + "_add";
  const escaped = fn.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  const match = new RegExp(`^def ${escaped}\\(\\s*a\\s*,\\s*b\\s*\\):\\s*\\n\\s+return ([^\\n#]+)`, "m").exec(code);
  if (!match?.[1]) {
    throw new TaskError(`${name}: no function ${fn}(a, b) with a one-line return`, { type: "InvalidModule", retryable: false });
  }
  const expression = match[1].trim();
  if (!/^[ab0-9+\-*/%() ]+$/.test(expression)) {
    throw new TaskError(`${name}: cannot evaluate ${JSON.stringify(expression)}`, { type: "InvalidModule", retryable: false });
  }
  const add = new Function("a", "b", `return (${expression});`) as (a: number, b: number) => number;
  return add(2, 3) === 5 ? "ok" : `${name}: expected add(2, 3) == 5`;
}

/** The handler: same input and output as validate_code in handlers.py. */
export async function validateCode(ctx: TaskContext, job: ValidateJob): Promise<ValidateReport> {
  const report: Record<string, string> = {};
  for (const name of Object.keys(job.files).sort()) report[name] = checkModule(name, job.files[name]!);
  ctx.report({ custom: { tests_run: Object.keys(report).length } });
  return { files: job.files, report, round: job.round, digest: filesDigest(job.files) };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const target = process.env["TICKMESH_POOL"];
  const tenant = process.env["TICKMESH_TENANT"] ?? "default";
  if (!target) {
    console.error("set TICKMESH_POOL to the executor pool's host:port");
    process.exit(2);
  }
  const worker = new Worker({ target, tenant, labels: { example: "coding_agent" } }).task("validate_code", validateCode);
  process.once("SIGTERM", () => void worker.shutdown(5_000).then(() => process.exit(0)));
  process.once("SIGINT", () => void worker.shutdown(5_000).then(() => process.exit(0)));
  worker.run().catch((err: unknown) => {
    console.error(String(err));
    process.exit(1);
  });
  console.log(`validate_code (TypeScript) serving tenant ${tenant} via ${target}`);
}
