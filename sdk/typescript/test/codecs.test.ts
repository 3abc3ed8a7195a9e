import { strict as assert } from "node:assert";
import { mkdtempSync, mkdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { pathToFileURL } from "node:url";

import { create } from "@bufbuild/protobuf";

import { NodeRefSchema } from "../../../gen/ts/tickmesh/v1/header_pb.js";
import {
  FileBlobResolver,
  Payload,
  TaskError,
  ValidationError,
  complete,
  decode,
  decodeProtobuf,
  dispatch,
  encode,
  encodeProtobuf,
  errorData,
  fail,
  sha256Hex,
  step,
  text,
  toWirePayload,
  waitFor,
} from "../src/index.js";

const utf8 = (s: string) => new TextEncoder().encode(s);

test("JSON is compact UTF-8 like the Python SDK's", () => {
  const [ct, data] = encode({ a: "wörld", b: [1, 2.5, true, null] });
  assert.equal(ct, "application/json");
  assert.equal(new TextDecoder().decode(data), '{"a":"wörld","b":[1,2.5,true,null]}');
  assert.deepEqual(decode(ct, data), { a: "wörld", b: [1, 2.5, true, null] });
  assert.equal(new TextDecoder().decode(encode(undefined)[1]), "null");
});

test("bytes, text and explicit payloads keep their content type", () => {
  const raw = new Uint8Array([0, 1, 255]);
  assert.deepEqual(encode(raw), ["application/octet-stream", raw]);
  assert.deepEqual(decode("application/octet-stream", raw), raw);
  assert.equal(decode("text/plain; charset=utf-8", encode(text("héllo"))[1]), "héllo");
  assert.deepEqual(encode(new Payload(utf8("a,b"), "text/csv")), ["text/csv", utf8("a,b")]);
  assert.equal(decode("", new Uint8Array()), null);
  assert.deepEqual(decode("application/vnd.x+json", utf8("[1]")), [1]);
});

test("values without an encoding are refused", () => {
  assert.throws(() => encode({ n: Number.NaN }), ValidationError);
  assert.throws(() => encode(10n), ValidationError);
  assert.throws(() => encode(() => 1), ValidationError);
  assert.throws(() => decode("application/json", utf8("{nope")), ValidationError);
});

test("protobuf payloads carry their message type and are checked on decode", () => {
  const ref = create(NodeRefSchema, { id: "n", handler: "h" });
  const p = encodeProtobuf(NodeRefSchema, ref);
  assert.equal(p.contentType, "application/x-protobuf; messageType=tickmesh.v1.NodeRef");
  assert.equal(decodeProtobuf(NodeRefSchema, p).handler, "h");
  assert.throws(
    () => decodeProtobuf(NodeRefSchema, { data: p.data, contentType: "application/x-protobuf; messageType=x.Y" }),
    ValidationError,
  );
});

test("wire payloads carry size and sha256", () => {
  const w = toWirePayload("application/json", utf8("{}"));
  assert.equal(w.size, 2n);
  assert.equal(w.sha256, sha256Hex(utf8("{}")));
});

test("file blobs are read only from the tenant's store layout and checked", async () => {
  const root = mkdtempSync(join(tmpdir(), "tm-blobs-"));
  const data = utf8("blob bytes");
  const sha = sha256Hex(data);
  mkdirSync(join(root, "acme", sha.slice(0, 2)), { recursive: true });
  const path = join(root, "acme", sha.slice(0, 2), sha);
  writeFileSync(path, data);
  const uri = pathToFileURL(path).href;
  const resolver = new FileBlobResolver(root);
  assert.deepEqual(await resolver.resolve("acme", uri, sha, data.length), data);
  await assert.rejects(resolver.resolve("other", uri, sha, 0), ValidationError);
  await assert.rejects(resolver.resolve("acme", uri, sha, 3), ValidationError);
  writeFileSync(path, utf8("tampered!!"));
  await assert.rejects(resolver.resolve("acme", uri, sha, 0), ValidationError);
});

test("errors become ErrorData: TaskError keeps its fields, others are retryable", () => {
  assert.deepEqual(errorData(new TaskError("no", { type: "Bad", retryable: false, details: { k: 1 } })), {
    type: "Bad",
    message: "no",
    retryable: false,
    details: { k: 1 },
  });
  assert.deepEqual(errorData(new TypeError("x")), { type: "TypeError", message: "x", retryable: true });
});

test("decision builders", () => {
  assert.equal(dispatch(step("a", 1), step("b")).fields.steps?.length, 2);
  assert.throws(() => dispatch());
  assert.equal(complete({ ok: true }).because("done").rationale, "done");
  assert.equal(waitFor("approval", { timeoutMs: 1000, onTimeout: "signal", default: 1 }).fields.onTimeout, "signal");
  assert.equal(fail("nope", { type: "X" }).fields.errorType, "X");
});
