/**
 * fastify's per-request log lines at debug instead of info. fastify writes
 * two lines per request ("incoming request", "request completed") at info,
 * which buried the daemon's own lines (a client's `wait` wrote 16 lines in
 * 3 s). The fields and messages stay fastify's; a request that errored is
 * still logged at error. Logging only: it must never change a reply.
 */
import { type FastifyReply, type FastifyRequest, LogController } from "fastify";

export class DebugRequestLog extends LogController {
  override incomingRequest(request: FastifyRequest): void {
    if (this.isLogDisabled(request)) return;
    request.log.debug({ req: request }, "incoming request");
  }

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    if (error) {
      super.requestCompleted(error, request, reply);
      return;
    }
    if (this.isLogDisabled(request)) return;
    reply.log.debug({ res: reply, responseTime: reply.elapsedTime }, "request completed");
  }
}
