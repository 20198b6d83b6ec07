"""TOML -> :class:`~ddk_fast.config.run.RunConfig`: type checks, ``--set`` overrides, the resolved-config dump
and the README's config reference (``python -m ddk_fast.config``).

Every error is a :class:`~ddk_fast.errors.ConfigError` naming the key path, the value and what was expected
(``[train] lr: expected a number > 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError
from .run import RunConfig, cross_checks

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# ----------------------------------------------------------------------------------------------- parsing
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of ({_type_name(inner)})"
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        dict: "a table",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp, value, path: str):
    """Check ``value`` against type ``tp``; return it (ints widen to float). Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(path, value, _type_name(tp))
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, value, _type_name(tp))
        return [_coerce(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(path, value, "a table")
        return _build(tp, value, path)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }.get(tp)
    if not ok:
        raise ConfigError(path, value, _type_name(tp))
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(path, value, "a finite number")
    return value


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"{prefix}.{key}" if prefix else key,
                raw[key],
                f"no such key (known keys: {known})" if prefix else f"a section ({known})",
            )
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            continue
        value = _coerce(hints[name], raw[name], path)
        check, expected = f.metadata.get("check"), f.metadata.get("expected")
        if check is not None and not check(value):
            raise ConfigError(path, raw[name], expected)
        kwargs[name] = value
    return cls(**kwargs)


def build_config(raw: dict, check_paths: bool = True) -> RunConfig:
    """Validate a raw dict (parsed TOML) into a :class:`RunConfig`. Raises ConfigError."""
    cfg = _build(RunConfig, raw, "")
    cross_checks(cfg, check_paths)
    return cfg


# ----------------------------------------------------------------------------------------------- overrides
_OVERRIDE_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")
_OVERRIDE_EXPECTED = "section.key=value (e.g. loss.temperature=2 or data.domains[0].weight=3)"


def parse_override(spec: str) -> tuple[list[str | int], Any]:
    """``"loss.temperature=2"`` -> (["loss", "temperature"], 2.0); ``data.domains[1].weight=3``."""
    if "=" not in spec:
        raise ConfigError("--set", spec, _OVERRIDE_EXPECTED)
    key, text = spec.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare strings need no quotes: --set output.dir=runs/x
    path: list[str | int] = []
    for part in key.strip().split("."):
        m = _OVERRIDE_PART.match(part.strip())
        if m is None:
            raise ConfigError("--set", spec, _OVERRIDE_EXPECTED, f"{part!r} is not a key or key[index]")
        path.append(m.group(1))
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    if len(path) < 2:
        raise ConfigError("--set", spec, _OVERRIDE_EXPECTED, "a key inside a section")
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for spec in overrides:
        path, value = parse_override(spec)
        node: Any = raw
        for depth, k in enumerate(path):
            last = depth == len(path) - 1
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[: depth + 1])[1:]
            if isinstance(k, int):
                if not isinstance(node, list) or not 0 <= k < len(node):
                    raise ConfigError(
                        "--set", spec, "an index of an existing list entry", f"{where} is not one"
                    )
            elif not isinstance(node, dict):
                raise ConfigError(
                    "--set", spec, "a path through tables", f"{where}: the part before it is not a table"
                )
            if last:
                node[k] = value
            elif isinstance(k, int):
                node = node[k]
            else:
                node = node.setdefault(k, {})
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", str(path), "an existing TOML file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), f"valid TOML ({exc})") from None
    return build_config(apply_overrides(raw, overrides or []), check_paths=check_paths)


def dump_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (written into the run directory)."""
    out: list[str] = []
    d = cfg.to_dict()
    for section, values in d.items():
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        arrays = {k: v for k, v in values.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        out.append(f"[{section}]")
        for k, v in values.items():
            if k not in tables and k not in arrays:
                out.append(f"{k} = {_toml_value(v)}")
        for k, v in tables.items():
            out.append(f"\n[{section}.{k}]")
            out.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())
        for k, items in arrays.items():
            for item in items:
                out.append(f"\n[[{section}.{k}]]")
                out.extend(f"{kk} = {_toml_value(vv)}" for kk, vv in item.items())
        out.append("")
    return "\n".join(out)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def reference_markdown() -> str:
    """Every key with its type, default and meaning, for the README."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(RunConfig)
    for section, cls in hints.items():
        sect_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = sect_hints[f.name]
            if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                inner = typing.get_args(tp)[0]
                inner_hints = typing.get_type_hints(inner)
                for g in dataclasses.fields(inner):
                    lines.append(_ref_row(f"[[{section}.{f.name}]] {g.name}", inner_hints[g.name], g))
                continue
            lines.append(_ref_row(f"[{section}] {f.name}", tp, f))
    return "\n".join(lines)


def _ref_row(key: str, tp, f) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    doc = f.metadata.get("doc", "")
    if f.metadata.get("expected"):
        doc += f" ({f.metadata['expected']})"
    return f"| `{key}` | {_type_name(tp)} | `{_toml_value(default)}` | {doc} |"
