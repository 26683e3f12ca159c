/**
 * Capability parsing from query-qmp-schema captured from real QEMU 7.2 and
 * 10.0 (scripts/capture-qmp-fixtures.ts), and the same schemas with one
 * member or command taken out, as an older or differently built QEMU would
 * answer. The probe itself runs against a fake peer serving the capture.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { gunzipSync } from "node:zlib";
import t from "tap";
import {
  capabilitiesFromSchema,
  MIN_QEMU_VERSION,
  probeCapabilities,
  REQUIRED_COMMANDS,
  versionAtLeast,
} from "../../src/qmp/capabilities.js";
import { QmpClient } from "../../src/qmp/index.js";
import type { SchemaInfo, VersionInfo } from "../../src/qmp/qapi.js";
import { reply, startFakeQmp } from "../helpers/fake-qmp.js";
import { silentLogger, type Teardown } from "../helpers/qemu.js";

const DIR = join(import.meta.dirname, "..", "fixtures", "qmp");

interface Captured {
  "query-version": VersionInfo;
  "query-qmp-schema": SchemaInfo[];
}

function load(version: string): Captured {
  return JSON.parse(gunzipSync(readFileSync(join(DIR, `schema-${version}.json.gz`))).toString("utf8")) as Captured;
}

/** The schema without member `member` in the object types that have it. */
function withoutMember(schema: readonly SchemaInfo[], member: string): SchemaInfo[] {
  return schema.map((s) => (s.members === undefined ? s : { ...s, members: s.members.filter((m) => m.name !== member) }));
}

const CAPTURES = [
  { version: "7.2", triple: { major: 7, minor: 2 } },
  { version: "10.0", triple: { major: 10, minor: 0 } },
] as const;

for (const c of CAPTURES) {
  t.test(`QEMU ${c.version}: every capability qbackupd uses is found`, async (t) => {
    const cap = load(c.version);
    const v = cap["query-version"];
    t.match(v.qemu, c.triple, "the capture is of the version it is named after");
    const caps = capabilitiesFromSchema(v.qemu, v.package, cap["query-qmp-schema"]);
    t.same(caps.version, v.qemu);
    t.equal(caps.package, v.package);
    t.equal(caps.backupPerf, true, "blockdev-backup x-perf");
    t.equal(caps.backupFilterNodeName, true, "blockdev-backup filter-node-name");
    t.equal(caps.exportAllocationDepth, true, "block-export-add allocation-depth");
    t.equal(caps.bitmapInconsistent, true, "BlockDirtyInfo inconsistent");
    t.same(
      REQUIRED_COMMANDS.filter((x) => !caps.commands.has(x)),
      [],
      "every required command",
    );
    t.notOk(caps.commands.has("query-block-jobs-x"), "only commands the schema lists");
    t.notOk(caps.commands.has("BlockdevBackup"), "types are not commands");
    t.ok(versionAtLeast(v.qemu, MIN_QEMU_VERSION));
  });

  t.test(`QEMU ${c.version}: a member taken out turns its capability off, and only it`, async (t) => {
    const cap = load(c.version);
    const v = cap["query-version"];
    const schema = cap["query-qmp-schema"];
    const cases = [
      ["x-perf", "backupPerf"],
      ["filter-node-name", "backupFilterNodeName"],
      ["allocation-depth", "exportAllocationDepth"],
      ["inconsistent", "bitmapInconsistent"],
    ] as const;
    for (const [member, flag] of cases) {
      const caps = capabilitiesFromSchema(v.qemu, v.package, withoutMember(schema, member));
      const flags = {
        backupPerf: caps.backupPerf,
        backupFilterNodeName: caps.backupFilterNodeName,
        exportAllocationDepth: caps.exportAllocationDepth,
        bitmapInconsistent: caps.bitmapInconsistent,
      };
      t.same(
        flags,
        { backupPerf: true, backupFilterNodeName: true, exportAllocationDepth: true, bitmapInconsistent: true, [flag]: false },
        `without '${member}'`,
      );
    }
  });
}

t.test("versions compare by major, then minor, then micro", async (t) => {
  const v = (major: number, minor: number, micro: number) => ({ major, minor, micro });
  t.ok(versionAtLeast(v(6, 0, 0), v(6, 0, 0)));
  t.ok(versionAtLeast(v(10, 0, 0), v(6, 2, 9)));
  t.notOk(versionAtLeast(v(5, 2, 9), v(6, 0, 0)));
  t.notOk(versionAtLeast(v(6, 0, 0), v(6, 0, 1)));
  t.notOk(versionAtLeast(v(6, 0, 9), v(6, 1, 0)));
});

/** A peer answering query-version and query-qmp-schema from a capture. */
async function schemaPeer(t: Teardown, captured: Captured) {
  const peer = await startFakeQmp(t, (cmd, p) => {
    if (cmd.execute === "query-version") p.write(reply(cmd.id, captured["query-version"]));
    if (cmd.execute === "query-qmp-schema") p.write(reply(cmd.id, captured["query-qmp-schema"]));
  });
  const client = (await QmpClient.connect({ path: peer.path }, { logger: silentLogger }))._unsafeUnwrap();
  t.teardown(() => client.close());
  return { peer, client };
}

t.test("probe: the 10.0 schema is accepted; a second probe with the cache asks nothing", async (t) => {
  const { peer, client } = await schemaPeer(t, load("10.0"));
  const cache = new Map();
  const a = (await probeCapabilities(client, cache))._unsafeUnwrap();
  t.same(
    peer.received.map((x) => x.execute),
    ["query-version", "query-qmp-schema"],
  );
  const b = (await probeCapabilities(client, cache))._unsafeUnwrap();
  t.equal(b, a, "the cached value");
  t.same(
    peer.received.map((x) => x.execute),
    ["query-version", "query-qmp-schema", "query-version"],
    "the schema is not asked again",
  );
});

t.test("probe: a QEMU lacking a required command is refused, naming it", async (t) => {
  const cap = load("7.2");
  const schema = cap["query-qmp-schema"].filter((s) => s.name !== "block-export-add");
  const { client } = await schemaPeer(t, { ...cap, "query-qmp-schema": schema });
  const e = (await probeCapabilities(client))._unsafeUnwrapErr();
  t.match(e, { code: "unsupported", message: /QEMU 7\.2\.\d+ lacks QMP commands qbackupd needs: block-export-add$/ });
});
