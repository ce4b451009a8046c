"""The one exception type a user sees for bad input.

Every check that rejects a value raises :class:`ConfigError` so the CLI can print a
single line (key, value, valid choices) and exit with code 2, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration key has a value we cannot use.

    ``choices`` is either an iterable of valid values or a short description of the
    valid range (e.g. ``"a float > 0"``).
    """

    def __init__(self, key: str, value: Any, choices: Iterable[Any] | str | None = None, reason: str = ""):
        self.key = key
        self.value = value
        if choices is None or isinstance(choices, str):
            self.choices = choices
        else:
            self.choices = list(choices)
        self.reason = reason
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"bad value for '{self.key}': {self.value!r}"
        if self.reason:
            text += f" ({self.reason})"
        if self.choices is not None:
            valid = self.choices if isinstance(self.choices, str) else ", ".join(map(str, self.choices))
            text += f"; valid: {valid}"
        return text


class RunFailed(RuntimeError):
    """A run could not go on (nodes missing, a phase failed); the CLI prints it in one line, exit 1."""


class UnlearningFailed(RunFailed):
    """A method could not unlearn (a client failed or timed out, a requirement was not met): the
    request fails for that method, is logged so in the ledger, and θ* stays as it was."""
