/**
 * Sizes as people write them and as virsh prints them. Parsing and
 * formatting only; never talks to the daemon.
 */
import { err, ok, type Result } from "neverthrow";

const POWERS: Record<string, number> = { "": 0, K: 1, M: 2, G: 3, T: 4, P: 5, E: 6 };

/**
 * "65536", "64K", "100M", "1.5GiB", "2 MiB", "10MB": bytes. As virsh's
 * scaled integers, K/M/G… and KiB/MiB/GiB… are powers of 1024; KB/MB/GB… are
 * powers of 1000. A trailing "/s" is allowed (rates).
 */
export function sizeParse(text: string): Result<number, { code: "usage"; message: string }> {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(?:([kmgtpe])(i?b)?|(b))?\s*(?:\/s)?\s*$/i.exec(text);
  const bad = err({ code: "usage" as const, message: `'${text}' is not a size (bytes, or a number with a unit: 64K, 100M, 1.5GiB, 10MB)` });
  if (m === null) return bad;
  const n = Number(m[1]);
  const letter = (m[2] ?? "").toUpperCase();
  const base = m[3]?.toLowerCase() === "b" ? 1000 : 1024;
  const bytes = Math.round(n * base ** POWERS[letter]!);
  if (!Number.isSafeInteger(bytes)) return bad;
  if (letter === "" && !Number.isInteger(n)) return bad;
  return ok(bytes);
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/** virsh's vshPrettyCapacity with "%.3lf %s": the largest 1024-power unit below the value. */
export function sizeFormat(bytes: number): string {
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(3)} ${UNITS[i]}`;
}
