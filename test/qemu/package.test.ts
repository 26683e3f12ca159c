/** The built executables exist and answer --help (npm test builds dist/ first). */
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import t from "tap";

const run = promisify(execFile);

for (const bin of ["bin/qbackup", "bin/qbackupd"]) {
  t.test(`${bin} --help`, async (t) => {
    // Run as a user would: without the test runner's loaders in NODE_OPTIONS.
    const r = await run(bin, ["--help"], { env: { ...process.env, NODE_OPTIONS: "" } });
    t.match(r.stdout, /^usage: /i);
  });
}
