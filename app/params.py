"""The configuration <-> URL query parameters (the "share a link" contract).

Generated from the config's field declarations: every scalar field travels under its name
(``batch``, ``warmup``, ``memory_cap_gib``...) and every model dimension under its ``--set``
key (``seq_len``, ``n_layers``...), so a new field needs no edit here. A value that does not
parse, or that BenchConfig rejects, is dropped with a warning naming the parameter, the value
and what is allowed, so a mistyped or stale link opens the page with the default instead of
an error page; so is a value above this server's limits (``engine.limits``: a link must not
book a shared GPU for days with ``steps=1000000000``). ``model`` must name a built-in preset or
an ``hf:`` architecture of the table: a link is untrusted input and must never make the app
import a module.
"""
from __future__ import annotations

from typing import Mapping

from engine import limits, presets
from engine.config import (FIELDS_BY_NAME, SCALAR_FIELDS, SWEEP_FIELDS, BenchConfig, ConfigError, ConfigField,
                           parse_override, parse_override_values)
from engine.sweep import axis_dimension, dimension_axis

# Presentation mode travels as present=1.
PRESENT = "present"
# A sweep travels as sweep=batch,precision plus sweep_batch=1,2,4 and sweep_precision=fp32,bf16
# (and sweep_effective_batch=8 for a fixed effective batch); a model dimension by its --set
# key, as everywhere in a link: sweep=seq_len and sweep_seq_len=128,256,512.
SWEEP = "sweep"
SWEEP_EFFECTIVE = "sweep_effective_batch"


def sweep_param(name: str) -> str:
    """The query parameter holding the values of sweep axis ``name`` (``sweep_batch``;
    ``sweep_seq_len`` for the model dimension axis ``overrides.seq_len``)."""
    return f"{SWEEP}_{link_name(name)}"


def link_name(axis: str) -> str:
    """How sweep axis ``axis`` is named in a link: a field by its name, a model dimension by its key."""
    return axis_dimension(axis) or axis


def sweep_to_query_params(grid: Mapping[str, list], effective_batch: int | None) -> dict[str, str]:
    """The query parameters of a sweep definition (``sweep.expand``'s grid): its axes, each
    axis's values, the fixed effective batch."""
    def text(name: str, value) -> str:
        return str(value) if axis_dimension(name) is not None else FIELDS_BY_NAME[name].format(value)

    link = {SWEEP: ",".join(map(link_name, grid))} | {
        sweep_param(name): ",".join(text(name, v) for v in values) for name, values in grid.items()}
    return link | ({SWEEP_EFFECTIVE: str(effective_batch)} if effective_batch else {})


def sweep_axes(model: str) -> list[str]:
    """The sweep axes offered for ``model``: the config fields declared as axes, then each
    model dimension the model accepts (``overrides.seq_len``...)."""
    return [*SWEEP_FIELDS, *map(dimension_axis, presets.accepted_dimensions(model))]


def _parse_dimension_values(model: str, key: str, raw: str) -> list[int]:
    """The values of a link's model dimension axis, each one the model takes."""
    if not raw.strip():
        return []
    values = parse_override_values(key, raw)
    for value in values:
        BenchConfig(model=model, overrides={key: value})  # the engine's own validation and message
    return values


def parse_sweep_params(params: Mapping[str, str | list[str]],
                       model: str = FIELDS_BY_NAME["model"].default) -> tuple[dict[str, list] | None, int, list[str]]:
    """The sweep definition in ``params`` for ``model`` (whose dimensions may be axes):
    (axis -> typed values, or None without a sweep; the fixed effective batch, 0 for none;
    one warning per invalid part, which is left out)."""
    if SWEEP not in params:
        return None, 0, []
    grid, warnings = {}, []
    dimensions = presets.accepted_dimensions(model)
    for name in filter(None, _last(params[SWEEP]).split(",")):
        if name not in SWEEP_FIELDS and name not in dimensions:
            allowed = ", ".join(map(link_name, sweep_axes(model)))
            warnings.append(f"Link parameter {SWEEP}: {name!r} ignored (allowed for {model}: {allowed}).")
            continue
        raw = _last(params.get(sweep_param(name), ""))
        try:
            if name in SWEEP_FIELDS:
                field = FIELDS_BY_NAME[name]
                grid[name] = [_parse(field, part.strip(), {}) for part in raw.split(",") if part.strip()]
            else:
                grid[dimension_axis(name)] = _parse_dimension_values(model, name, raw)
        except (ConfigError, ValueError) as exc:
            warnings.append(_ignored(sweep_param(name), raw, exc, FIELDS_BY_NAME[name].spec.sweep
                                     if name in SWEEP_FIELDS else dimensions[name]))
    grid = {name: values for name, values in grid.items() if values}
    effective = 0
    if SWEEP_EFFECTIVE in params:
        raw = _last(params[SWEEP_EFFECTIVE])
        try:
            effective = _parse(FIELDS_BY_NAME["batch"], raw, {})
        except (ConfigError, ValueError) as exc:
            warnings.append(_ignored(SWEEP_EFFECTIVE, raw, exc, 0))
    return grid, effective, warnings


def _parse(field: ConfigField, raw: str, choices: Mapping[str, list]) -> object:
    """The typed value of one parameter; raises ValueError or ConfigError when it is invalid."""
    if field.name == "model" and raw not in presets.MODELS:
        # Checked before BenchConfig sees it: a module:function is never taken from a link
        # (an hf: name of the table is no import, so it may be).
        raise ValueError(f"not a built-in model; a link can only name one of {', '.join(presets.MODELS)}")
    value = field.parse(raw)
    if field.name in choices and value not in choices[field.name]:
        raise ConfigError(field.name, raw, ", ".join(choices[field.name]))
    BenchConfig(**{field.name: value})  # the engine's own validation and message
    limits.check_field_limit(field.name, value)
    return value


def _last(raw: str | list[str]) -> str:
    return raw[-1] if isinstance(raw, list) else raw  # a repeated parameter: the last wins


def _ignored(name: str, raw: str, problem: Exception, default) -> str:
    why = f"allowed: {problem.allowed}" if isinstance(problem, ConfigError) else str(problem)
    return f"Link parameter {name}={raw!r} ignored ({why}); using {default!r}."


def _dimensions(model: str, params: Mapping, warnings: list[str]) -> dict[str, int]:
    """The model dimensions in ``params`` that ``model`` has, each valid and all valid together."""
    family, dims = presets.preset_dims(model)
    raws = {name: _last(params[name]) for name in presets.dimension_names() if name in params}
    overrides = {}
    for name, raw in raws.items():
        try:
            if name not in dims:
                raise ConfigError(name, raw, f"a dimension of {model} ({family}): {', '.join(dims)}")
            overrides[name] = parse_override(name, raw)
        except ConfigError as exc:
            warnings.append(_ignored(name, raw, exc, dims.get(name)))
    # Checked together: some limits are between dimensions (n_heads must divide d_model).
    while overrides:
        try:
            BenchConfig(model=model, overrides=overrides)
            break
        except ConfigError as exc:
            name = exc.field.removeprefix("overrides.")
            culprit = name if name in overrides else list(overrides)[-1]
            warnings.append(_ignored(culprit, raws[culprit], exc, dims[culprit]))
            del overrides[culprit]
    return overrides


def parse_query_params(params: Mapping[str, str | list[str]],
                       choices: Mapping[str, list] | None = None) -> tuple[dict, list[str]]:
    """Valid settings found in ``params`` (BenchConfig fields; model dimensions under
    ``overrides``) and one warning per invalid one; other parameters are ignored.

    ``choices`` narrows fields to what this machine offers (e.g. the devices present).
    """
    settings, warnings = {}, []
    for field in SCALAR_FIELDS:
        if field.name not in params:
            continue
        raw = _last(params[field.name])
        try:
            settings[field.name] = _parse(field, raw, choices or {})
        except (ConfigError, ValueError) as exc:
            warnings.append(_ignored(field.name, raw, exc, field.default))
    overrides = _dimensions(settings.get("model", FIELDS_BY_NAME["model"].default), params, warnings)
    if overrides:
        settings["overrides"] = overrides
    return settings, warnings


def to_query_params(config: BenchConfig) -> dict[str, str]:
    """The query parameters of ``config``: every scalar field and each changed model dimension.
    A user's module:function model is never put in a link."""
    link = {field.name: field.format(getattr(config, field.name)) for field in SCALAR_FIELDS}
    if presets.is_user_model(config.model):
        del link["model"]
    link.update({name: str(value) for name, value in config.overrides.items()})
    return link
