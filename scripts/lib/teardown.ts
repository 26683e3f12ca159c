/** A teardown list for scripts that reuse the test harness outside tap. */
export class Cleanup {
  private readonly fns: (() => unknown)[] = [];
  teardown(fn: () => unknown): void {
    this.fns.push(fn);
  }
  async run(): Promise<void> {
    for (const fn of this.fns.reverse()) {
      try {
        await fn();
      } catch {
        // best effort: a cleanup failure must not hide the others
      }
    }
  }
}
