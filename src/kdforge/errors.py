"""The project's exceptions. Each carries the exit code the CLI maps it to (see SPEC "Exit codes").

0 done · 1 unexpected failure · 2 bad usage, config or input · 3 budget exhausted (resumable) ·
4 teacher refused us (auth, permission, unknown model) · 130 interrupted (state saved, resumable).
"""

from __future__ import annotations


class KdforgeError(Exception):
    """Base class: a failure we understand, with a message that says what to do next."""

    exit_code = 1


class UsageError(KdforgeError):
    """Bad usage, config or input. The message names the field, file or line."""

    exit_code = 2


class ConfigError(UsageError):
    """One or more config problems, collected and raised once.

    `problems` is a list of (field, message) pairs; str() renders one line per problem.
    """

    def __init__(self, problems: list[tuple[str, str]] | str, source: str | None = None):
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems = list(problems)
        self.source = source
        head = f"{len(self.problems)} config problem(s)" + (f" in {source}" if source else "")
        lines = [f"  - {f}: {m}" if f else f"  - {m}" for f, m in self.problems]
        super().__init__(head + ":\n" + "\n".join(lines))


class DataError(UsageError):
    """An unusable input record. Names the file and line (1-based) and what was wrong."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(where + message)


class BudgetExceededError(KdforgeError):
    """The budget is exhausted: dispatching stopped, state saved; re-run with a larger budget to go on."""

    exit_code = 3


class TeacherRefusedError(KdforgeError):
    """The teacher refused us (401/403/unknown model): nothing retried, nothing written wrongly."""

    exit_code = 4


class Interrupted(KdforgeError):
    """SIGINT/SIGTERM: state saved, resumable."""

    exit_code = 130
