/** <domainbackup> against libvirt's own fixtures and schema. */
import { readdirSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { backupDefAlign, backupDefFormat, backupDefParse } from "../../src/conf/backup.js";
import { fixture, LIBVIRT_XML, relaxngValidate } from "../helpers/xml.js";

// libvirt's domainbackupxml2xmltest aligns against a test domain whose disks
// are the ones each input names plus 'vdextradisk', with default target files
// "<source>.SUFFIX" under /fake. Those two facts come from libvirt's domain
// definition; we pass them in. Everything else is reproduced as is.
const files = readdirSync(join(LIBVIRT_XML, "domainbackupxml2xmlin"));
const defaultFile = (d: string) => `/fake/${d}.qcow2.SUFFIX`;

function domainDisksOf(xml: string): string[] {
  return [...[...xml.matchAll(/<disk name='([^']+)'/g)].map((m) => m[1]!), "vdextradisk"];
}

t.test("every input fixture parses; in → align → format reproduces out", async (t) => {
  for (const f of files) {
    const internal = f.includes("-internal-");
    const input = fixture("domainbackupxml2xmlin", f);
    const def = backupDefParse(input, { internal })._unsafeUnwrap();
    const disks = f === "empty.xml" ? ["vdextradisk"] : domainDisksOf(input);
    const aligned = backupDefAlign(def, disks, { defaultFile })._unsafeUnwrap();
    t.equal(backupDefFormat(aligned, { internal }), fixture("domainbackupxml2xmlout", f), f);
  }
});

t.test("the internal status format is refused as public input", async (t) => {
  const r = backupDefParse(fixture("domainbackupxml2xmlin", "backup-pull-internal-invalid.xml"));
  t.match(r._unsafeUnwrapErr(), { code: "xml-invalid", message: /unexpected (attribute 'state'|element <privateData>)/ });
});

t.test("schema: our output validates, except libvirt's internal format and the newer fd transport", async (t) => {
  const outs = files.map((f) => {
    const internal = f.includes("-internal-");
    const input = fixture("domainbackupxml2xmlin", f);
    const disks = f === "empty.xml" ? ["vdextradisk"] : domainDisksOf(input);
    return backupDefFormat(backupDefAlign(backupDefParse(input, { internal })._unsafeUnwrap(), disks, { defaultFile })._unsafeUnwrap(), {
      internal,
    });
  });
  const results = await relaxngValidate("domainbackup", outs);
  for (const [i, f] of files.entries()) {
    // backup-pull-fd.xml is newer than the schema copy (see ../shared/libvirt-xml/README.md)
    if (f.includes("-invalid") || f === "backup-pull-fd.xml") t.ok(results[i], `${f} does not validate, as upstream intends`);
    else t.equal(results[i], undefined, `${f} validates`);
  }
});

t.test("bad input: clear errors", async (t) => {
  const cases: [string, RegExp][] = [
    ["<domainbackup mode='sideways'/>", /must be 'push' or 'pull'/],
    ["<domainbackup><server name='x'/></domainbackup>", /push backup takes no <server>/],
    ["<domainbackup mode='pull'><server transport='unix'/></domainbackup>", /needs a socket/],
    ["<domainbackup mode='pull'><server transport='unix' socket='rel/path'/></domainbackup>", /absolute path/],
    ["<domainbackup mode='pull'><server name='h' port='70000'/></domainbackup>", /not a TCP port/],
    ["<domainbackup mode='pull'><server transport='udp' name='h'/></domainbackup>", /not one of tcp, unix, fd/],
    ["<domainbackup><disks><disk name='vda' backup='no' type='file'/></disks></domainbackup>", /backup='no' and takes no other/],
    ["<domainbackup><disks><disk name='vda' backupmode='full' incremental='c'/></disks></domainbackup>", /takes no incremental/],
    ["<domainbackup><disks><disk name='vda' exportname='x'/></disks></domainbackup>", /for pull backups/],
    ["<domainbackup><disks><disk name='vda'><target file='relative'/></disk></disks></domainbackup>", /absolute path/],
    ["<domainbackup><disks><disk name='vda'><scratch file='/x'/></disk></disks></domainbackup>", /unexpected element <scratch>/],
    ["<domainbackup mode='pull'><disks><disk name='vda'><driver type='raw'/></disk></disks></domainbackup>", /scratch must be qcow2/],
    ["<domainbackup><disks><disk name='../vda'/></disks></domainbackup>", /must not start with '\.'/],
    ["<domainbackup><incremental>a/b</incremental></domainbackup>", /must not contain '\/'/],
    ["<domainbackup><disks/></domainbackup>", /at least one <disk>/],
    [
      `<domainbackup><disks>${Array.from({ length: 300 }, (_, i) => `<disk name='vd${i}'/>`).join("")}</disks></domainbackup>`,
      /more than 256 disks/,
    ],
  ];
  for (const [xml, re] of cases) {
    const r = backupDefParse(xml);
    t.ok(r.isErr(), xml);
    if (r.isErr()) t.match(r.error.message, re, xml);
  }
});

t.test("alignment", async (t) => {
  const def = backupDefParse(
    "<domainbackup><incremental>c1</incremental><disks><disk name='vdb' backupmode='full'/></disks></domainbackup>",
  )._unsafeUnwrap();
  const a = backupDefAlign(def, ["vda", "vdb"], { defaultFile: (d) => `/b/${d}.qcow2` })._unsafeUnwrap();
  t.same(a.disks, [
    { name: "vdb", backup: true, type: "file", backupmode: "full", store: { extra: [], file: "/b/vdb.qcow2" } },
    { name: "vda", backup: false },
  ]);
  t.match(backupDefAlign(def, ["vda"], { defaultFile })._unsafeUnwrapErr(), { code: "unknown-disk", message: /vdb/ });
  const noCp = backupDefParse("<domainbackup><disks><disk name='vda' backupmode='incremental'/></disks></domainbackup>")._unsafeUnwrap();
  t.match(backupDefAlign(noCp, ["vda"], { defaultFile })._unsafeUnwrapErr(), { message: /no checkpoint is given/ });
});
