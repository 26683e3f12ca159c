/** The built executables exist and answer --help (npm test builds dist/ first). */
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import t from "tap";

const run = promisify(execFile);

for (const bin of ["bin/qbackup", "bin/qbackupd"]) {
  t.test(`${bin} --help`, async (t) => {
    const r = await run(bin, ["--help"]);
    t.match(r.stdout, /^usage: /);
  });
}
