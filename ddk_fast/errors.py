"""Errors raised for bad user input. Each names the field, the value and what was expected."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong.

    The message always has the form ``[section] key: expected <what>, got <value>`` so a user can find
    and fix the field without reading a traceback. ``python -m ddk_fast.train`` prints it and exits with 2.
    """

    def __init__(self, path: str, value: object, expected: str, hint: str | None = None):
        self.path = path
        self.value = value
        self.expected = expected
        msg = f"{_fmt_path(path)}: expected {expected}, got {value!r}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


def _fmt_path(path: str) -> str:
    """'loss.temperature' -> '[loss] temperature'; 'data.domains[2].files' -> '[data.domains[2]] files'."""
    if "." not in path:
        return path
    section, key = path.rsplit(".", 1)
    return f"[{section}] {key}"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend (triton, cpp) cannot run here; the message says how to fix it."""
