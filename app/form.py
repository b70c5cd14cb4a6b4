"""The one configuration form, in the sidebar of the Run and Decide pages.

Generated from the config's field declarations (``engine.config.CONFIG_FIELDS``): one widget
per field by its kind (a choice is a selectbox, a number a number input with the field's
range and step, a nullable number may be left empty for "none"), labelled and explained by
the field's spec, disabled where the field does not apply (``k`` without every-k
checkpointing); the model's dimensions sit in an expander. Adding a config field needs no
edit here. Only the model and the device get their own widgets: their options come from the
presets and Hugging Face architectures (``presets.MODELS``) and from this machine.

Both pages use the same session keys (``config.<field>``, ``config.dim.<model>.<dim>``), so
a browser session has one configuration; it starts from the defaults overridden by the
valid parameters of the link that opened the app.
"""
from __future__ import annotations

import os

import streamlit as st

from engine import devices, hf_table, limits, presets
from engine.config import CONFIG_FIELDS, SCALAR_FIELDS, BenchConfig, ConfigError, ConfigField, check_runnable

from . import params, ui

PREFIX = "config."
USER_MODEL_KEY = PREFIX + "user_model"
_INITIALISED = PREFIX + "initialised"
_LINK_WARNINGS = PREFIX + "link_warnings"
_LINK_SETTINGS = PREFIX + "link_settings"
PERSIST = {"persist_state": "session"}  # keep the settings when the user visits another page


def field_key(name: str) -> str:
    """The session key of a config field's widget."""
    return PREFIX + name


def dim_key(model: str, name: str) -> str:
    """The session key of a model dimension's widget (each preset keeps its own)."""
    return f"{PREFIX}dim.{model}.{name}"


def user_models_allowed() -> bool:
    """Whether the form offers a module:function model (TRADEOFF_LAB_ALLOW_USER_MODELS=1)."""
    return os.environ.get("TRADEOFF_LAB_ALLOW_USER_MODELS") == "1"


def device_options() -> list[str]:
    """The devices present: auto, cpu, each CUDA GPU, mps."""
    return ["auto", "cpu", *(f"cuda:{i}" for i in range(devices.cuda_device_count()))] + \
        (["mps"] if devices.mps_available() else [])


def _init() -> None:
    """Once per session: every field's default, overridden by the valid link parameters."""
    if _INITIALISED in st.session_state:
        return
    settings, warnings = params.parse_query_params(st.query_params.to_dict(), {"device": device_options()})
    for field in SCALAR_FIELDS:
        st.session_state[field_key(field.name)] = settings.get(field.name, field.default)
    model = st.session_state[field_key("model")]
    for name, value in settings.get("overrides", {}).items():
        st.session_state[dim_key(model, name)] = value
    st.session_state[USER_MODEL_KEY] = ""
    st.session_state[_LINK_WARNINGS] = warnings
    link = BenchConfig(**settings) if settings else None
    st.session_state[_LINK_SETTINGS] = params.to_query_params(link) if link else {}
    st.session_state[_INITIALISED] = True


def _carry_over() -> None:
    """Hand the values to this page's widgets. Streamlit gives a widget a different id on
    each page, and copies a departed page's values onto their keys only after the next page
    has drawn its widgets, which would then start from their defaults; a value written to
    the key before the widget is drawn is the one the widget takes."""
    for key in [key for key in st.session_state if str(key).startswith(PREFIX)]:
        st.session_state[key] = st.session_state[key]


def _help(field: ConfigField) -> str:
    text = field.spec.help[:1].upper() + field.spec.help[1:] + "."
    return text + (" Empty means none." if field.nullable else "")


def _model(field: ConfigField, values: dict) -> str:
    """A preset, or (where allowed) the user's module:function, which wins when filled in."""
    model = st.selectbox(field.spec.label, list(presets.MODELS), key=field_key(field.name), help=_help(field),
                         **PERSIST)
    if user_models_allowed():
        user = st.text_input("Your model (module:function)", key=USER_MODEL_KEY, **PERSIST,
                             help="Allowed because TRADEOFF_LAB_ALLOW_USER_MODELS=1. Never taken from a link.")
        if user.strip():
            return user.strip()
    return model


def _dimensions(field: ConfigField, values: dict) -> dict[str, int]:
    """One input per dimension of the chosen preset; returns those that differ from the preset."""
    model = values["model"]
    if presets.is_user_model(model):
        return {}
    family, dims = presets.preset_dims(model)
    overrides = {}
    with st.expander(field.spec.label):
        for name, default in dims.items():
            key = dim_key(model, name)
            st.session_state.setdefault(key, default)
            value = st.number_input(name, min_value=1, step=1, key=key, **PERSIST)
            if value != default:
                overrides[name] = value
        kind = "Hugging Face architecture (random weights, its configuration's own keys)" if hf_table.is_hf(model) \
            else "preset"
        st.caption(f"{family} {kind} {model}; changed dimensions are sent as overrides.")
    return overrides


def _device(field: ConfigField, values: dict) -> str:
    options = device_options()
    key = field_key(field.name)
    if st.session_state.get(key) not in options:  # e.g. a GPU that is gone
        st.session_state[key] = "auto"
    return st.selectbox(field.spec.label, options, key=key, help=_help(field), **PERSIST,
                        format_func=lambda d: f"auto ({devices.resolve_device('auto')})" if d == "auto" else d)


def server_limit(name: str) -> float | None:
    """This server's limit on config field ``name`` (``engine.limits``), None without one or
    when its setting is broken (``check_runnable`` then names the setting under the form)."""
    try:
        return limits.limit_for(name)
    except ConfigError:
        return None


def _maximum(field: ConfigField) -> float | None:
    """The largest value a field's input takes: its declared maximum or this server's limit,
    whichever is lower (never below the field's minimum: a limit set below it leaves the
    input drawable, and the form's check says which setting refuses every value). A value
    already in the session above it (the limit was lowered) is brought down to it, as the
    input would refuse to draw it."""
    bounds = [bound for bound in (field.spec.maximum, server_limit(field.name)) if bound is not None]
    if not bounds:
        return None
    highest = max(min(bounds), field.spec.minimum or 0)
    key = field_key(field.name)
    if isinstance(st.session_state.get(key), (int, float)) and st.session_state[key] > highest:
        st.session_state[key] = field.kind(highest)
    return highest


def _widget(field: ConfigField, values: dict):
    """The widget of a field by its kind; returns its value."""
    spec = field.spec
    current = {f.name: st.session_state.get(field_key(f.name)) for f in CONFIG_FIELDS} | values
    common = dict(label=spec.label, key=field_key(field.name), help=_help(field),
                  disabled=not field.applies(current), **PERSIST)
    if field.choices:
        return st.selectbox(options=field.choices, format_func=lambda c: spec.choice_words.get(c, c), **common)
    if field.kind is bool:
        return st.checkbox(**common)
    highest = _maximum(field)
    if field.kind is int:
        return st.number_input(min_value=None if spec.minimum is None else int(spec.minimum),
                               max_value=None if highest is None else int(highest),
                               step=int(spec.step or 1), **common)
    if field.kind is float:
        value = st.number_input(min_value=None if spec.minimum is None else float(spec.minimum),
                                max_value=None if highest is None else float(highest),
                                step=float(spec.step or 1.0), placeholder="none" if field.nullable else None, **common)
        # A nullable number: empty means none, and so does 0 (the memory cap's old "0 = none").
        return None if field.nullable and not value else value
    text = st.text_input(**common)
    # A nullable text (blocks, allocator settings) left or cleared empty means none.
    return None if field.nullable and not (text or "").strip() else text


# Widgets of fields whose options come from elsewhere than the field's declaration.
_SPECIAL = {"model": _model, "overrides": _dimensions, "device": _device}


def config_form() -> BenchConfig | None:
    """The sidebar form; the configuration, or None (with the reason shown) when it is not
    valid or cannot run on this machine."""
    _init()
    _carry_over()
    for warning in st.session_state.pop(_LINK_WARNINGS, []):  # shown once, on opening the link
        st.warning(ui.plain(warning))
    values: dict = {}
    with st.sidebar:
        st.header("Configuration")
        groups: dict[str, list[ConfigField]] = {}
        for field in CONFIG_FIELDS:
            if field.spec.group:
                groups.setdefault(field.spec.group, []).append(field)
            else:
                _draw(field, values)
        for group, fields in groups.items():
            changed = any(st.session_state.get(field_key(f.name)) not in (None, "", f.default) for f in fields)
            with st.expander(group, expanded=changed):
                for field in fields:
                    _draw(field, values)
    try:
        config = BenchConfig(**values)
        check_runnable(config)  # the machine's checks: device present, cap fits it, user model imports
    except ConfigError as exc:
        st.error(f"Invalid setting: {ui.plain(exc)}")
        return None
    return config


def _draw(field: ConfigField, values: dict) -> None:
    """A field's widget; its value goes into ``values``, with the effective batch under the
    fields that make it."""
    values[field.name] = _SPECIAL.get(field.name, _widget)(field, values)
    if field.name == "accum":
        batch, accum = values["batch"], values["accum"]
        st.caption(f"Effective batch: {batch} × {accum} = **{batch * accum}**")
    if field.name == "nproc" and values["nproc"] > 1:
        batch, accum, nproc = values["batch"], values["accum"], values["nproc"]
        st.caption(f"Effective batch: {batch} × {accum} × {nproc} ranks = **{batch * accum * nproc}**")


def from_shared_link(config: BenchConfig) -> bool:
    """Whether ``config`` is what the link that opened this session set up (the settings it
    named, the rest left at their defaults)."""
    opened = st.session_state.get(_LINK_SETTINGS)
    return bool(opened) and params.to_query_params(config) == opened


def link(config: BenchConfig) -> dict[str, str]:
    """The query parameters that reopen the app with ``config`` (and presentation mode)."""
    return params.to_query_params(config) | ({params.PRESENT: "1"} if ui.presenting() else {})

