"""The one exception type for problems the user can fix: a bad config, a bad input file.

The CLI turns it into one line on stderr and exit code 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserInputError(ValueError):
    """A config or input problem, reported as ``<where>: <what is wrong>; <what is allowed>``."""

    def __init__(self, where: str | Path, problem: str, allowed: str | None = None):
        self.where = str(where)
        self.problem = problem
        self.allowed = allowed
        message = f"{self.where}: {problem}"
        if allowed:
            message += f"; {allowed}"
        super().__init__(message)

    def __reduce__(self):
        # Keeps the error intact when it crosses a process pool boundary.
        return type(self), (self.where, self.problem, self.allowed)
