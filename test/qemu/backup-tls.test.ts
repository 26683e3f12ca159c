/** Pull over NBD with TLS: x509 credentials from tlsDir, a reader that verifies the server. */
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { jobManager, leftovers, testDomain } from "../helpers/domain.js";
import { execFileP, tempDir } from "../helpers/qemu.js";

/** A throwaway CA and server certificate for localhost, as QEMU's tls-creds-x509 expects them. */
function makeCerts(dir: string): { server: string; client: string } {
  const server = join(dir, "server");
  const client = join(dir, "client");
  mkdirSync(server);
  mkdirSync(client);
  const ossl = (...args: string[]) => execFileSync("openssl", args, { cwd: dir, stdio: "ignore" });
  ossl(
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-keyout",
    "ca-key.pem",
    "-out",
    join(server, "ca-cert.pem"),
    "-days",
    "2",
    "-subj",
    "/CN=qbackupd test CA",
  );
  ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", join(server, "server-key.pem"), "-out", "server.csr", "-subj", "/CN=localhost");
  writeFileSync(
    join(dir, "ext.cnf"),
    "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
  );
  ossl(
    "x509",
    "-req",
    "-in",
    "server.csr",
    "-CA",
    join(server, "ca-cert.pem"),
    "-CAkey",
    "ca-key.pem",
    "-CAcreateserial",
    "-out",
    join(server, "server-cert.pem"),
    "-days",
    "2",
    "-extfile",
    "ext.cnf",
  );
  execFileSync("cp", [join(server, "ca-cert.pem"), join(client, "ca-cert.pem")]);
  return { server, client };
}

t.test("pull over TCP with TLS", async (t) => {
  const certs = makeCerts(tempDir(t));
  const d = await testDomain(t, "vm1", [{ size: "16M" }]);
  await d.vm.write(0, 0x5c, 0, 1 << 20);
  const jm = jobManager(d.backupDir, { tlsDir: certs.server });
  const info = (
    await jm.begin(d.domain, "<domainbackup mode='pull'><server name='localhost' tls='yes'/></domainbackup>", undefined)
  )._unsafeUnwrap();
  const port = /nbd:\/\/localhost:(\d+)/.exec(info.nbd ?? "")?.[1];
  t.ok(port, `served at ${info.nbd}`);
  t.match((await jm.xml("vm1"))._unsafeUnwrap(), /<server transport='tcp' tls='yes' name='localhost' port='\d+'\/>/);
  // a reader with the CA reads the data over TLS
  const uri = `nbds://localhost:${port}/vda?tls-certificates=${certs.client}`;
  const r = await execFileP("nbdinfo", ["--size", uri]);
  t.equal(r.stdout.trim(), String(16 << 20));
  const copy = join(d.vm.dir, "tls.raw");
  await execFileP("nbdcopy", [uri, copy]);
  const check = await execFileP("qemu-io", ["-f", "raw", "-c", "read -P 0x5c 0 1M", copy]);
  t.notMatch(check.stdout, /failed/);
  // and one without TLS is refused
  const plain = await execFileP("nbdinfo", ["--size", `nbd://localhost:${port}/vda`]).then(
    () => "accepted",
    () => "refused",
  );
  t.equal(plain, "refused", "plain-text clients are refused");
  (await jm.end("vm1"))._unsafeUnwrap();
  t.same(await leftovers(d.client), []);
  const objs = (await d.client.executeRaw("qom-list", { path: "/objects" }))._unsafeUnwrap() as { name: string }[];
  t.notOk(
    objs.some((o) => o.name.startsWith("qbk-tls")),
    "TLS credentials object removed",
  );
});
