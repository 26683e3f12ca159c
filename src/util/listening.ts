/**
 * Does anything accept connections at this address? A dead process leaves its
 * unix socket refusing (ECONNREFUSED) or gone (ENOENT). No answer within the
 * timeout counts as listening: something holds the address, just slowly.
 */
import net from "node:net";

export type SocketAddress = { readonly path: string } | { readonly host: string; readonly port: number };

export function listening(address: SocketAddress, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = "path" in address ? net.createConnection(address.path) : net.createConnection(address.port, address.host);
    const done = (live: boolean) => {
      clearTimeout(timer);
      sock.destroy();
      resolve(live);
    };
    const timer = setTimeout(() => done(true), timeoutMs);
    sock.once("connect", () => done(true));
    sock.once("error", () => done(false));
  });
}
