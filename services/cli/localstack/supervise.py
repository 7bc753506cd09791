"""supervisord as the local stack runs it: a program that dies is respawned at once.

supervisord reaps a dead child after its poll and respawns it on the next turn of its loop,
after another poll that nothing wakes for up to a second: every program killed with -9 came
back 1.0 s after its death (measured: serving, 3 kills of 3). Here the process groups take
their transitions (EXITED -> STARTING for an autorestart program) right after the reaping.
Everything else is supervisord as shipped, started through its own ``main``.

    python -m services.cli.localstack.supervise -c supervisord.conf
"""

from __future__ import annotations

from supervisor import supervisord


class PromptSupervisor(supervisord.Supervisor):
    def reap(self, once: bool = False, recursionguard: int = 0) -> None:
        super().reap(once=once, recursionguard=recursionguard)
        if recursionguard == 0:  # the outermost call, once every child is reaped
            for group in self.process_groups.values():
                group.transition()  # respects supervisord's mood: nothing starts on shutdown


def main() -> None:
    supervisord.Supervisor = PromptSupervisor  # what supervisord.go() instantiates
    supervisord.main()


if __name__ == "__main__":
    main()
