/** The QMP layer's public surface. */
export * from "./capabilities.js";
export * from "./client.js";
export * from "./disks.js";
export * from "./errors.js";
export * from "./events.js";
export * from "./hmp.js";
export * from "./iothreads.js";
export type { QmpInbound, QmpTimestamp, QmpVersion } from "./messages.js";
export * from "./protocol.js";
export type * from "./qapi.js";
export * from "./reconnect.js";
