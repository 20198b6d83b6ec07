"""The errors ddk_fast raises on purpose, and the exit code ``python -m ddk_fast.train`` gives each:

* :class:`ConfigError` (exit 2): a config key, a CLI flag or an input file is wrong; the message names the
  field, the value and what was expected.
* :class:`RunError` (exit 2): the run folder, a checkpoint or the disk (:class:`CheckpointWriteError`).
* :class:`BackendUnavailableError` (exit 2): an explicitly requested backend cannot run here; says the fix.
* :class:`Interrupted` (exit 130 / 143): SIGINT or SIGTERM stopped the run after a step, with a checkpoint.
* :class:`NonFiniteError` (exit 3): training produced NaN/inf that skipping steps cannot fix:
  :class:`NonFiniteTeacherError` (the teacher's outputs), :class:`TrainingStopped` (too many non-finite steps
  in a row).
"""

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
        self.hint = hint
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


class RunError(RuntimeError):
    """A fault outside the config that the user must fix: the run folder (in use, read-only, holds another
    run), a checkpoint (none valid, written for another model), an input file, the disk. The message says
    what happened, what was kept and what to do; ``python -m ddk_fast.train`` prints it and exits with 2."""


class CheckpointWriteError(RunError, OSError):
    """Writing a checkpoint failed (disk full, read-only folder); the previous checkpoint is kept. An
    OSError too, so callers catching OSError around a save keep working."""


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf that skipping steps cannot fix; ``python -m ddk_fast.train`` exits with 3
    and the last good checkpoint is kept."""


class NonFiniteTeacherError(NonFiniteError):
    """The teacher's outputs are not finite: the fault is in the teacher (weights, dtype overflow), not in
    the student; the message names the step and the domain."""


class TrainingStopped(NonFiniteError):
    """Too many consecutive non-finite losses (``[train] max_bad_steps`` in a row); the last good checkpoint
    is kept and ``python -m ddk_fast.train`` exits with 3."""


class Interrupted(RuntimeError):
    """SIGINT / SIGTERM stopped training after the current optimizer step; a checkpoint of that step was
    written (``checkpoint``; None when no step had been trained). ``python -m ddk_fast.train`` prints where
    to resume and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, checkpoint):
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        where = (
            f"checkpoint {checkpoint} holds step {step}" if checkpoint else f"no step trained (step {step})"
        )
        super().__init__(f"interrupted by {name} after step {step}: {where}")
