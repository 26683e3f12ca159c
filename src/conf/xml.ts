/**
 * A small, safe XML element tree over fast-xml-parser, and the writer we
 * format with. Input with a DOCTYPE or entity declarations is refused before
 * parsing (no entity expansion, no external entities); only the five
 * predefined entities and character references are decoded. Formatting
 * follows libvirt's style: two-space indent, single-quoted attributes.
 */
import { XMLParser, XMLValidator } from "fast-xml-parser";
import { err, ok, type Result } from "neverthrow";
import type { ConfError } from "./errors.js";
import { escapeAttr, escapeText } from "./escape.js";

export { escapeAttr, escapeText };

export interface XmlElement {
  readonly name: string;
  readonly attrs: Readonly<Record<string, string>>;
  readonly children: readonly XmlElement[];
  /** Concatenated (trimmed) text content. */
  readonly text: string;
}

/** Definitions are small; anything bigger is not one. */
export const MAX_XML_BYTES = 1024 * 1024;

const parser = new XMLParser({
  preserveOrder: true,
  ignoreAttributes: false,
  attributeNamePrefix: "",
  parseTagValue: false,
  parseAttributeValue: false,
  processEntities: false,
  trimValues: true,
  ignoreDeclaration: true,
  ignorePiTags: true,
});

const NAMED: Record<string, string> = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'" };

function decodeEntities(s: string): Result<string, ConfError> {
  let bad: string | undefined;
  const out = s.replace(/&(#x[0-9a-fA-F]+|#[0-9]+|[a-zA-Z]+);?/g, (m, ent: string) => {
    if (!m.endsWith(";")) {
      bad ??= m;
      return m;
    }
    if (ent.startsWith("#")) {
      const cp = ent[1] === "x" ? Number.parseInt(ent.slice(2), 16) : Number.parseInt(ent.slice(1), 10);
      if (!Number.isFinite(cp) || cp < 1 || cp > 0x10ffff) {
        bad ??= m;
        return m;
      }
      return String.fromCodePoint(cp);
    }
    const v = NAMED[ent];
    if (v === undefined) bad ??= m;
    return v ?? m;
  });
  return bad === undefined ? ok(out) : err({ code: "xml-malformed", message: `unknown or malformed entity reference ${bad}` });
}

type Ordered = Record<string, unknown>;

function convert(node: Ordered): Result<XmlElement | string | undefined, ConfError> {
  const keys = Object.keys(node).filter((k) => k !== ":@");
  const name = keys[0];
  if (name === undefined) return ok(undefined);
  if (name === "#text") return decodeEntities(String(node["#text"]));
  if (name.startsWith("#") || name.startsWith("?") || name.startsWith("!")) return ok(undefined);
  const rawAttrs = (node[":@"] ?? {}) as Record<string, unknown>;
  const attrs: Record<string, string> = {};
  for (const [k, v] of Object.entries(rawAttrs)) {
    const d = decodeEntities(String(v));
    if (d.isErr()) return err(d.error);
    attrs[k] = d.value;
  }
  const children: XmlElement[] = [];
  let text = "";
  for (const c of (node[name] ?? []) as Ordered[]) {
    const r = convert(c);
    if (r.isErr()) return r;
    if (typeof r.value === "string") text += r.value;
    else if (r.value !== undefined) children.push(r.value);
  }
  return ok({ name, attrs, children, text });
}

/** Parse a document into its root element, refusing DOCTYPE/entities and oversized input. */
export function xmlParse(xml: string): Result<XmlElement, ConfError> {
  if (Buffer.byteLength(xml) > MAX_XML_BYTES) {
    return err({ code: "xml-malformed", message: `XML document larger than ${MAX_XML_BYTES} bytes` });
  }
  if (/<!DOCTYPE/i.test(xml) || /<!ENTITY/i.test(xml)) {
    return err({ code: "xml-malformed", message: "DOCTYPE and entity declarations are not accepted" });
  }
  let valid: ReturnType<typeof XMLValidator.validate>;
  try {
    valid = XMLValidator.validate(xml);
  } catch (e) {
    return err({ code: "xml-malformed", message: `malformed XML: ${(e as Error).message}` });
  }
  if (valid !== true) {
    return err({ code: "xml-malformed", message: `malformed XML at line ${valid.err.line}, column ${valid.err.col}: ${valid.err.msg}` });
  }
  let doc: Ordered[];
  try {
    doc = parser.parse(xml) as Ordered[];
  } catch (e) {
    return err({ code: "xml-malformed", message: `malformed XML: ${(e as Error).message}` });
  }
  const roots: XmlElement[] = [];
  for (const n of doc) {
    const r = convert(n);
    if (r.isErr()) return err(r.error);
    if (typeof r.value === "string" && r.value.trim() !== "") {
      return err({ code: "xml-malformed", message: "text outside the root element" });
    }
    if (r.value !== undefined && typeof r.value !== "string") roots.push(r.value);
  }
  const root = roots[0];
  if (root === undefined || roots.length > 1) {
    return err({ code: "xml-malformed", message: "an XML document needs exactly one root element" });
  }
  return ok(root);
}

// ---- helpers for definition parsers ----

export function invalid(message: string): Result<never, ConfError> {
  return err({ code: "xml-invalid", message });
}

/** Refuse elements and attributes the schema does not allow, naming the first one found. */
export function checkAllowed(
  el: XmlElement,
  allowedChildren: readonly string[],
  allowedAttrs: readonly string[],
  where = `<${el.name}>`,
): Result<void, ConfError> {
  for (const a of Object.keys(el.attrs)) {
    if (!allowedAttrs.includes(a)) return invalid(`unexpected attribute '${a}' on ${where}`);
  }
  for (const c of el.children) {
    if (!allowedChildren.includes(c.name)) return invalid(`unexpected element <${c.name}> in ${where}`);
  }
  return ok(undefined);
}

/** The single child of that name; an error when it appears twice. */
export function onlyChild(el: XmlElement, name: string): Result<XmlElement | undefined, ConfError> {
  const found = el.children.filter((c) => c.name === name);
  if (found.length > 1) return invalid(`<${name}> appears more than once in <${el.name}>`);
  return ok(found[0]);
}

export function parseUnsignedLong(s: string, what: string): Result<number, ConfError> {
  if (!/^[0-9]+$/.test(s)) return invalid(`${what} must be a non-negative integer, got '${s}'`);
  const n = Number(s);
  if (!Number.isSafeInteger(n)) return invalid(`${what} is out of range: '${s}'`);
  return ok(n);
}

// ---- writer ----

/** Builds libvirt-style XML: two-space indent, attributes in single quotes. */
export class XmlWriter {
  private readonly lines: string[] = [];
  private depth = 0;

  private attrs(a: Readonly<Record<string, string | number | undefined>>): string {
    let s = "";
    for (const [k, v] of Object.entries(a)) if (v !== undefined) s += ` ${k}='${escapeAttr(String(v))}'`;
    return s;
  }

  open(name: string, a: Readonly<Record<string, string | number | undefined>> = {}): this {
    this.lines.push(`${"  ".repeat(this.depth)}<${name}${this.attrs(a)}>`);
    this.depth++;
    return this;
  }

  close(name: string): this {
    this.depth--;
    this.lines.push(`${"  ".repeat(this.depth)}</${name}>`);
    return this;
  }

  empty(name: string, a: Readonly<Record<string, string | number | undefined>> = {}): this {
    this.lines.push(`${"  ".repeat(this.depth)}<${name}${this.attrs(a)}/>`);
    return this;
  }

  text(name: string, value: string | number, a: Readonly<Record<string, string | number | undefined>> = {}): this {
    this.lines.push(`${"  ".repeat(this.depth)}<${name}${this.attrs(a)}>${escapeText(String(value))}</${name}>`);
    return this;
  }

  /** Write a parsed element back verbatim (opaque subtrees such as <encryption> or <seclabel>). */
  element(el: XmlElement): this {
    if (el.children.length === 0 && el.text === "") return this.empty(el.name, el.attrs);
    if (el.children.length === 0) return this.text(el.name, el.text, el.attrs);
    this.open(el.name, el.attrs);
    for (const c of el.children) this.element(c);
    return this.close(el.name);
  }

  toString(): string {
    return `${this.lines.join("\n")}\n`;
  }
}
