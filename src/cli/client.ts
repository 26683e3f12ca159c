/** The CLI's HTTP client for the daemon's unix socket. Never throws: failures are values. */
import http from "node:http";

export interface ApiReply {
  readonly status: number;
  readonly body: unknown;
  readonly text: string;
}

export type CallError = { readonly code: string; readonly message: string };

export class ApiClient {
  constructor(readonly socketPath: string) {}

  request(method: string, path: string, body?: unknown): Promise<ApiReply | CallError> {
    return new Promise((resolve) => {
      const payload = body === undefined ? undefined : JSON.stringify(body);
      const req = http.request(
        {
          socketPath: this.socketPath,
          method,
          path,
          headers: payload === undefined ? {} : { "content-type": "application/json", "content-length": Buffer.byteLength(payload) },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("end", () => {
            const text = Buffer.concat(chunks).toString("utf8");
            let parsed: unknown = text;
            if ((res.headers["content-type"] ?? "").includes("json")) {
              try {
                parsed = JSON.parse(text);
              } catch {
                parsed = text;
              }
            }
            resolve({ status: res.statusCode ?? 0, body: parsed, text });
          });
          res.on("error", (e) => resolve({ code: "unreachable", message: e.message }));
        },
      );
      req.on("error", (e: NodeJS.ErrnoException) => {
        const failed = () =>
          resolve({
            code: "unreachable",
            message: `cannot reach qbackupd at ${this.socketPath}: ${e.code === "ENOENT" ? "no such socket (is the daemon running?)" : e.message}`,
          });
        // the daemon may answer (413: body too large) and close before the body is written:
        // the write then fails, but the answer arrives a moment later and is the truth
        if (e.code === "EPIPE" || e.code === "ECONNRESET") setTimeout(failed, 500);
        else failed();
      });
      if (payload !== undefined) req.write(payload);
      req.end();
    });
  }

  /** Stream NDJSON lines until the connection ends, or for `timeoutMs` (then it ends without an error). */
  stream(path: string, onLine: (line: string) => void, timeoutMs?: number): Promise<CallError | undefined> {
    return new Promise((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      const req = http.request({ socketPath: this.socketPath, method: "GET", path }, (res) => {
        if (timeoutMs !== undefined)
          timer = setTimeout(() => {
            resolve(undefined);
            req.destroy();
          }, timeoutMs);
        let buf = "";
        res.setEncoding("utf8");
        res.on("data", (d: string) => {
          buf += d;
          let nl = buf.indexOf("\n");
          while (nl !== -1) {
            onLine(buf.slice(0, nl));
            buf = buf.slice(nl + 1);
            nl = buf.indexOf("\n");
          }
        });
        res.on("end", () => {
          clearTimeout(timer);
          resolve(undefined);
        });
        // destroyed at the timeout: already answered
        res.on("error", () => resolve(undefined));
      });
      req.on("error", (e) => resolve({ code: "unreachable", message: `cannot reach qbackupd at ${this.socketPath}: ${e.message}` }));
      req.end();
    });
  }
}

export function isCallError(x: ApiReply | CallError): x is CallError {
  return "code" in x && !("status" in x);
}
