// The TypeScript validate_code gives the Python handler's answers, digest included.
import { strict as assert } from "node:assert";
import { execFileSync } from "node:child_process";
import { test } from "node:test";

import { checkModule, filesDigest } from "../../../examples/coding_agent/ts/validate.js";

const files = {
  "parser.py": '"""parser: an adder library"""\n\n\ndef parser_add(a, b):\n    return a + b\n',
  "lexer.py": '"""lexer: an adder library\'s"""\n\n\ndef lexer_add(a, b):\n    return a - b  # BUG\n',
};

test("modules are checked like the Python validator", () => {
  assert.equal(checkModule("parser.py", files["parser.py"]), "ok");
  assert.equal(checkModule("lexer.py", files["lexer.py"]), "lexer.py: expected add(2, 3) == 5");
  assert.throws(() => checkModule("x.py", "def y_add(a, b):\n    return a + b\n"));
});

test("the digest equals Python's sha256(repr(sorted(files.items())))[:12]", () => {
  // The project needs Python (its services are Python): a missing python3 fails loudly here.
  const expected = execFileSync(
    "python3",
    ["-c", "import hashlib,json,sys; f=json.load(sys.stdin); print(hashlib.sha256(repr(sorted(f.items())).encode()).hexdigest()[:12])"],
    { input: JSON.stringify(files), encoding: "utf8" },
  ).trim();
  assert.equal(filesDigest(files), expected);
});
