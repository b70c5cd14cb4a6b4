"""The Run page's settings <-> URL query parameters (the "share a link" contract).

Only ``model, batch, accum, precision, ckpt, k, optimizer, steps`` travel in a link. A value
that does not parse or that BenchConfig rejects is dropped with a warning, so a mistyped or
stale link opens the page with the default instead of an error page. ``model`` must name a
built-in preset: a link is untrusted input and must never make the app import a module.
"""
from __future__ import annotations

from typing import Mapping

from engine import models
from engine.config import BenchConfig, ConfigError

QUERY_FIELDS = ("model", "batch", "accum", "precision", "ckpt", "k", "optimizer", "steps")
DEFAULTS = {name: getattr(BenchConfig(), name) for name in QUERY_FIELDS}
_INT_FIELDS = {"batch", "accum", "k", "steps"}


def _parse(name: str, raw: str):
    """The typed value of one parameter; raises ValueError or ConfigError when it is invalid."""
    if name == "model" and raw not in models.PRESETS:
        # Checked before BenchConfig sees it: BenchConfig would import a module:function.
        raise ValueError(f"not a built-in model; a link can only name one of {', '.join(models.PRESETS)}")
    value = raw
    if name in _INT_FIELDS:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("not a whole number") from None
    BenchConfig(**{name: value})  # the engine's own validation and message
    return value


def parse_query_params(params: Mapping[str, str | list[str]]) -> tuple[dict, list[str]]:
    """Valid settings found in ``params`` and one warning per invalid one (others are ignored)."""
    settings, warnings = {}, []
    for name in QUERY_FIELDS:
        if name not in params:
            continue
        raw = params[name]
        raw = raw[-1] if isinstance(raw, list) else raw  # a repeated parameter: the last wins
        try:
            settings[name] = _parse(name, raw)
        except ConfigError as exc:
            warnings.append(f"Link parameter {name}={raw!r} ignored (allowed: {exc.allowed}); using {DEFAULTS[name]!r}.")
        except ValueError as exc:
            warnings.append(f"Link parameter {name}={raw!r} ignored ({exc}); using {DEFAULTS[name]!r}.")
    return settings, warnings


def to_query_params(settings: Mapping) -> dict[str, str]:
    """The query parameters for ``settings`` (a user's module:function model is never put in a link)."""
    params = {name: str(settings[name]) for name in QUERY_FIELDS if name in settings}
    if params.get("model") not in models.PRESETS:
        params.pop("model", None)
    return params
