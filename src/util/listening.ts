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

/**
 * Whether something still listens, asked again after pauses. A process being
 * killed closes its connections and its listening socket as it exits, yet a
 * check made the moment its connection drops can still reach the listener:
 * seen 7 times in 30 with a SIGKILLed QEMU, and 0 in 30 when asked again
 * 250 ms later. Only an answer every time counts as alive.
 */
export async function stillListening(address: SocketAddress, pausesMs: readonly number[] = [250, 500]): Promise<boolean> {
  if (!(await listening(address))) return false;
  for (const ms of pausesMs) {
    await new Promise((r) => setTimeout(r, ms));
    if (!(await listening(address))) return false;
  }
  return true;
}
