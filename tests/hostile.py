"""A corpus of hostile and broken result files, generated in code.

``REJECTED``: files every reader (the CLI's ``show`` and ``import``, the Results page's
import) must refuse with one clear message, importing nothing. ``PAYLOADS``: valid results
whose text fields carry Markdown, HTML, tracking pixels and spreadsheet formulas; they import,
and every page must show those strings as plain text and make no request for them.
``torn(...)``: a file whose last line was cut short by a full disk.
"""
from __future__ import annotations

import dataclasses
import json

from tests.factories import make_result

TRACKER = "https://tracker.invalid/pixel.png"
MARKDOWN_IMAGE = f"![x]({TRACKER})"
MARKDOWN_LINK = "[Sign in again](https://example.invalid/login)"
HTML_IMAGE = f'<img src="{TRACKER}">'
FORMULA = '=HYPERLINK("https://example.invalid","click")'


def _ok() -> dict:
    return make_result(batch=2).to_dict()


def _with(path: str, value) -> bytes:
    """A valid ok result with one field (dotted path) replaced, as one JSON line."""
    data = _ok()
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    target[last] = value
    return (json.dumps(data) + "\n").encode()


def _raw(path: str, literal: str) -> bytes:
    """A valid ok result with one field replaced by literal JSON text (NaN, 1e400...)."""
    marker = "__HOSTILE__"
    return _with(path, marker).replace(f'"{marker}"'.encode(), literal.encode())


def _deep(depth: int) -> bytes:
    return _raw("env.device_name", "[" * depth + "]" * depth)


REJECTED: dict[str, bytes] = {
    "model-int": _with("config.model", 7),
    "model-dict": _with("config.model", {"evil": 1}),
    "model-null": _with("config.model", None),
    "device-name-list": _with("env.device_name", ["a", "b"]),
    "device-name-huge-int": _with("env.device_name", int("9" * 400)),
    "samples-per-s-string": _with("metrics.samples_per_s", "fast"),
    "peak-string": _with("metrics.peak_allocated_bytes", "lots"),
    "peak-huge-int": _with("metrics.peak_allocated_bytes", int("9" * 400)),
    "median-string": _with("metrics.step_ms.median", "slow"),
    "mfu-string": _with("metrics.mfu", "high"),
    "batch-float": _with("config.batch", 2.5),
    "batch-30-digits": _with("config.batch", int("9" * 30)),
    "nan": _raw("metrics.samples_per_s", "NaN"),
    "infinity": _raw("metrics.samples_per_s", "Infinity"),
    "1e400": _raw("metrics.samples_per_s", "1e400"),
    "deep-nesting": _deep(100_000),
    "lone-surrogate": _raw("env.device_name", '"\\ud800"'),
    "not-json": b"this is not json\n",
    "binary": b"\xff\xfe\x00garbage",
    "wrong-schema": _with("schema", "tradeoff-lab/result/v0"),
}


def payload_results() -> list:
    """Valid results carrying hostile text where a run's own text can be (device name, CPU,
    error, warnings): they import, and must reach every page as plain text."""
    ok = make_result(batch=2)
    env = dataclasses.replace(ok.env, device_name=f"GPU {MARKDOWN_IMAGE} {HTML_IMAGE}", cpu=f"{FORMULA} +cmd|' /C calc'!A0")
    return [
        ok.replace(env=env, warnings=(f"{MARKDOWN_LINK} {MARKDOWN_IMAGE}", f"{HTML_IMAGE} **bold** <b>x</b>")),
        make_result("oom", batch=4).replace(env=env, error=f"{MARKDOWN_IMAGE} {HTML_IMAGE} {MARKDOWN_LINK} {FORMULA}"),
    ]


def torn(results: list) -> bytes:
    """JSON Lines of ``results`` whose last line was cut off mid-way (no newline)."""
    text = "".join(r.to_json() + "\n" for r in results)
    return (text + results[-1].to_json()[:57]).encode()
