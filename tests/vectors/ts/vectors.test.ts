// Golden vectors, checked with the generated TypeScript (protobuf-es): every
// envelope decodes and re-encodes to the same bytes, its JSON form is the same
// message, execution ids are computed identically, and invalid input is refused.
import { strict as assert } from "node:assert";
import { createHash } from "node:crypto";
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { equals, fromBinary, fromJson, toBinary, toJson, type JsonValue } from "@bufbuild/protobuf";

import { ExecutionEnvelopeSchema } from "../../../gen/ts/tickmesh/v1/envelope_pb.js";

const VECTORS = join(process.cwd(), "tests", "vectors");
const ENVELOPES = join(VECTORS, "envelopes");
const INVALID = join(VECTORS, "invalid");

const kinds = readdirSync(ENVELOPES)
  .filter((name) => name.endsWith(".binpb"))
  .map((name) => name.slice(0, -".binpb".length))
  .sort();

test("there is a vector for every body kind of the envelope", () => {
  const oneof = ExecutionEnvelopeSchema.oneofs.find((o) => o.name === "body");
  assert.ok(oneof, "ExecutionEnvelope has a body oneof");
  assert.deepEqual(kinds, oneof.fields.map((f) => f.name).sort());
});

for (const kind of kinds) {
  const golden = new Uint8Array(readFileSync(join(ENVELOPES, `${kind}.binpb`)));
  const json = JSON.parse(readFileSync(join(ENVELOPES, `${kind}.json`), "utf8")) as JsonValue;

  test(`${kind}: decodes and re-encodes byte for byte`, () => {
    const envelope = fromBinary(ExecutionEnvelopeSchema, golden);
    assert.equal(envelope.body.case, snakeToCamel(kind));
    assert.deepEqual(toBinary(ExecutionEnvelopeSchema, envelope), golden);
  });

  test(`${kind}: JSON form is the same message`, () => {
    const fromBytes = fromBinary(ExecutionEnvelopeSchema, golden);
    const parsed = fromJson(ExecutionEnvelopeSchema, json);
    assert.ok(equals(ExecutionEnvelopeSchema, parsed, fromBytes), "JSON and binary disagree");
    assert.deepEqual(toJson(ExecutionEnvelopeSchema, fromBytes), json);
  });
}

test("execution ids are computed the same way", () => {
  type Case = { tenant: string; lifetime: string; parents: string[]; node: string; iteration: number; execution_id: string };
  const cases = JSON.parse(readFileSync(join(VECTORS, "execution_ids.json"), "utf8")) as Case[];
  assert.ok(cases.length > 0);
  for (const c of cases) {
    const material = [
      "tickmesh.execution.v1",
      c.tenant,
      c.lifetime,
      [...c.parents].sort().join(","),
      c.node,
      String(c.iteration),
    ].join("\0");
    const id = createHash("sha256").update(material, "utf8").digest("hex").slice(0, 32);
    assert.equal(id, c.execution_id);
  }
});

test("corrupt wire data is refused by the decoder", () => {
  for (const name of ["truncated", "random_bytes", "bad_utf8"]) {
    const data = new Uint8Array(readFileSync(join(INVALID, `${name}.binpb`)));
    assert.throws(() => fromBinary(ExecutionEnvelopeSchema, data), Error, name);
  }
});

test("bytes without a header or body are never taken for an envelope", () => {
  for (const name of ["empty", "no_header", "wrong_message_type"]) {
    const data = new Uint8Array(readFileSync(join(INVALID, `${name}.binpb`)));
    let usable = false;
    try {
      const envelope = fromBinary(ExecutionEnvelopeSchema, data);
      usable = envelope.header !== undefined && envelope.body.case !== undefined;
    } catch {
      usable = false; // refused outright: also fine
    }
    assert.equal(usable, false, name);
  }
});

function snakeToCamel(name: string): string {
  return name.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
}
