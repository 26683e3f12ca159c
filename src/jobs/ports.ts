/** A free TCP port on a host, for NBD servers whose port the caller left open (as libvirt picks one). */
import net from "node:net";

export function freeTcpPort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, host, () => {
      const a = srv.address();
      const port = typeof a === "object" && a !== null ? a.port : 0;
      srv.close(() => resolve(port));
    });
  });
}
