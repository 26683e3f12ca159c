/**
 * Line framing for QMP and the guest agent: turns arbitrary socket chunks
 * into complete lines. Pure and synchronous; it knows nothing of JSON.
 *
 * QEMU ends every message with "\r\n"; we split on "\n" and drop a trailing
 * "\r". A partial line longer than `maxLineBytes` is a protocol error: a peer
 * that never sends a newline must not make us buffer without bound.
 */
import { err, ok, type Result } from "neverthrow";

export interface LineTooLong {
  readonly code: "line-too-long";
  readonly limit: number;
  readonly length: number;
}

export class LineSplitter {
  private partial = "";

  constructor(readonly maxLineBytes: number) {}

  /** Feed one chunk; returns the complete lines it finished, in order. */
  push(chunk: string): Result<string[], LineTooLong> {
    const lines: string[] = [];
    let start = 0;
    let nl = chunk.indexOf("\n");
    while (nl !== -1) {
      let line = this.partial + chunk.slice(start, nl);
      this.partial = "";
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line.length > this.maxLineBytes) {
        return err({ code: "line-too-long", limit: this.maxLineBytes, length: line.length });
      }
      if (line.length > 0) lines.push(line);
      start = nl + 1;
      nl = chunk.indexOf("\n", start);
    }
    this.partial += chunk.slice(start);
    if (this.partial.length > this.maxLineBytes) {
      return err({ code: "line-too-long", limit: this.maxLineBytes, length: this.partial.length });
    }
    return ok(lines);
  }

  /** Bytes received after the last newline (a peer that closed mid-line). */
  get pending(): number {
    return this.partial.length;
  }
}
