// The golden vectors of tests/vectors, checked with this package's own decoder and id recipe:
// every envelope decodes and re-encodes byte for byte, execution ids match, invalid input is refused.
import { strict as assert } from "node:assert";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { decodeEnvelope, encodeEnvelope, executionId, ValidationError } from "../src/index.js";

function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, "tests", "vectors", "execution_ids.json"))) {
    const parent = dirname(dir);
    if (parent === dir) throw new Error("cannot find tests/vectors above this file");
    dir = parent;
  }
  return dir;
}

const VECTORS = join(repoRoot(), "tests", "vectors");
const kinds = readdirSync(join(VECTORS, "envelopes"))
  .filter((n) => n.endsWith(".binpb"))
  .map((n) => n.slice(0, -".binpb".length))
  .sort();

test("there are golden envelopes to check", () => {
  assert.ok(kinds.length >= 7, `found ${kinds.join(", ")}`);
});

for (const kind of kinds) {
  test(`${kind}: decodeEnvelope -> encodeEnvelope is byte for byte`, () => {
    const golden = new Uint8Array(readFileSync(join(VECTORS, "envelopes", `${kind}.binpb`)));
    const camel = kind.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
    const envelope = decodeEnvelope(golden, camel as Parameters<typeof decodeEnvelope>[1]);
    assert.equal(envelope.body.case, camel);
    assert.deepEqual(encodeEnvelope(envelope), golden);
  });
}

test("execution ids follow the recipe", () => {
  type Case = { tenant: string; lifetime: string; parents: string[]; node: string; iteration: number; execution_id: string };
  const cases = JSON.parse(readFileSync(join(VECTORS, "execution_ids.json"), "utf8")) as Case[];
  assert.ok(cases.length > 0);
  for (const c of cases) {
    assert.equal(executionId(c.tenant, c.lifetime, c.parents, c.node, c.iteration), c.execution_id);
  }
});

test("every invalid vector is refused with a ValidationError", () => {
  const expected = JSON.parse(readFileSync(join(VECTORS, "invalid", "expected_errors.json"), "utf8")) as Record<string, unknown>;
  const names = readdirSync(join(VECTORS, "invalid")).filter((n) => n.endsWith(".binpb"));
  assert.ok(names.length >= 5);
  for (const name of names) {
    const data = new Uint8Array(readFileSync(join(VECTORS, "invalid", name)));
    const stem = name.slice(0, -".binpb".length);
    const kind = stem === "wrong_message_type" ? "taskRequest" : undefined;
    assert.throws(() => decodeEnvelope(data, kind), ValidationError, `${name} (${JSON.stringify(expected[stem] ?? expected[name] ?? "")})`);
  }
});
