/** Errors of the definition layer (XML and config parsing, validation, defaults). */
export type ConfError =
  /** Not well-formed XML, or refused before parsing (DOCTYPE, entities, size). */
  | { readonly code: "xml-malformed"; readonly message: string }
  /** Well-formed, but not what libvirt's schema (or our rules) accept. */
  | { readonly code: "xml-invalid"; readonly message: string }
  /** A checkpoint/disk name breaks the naming rules. */
  | { readonly code: "invalid-name"; readonly message: string }
  /** The definition names a disk the domain does not have. */
  | { readonly code: "unknown-disk"; readonly message: string }
  /** The daemon's configuration file or flags are wrong. */
  | { readonly code: "config-invalid"; readonly message: string }
  /** The disk exists but cannot take part (raw format for a bitmap, …). */
  | { readonly code: "unsupported-disk"; readonly message: string };

export type ConfErrorCode = ConfError["code"];
