/**
 * XML escaping, on its own: the CLI needs it to build a checkpoint XML, and
 * importing the parser (fast-xml-parser) for it would add ~0.13 s to every
 * CLI start here.
 */
export function escapeText(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

export function escapeAttr(s: string): string {
  return escapeText(s).replace(/'/g, "&apos;").replace(/"/g, "&quot;");
}
