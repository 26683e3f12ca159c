/**
 * The qemu-img commands a backup set runs, each as its own process with an
 * argument vector (execFile: never a shell, so no file name is ever parsed
 * as anything but a name). Every image is opened with its format given
 * (`-f qcow2`, `-F qcow2`): qemu-img never probes a format, which would let
 * the contents of an image decide how it is read.
 *
 * What this module must never do: decide which files to touch (the set's
 * modules do, from names its manifest checked).
 */
import { execFile } from "node:child_process";
import { errAsync, okAsync, ResultAsync } from "neverthrow";
import type { SetError } from "./errors.js";

export interface QemuImgOptions {
  /** The qemu-img binary (default: qemu-img on PATH). */
  readonly binary?: string | undefined;
}

function run(bin: string, args: readonly string[], cwd?: string): ResultAsync<string, SetError> {
  return ResultAsync.fromPromise(
    new Promise<string>((resolve, reject) => {
      execFile(bin, args, { maxBuffer: 64 << 20, encoding: "utf8", ...(cwd !== undefined ? { cwd } : {}) }, (e, stdout, stderr) => {
        if (e === null) resolve(stdout);
        else {
          const why = (stderr || stdout || e.message).trim().split("\n").slice(-3).join("; ");
          reject(new Error(`qemu-img ${args[0]}: ${why}`));
        }
      });
    }),
    (e): SetError => ({ code: "image", message: (e as Error).message }),
  );
}

export interface ImageInfo {
  readonly virtualSize: number;
  readonly actualSize: number;
  /** The backing link as written in the image (relative or absolute), if any. */
  readonly backing: string | undefined;
  readonly backingFormat: string | undefined;
}

export interface CheckResult {
  readonly corruptions: number;
  readonly leaks: number;
  /** qemu-img's own words when it found something, or could not check. */
  readonly message: string | undefined;
}

export class QemuImg {
  private readonly bin: string;
  constructor(opts: QemuImgOptions = {}) {
    this.bin = opts.binary ?? "qemu-img";
  }

  /** One image, not its chain (its backing file is not opened). */
  info(file: string): ResultAsync<ImageInfo, SetError> {
    return run(this.bin, ["info", "--output=json", "-f", "qcow2", file]).andThen((out) => {
      let j: Record<string, unknown>;
      try {
        j = JSON.parse(out) as Record<string, unknown>;
      } catch {
        return errAsync<ImageInfo, SetError>({ code: "image", message: `qemu-img info ${file}: not JSON` });
      }
      return okAsync<ImageInfo, SetError>({
        virtualSize: Number(j["virtual-size"] ?? 0),
        actualSize: Number(j["actual-size"] ?? 0),
        backing: typeof j["backing-filename"] === "string" ? (j["backing-filename"] as string) : undefined,
        backingFormat: typeof j["backing-filename-format"] === "string" ? (j["backing-filename-format"] as string) : undefined,
      });
    });
  }

  /**
   * `qemu-img check` of the image's own metadata. Exit 1 means corruptions,
   * 2 leaks only, 3 an error while checking (qemu-img(1)); all answer with
   * JSON when it could read the image at all.
   */
  check(file: string): ResultAsync<CheckResult, SetError> {
    return ResultAsync.fromSafePromise(
      new Promise<CheckResult>((resolve) => {
        execFile(
          this.bin,
          ["check", "--output=json", "-f", "qcow2", file],
          { encoding: "utf8", maxBuffer: 64 << 20 },
          (e, stdout, stderr) => {
            try {
              const j = JSON.parse(stdout) as { corruptions?: number; leaks?: number; "check-errors"?: number };
              const corruptions = (j.corruptions ?? 0) + (j["check-errors"] ?? 0);
              const leaks = j.leaks ?? 0;
              resolve({
                corruptions,
                leaks,
                message: corruptions > 0 ? `qemu-img check: ${corruptions} corruption(s) or check error(s)` : undefined,
              });
            } catch {
              resolve({
                corruptions: 1,
                leaks: 0,
                message: `qemu-img check: ${(stderr || e?.message || "no answer").trim().split("\n").slice(-2).join("; ")}`,
              });
            }
          },
        );
      }),
    );
  }

  /** Write `link` as the image's backing link without reading either image's data (the data is already right). */
  rebaseUnsafe(file: string, link: string): ResultAsync<void, SetError> {
    return run(this.bin, ["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", link, file]).map(() => undefined);
  }

  /** Write the view of `top` into `base` (an image below it); `top` itself is left as it is (-d), so rerunning is harmless. */
  commit(base: string, top: string): ResultAsync<void, SetError> {
    return run(this.bin, ["commit", "-q", "-d", "-f", "qcow2", "-b", base, top]).map(() => undefined);
  }

  /** A new qcow2 of `size` bytes at `file` (which exists, empty, created by the caller). */
  create(file: string, size: number): ResultAsync<void, SetError> {
    return run(this.bin, ["create", "-q", "-f", "qcow2", file, String(size)]).map(() => undefined);
  }

  /**
   * Copy the chain's view at `top` into `out`, which exists and reads as
   * zeros (a fresh file the caller made): -n writes into it as it is, and
   * --target-is-zero skips the zeros (as a convert that creates its target
   * does). Direct I/O is not asked for: the caller flushes.
   */
  convertInto(top: string, out: string, format: "raw" | "qcow2"): ResultAsync<void, SetError> {
    return run(this.bin, ["convert", "-n", "--target-is-zero", "-f", "qcow2", "-O", format, top, out]).map(() => undefined);
  }
}
