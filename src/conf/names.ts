/**
 * Naming rules shared by checkpoints, bitmaps, domains and disks. A name
 * becomes a file name in the state directory and a bitmap name in qcow2, so
 * the rules are libvirt's checkpointName pattern plus a length limit.
 */
import { createHash } from "node:crypto";
import { err, ok, type Result } from "neverthrow";
import type { ConfError } from "./errors.js";

/**
 * The one name limit, in bytes, for domains, checkpoints, disks and bitmaps;
 * checked wherever a name comes in (registration, XML, API paths). 255, the
 * file name limit of Linux file systems; a name that long cannot be a file
 * name with anything added, so every file name derived from a name goes
 * through fileStem().
 */
export const MAX_NAME_BYTES = 255;

/**
 * The longest name used as it is in file names: 200, the limit names had
 * before 255-byte names were allowed, so state and backup directories written
 * then keep their file names. The longest file name the daemon derives,
 * `.tmp-<stem>.completed.json.<12 hex>` (a job record's atomic write), adds
 * 33 bytes, a pull's scratch image `<stem>.<stamp 15>.<id 8>.scratch.qcow2`
 * 39; stems are at most 200 bytes (a hashed one 191), so every derived name
 * fits in 255.
 */
const STEM_MAX_BYTES = 200;
const STEM_KEPT = 150;
/** Not a name character: a hashed stem is never the stem of another, shorter name. */
const STEM_MARK = "+";

/**
 * The part of file names that stands for `name`: the name itself up to 200
 * bytes (every name until 255-byte names were allowed: existing state keeps
 * its file names), else its first 150 bytes, `+` and 40 hex digits of its
 * SHA-256. Names are ASCII (NAME_PATTERN), so bytes are characters. The file
 * itself keeps the whole name where one is needed (a checkpoint's XML).
 */
export function fileStem(name: string): string {
  if (Buffer.byteLength(name) <= STEM_MAX_BYTES) return name;
  return `${name.slice(0, STEM_KEPT)}${STEM_MARK}${nameHash(name)}`;
}

/** 40 hex digits of the name's SHA-256: what stands for the part of a name that is cut. */
function nameHash(name: string): string {
  return createHash("sha256").update(name).digest("hex").slice(0, 40);
}

/**
 * A name made of `prefix` and another name (a temporary bitmap named after
 * its disk, `backup-<disk>`), itself a name within MAX_NAME_BYTES, as
 * backup-dumpxml shows it and a definition given back may carry it: as it is
 * while it fits, else `prefix`, the name's first bytes, `-` and 40 hex digits
 * of its SHA-256, MAX_NAME_BYTES in all.
 */
export function derivedName(prefix: string, name: string): string {
  const whole = `${prefix}${name}`;
  if (Buffer.byteLength(whole) <= MAX_NAME_BYTES) return whole;
  const hash = nameHash(name);
  return `${prefix}${name.slice(0, MAX_NAME_BYTES - Buffer.byteLength(prefix) - hash.length - 1)}-${hash}`;
}

/** The characters a name may hold (libvirt's checkpoint name rule), as a JSON Schema / RegExp pattern. */
export const NAME_PATTERN = "^[a-zA-Z0-9_-][a-zA-Z0-9_.-]*$";

/** Check `name` against `[a-zA-Z0-9_-][a-zA-Z0-9_.-]*` and the byte limit; the error says which rule broke. */
export function checkName(name: string, what: string): Result<string, ConfError> {
  const fail = (why: string): Result<never, ConfError> => err({ code: "invalid-name", message: `${what} '${printable(name)}' ${why}` });
  if (name.length === 0) return err({ code: "invalid-name", message: `${what} must not be empty` });
  if (Buffer.byteLength(name) > MAX_NAME_BYTES) return fail(`is longer than ${MAX_NAME_BYTES} bytes`);
  if (name.startsWith(".")) return fail("must not start with '.'");
  if (name.includes("/")) return fail("must not contain '/'");
  // biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are exactly what we refuse
  if (/[\u0000-\u001f\u007f]/.test(name)) return fail("must not contain control characters");
  if (/\s/.test(name)) return fail("must not contain white space");
  if (!new RegExp(NAME_PATTERN).test(name)) return fail("may only contain letters, digits, '_', '-' and '.'");
  return ok(name);
}

/** For messages: control characters shown escaped, long names cut. */
export function printable(s: string): string {
  const shown = JSON.stringify(s).slice(1, -1);
  return shown.length > 80 ? `${shown.slice(0, 77)}...` : shown;
}
