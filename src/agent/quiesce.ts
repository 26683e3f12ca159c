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
 */
import { errAsync, ResultAsync } from "neverthrow";
import type { Logger } from "../log.js";
import { type AgentError, GuestAgentClient } from "./client.js";

export type QuiesceError<E> = { readonly stage: "freeze"; readonly error: AgentError } | { readonly stage: "action"; readonly error: E };

export function withFrozenGuest<T, E>(
  agentPath: string | undefined,
  log: Logger,
  action: () => ResultAsync<T, E>,
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
        .freeze()
        .mapErr((error): QuiesceError<E> => {
          if (error.code === "agent-timeout")
            log.error({ agentError: error }, "guest freeze timed out; if it completes later, the guest stays frozen until thawed");
          return { stage: "freeze", error };
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
