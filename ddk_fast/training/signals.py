"""Stopping on SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before it kills a job) without
losing the work since the last checkpoint.

:class:`StopSignals` (a context manager, installed by ``python -m ddk_fast.train`` in the main thread) turns
the first SIGINT / SIGTERM into a request: the loop finishes the optimizer step it is in, writes a checkpoint
of it and raises :class:`~ddk_fast.errors.Interrupted`, which the CLI turns into a line saying where to resume
and exit code 130 / 143 (128 + the signal). Under torchrun the request is agreed over the ranks at the step's
one host sync (:func:`.nonfinite.step_flags`), so every rank stops after the same step. A second signal stops
at once: one line on stderr and ``os._exit(128 + signal)``, no checkpoint (a half-written ``step_N.tmp``
is ignored by ``--resume``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """The first SIGINT / SIGTERM sets :attr:`signum`; the second ends the process at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            print(
                f"\n{name} received: finishing the current step, then writing a checkpoint "
                f"(send {name} again to stop at once, without one)",
                file=sys.stderr,
                flush=True,
            )
            return
        print(f"\n{name} received again: stopping now, no checkpoint", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


class NoSignals:
    """The stand-in when no handler is installed (a Trainer used as a library): never requested."""

    signum = None
    requested = False
