"""The config field helper and the common constraints every config section uses (see ``config.py``)."""

from __future__ import annotations

import json
from dataclasses import field


def _opt(default, doc: str, check=None, expected: str | None = None, **kw):
    """A config field: default, one-line doc, an optional check ``value -> bool`` with its description."""
    meta = {"doc": doc, "check": check, "expected": expected}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


_pos = (lambda v: v > 0, "a number > 0")
_nonneg = (lambda v: v >= 0, "a number >= 0")
_unit = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
_pos_int = (lambda v: v >= 1, "an integer >= 1")
_nonneg_int = (lambda v: v >= 0, "an integer >= 0")
TEMPERATURE_RANGE = (0.05, 100.0)
