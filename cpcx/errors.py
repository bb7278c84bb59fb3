"""User-facing errors: the CLI prints the message as one clear line (no traceback) and exits with ``code``."""
from __future__ import annotations


class CpcxError(Exception):
    """An error the user can fix. The message names the file/field/thing and says how to fix it."""

    code = 1

    def __init__(self, message: str, code: int | None = None):
        from cpcx.redact import redact  # every message a user sees passes here: a key echoed back is hidden

        super().__init__(redact(message))
        if code is not None:
            self.code = code


class RecipeError(CpcxError):
    """A recipe that cannot be used; ``lines`` holds one message per problem (exit code 2)."""

    code = 2

    def __init__(self, lines: "list[str]"):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))
