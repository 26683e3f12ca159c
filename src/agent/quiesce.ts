/**
 * Run an action with the guest's filesystems frozen through the guest agent,
 * and always thaw afterwards, also when the action fails. A failed thaw is
 * logged as an error (the guest stays frozen until someone thaws it), but it
 * does not undo an action that succeeded.
 *
 * Only our own freeze is thawed: when the freeze call fails there is nothing
 * of ours to undo. qemu-ga rolls back a freeze that fails part-way itself, and
 * the usual failure, "the agent is in frozen state", means another client
 * froze the guest: thawing then would end that client's freeze under it.
 * A freeze that timed out is ours though (qemu-ga had it), and may complete
 * later: it is thawed over a new connection.
 */
import { errAsync, ResultAsync } from "neverthrow";
import type { Logger } from "../log.js";
import { type AgentError, GuestAgentClient } from "./client.js";

export type QuiesceError<E> = { readonly stage: "freeze"; readonly error: AgentError } | { readonly stage: "action"; readonly error: E };

export function withFrozenGuest<T, E>(
  agentPath: string | undefined,
  log: Logger,
  action: () => ResultAsync<T, E>,
  opts: { readonly freezeTimeoutMs?: number } = {},
): ResultAsync<T, QuiesceError<E>> {
  if (agentPath === undefined) {
    return errAsync({
      stage: "freeze",
      error: { code: "agent-unavailable", message: "quiesce needs a guest agent, and none is configured for this domain" },
    });
  }
  return GuestAgentClient.connect(agentPath)
    .mapErr((error): QuiesceError<E> => ({ stage: "freeze", error }))
    .andThen((agent) =>
      agent
        .freeze(opts.freezeTimeoutMs)
        .orElse((error) => {
          if (error.code !== "agent-timeout") return errAsync<number, QuiesceError<E>>({ stage: "freeze", error });
          // Our freeze reached qemu-ga (the sync before it was answered) and may
          // still complete: it is ours, so undo it over a new connection (the
          // timed-out one is closed) rather than leave the guest frozen.
          agent.close();
          return ResultAsync.fromSafePromise(thawAfterTimeout(agentPath, log)).andThen(() =>
            errAsync<number, QuiesceError<E>>({ stage: "freeze", error }),
          );
        })
        .andThen(() =>
          ResultAsync.fromSafePromise(
            (async () => {
              const result = await action();
              const thawed = await agent.thaw();
              if (thawed.isErr())
                log.error({ agentError: thawed.error }, "guest filesystems could not be thawed; the guest may stay frozen");
              agent.close();
              return result;
            })(),
          ).andThen((r) => r.mapErr((error): QuiesceError<E> => ({ stage: "action", error }))),
        )
        .mapErr((e) => {
          agent.close();
          return e;
        }),
    );
}

/** Thaw after our own freeze timed out: once the agent answers again, thaw whatever that freeze did. */
async function thawAfterTimeout(agentPath: string, log: Logger): Promise<void> {
  const r = await GuestAgentClient.connect(agentPath, 30_000).andThen((a) =>
    a.thaw().map((n) => {
      a.close();
      return n;
    }),
  );
  if (r.isErr()) log.error({ agentError: r.error }, "guest freeze timed out and the guest could not be thawed; it may stay frozen");
  else log.warn({ thawed: r.value }, "guest freeze timed out; thawed what it froze");
}
