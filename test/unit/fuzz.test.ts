/**
 * Hostile input: both XML parsers on 10,000+ inputs mutated from libvirt's
 * fixtures, the QMP reader on random garbage, the QMP client on mutated
 * replies from a fake peer (the API's JSON bodies are in security.test.ts).
 * Every input must end in a value or a typed error: no throw, no hang.
 */
import { readdirSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { backupDefParse } from "../../src/conf/backup.js";
import { checkpointDefParse } from "../../src/conf/checkpoint.js";
import { LineSplitter } from "../../src/qmp/framing.js";
import { QmpClient } from "../../src/qmp/index.js";
import { parseInbound } from "../../src/qmp/messages.js";
import { startFakeQmp } from "../helpers/fake-qmp.js";
import { silentLogger } from "../helpers/qemu.js";
import { fixture, LIBVIRT_XML } from "../helpers/xml.js";

/** Deterministic PRNG (mulberry32) so a failure reproduces. */
function rng(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let x = Math.imul(a ^ (a >>> 15), 1 | a);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

const TOKENS = [
  "<",
  ">",
  "/",
  "'",
  '"',
  "&",
  "&amp;",
  "&#0;",
  "&#x110000;",
  "&lt",
  "<!DOCTYPE x>",
  '<!ENTITY a "b">',
  "<![CDATA[x]]>",
  "<?xml?>",
  "\u0000",
  "\n",
  "=",
  " ",
  "..",
  "/",
  "disk",
  "name",
  "bitmap",
  "-1",
  "99999999999999999999",
  "\u202e",
  "<disk/>",
  "</disks>",
  "x".repeat(300),
];

function mutate(src: string, r: () => number): string {
  let s = src;
  const n = 1 + Math.floor(r() * 4);
  for (let i = 0; i < n; i++) {
    const pos = Math.floor(r() * (s.length + 1));
    switch (Math.floor(r() * 5)) {
      case 0: // delete a span
        s = s.slice(0, pos) + s.slice(pos + Math.floor(r() * 20));
        break;
      case 1: // insert a token
        s = s.slice(0, pos) + TOKENS[Math.floor(r() * TOKENS.length)] + s.slice(pos);
        break;
      case 2: // duplicate a span
        s = s.slice(0, pos) + s.slice(pos, pos + Math.floor(r() * 60)) + s.slice(pos);
        break;
      case 3: // flip a character
        s = s.slice(0, pos) + String.fromCharCode(Math.floor(r() * 128)) + s.slice(pos + 1);
        break;
      default: // truncate
        s = s.slice(0, pos);
    }
  }
  return s;
}

function seeds(dir: string): string[] {
  return readdirSync(join(LIBVIRT_XML, dir)).map((f) => fixture(dir, f));
}

const PARSERS = {
  domainbackup: { seeds: [...seeds("domainbackupxml2xmlin"), ...seeds("domainbackupxml2xmlout")], parse: (x: string) => backupDefParse(x) },
  domaincheckpoint: {
    seeds: [...seeds("qemudomaincheckpointxml2xmlin"), ...seeds("qemudomaincheckpointxml2xmlout")],
    parse: (x: string) => checkpointDefParse(x, { redefine: true }),
  },
};

for (const [name, p] of Object.entries(PARSERS)) {
  t.test(`${name}: 6,000 mutated inputs, each a value or a typed error`, async (t) => {
    const r = rng(name.length * 7919);
    const codes = new Map<string, number>();
    let ok = 0;
    const start = Date.now();
    for (let i = 0; i < 6000; i++) {
      const input = mutate(p.seeds[i % p.seeds.length]!, r);
      let res: ReturnType<typeof p.parse>;
      try {
        res = p.parse(input);
      } catch (e) {
        t.fail(`threw on input ${JSON.stringify(input.slice(0, 200))}: ${(e as Error).message}`);
        return;
      }
      if (res.isOk()) ok++;
      else {
        if (typeof res.error.code !== "string" || typeof res.error.message !== "string" || res.error.message === "") {
          t.fail(`untyped error on ${JSON.stringify(input.slice(0, 200))}`);
          return;
        }
        codes.set(res.error.code, (codes.get(res.error.code) ?? 0) + 1);
      }
    }
    t.ok(Date.now() - start < 20_000, "no input is slow");
    t.ok(
      ok > 0 && codes.size >= 2,
      `some inputs parse (${ok}), the rest fail with typed codes (${[...codes].map(([k, v]) => `${k}:${v}`).join(", ")})`,
    );
  });
}

t.test("entity expansion and DOCTYPE are refused", async (t) => {
  const bomb = `<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><domaincheckpoint><name>&lol2;</name></domaincheckpoint>`;
  t.match(checkpointDefParse(bomb)._unsafeUnwrapErr(), { code: "xml-malformed", message: /DOCTYPE/ });
  const ext = `<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><domainbackup><incremental>&e;</incremental></domainbackup>`;
  t.match(backupDefParse(ext)._unsafeUnwrapErr(), { code: "xml-malformed" });
  t.match(backupDefParse(`<domainbackup>${"<x>".repeat(100000)}</domainbackup>`)._unsafeUnwrapErr(), { code: "xml-malformed" });
});

t.test("QMP reader: random bytes never throw", async (t) => {
  const r = rng(42);
  for (let i = 0; i < 3000; i++) {
    const len = Math.floor(r() * 200);
    let s = "";
    for (let k = 0; k < len; k++) s += String.fromCharCode(Math.floor(r() * 256));
    const lines = new LineSplitter(4096).push(s);
    if (lines.isErr()) continue;
    for (const l of lines.value) {
      try {
        parseInbound(l);
      } catch (e) {
        t.fail(`parseInbound threw on ${JSON.stringify(l)}: ${(e as Error).message}`);
        return;
      }
    }
  }
  t.pass("3,000 random chunks parsed or refused");
});

t.test("QMP client: a fake peer answering with mutated replies closes cleanly every time", async (t) => {
  const r = rng(7);
  const good = '{"return": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "id": "ID"}\r\n';
  const outcomes = new Map<string, number>();
  for (let i = 0; i < 40; i++) {
    const peer = await startFakeQmp(t, (cmd, p) => p.write(mutate(good.replace("ID", cmd.id), r)));
    const c = (await QmpClient.connect({ path: peer.path }, { logger: silentLogger, commandTimeoutMs: 50 }))._unsafeUnwrap();
    const res = await c.execute("query-version");
    const outcome = res.isOk() ? "ok" : res.error.code;
    outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);
    // a mutated reply may still be a valid one; otherwise a typed error
    if (res.isErr()) t.ok(["protocol", "disconnected", "timeout", "command"].includes(res.error.code), res.error.code);
    // a reply the client could not take closes the connection at once, with a reason
    if (outcome === "protocol" || outcome === "disconnected") {
      t.equal(c.runstate, "idle", `run ${i}: closed after ${outcome}`);
      t.match(await c.closed, { cause: /^(protocol|peer)$/ }, `run ${i}: closed for a reason`);
    }
    // closing: within a bounded time, to idle, nothing left pending, later commands refused at once
    let timer: NodeJS.Timeout | undefined;
    const closed = await Promise.race([c.close(), new Promise((res) => (timer = setTimeout(() => res("hung"), 2000)))]);
    clearTimeout(timer);
    t.not(closed, "hung", `run ${i}: close() returns`);
    t.equal(c.runstate, "idle", `run ${i}: idle after close`);
    t.equal(c.inFlight, 0, `run ${i}: nothing in flight`);
    t.match((await c.execute("query-status"))._unsafeUnwrapErr(), { code: /^(disconnected|state)$/ }, `run ${i}: refused after close`);
  }
  // the runs took the paths that need a clean close: a broken reply (the client closes) and a lost one (timeout)
  t.ok((outcomes.get("disconnected") ?? 0) > 0 && (outcomes.get("timeout") ?? 0) > 0, `outcomes: ${[...outcomes]}`);
});
